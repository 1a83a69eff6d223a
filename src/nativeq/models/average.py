"""Checkpoint averaging: the mean of a run's last K epoch snapshots, written as a new run.

Averaging the weights of the last epochs (as ESPnet's and WeNet's `average_model`, or SWA)
smooths out the noise of the last optimizer steps and usually decodes better than the last
epoch alone. A run keeps per-epoch snapshots when trained with `keep_epochs` (`nativeq train`
/ `finetune --keep-epochs K`): `<run>/epochs/epoch-NNNN.safetensors`, each with its epoch
and step in the file's metadata.

For a fine-tuning (QAT) run, the float latent weights and the EMA activation scales are
averaged; the sparsity masks and every integer/bool buffer must be equal in all averaged
snapshots (the schedule froze them), else it is an error. The integer model is derived
from the averaged weights exactly as from any checkpoint, so what `nativeq export` writes
still serves bit-exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from nativeq._fs import atomic_directory, write_bytes_atomic
from nativeq.errors import NativeqError

EPOCHS_DIR = "epochs"


def save_snapshot(run_dir: Path, state: dict[str, torch.Tensor], epoch: int, step: int, keep: int) -> None:
    """Write epoch `epoch`'s weights to `run_dir/epochs/`, keeping only the newest `keep` snapshots."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    write_bytes_atomic(Path(run_dir) / EPOCHS_DIR / f"epoch-{epoch:04d}.safetensors",
                       save(tensors, metadata={"epoch": str(epoch), "step": str(step)}))
    for old in list_snapshots(run_dir)[:-keep]:
        old["path"].unlink(missing_ok=True)


def list_snapshots(run_dir: str | os.PathLike) -> list[dict]:
    """The run's epoch snapshots, oldest first: [{"epoch", "step", "path"}]."""
    from safetensors import safe_open

    snapshots = []
    for path in sorted((Path(run_dir) / EPOCHS_DIR).glob("epoch-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        snapshots.append({"epoch": int(meta.get("epoch", path.stem.split("-")[-1])), "step": int(meta.get("step", -1)),
                          "path": path})
    return sorted(snapshots, key=lambda s: s["epoch"])


def average_states(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """Element-wise mean of float tensors; masks and integer/bool buffers must agree (`names` label errors)."""
    keys = set(states[0])
    for state, name in zip(states[1:], names[1:]):
        if set(state) != keys:
            raise NativeqError(f"{name} holds other tensors than {names[0]} (a different model)")
    averaged = {}
    for key, first in states[0].items():
        if key.endswith("weight_mask") or not first.is_floating_point():
            for state, name in zip(states[1:], names[1:]):
                if not torch.equal(state[key], first):
                    what = "sparsity masks" if key.endswith("weight_mask") else "buffers"
                    raise NativeqError(f"{names[0]} and {name} have different {what} ({key}): average only "
                                       "epochs after the sparsity schedule froze the masks (a smaller --last)")
            averaged[key] = first
        else:
            total = sum(state[key].to(torch.float64) for state in states)
            averaged[key] = (total / len(states)).to(first.dtype)
    return averaged


@dataclasses.dataclass(frozen=True)
class AverageConfig:
    run: str = "runs/qat"
    out: str = "runs/qat-avg"
    last: int = 5  # average the newest `last` epoch snapshots
    force: bool = False


def average_run(cfg: AverageConfig) -> dict:
    """`nativeq average`: a run directory whose weights are the mean of RUN's last K epoch snapshots."""
    from safetensors.torch import load_file, save

    from nativeq.models.pretrained import load_model

    run = Path(cfg.run)
    if not (run / "config.json").is_file():
        raise NativeqError(f"{run}: not a run directory (no config.json)")
    if cfg.last < 1:
        raise NativeqError(f"--last {cfg.last}: average at least one epoch")
    snapshots = list_snapshots(run)
    if not snapshots:
        raise NativeqError(f"{run} has no epoch snapshots in {run / EPOCHS_DIR} "
                           "(train or finetune it with --keep-epochs K)")
    if cfg.last > len(snapshots):
        raise NativeqError(f"--last {cfg.last}: {run} keeps only {len(snapshots)} epoch snapshot(s) "
                           f"(epochs {snapshots[0]['epoch']}-{snapshots[-1]['epoch']})")
    chosen = snapshots[-cfg.last:]
    names = [str(s["path"]) for s in chosen]
    averaged = average_states([load_file(name) for name in names], names)
    config = json.loads((run / "config.json").read_text())
    config.pop("dev", None)  # the last epoch's dev metrics do not describe the average
    config["averaged"] = {"source": str(run), "epochs": [s["epoch"] for s in chosen], "steps": [s["step"] for s in chosen]}
    with atomic_directory(cfg.out, cfg.force) as tmp:
        write_bytes_atomic(tmp / "model.safetensors", save(averaged))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        load_model(tmp)  # the average loads as the run's model (shapes, config, QAT layers)
    return {"out": str(cfg.out), "epochs": config["averaged"]["epochs"], "steps": config["averaged"]["steps"]}
