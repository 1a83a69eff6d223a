"""Measure the QAT results table: float / PTQ int8 / QAT int8 / QAT int4 / int8+2:4 / int4+2:4 / int4+50% /
balanced 16x4 blocks (int8 at 25%, 50% and 75%, int4 at 50%) / unbalanced 16x4 blocks at 50%.

    .venv/bin/python scripts/qat_results.py --source runs/tiny --data data/speech --steps 150 -o runs/qat-results

Each row is one `nativeq finetune` run (the same library call) from the same float source,
evaluated on the test split and on the other-engine split; sizes from `storage_bytes`.
Writes `results.json` and `results.md` in the output directory (rows already measured are
kept, so an interrupted run continues where it stopped).

`--one-shot 2:4 0.5 16x4b:0.5 ...` instead scores the float source with each pattern's magnitude
mask applied once (no quantization, no training) on the test split: how much a pattern removes
before fine-tuning has to win it back.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nativeq._fs import write_json_atomic, write_text_atomic

ROWS = [
    # name, weight bits, sparsity, PTQ only
    ("float", None, None, False),
    ("PTQ int8", 8, None, True),
    ("QAT int8", 8, None, False),
    ("QAT int4 (mixed 4/8)", 4, None, False),
    ("QAT int8 + 2:4", 8, "2:4", False),
    ("QAT int4 + 2:4 (mixed)", 4, "2:4", False),
    ("QAT int4 + 50% unstructured (mixed)", 4, "0.5", False),
    # balanced 16x4 blocks: every band of 16 outputs keeps the same number of 16x4 blocks
    ("QAT int8 + 16x4b 50%", 8, "16x4b:0.5", False),
    ("QAT int8 + 16x4b 75%", 8, "16x4b:0.75", False),
    ("QAT int4 + 16x4b 50% (mixed)", 4, "16x4b:0.5", False),
    ("QAT int8 + 16x4b 25%", 8, "16x4b:0.25", False),
    ("QAT int8 + 16x4 50% (not balanced)", 8, "16x4:0.5", False),
]


def _evaluate(model, data: str, splits: list[str], limit: int) -> dict:
    from nativeq.models.evaluate import evaluate

    return {s: {k: v for k, v in evaluate(model, data, s, limit=limit).items() if k in ("wer", "cer", "utterances")}
            for s in splits}


def one_shot(source: str, data: str, patterns: list[str], limit: int) -> list[tuple[str, dict]]:
    """(pattern, test metrics) of the float source with each pattern's final mask multiplied in."""
    from torch import nn

    from nativeq.models.pretrained import load_model
    from nativeq.qat.finetune import parse_sparsity
    from nativeq.qat.sparsity import compute_mask

    rows = []
    for pattern in patterns:
        model, _ = load_model(source)
        cfg = parse_sparsity(pattern)
        with torch.no_grad():
            for layer in model.modules():
                if cfg is not None and isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                    layer.weight.mul_(compute_mask(layer.weight, cfg, cfg.final_sparsity))
        rows.append((pattern, _evaluate(model, data, ["test"], limit)["test"]))
        print(f"one-shot {pattern}: test WER {rows[-1][1]['wer']:.4f} CER {rows[-1][1]['cer']:.4f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="evaluate the first N utterances of each split (0 = all)")
    ap.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    ap.add_argument("--one-shot", nargs="+", default=None, metavar="PATTERN",
                    help="score the float source with these masks applied once (dense for none), no training")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()

    from nativeq.models.data import read_manifest
    from nativeq.models.pretrained import load_model
    from nativeq.qat.convert import storage_bytes
    from nativeq.qat.finetune import FinetuneConfig, finetune

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one_shot:
        rows = one_shot(args.source, args.data, args.one_shot, args.limit)
        write_json_atomic(out / "one_shot.json", {p: m for p, m in rows})
        return
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    splits = ["test"] + (["other"] if (Path(args.data) / "other.tsv").exists() else [])
    read_manifest(args.data, "test")

    for name, bits, sparsity, ptq in ROWS:
        if name in results or (args.only and name not in args.only):
            continue
        t0 = time.time()
        if bits is None:
            model, _ = load_model(args.source)
            size = {"bytes": 4 * sum(t.numel() for t in model.state_dict().values())}
            size["fraction_of_float"] = 1.0
            command = f"nativeq eval {args.source} --data {args.data}"
        else:
            run = out / (name.split(" (")[0].lower().replace(" + ", "-").replace(" ", "-").replace("%", "pct").replace(":", "of"))
            cfg = FinetuneConfig(source=args.source, data=args.data, out=str(run), weight_bits=bits, mixed=bits == 4,
                                 sparsity=sparsity, steps=args.steps, threads=args.threads, calibrate_only=ptq,
                                 progress=False)
            if not (run / "config.json").exists():
                finetune(cfg)
            model, _ = load_model(run)
            size = storage_bytes(model)
            command = (f"nativeq finetune {args.source} --data {args.data} --weight-bits {bits}"
                       + (" --mixed" if bits == 4 else "") + (f" --sparsity {sparsity}" if sparsity else "")
                       + (" --ptq" if ptq else f" --steps {args.steps}") + f" -o {run}")
        train_seconds = time.time() - t0
        metrics = _evaluate(model, args.data, splits, args.limit)
        results[name] = {"metrics": metrics, "size": size, "seconds": round(train_seconds, 1), "command": command}
        write_json_atomic(results_path, results)
        print(name, json.dumps(results[name]), flush=True)

    float_row = results.get("float")
    lines = ["| model | test WER | test CER | other WER | rel. WER vs float (test) | size vs float (all / weights) | time | command |",
             "|---|---|---|---|---|---|---|---|"]
    for name, *_ in ROWS:
        if name not in results:
            continue
        r = results[name]
        test = r["metrics"]["test"]
        other = r["metrics"].get("other", {})
        rel = "" if not float_row else f"{(test['wer'] / max(float_row['metrics']['test']['wer'], 1e-9) - 1) * 100:+.1f}%"
        lines.append(f"| {name} | {test['wer']:.3f} | {test['cer']:.3f} | {other.get('wer', float('nan')):.3f} | {rel} | "
                     f"{r['size']['fraction_of_float'] * 100:.1f}% / {r['size'].get('weight_fraction_of_float', 1.0) * 100:.2f}% | "
                     f"{r['seconds']:.0f} s | `{r['command']}` |")
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
