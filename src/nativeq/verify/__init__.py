"""Verify a compiled artifact against ONNX Runtime: `verify_artifact(artifact, onnx, VerifyConfig())`.

Tolerances: quantized outputs (integer, or float from a DequantizeLinear) within `tol_steps`
quantization steps (default 1); plain float outputs within rtol (default 1e-3) of the
reference's max |value|. Symbolic dims default to 64 (`dims={"T": 200}` to change).
On failure, `localize.py` names the first quantized tensor where the engines differ and whether
it is a rounding tie (`accept_ties=True` passes failures that are ties only).
"""

from nativeq.verify.api import VerifyConfig, verify_artifact
from nativeq.verify.inputs import DEFAULT_DIM
from nativeq.verify.localize import Localization
from nativeq.verify.report import DEFAULT_RTOL, OutputComparison, VerifyReport

__all__ = ["DEFAULT_DIM", "DEFAULT_RTOL", "Localization", "OutputComparison", "VerifyConfig", "VerifyReport", "verify_artifact"]
