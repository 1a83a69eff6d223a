"""Localize a verify failure: the first quantized tensor where nativeq and ONNX Runtime differ, and why.

Run by `verify_artifact` when an output is beyond tolerance, on the input set that failed:

1. Sites are the quantized activations, in the ONNX graph's (topological) node order: the outputs
   of QuantizeLinear nodes on activations (not on constants), of DynamicQuantizeLinear, and of the
   QOperator ops (QLinearMatMul, QLinearConv, com.microsoft QLinearAdd, QGemm, ...), which are
   checked on their QDQ form (`compile/onnx_legalize.py` rewrites each into DequantizeLinear ->
   float op -> QuantizeLinear, keeping its output's name) while ONNX Runtime runs the model as
   given. A copy of the model with every site added as a graph output
   is compiled with the artifact's target and build options (read from its manifest: target
   name, int8, dims, input shapes, tuning database) and run next to ONNX Runtime given the same
   extra outputs. For each failing output, its first ancestor site whose integers differ is the
   site it localizes to. If the copy computes a failing output differently from the artifact
   (extra outputs changed what the compiler fused), the model is compiled again as it is: if that
   reproduces the artifact, cuts ending at one site each are bisected (`MAX_CUT_COMPILES`);
   otherwise (the artifact is not this file's), or if no site differs, the failure stays
   unlocalized.
2. The site is then checked in isolation: the nodes between the site's QuantizeLinear and the
   DequantizeLinear nodes feeding it (at most `MAX_SUBGRAPH_NODES`) become a small model; both
   engines run it on the same input values (ONNX Runtime's values of the site's inputs). The
   value before rounding is evaluated in float64 (dequantized operands are exact in float64;
   the subgraph runs in float64 in ONNX Runtime) as x / scale + zero_point. A DynamicQuantizeLinear
   site is the node alone: x is ONNX Runtime's input to it, scale and zero point its run-time ones.
3. An element is a tie when that value lies within `TIE_RTOL` · max(half the type's range (at least
   `TIE_SUM_SIZE`), |value - zero_point|) of k + 0.5 (about a thousandth of a step for 8-bit values, a quarter
   of a step for 16-bit ones) and the two engines' integers are k and k + 1. The site's kind is `tie` when every
   element that differs, in the full model and in isolation, is a tie; `error` otherwise;
   `unlocalized` when no site was found or its value could not be evaluated.

Cost: one compile of the copy with extra outputs, one compile of the small model per distinct site
(`max_sites` bounds them), and in the fallback one more compile plus at most `MAX_CUT_COMPILES` cuts.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import textwrap
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nativeq._text import first_line

# Float32 error allowance around k + 0.5, relative to the size of the sums rounded: 2^-17 is 64 float32 ulps,
# the order of the error of a float32 dot product of a few hundred terms (ORT's unoptimized MatMul / Conv).
# A float engine rounds its partial sums at their own size, and a result near the zero point can be the
# difference of larger ones: the size counted is at least half the output type's range (TIE_SUM_SIZE = 128 steps
# for 8 and 4 bits; 32768 for 16-bit outputs, whose sums float32 resolves to about a quarter of a step).
TIE_RTOL = 2.0 ** -17
TIE_SUM_SIZE = 128.0
MAX_SUBGRAPH_NODES = 32
MAX_SITES = 3
MAX_CUT_COMPILES = 8


@dataclass
class Localization:
    """Where a failure starts. `kind`: "tie", "error" or "unlocalized" (then `reason` says why)."""

    kind: str
    site: str | None = None
    node: str | None = None
    op: str | None = None
    quantize_node: str | None = None  # the node producing the site: QuantizeLinear or DynamicQuantizeLinear
    quantize_op: str | None = None  # its op; None for a QOperator op's output (`node` is then that op)
    index: list | None = None
    nativeq: int | None = None
    onnxruntime: int | None = None
    exact: float | None = None
    rounded: int | None = None  # `exact` rounded half to even (and saturated): the correct integer
    differing: int = 0
    isolated_differing: int | None = None
    isolated_agrees: bool | None = None
    ties: int = 0
    outputs: list = field(default_factory=list)
    compiles: int = 0
    ort_runs: int = 0
    reason: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def paragraph(self) -> str:
        outs = ", ".join(self.outputs)
        if self.kind == "unlocalized" and (self.site is None or self.index is None):
            return textwrap.fill(f"localization ({outs}): not localized: {self.reason}", 110, subsequent_indent="  ",
                                 break_on_hyphens=False, break_long_words=False)
        at = "[" + ", ".join(map(str, self.index or [])) + "]"
        plural = "s differ" if self.differing != 1 else " differs"
        producer = (f"the {self.quantize_op} {self.quantize_node!r} of {self.op} node {self.node!r}" if self.quantize_op
                    else f"the output of {self.op} node {self.node!r}")
        text = (f"localization ({outs}): the first quantized tensor where the engines differ is {self.site!r}, "
                f"{producer}: {self.differing} "
                f"element{plural}" + (f" ({self.ties} of them ties)" if self.kind == "error" and self.ties else "")
                + f"; at {at} nativeq {self.nativeq}, ONNX Runtime {self.onnxruntime}")
        if self.exact is not None:
            text += f", value before rounding {self.exact:.9g}"
        if self.kind == "tie":
            text += (f": a rounding tie, within float32 error of {(self.nativeq + self.onnxruntime) / 2:g}, where the two "
                     f"engines' arithmetic may round either way (rounded exactly: {self.rounded})")
        elif self.kind == "error":
            text += f": not a tie: an error (rounded exactly: {self.rounded})"
        if self.isolated_agrees is not None:
            if self.isolated_differing == 0:
                text += "; given the same inputs in isolation, both engines give the same integers"
            elif self.isolated_agrees:
                text += (f"; given the same inputs in isolation, they differ only at ties "
                         f"({self.isolated_differing} element{'s' if self.isolated_differing != 1 else ''})")
            else:
                text += (f"; given the same inputs in isolation, they differ at {self.isolated_differing} "
                         f"element{'s' if self.isolated_differing != 1 else ''}, not all ties")
        if self.reason:
            text += f" ({self.reason})"
        text += f". Cost: {self.compiles} compile{'s' if self.compiles != 1 else ''}, {self.ort_runs} ONNX Runtime runs."
        return textwrap.fill(text, 110, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)


# ----------------------------------------------------------------------------- graph helpers
def _constants(graph) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            attr = {a.name: a for a in node.attribute}
            if "value" in attr:
                values[node.output[0]] = numpy_helper.to_array(attr["value"].t)
    return values


def _q_dtype(node, constants) -> int:
    """ONNX elem type of a QuantizeLinear's output."""
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] in constants:
            return helper.np_dtype_to_tensor_dtype(constants[node.input[2]].dtype)
    for a in node.attribute:
        if a.name == "output_dtype" and a.i:
            return a.i
    return TensorProto.UINT8


def quantized_sites(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """QuantizeLinear nodes on activations, in graph order."""
    constants = _constants(model.graph)
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]


@dataclass
class _Site:
    """A quantized activation and what its value before rounding is evaluated on: `quantize`, the
    QuantizeLinear (or DynamicQuantizeLinear) producing it in `model` (the user's model, or its QDQ form).
    `op`: the QOperator node producing it in the user's model, run alone in the isolated check."""

    name: str
    model: onnx.ModelProto
    constants: dict
    quantize: onnx.NodeProto
    dtype: int
    op: onnx.NodeProto | None = None


def _sites(model: onnx.ModelProto) -> tuple[list[_Site], dict]:
    """The quantized activations of `model` in graph order; and the QDQ form's node names -> (op, node) of `model`."""
    from nativeq.compile.onnx_legalize import legalize

    origins: dict = {}
    try:
        qdq = legalize(model, origins)
    except Exception:  # noqa: BLE001  (a model legalize refuses has no QDQ form; its QuantizeLinear sites remain)
        qdq, origins = model, {}
    qdq_constants, constants = _constants(qdq.graph), _constants(model.graph)
    quantize_in_qdq = {q.output[0]: q for q in quantized_sites(qdq)}
    sites = []
    for node in model.graph.node:
        name = node.output[0] if node.output else ""
        if node.op_type == "DynamicQuantizeLinear":
            sites.append(_Site(name, model, constants, node, TensorProto.UINT8))
        elif name in quantize_in_qdq:
            q = quantize_in_qdq[name]
            op = None if node.op_type == "QuantizeLinear" else node
            sites.append(_Site(name, qdq, qdq_constants, q, _q_dtype(q, qdq_constants), op))
        elif node.op_type == "QuantizeLinear" and node.input[0] not in constants:  # e.g. to int4: a Clip in the QDQ form
            sites.append(_Site(name, model, constants, node, _q_dtype(node, constants)))
    return sites, origins


def _ancestors(model: onnx.ModelProto, tensor: str) -> set[str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = producer.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return seen


def _with_outputs(model: onnx.ModelProto, names: list[str], infos: dict, types: dict[str, int],
                  ranks: dict[str, int] | None = None) -> onnx.ModelProto:
    """`model` with `names` added as graph outputs: the inferred value info when it has a shape, else
    the elem type `types[name]` and `ranks[name]` fresh symbolic dims (None: no shape)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name in present:
            continue
        info = infos.get(name)
        if info is not None and info.type.tensor_type.HasField("shape"):
            out.graph.output.append(info)
        else:
            rank = (ranks or {}).get(name)
            shape = None if rank is None else [f"{name}_dim{i}" for i in range(rank)]
            out.graph.output.append(helper.make_tensor_value_info(name, types[name], shape))
    return out


def _value_infos(model: onnx.ModelProto) -> dict:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001
        inferred = model
    g = inferred.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output] if v.type.tensor_type.elem_type}


# ----------------------------------------------------------------------------- engines
def _compile(model: onnx.ModelProto, manifest: dict, workdir: Path, name: str, keep_dims: bool):
    """Compile `model` with the artifact's target and options; returns a runner inputs -> {name: array}."""
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.runtime import read_manifest
    from nativeq.runtime.manifest import output_specs
    from nativeq.verify.api import _artifact_runner

    build = manifest.get("build", {})
    # The recorded tuning database; if that path does not resolve from here, the one compile finds by default.
    database = (manifest.get("tuning") or {}).get("database")
    cfg = CompileConfig(
        target=manifest["target"]["name"], int8=bool(build.get("int8", True)),
        tuning_log=database if database and Path(database).is_dir() else None, use_tuning=bool(database),
        dims=dict(build.get("dims") or {}) if keep_dims else {},
        input_shapes={k: tuple(v) for k, v in (build.get("input_shapes") or {}).items()} if keep_dims else {},
    )
    path = workdir / f"{name}.onnx"
    onnx.save(model, str(path))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        compile_model(path, workdir / name, cfg)
    art_manifest = read_manifest(workdir / name)
    run, _ = _artifact_runner(workdir / name, art_manifest)
    names = [s.name for s in output_specs(art_manifest)]
    return lambda inputs: dict(zip(names, (np.asarray(v) for v in run(inputs))))


def _ort_run(model: onnx.ModelProto, ort_opt: str, inputs: dict, workdir: Path, name: str) -> dict:
    from nativeq.verify.api import ort_session

    path = workdir / f"{name}.ort.onnx"
    onnx.save(model, str(path))
    session = ort_session(path, ort_opt)
    names = [o.name for o in session.get_outputs()]
    feed = {i.name: inputs[i.name] for i in session.get_inputs()}
    return dict(zip(names, session.run(names, feed)))


# ----------------------------------------------------------------------------- isolation
def _subgraph(model: onnx.ModelProto, q: onnx.NodeProto, constants: dict):
    """Nodes from the DequantizeLinear (or graph input / cut) frontier to `q`, in graph order, and the
    frontier tensors that become inputs."""
    producer = {o: n for n in model.graph.node for o in n.output}
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    chosen: dict[int, onnx.NodeProto] = {id(q): q}
    frontier: list[str] = []
    stack = [q.input[0]]
    seen = set()
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        if t in constants:
            continue
        node = producer.get(t)
        if node is None:
            frontier.append(t)
            continue
        if node.op_type == "DequantizeLinear":
            chosen[id(node)] = node
            if node.input[0] not in constants:
                frontier.append(node.input[0])
            continue
        if len(chosen) >= MAX_SUBGRAPH_NODES:
            frontier.append(t)
            continue
        chosen[id(node)] = node
        stack.extend(node.input)
    nodes = sorted(chosen.values(), key=lambda n: order[id(n)])
    return nodes, list(dict.fromkeys(frontier))


def _dequantize64(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    scale = np.asarray(scale, np.float64)
    zp = np.zeros_like(scale) if zp is None else np.asarray(zp, np.float64)
    if scale.ndim == 1 and x.ndim > 0:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (x.astype(np.float64) - zp) * scale


def _float64_model(nodes, q, constants, opsets, feeds: dict, float32_ops=frozenset()) -> tuple[onnx.ModelProto, dict]:
    """The subgraph without its QuantizeLinear, DequantizeLinear outputs as float64 inputs, floats as double;
    ops of type in `float32_ops` (no float64 kernel in ONNX Runtime) run in float32 between casts."""
    inputs, new_feeds, new_nodes, inits = [], {}, [], {}
    parts = {}  # DequantizeLinear output -> (its integers minus zero point, as float64; its scale)
    for node in nodes:
        if node is q:
            continue
        if node.op_type == "DequantizeLinear":
            attr = {a.name: a for a in node.attribute}
            if "block_size" in attr and attr["block_size"].i:
                raise ValueError("blocked DequantizeLinear")
            x = constants[node.input[0]] if node.input[0] in constants else feeds[node.input[0]]
            zp = constants[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            axis = attr["axis"].i if "axis" in attr else 1
            value = _dequantize64(x, constants[node.input[1]], zp, axis)
            new_feeds[node.output[0]] = value
            inputs.append(helper.make_tensor_value_info(node.output[0], TensorProto.DOUBLE, value.shape))
            parts[node.output[0]] = (_dequantize64(x, np.ones_like(constants[node.input[1]]), zp, axis),
                                     np.asarray(constants[node.input[1]], np.float64))
            continue
        if node.op_type == "Conv" and node.input[0] in parts and node.input[1] in parts:
            new_nodes += _integer_conv(node, parts, constants, new_feeds, inputs)
            continue
        for name in node.input:
            if name in constants and name not in inits and not any(name in n.output for n in nodes):
                value = constants[name]
                inits[name] = value.astype(np.float64) if value.dtype == np.float32 else value
        new = onnx.NodeProto()
        new.CopyFrom(node)
        if node.op_type in float32_ops:
            for k, name in enumerate(node.input):
                if name and not (name in constants and constants[name].dtype.kind in "iub"):
                    new.input[k] = f"{name}.float32.{node.name}"
                    new_nodes.append(helper.make_node("Cast", [name], [new.input[k]], to=TensorProto.FLOAT))
            for k, name in enumerate(node.output):
                new.output[k] = f"{name}.float32"
            new_nodes.append(new)
            new_nodes += [helper.make_node("Cast", [f"{name}.float32"], [name], to=TensorProto.DOUBLE) for name in node.output]
            continue
        for a in new.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT and node.op_type == "Cast":
                a.i = TensorProto.DOUBLE
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
        new_nodes.append(new)
    for name, value in feeds.items():
        if any(name in n.input for n in nodes if n.op_type != "DequantizeLinear"):
            value = value.astype(np.float64) if value.dtype == np.float32 else value
            new_feeds[name] = value
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
    graph = helper.make_graph(new_nodes, "exact", inputs,
                              [helper.make_tensor_value_info(q.input[0], TensorProto.DOUBLE, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=opsets)
    m.ir_version = 8
    return m, new_feeds


def _integer_conv(node, parts, constants, feeds: dict, inputs: list) -> list:
    """A Conv of two dequantized operands, for ONNX Runtime (no float64 Conv): the float32 Conv of their
    integers (exact below 2^24), cast to double, times scale_x · scale_w per output channel, plus the bias."""
    (x, sx), (w, sw) = parts[node.input[0]], parts[node.input[1]]
    if sx.size != 1 or (sw.size != 1 and sw.size != w.shape[0]):
        raise ValueError("Conv with a per-channel activation scale")
    name = node.output[0]
    pieces = _exact_pieces(x, np.abs(w).reshape(w.shape[0], -1).sum(1).max(initial=0))
    feeds[f"{name}.int_w"] = w.astype(np.float32)
    inputs.append(helper.make_tensor_value_info(f"{name}.int_w", TensorProto.FLOAT, w.shape))
    view = [1, -1] + [1] * (x.ndim - 2)
    feeds[f"{name}.scale"] = (sx.reshape(()) * sw.reshape(-1)).reshape(view)
    inputs.append(helper.make_tensor_value_info(f"{name}.scale", TensorProto.DOUBLE, feeds[f"{name}.scale"].shape))
    out, terms = [], []
    for j, (piece, weight) in enumerate(pieces):
        feeds[f"{name}.int_x{j}"] = piece.astype(np.float32)
        inputs.append(helper.make_tensor_value_info(f"{name}.int_x{j}", TensorProto.FLOAT, piece.shape))
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        del conv.input[:]
        conv.input.extend([f"{name}.int_x{j}", f"{name}.int_w"])
        del conv.output[:]
        conv.output.append(f"{name}.int{j}")
        conv.name = f"{node.name or name}.piece{j}"
        feeds[f"{name}.weight{j}"] = np.array(weight, np.float64)
        inputs.append(helper.make_tensor_value_info(f"{name}.weight{j}", TensorProto.DOUBLE, []))
        out += [conv, helper.make_node("Cast", [f"{name}.int{j}"], [f"{name}.double{j}"], to=TensorProto.DOUBLE),
                helper.make_node("Mul", [f"{name}.double{j}", f"{name}.weight{j}"], [f"{name}.term{j}"])]
        terms.append(f"{name}.term{j}")
    out += [helper.make_node("Sum", terms, [f"{name}.double"]),
            helper.make_node("Mul", [f"{name}.double", f"{name}.scale"], [name if len(node.input) < 3 else f"{name}.nobias"])]
    if len(node.input) > 2 and node.input[2]:
        bias = feeds.get(node.input[2], constants.get(node.input[2]))
        if bias is None:
            raise ValueError("Conv bias computed at run time")
        feeds[f"{name}.bias"] = np.asarray(bias, np.float64).reshape(view)
        inputs.append(helper.make_tensor_value_info(f"{name}.bias", TensorProto.DOUBLE, feeds[f"{name}.bias"].shape))
        out.append(helper.make_node("Add", [f"{name}.nobias", f"{name}.bias"], [name]))
    return out


def _exact_pieces(x: np.ndarray, row_sum: float) -> list[tuple[np.ndarray, float]]:
    """`x` (integers) as pieces p_j with x = sum of p_j * weight_j, each small enough that a float32 Conv of it with
    weights whose absolute row sums reach `row_sum` is exact (below 2^24): one piece for 8-bit activations, digits
    of a few bits each for 16-bit ones (their Conv sums pass 2^24)."""
    limit = 2 ** 24
    if np.abs(x).max(initial=0) * row_sum < limit:
        return [(x, 1.0)]
    bits = int(np.floor(np.log2((limit - 1) / max(row_sum, 1))))
    if bits < 1:
        raise ValueError("Conv of integers too large for an exact float32 sum")
    pieces, rest, weight = [], np.asarray(x, np.int64), 1.0
    while np.abs(rest).max(initial=0) * row_sum >= limit:
        digit = np.mod(rest, 2 ** bits)
        pieces.append((digit, weight))
        rest, weight = (rest - digit) // 2 ** bits, weight * 2 ** bits
    return [*pieces, (rest, weight)]


def _isolated_model(nodes, q, constants, opsets, feeds: dict, out_type: int, out_shape) -> onnx.ModelProto:
    names = {o for n in nodes for o in n.output}
    inits = {}
    for node in nodes:
        for name in node.input:
            if name in constants and name not in names:
                inits[name] = constants[name]
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    graph = helper.make_graph(list(nodes), "isolated", inputs,
                              [helper.make_tensor_value_info(q.output[0], out_type, out_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=opsets)
    m.ir_version = 8
    return m


def _quant_params(q, constants, shape):
    attr = {a.name: a for a in q.attribute}
    axis = attr["axis"].i if "axis" in attr else 1
    scale = np.asarray(constants[q.input[1]], np.float64)
    zp = np.asarray(constants[q.input[2]], np.float64) if len(q.input) > 2 and q.input[2] else np.zeros_like(scale)
    if scale.ndim == 1 and len(shape) > 0:
        view = [1] * len(shape)
        view[axis % len(shape)] = -1
        scale, zp = scale.reshape(view), zp.reshape(view)
    return scale, zp


def _tie_mask(exact: np.ndarray, zp: np.ndarray, a: np.ndarray, b: np.ndarray, info) -> np.ndarray:
    """Elements where `exact` is within float32 error of k + 0.5 and {a, b} are its two neighbours."""
    clipped = np.clip(exact, info.min, info.max)
    low = np.floor(clipped)
    sum_size = max(TIE_SUM_SIZE, (int(info.max) - int(info.min) + 1) / 2)
    near = np.abs(clipped - low - 0.5) <= TIE_RTOL * np.maximum(sum_size, np.abs(exact - zp))
    a, b = a.astype(np.int64), b.astype(np.int64)
    neighbours = (np.minimum(a, b) == low) & (np.maximum(a, b) == low + 1)
    return near & neighbours


def _reproduces(copy: np.ndarray, artifact: np.ndarray, reference: np.ndarray) -> bool:
    """The copy's output is the artifact's, or closer to it than half the artifact's distance to the reference."""
    if np.array_equal(copy, artifact, equal_nan=True):
        return True
    with np.errstate(invalid="ignore"):
        moved = np.nanmax(np.abs(copy.astype(np.float64) - artifact.astype(np.float64)))
        apart = np.nanmax(np.abs(artifact.astype(np.float64) - reference.astype(np.float64)))
    return bool(moved <= 0.5 * apart)


# ----------------------------------------------------------------------------- the search
def localize(onnx_path: Path, manifest: dict, inputs: dict, got: dict, failing: list[str], ort_opt: str,
             max_sites: int = MAX_SITES) -> list[Localization]:
    """Localize the failing outputs `failing` on `inputs` (where the artifact gave `got`, by output name)."""
    try:
        model = onnx.load(str(onnx_path))
    except Exception as e:  # noqa: BLE001
        return [Localization(kind="unlocalized", outputs=list(failing), reason=f"cannot read the model: {first_line(e)}")]
    with tempfile.TemporaryDirectory(prefix="nativeq-localize-") as tmp:
        try:
            return _localize(model, manifest, inputs, got, failing, ort_opt, max_sites, Path(tmp))
        except Exception as e:  # noqa: BLE001  (a failing compile or run must not hide the verify report)
            return [Localization(kind="unlocalized", outputs=list(failing), reason=first_line(e))]


def _localize(model, manifest, inputs, got, failing, ort_opt, max_sites, tmp: Path) -> list[Localization]:
    site_list, origins = _sites(model)
    if not site_list:
        return [Localization(kind="unlocalized", outputs=list(failing), reason="the model has no quantized activations "
                             "(QuantizeLinear, DynamicQuantizeLinear or QOperator outputs)")]
    by_name = {site.name: site for site in site_list}
    sites = list(by_name)
    infos = _value_infos(model)
    types = {name: v.type.tensor_type.elem_type for name, v in infos.items()}
    types.update((site.name, site.dtype) for site in site_list)
    theirs = _ort_run(_with_outputs(model, sites, infos, types), ort_opt, inputs, tmp, "with_sites")
    extended = _with_outputs(model, sites, infos, types, {s: np.ndim(theirs[s]) for s in sites})
    run_copy = _compile(extended, manifest, tmp, "with_sites", keep_dims=True)
    compiles, ort_runs = 1, 1
    ours = run_copy(inputs)
    moved = [n for n in failing if not _reproduces(ours[n], got[n], theirs[n])]
    bisected = False
    if moved:
        # The extra outputs changed what was compiled, or the artifact is not this file's: compile the model
        # as it is; if that reproduces the artifact, bisect over graph cuts.
        again = _compile(model, manifest, tmp, "again", keep_dims=True)(inputs)
        compiles += 1
        if not all(_reproduces(again[n], got[n], theirs[n]) for n in moved):
            return [Localization(kind="unlocalized", outputs=list(failing), compiles=compiles, ort_runs=ort_runs,
                                 reason=f"compiled again from this ONNX file, it computes {', '.join(moved)} "
                                        f"differently from the artifact (was the artifact compiled from this file, "
                                        f"by this nativeq?)")]
        failing = moved[:1]
        first, ours, n = _bisect_cuts(model, [s for s in sites if s in _ancestors(model, failing[0])], manifest,
                                      inputs, theirs, infos, types, tmp)
        compiles += n
        differs = {first} if first else set()
        bisected = True
    else:
        differs = {s for s in sites if not np.array_equal(ours[s], theirs[s])}
    by_site: dict[str, list[str]] = {}
    unlocalized = []
    for name in failing:
        ancestors = _ancestors(model, name)
        first = next((s for s in sites if s in differs and s in ancestors), None)
        if first is None:
            unlocalized.append(name)
        else:
            by_site.setdefault(first, []).append(name)
    results = []
    if unlocalized:
        results.append(Localization(kind="unlocalized", outputs=unlocalized, compiles=compiles, ort_runs=ort_runs,
                                    reason="every quantized tensor they depend on agrees: the difference arises in "
                                           "float arithmetic after the last QuantizeLinear"))
    for i, (site, outs) in enumerate(by_site.items()):
        if i >= max_sites:
            results.append(Localization(kind="unlocalized", site=site, outputs=outs,
                                        reason=f"not checked: at most {max_sites} sites are checked"))
            continue
        loc = _check_site(by_name[site], model, origins, inputs, ours, theirs, ort_opt, manifest, tmp, i)
        loc.outputs = outs
        if bisected:
            loc.reason = ((loc.reason + "; ") if loc.reason else "") + (
                "found by bisection over graph cuts (with every quantized tensor as an output the compiled model "
                "differed from the artifact): the first site that differs, if a difference once present persists")
        loc.compiles += compiles if i == 0 else 0
        loc.ort_runs += ort_runs if i == 0 else 0
        results.append(loc)
    return sorted(results, key=lambda r: r.kind == "unlocalized")


def _cut(model: onnx.ModelProto, site: str, infos: dict, types: dict, rank: int) -> tuple[onnx.ModelProto, set]:
    """The part of `model` that computes `site`, with `site` its only output; and the graph inputs it keeps."""
    keep = _ancestors(model, site)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[:]
    cut.graph.node.extend(n for n in model.graph.node if any(o in keep for o in n.output))
    del cut.graph.input[:]
    cut.graph.input.extend(i for i in model.graph.input if i.name in keep)
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(i for i in model.graph.initializer if i.name in keep)
    del cut.graph.output[:]
    cut = _with_outputs(cut, [site], infos, types, {site: rank})
    return cut, {i.name for i in cut.graph.input}


def _bisect_cuts(model, candidates: list[str], manifest, inputs, theirs, infos, types, tmp: Path):
    """The first of `candidates` (in graph order) whose compiled cut differs from ONNX Runtime, by bisection
    (at most `MAX_CUT_COMPILES` compiles); returns (site or None, {site: its nativeq value}, compiles)."""
    values: dict[str, np.ndarray] = {}

    def differs(k: int) -> bool:
        site = candidates[k]
        cut, names = _cut(model, site, infos, types, np.ndim(theirs[site]))
        values[site] = _compile(cut, manifest, tmp, f"cut{len(values)}", keep_dims=True)(
            {n: v for n, v in inputs.items() if n in names})[site]
        return not np.array_equal(values[site], theirs[site])

    if not candidates or not differs(len(candidates) - 1):
        return None, values, len(values)
    low, high = -1, len(candidates) - 1  # candidates[high] differs; none at or before `low` is known to
    while high - low > 1 and len(values) < MAX_CUT_COMPILES:
        middle = (low + high) // 2
        if differs(middle):
            high = middle
        else:
            low = middle
    return candidates[high], values, len(values)


def _check_site(site: _Site, user_model, origins: dict, inputs, ours, theirs, ort_opt, manifest, tmp: Path, i: int) -> Localization:
    model, q, constants = site.model, site.quantize, site.constants
    producer = {o: n for n in model.graph.node for o in n.output}.get(q.input[0])
    loc = Localization(kind="error", site=site.name)
    if producer is not None:  # named as in the user's model (a QOperator op, not the float op of its QDQ form)
        loc.op, loc.node = origins.get(producer.name, (producer.op_type, producer.name))
    if origins.get(q.name, (q.op_type, q.name))[1] == q.name:  # the user's model has this QuantizeLinear
        loc.quantize_node, loc.quantize_op = q.name, q.op_type
    a, b = np.asarray(ours[site.name]), np.asarray(theirs[site.name])
    info = np.iinfo(b.dtype)
    loc.differing = int((a != b).sum())

    try:
        if q.op_type == "DynamicQuantizeLinear":
            nodes, feeds, exact, zp = _dynamic_value_before_rounding(model, q, inputs, ort_opt, tmp, i, loc)
        else:
            nodes, feeds, exact, zp = _value_before_rounding(model, q, constants, inputs, theirs, ort_opt, tmp, i,
                                                             loc, b.shape)
    except Exception as e:  # noqa: BLE001  (an op ONNX Runtime has no float64 kernel for)
        first = tuple(int(v) for v in np.argwhere(a != b)[0])
        loc.index, loc.nativeq, loc.onnxruntime = list(first), int(a[first]), int(b[first])
        loc.kind = "unlocalized"
        loc.reason = f"cannot evaluate the value before rounding in float64: {first_line(e)}"
        return loc

    full_ties = _tie_mask(exact, zp, a, b, info)
    loc.ties = int(full_ties[a != b].sum())
    # The element shown: the first that is not a tie, else the first.
    shown = np.argwhere((a != b) & ~full_ties)
    shown = shown if len(shown) else np.argwhere(a != b)
    first = tuple(int(v) for v in shown[0])
    loc.index, loc.nativeq, loc.onnxruntime = list(first), int(a[first]), int(b[first])
    loc.exact = float(exact[first])
    loc.rounded = int(np.rint(np.clip(exact[first], info.min, info.max)))

    opsets = model.opset_import
    if site.op is not None:  # ONNX Runtime runs the user's QOperator node, as in the whole model
        nodes, constants, opsets = [site.op], {**constants, **_constants(user_model.graph)}, user_model.opset_import
    isolated = _isolated_model(nodes, q, constants, list(opsets), feeds,
                               helper.np_dtype_to_tensor_dtype(b.dtype), b.shape)
    iso_ort = _ort_run(isolated, ort_opt, feeds, tmp, f"isolated{i}")[site.name]
    loc.ort_runs += 1
    iso_ours = _compile(isolated, manifest, tmp, f"isolated{i}", keep_dims=False)(feeds)[site.name]
    loc.compiles += 1
    iso_diff = iso_ours != iso_ort
    loc.isolated_differing = int(iso_diff.sum())
    loc.isolated_agrees = bool(_tie_mask(exact, zp, iso_ours, iso_ort, info)[iso_diff].all())
    if not np.array_equal(iso_ort, b):
        note = "ONNX Runtime computes the site differently in isolation than in the whole model"
        loc.reason = f"{loc.reason}; {note}" if loc.reason else note
    loc.kind = "tie" if loc.isolated_agrees and loc.ties == loc.differing else "error"
    return loc


def _value_before_rounding(model, q, constants, inputs, theirs, ort_opt, tmp: Path, i: int, loc: Localization, shape):
    """The subgraph from the DequantizeLinear frontier to QuantizeLinear `q`, its input values (ONNX Runtime's),
    x / scale + zero_point of `q` evaluated in float64, and the zero point."""
    nodes, frontier = _subgraph(model, q, constants)
    feeds = {}
    missing = [t for t in frontier if t not in theirs and t not in inputs]
    if missing:
        infos = _value_infos(model)
        types = {name: v.type.tensor_type.elem_type for name, v in infos.items()}
        extra = _ort_run(_with_outputs(model, missing, infos, types), ort_opt, inputs, tmp, f"frontier{i}")
        loc.ort_runs += 1
    for t in frontier:
        feeds[t] = np.asarray(inputs[t] if t in inputs else theirs[t] if t in theirs else extra[t])

    scale, zp = _quant_params(q, constants, shape)
    float32_ops: set[str] = set()
    for _ in range(4):
        exact_model, exact_feeds = _float64_model(nodes, q, constants, list(model.opset_import), feeds, float32_ops)
        try:
            pre = _ort_run(exact_model, "disable", exact_feeds, tmp, f"exact{i}")[q.input[0]]
            break
        except Exception as e:  # noqa: BLE001
            missing_kernel = re.search(r"implementation for (\w+)\(", str(e))
            if not missing_kernel or missing_kernel.group(1) in float32_ops:
                raise
            float32_ops.add(missing_kernel.group(1))
    loc.ort_runs += 1
    if float32_ops:
        loc.reason = f"value before rounding computed with {', '.join(sorted(float32_ops))} in float32"
    return nodes, feeds, np.asarray(pre, np.float64) / scale + zp, zp


def _dynamic_value_before_rounding(model, q, inputs, ort_opt, tmp: Path, i: int, loc: Localization):
    """DynamicQuantizeLinear `q` alone, its input (ONNX Runtime's), x / scale + zero_point in float64 with ONNX
    Runtime's run-time scale and zero point, and the zero point."""
    x, scale, zp = q.input[0], q.output[1], q.output[2]
    infos = _value_infos(model)
    types = {name: v.type.tensor_type.elem_type for name, v in infos.items()}
    types.update({x: TensorProto.FLOAT, scale: TensorProto.FLOAT, zp: TensorProto.UINT8})
    got = _ort_run(_with_outputs(model, [x, scale, zp], infos, types), ort_opt, inputs, tmp, f"dynamic{i}")
    loc.ort_runs += 1
    feeds = {x: np.asarray(inputs[x] if x in inputs else got[x], np.float32)}
    zero_point = float(np.asarray(got[zp]))
    return [q], feeds, feeds[x].astype(np.float64) / float(np.asarray(got[scale])) + zero_point, zero_point
