"""Training: CTC loss, AdamW with warmup + cosine decay, gradient clipping, SpecAugment,
dev WER each epoch, atomic resumable checkpoints, DistributedDataParallel under torchrun.

A run directory holds `config.json` (model + training config), `model.safetensors` (the
latest weights, what `load_model` reads), `checkpoint.pt` (weights + optimizer + schedule
position, for `--resume`) and `log.jsonl` (one line per epoch).

`train_loop(model, train_utts, dev_utts, cfg, run_dir)` is the reusable core (the QAT
fine-tuning starts from it with its own model); `train(cfg)` is the `nativeq train` command.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from nativeq._fs import write_bytes_atomic, write_json_atomic, write_text_atomic
from nativeq.errors import NativeqError
from nativeq.models.average import save_snapshot
from nativeq.models.conformer import ConformerConfig, ConformerCTC, count_parameters, preset
from nativeq.models.data import Utterance, check_audio, read_manifest, read_wav
from nativeq.models.features import SpecAugmentConfig, fbank, spec_augment
from nativeq.models.text import CHARS, encode


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "conformer-tiny"
    data: str = "data/speech"
    out: str = "runs/float"
    epochs: int = 20
    steps: int = 0  # total optimizer steps; 0 = epochs x batches per epoch
    batch_size: int = 16
    lr: float = 1.5e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 500
    grad_clip: float = 5.0
    seed: int = 0
    threads: int = 1
    spec_augment: bool = True
    vtlp: float = 0.0  # vocal-tract-length perturbation: mel warp factor drawn from [1 - vtlp, 1 + vtlp] per utterance
    resume: bool = False
    init: str = ""  # start from these weights (a run directory or a shipped model name); fresh optimizer and schedule
    skip_bad: bool = False
    max_dev: int = 300  # dev utterances decoded per epoch
    train_split: str = "train"
    dev_split: str = "dev"
    chunk_size: int = -1  # override the preset's streaming chunk (-1 = keep)
    stop_after_epoch: int = 0  # end this invocation after that epoch (resume later); 0 = run the schedule out
    keep_epochs: int = 0  # also keep the weights of the last K epochs in run_dir/epochs/ (for `nativeq average`)
    progress: bool = True

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- batches
def utterance_features(utt: Utterance, vtln_warp: float = 1.0) -> torch.Tensor:
    return fbank(torch.from_numpy(read_wav(utt.path)), vtln_warp)


def vtlp_warp(vtlp: float, generator: torch.Generator) -> float:
    """A VTLP warp factor, uniform in [1 - vtlp, 1 + vtlp] on a 0.01 grid (the warped mel banks are cached)."""
    if vtlp <= 0:
        return 1.0
    steps = round(vtlp * 100)
    return 1.0 + int(torch.randint(-steps, steps + 1, (1,), generator=generator)) / 100


def collate(feats: list[torch.Tensor], targets: list[list[int]] | None = None):
    lengths = torch.tensor([f.shape[0] for f in feats])
    batch = nn.utils.rnn.pad_sequence(feats, batch_first=True)
    if targets is None:
        return batch, lengths
    tgt_lengths = torch.tensor([len(t) for t in targets])
    tgt = torch.tensor([i for t in targets for i in t], dtype=torch.long)
    return batch, lengths, tgt, tgt_lengths


def make_batches(utts: list[Utterance], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar duration (sorted within pools of 50 batches) to limit padding."""
    rng = random.Random(seed)
    order = list(range(len(utts)))
    rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: utts[i].duration)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def feature_statistics(utts: list[Utterance], max_utts: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mel-bin mean and 1/std over (a deterministic sample of) the training audio."""
    sample = utts[:: max(1, len(utts) // max_utts)][:max_utts]
    feats = torch.cat([utterance_features(u) for u in sample])
    return feats.mean(0), 1.0 / feats.std(0).clamp_min(1e-3)


# ----------------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to 5% of it at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- distributed
@dataclasses.dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


# ----------------------------------------------------------------------------- checkpoints
def save_run(run_dir: Path, model: ConformerCTC, extra_config: dict | None = None) -> None:
    """Write config.json and model.safetensors atomically (what `load_model` reads)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    write_bytes_atomic(run_dir / "model.safetensors", save(state))
    config = {"model": _unwrap(model).config.to_json(), "vocab": CHARS}
    config.update(extra_config or {})
    write_json_atomic(run_dir / "config.json", config)


def _save_checkpoint(run_dir: Path, model, optimizer, epoch: int, step: int, best: dict) -> None:
    buf = io.BytesIO()
    torch.save(
        {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
         "best": best, "config": _unwrap(model).config.to_json()},
        buf,
    )
    write_bytes_atomic(run_dir / "checkpoint.pt", buf.getvalue())


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def load_state_checked(model: ConformerCTC, state: dict, source: str) -> None:
    """Load a state dict, turning a different-config checkpoint into one clear line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        detail = (f"{mismatched[0]} has shape {tuple(state[mismatched[0]].shape)}, model expects {tuple(own[mismatched[0]].shape)}"
                  if mismatched else f"missing {missing[:2]} unexpected {unexpected[:2]}")
        raise NativeqError(f"checkpoint {source} is from a different model config ({detail})")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- loop
def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
    """Best-path CTC decoding of logits [B, T', V] to transcripts."""
    from nativeq.models.text import ctc_greedy_collapse, decode

    ids = logits.argmax(-1)
    out = []
    for b in range(ids.shape[0]):
        n = ids.shape[1] if lengths is None else int(lengths[b])
        out.append(decode(ctc_greedy_collapse(ids[b, :n].tolist())))
    return out


def train_loop(
    model: ConformerCTC,
    train_utts: list[Utterance],
    dev_utts: list[Utterance],
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    extra_config: dict | None = None,
    after_step: Callable[[nn.Module, int], None] | None = None,
    extra_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Train `model` in place; checkpoint to `run_dir` each epoch; returns the last dev metrics.

    `after_step(model, step)` runs after each optimizer step (e.g. to re-apply sparsity masks).
    `extra_loss(x, lengths, logits, out_lengths)` is added to the CTC loss (e.g. distillation).
    With cfg.resume, continues from `run_dir/checkpoint.pt`.
    """
    from nativeq._log import QUIET, Bar, verbosity

    from nativeq.models.evaluate import evaluate_utterances

    dist_info = _init_distributed()
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda", dist_info.rank % max(1, torch.cuda.device_count())) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    train_model = model
    if dist_info.world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    targets = [encode(u.text, str(u.path)) for u in train_utts]

    batches_per_epoch = math.ceil(len(make_batches(train_utts, cfg.batch_size, 0)) / dist_info.world)
    total_steps = cfg.steps or cfg.epochs * batches_per_epoch
    epochs = math.ceil(total_steps / batches_per_epoch)
    start_epoch, step, best = 0, 0, {}
    if cfg.resume:
        ckpt_path = run_dir / "checkpoint.pt"
        if not ckpt_path.is_file():
            raise NativeqError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        load_state_checked(model, ckpt["model"], str(ckpt_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step, best = ckpt["epoch"] + 1, ckpt["step"], ckpt.get("best", {})
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "train_config.json", cfg.to_json())

    # Epochs count on from the checkpoint's and the step count decides the end, so a run resumed
    # on a bigger corpus (more batches per epoch) still trains up to total_steps.
    epochs = max(epochs, start_epoch + math.ceil((total_steps - step) / batches_per_epoch))
    metrics = best
    for epoch in range(start_epoch, epochs):
        if step >= total_steps:
            break
        train_model.train()
        batches = make_batches(train_utts, cfg.batch_size, cfg.seed * 1000 + epoch)[dist_info.rank :: dist_info.world]
        batches = batches[: batches_per_epoch]
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + dist_info.rank)
        bar = Bar(batches, desc=f"epoch {epoch + 1}/{epochs}", enabled=cfg.progress and dist_info.main)
        losses, t0 = [], time.time()
        for batch in bar:
            if step >= total_steps:
                break
            feats = [utterance_features(train_utts[i], vtlp_warp(cfg.vtlp, generator)) for i in batch]
            if cfg.spec_augment:
                feats = [spec_augment(f, SpecAugmentConfig(), generator) for f in feats]
            x, lengths, tgt, tgt_lengths = collate(feats, [targets[i] for i in batch])
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, total_steps)
            x, lengths = x.to(device), lengths.to(device)
            logits, out_lengths = train_model(x, lengths)
            log_probs = torch.log_softmax(logits, dim=-1).transpose(0, 1)
            loss = ctc(log_probs, tgt.to(device), out_lengths, tgt_lengths.to(device))
            if extra_loss is not None:
                loss = loss + extra_loss(x, lengths, logits, out_lengths)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            if after_step is not None:
                after_step(model, step)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                            dev_wer=f"{best.get('wer', float('nan')):.3f}")
        bar.close()
        if dist_info.main:
            metrics = evaluate_utterances(model, dev_utts[: cfg.max_dev], batch_size=cfg.batch_size)
            record = {"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / max(1, len(losses)),
                      "dev_wer": metrics["wer"], "dev_cer": metrics["cer"], "seconds": round(time.time() - t0, 1)}
            best = {"wer": metrics["wer"], "cer": metrics["cer"], "epoch": epoch + 1, "step": step}
            log_path = run_dir / "log.jsonl"
            previous = log_path.read_text() if log_path.exists() else ""
            write_text_atomic(log_path, previous + json.dumps(record) + "\n")
            save_run(run_dir, model, {**(extra_config or {}), "dev": best})
            if cfg.keep_epochs > 0:
                save_snapshot(run_dir, _unwrap(model).state_dict(), epoch + 1, step, cfg.keep_epochs)
            _save_checkpoint(run_dir, model, optimizer, epoch, step, best)
            if cfg.progress and verbosity() > QUIET:
                print(f"epoch {epoch + 1}: loss {record['train_loss']:.3f}  dev WER {metrics['wer']:.3f}  "
                      f"CER {metrics['cer']:.3f}  ({record['seconds']} s)", flush=True)
        if dist_info.world > 1:
            torch.distributed.barrier()
        if cfg.stop_after_epoch and epoch + 1 >= cfg.stop_after_epoch:
            break
    return metrics


def train(cfg: TrainConfig) -> dict:
    """`nativeq train`: build the model from its preset, read the corpus, run `train_loop`."""
    if not 0.0 <= cfg.vtlp < 0.5:
        raise NativeqError(f"--vtlp {cfg.vtlp}: the warp range must be in [0, 0.5) (e.g. 0.1 for factors 0.9-1.1)")
    if cfg.keep_epochs < 0:
        raise NativeqError(f"--keep-epochs {cfg.keep_epochs} must be >= 0")
    if cfg.init and cfg.resume:
        raise NativeqError("--init and --resume exclude each other: --resume continues OUT's own checkpoint")
    torch.set_num_threads(max(1, cfg.threads))
    run_dir = Path(cfg.out)
    if cfg.resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise NativeqError(f"--resume: {run_dir} has no config.json (not a run directory)")
        model_cfg = ConformerConfig.from_json(json.loads(saved.read_text())["model"])
    else:
        if (run_dir / "checkpoint.pt").exists():
            raise NativeqError(f"{run_dir} already holds a run (use --resume to continue it, or another -o)")
        init_model = None
        if cfg.init:
            from nativeq.models.pretrained import load_model

            init_model, model_cfg = load_model(cfg.init)
            if type(init_model) is not ConformerCTC:
                raise NativeqError(f"--init {cfg.init}: a float model is needed (a run of `nativeq train` or a shipped model)")
        else:
            model_cfg = preset(cfg.model)
        if cfg.chunk_size >= 0:
            model_cfg = dataclasses.replace(model_cfg, chunk_size=cfg.chunk_size)
    train_utts = check_audio(read_manifest(cfg.data, cfg.train_split), cfg.skip_bad)
    dev_utts = check_audio(read_manifest(cfg.data, cfg.dev_split), cfg.skip_bad)
    torch.manual_seed(cfg.seed)
    model = ConformerCTC(model_cfg)
    if not cfg.resume and cfg.init:
        # NOTE: the feature normalization stays the init model's: its weights were trained behind it.
        load_state_checked(model, init_model.state_dict(), cfg.init)
    elif not cfg.resume:
        mean, inv_std = feature_statistics(train_utts)
        model.feat_mean.copy_(mean)
        model.feat_inv_std.copy_(inv_std)
    from nativeq._log import QUIET, verbosity

    if cfg.progress and verbosity() > QUIET and int(os.environ.get("RANK", "0")) == 0:
        hours = sum(u.duration for u in train_utts) / 3600
        print(f"{cfg.model}: {count_parameters(model) / 1e6:.2f} M parameters; {len(train_utts)} train utterances "
              f"({hours:.1f} h), {len(dev_utts)} dev", flush=True)
    return train_loop(model, train_utts, dev_utts, cfg, run_dir, extra_config={"preset": cfg.model})
