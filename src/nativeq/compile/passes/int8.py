"""The int8 lowering stage of the pipeline (runs right after ONNX import, before any folding)."""


def int8_passes(target) -> list:
    """Relax passes that turn dequantize -> matmul/conv -> quantize into integer kernels for `target`."""
    return []
