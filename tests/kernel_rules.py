"""Which default schedule rule each kernel of a model gets (`DefaultCpuSchedule.applied`), and the scheduled kernels,
for tests."""

from __future__ import annotations

from pathlib import Path

import onnx

from nativeq.compile._tvm import TVMTarget, tvm
from nativeq.compile.api import import_model
from nativeq.compile.pipeline import compile_passes
from nativeq.targets import get_target


def schedule_rules(model: onnx.ModelProto, tmp_path: Path, target: str = "host") -> dict[str, str]:
    """PrimFunc name -> the rule that scheduled it ("int8-matmul", "depthwise", "generic", ...)."""
    return scheduled(model, tmp_path, target)[0]


def scheduled(model: onnx.ModelProto, tmp_path: Path, target: str = "host"):
    """(`schedule_rules`, the IRModule with every kernel scheduled) of a model."""
    path = tmp_path / "rules.onnx"
    onnx.save(model, path)
    target = get_target(target)
    passes = compile_passes(target)
    names = [p.info.name for p in passes]
    stop = names.index("nativeq.DefaultCpuSchedule")
    with TVMTarget(target.tvm_dict()), tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(passes[: stop + 1])(import_model(onnx.load(path), path))
    return dict(passes[stop].applied), mod
