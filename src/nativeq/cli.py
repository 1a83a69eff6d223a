"""The `nativeq` command line. Thin by design: parse options, build one config, call one
library function. Heavy imports (torch, tvm, onnxruntime) happen inside the commands so
that `nativeq --help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

import click

from nativeq.errors import NativeqError


# Third-party modules of the optional dependency groups (pyproject.toml) -> the extra that installs them.
_EXTRAS = {
    "onnx": "compile", "onnxruntime": "compile", "rich": "compile", "cloudpickle": "compile", "psutil": "compile",
    "xgboost": "compile", "tornado": "compile",
    "torch": "train", "jiwer": "train", "tqdm": "train", "safetensors": "train", "matplotlib": "train",
    "soundfile": "audio", "scipy": "audio",
}


class _Group(click.Group):
    """Turns NativeqError into `error: <one line>` and its exit code; never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NativeqError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:  # an internal bug: still one line, traceback on request
            extra = _EXTRAS.get(e.name or "") if isinstance(e, ModuleNotFoundError) else None
            if extra:  # an optional dependency group that is not installed
                click.echo(f"error: nativeq {ctx.invoked_subcommand} needs {e.name}: pip install 'nativeq[{extra}]'",
                           err=True)
                sys.exit(2)
            if os.environ.get("NATIVEQ_DEBUG"):
                traceback.print_exc()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(
                f"error: internal error {type(e).__name__}: {first} (set NATIVEQ_DEBUG=1 for the traceback)",
                err=True,
            )
            sys.exit(3)


def _parse_dims(dims: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for d in dims:
        name, sep, value = d.partition("=")
        if not sep or not value.strip().isdigit():
            raise NativeqError(f"--dim {d!r}: expected NAME=INT, e.g. --dim T=200")
        out[name.strip()] = int(value)
    return out


def _echo_json(data) -> None:
    """The command's result as one JSON document on stdout."""
    click.echo(json.dumps(data, indent=2, default=str))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line are one `warning:` line, like errors (no source line echoed)."""
    return f"warning: {message}\n"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--targets-file", type=click.Path(dir_okay=False), envvar="NATIVEQ_TARGETS",
              help="JSON file of extra/overriding target entries.")
@click.option("-v", "--verbose", is_flag=True, help="Also nativeq's debug log and TVM's C++ log lines.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the command's result (no warnings, no progress).")
@click.version_option(package_name="nativeq")
def main(targets_file, verbose, quiet):
    """nativeq: train, quantize, compile and verify int8 speech models for x86 and Raspberry Pi."""
    from nativeq import _log

    if verbose and quiet:
        raise click.UsageError("-v/--verbose and -q/--quiet exclude each other")
    warnings.formatwarning = _one_line_warning
    _log.set_verbosity(_log.VERBOSE if verbose else _log.QUIET if quiet else _log.NORMAL)
    if targets_file:
        from nativeq.targets import set_user_targets_file

        set_user_targets_file(targets_file)


# ----------------------------------------------------------------------------- targets
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def targets(as_json):
    """List the compilation targets (TVM target, cross compiler, cores, int8 instructions)."""
    from nativeq.targets import list_targets

    ts = list_targets()
    if as_json:
        click.echo(json.dumps([t.to_json() for t in ts], indent=2))
        return
    from nativeq.targets.table import targets_table

    click.echo(targets_table(ts))


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(as_json):
    """List the models shipped with nativeq (float checkpoints and trained QDQ models), usable by name."""
    from nativeq.models.pretrained import shipped_models

    rows = shipped_models()
    if as_json:
        _echo_json(rows)
        return
    from nativeq._text import aligned_table

    def percent(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    click.echo(aligned_table(["name", "kind", "recipe", "MB", "test WER", "festival WER"],
                             [[r["name"], r["kind"], r["recipe"], f"{r['bytes'] / 1e6:.2f}", percent(r["test_wer"]),
                               percent(r["other_wer"])] for r in rows]))


# ----------------------------------------------------------------------------- compile
@main.command("compile")
@click.argument("model", type=click.Path())
@click.option("--target", "-t", "target", required=True, help="Target name (see `nativeq targets`).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output artifact directory.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--explain", is_flag=True,
              help="Report which matmul/conv sites became int8 and which stayed float, and why; list every kernel "
                   "with its schedule and share of the multiply-accumulates.")
@click.option("--no-int8", is_flag=True, help="Skip the int8 lowering (TVM's own float QDQ path).")
@click.option("--tuning-log", type=click.Path(), default=None, help="Tuning database directory (default: ./tuning_logs/<target>/, else the one shipped with nativeq).")
@click.option("--no-tuning", is_flag=True, help="Do not apply any tuning database.")
@click.option("--dim", "dims", multiple=True,
              help="Fix a symbolic input size by name, e.g. --dim B=1: the artifact is specialized to it "
                   "(and the kernel report counts MACs at it; others at 64, batch 1).")
@click.option("--input-shapes", multiple=True,
              help='Input shapes, e.g. "feats:[1,T,80] state:[2,1,128]" (or the option once per input): an integer '
                   'fixes that axis, a name renames its symbolic dim.')
@click.option("--input-value", "input_values", multiple=True,
              help="Fix an input's value, e.g. --input-value sr=16000 (a sample rate, a mode flag): If nodes on it are "
                   "decided at compile time; the artifact refuses other values.")
@click.option("--debug", is_flag=True, help="Keep the DWARF debug sections in model.so (default: none, a smaller library).")
@click.option("--dense-weights", is_flag=True,
              help="Store every int8 weight dense and 8-bit (default: 4-bit packed and block-sparse where the values allow).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (manifest with its kernel table and sizes) as JSON.")
def compile_cmd(model, target, out, force, explain, no_int8, tuning_log, no_tuning, dims, input_shapes, input_values,
                debug, dense_weights, as_json):
    """Compile a (QDQ) ONNX MODEL for a target into an artifact directory OUT."""
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.compile.input_shapes import parse_input_shapes, parse_input_values

    cfg = CompileConfig(
        target=target, int8=not no_int8, tuning_log=tuning_log, use_tuning=not no_tuning, explain=explain,
        dims=_parse_dims(dims), input_shapes=parse_input_shapes(" ".join(input_shapes)),
        input_values=parse_input_values(input_values), debug=debug,
        dense_weights=dense_weights,
    )
    result = compile_model(model, out, cfg, force=force)
    click.echo(result.to_json() if as_json else result.summary())


# ----------------------------------------------------------------------------- verify
@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--onnx", "onnx_path", required=True, type=click.Path(), help="The ONNX model the artifact was compiled from.")
@click.option("--inputs", type=click.Path(), default=None, help=".npz of inputs by name, or .npy for a one-input model (default: seeded random).")
@click.option("--runs", default=1, show_default=True, help="Number of random input sets.")
@click.option("--seed", default=0, show_default=True)
@click.option("--tol-steps", default=1.0, show_default=True, help="Tolerance in quantization steps for quantized outputs.")
@click.option("--rtol", default=None, type=float, help="Tolerance for plain float outputs, relative to max |reference| (default 1e-3).")
@click.option("--dim", "dims", multiple=True, help="Fix a symbolic dim, e.g. --dim T=200 (default: 64).")
@click.option("--ort-opt", type=click.Choice(["disable", "basic", "extended", "all"]), default="disable", show_default=True,
              help="ONNX Runtime graph optimization level of the reference.")
@click.option("--accept-ties", is_flag=True,
              help="Pass when every output beyond tolerance comes from a rounding tie (found by localization).")
@click.option("--no-localize", is_flag=True, help="On failure, do not search for the first differing quantized tensor.")
@click.option("--json", "as_json", is_flag=True)
def verify(artifact, onnx_path, inputs, runs, seed, tol_steps, rtol, dims, ort_opt, accept_ties, no_localize, as_json):
    """Run ARTIFACT and ONNX Runtime on the same inputs; exit 1 if they differ beyond tolerance."""
    from nativeq.verify import VerifyConfig, verify_artifact

    cfg = VerifyConfig(
        runs=runs, seed=seed, tol_steps=tol_steps, rtol=rtol, dims=_parse_dims(dims), ort_opt=ort_opt, inputs=inputs,
        localize=not no_localize, accept_ties=accept_ties,
    )
    report = verify_artifact(artifact, onnx_path, cfg)
    click.echo(report.to_json() if as_json else report.table())
    report.raise_if_failed()


# ----------------------------------------------------------------------------- run / profile
_INPUTS_HELP = ".npz of inputs by name, or .npy for a one-input model."
_DIM_HELP = "Run on seeded random inputs of the declared shapes, this symbolic size fixed, e.g. --dim T=200."
_RANDOM_HELP = "Seeded random inputs (for a model without symbolic sizes; implied by --dim)."


def _artifact_inputs(command):
    """The options `run` and `profile` share: ARTIFACT and where its inputs come from."""
    for option in reversed([
        click.argument("artifact", type=click.Path()),
        click.option("--inputs", type=click.Path(), default=None, help=_INPUTS_HELP),
        click.option("--dim", "dims", multiple=True, help=_DIM_HELP),
        click.option("--random", "random_inputs", is_flag=True, help=_RANDOM_HELP),
        click.option("--seed", default=0, show_default=True, help="Seed of the random inputs."),
    ]):
        command = option(command)
    return command


@main.command("run")
@_artifact_inputs
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None, help="Write the outputs by name to OUT.npz.")
@click.option("--threads", type=int, default=None, help="TVM worker threads (default: TVM's, the physical cores).")
@click.option("--json", "as_json", is_flag=True)
def run_cmd(artifact, inputs, dims, random_inputs, seed, out, threads, as_json):
    """Run ARTIFACT once on the given inputs (aarch64 ones under qemu); summarize or save the outputs."""
    from nativeq.runtime.profile import RunConfig, run_artifact

    cfg = RunConfig(inputs=inputs, dims=_parse_dims(dims), random=random_inputs, seed=seed, out=out, threads=threads)
    result = run_artifact(artifact, cfg)
    click.echo(result.to_json() if as_json else result.summary())


@main.command("profile")
@_artifact_inputs
@click.option("--runs", default=10, show_default=True, help="Timed inferences after one warm-up.")
@click.option("--threads", type=int, default=None, help="TVM worker threads (default: TVM's, the physical cores).")
@click.option("--top", default=20, show_default=True, help="Show the N slowest kernels (0: all).")
@click.option("--emulate", is_flag=True, help="An aarch64 artifact: count each kernel's instructions per inference "
                                              "under qemu instead of timing (--runs: the extra inferences counted).")
@click.option("--json", "as_json", is_flag=True, help="Every kernel, as JSON.")
def profile_cmd(artifact, inputs, dims, random_inputs, seed, runs, threads, top, emulate, as_json):
    """Time each kernel of ARTIFACT per inference, with its kind, schedule and share of the MACs."""
    from nativeq.runtime.profile import ProfileConfig, profile_artifact

    cfg = ProfileConfig(inputs=inputs, dims=_parse_dims(dims), random=random_inputs, seed=seed, runs=runs,
                        threads=threads, emulate=emulate)
    result = profile_artifact(artifact, cfg)
    click.echo(result.to_json() if as_json else result.table(top))


# ---------------------------------------------------------------- more commands below
# (each: parse options, build one config, call one library function)


# ----------------------------------------------------------------------------- speech data, training (models/)
@main.group()
def data():
    """Speech corpora: synthesize one from offline TTS engines."""


@data.command("synth")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output data directory.")
@click.option("--train", "n_train", default=6000, show_default=True, help="Train utterances (espeak-ng + flite voices).")
@click.option("--dev", "n_dev", default=300, show_default=True, help="Dev utterances (held-out espeak-ng voices).")
@click.option("--test", "n_test", default=300, show_default=True, help="Test utterances (other held-out espeak-ng voices).")
@click.option("--other", "n_other", default=300, show_default=True, help="'other' split: festival voices, an engine not in train.")
@click.option("--seed", default=0, show_default=True)
@click.option("--jobs", "-j", default=2, show_default=True, help="Parallel synthesis processes.")
@click.option("--engines", default="espeak-ng,flite,festival", show_default=True,
              help="TTS engines, comma-separated: espeak-ng, flite, festival, kokoro (neural; needs the 'tts' extra).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def data_synth(out, n_train, n_dev, n_test, n_other, seed, jobs, engines, force):
    """Synthesize a reproducible speech corpus with manifests <split>.tsv into OUT."""
    from nativeq.models.data import SynthConfig, synthesize_corpus

    cfg = SynthConfig(train=n_train, dev=n_dev, test=n_test, other=n_other, seed=seed, jobs=jobs,
                      engines=tuple(e.strip() for e in engines.split(",") if e.strip()))
    for split, (n, hours) in synthesize_corpus(out, cfg, force=force).items():
        click.echo(f"{split}: {n} utterances, {hours:.2f} h -> {out}/{split}.tsv")


@data.command("merge")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output data directory.")
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def data_merge(out, sources, force):
    """Merge corpora into OUT: each split is the union of the sources' (audio stays in place)."""
    from nativeq.models.data import merge_corpora

    for split, n in merge_corpora(out, list(sources), force=force).items():
        click.echo(f"{split}: {n} utterances -> {out}/{split}.tsv")


@data.command("human")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Data directory to add the split to.")
@click.option("--split", default="eval-human", show_default=True, help="Name of the manifest to write.")
def data_human(data_dir, split):
    """Add a split of recorded human speech from Debian packages (evaluation only, never training)."""
    from nativeq.models.data import build_human_eval

    n, hours = build_human_eval(data_dir, split)
    click.echo(f"{split}: {n} recorded utterances, {hours * 60:.1f} min -> {data_dir}/{split}.tsv")


@main.command()
@click.option("--model", "model_name", default="conformer-tiny", show_default=True, help="Model preset.")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Data directory with train.tsv and dev.tsv.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Run directory.")
@click.option("--epochs", default=20, show_default=True)
@click.option("--steps", default=0, show_default=True, help="Total optimizer steps (overrides --epochs when > 0).")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", default=1.5e-3, show_default=True, help="Peak learning rate (AdamW, warmup + cosine).")
@click.option("--warmup", default=500, show_default=True, help="Warmup steps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch threads per process.")
@click.option("--chunk-size", default=-1, show_default=True, help="Streaming attention chunk in 40 ms frames (0 = full context; -1 = preset).")
@click.option("--no-spec-augment", is_flag=True)
@click.option("--vtlp", default=0.0, show_default=True,
              help="Vocal-tract-length perturbation: warp the mel filters by a factor in [1-V, 1+V] per utterance (e.g. 0.1).")
@click.option("--skip-bad", is_flag=True, help="Skip missing/corrupt WAVs (with a warning) instead of failing.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
@click.option("--init", "init", default="", metavar="RUN|NAME",
              help="Start from these weights (a run directory or a shipped model, e.g. conformer-tiny) with a fresh optimizer and schedule.")
@click.option("--stop-after-epoch", default=0, show_default=True,
              help="End after this epoch (checkpointed; continue with --resume). 0 = run the schedule out.")
@click.option("--keep-epochs", default=0, show_default=True, help="Keep the last K epochs' weights in OUT/epochs/ (for `nativeq average`).")
def train(model_name, data_dir, out, epochs, steps, batch_size, lr, warmup, seed, threads, chunk_size, no_spec_augment,
          vtlp, skip_bad, resume, init, stop_after_epoch, keep_epochs):
    """Train a Conformer-CTC recognizer (DDP when launched with torchrun)."""
    from nativeq.models.train import TrainConfig, train as train_model

    cfg = TrainConfig(model=model_name, data=data_dir, out=out, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr,
                      warmup_steps=warmup, seed=seed, threads=threads, chunk_size=chunk_size,
                      spec_augment=not no_spec_augment, vtlp=vtlp, skip_bad=skip_bad, resume=resume, init=init,
                      stop_after_epoch=stop_after_epoch, keep_epochs=keep_epochs)
    metrics = train_model(cfg)
    click.echo(f"done: dev WER {metrics.get('wer', float('nan')):.4f} CER {metrics.get('cer', float('nan')):.4f} -> {out}")


@main.command("eval")
@click.argument("run_or_name")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Data directory with <split>.tsv.")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", default=0, show_default=True, help="Only the first N utterances (0 = all).")
@click.option("--threads", default=1, show_default=True)
@click.option("--skip-bad", is_flag=True, help="Skip missing/corrupt WAVs instead of failing.")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(run_or_name, data_dir, split, limit, threads, skip_bad, as_json):
    """WER/CER of a run directory or shipped model (e.g. conformer-tiny) on one split.

    RUN_OR_NAME `pocketsphinx` scores that offline baseline recognizer the same way."""
    from nativeq.models.evaluate import EvalConfig, evaluate_run

    result = evaluate_run(EvalConfig(model=run_or_name, data=data_dir, split=split, threads=threads, skip_bad=skip_bad,
                                     limit=limit))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{run_or_name} on {data_dir}/{split}.tsv")
    for col in ("split", "utterances", "hours", "WER", "CER"):
        table.add_column(col, justify="right")
    table.add_row(split, str(result["utterances"]), f"{result['hours']:.2f}", f"{100 * result['wer']:.2f}%",
                  f"{100 * result['cer']:.2f}%")
    Console().print(table)


@main.command("export-float")
@click.argument("run_or_name")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output .onnx file.")
@click.option("--opset", default=17, show_default=True)
def export_float_cmd(run_or_name, out, opset):
    """Export the float encoder (input feats [B,T,80], output logits) to ONNX, checked against PyTorch in ORT."""
    from nativeq.export.float_onnx import FloatExportConfig, export_float

    result = export_float(run_or_name, out, FloatExportConfig(opset=opset))
    click.echo(f"wrote {result['path']} (opset {result['opset']}; ORT vs PyTorch max |diff| "
               f"{result['max_abs_diff']:.2e} at T={result['lengths']})")


# ----------------------------------------------------------------------------- bundle
@main.command()
@click.argument("artifact", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output FILE.tar.gz to copy to the device.")
@click.option("--no-cpp-runner", is_flag=True, help="Leave out the C++ runner and the TVM runtime libraries.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (archive and its members) as JSON.")
def bundle(artifact, out, no_cpp_runner, force, as_json):
    """Pack ARTIFACT with runners and a README into one .tar.gz for the device."""
    from nativeq.runtime.bundle import BundleConfig, bundle_artifact

    result = bundle_artifact(artifact, out, BundleConfig(cpp_runner=not no_cpp_runner, force=force))
    if as_json:
        _echo_json({"path": str(result.path), "name": result.name, "bytes": result.path.stat().st_size,
                    "members": [{"path": name, "bytes": size} for name, size in result.members]})
    else:
        click.echo(result.summary())


# ----------------------------------------------------------------------------- finetune / export (QAT)
@main.command()
@click.argument("source")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Corpus directory (train.tsv, dev.tsv).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Run directory to write.")
@click.option("--weight-bits", default=8, show_default=True, type=int, help="Weight bits (8, 4 or 2).")
@click.option("--act-bits", default=8, show_default=True, type=int, help="Activation bits (8).")
@click.option("--act-scale", type=click.Choice(["ema", "lsq"]), default="ema", show_default=True,
              help="Activation scales: EMA of the absmax, or learned (LSQ).")
@click.option("--mixed", is_flag=True, help="Keep the subsampling convs and the output head at 8 bits.")
@click.option("--sparsity", default=None,
              help="2:4, 1:4 (N:M), 0.5 (unstructured), 1x4:0.5 / 4x1:0.5 (blocks), 16x4b:0.5 (balanced blocks: "
                   "every band of 16 outputs keeps the same number of 16x4 blocks).")
@click.option("--steps", default=0, show_default=True, help="Optimizer steps (0 = --epochs passes).")
@click.option("--epochs", default=1, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", default=3e-4, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
@click.option("--ptq", is_flag=True, help="Post-training quantization only: calibrate the scales, no training.")
@click.option("--float-scales", is_flag=True,
              help="Arbitrary float scales instead of powers of two (finer range; the QDQ export is then exact only up to float rounding).")
@click.option("--distill", default=0.0, show_default=True,
              help="Weight of a frame-level KL loss to the float SOURCE model (knowledge distillation; 0 = CTC only).")
@click.option("--keep-epochs", default=0, show_default=True, help="Keep the last K epochs' weights in OUT/epochs/ (for `nativeq average`).")
def finetune(source, data_dir, out, weight_bits, act_bits, act_scale, mixed, sparsity, steps, epochs, batch_size, lr,
             threads, seed, resume, ptq, float_scales, distill, keep_epochs):
    """Quantization- (and sparsity-) aware fine-tuning of SOURCE (a run directory or shipped model) with integer ops."""
    from nativeq.qat.finetune import FinetuneConfig, finetune as run_finetune

    cfg = FinetuneConfig(source=source, data=data_dir, out=out, weight_bits=weight_bits, act_bits=act_bits,
                         act_scale=act_scale, mixed=mixed, sparsity=sparsity, steps=steps, epochs=epochs,
                         batch_size=batch_size, lr=lr, threads=threads, seed=seed, resume=resume, calibrate_only=ptq,
                         power_of_two_scales=not float_scales and act_scale != "lsq", distill=distill,
                         keep_epochs=keep_epochs)
    metrics = run_finetune(cfg)
    sparse = metrics.get("sparsity")
    click.echo(f"wrote {out}: dev WER {metrics.get('wer', float('nan')):.3f} CER {metrics.get('cer', float('nan')):.3f}"
               + (f"; sparsity {sparse['pattern']}: {sparse['zeros']:.1%} zeros, {sparse['violations']} pattern violations"
                  if sparse else ""))


@main.command()
@click.argument("run")
@click.option("-o", "--out", required=True, type=click.Path(), help="Run directory to write (the averaged model).")
@click.option("--last", default=5, show_default=True, help="Average the newest K epoch snapshots.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def average(run, out, last, force):
    """Average the last K epoch snapshots of RUN (kept with --keep-epochs) into a new run directory."""
    from nativeq.models.average import AverageConfig, average_run

    result = average_run(AverageConfig(run=run, out=out, last=last, force=force))
    click.echo(f"wrote {result['out']}: mean of epochs {result['epochs'][0]}-{result['epochs'][-1]} "
               f"(steps {result['steps'][0]}-{result['steps'][-1]})")


@main.command("export")
@click.argument("run")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output QDQ .onnx file.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (file, size, weight bits, lint) as JSON.")
def export_cmd(run, out, force, as_json):
    """Export a finetune RUN as QDQ ONNX (INT8/INT4 weights, int8 activations, symbolic time axis)."""
    from nativeq.qat.finetune import ExportRunConfig, export_run

    result = export_run(ExportRunConfig(run=run, out=out, force=force))
    if as_json:
        _echo_json(result)
        return
    lint = "clean" if not result["lint"] else f"{len(result['lint'])} float product operand(s)"
    click.echo(f"wrote {result['path']} ({result['bytes'] / 1e6:.2f} MB, weights {result['weight_bits']}-bit, "
               f"sparsity {result['sparsity']}; QDQ lint: {lint})")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--target", "-t", default="host", show_default=True, help="Target to compile for (must run on this machine).")
@click.option("--artifact", type=click.Path(), default=None, help="Time this compiled artifact instead of compiling MODEL.")
@click.option("--float-onnx", type=click.Path(), default=None, help="The float model, timed in ORT too.")
@click.option("--dim", "dims", multiple=True, help="Fix a symbolic dim, e.g. --dim T=200 (default: 64).")
@click.option("--threads", default=2, show_default=True, help="Threads for every engine.")
@click.option("--warmup", default=3, show_default=True)
@click.option("--repeat", default=20, show_default=True, help="Turns per engine, interleaved.")
@click.option("--burst", default=1, show_default=True,
              help="Timed runs per turn: 1 times every run right after another engine's; N > 1 reports runs 2..N (steady).")
@click.option("--emulate", is_flag=True,
              help="Count aarch64 instructions per inference under qemu instead of timing: rpi4/rpi5 int8 and float builds "
                   "(or --artifact), next to ONNX Runtime's aarch64 build on the same emulated CPU.")
@click.option("--no-ort", is_flag=True, help="With --emulate: count only nativeq's builds, not ONNX Runtime aarch64.")
@click.option("--json", "as_json", is_flag=True)
def bench(model, target, artifact, float_onnx, dims, threads, warmup, repeat, burst, emulate, no_ort, as_json):
    """Latency of the compiled MODEL next to ONNX Runtime (QDQ and float), side by side in one run."""
    from nativeq.verify.bench import BenchConfig, bench_model

    cfg = BenchConfig(target=target, artifact=artifact, float_onnx=float_onnx, dims=_parse_dims(dims), threads=threads,
                      warmup=warmup, repeat=repeat, burst=burst, emulate=emulate, ort=not no_ort)
    report = bench_model(model, cfg)
    click.echo(report.to_json() if as_json else report.table())


# ----------------------------------------------------------------------------- bench-emulated
@main.command("bench-emulated")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@click.option("--dim", "dims", multiple=True, help="Fix a symbolic dim, e.g. --dim T=200 (default: 64).")
@click.option("--repeat", default=5, show_default=True, help="Inferences counted per artifact (mean).")
@click.option("--cpu", default=None, help="qemu CPU model for every artifact (default: each target's own).")
@click.option("--json", "as_json", is_flag=True)
def bench_emulated_cmd(artifacts, dims, repeat, cpu, as_json):
    """aarch64 instructions per inference of ARTIFACTS under qemu (e.g. rpi4, rpi5 and float builds)."""
    from nativeq.runtime.insn_bench import InsnBenchConfig, bench_emulated

    result = bench_emulated(artifacts, InsnBenchConfig(dims=_parse_dims(dims), repeat=repeat, cpu=cpu))
    click.echo(result.to_json() if as_json else result.table())


# ----------------------------------------------------------------------------- tune
@main.command()
@click.argument("model", required=False, type=click.Path())
@click.option("--target", "-t", "target", default=None, help="Target name (see `nativeq targets`).")
@click.option("--trials", default=64, show_default=True, help="Trial budget for the model, split across its tasks.")
@click.option("--work-dir", type=click.Path(), default=None, help="Database directory (default: ./tuning_logs/<target>/ in the current directory).")
@click.option("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker to measure on its devices.")
@click.option("--rpc-key", default=None, help="Device key the RPC servers registered at the tracker.")
@click.option("--rpc", "rpc_server", default=None, help="HOST:PORT of one TVM RPC server (no tracker).")
@click.option("--rpc-workers", default=1, show_default=True, help="Measurements in flight (servers under the key share them).")
@click.option("--rpc-timeout", default=60.0, show_default=True, help="Seconds one remote measurement may take.")
@click.option("--trials-per-iter", default=32, show_default=True, help="Candidates measured (and saved) per search round.")
@click.option("--no-int8", is_flag=True, help="Tune TVM's float QDQ path (as compile --no-int8).")
@click.option("--dim", "dims", multiple=True,
              help="Tune a symbolic size at this value, e.g. --dim T=300 (the length you deploy; default 256, batch 1).")
@click.option("--input-shapes", multiple=True,
              help='Input shapes, as compile takes them (e.g. "feats:[1,T,80]"): tune the kernels compile makes.')
@click.option("--input-value", "input_values", multiple=True,
              help="Fix an input's value, as compile takes it (e.g. --input-value sr=16000).")
@click.option("--threads", type=int, default=None,
              help="Threads a local measurement uses (default: the target's cores, as deployed).")
@click.option("--quiet", is_flag=True, help="No progress display (as `nativeq -q tune`, but warnings still shown).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (tasks, trials, best latencies) as JSON.")
@click.option("--status", is_flag=True, help="Show what is tuned for which target/model (under --work-dir, else ./tuning_logs/ and the shipped databases).")
def tune(model, target, trials, work_dir, rpc_tracker, rpc_key, rpc_server, rpc_workers, rpc_timeout, trials_per_iter,
         no_int8, dims, input_shapes, input_values, threads, quiet, as_json, status):
    """MetaSchedule-tune MODEL's int8 kernels for TARGET; `compile` then applies tuning_logs/<target>/ automatically."""
    if status:
        from nativeq.tuning import tuning_status

        status_text = tuning_status(work_dir)
        click.echo(json.dumps({"status": status_text.splitlines()}, indent=2) if as_json else status_text)
        return
    if model is None or target is None:
        raise NativeqError("tune needs MODEL and --target (or --status)")
    from nativeq.compile.input_shapes import parse_input_shapes, parse_input_values
    from nativeq.tuning import TuneConfig, tune_model

    cfg = TuneConfig(target=target, trials=trials, work_dir=work_dir, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                     rpc=rpc_server, rpc_workers=rpc_workers, rpc_timeout=rpc_timeout,
                     trials_per_iter=trials_per_iter, int8=not no_int8, dims=_parse_dims(dims),
                     input_shapes=parse_input_shapes(" ".join(input_shapes)),
                     input_values=parse_input_values(input_values), threads=threads, progress=not quiet)
    result = tune_model(model, cfg)
    if as_json:
        import dataclasses

        _echo_json(dataclasses.asdict(result))
    else:
        click.echo(result.summary())



# ----------------------------------------------------------------------------- setup-arm
@main.command("setup-arm")
@click.option("--force", is_flag=True, help="Download and build again even if the installed versions are there.")
def setup_arm_cmd(force):
    """Fetch the aarch64 TVM runtime and build the aarch64 runner, for the Raspberry Pi targets (runs under qemu here)."""
    from nativeq.runtime.setup_arm import setup_arm

    setup_arm(force=force, echo=click.echo)


# ----------------------------------------------------------------------------- demo
@main.command()
@click.option("--out", "-o", default="demo-out", show_default=True, type=click.Path(), help="Output directory.")
@click.option("--quick", is_flag=True, help="A ≤3-minute version: tiny data, few steps (every stage still runs).")
@click.option("--targets", default="host,rpi5", show_default=True, help="Comma-separated targets to compile and verify.")
@click.option("--variants", default="", help="Comma-separated QAT variants (default: int8,int4-2to4; int8 with --quick).")
@click.option("--model", default="conformer-tiny", show_default=True, help="Shipped model name or float run directory.")
@click.option("--data", default=None, type=click.Path(), help="Speech data dir (default: synthesize a small set).")
@click.option("--threads", default=2, show_default=True, help="Threads for PyTorch, TVM and ONNX Runtime.")
@click.option("--force", is_flag=True, help="Replace OUT even if it is not a previous demo output.")
def demo(out, quick, targets, variants, model, data, threads, force):
    """The whole flow on the shipped model: WER, QAT, export, compile, verify, bench, OUT/report.md."""
    from nativeq.demo import DemoConfig, run_demo

    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip())  # noqa: E731
    cfg = DemoConfig(out=out, model=model, data=data, targets=split(targets), variants=split(variants), quick=quick,
                     threads=threads, force=force)
    run_demo(cfg, echo=click.echo)


# ----------------------------------------------------------------------------- transcribe
@main.command()
@click.argument("artifact", type=click.Path())
@click.argument("wavs", nargs=-1, required=True, type=click.Path())
@click.option("--threads", default=1, show_default=True, help="Inference threads.")
@click.option("--json", "as_json", is_flag=True, help="Print [{path, text}, ...] as JSON.")
def transcribe(artifact, wavs, threads, as_json):
    """Transcribe WAV files with a compiled speech artifact (aarch64 ones run under qemu); prints path<TAB>text."""
    from nativeq.demo.transcribe import TranscribeConfig, transcribe as run_transcribe

    results = run_transcribe(TranscribeConfig(artifact=artifact, wavs=tuple(wavs), threads=threads))
    if as_json:
        _echo_json([{"path": str(path), "text": text} for path, text in results])
        return
    for path, text in results:
        click.echo(f"{path}\t{text}")


if __name__ == "__main__":
    main()
