"""`nativeq finetune`: native-integer QAT (+ sparsity) of a trained Conformer-CTC, and loading it back.

    float run/shipped model -> quantize_ (bits by rule) -> calibrate activation scales on
    training batches -> sparsify_ (masks at step 0) -> train_loop (masks on schedule after
    every step, frozen at the end of the ramp; optionally distilled from the float model,
    `qat/distill.py`) -> run directory

The run directory has the files of a training run (`config.json` with a "qat" section,
`model.safetensors`, `checkpoint.pt`, `log.jsonl`); `load_qat_model(run)` rebuilds the
QAT model from it and `export_run` writes its QDQ ONNX file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from nativeq.errors import NativeqError
from nativeq.qat.quantize import QuantConfig, calibrate, quant_layers, quantize_
from nativeq.qat.sparsity import SparsityConfig, sparsify_, sparsity_summary, update_masks

# The paper's mixed 4/8-bit recipe: the subsampling convs and the output head stay 8-bit.
MIXED_RULES: tuple[tuple[str, int], ...] = (("subsample.conv*", 8), ("head", 8))


def parse_sparsity(text: str | None) -> SparsityConfig | None:
    """"2:4" / "1:4" (N:M), "0.5" or "unstructured:0.5", "1x4:0.5" (blocks), "16x4b:0.5" (balanced
    blocks) -> SparsityConfig (None for none/dense)."""
    if text is None or text in ("", "none", "dense"):
        return None
    pattern, _, amount = text.partition(":") if not re.match(r"^\d+:\d+$", text) else (text, "", "")
    if re.match(r"^\d*\.\d+$|^0$|^1$", pattern) and not amount:
        pattern, amount = "unstructured", pattern
    try:
        sparsity = float(amount) if amount else None
    except ValueError:
        raise NativeqError(f"--sparsity {text!r}: {amount!r} is not a number") from None
    return SparsityConfig(pattern=pattern, sparsity=sparsity)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    source: str = "conformer-tiny"  # float run directory or shipped model name
    data: str = "data/speech"
    out: str = "runs/qat"
    weight_bits: int = 8
    act_bits: int = 8
    act_scale: str = "ema"
    mixed: bool = False  # 8-bit subsampling and head (MIXED_RULES)
    quantize_attention: bool = True  # integer Q·Kᵀ and P·V too (every product int8 for the compiler)
    power_of_two_scales: bool = True  # QDQ export then runs bit-exactly in float executors (see numerics)
    sparsity: str | None = None  # see parse_sparsity
    sparsity_ramp: float = 0.5  # fraction of the steps over which sparsity ramps up (cubic)
    mask_updates: int = 10  # mask recomputations during the ramp
    steps: int = 0  # 0 = `epochs` passes over the training split
    epochs: int = 1
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 50
    calibration_batches: int = 8
    seed: int = 0
    threads: int = 1
    max_dev: int = 100  # dev utterances decoded at the end of each epoch
    resume: bool = False
    calibrate_only: bool = False  # post-training quantization: calibrate the scales, no training
    distill: float = 0.0  # weight of the frame-level KL to the float source model (0 = CTC only)
    keep_epochs: int = 0  # keep the last K epochs' weights in out/epochs/ (for `nativeq average`)
    progress: bool = True

    def __post_init__(self):  # bad options fail before any data is read
        self.quant_config()
        parse_sparsity(self.sparsity)
        if not 0.0 <= self.sparsity_ramp <= 1.0:
            raise NativeqError(f"sparsity_ramp {self.sparsity_ramp} must be in [0, 1]")
        if self.keep_epochs < 0:
            raise NativeqError(f"--keep-epochs {self.keep_epochs} must be >= 0")
        if not self.distill >= 0.0:
            raise NativeqError(f"--distill {self.distill} must be >= 0 (the weight of the distillation loss)")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(weight_bits=self.weight_bits, act_bits=self.act_bits, act_scale=self.act_scale,
                           bits_rules=MIXED_RULES if self.mixed else (), quantize_matmuls=self.quantize_attention,
                           power_of_two_scales=self.power_of_two_scales)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _sparsity_schedule(cfg: FinetuneConfig, total_steps: int) -> SparsityConfig | None:
    base = parse_sparsity(cfg.sparsity)
    if base is None:
        return None
    end = 0 if cfg.calibrate_only else int(round(cfg.sparsity_ramp * total_steps))
    every = max(1, end // max(1, cfg.mask_updates))
    return dataclasses.replace(base, start_step=0, end_step=end, update_every=every)


def example_features(model: nn.Module, frames: int = 64) -> tuple[torch.Tensor]:
    """A deterministic feature batch [1, frames, n_mels] for the Conformer's forward."""
    return (torch.randn(1, frames, model.config.n_mels, generator=torch.Generator().manual_seed(0)),)


def build_qat_model(model: nn.Module, qat: dict) -> nn.Module:
    """Apply the quantization and sparsity recorded in a run's "qat" section to a float model."""
    quant = QuantConfig(**{**qat["quant"], "bits_rules": tuple(map(tuple, qat["quant"]["bits_rules"]))})
    quantize_(model, quant, example_inputs=example_features(model))
    if qat.get("sparsity"):
        sparsify_(model, SparsityConfig(**qat["sparsity"]))
    return model


def load_qat_model(run: str | os.PathLike):
    """(QAT model in eval mode, ConformerConfig, qat section) from a finetune run directory."""
    from safetensors.torch import load_file

    from nativeq.models.conformer import ConformerConfig, ConformerCTC
    from nativeq.models.train import load_state_checked

    run = Path(run)
    config_path, weights_path = run / "config.json", run / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise NativeqError(f"{run}: not a finished finetune run (needs config.json and model.safetensors)")
    config = json.loads(config_path.read_text())
    if "qat" not in config:
        raise NativeqError(f"{run}: a float run, not a finetune run (run `nativeq finetune {run} ...` first)")
    model_cfg = ConformerConfig.from_json(config["model"])
    model = build_qat_model(ConformerCTC(model_cfg), config["qat"])
    load_state_checked(model, load_file(str(weights_path)), str(weights_path))
    return model.eval(), model_cfg, config["qat"]


def finetune(cfg: FinetuneConfig) -> dict:
    """Quantization/sparsity-aware fine-tuning; writes the run to cfg.out; returns the last dev metrics."""
    from nativeq.models.conformer import ConformerConfig, ConformerCTC
    from nativeq.models.data import check_audio, read_manifest
    from nativeq.models.pretrained import load_model
    from nativeq.models.train import TrainConfig, collate, make_batches, train_loop, utterance_features

    torch.set_num_threads(max(1, cfg.threads))
    run_dir = Path(cfg.out)
    train_utts = check_audio(read_manifest(cfg.data, "train"))
    dev_utts = check_audio(read_manifest(cfg.data, "dev"))
    batches_per_epoch = len(make_batches(train_utts, cfg.batch_size, 0))
    total_steps = cfg.steps or cfg.epochs * batches_per_epoch
    sparsity = _sparsity_schedule(cfg, total_steps)
    quant = cfg.quant_config()
    qat = {"quant": dataclasses.asdict(quant), "sparsity": dataclasses.asdict(sparsity) if sparsity else None,
           "source": str(cfg.source)}

    if cfg.resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise NativeqError(f"--resume: {run_dir} has no config.json (not a finetune run)")
        saved_cfg = json.loads(saved.read_text())
        if "qat" not in saved_cfg:
            raise NativeqError(f"--resume: {run_dir} is a float run, not a finetune run")
        qat = saved_cfg["qat"]
        model = build_qat_model(ConformerCTC(ConformerConfig.from_json(saved_cfg["model"])), qat)
    else:
        if (run_dir / "checkpoint.pt").exists():
            raise NativeqError(f"{run_dir} already holds a run (use --resume to continue it, or another -o)")
        model, _ = load_model(cfg.source)
        if quant_layers(model):
            raise NativeqError(f"{cfg.source} is already a finetune run: fine-tune from its float source, or --resume it")
        quantize_(model, quant, example_inputs=example_features(model))
        if sparsity is not None:  # prune (at the schedule's step-0 sparsity), then calibrate
            sparsify_(model, sparsity)
        calib = make_batches(train_utts, cfg.batch_size, cfg.seed + 12345)[: cfg.calibration_batches]
        calibrate(model, (collate([utterance_features(train_utts[i]) for i in b]) for b in calib))

    if cfg.calibrate_only:
        from nativeq._fs import write_json_atomic
        from nativeq.models.evaluate import evaluate_utterances
        from nativeq.models.train import save_run

        metrics = evaluate_utterances(model, dev_utts[: cfg.max_dev], batch_size=cfg.batch_size)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run(run_dir, model, {"qat": qat, "dev": {"wer": metrics["wer"], "cer": metrics["cer"], "step": 0}})
        write_json_atomic(run_dir / "train_config.json", cfg.to_json())
        summary = sparsity_summary(model)
        return {**metrics, "sparsity": summary} if summary else metrics

    train_cfg = TrainConfig(
        data=cfg.data, out=str(run_dir), steps=total_steps, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_steps=cfg.warmup_steps, seed=cfg.seed, threads=cfg.threads, resume=cfg.resume,
        max_dev=cfg.max_dev, keep_epochs=cfg.keep_epochs, progress=cfg.progress,
    )
    extra_loss = None
    if cfg.distill > 0:
        from nativeq.qat.distill import DistillationLoss

        teacher, _ = load_model(qat["source"])  # the float model this run was quantized from
        if quant_layers(teacher):
            raise NativeqError(f"--distill: the source {qat['source']} is not a float model")
        extra_loss = DistillationLoss(teacher, cfg.distill)
    metrics = train_loop(model, train_utts, dev_utts, train_cfg, run_dir, extra_config={"qat": qat},
                         after_step=update_masks if sparsity is not None or qat.get("sparsity") else None,
                         extra_loss=extra_loss)
    summary = sparsity_summary(model)  # the integer weights checked against the pattern
    return {**metrics, "sparsity": summary} if summary else metrics


@dataclasses.dataclass(frozen=True)
class ExportRunConfig:
    run: str = "runs/qat"
    out: str = "model.onnx"
    example_frames: int = 200
    force: bool = False


def export_run(cfg: ExportRunConfig) -> dict:
    """`nativeq export`: the QDQ ONNX file of a finetune run (input `feats` [B, T, 80], output `logits`)."""
    from nativeq.export.lint import lint_qdq
    from nativeq.export.qdq import ExportConfig, export_qdq

    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise NativeqError(f"output {out} already exists (use --force to replace it)")
    model, model_cfg, qat = load_qat_model(cfg.run)
    example = torch.randn(1, cfg.example_frames, model_cfg.n_mels, generator=torch.Generator().manual_seed(0))
    export_cfg = ExportConfig(
        input_names=("feats",), output_names=("logits",), output_index=0,
        dynamic_axes={"feats": {0: "B", 1: "T"}, "logits": {0: "B", 1: "T_out"}},
        metadata={"nativeq.source_run": str(cfg.run)},
    )
    proto = export_qdq(model, (example,), out, export_cfg)
    return {"path": str(out), "bytes": out.stat().st_size, "lint": lint_qdq(proto),
            "weight_bits": qat["quant"]["weight_bits"], "sparsity": SparsityConfig(**qat["sparsity"]).layer_pattern if qat.get("sparsity") else "dense"}
