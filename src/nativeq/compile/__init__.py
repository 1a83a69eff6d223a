"""Compile a (QDQ) ONNX model for a target into an artifact directory.

`compile_model(model_path, out_dir, CompileConfig(target=...))` -> `CompileResult`. The pass
list per target is in `pipeline.py`; the artifact layout in `artifact.py`.
"""

from nativeq.compile.api import CompileConfig, CompileResult, compile_model, load_onnx

__all__ = ["CompileConfig", "CompileResult", "compile_model", "load_onnx"]
