"""QDQ ONNX writer: an integer (converted or QAT) PyTorch model -> a QDQ ONNX file.

Where it sits: after `qat.convert`, before `nativeq compile` (which lowers each
`Q(op(DQ(x), DQ(W)) + b)` to an int8 kernel) and ONNX Runtime (the reference).

How: the model is traced by the TorchScript ONNX exporter with each integer layer standing
in as one marker node `nativeq::QLayer` (its forward still runs the real integer layer, so
shapes are traced correctly). Each marker is then replaced by the layer's QDQ form:

    x -> QuantizeLinear(s_x) -> DequantizeLinear ─┐
    W (INT8/INT4 initializer) -> DequantizeLinear(s_w per channel) ─┴─ MatMul/Conv
      -> Add(bias) -> QuantizeLinear(s_y) -> DequantizeLinear -> y

Linear weights are stored transposed ([in, out], per-axis scales on axis 1) so a MatMul
consumes them directly; conv weights keep [out, in/groups, *kernel] (axis 0). 2- and
4-bit weights are stored as INT4 (opset 21). Layer bit widths and sparsity patterns go to
`metadata_props`. Data movement between quantized tensors is requantized the way ONNX
Runtime's optimizer would (`export.propagate`), and the finished model must load in ONNX
Runtime at every graph optimization level (`export.lint.check_ort_loads`).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from nativeq.errors import NativeqError
from nativeq.export.lint import check_ort_loads
from nativeq.export.propagate import requantize_data_movement
from nativeq.qat.convert import IntLayer, convert, int_layers
from nativeq.qat.matmul import matmul_sites
from nativeq.qat.quantize import quant_layers

OPSET = 21
# NOTE: the TorchScript exporter supports opsets <= 20; the traced float ops mean the same
# at 21, the opset INT4 DequantizeLinear needs, so the graph is traced at 20 and stamped 21.
TRACE_OPSET = 20
MARKER_DOMAIN = "nativeq"


class _Marker(torch.autograd.Function):
    """Runs the integer layer; exports as one `nativeq::QLayer` node named after it."""

    registry: dict[str, IntLayer] = {}

    @staticmethod
    def forward(ctx, x, name):
        # the integer arithmetic inside is not part of the traced graph: only the marker is
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return _Marker.registry[name]._real_forward(x)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, x, name):
        out = g.op(f"{MARKER_DOMAIN}::QLayer", x, layer_s=name)
        rank = x.type().dim() if hasattr(x.type(), "dim") else None
        if rank is not None:
            out.setType(x.type().with_sizes([None] * rank))
        return out


class _MatmulMarker(torch.autograd.Function):
    """Runs an integer activation product; exports as one `nativeq::QMatMul` node."""

    registry: dict[int, nn.Module] = {}

    @staticmethod
    def forward(ctx, a, b, index):
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return _MatmulMarker.registry[index](a, b)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, a, b, index):
        out = g.op(f"{MARKER_DOMAIN}::QMatMul", a, b, site_i=index)
        rank = a.type().dim() if hasattr(a.type(), "dim") else None
        if rank is not None:
            out.setType(a.type().with_sizes([None] * rank))
        return out


@contextlib.contextmanager
def _markers(model: nn.Module):
    layers = int_layers(model)
    saved = {}
    for i, site in enumerate(matmul_sites(model)):
        _MatmulMarker.registry[i] = site
    model._nativeq_route = lambda i, a, b: _MatmulMarker.apply(a, b, i)
    try:
        for name, layer in layers:
            _Marker.registry[name] = layer
            layer._real_forward = layer.forward
            saved[name] = layer
            layer.forward = (lambda n: (lambda x: _Marker.apply(x, n)))(name)
        yield
    finally:
        for name, layer in saved.items():
            del layer.forward
            del layer._real_forward
            _Marker.registry.pop(name, None)
        _MatmulMarker.registry.clear()
        del model._nativeq_route


@dataclass(frozen=True)
class ExportConfig:
    input_names: tuple[str, ...] = ("x",)
    output_names: tuple[str, ...] = ("y",)
    dynamic_axes: dict = field(default_factory=dict)  # {"x": {1: "T"}, ...}
    metadata: dict = field(default_factory=dict)  # extra metadata_props (str -> str)
    output_index: int | None = None  # export only this element of a tuple-returning forward


class _SelectOutput(nn.Module):
    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, *args):
        return self.model(*args)[self.index]


def _tensor(name: str, array: np.ndarray, dtype: int) -> onnx.TensorProto:
    if dtype == TensorProto.INT4:
        return helper.make_tensor(name, TensorProto.INT4, array.shape, array.reshape(-1).astype(np.int8).tolist())
    return numpy_helper.from_array(array, name)


def _qdq_nodes(layer: IntLayer, name: str, x: str, y: str) -> tuple[list, list]:
    """Nodes and initializers of one layer's QDQ form, from tensor `x` to tensor `y`."""
    nodes, inits = [], []
    p = name
    zp8 = f"{p}.act_zero_point"
    inits.append(numpy_helper.from_array(np.array(0, np.int8), zp8))
    inits.append(numpy_helper.from_array(layer.input_scale.numpy().astype(np.float32), f"{p}.input_scale"))
    nodes.append(helper.make_node("QuantizeLinear", [x, f"{p}.input_scale", zp8], [f"{p}.input_q"], name=f"{p}.input_Q"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{p}.input_q", f"{p}.input_scale", zp8], [f"{p}.input_dq"],
                                  name=f"{p}.input_DQ"))

    wq = layer.integer_weight().numpy()
    wtype = TensorProto.INT8 if layer.weight_bits == 8 else TensorProto.INT4
    scale = layer.weight_scale.numpy().astype(np.float32)
    if layer.spec.kind == "linear":
        wq, axis = np.ascontiguousarray(wq.T), 1
    else:
        axis = 0
    inits.append(_tensor(f"{p}.weight_q", wq, wtype))
    inits.append(numpy_helper.from_array(scale, f"{p}.weight_scale"))
    inits.append(_tensor(f"{p}.weight_zero_point", np.zeros(scale.shape, np.int8), wtype))
    nodes.append(helper.make_node("DequantizeLinear", [f"{p}.weight_q", f"{p}.weight_scale", f"{p}.weight_zero_point"],
                                  [f"{p}.weight_dq"], name=f"{p}.weight_DQ", axis=axis))

    out = f"{p}.output" if layer.output_scale is not None else y
    bias = None if layer.bias is None else layer.bias.numpy().astype(np.float32)
    if layer.spec.kind == "linear":
        mm = f"{p}.matmul" if bias is not None else out
        nodes.append(helper.make_node("MatMul", [f"{p}.input_dq", f"{p}.weight_dq"], [mm], name=f"{p}.MatMul"))
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, f"{p}.bias"))
            nodes.append(helper.make_node("Add", [mm, f"{p}.bias"], [out], name=f"{p}.Add"))
    else:
        spec = layer.spec
        kernel = list(layer.weight_shape[2:])
        pads = [lr[0] for lr in spec.padding] + [lr[1] for lr in spec.padding]
        ins = [f"{p}.input_dq", f"{p}.weight_dq"]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, f"{p}.bias"))
            ins.append(f"{p}.bias")
        nodes.append(helper.make_node("Conv", ins, [out], name=f"{p}.Conv", kernel_shape=kernel, pads=pads,
                                      strides=list(spec.stride), dilations=list(spec.dilation), group=spec.groups))
    if layer.output_scale is not None:
        inits.append(numpy_helper.from_array(layer.output_scale.numpy().astype(np.float32), f"{p}.output_scale"))
        nodes.append(helper.make_node("QuantizeLinear", [out, f"{p}.output_scale", zp8], [f"{p}.output_q"],
                                      name=f"{p}.output_Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{p}.output_q", f"{p}.output_scale", zp8], [y],
                                      name=f"{p}.output_DQ"))
    return nodes, inits


def _act_qdq(nodes, inits, prefix: str, src: str, scale: torch.Tensor, zp: str, out: str | None = None) -> str:
    """QuantizeLinear -> DequantizeLinear of activation `src`; returns the dequantized tensor's name."""
    inits.append(numpy_helper.from_array(scale.numpy().astype(np.float32), f"{prefix}_scale"))
    out = out or f"{prefix}_dq"
    nodes.append(helper.make_node("QuantizeLinear", [src, f"{prefix}_scale", zp], [f"{prefix}_q"], name=f"{prefix}_Q"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_scale", zp], [out], name=f"{prefix}_DQ"))
    return out


def _matmul_qdq_nodes(site, a: str, b: str, y: str) -> tuple[list, list]:
    """Q/DQ on both operands, MatMul, Q/DQ on the product (an IntMatmulSite's arithmetic)."""
    nodes, inits = [], []
    p = site.site_name
    zp = f"{p}.act_zero_point"
    inits.append(numpy_helper.from_array(np.array(0, np.int8), zp))
    a_dq = _act_qdq(nodes, inits, f"{p}.a", a, site.a_scale, zp)
    b_dq = _act_qdq(nodes, inits, f"{p}.b", b, site.b_scale, zp)
    nodes.append(helper.make_node("MatMul", [a_dq, b_dq], [f"{p}.product"], name=f"{p}.MatMul"))
    _act_qdq(nodes, inits, f"{p}.output", f"{p}.product", site.output_scale, zp, out=y)
    return nodes, inits


def layer_metadata(model: nn.Module) -> dict[str, dict]:
    meta = {}
    for name, layer in int_layers(model):
        q = layer.integer_weight()
        meta[name] = {
            "weight_bits": layer.weight_bits,
            "act_bits": layer.act_bits,
            "sparsity": layer.sparsity_pattern,
            "zeros": round(float((q == 0).float().mean()), 4),
            "weights": int(q.numel()),
        }
    return meta


def _trace(model: nn.Module, example_inputs: tuple, config: ExportConfig) -> onnx.ModelProto:
    """The TorchScript ONNX trace of `model` with one marker node per integer layer / product."""
    traced_module = model if config.output_index is None else _SelectOutput(model, config.output_index)
    buf = io.BytesIO()
    with _markers(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            traced_module, tuple(example_inputs), buf, dynamo=False, opset_version=TRACE_OPSET,
            input_names=list(config.input_names), output_names=list(config.output_names),
            dynamic_axes=dict(config.dynamic_axes), do_constant_folding=True,
            custom_opsets={MARKER_DOMAIN: 1},
        )
    return onnx.load_from_string(buf.getvalue())


def _replace_markers(graph: onnx.GraphProto, model: nn.Module) -> None:
    """Swap every marker node for its QDQ subgraph (in place)."""
    layers = dict(int_layers(model))
    sites = matmul_sites(model)
    new_nodes, new_inits, seen = [], [], set()
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            new_nodes.append(node)
            continue
        if node.op_type == "QMatMul":
            index = next(a.i for a in node.attribute if a.name == "site")
            nodes, inits = _matmul_qdq_nodes(sites[index], node.input[0], node.input[1], node.output[0])
        else:
            name = next(a.s.decode() for a in node.attribute if a.name == "layer")
            if name in seen:
                raise NativeqError(f"export: layer {name} is called more than once in forward (share-free models only)")
            seen.add(name)
            nodes, inits = _qdq_nodes(layers[name], name, node.input[0], node.output[0])
        new_nodes += nodes
        new_inits += inits
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    del graph.value_info[:]


def to_qdq_onnx(model: nn.Module, example_inputs: tuple, config: ExportConfig = ExportConfig()) -> onnx.ModelProto:
    """Build the QDQ ONNX model of `model` (a QAT model is converted first)."""
    if quant_layers(model):
        model = convert(model)
    if not int_layers(model):
        raise NativeqError(f"export: {type(model).__name__} has no quantized layers (quantize_ or load a QAT run first)")
    model = model.eval()
    proto = _trace(model, example_inputs, config)
    _replace_markers(proto.graph, model)
    requantize_data_movement(proto.graph)
    for imp in list(proto.opset_import):
        if imp.domain == MARKER_DOMAIN:
            proto.opset_import.remove(imp)
        elif imp.domain in ("", "ai.onnx"):
            imp.version = OPSET
    proto.ir_version = 10
    proto.producer_name = "nativeq"
    meta = layer_metadata(model)
    props = {
        "nativeq.layers": json.dumps(meta, sort_keys=True),
        "nativeq.weight_bits": ",".join(sorted({str(m["weight_bits"]) for m in meta.values()})),
        "nativeq.act_bits": ",".join(sorted({str(m["act_bits"]) for m in meta.values()})),
        "nativeq.sparsity": ",".join(sorted({m["sparsity"] for m in meta.values()})),
        "nativeq.activation_products": json.dumps([s.site_name for s in matmul_sites(model)]),
        **{str(k): str(v) for k, v in config.metadata.items()},
    }
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise NativeqError(f"export: the QDQ model fails onnx.checker: {str(e).splitlines()[0]}") from None
    check_ort_loads(proto, "export: the QDQ model")
    return proto


def export_qdq(model: nn.Module, example_inputs: tuple, path, config: ExportConfig = ExportConfig()) -> onnx.ModelProto:
    """Write the QDQ ONNX model of `model` to `path` atomically; returns the ModelProto."""
    from nativeq._fs import write_bytes_atomic

    proto = to_qdq_onnx(model, example_inputs, config)
    write_bytes_atomic(path, proto.SerializeToString())
    return proto
