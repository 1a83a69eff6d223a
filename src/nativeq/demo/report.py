"""The demo's report: `report.md` and three PNG plots (matplotlib, Agg), from the run summary.

Last stage of `nativeq demo`; reads only the summary dict, so the report can be redrawn
from a `summary.json` (`write_report(dir, json.load(...))`).
"""

from __future__ import annotations

from pathlib import Path

from nativeq._fs import write_bytes_atomic, write_text_atomic

PLOTS = ("wer_vs_size.png", "latency.png", "verify.png")
_COLORS = {"float": "#555555", "int8": "#1f77b4", "int4-2to4": "#d62728"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(path, buffer.getvalue())


def _points(summary: dict) -> list[tuple[str, float, float]]:
    """(name, stored MB, WER) for the float model, each shipped QAT model and each of the demo's short QAT runs."""
    points = [("float", summary["float"]["stored_bytes"] / 1e6, summary["float"]["wer"])]
    points += [(f"{name} shipped", v["stored_bytes"] / 1e6, v["wer"]) for name, v in summary.get("shipped", {}).items()]
    points += [(f"{name} {v['steps']} steps", v["stored_bytes"] / 1e6, v["wer"]) for name, v in summary["variants"].items()]
    return points


def _pareto(points):
    """The points no other point beats on both size and WER, by size."""
    front = [p for p in points if not any(q[1] <= p[1] and q[2] <= p[2] and (q[1], q[2]) != (p[1], p[2]) for q in points)]
    return sorted(front, key=lambda p: p[1])


def plot_wer_vs_size(summary: dict, path: Path) -> None:
    plt = _pyplot()
    points = _points(summary)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    front = _pareto(points)
    ax.plot([p[1] for p in front], [100 * p[2] for p in front], "--", color="#999999", zorder=1, label="Pareto front")
    for name, mb, wer in points:  # named in the legend: points of equal size would overlap as annotations
        color = _COLORS.get(name.split(" ")[0], "#2ca02c")
        ax.scatter([mb], [100 * wer], s=90, color=color, zorder=2, edgecolor="black",
                   marker="o" if name == "float" or name.endswith("shipped") else "^",
                   label=f"{name}: {mb:.2f} MB, {100 * wer:.1f}%")
    ax.set_xlabel("stored model size (MB): integer weights, sparse indices, scales")
    used = min(summary["data"]["counts"]["test"], summary["config"]["budget"]["test"])
    ax.set_ylabel(f"test WER (%) on {used} utterances")
    ax.set_title(f"{Path(summary['float']['model']).name}: word error rate vs stored size")
    sizes = [p[1] for p in points]
    ax.set_xlim(0, max(sizes) * 1.35)
    wers = [100 * p[2] for p in points]
    ax.set_ylim(max(0.0, min(wers) - 10), max(wers) + 12)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)
    plt.close(fig)


def _engine_label(name: str) -> str:
    """'ort qdq (opt basic)' -> 'ORT int8 QDQ (graph opt basic)'; the compiled artifact and PyTorch likewise."""
    if name.startswith("nativeq"):
        return "compiled int8 (nativeq)"
    if name == "pytorch fp32":
        return "PyTorch fp32"
    for prefix, label in (("ort qdq", "ORT int8 QDQ"), ("ort fp32", "ORT fp32")):
        if name.startswith(prefix):
            level = name[len(prefix):].strip(" ()").replace("opt ", "")
            return f"{label} (graph opt {level})"
    return name


def _latency_bars(summary: dict) -> list[tuple[str, dict]]:
    """(label, engine timing): per variant its compiled and ORT int8 times, then the float baselines once."""
    bars, baselines = [], {}
    for b in summary["bench"].values():
        for e in b["engines"]:
            if "fp32" in e["name"]:
                baselines.setdefault(e["name"], e)  # the same float model for every variant
            else:
                model = " (shipped)" if b.get("model") == "shipped" else ""
                bars.append((f"{b['variant']}{model}: {_engine_label(e['name'])}", e))
    return bars + [(f"float: {_engine_label(n)}", e) for n, e in baselines.items()]


def plot_latency(summary: dict, path: Path) -> None:
    plt = _pyplot()
    bars = _latency_bars(summary)
    fig, ax = plt.subplots(figsize=(7.6, 1.2 + 0.45 * max(1, len(bars))))
    if not bars:
        ax.text(0.5, 0.5, "no host artifact was benchmarked", ha="center", va="center")
        ax.set_axis_off()
    else:
        y = list(range(len(bars)))[::-1]
        medians = [e["median_ms"] for _, e in bars]
        errors = [[e["median_ms"] - e["p10_ms"] for _, e in bars], [e["p90_ms"] - e["median_ms"] for _, e in bars]]
        colors = ["#2ca02c" if e["name"].startswith("nativeq") else "#1f77b4" if "qdq" in e["name"] else "#7f7f7f"
                  for _, e in bars]
        ax.barh(y, medians, xerr=errors, color=colors, capsize=3, height=0.7)
        ax.set_yticks(y)
        ax.set_yticklabels([label for label, _ in bars], fontsize=9)
        right = max(e["p90_ms"] for _, e in bars)
        for yi, (_, e) in zip(y, bars):
            ax.text(e["p90_ms"] + 0.02 * right, yi, f"{e['median_ms']:.1f} ms", va="center", fontsize=8)
        ax.set_xlim(0, right * 1.25)
        first = next(iter(summary["bench"].values()))
        ax.set_xlabel(f"ms per utterance (median; bars p10-p90)  B=1, T={first['frames']} frames, {first['threads']} threads")
        ax.set_title(f"Inference latency on {summary['machine']['cpu']} ({summary['machine']['arch']})", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_verify(summary: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [[key, v["execution"].replace("emulated, ", ""), f"{v['max_steps']:g}" if v["max_steps"] is not None else "-",
             f"{v['exact_pct']:.2f}" if v["exact_pct"] is not None else "-", "pass" if v["passed"] else "FAIL"]
            for key, v in summary["verify"].items()]
    fig, ax = plt.subplots(figsize=(8.4, 0.8 + 0.4 * len(rows)))
    ax.set_axis_off()
    table = ax.table(cellText=rows, colLabels=["artifact", "execution", "max steps off ORT", "% exact", "result"],
                     loc="center", cellLoc="center", colWidths=[0.24, 0.26, 0.2, 0.14, 0.12])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.4)
    for (r, c), cell in table.get_celld().items():
        if r == 0:
            cell.set_facecolor("#dddddd")
        elif c == 4:
            cell.set_facecolor("#c9f2c9" if rows[r - 1][4] == "pass" else "#f2c9c9")
    ax.set_title("Compiled artifacts vs ONNX Runtime (logits, quantization steps)", fontsize=10)
    _save(fig, path)
    plt.close(fig)


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


ACCURACY_HEADER = ["model", "recipe", "WER %", "CER %", "stored MB", "compiled weights MB", "model.so MB", "of float",
                   "compiled host WER %"]


def artifact_sizes(summary: dict, variant: str, model: str = "demo") -> tuple[str, str]:
    """(compiled weight MB, model.so MB) of the artifacts of `variant` built from `model` ("shipped" or "demo"),
    one `MB (target)` per target joined by ", "; "-" without artifacts or for artifacts whose manifest had no
    sizes (an older summary)."""
    weights, library = [], []
    for art in summary.get("artifacts", {}).values():
        if art.get("variant") != variant or art.get("model", "demo") != model:
            continue
        for values, key in ((weights, "weight_bytes"), (library, "library_bytes")):
            if art.get(key) is not None:
                values.append(f"{art[key] / 1e6:.2f} ({art['target']})")
    return ", ".join(weights) or "-", ", ".join(library) or "-"


def accuracy_rows(summary: dict) -> list[list[str]]:
    """The rows of the accuracy and size table (`ACCURACY_HEADER`): the float model, then per QAT variant its shipped
    model (WER in ONNX Runtime) and the demo's short run (WER of the PyTorch integer model), each with its stored
    size (`qat.convert.storage_bytes`) next to what its compiled artifacts store and weigh."""
    f = summary["float"]
    rows = [["float (fp32)", "-", f"{100 * f['wer']:.1f}", f"{100 * f['cer']:.1f}", f"{f['stored_bytes'] / 1e6:.2f}",
             "-", "-", "1.00", "-"]]
    shipped = summary.get("shipped", {})
    for name, v in summary["variants"].items():
        for label, model, r in ((f"{name}: shipped {shipped[name]['name']}" if name in shipped else "", "shipped",
                                 shipped.get(name)), (f"{name}: this run", "demo", v)):
            if r is None:
                continue
            compiled = next((b["compiled_wer"] for b in summary["bench"].values()
                             if b["variant"] == name and b.get("model", "demo") == model), None)
            rows.append([label, f"{r['weight_bits']}-bit, {r['sparsity']}, {r['steps']} QAT steps",
                         f"{100 * r['wer']:.1f}", f"{100 * r['cer']:.1f}", f"{r['stored_bytes'] / 1e6:.2f}",
                         *artifact_sizes(summary, name, model), f"{r['fraction_of_float']:.2f}",
                         f"{100 * compiled:.1f}" if compiled is not None else "-"])
    return rows


def _built_from(art: dict) -> str:
    """The ONNX file an artifact was compiled from (older summaries: the demo's export of its variant)."""
    onnx_file = art.get("onnx") or f"models/{art['variant']}.onnx"
    return f"`{onnx_file}`"


def _accuracy_note(summary: dict) -> str:
    if not summary.get("shipped"):
        return ("Each variant: the demo's own short QAT fine-tune (WER of its PyTorch integer model); nativeq ships no "
                "trained QAT model of this source model, so the artifacts are built from these.")
    return ("Shipped: the QAT model nativeq ships for the variant (its model card has the commands that trained it); "
            "WER of the QDQ file in ONNX Runtime. This run: the demo's own short QAT fine-tune, to show the recipe end "
            "to end; WER of its PyTorch integer model. The artifacts are built from the shipped models.")


def render_markdown(summary: dict) -> str:
    m, f, cfg = summary["machine"], summary["float"], summary["config"]
    counts = summary["data"]["counts"]
    parts = [
        f"# nativeq demo{' (--quick)' if cfg['quick'] else ''}: {f['model']}",
        "",
        f"Machine: {m['cpu']} ({m['arch']}, {m['cores']} cores, {', '.join(m['features']) or 'no AVX2/VNNI'}); "
        f"{cfg['threads']} threads. Data: {'synthesized' if summary['data']['synthesized'] else summary['data']['dir']} "
        f"({counts['train']} train / {counts['dev']} dev / {counts['test']} test utterances; every WER below is on "
        f"the first {min(counts['test'], cfg['budget']['test'])} test utterances).",
        "",
        "## Accuracy and size",
        "",
    ]
    parts += [_md_table(ACCURACY_HEADER, accuracy_rows(summary)), "", _accuracy_note(summary), "",
              "![WER vs stored size](wer_vs_size.png)", "", "## Export fidelity (ORT vs PyTorch integer model)", ""]
    rows = [[n, e["layers"], e["layer_max_steps"], f"{e['layer_exact_pct']:.3f}", e["same_transcript"]]
            for n, e in summary["export"].items()]
    parts += [_md_table(["variant", "quantized layers", "max int8 steps (per layer)", "% exact", "same transcript"], rows),
              "", "## Verification (compiled artifact vs ONNX Runtime, real speech features)", ""]
    rows = [[k, _built_from(summary["artifacts"][k]), v["execution"], v["frames"],
             f"{v['max_steps']:g}" if v["max_steps"] is not None else "-",
             f"{v['exact_pct']:.2f}" if v["exact_pct"] is not None else "-", "pass" if v["passed"] else "FAIL",
             f"{summary['artifacts'][k]['bytes'] / 1e6:.2f}", f"{summary['artifacts'][k]['seconds']:.0f}"]
            for k, v in summary["verify"].items()]
    parts += [_md_table(["artifact", "built from", "execution", "frames", "max steps", "% exact", "result", "artifact MB",
                         "compile s"], rows), "", "![verification](verify.png)", "", "## Latency on this machine", ""]
    if summary["bench"]:
        rows = [[b["variant"] + (" (shipped)" if b.get("model") == "shipped" else ""), _engine_label(e["name"]),
                 f"{e['median_ms']:.2f}", f"{e['p10_ms']:.2f}", f"{e['p90_ms']:.2f}"]
                for b in summary["bench"].values() for e in b["engines"]]
        parts += [_md_table(["variant", "engine", "median ms", "p10 ms", "p90 ms"], rows), "",
                  "![latency](latency.png)", ""]
    else:
        parts += ["No artifact for this machine's architecture was built (see --targets).", ""]
    cpu = summary.get("stage_cpu_seconds", {})
    rows = [[name, f"{s:.1f}", f"{cpu[name]:.1f}" if name in cpu else "-"] for name, s in summary["stage_seconds"].items()]
    rows.append(["total", f"{sum(summary['stage_seconds'].values()):.1f}", f"{sum(cpu.values()):.1f}"])
    parts += ["## Stage times", "", "Wall time and CPU time (this process and its children, e.g. qemu); on a shared "
              "machine the wall time is inflated by other load.", "",
              _md_table(["stage", "wall s", "CPU s"], rows), "",
              f"Artifacts: `artifacts/<variant>-<target>/` (each a normal `nativeq compile` output; "
              f"`nativeq transcribe artifacts/{next(iter(summary['artifacts']))} some.wav`). Raw numbers: `summary.json`.", ""]
    return "\n".join(parts)


def write_report(out_dir: Path, summary: dict) -> None:
    out_dir = Path(out_dir)
    plot_wer_vs_size(summary, out_dir / PLOTS[0])
    plot_latency(summary, out_dir / PLOTS[1])
    plot_verify(summary, out_dir / PLOTS[2])
    write_text_atomic(out_dir / "report.md", render_markdown(summary))
