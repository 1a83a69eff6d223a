"""Tuning on "attached hardware" over TVM RPC, for real on loopback: tracker + servers on 127.0.0.1.

The processes get free ports and bounded waits and are always killed in teardown.
"""

import os
import socket
import subprocess
import sys
import time

import onnx
import pytest
import qdq_models

from nativeq.errors import NativeqError
from nativeq.tuning import TuneConfig, tune_model
from nativeq.tuning import database as dbfiles

KEY = "loopback"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"port {port} not listening after {timeout} s")


class Loopback:
    """A tracker and N servers registered under KEY, logs in `log_dir`."""

    def __init__(self, log_dir, servers: int):
        self.procs, self.logs = [], []
        self.port = _free_port()
        self._start(["-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                     "--port-end", str(self.port + 1)], log_dir / "tracker.log")
        _wait_port(self.port, self.procs[0])
        for i in range(servers):
            server_port = _free_port()
            self._start(["-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port),
                         "--port-end", str(server_port + 1), "--tracker", f"127.0.0.1:{self.port}", "--key", KEY],
                        log_dir / f"server{i}.log")
        self._wait_registered(servers)

    def _start(self, args, log):
        handle = open(log, "wb")
        env = dict(os.environ, TVM_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.procs.append(subprocess.Popen([sys.executable, *args], stdout=handle, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))
        self.logs.append(log)

    def _wait_registered(self, n: int, timeout: float = 60.0) -> None:
        from nativeq.tuning.rpc import RemoteSpec, count_servers

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if count_servers(RemoteSpec("127.0.0.1", self.port, KEY)) >= n:
                    return
            except Exception:  # noqa: BLE001  (tracker still starting)
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{n} RPC servers did not register in {timeout} s")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
        for p in self.procs:
            p.wait(timeout=10)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "mm.onnx"
    onnx.save(qdq_models.qdq_matmul(k=64, n=128, t=16, act_dtype="uint8"), path)  # 9 tiles to measure
    return path


@pytest.fixture
def loopback(tmp_path):
    servers = []

    def start(n):
        lb = Loopback(tmp_path, n)
        servers.append(lb)
        return lb

    yield start
    for lb in servers:
        lb.close()


def test_tune_over_tracker_then_compile_verifies(model, loopback, tmp_path):
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.verify import VerifyConfig, verify_artifact

    lb = loopback(1)
    db = tmp_path / "db"
    result = tune_model(model, TuneConfig(target="host", trials=3, min_trials_per_task=3, trials_per_iter=3,
                                          work_dir=str(db), rpc_tracker=f"127.0.0.1:{lb.port}", rpc_key=KEY,
                                          rpc_timeout=120, progress=False))
    assert [t.new_trials for t in result.tasks] == [3]
    assert result.tasks[0].best_us is not None, "no candidate ran on the RPC server"
    assert b"connected from" in lb.logs[1].read_bytes()
    compile_model(model, tmp_path / "art", CompileConfig(target="host", tuning_log=str(db)))
    report = verify_artifact(tmp_path / "art", model, VerifyConfig(runs=1))
    assert report.passed, report.table()


@pytest.mark.slow  # ~60 s; one server over the tracker runs in the default suite
def test_two_servers_share_the_measurements(model, loopback, tmp_path):
    lb = loopback(2)
    result = tune_model(model, TuneConfig(target="host", trials=6, min_trials_per_task=6, trials_per_iter=6,
                                          work_dir=str(tmp_path / "db"), rpc_tracker=f"127.0.0.1:{lb.port}",
                                          rpc_key=KEY, rpc_workers=2, rpc_timeout=120, progress=False))
    assert [t.new_trials for t in result.tasks] == [6]
    served = [log.read_bytes().count(b"connected from") for log in lb.logs[1:]]
    assert all(n >= 1 for n in served), served


def test_unreachable_tracker_is_a_quick_one_line_error_and_keeps_records(model, tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    (db / dbfiles.WORKLOAD_FILE).write_text('["1", "x"]\n')
    (db / dbfiles.RECORD_FILE).write_text("")
    before = {f: (db / f).read_bytes() for f in dbfiles.DATABASE_FILES}
    started = time.time()
    with pytest.raises(NativeqError) as err:
        tune_model(model, TuneConfig(target="host", work_dir=str(db), rpc_tracker=f"127.0.0.1:{_free_port()}",
                                     rpc_key=KEY, progress=False))
    assert time.time() - started < 30
    assert "cannot reach RPC tracker 127.0.0.1:" in str(err.value) and "\n" not in str(err.value)
    assert {f: (db / f).read_bytes() for f in dbfiles.DATABASE_FILES} == before


def test_tracker_without_server_for_key_is_an_error(model, loopback, tmp_path):
    lb = loopback(0)
    with pytest.raises(NativeqError, match="no RPC server is registered under key 'other'"):
        tune_model(model, TuneConfig(target="host", work_dir=str(tmp_path / "db"), rpc_tracker=f"127.0.0.1:{lb.port}",
                                     rpc_key="other", progress=False))


def test_cli_unreachable_server(nativeq_cli, model):
    result = nativeq_cli("tune", model, "--target", "host", "--rpc", f"127.0.0.1:{_free_port()}", timeout=120)
    assert result.returncode != 0
    assert result.stderr.startswith("error: cannot reach RPC server 127.0.0.1:"), result.stderr
    assert "Traceback" not in result.stderr


def test_tune_on_an_aarch64_server_under_qemu_then_compile_verifies(model, tmp_path):
    """A stand-in Raspberry Pi 5: nativeq's Python-free RPC server, cross-compiled for aarch64 and
    running under qemu-aarch64 (-cpu cortex-a76). `tune --target rpi5 --rpc` measures cross-compiled
    candidates on it; the rpi5 artifact compiled with that database verifies against ORT under qemu."""
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.runtime import emulate
    from nativeq.targets import get_target
    from nativeq.verify import VerifyConfig, verify_artifact

    target = get_target("rpi5")
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(emulate.rpc_server_command(port, tmp_path / "work", cpu=target.qemu_cpu), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(port, proc, timeout=120)
        db = tmp_path / "db"
        result = tune_model(model, TuneConfig(target="rpi5", trials=2, min_trials_per_task=2, trials_per_iter=2,
                                              work_dir=str(db), rpc=f"127.0.0.1:{port}", rpc_timeout=300,
                                              progress=False))
        assert [t.new_trials for t in result.tasks] == [2], result.summary()
        assert result.tasks[0].best_us is not None, "no candidate ran on the aarch64 server"
        assert any((tmp_path / "work").glob("session*")), "the server never served a session"
        out = compile_model(model, tmp_path / "art", CompileConfig(target="rpi5", tuning_log=str(db)))
        assert list(out.manifest["tuning"]["applied"]), "the rpi5 build applied no tuned kernel"
        report = verify_artifact(tmp_path / "art", model, VerifyConfig(runs=1))
        assert report.passed, report.table()
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        log.close()
