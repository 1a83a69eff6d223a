"""What nativeq says where: `-q` leaves only the result, TVM's C++ log lines show with `-v` only, a crash
message or Python warning from inside TVM is never hidden, and `--json` is one JSON document on stdout."""

import json
import subprocess
import sys
import wave

import numpy as np
import onnx
import pytest

import qdq_models


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("logging") / "m.onnx"
    onnx.save(qdq_models.qdq_matmul(k=16, n=8), path)
    return path


def test_quiet_compile_prints_only_the_result(nativeq_cli, tiny_onnx, tmp_path):
    proc = nativeq_cli("-q", "compile", tiny_onnx, "-t", "host", "-o", tmp_path / "a", "--no-tuning")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("compiled ")


def test_verbose_and_quiet_exclude_each_other(nativeq_cli):
    proc = nativeq_cli("-v", "-q", "targets")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "exclude each other" in proc.stderr


# A C++-level write to fd 2 inside the held region, as libtvm's LOG(WARNING) does it; a plain line
# (a crash message) and a Python warning beside it.
HELD = r"""
import ctypes, sys, warnings
from nativeq import _log
_log.set_verbosity(int(sys.argv[1]))
warnings.formatwarning = lambda m, *a, **k: f"warning: {m}\n"
libc = ctypes.CDLL(None)
with _log.held_native_output():
    line = b"[18:07:05] /project/src/relax/ir/block_builder.cc:65: Warning: BlockBuilder destroyed\n"
    libc.write(2, line, len(line))
    libc.write(2, b"terminate called after throwing\n", 32)
    warnings.warn("python warning inside")
    print("printed on stdout")
print("after")
"""


def _held(level):
    return subprocess.run([sys.executable, "-c", HELD, str(level)], capture_output=True, text=True, check=True)


def test_tvm_cpp_log_lines_hidden_by_default_shown_with_verbose():
    from nativeq import _log

    default = _held(_log.NORMAL)
    assert "BlockBuilder destroyed" not in default.stderr
    assert "terminate called after throwing" in default.stderr
    assert "warning: python warning inside" in default.stderr
    assert default.stdout.splitlines() == ["printed on stdout", "after"]

    verbose = _held(_log.VERBOSE)
    assert "[18:07:05] /project/src/relax/ir/block_builder.cc:65: Warning: BlockBuilder destroyed" in verbose.stderr
    assert "terminate called after throwing" in verbose.stderr

    quiet = _held(_log.QUIET)
    assert "BlockBuilder destroyed" not in quiet.stderr and "python warning" not in quiet.stderr
    assert "terminate called after throwing" in quiet.stderr


def test_held_output_is_dropped_after_a_failure():
    from nativeq import _log

    code = ("from nativeq import _log\n"
            "with _log.held_native_output() as held:\n"
            "    print('failing operator dump')\n"
            "    held.failed = True\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout == "" and proc.stderr == ""
    assert _log.TVM_LOG_LINE.match("[01:02:03] /a/b.cc:1: Warning: x")
    assert not _log.TVM_LOG_LINE.match("[01:02:03] /a/b.cc:1: Error: x")


# ----------------------------------------------------------------------------- --json
def test_bundle_json(nativeq_cli, matmul_artifact, tmp_path):
    proc = nativeq_cli("-q", "bundle", matmul_artifact[1], "-o", tmp_path / "b.tar.gz", "--no-cpp-runner", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["path"].endswith("b.tar.gz") and data["bytes"] > 0
    assert any(m["path"].endswith("model.so") for m in data["members"])


def test_tune_status_json(nativeq_cli, tmp_path):
    proc = nativeq_cli("tune", "--status", "--work-dir", tmp_path / "none", "--json")
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout)["status"], list)


def test_export_json_error_is_one_line(nativeq_cli, tmp_path):
    proc = nativeq_cli("export", tmp_path / "no-run", "-o", tmp_path / "q.onnx", "--json")
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_transcribe_json(nativeq_cli, speech_artifact, tmp_path):
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(16000) * 0.05) * 8000).astype("<i2").tobytes())
    proc = nativeq_cli("transcribe", speech_artifact, path, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [d["path"] for d in data] == [str(path)] and isinstance(data[0]["text"], str)


def test_real_tvm_warning_shows_with_verbose_only(nativeq_cli, tmp_path):
    """A failed import leaves a half-built block builder; TVM's C++ destructor warns about it on fd 2."""
    model = qdq_models.qlinear_conv(c_in=4, c_out=6, kernel=(3,), spatial=(12,))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5  # 5 channels into a 4-channel conv
    onnx.save(model, tmp_path / "channels.onnx")
    verbose = nativeq_cli("-v", "compile", "channels.onnx", "--target", "host", "-o", "out")
    assert verbose.returncode == 2 and "Warning: BlockBuilder destroyed" in verbose.stderr, verbose.stderr
    default = nativeq_cli("compile", "channels.onnx", "--target", "host", "-o", "out")
    assert default.returncode == 2 and "BlockBuilder" not in default.stderr, default.stderr
    assert default.stderr.count("\n") == 1


def test_progress_bar_off_the_terminal_only_iterates(capfd):
    from nativeq._log import Bar, Stages

    bar = Bar(range(4), desc="epoch 1/1")
    assert [i for i in bar if not bar.set_postfix(loss=i)] == [0, 1, 2, 3]
    with Stages("compile").stage("import"):
        pass
    assert capfd.readouterr().err == ""
