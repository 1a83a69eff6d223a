"""Ship a finished QAT run as a pretrained QDQ model: `src/nativeq/pretrained/<name>/{model.onnx, metrics.json}`.

    .venv/bin/python scripts/ship_pretrained.py runs/int8 conformer-tiny-int8 --data data/speech \
        --command "nativeq finetune conformer-tiny --data data/speech --steps 1200 -o runs/int8"

Exports the run (`nativeq export`: QDQ ONNX, lint-checked), measures its PyTorch integer model on the
test (held-out espeak-ng voices), other (festival) and eval-human (recorded speech) splits and the
exported file in ONNX Runtime on test, and records the recipe, the command and the stored size
(`qat.convert.storage_bytes`) in metrics.json. The demo and the model card read that file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

from nativeq._data import PRETRAINED_DIR
from nativeq._fs import atomic_directory, write_json_atomic


def recipe(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    quant, sparsity = config["qat"]["quant"], config["qat"].get("sparsity")
    pattern = "dense"
    if sparsity:
        pattern = sparsity["pattern"] if sparsity["pattern"] in ("2:4", "1:4") else f"{sparsity['pattern']}:{sparsity['sparsity']}"
    return {"source": config["qat"]["source"], "weight_bits": quant["weight_bits"], "act_bits": quant["act_bits"],
            "mixed": bool(quant["bits_rules"]), "sparsity": pattern, "steps": config["dev"]["step"],
            "power_of_two_scales": quant["power_of_two_scales"]}


def ship(run: Path, name: str, data: str, command: str, force: bool) -> Path:
    from nativeq.demo.transcribe import onnx_model_wer
    from nativeq.models.data import check_audio, read_manifest
    from nativeq.models.evaluate import EvalConfig, evaluate_run
    from nativeq.qat.convert import storage_bytes
    from nativeq.qat.finetune import ExportRunConfig, export_run, load_qat_model

    out = PRETRAINED_DIR / name
    with tempfile.TemporaryDirectory() as tmp:
        onnx_tmp = Path(tmp) / "model.onnx"
        exported = export_run(ExportRunConfig(run=str(run), out=str(onnx_tmp)))
        metrics = {"recipe": recipe(run), "command": command, "date": datetime.date.today().isoformat(),
                   "onnx_bytes": exported["bytes"], "storage": storage_bytes(load_qat_model(run)[0])}
        for split in ("test", "other", "eval-human"):
            result = evaluate_run(EvalConfig(model=str(run), data=data, split=split, threads=2))
            metrics[split] = {k: result[k] for k in ("wer", "cer", "utterances")}
        test = check_audio(read_manifest(data, "test"))
        metrics["test_ort"] = {**onnx_model_wer(onnx_tmp, test), "split": "test"}
        with atomic_directory(out, force=force) as work:
            (work / "model.onnx").write_bytes(onnx_tmp.read_bytes())
            write_json_atomic(work / "metrics.json", metrics)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `nativeq finetune` (or `nativeq average`) run")
    parser.add_argument("name", help="the shipped name, e.g. conformer-tiny-int8")
    parser.add_argument("--data", default="data/speech")
    parser.add_argument("--command", required=True, help="the commands that trained the run, for the record")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    out = ship(args.run, args.name, args.data, args.command, args.force)
    print(json.dumps(json.loads((out / "metrics.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
