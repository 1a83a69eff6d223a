"""Where candidates are measured: this machine (local runner) or a device over TVM RPC.

A device farm is the tracker's job: servers register under a key, `--rpc-workers N` keeps N
measurements in flight and the tracker hands each session to a free server of that key.
`--rpc HOST:PORT` talks to one server directly (no tracker). Reachability is checked once,
with a timeout, before any tuning starts, so a dead tracker or server is a one-line error
and the database is left as it was.
"""

from __future__ import annotations

import functools
import socket
import threading
from dataclasses import dataclass

from nativeq.errors import NativeqError

# NOTE: TVM's RPCConfig only knows trackers; a direct server connection reuses its host/port
# fields and marks itself with this key (read back by `connect_direct`).
DIRECT_KEY = "nativeq-direct"


@dataclass(frozen=True)
class RemoteSpec:
    host: str
    port: int
    key: str | None  # None: a server, not a tracker
    workers: int = 1
    timeout: float = 30.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise NativeqError(f"{option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def _with_timeout(fn, timeout: float):
    """fn() in a thread; (value, error) or raises TimeoutError after `timeout` seconds."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except Exception as e:  # noqa: BLE001  (reported by the caller)
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def check_remote(spec: RemoteSpec, connect_timeout: float = 5.0) -> None:
    """Fail with one line if the tracker (and a server under its key) or the server is unreachable."""
    what = "RPC tracker" if spec.key is not None else "RPC server"
    try:
        socket.create_connection((spec.host, spec.port), timeout=connect_timeout).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise NativeqError(f"cannot reach {what} {spec.address}: {reason} (is it running?)") from None
    from nativeq.compile._tvm import rpc

    if spec.key is None:
        try:
            session = _with_timeout(lambda: rpc.connect(spec.host, spec.port, session_timeout=spec.timeout),
                                    connect_timeout * 2)
        except TimeoutError:
            raise NativeqError(f"RPC server {spec.address} accepted a connection but did not answer within "
                               f"{connect_timeout * 2:.0f} s (busy with another session?)") from None
        except Exception as e:  # noqa: BLE001
            raise NativeqError(f"RPC server {spec.address} refused a session: {_first_line(e)}") from None
        del session
        return
    try:
        summary = _with_timeout(lambda: rpc.connect_tracker(spec.host, spec.port).summary(), connect_timeout * 2)
    except TimeoutError:
        raise NativeqError(f"RPC tracker {spec.address} did not answer within {connect_timeout * 2:.0f} s") from None
    except Exception as e:  # noqa: BLE001
        raise NativeqError(f"RPC tracker {spec.address} did not answer: {_first_line(e)}") from None
    keys = {str(s.get("key", "")).split(":")[-1] for s in summary.get("server_info", [])}
    queued = set(summary.get("queue_info", {}))
    if spec.key not in keys | queued:
        raise NativeqError(
            f"no RPC server is registered under key {spec.key!r} at tracker {spec.address} "
            f"(start one: python -m tvm.exec.rpc_server --tracker {spec.address} --key {spec.key})"
        )


def count_servers(spec: RemoteSpec) -> int:
    """Servers registered under `spec.key` (free or busy), as the tracker reports them."""
    from nativeq.compile._tvm import rpc

    summary = _with_timeout(lambda: rpc.connect_tracker(spec.host, spec.port).summary(), 10.0)
    return sum(1 for s in summary.get("server_info", []) if str(s.get("key", "")).split(":")[-1] == spec.key)


def connect_direct(rpc_config):
    """MetaSchedule `f_create_session` for `--rpc HOST:PORT`: a session straight to one server."""
    from nativeq.compile._tvm import rpc

    return rpc.connect(rpc_config.tracker_host, int(rpc_config.tracker_port),
                       session_timeout=rpc_config.session_timeout_sec)


def export_cross(mod, compiler: str) -> str:
    """MetaSchedule `f_export` for a cross target: the candidate as a .so built by `compiler`."""
    import os
    import tempfile

    from nativeq.compile._tvm import cc

    path = os.path.join(tempfile.mkdtemp(prefix="nativeq-tune-"), "candidate.so")
    mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    return path


def build_candidate(mod, target, _params):
    """MetaSchedule `f_build`: TVM's `default_build` without its `import tvm.s_tir.tensor_intrin`.

    That import registers every tensor intrinsic TVM has (CUDA, ARM, RISC-V, ...), 40-100 s of
    CPU in each builder worker; a candidate is already tensorized, so it needs none of them.
    """
    from nativeq.compile._tvm import RemoveWeightLayoutRewriteBlock, tvm
    from nativeq.compile.pipeline import tir_pipeline

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.driver.build(mod, target=target, pipeline=tir_pipeline())  # compile's lowering, so tiles measure as built


def evaluator_config():
    from nativeq.compile._tvm import meta_schedule as ms

    # In a model a kernel's input was just written by the kernel before it (in cache) while its
    # weights were evicted by the layers since it last ran: TVM's cache flush clears every argument
    # but the first (the activation) before each run, so each timed run starts like that (number=1).
    # Timed hot, with the weights in cache, the ranking of tiles did not carry over to the model.
    return ms.runner.EvaluatorConfig(number=1, repeat=20, min_repeat_ms=0, enable_cpu_cache_flush=True)


def make_builder(cross_compiler: str | None, workers: int = 1):
    from nativeq.compile._tvm import meta_schedule as ms

    f_export = functools.partial(export_cross, compiler=cross_compiler) if cross_compiler else None
    return ms.builder.LocalBuilder(max_workers=workers, timeout_sec=300, f_build=build_candidate, f_export=f_export)


def make_runner(remote: RemoteSpec | None):
    from nativeq.compile._tvm import meta_schedule as ms

    if remote is None:
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator_config())
    config = ms.runner.RPCConfig(
        tracker_host=remote.host,
        tracker_port=remote.port,
        tracker_key=remote.key if remote.key is not None else DIRECT_KEY,
        session_timeout_sec=int(remote.timeout),
    )
    return ms.runner.RPCRunner(
        rpc_config=config,
        evaluator_config=evaluator_config(),
        max_workers=remote.workers,
        f_create_session=connect_direct if remote.key is None else None,
        f_alloc_argument=alloc_arguments_from_host,
    )


def alloc_arguments_from_host(session, device, args_info, alloc_repeat):
    """MetaSchedule `f_alloc_argument`: random inputs generated here and copied to the device.

    TVM's default fills them on the device with `tvm.contrib.random.random_fill`, which the
    runtime-only device build (`nativeq_rpc_server`) does not have.
    """
    import numpy as np

    from nativeq.compile._tvm import meta_schedule as ms

    rng = np.random.default_rng(0)

    def fill(tensor):
        dtype = np.dtype(str(tensor.dtype))
        shape = tuple(int(d) for d in tensor.shape)
        if dtype.kind in "iu":
            data = rng.integers(0, 64, shape)
        else:
            data = rng.random(shape)
        tensor.copyfrom(data.astype(dtype))

    del session  # the arguments are allocated through `device`, which belongs to the session
    return ms.runner.utils.alloc_argument_common(fill, device, args_info, alloc_repeat)
