"""Shipped pre-trained models and `load_model`, which accepts a run directory or a shipped name.

A shipped model lives in `nativeq/pretrained/<name>/` with the same files as a run
directory: `config.json`, `model.safetensors`, `MODEL_CARD.md`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nativeq.errors import NativeqError

PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"


def pretrained_names() -> list[str]:
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "model.safetensors").is_file())


def _recipe_text(recipe: dict) -> str:
    """e.g. "4-bit (8-bit ends), 2:4, 5000 QAT steps from conformer-tiny"."""
    bits = f"{recipe.get('weight_bits', '?')}-bit" + (" (8-bit ends)" if recipe.get("mixed") else "")
    return f"{bits}, {recipe.get('sparsity', '?')}, {recipe.get('steps', '?')} QAT steps from {recipe.get('source', '?')}"


def shipped_models() -> list[dict]:
    """Every model shipped with nativeq, one dict each: name, kind ("float checkpoint" for a PyTorch model that
    `train --init` / `finetune` / `eval` / `export-float` take, "QDQ ONNX" for a quantized model that `compile` /
    `verify` / `bench` / `tune` take by name), recipe, bytes on disk and the test WER its metrics.json records."""
    from nativeq._data import shipped_onnx_models

    onnx_models = shipped_onnx_models()
    rows = []
    for name in sorted(set(pretrained_names()) | set(onnx_models)):
        folder = PRETRAINED_DIR / name
        metrics_path = folder / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        if name in onnx_models:
            kind, weights, recipe = "QDQ ONNX", onnx_models[name], _recipe_text(metrics.get("recipe", {}))
        else:
            recipe, kind, weights = "float32", "float checkpoint", folder / "model.safetensors"
        test = metrics.get("test", {})
        rows.append({"name": name, "kind": kind, "recipe": recipe, "bytes": weights.stat().st_size,
                     "test_wer": test.get("wer"), "other_wer": metrics.get("other", {}).get("wer"),
                     "path": str(weights)})
    return rows


def resolve_model_dir(run_or_name: str | os.PathLike) -> Path:
    """A run directory as given, or the directory of a shipped model name."""
    path = Path(run_or_name)
    if path.is_dir():
        return path
    if str(run_or_name) in pretrained_names():
        return PRETRAINED_DIR / str(run_or_name)
    raise NativeqError(
        f"{run_or_name}: neither a run directory nor a shipped model (shipped: {', '.join(pretrained_names()) or 'none'})"
    )


def load_model(run_or_name: str | os.PathLike):
    """(model in eval mode, ConformerConfig) from a run directory or a shipped model name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from nativeq.models.conformer import ConformerConfig, ConformerCTC
    from nativeq.models.text import CHARS
    from nativeq.models.train import load_state_checked

    model_dir = resolve_model_dir(run_or_name)
    config_path, weights_path = model_dir / "config.json", model_dir / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise NativeqError(f"{model_dir}: missing {p.name} (not a finished run or shipped model)")
    try:
        config = json.loads(config_path.read_text())
        model_cfg = ConformerConfig.from_json(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise NativeqError(f"{config_path}: not a nativeq model config ({type(e).__name__}: {e})") from None
    if config.get("vocab", CHARS) != CHARS:
        raise NativeqError(f"{config_path}: vocabulary {config.get('vocab')!r} differs from this version's {CHARS!r}")
    if "qat" in config:  # a `nativeq finetune` run: the integer QAT model (eval mode)
        from nativeq.qat.finetune import load_qat_model

        model, model_cfg, _ = load_qat_model(model_dir)
        return model, model_cfg
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise NativeqError(f"{weights_path}: unreadable weights ({e})") from None
    model = ConformerCTC(model_cfg)
    load_state_checked(model, state, str(weights_path))
    model.eval()
    return model, model_cfg
