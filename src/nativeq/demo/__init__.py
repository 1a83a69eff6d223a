"""`nativeq demo`: the whole flow on the shipped model, with a report.

    speech set (synthesized) -> float WER -> a short QAT fine-tune per variant (int8; int4 + 2:4)
    -> QDQ export + ORT-vs-PyTorch-integer fidelity -> the shipped, fully trained QAT models of
    the variants (ORT WER) -> compile per target (the shipped model of a variant when nativeq
    ships one, else the short run's export) -> verify vs ORT (native on x86, qemu for aarch64)
    -> bench on the host -> report.md + plots + summary.json

Each stage prints one progress line with its elapsed time and has a check; a violated check
(e.g. an artifact more than `tol_steps` quantization steps off ORT) ends the run with a
`NativeqError` naming the stage. The output directory is built beside `out` and renamed into
place only when every stage passed, so a failed run leaves no half-written report.

`run_demo(DemoConfig(...)) -> DemoResult`; `transcribe.transcribe` is `nativeq transcribe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# (name, weight bits, sparsity, mixed 8-bit subsampling/head): the variants the demo fine-tunes.
VARIANTS: dict[str, tuple[int, str | None, bool]] = {
    "int8": (8, None, False),
    "int4-2to4": (4, "2:4", True),
}


@dataclass(frozen=True)
class DemoBudget:
    """Sizes that set the run time (measured on a loaded 2-core machine; see the report's stage times)."""

    train: int  # synthesized training utterances (QAT data)
    dev: int
    test: int  # utterances every WER is measured on
    qat_steps: int
    batch_size: int
    verify_frames: int  # feature frames of the real utterance each artifact is verified on
    bench_repeat: int


# NOTE: a QAT step (batch 8, conformer-tiny, 2 threads) measured 2-5 s on the shared 2-core machine, an
# encoder compile 25-50 s per target: FULL stays under 15 minutes with two variants and two targets.
FULL = DemoBudget(train=120, dev=8, test=40, qat_steps=30, batch_size=8, verify_frames=300, bench_repeat=20)
QUICK = DemoBudget(train=12, dev=2, test=6, qat_steps=4, batch_size=4, verify_frames=200, bench_repeat=5)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    model: str = "conformer-tiny"  # shipped model name or float run directory
    data: str | None = None  # a speech data dir (train/dev/test manifests); default: synthesize into OUT/data
    targets: tuple[str, ...] = ("host", "rpi5")
    variants: tuple[str, ...] = ()  # default: every variant, only int8 with `quick`
    quick: bool = False
    threads: int = 2
    force: bool = False  # replace an existing OUT that is not a previous demo output
    seed: int = 0

    @property
    def budget(self) -> DemoBudget:
        return QUICK if self.quick else FULL

    @property
    def variant_names(self) -> tuple[str, ...]:
        # NOTE: --quick compiles one variant: an encoder compile takes minutes on a loaded 2-core machine.
        return self.variants or (("int8",) if self.quick else tuple(VARIANTS))


@dataclass
class DemoResult:
    out: str
    summary: dict = field(default_factory=dict)


def run_demo(cfg: DemoConfig, echo=print) -> DemoResult:
    from nativeq.demo.stages import run_demo as _run

    return _run(cfg, echo)
