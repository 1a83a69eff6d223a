"""Verify a compiled artifact against ONNX Runtime: `verify_artifact(artifact, onnx, VerifyConfig())`.

Tolerances: quantized outputs (integer, or float from a DequantizeLinear) within `tol_steps`
quantization steps (default 1); plain float outputs within rtol (default 1e-3) of the
reference's max |value|. Symbolic dims default to 64 (`dims={"T": 200}` to change).
"""

from nativeq.verify.api import VerifyConfig, verify_artifact
from nativeq.verify.inputs import DEFAULT_DIM
from nativeq.verify.report import DEFAULT_RTOL, OutputComparison, VerifyReport

__all__ = ["DEFAULT_DIM", "DEFAULT_RTOL", "OutputComparison", "VerifyConfig", "VerifyReport", "verify_artifact"]
