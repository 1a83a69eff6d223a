"""Export fidelity: ONNX Runtime on the QDQ file vs the PyTorch integer model, layer by layer.

Also covers the integer activation products (`qat.matmul` sites, `<site>.output_q`).

Where it sits: after `export`, as its acceptance check (and the test of it). Every
quantized layer's int8 output (`<layer>.output_q` in the QDQ graph) is compared with the
integer the PyTorch layer produced, in steps. ORT runs with graph optimizations disabled
(its optimized graph swaps in its own integer kernels, which round differently);
`compare_ort_levels` measures that difference on the model's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from nativeq.qat.convert import int_layers
from nativeq.qat.matmul import matmul_sites


@dataclass(frozen=True)
class LayerAgreement:
    name: str
    elements: int
    exact: float  # fraction of int8 values that are equal
    max_steps: int


def ort_session(proto: onnx.ModelProto, extra_outputs: list[str] = (), threads: int = 1,
                level: str = "ORT_DISABLE_ALL"):
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    have = {o.name for o in model.graph.output}
    for name in extra_outputs:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT8, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def compare_layers(int_model: nn.Module, proto: onnx.ModelProto, inputs: list[dict[str, np.ndarray]],
                   forward=None) -> list[LayerAgreement]:
    """Per quantized layer: agreement of its int8 output between ORT and PyTorch over `inputs`.

    `inputs` are ORT feeds; `forward(model, feed)` runs the PyTorch model on one feed
    (default: `model(*feed.values())`).
    """
    layers = [(n, m) for n, m in int_layers(int_model) if m.output_scale is not None]
    layers += [(site.site_name, site) for site in matmul_sites(int_model)]
    names = [f"{n}.output_q" for n, _ in layers]
    sess = ort_session(proto, names)
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: captured.__setitem__(n, torch.round(out / mod.output_scale)))
        for n, m in layers
    ]
    totals = {n: [0, 0, 0] for n, _ in layers}  # elements, equal, max steps
    try:
        for feed in inputs:
            with torch.no_grad():
                tensors = [torch.from_numpy(v) for v in feed.values()]
                forward(int_model, tensors) if forward else int_model(*tensors)
            outs = dict(zip(names, sess.run(names, feed)))
            for n, _ in layers:
                ref = outs[f"{n}.output_q"].astype(np.int32)
                got = captured[n].numpy().astype(np.int32)
                diff = np.abs(ref - got)
                t = totals[n]
                t[0] += diff.size
                t[1] += int((diff == 0).sum())
                t[2] = max(t[2], int(diff.max(initial=0)))
    finally:
        for h in hooks:
            h.remove()
    return [LayerAgreement(n, t[0], t[1] / max(1, t[0]), t[2]) for n, t in totals.items()]


def compare_layers_isolated(int_model: nn.Module, proto: onnx.ModelProto,
                            inputs: list[dict[str, np.ndarray]]) -> list[LayerAgreement]:
    """Per quantized layer, on ORT's own int8 inputs: does the PyTorch layer give ORT's int8 output?

    Unlike `compare_layers`, a difference upstream does not propagate: this isolates the
    fidelity of each exported layer (the export's correctness) from the drift that float
    ops outside the quantized layers (LayerNorm, softmax, ...) cause along a deep network.
    """
    layers = [(n, m, [f"{n}.input_q"]) for n, m in int_layers(int_model) if m.output_scale is not None]
    layers += [(s.site_name, s, [f"{s.site_name}.a_q", f"{s.site_name}.b_q"]) for s in matmul_sites(int_model)]
    names = [x for _, _, ins in layers for x in ins] + [f"{n}.output_q" for n, _, _ in layers]
    sess = ort_session(proto, names)
    totals = {n: [0, 0, 0] for n, _, _ in layers}
    for feed in inputs:
        outs = dict(zip(names, sess.run(names, feed)))
        for n, module, ins in layers:
            scales = [module.input_scale] if len(ins) == 1 else [module.a_scale, module.b_scale]
            args = [torch.from_numpy(outs[i].astype(np.float32)) * s for i, s in zip(ins, scales)]
            with torch.no_grad():
                got = torch.round(module(*args) / module.output_scale).numpy().astype(np.int32)
            diff = np.abs(got - outs[f"{n}.output_q"].astype(np.int32))
            t = totals[n]
            t[0] += diff.size
            t[1] += int((diff == 0).sum())
            t[2] = max(t[2], int(diff.max(initial=0)))
    return [LayerAgreement(n, t[0], t[1] / max(1, t[0]), t[2]) for n, t in totals.items()]


@dataclass(frozen=True)
class LevelAgreement:
    level: str
    elements: int
    exact: float  # fraction of output values equal to the unoptimized session's
    max_steps: float  # largest difference, in output quantization steps (absolute if the output is float)
    step: float | None  # the output's quantization step (its DequantizeLinear scale), if it has one


def output_step(proto: onnx.ModelProto, index: int = 0) -> float | None:
    """The scale of the per-tensor DequantizeLinear producing graph output `index`, if it comes from one."""
    name = proto.graph.output[index].name
    node = next((n for n in proto.graph.node if name in n.output), None)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    init = next((t for t in proto.graph.initializer if t.name == node.input[1]), None)
    scale = None if init is None else onnx.numpy_helper.to_array(init)
    return float(scale) if scale is not None and scale.size == 1 else None


def compare_ort_levels(proto: onnx.ModelProto, inputs: list[dict[str, np.ndarray]],
                       levels: tuple[str, ...] = ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"),
                       threads: int = 1) -> list[LevelAgreement]:
    """ONNX Runtime at each optimization level vs optimizations off, on the model's first output.

    The optimized graphs quantize float biases to int32 (WeightBiasQuantization) and run ORT's
    own integer kernels, so an occasional value rounds to the neighbouring step and the
    difference grows through the layers after it.
    """
    step = output_step(proto)
    reference = ort_session(proto, threads=threads)
    refs = [reference.run(None, feed)[0] for feed in inputs]
    out = []
    for level in levels:
        session = ort_session(proto, threads=threads, level=level)
        elements = equal = 0
        worst = 0.0
        for feed, ref in zip(inputs, refs):
            diff = np.abs(session.run(None, feed)[0].astype(np.float64) - ref)
            elements += diff.size
            equal += int((diff == 0).sum())
            worst = max(worst, float(diff.max(initial=0.0)) / (step or 1.0))
        out.append(LevelAgreement(level, elements, equal / max(1, elements), worst, step))
    return out
