"""`verify_artifact`: run an artifact and ONNX Runtime on the same inputs and compare.

Artifacts for this machine's architecture run natively through `nativeq.load`; artifacts for
another architecture (aarch64 on an x86 host) run emulated through
`nativeq.runtime.emulate.run_emulated` (qemu-user). The reference is ONNX Runtime's CPU
provider with graph optimizations disabled by default: its optimized graph swaps in its own
integer kernels, which round differently (`ort_opt="all"` shows that comparison). A model ORT
loads only with optimizations off gets a warning (and a report note): its default session fails.
"""

from __future__ import annotations

import dataclasses

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from nativeq._data import missing_model_message, onnx_model_path
from nativeq._fs import sha256_file
from nativeq._text import first_line
from nativeq.errors import NativeqError
from nativeq.runtime import check_files, check_inputs, check_versions, machine_arch, read_manifest
from nativeq.runtime.manifest import input_specs, output_specs
from nativeq.verify.inputs import DEFAULT_DIM, check_dims, random_inputs
from nativeq.verify.report import DEFAULT_RTOL, OutputComparison, VerifyReport, accumulate

ORT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class VerifyConfig:
    """runs: random input sets (seeds seed, seed+1, ...); ignored when `inputs` (an .npz) is given.
    tol_steps: tolerance for quantized outputs, in quantization steps.
    rtol: tolerance for plain float outputs, relative to max |reference| (default 1e-3).
    dims: sizes of symbolic dims (default 64 each). ort_opt: ORT graph optimization level.
    localize: on failure, find the first quantized tensor where the engines differ (`localize.py`;
        compiles the model again). accept_ties: pass when every failing output localizes to a
        rounding tie that the site reproduces in isolation.
    """

    runs: int = 1
    seed: int = 0
    tol_steps: float = 1.0
    rtol: float | None = None
    dims: dict = field(default_factory=dict)
    ort_opt: str = "disable"
    inputs: str | None = None
    localize: bool = True
    accept_ties: bool = False


def _read_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise NativeqError(missing_model_message(path))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise NativeqError(f"{path} is not an ONNX model (cannot parse it: {first_line(e)})") from None
    if not model.HasField("graph"):
        raise NativeqError(f"{path} is not an ONNX model (no graph)")
    return model


def ort_session(path: Path, level: str):
    import onnxruntime as ort

    if level not in ORT_LEVELS:
        raise NativeqError(f"unknown ORT optimization level {level!r}; choose one of {', '.join(ORT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise NativeqError(f"ONNX Runtime cannot load {path}: {first_line(e)}") from None


def optimized_load_problem(path: Path, compared_at: str = "disable") -> str | None:
    """Why ONNX Runtime cannot load `path` at ORT_ENABLE_ALL (its default level), or None if it can."""
    try:
        ort_session(path, "all")
    except NativeqError as e:
        return (f"{e} (at ORT_ENABLE_ALL, its default level; compared at level {compared_at!r}, where it loads; "
                f"a nativeq QDQ export loads at every level: re-export it with `nativeq export`)")
    return None


def _load_inputs(path: Path, specs) -> dict[str, np.ndarray]:
    """Inputs by name from an .npz, or the one input of a one-input model from an .npy."""
    if not path.is_file():
        raise NativeqError(f"inputs file {path} does not exist")
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                names = ", ".join(s.name for s in specs)
                raise NativeqError(f"inputs file {path}: an .npy holds one array but the model has inputs {names}; use an .npz")
            inputs = {specs[0].name: np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as data:
                inputs = {k: data[k] for k in data.files}
    except NativeqError:
        raise
    except Exception as e:  # noqa: BLE001
        raise NativeqError(f"inputs file {path} is not a readable .npz/.npy: {first_line(e)}") from None
    check_inputs(specs, inputs)
    return inputs


def _artifact_runner(artifact: Path, manifest: dict):
    """A function inputs -> list of outputs (ONNX order), native or emulated, and its label."""
    if manifest["target"].get("arch") == machine_arch():
        from nativeq.runtime import load

        model = load(artifact)
        names = [s.name for s in model.outputs]
        return (lambda inputs: [model.run(inputs)[n] for n in names]), "native"
    try:
        from nativeq.runtime.emulate import run_emulated
    except ImportError:
        raise NativeqError(
            f"artifact {artifact} is for {manifest['target'].get('arch')}; running it here needs "
            f"nativeq.runtime.emulate (qemu-user), which this installation lacks"
        ) from None
    cpu = manifest["target"].get("qemu_cpu") or "max"
    return (lambda inputs: list(run_emulated(artifact, inputs))), f"emulated, qemu -cpu {cpu}"


def verify_artifact(artifact, onnx_path, cfg: VerifyConfig = VerifyConfig()) -> VerifyReport:
    """Compare the artifact directory `artifact` with ONNX Runtime running `onnx_path`."""
    artifact, onnx_path = Path(artifact), onnx_model_path(onnx_path)
    manifest = read_manifest(artifact)
    model = _read_onnx(onnx_path)
    in_specs, out_specs = input_specs(manifest), output_specs(manifest)
    cfg = dataclasses.replace(cfg, dims=check_dims(in_specs, cfg.dims, manifest.get("build", {}).get("dims")))
    if cfg.runs < 1:
        raise NativeqError(f"--runs must be at least 1, got {cfg.runs}")
    rtol = DEFAULT_RTOL if cfg.rtol is None else cfg.rtol

    notes = []
    if sha256_file(onnx_path) != manifest.get("source", {}).get("sha256"):
        notes.append(
            f"{onnx_path.name} is not byte-identical to the model the artifact was compiled from "
            f"({manifest.get('source', {}).get('file')})"
        )
    check_versions(artifact, manifest)
    check_files(artifact, manifest)
    if cfg.inputs:
        input_sets = [_load_inputs(Path(cfg.inputs), in_specs)]
        inputs_from = str(cfg.inputs)
    else:
        input_sets = [random_inputs(in_specs, model, cfg.dims, cfg.seed + run) for run in range(cfg.runs)]
        inputs_from = "seeded random (quantizer range for float inputs feeding a QuantizeLinear)"

    run_artifact, execution = _artifact_runner(artifact, manifest)
    session = ort_session(onnx_path, cfg.ort_opt)
    if cfg.ort_opt != "all":
        problem = optimized_load_problem(onnx_path, cfg.ort_opt)
        if problem:
            warnings.warn(problem, stacklevel=2)
            notes.append(problem)
    ort_inputs = {i.name for i in session.get_inputs()}
    ort_outputs = [o.name for o in session.get_outputs()]
    if ort_inputs != {s.name for s in in_specs} or ort_outputs != [s.name for s in out_specs]:
        raise NativeqError(
            f"{onnx_path} has inputs {sorted(ort_inputs)} and outputs {ort_outputs}, but artifact {artifact} has "
            f"inputs {[s.name for s in in_specs]} and outputs {[s.name for s in out_specs]}: not the same model"
        )

    comparisons = [OutputComparison(name=s.name, dtype=s.dtype) for s in out_specs]
    first_failure = None  # (inputs, artifact outputs by name, failing output names) of the first failing run
    for inputs in input_sets:
        got = run_artifact(inputs)
        try:
            ref = session.run(ort_outputs, inputs)
        except Exception as e:  # noqa: BLE001
            raise NativeqError(f"ONNX Runtime failed to run {onnx_path}: {first_line(e)}") from None
        for comp, spec, g, r in zip(comparisons, out_specs, got, ref):
            accumulate(comp, np.asarray(g), np.asarray(r), spec.quant, cfg.tol_steps, rtol)
        failing = [c.name for c in comparisons if not c.passed]
        if failing and first_failure is None:
            first_failure = (inputs, {s.name: np.asarray(g) for s, g in zip(out_specs, got)}, failing)

    localizations = []
    if first_failure is not None and (cfg.localize or cfg.accept_ties):
        from nativeq.verify.localize import localize

        inputs, got, failing = first_failure
        localizations = localize(onnx_path, manifest, inputs, got, failing, cfg.ort_opt)

    symbolic = sorted({d for s in in_specs for d in s.shape if isinstance(d, str)})
    dims = {} if cfg.inputs else {d: int(cfg.dims.get(d, DEFAULT_DIM)) for d in symbolic}
    return VerifyReport(
        artifact=str(artifact),
        onnx=str(onnx_path),
        target=manifest["target"]["name"],
        execution=execution,
        ort_opt=cfg.ort_opt,
        runs=len(input_sets),
        seed=cfg.seed,
        dims=dims,
        inputs_from=inputs_from,
        outputs=comparisons,
        notes=notes,
        localizations=localizations,
        accept_ties=cfg.accept_ties,
    )
