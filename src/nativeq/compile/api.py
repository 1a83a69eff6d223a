"""`compile_model`: a (QDQ) ONNX file -> an artifact directory (library + manifest.json).

Steps, each failing with one line naming the problem: read and check the ONNX file and its
quantization parameters (`validate.py`), rewrite
what TVM's importer cannot take and import to Relax (`onnx_import`), run the target's pass
list (`pipeline.py`), build, export the library (cross-compiled for ARM targets; without debug
sections unless `debug`), account its sizes (`sizes.py`), write the manifest. Everything is
written into a temporary directory renamed into place at the end.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from nativeq._data import missing_model_message, onnx_model_path
from nativeq._fs import atomic_directory, sha256_file
from nativeq._log import Stages, held_native_output
from nativeq._text import aligned_table, first_line
from nativeq.compile.input_shapes import fix_input_shapes, fix_input_values
from nativeq.compile.memory_bound import memory_bound
from nativeq.compile.validate import validate_model
from nativeq.errors import NativeqError
from nativeq.targets import Target, get_target

LIBRARY_NAME = "model.so"
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


@dataclass(frozen=True)
class CompileConfig:
    """How to compile: the target name (see `nativeq targets`) and build options.

    int8: run nativeq's int8 lowering and kernels (False: TVM's own float QDQ path).
    tuning_log: a MetaSchedule JSON database directory; default `tuning_logs/<target>/`
        (relative to the working directory) when it exists; for `host`, also the database of
        the builtin target it was detected as.
    use_tuning: False ignores any tuning database.
    explain: report which matmul/conv sites became int8 and which stayed float, and why, and list
        every fused kernel with its schedule and share of the arithmetic (`kernels.py`).
    dims: symbolic input sizes to fix, by ONNX dim name (e.g. {"B": 1}): the artifact is specialized
        to them (`input_shapes.py`). The kernel report counts MACs at them; other symbolic sizes
        count as 64 (batch-like names as 1).
    input_shapes: input name -> shape, an int fixing that axis, a name renaming its symbolic dim
        (e.g. {"feats": (1, "T", 80)}).
    input_values: input name -> its values, fixed at compile time (e.g. {"sr": (16000,)}: a sample rate or mode
        flag): nodes read the constant, so If nodes on it are decided; the artifact refuses other values.
    debug: keep the DWARF debug sections TVM's code generator emits in the library (default: none).
    dense_weights: store every int8 matmul weight dense and 8-bit, multiplying zeros (default: 4-bit
        packed and block-sparse where the values allow, `schedules/weight_formats.py`).
    """

    target: str
    int8: bool = True
    tuning_log: str | None = None
    use_tuning: bool = True
    explain: bool = False
    dims: dict[str, int] = field(default_factory=dict)
    input_shapes: dict[str, tuple] = field(default_factory=dict)
    input_values: dict[str, tuple] = field(default_factory=dict)
    debug: bool = False
    dense_weights: bool = False


@dataclass(frozen=True)
class CompileResult:
    out_dir: Path
    manifest: dict
    explain: list = field(default_factory=list)  # with cfg.explain: one dict per matmul/conv site
    explained: bool = False  # compiled with cfg.explain: the summary shows the kernel table

    @property
    def kernels(self) -> list[dict]:
        """One record per fused kernel (`kernels.py`): name, kind, schedule, macs, share, calls."""
        return list(self.manifest.get("kernels") or [])

    def to_json(self) -> str:
        """The result as JSON: the artifact directory, its manifest (with `kernels` and `sizes`) and the int8 site report."""
        import json

        return json.dumps({"artifact": str(self.out_dir), "manifest": self.manifest, "int8_sites": self.explain},
                          indent=2, default=str)

    def explain_table(self) -> str:
        if not self.explain:
            return "int8 report: not available (no int8 lowering ran)"
        rows = [(str(s.get("site", s.get("node", "?"))), str(s.get("op", "?")), str(s.get("status", "?")),
                 str(s.get("reason", ""))) for s in self.explain]
        return aligned_table(("site", "op", "status", "reason"), rows)

    def summary(self) -> str:
        from nativeq.compile.sizes import sizes_line

        m = self.manifest
        target = m["target"]
        size = sum((self.out_dir / name).stat().st_size for name in m["files"])
        lines = [
            f"compiled {m['source']['file']} for {target['name']} ({target['arch']}, int8 {target['int8']}) "
            f"in {m['compile_seconds']:.1f} s ("
            + ", ".join(f"{stage} {value:.1f} s" for stage, value in m["build"].get("seconds", {}).items()) + ")",
            f"  artifact: {self.out_dir} ({', '.join(m['files'])}, {size / 1024:.0f} KiB)",
            *([f"  sizes: {sizes_line(m['sizes'])}"] if m.get("sizes") else []),
            "  inputs:  " + "; ".join(_spec_text(s) for s in m["inputs"]),
            "  outputs: " + "; ".join(_spec_text(s) for s in m["outputs"]),
        ]
        report = m.get("int8_report")
        if not m["build"]["int8"]:
            lines.append("  int8 lowering: off (--no-int8)")
        elif report:
            lines.append(f"  int8 sites: {report.get('int8', 0)} int8, {report.get('float', 0)} float")
        tuned = len(m["tuning"].get("applied") or {})
        lines.append(f"  tuning database: {m['tuning']['database'] or 'none'}"
                     + (f" ({tuned} kernels tuned)" if m["tuning"]["database"] else ""))
        if self.explain:
            lines.append(self.explain_table())
        if "kernels" in m:
            from nativeq.compile.kernels import report_lines

            lines.extend(report_lines(self.kernels, self.explained, m.get("kernel_dims")))
        return "\n".join(lines)


def _spec_text(spec: dict) -> str:
    shape = "?" if spec.get("shape") is None else ", ".join(str(d) for d in spec["shape"])
    text = f"{spec['name']}: {spec['dtype']}[{shape}]"
    if spec.get("value") is not None:
        text += " = " + ", ".join(str(v) for v in spec["value"]) + " (fixed)"
    if spec.get("quant"):
        text += f" (from {spec['quant']['dtype']} DequantizeLinear)"
    return text


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read `path` as ONNX and run the full `onnx.checker` on it."""
    path = Path(path)
    if not path.exists():
        raise NativeqError(missing_model_message(path))
    if not path.is_file():
        raise NativeqError(f"model file {path} is not a file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001  (protobuf raises several types on garbage)
        raise NativeqError(f"{path} is not an ONNX model (cannot parse it: {first_line(e)})") from None
    if not model.HasField("graph") or not model.opset_import or model.ir_version <= 0:
        raise NativeqError(f"{path} is not an ONNX model (no graph, opset or IR version)")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001  (ValidationError, InferenceError, ...)
        if "topologically sorted" not in str(e):
            raise NativeqError(f"{path} fails onnx.checker: {first_line(e)}{checker_hint(model, e)}") from None
        # ONNX Runtime sorts a graph's nodes itself (its quantizer can write them out of order around If nodes).
        model = topologically_sorted(model)
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e2:  # noqa: BLE001
            raise NativeqError(f"{path} fails onnx.checker: {first_line(e2)}{checker_hint(model, e2)}") from None
    return model


def checker_hint(model: onnx.ModelProto, err: Exception) -> str:
    """What to do about a checker failure users meet, as a sentence to append ('' when there is none)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if "Unrecognized attribute: axis for operator" in str(err) and opset < 13:
        return (f" (per-channel QuantizeLinear/DequantizeLinear need opset >= 13, the model has {opset}; "
                "ONNX Runtime refuses it too: convert the float model with "
                "onnx.version_converter.convert_version(model, 13) before quantizing it)")
    return ""


def topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose nodes (and those of its subgraphs) come after the nodes producing what they read,
    in their original order otherwise. A subgraph's reads from the scope around it count as its node's reads."""
    import heapq

    def reads(node) -> set[str]:
        names = {i for i in node.input if i}
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                sort_graph(g)
                defined = {i.name for i in g.input} | {t.name for t in g.initializer}
                for inner in g.node:
                    names |= reads(inner) - defined
                    defined.update(inner.output)
                names |= {o.name for o in g.output} - defined
        return names

    def sort_graph(graph) -> None:
        nodes = list(graph.node)
        producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
        waits_on = [{producer[r] for r in reads(node) if r in producer} - {i} for i, node in enumerate(nodes)]
        readers: dict[int, list[int]] = {}
        for i, deps in enumerate(waits_on):
            for d in deps:
                readers.setdefault(d, []).append(i)
        ready = [i for i, deps in enumerate(waits_on) if not deps]
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for r in readers.get(i, ()):
                waits_on[r].discard(i)
                if not waits_on[r]:
                    heapq.heappush(ready, r)
        if len(order) != len(nodes):
            raise NativeqError("the graph has a cycle: its nodes cannot be ordered")
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    sort_graph(out.graph)
    return out


def import_model(model: onnx.ModelProto, path: Path):
    """ONNX -> Relax IRModule with weights as constants (so the int8 passes see them)."""
    return import_model_with_checks(model, path)[0]


def import_model_with_checks(model: onnx.ModelProto, path: Path):
    """ONNX -> (Relax IRModule, the `onnx_import.ShapeCheck`s the artifact must check at run time).

    `onnx_import.import_onnx` first rewrites what TVM's importer lacks (QLinear*, *Integer,
    INT4 initializers) and refuses, naming op and node, what remains unsupported.
    """
    from nativeq.compile.onnx_import import import_onnx_with_checks

    # The importer prints the failing operator on stdout and, from C++, a warning when a half-built
    # block builder is dropped: both are held, and dropped after a failed import (the error says it).
    with held_native_output() as held:
        try:
            return import_onnx_with_checks(model)
        except NativeqError as e:
            error = NativeqError(str(e))
        except Exception as e:  # noqa: BLE001  (the importer raises anything from KeyError to TVMError)
            error = NativeqError(f"TVM's ONNX importer failed on {path}: {first_line(e)}")
        held.failed = True  # the failed import's state (and its C++ warning) goes away here, inside the capture
    raise error


def tuning_database(cfg: CompileConfig, target: Target) -> Path | None:
    """The MetaSchedule database directory to apply, or None: `cfg.tuning_log`, else
    `./tuning_logs/<target>/` when present, else the one shipped with nativeq."""
    if not cfg.use_tuning:
        return None
    if cfg.tuning_log is None:
        from nativeq._data import tuning_log_roots

        # `host` was detected as a builtin entry ("detected:x86-avx512-vnni"): its database serves too.
        names = [target.name]
        if target.source.startswith("detected:"):
            names.append(target.source.partition(":")[2])
        # The user's own ./tuning_logs/<target>/ first, then the database shipped with nativeq.
        for root, _ in tuning_log_roots():
            for name in names:
                default = root / name
                if all((default / f).is_file() for f in DATABASE_FILES):
                    return default
        return None
    path = Path(cfg.tuning_log)
    if not path.is_dir():
        raise NativeqError(f"tuning database {path} does not exist (expected a directory with {' and '.join(DATABASE_FILES)})")
    missing = [f for f in DATABASE_FILES if not (path / f).is_file()]
    if missing:
        raise NativeqError(f"tuning database {path} lacks {', '.join(missing)}")
    return path


def check_cross_compiler(target: Target) -> str | None:
    """The cross compiler command for `target`, or None when building for this machine.

    Building for this machine needs a host C/C++ compiler to link the library (TVM looks for
    $CXX, $CC, g++, gcc, clang++, clang, c++, cc on PATH).
    """
    if not target.is_cross:
        if not (os.environ.get("CXX") or os.environ.get("CC")) and not any(
            shutil.which(name) for name in ("g++", "gcc", "clang++", "clang", "c++", "cc")
        ):
            raise NativeqError("no C/C++ compiler found to link the library; install one with: apt-get install g++")
        return None
    if not target.cross_compiler:
        raise NativeqError(f"target {target.name} is for {target.arch} but names no cross_compiler")
    if shutil.which(target.cross_compiler) is None:
        package = target.cross_package or target.cross_compiler
        raise NativeqError(f"{target.cross_compiler} not found; install it with: apt-get install {package}")
    return target.cross_compiler


def make_tvm_target(target: Target):
    """The TVM target of `target`; a dict TVM refuses is a one-line error naming the target."""
    from nativeq.compile._tvm import TVMTarget

    try:
        return TVMTarget(target.tvm_dict())
    except Exception as e:  # noqa: BLE001  (ValueError / TVMError from the target parser)
        raise NativeqError(f"target {target.name}: TVM refuses its target {target.tvm_dict()}: {first_line(e)}") from None


def explain_int8(mod, target: Target) -> list[dict] | None:
    """Per-site int8/float report of the int8 lowering, if the pass package provides one."""
    from nativeq.compile.passes import int8 as int8_passes_module

    explain_sites = getattr(int8_passes_module, "explain_sites", None)
    if explain_sites is None:
        return None
    return list(explain_sites(mod, target))


def _int8_counts(sites: list[dict] | None) -> dict | None:
    if sites is None:
        return None
    counts: dict[str, int] = {}
    for site in sites:
        status = str(site.get("status", "?"))
        counts[status] = counts.get(status, 0) + 1
    return {"int8": counts.pop("int8", 0), "float": counts.pop("float", 0), **counts}


def compile_model(model_path, out_dir, cfg: CompileConfig, force: bool = False, progress: bool = True) -> CompileResult:
    """Compile the ONNX file `model_path` for `cfg.target` into the artifact directory `out_dir`.

    progress: name each stage on stderr as it starts and ends (only on a terminal, see `nativeq._log`)."""
    started = time.perf_counter()
    model_path, out_dir = onnx_model_path(model_path), Path(out_dir)
    target = get_target(cfg.target)
    if out_dir.exists() and not force:
        raise NativeqError(f"output {out_dir} already exists (use --force to replace it)")
    cross_compiler = check_cross_compiler(target)
    database = tuning_database(cfg, target)
    model = load_onnx(model_path)
    validate_model(model)
    model = fix_input_values(fix_input_shapes(model, cfg.dims, cfg.input_shapes), cfg.input_values)
    stages = Stages("compile", enabled=progress)
    with stages.stage(f"import {model_path.name}"):
        mod, shape_checks = import_model_with_checks(model, model_path)
        from nativeq.compile.onnx_import import with_computed_output_dims

        model = with_computed_output_dims(model, mod)  # the manifest describes the outputs the library returns
    seconds = {"import": time.perf_counter() - started}
    if shape_checks:
        first = shape_checks[0]
        warnings.warn(f"{len(shape_checks)} shape condition(s) of the graph hold only for some input sizes (first: "
                      f"{first.op} node {first.node!r} needs {first.lhs} == {first.rhs}); the artifact refuses "
                      f"inputs that break them, as ONNX Runtime does", stacklevel=2)

    from nativeq.compile._tvm import cc, relax, tvm
    from nativeq.compile.pipeline import compile_passes, tir_pipeline
    from nativeq.compile.sizes import LINK_STRIP_OPTIONS, capture_instrument, strip_debug

    with stages.stage(f"{'int8 lowering + build' if cfg.int8 else 'build'} for {target.name}"):
        tvm_target = make_tvm_target(target)
        sites = explain_int8(mod, target) if cfg.int8 else None
        passes = compile_passes(target, int8=cfg.int8, tuning_database=database,
                                compressed_weights=not cfg.dense_weights)
        build_passes, captures = _with_captures(passes)
        sized = capture_instrument()
        from nativeq.compile.provenance import NodeProvenance

        provenance = NodeProvenance(stop_after=_SCHEDULE_PASS)
        with held_native_output(), tvm.transform.PassContext(opt_level=3, instruments=[sized, provenance]):
            executable = relax.build(
                mod, tvm_target, relax_pipeline=tvm.transform.Sequential(build_passes, name="nativeq_compile"),
                tir_pipeline=tir_pipeline(),
            )
    seconds["build"] = time.perf_counter() - started - seconds["import"]
    applied = next((dict(p.applied) for p in passes if p.info.name == "nativeq.ApplyTuningDatabase"), {})
    kernels, kernel_dims = _kernel_report(passes, captures, applied, cfg.dims)
    _add_onnx_nodes(kernels, provenance)
    weights, arena_result = _size_report(sized, kernels, kernel_dims)
    if cfg.tuning_log is not None and database is not None and not applied:
        # NOTE: records are keyed on the exact kernel IR: a change to the int8 passes or kernel
        # layouts makes older records miss (a rerun of `nativeq tune` refreshes them).
        warnings.warn(f"tuning database {database} matches no kernel of {model_path.name} (tuned for other shapes "
                      f"or lengths, or by an older nativeq); using the default schedules", stacklevel=2)

    from nativeq.compile.artifact import build_manifest, write_manifest
    from nativeq.compile.sizes import sizes_field

    with atomic_directory(out_dir, force=force) as tmp:
        fcompile = cc.cross_compiler(cross_compiler) if cross_compiler else None
        with stages.stage(f"export {LIBRARY_NAME}"):
            # TVM's LLVM code generator always emits DWARF: the link drops it (the strip tools if a linker kept it)
            library = tmp / LIBRARY_NAME
            executable.export_library(str(library), fcompile=fcompile,
                                      **({} if cfg.debug else {"options": list(LINK_STRIP_OPTIONS)}))
            if not cfg.debug:
                strip_debug(library, cross_compiler)
        seconds["export"] = time.perf_counter() - started - seconds["import"] - seconds["build"]
        manifest = build_manifest(
            out_dir=tmp,
            library=LIBRARY_NAME,
            target=target,
            model_path=model_path,
            model=model,
            build={
                "int8": cfg.int8,
                "pipeline": [p.info.name for p in passes],
                "opt_level": 3,
                "exec_mode": "bytecode",
                "compiler": cross_compiler or "host",
                "dims": dict(cfg.dims),
                "input_shapes": {name: list(shape) for name, shape in cfg.input_shapes.items()},
                "input_values": {name: [float(v) for v in values] for name, values in cfg.input_values.items()},
                "debug": cfg.debug,
                "seconds": {stage: round(value, 3) for stage, value in seconds.items()},
            },
            tuning={
                "database": str(database) if database else None,
                "files": {} if database is None else {f: sha256_file(database / f) for f in DATABASE_FILES},
                # kernel -> the knobs (nativeq's int8 schedule) or "trace" (MetaSchedule's) applied
                "applied": applied,
            },
            int8_report=_int8_counts(sites),
            compile_seconds=time.perf_counter() - started,
            kernels=kernels,
            kernel_dims=kernel_dims,
        )
        manifest["shape_checks"] = [check.to_json() for check in shape_checks]
        manifest["memory"] = memory_bound(mod, [spec["shape"] for spec in manifest["inputs"]])
        manifest["sizes"] = sizes_field(library, weights, arena_result)
        write_manifest(tmp, manifest)
    return CompileResult(out_dir=out_dir, manifest=manifest, explain=(sites or []) if cfg.explain else [],
                         explained=cfg.explain)


_SCHEDULE_PASS = "nativeq.DefaultCpuSchedule"


def _with_captures(passes: list) -> tuple[list, tuple | None]:
    """`passes` with a `kernels.CaptureModule` after FuseTIR and one after the default schedules, and the
    two captures; (passes, None) when the pipeline has neither point (no kernel report then)."""
    from nativeq.compile.kernels import CaptureModule

    names = [p.info.name for p in passes]
    if "FuseTIR" not in names or _SCHEDULE_PASS not in names:
        return passes, None
    lowered, built = CaptureModule(), CaptureModule()
    fused, scheduled = names.index("FuseTIR") + 1, names.index(_SCHEDULE_PASS) + 1
    return [*passes[:fused], lowered, *passes[fused:scheduled], built, *passes[scheduled:]], (lowered, built)


def _size_report(sized, kernels: list[dict] | None, kernel_dims: dict) -> tuple[int | None, tuple | None]:
    """(weight bytes, (arena bytes, expression, dims)) of the module just built; each kernel record gets its
    `weight_bytes`. A part that cannot be read is None, with a warning (a report, not the build)."""
    from nativeq.compile.sizes import arena, weight_bytes

    weights = arena_result = None
    try:
        if sized.final is not None:
            weights, per_kernel = weight_bytes(sized.final)
            for record in kernels or []:
                record["weight_bytes"] = per_kernel.get(record["name"], 0)
    except Exception as e:  # noqa: BLE001  (IR it cannot read costs the size report only)
        warnings.warn(f"weight bytes unavailable: {first_line(e)}", stacklevel=3)
    try:
        if sized.planned is not None:
            arena_result = arena(sized.planned, kernel_dims)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"activation arena unavailable: {first_line(e)}", stacklevel=3)
    return weights, arena_result


def _add_onnx_nodes(kernels: list[dict] | None, provenance) -> None:
    """Each kernel record gets `onnx_nodes`: the ONNX nodes its calls compute (`provenance.py`), in graph order.
    Followed wrongly, they cost the report only, with a warning."""
    try:
        nodes = provenance.kernel_nodes()
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"ONNX nodes of the kernels unavailable: {first_line(e)}", stacklevel=3)
        return
    for record in kernels or []:
        record["onnx_nodes"] = nodes.get(record["name"], [])


def _kernel_report(passes: list, captures, tuned: dict, dims: dict[str, int]) -> tuple[list[dict] | None, dict]:
    """(the kernel records, the symbolic sizes their MACs are counted at) of the module just built."""
    if captures is None or captures[0].functions is None:
        return None, {}
    from nativeq.compile.kernels import DEFAULT_SIZE, LARGER_SIZES, kernel_table, report_dims, size_names

    lowered, built = captures[0].functions, captures[1].functions
    rules = next((dict(p.applied) for p in passes if p.info.name == _SCHEDULE_PASS), {})
    try:
        for default in (DEFAULT_SIZE, *LARGER_SIZES):
            at = dict(sorted({**report_dims(size_names(lowered), dims, default), **dims}.items()))  # --dim included
            table = kernel_table(lowered, built, tuned, rules, at)
            if all(r["macs"] > 0 for r in table if r["kind"] == "contraction"):
                break
        return table, at
    except Exception as e:  # noqa: BLE001  (a report, not the build: IR it cannot read costs the report only)
        warnings.warn(f"kernel report unavailable: {first_line(e)}", stacklevel=3)
        return None, {}
