"""`nativeq bench-emulated`: instructions per inference of aarch64 artifacts under qemu.

Without a Raspberry Pi, wall time under qemu says nothing about the device; the number of
guest instructions one inference executes does (for the same core, fewer instructions is
faster, and NEON/sdot kernels show up as large drops). Each artifact (e.g. the rpi4, rpi5 and
`--no-int8` float builds of one model) runs on the same seeded inputs under its target's qemu
CPU model with nativeq's counting plugin (`emulate.count_instructions`), printed side by side.

With `ort_models`, ONNX Runtime's aarch64 build (Debian's arm64 python under qemu, see
`ort_emulated`) runs the same inputs under each artifact target's CPU model and is counted the
same way, so the peer is measured on the emulated core too; the ratio per target is the int8
artifact's count over ORT's best.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nativeq.errors import NativeqError
from nativeq.runtime.manifest import TensorSpec, input_specs, read_manifest

DEFAULT_DIM = 64


@dataclass(frozen=True)
class InsnBenchConfig:
    """dims: sizes of symbolic dims (default 64). repeat: inferences averaged per artifact.
    cpu: override every artifact's qemu CPU model. seed: of the random inputs."""

    dims: dict = field(default_factory=dict)
    repeat: int = 5
    cpu: str | None = None
    seed: int = 0
    ort_models: tuple = ()  # (engine label, ONNX path, optimization levels tried in order), counted in ORT aarch64


@dataclass(frozen=True)
class InsnRow:
    artifact: str
    target: str
    int8: bool
    cpu: str
    insns_per_inference: int
    startup_insns: int


@dataclass(frozen=True)
class OrtInsnRow:
    """ONNX Runtime (aarch64 wheel) on MODEL under the qemu CPU of `target`, one thread."""

    engine: str  # e.g. "ort qdq (opt all)"
    model: str
    target: str
    cpu: str
    level: str  # the graph-optimization level ORT accepted
    insns_per_inference: int
    startup_insns: int  # python startup, imports, session creation and the first run
    onnxruntime: str


@dataclass(frozen=True)
class InsnBenchResult:
    rows: tuple[InsnRow, ...]
    input_shapes: dict
    ort_rows: tuple[OrtInsnRow, ...] = ()

    def ratios(self) -> list[dict]:
        """Per int8 artifact with ORT rows on its target: its count over the lowest ORT count there."""
        out = []
        for row in self.rows:
            peers = [o for o in self.ort_rows if o.target == row.target and o.cpu == row.cpu]
            if not row.int8 or not peers:
                continue
            best = min(peers, key=lambda o: o.insns_per_inference)
            out.append({"artifact": row.artifact, "target": row.target, "cpu": row.cpu, "ort_best": best.engine,
                        "ratio": row.insns_per_inference / max(best.insns_per_inference, 1)})
        return out

    def table(self) -> str:
        shapes = ", ".join(f"{k}{list(v)}" for k, v in self.input_shapes.items())
        base = self.rows[0].insns_per_inference
        header = ("artifact", "target", "int8", "qemu -cpu", "M insns/inference", f"vs {Path(self.rows[0].artifact).name}")
        body = [
            (Path(r.artifact).name, r.target, "yes" if r.int8 else "no (float)", r.cpu, f"{r.insns_per_inference / 1e6:.3f}",
             f"{r.insns_per_inference / max(base, 1):.2f}x")
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = [f"inputs: {shapes} (seeded random); steady state, mean of the counted inferences"]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
        if self.ort_rows:
            version = self.ort_rows[0].onnxruntime
            lines.append(f"ONNX Runtime {version} aarch64 (Debian arm64 python under qemu, 1 thread), same inputs:")
            header = ("engine", "model", "target", "qemu -cpu", "M insns/inference")
            body = [(o.engine, Path(o.model).name, o.target, o.cpu, f"{o.insns_per_inference / 1e6:.3f}")
                    for o in self.ort_rows]
            widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
            lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
            for r in self.ratios():
                lines.append(f"{Path(r['artifact']).name} ({r['target']}, {r['cpu']}) / ORT best ({r['ort_best']}): "
                             f"{r['ratio']:.3f}x instructions")
        return "\n".join(lines)

    def to_json(self) -> str:
        out = {"inputs": {k: list(v) for k, v in self.input_shapes.items()}, "rows": [asdict(r) for r in self.rows]}
        if self.ort_rows:
            out["ort_rows"] = [asdict(o) for o in self.ort_rows]
            out["ratios"] = self.ratios()
        return json.dumps(out, indent=2)


def random_inputs(specs: tuple[TensorSpec, ...], dims: dict, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of the declared dtypes: floats standard normal, 8/16-bit ints over their full range,
    wider ints (indices, lengths) in [0, 16), bools a fair coin."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) else int(dims.get(d, DEFAULT_DIM)) for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if spec.value is not None:  # fixed at compile time: its only value
            out[spec.name] = np.asarray(spec.value, dtype).reshape(shape)
        elif dtype.kind == "f":
            out[spec.name] = rng.normal(0, 1, shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif dtype.kind in "iu" and dtype.itemsize <= 2:
            info = np.iinfo(dtype)
            out[spec.name] = rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
        elif dtype.kind in "iu":
            out[spec.name] = rng.integers(0, 16, shape).astype(dtype)
        else:
            raise NativeqError(f"input {spec.name!r} has dtype {spec.dtype}, which cannot be generated")
    return out


def bench_emulated(artifacts, cfg: InsnBenchConfig = InsnBenchConfig()) -> InsnBenchResult:
    """Count instructions per inference for each aarch64 artifact directory, on the same inputs."""
    from nativeq.runtime.emulate import count_instructions

    paths = [Path(a) for a in artifacts]
    if not paths:
        raise NativeqError("bench-emulated needs at least one artifact directory")
    manifests = [read_manifest(p) for p in paths]
    specs = input_specs(manifests[0])
    for path, manifest in zip(paths[1:], manifests[1:]):
        if input_specs(manifest) != specs:
            raise NativeqError(f"artifact {path} has other inputs than {paths[0]}: compare builds of one model")
    symbolic = {d for s in specs for d in s.shape if isinstance(d, str)}
    unknown = sorted(set(cfg.dims) - symbolic)
    if unknown:
        raise NativeqError(f"--dim {unknown[0]}: the model has no symbolic dim {unknown[0]!r} "
                           f"(its symbolic dims: {', '.join(sorted(symbolic)) or 'none'})")
    inputs = random_inputs(specs, cfg.dims, cfg.seed)
    rows = []
    for path, manifest in zip(paths, manifests):
        count = count_instructions(path, inputs, cpu=cfg.cpu, repeat=cfg.repeat)
        rows.append(InsnRow(artifact=str(path), target=count.target, int8=bool(manifest.get("build", {}).get("int8")),
                            cpu=count.cpu, insns_per_inference=count.per_inference, startup_insns=count.startup))
    ort_rows = []
    if cfg.ort_models:
        from nativeq.runtime.ort_emulated import count_ort_instructions

        cores = list(dict.fromkeys((r.target, r.cpu) for r in rows))
        for target, cpu in cores:
            for engine, model, levels in cfg.ort_models:
                count = count_ort_instructions(model, inputs, cpu=cpu, levels=tuple(levels), repeat=cfg.repeat)
                ort_rows.append(OrtInsnRow(engine=f"{engine} (opt {count.level})", model=str(model), target=target,
                                           cpu=cpu, level=count.level, insns_per_inference=count.per_inference,
                                           startup_insns=count.startup, onnxruntime=count.onnxruntime))
    return InsnBenchResult(rows=tuple(rows), input_shapes={k: v.shape for k, v in inputs.items()},
                           ort_rows=tuple(ort_rows))
