"""A model zoo of public speech architectures for nativeq, generated from seeds (no binaries in git).

    from benchmarks import zoo
    zoo.entries()                                   # [(model, quantizer), ...]
    zoo.float_model("conformer", cache_dir)         # <cache_dir>/conformer.float.onnx
    zoo.build("conformer", "qdq_u8_pc", cache_dir)  # <cache_dir>/conformer.qdq_u8_pc.onnx

`models.py`: the PyTorch modules (from the papers, random seeded weights) and their ONNX export;
`quantize.py`: the quantizers (ONNX Runtime static/dynamic, nativeq QAT);
`registry.py`: the matrix `ZOO` and the cache; `run.py` (`python -m benchmarks.zoo`): compile,
verify and bench every entry and print a table.
"""

from benchmarks.zoo.quantize import QUANTIZERS
from benchmarks.zoo.registry import (
    OPTION_QUANTIZERS, ORT_STATIC, ZOO, ZooModel, build, calibration_feeds, check_entry, entries, float_model, get_model,
)

__all__ = ["OPTION_QUANTIZERS", "ORT_STATIC", "QUANTIZERS", "ZOO", "ZooModel", "build", "calibration_feeds",
           "check_entry", "entries", "float_model", "get_model"]
