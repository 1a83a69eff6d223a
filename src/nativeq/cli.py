"""The `nativeq` command line. Thin by design: parse options, build one config, call one
library function. Heavy imports (torch, tvm, onnxruntime) happen inside the commands so
that `nativeq --help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from nativeq.errors import NativeqError


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--targets-file", type=click.Path(dir_okay=False), envvar="NATIVEQ_TARGETS",
              help="JSON file of extra/overriding target entries.")
@click.version_option(package_name="nativeq")
def main(targets_file):
    """nativeq: train, quantize, compile and verify int8 speech models for x86 and Raspberry Pi."""
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


# ----------------------------------------------------------------------------- compile
@main.command("compile")
@click.argument("model", type=click.Path())
@click.option("--target", "-t", "target", required=True, help="Target name (see `nativeq targets`).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output artifact directory.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--explain", is_flag=True, help="Report which matmul/conv sites became int8 and which stayed float, and why.")
@click.option("--no-int8", is_flag=True, help="Skip the int8 lowering (TVM's own float QDQ path).")
@click.option("--tuning-log", type=click.Path(), default=None, help="Tuning database directory (default: tuning_logs/<target>/).")
@click.option("--no-tuning", is_flag=True, help="Do not apply any tuning database.")
def compile_cmd(model, target, out, force, explain, no_int8, tuning_log, no_tuning):
    """Compile a (QDQ) ONNX MODEL for a target into an artifact directory OUT."""
    from nativeq.compile import CompileConfig, compile_model

    cfg = CompileConfig(
        target=target, int8=not no_int8, tuning_log=tuning_log, use_tuning=not no_tuning, explain=explain
    )
    result = compile_model(model, out, cfg, force=force)
    click.echo(result.summary())


# ----------------------------------------------------------------------------- verify
@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--onnx", "onnx_path", required=True, type=click.Path(), help="The ONNX model the artifact was compiled from.")
@click.option("--inputs", type=click.Path(), default=None, help=".npz of inputs by name (default: seeded random).")
@click.option("--runs", default=1, show_default=True, help="Number of random input sets.")
@click.option("--seed", default=0, show_default=True)
@click.option("--tol-steps", default=1.0, show_default=True, help="Tolerance in quantization steps for quantized outputs.")
@click.option("--rtol", default=None, type=float, help="Relative tolerance for plain float outputs (default 1e-3 of the output range).")
@click.option("--dim", "dims", multiple=True, help="Fix a symbolic dim, e.g. --dim T=200 (default: 64).")
@click.option("--ort-opt", type=click.Choice(["disable", "basic", "extended", "all"]), default="disable", show_default=True,
              help="ONNX Runtime graph optimization level of the reference.")
@click.option("--json", "as_json", is_flag=True)
def verify(artifact, onnx_path, inputs, runs, seed, tol_steps, rtol, dims, ort_opt, as_json):
    """Run ARTIFACT and ONNX Runtime on the same inputs; exit 1 if they differ beyond tolerance."""
    from nativeq.verify import VerifyConfig, verify_artifact

    cfg = VerifyConfig(
        runs=runs, seed=seed, tol_steps=tol_steps, rtol=rtol, dims=_parse_dims(dims), ort_opt=ort_opt, inputs=inputs
    )
    report = verify_artifact(artifact, onnx_path, cfg)
    click.echo(report.to_json() if as_json else report.table())
    report.raise_if_failed()


# ---------------------------------------------------------------- more commands below
# (each: parse options, build one config, call one library function)


if __name__ == "__main__":
    main()
