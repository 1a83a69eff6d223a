"""`nativeq tune` survives a task that fails: the failing kernel is skipped with a one-line warning, the
other tasks are tuned, the summary (and `nativeq_tuning.json`) lists what failed, and the command exits 0.
Only a run where every task failed is an error.

The failure is a real one, no mock: a Conv1d without padding (kernel 3) tuned at `--dim T=2` has an
output of length T - 2 = 0, and nativeq's int8 template (`tuning/template.py`) finds no schedule for
that kernel, so MetaSchedule itself stops the task with `Check failed: (!design_spaces.empty())`.
A MatMul on the same input, at T = 2 rows, tunes normally.

Trials are kept tiny (`--trials 2`; a run costs ~40 s of TVM's tensor-intrinsic import once per
process, plus a few seconds of measuring).
"""

import json
import os
import signal
import sys
import time
import warnings

import numpy as np
import onnx
import pytest
import qdq_models
from click.testing import CliRunner
from onnx import TensorProto, helper

from nativeq.tuning import database as dbfiles

TRIALS = 2
DIMS = ("--dim", "T=2")


def _conv_and_matmul(matmul: bool = True) -> onnx.ModelProto:
    """x[1, 32, T] -> Q/DQ -> Conv1d(k=3, no padding) -> Q/DQ -> y_conv[1, 48, T_out]  (T_out = T - 2)
    x[1, 32, T] -> Transpose -> Q/DQ -> MatMul(W[32, 48]) -> Q/DQ -> y_mm[1, T, 48]  (with `matmul`)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    xa = qdq_models._q_dq(nodes, inits, "x", "x", 0.05, "uint8")
    w = qdq_models._weight_dq(nodes, inits, "conv", rng.normal(0, 0.2, (48, 32, 3)).astype(np.float32), axis=0)
    nodes.append(helper.make_node("Conv", [xa, w], ["conv"], name="conv_Conv", kernel_shape=[3], pads=[0, 0]))
    yc = qdq_models._q_dq(nodes, inits, "yc", "conv", 0.1, "uint8")
    nodes.append(helper.make_node("Identity", [yc], ["y_conv"], name="out_conv"))
    outputs = [helper.make_tensor_value_info("y_conv", TensorProto.FLOAT, [1, 48, "T_out"])]
    if matmul:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], name="x_T", perm=[0, 2, 1]))
        xta = qdq_models._q_dq(nodes, inits, "xt", "xt", 0.05, "uint8")
        wm = qdq_models._weight_dq(nodes, inits, "fc", rng.normal(0, 0.2, (32, 48)).astype(np.float32), axis=1)
        nodes.append(helper.make_node("MatMul", [xta, wm], ["mm"], name="fc_MatMul"))
        ym = qdq_models._q_dq(nodes, inits, "ym", "mm", 0.1, "uint8")
        nodes.append(helper.make_node("Identity", [ym], ["y_mm"], name="out_mm"))
        outputs.append(helper.make_tensor_value_info("y_mm", TensorProto.FLOAT, [1, "T", 48]))
    return qdq_models._finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, "T"])],
                              outputs, "conv_no_pad")


def _conv_kernel(model) -> str:
    """The name of the conv's kernel in `model`: the int8 matmul gathering its rows (3 taps of 32 channels) from the
    conv's input."""
    from nativeq.compile._tvm import tirx
    from nativeq.compile.schedules.conv_as_matmul import IM2COL_CHANNELS
    from nativeq.compile.schedules.matmul import is_int8_matmul
    from nativeq.targets import get_target
    from nativeq.tuning.tune import lower_for_tuning

    mod, _ = lower_for_tuning(model, get_target("host"))
    (name,) = [gv.name_hint for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and is_int8_matmul(f) and IM2COL_CHANNELS in f.script()]
    return name


def _run_cli(monkeypatch, *args):
    """`nativeq ARGS` in this process; warnings are printed to its stderr as the command line prints them."""
    from nativeq import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # the CLI replaces it; restored after
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # pytest records warnings instead of printing them; print them as Python does outside pytest
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        return runner.invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def partly_failed(tmp_path_factory):
    """The conv + matmul model tuned at T=2 through the CLI: (result, database dir, the conv kernel's name)."""
    root = tmp_path_factory.mktemp("tune_skip")
    model = root / "conv_mm.onnx"
    onnx.save(_conv_and_matmul(), model)
    with pytest.MonkeyPatch.context() as mp:
        result = _run_cli(mp, "tune", model, "--target", "host", "--trials", TRIALS, "--trials-per-iter", TRIALS,
                          *DIMS, "--work-dir", root / "db", "--quiet")
    return result, root / "db", _conv_kernel(model)


def test_failing_task_is_skipped_and_the_run_exits_0(partly_failed):
    result, _, conv = partly_failed
    assert result.exit_code == 0, (result.stdout, result.stderr)
    warned = [ln for ln in result.stderr.splitlines() if ln.startswith("warning: tuning task")]
    assert len(warned) == 1, result.stderr
    assert conv in warned[0] and "design_spaces.empty()" in warned[0], warned
    # the summary: the matmul tuned, the conv listed as failed with its reason
    assert "tuned 1 task(s), 1 failed" in result.stdout, result.stdout
    failed_lines = [ln for ln in result.stdout.splitlines() if ln.strip().startswith("failed:")]
    assert len(failed_lines) == 1 and conv in failed_lines[0], result.stdout


def test_the_other_task_has_records_and_the_summary_file_lists_the_failed_one(partly_failed):
    from nativeq.tuning import tuning_status

    _, db, conv = partly_failed
    (entry,) = json.loads((db / dbfiles.SUMMARY_FILE).read_text())["models"].values()
    assert list(entry["failed"]) == [conv]
    assert "design_spaces.empty()" in entry["failed"][conv]["reason"]
    assert entry["failed"][conv]["trials"] == 0
    (tuned_name, tuned), = entry["tasks"].items()
    assert tuned_name != conv and "int8_matmul" in tuned_name
    counts = dbfiles.read_database(db).record_counts()
    assert counts[tuned["workload"]] >= TRIALS and tuned["best_us"] > 0
    assert counts.get(entry["failed"][conv]["workload"], 0) == 0
    status = tuning_status(db)
    assert "1 failed" in status and f"{conv}  kernels 1  FAILED" in status, status


def test_every_task_failing_is_a_one_line_error(tmp_path, monkeypatch):
    model = tmp_path / "conv.onnx"
    onnx.save(_conv_and_matmul(matmul=False), model)
    result = _run_cli(monkeypatch, "tune", model, "--target", "host", "--trials", TRIALS, "--trials-per-iter", TRIALS,
                      *DIMS, "--work-dir", tmp_path / "db", "--quiet")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    conv = _conv_kernel(model)
    assert len(errors) == 1 and "every tuning task failed" in errors[0] and conv in errors[0], result.stderr
    assert result.stdout == ""
    # the failure is on record all the same
    (entry,) = json.loads((tmp_path / "db" / dbfiles.SUMMARY_FILE).read_text())["models"].values()
    assert list(entry["failed"]) == [conv] and entry["tasks"] == {}


@pytest.fixture
def ctrl_c_reaches_python():
    """SIGINT handled as Python's default (KeyboardInterrupt) for the test: a test run started as a background job
    without job control inherits SIGINT ignored, and `tune` rightly leaves an ignored SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_still_stops_the_run(tmp_path, monkeypatch, ctrl_c_reaches_python):
    """Ctrl-C is not a task failure: it ends the run (`error: interrupted`, exit 130), also when it lands in a
    Python callback TVM calls from C++ (which hands it back as a RuntimeError with an empty message)."""
    from nativeq.compile._tvm import meta_schedule as ms
    from nativeq.tuning import space

    def ctrl_c(sch):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # Python runs the SIGINT handler here, inside TVM's call of this design-space function
        return [sch]

    monkeypatch.setattr(space, "space_generator", lambda target, int8_template=False: ms.space_generator.ScheduleFn(
        ctrl_c, sch_rules=[], postprocs=[], mutator_probs={}))
    model = tmp_path / "mm.onnx"
    onnx.save(qdq_models.qdq_matmul(k=64, n=32, t=8, act_dtype="uint8"), model)
    result = _run_cli(monkeypatch, "tune", model, "--target", "host", "--trials", TRIALS, "--work-dir", tmp_path / "db",
                      "--quiet")
    assert result.exit_code == 130 and "error: interrupted" in result.stderr, (result.stdout, result.stderr)
    assert "failed, skipped" not in result.stderr
