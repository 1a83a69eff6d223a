"""Reliability of the runtime and of artifact writing (docs/reliability.md): one model called from many
threads, `load(threads=N)`, a light runtime import, the sealed artifact, atomic output directories
(stale litter, concurrent writers) and run-time input refusals.

Two artifacts serve every test: `matmul_artifact` (conftest: one input, one output) and
`two_io_artifact` (two inputs sharing the symbolic T, two outputs), both compiled once per session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import nativeq
import qdq_models
from nativeq._fs import atomic_directory
from nativeq.errors import NativeqError
from nativeq.runtime import check_inputs, read_manifest, runtime_threads
from nativeq.runtime.manifest import TensorSpec, manifest_digest, seal_manifest

ROOT = Path(__file__).resolve().parents[1]
PY_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1",
          "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture(scope="session")
def two_io_artifact(tmp_path_factory):
    from nativeq.compile import CompileConfig, compile_model

    root = tmp_path_factory.mktemp("two_io")
    onnx.save(qdq_models.two_io(), root / "two_io.onnx")
    compile_model(root / "two_io.onnx", root / "artifact", CompileConfig(target="host", use_tuning=False))
    return root / "two_io.onnx", root / "artifact"


def _feeds(specs, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.uniform(-6, 6, [length if isinstance(d, str) else d for d in s.shape]).astype(np.float32)
            for s in specs}


# ----------------------------------------------------------------------------- 1. thread safety
@pytest.mark.parametrize("which", ["matmul_artifact", "two_io_artifact"])
def test_one_model_called_from_many_threads_matches_single_threaded(request, which):
    _, artifact = request.getfixturevalue(which)
    model = nativeq.load(artifact)
    lengths = [1, 2, 3, 5, 8, 13, 21, 55, 144, 377, 610, 987]  # long calls overlap more: a shared VM fails
    feeds = [_feeds(model.inputs, t, seed) for seed, t in enumerate(lengths)]
    expected = [model.run(f) for f in feeds]  # single-threaded, on the loading thread's VM
    n_threads, calls = 6, 150
    start = threading.Barrier(n_threads)
    mismatches, errors = [], []

    def work(k: int) -> None:
        try:
            start.wait()
            for i in range(calls):
                j = (i * 5 + k * 3) % len(feeds)
                got = model.run(feeds[j])
                if list(got) != list(expected[j]) or any(not np.array_equal(got[n], expected[j][n]) for n in got):
                    mismatches.append((k, i, lengths[j]))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    workers = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and not mismatches, (errors[:3], mismatches[:5])
    for f, e in zip(feeds, expected):  # the loading thread's VM is still fine afterwards
        assert all(np.array_equal(model.run(f)[n], e[n]) for n in e)


def test_results_of_one_thread_survive_calls_from_others(matmul_artifact):
    """Outputs own their memory: a result kept by one thread is not overwritten by other threads' calls."""
    model = nativeq.load(matmul_artifact[1])
    x = _feeds(model.inputs, 40, 1)
    kept = model.run(x)["y"]
    copy = kept.copy()
    others = [threading.Thread(target=lambda: [model.run(_feeds(model.inputs, 40, s)) for s in range(30)])
              for _ in range(3)]
    for t in others:
        t.start()
    for t in others:
        t.join()
    assert np.array_equal(kept, copy)


# ----------------------------------------------------------------------------- 2. load(threads=N)
def _in_fresh_thread(fn):
    """fn() in a new thread (TVM's pool is per thread and sized on its first use); returns its result."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    assert out, "the thread failed"
    return out[0]


def test_threads_setting_takes_effect_and_does_not_change_results(two_io_artifact):
    _, artifact = two_io_artifact
    feeds = _feeds(nativeq.load(artifact).inputs, 300, 3)
    results = {}
    for threads in (1, 2, 3):
        model = nativeq.load(artifact, threads=threads)
        assert model.threads == threads
        results[threads] = _in_fresh_thread(lambda: (model.run(feeds), runtime_threads()))
        assert results[threads][1] == threads
    for threads in (2, 3):
        assert all(np.array_equal(results[threads][0][n], results[1][0][n]) for n in ("y", "r"))


def test_two_models_with_different_threads_in_one_thread(matmul_artifact):
    one, two = nativeq.load(matmul_artifact[1], threads=1), nativeq.load(matmul_artifact[1], threads=2)
    x = _feeds(one.inputs, 50, 0)

    def alternate():
        seen = []
        for model in (two, one, two):
            model.run(x)
            seen.append(runtime_threads())
        return seen

    assert _in_fresh_thread(alternate) == [2, 1, 2]


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", True])
def test_threads_must_be_a_positive_int(matmul_artifact, threads):
    with pytest.raises(NativeqError, match=r"^threads must be a positive int or None, got "):
        nativeq.load(matmul_artifact[1], threads=threads)


def test_transcribe_passes_threads_to_native_load(monkeypatch):
    import nativeq.runtime
    from nativeq.demo import transcribe
    from nativeq.runtime import machine_arch

    calls = []
    monkeypatch.setattr(nativeq.runtime, "load", lambda path, **kw: calls.append(kw) or object())
    manifest = {"inputs": [{"name": "feats", "dtype": "float32", "shape": [1, "T", 80]}],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": ["T_out", 32]}],
                "target": {"arch": machine_arch()}}
    transcribe._encoder_runner(Path("art"), manifest, 3)
    assert calls == [{"threads": 3}]
    with pytest.raises(NativeqError, match="--threads must be at least 1, got 0"):
        transcribe.transcribe(transcribe.TranscribeConfig(artifact="art", wavs=("a.wav",), threads=0))


# ----------------------------------------------------------------------------- 3. light runtime
_LIGHT = """
import sys, time
started = time.perf_counter()
import numpy as np
import nativeq, nativeq.runtime
imported = time.perf_counter()
assert not {"torch", "tvm", "tvm_ffi"} & set(sys.modules), sorted({"torch", "tvm", "tvm_ffi"} & set(sys.modules))
model = nativeq.load(sys.argv[1])
loaded = time.perf_counter()
y = model(x=np.ones((1, 9, 64), np.float32))["y"]
maps = open("/proc/self/maps").read()
print(y.shape, "torch" in sys.modules, "tvm" in sys.modules, "tvm.relax" in sys.modules,
      "libtvm_compiler" in maps, "libtvm_runtime" in maps, "ml_dtypes" in sys.modules)
print(f"import {imported - started:.3f} s, load {loaded - imported:.3f} s", file=sys.stderr)
if len(sys.argv) > 2:  # torch and the full TVM (compiler) still import and work afterwards
    import torch, tvm
    from tvm import relax
    assert "tvm_compiler" in tvm.base._LOADED_LIBS and torch.ones(2).sum().item() == 2.0
    assert np.array_equal(model(x=np.ones((1, 9, 64), np.float32))["y"], y)
    print("later imports ok")
"""


@pytest.mark.parametrize("runtime_only", [False, True])
def test_load_imports_neither_torch_nor_the_tvm_compiler(matmul_artifact, runtime_only):
    """torch is installed here: tvm-ffi would import it; nativeq.load hides it. Without TVM_USE_RUNTIME_LIB the
    `tvm` package is not imported either (nativeq loads libtvm_runtime.so itself)."""
    env = {**PY_ENV, **({"TVM_USE_RUNTIME_LIB": "1"} if runtime_only else {})}
    args = [sys.executable, "-c", _LIGHT, str(matmul_artifact[1])] + ([] if runtime_only else ["then-import"])
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # shape, torch, tvm, tvm.relax, libtvm_compiler mapped, libtvm_runtime mapped, ml_dtypes
    assert lines[0] == f"(1, 9, 48) False False False False True {not runtime_only}", out.stdout
    assert lines[1:] == ([] if runtime_only else ["later imports ok"])
    print(out.stderr.strip())  # the measured import and load times (pytest -s)


# ----------------------------------------------------------------------------- 4. sealed artifact
def _rewrite(artifact: Path, edit, seal: bool = True) -> None:
    """Apply `edit(manifest)` to artifact/manifest.json; re-seal it (as the compiler would) unless `seal` is False."""
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if seal:
        seal_manifest(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def _extra_listed_file(artifact: Path) -> None:
    """A second listed file (vocab.json), so that a non-library file can be dropped or corrupted."""
    (artifact / "vocab.json").write_text('["a", "b"]')
    from nativeq._fs import sha256_file

    _rewrite(artifact, lambda m: m["files"].update({"vocab.json": sha256_file(artifact / "vocab.json")}))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _set(*keys_value):
    *keys, value = keys_value

    def edit(m):
        for key in keys[:-1]:
            m = m[key]
        m[keys[-1]] = value
    return edit


def _write_raw(text: str):
    return lambda a: (a / "manifest.json").write_text(text)


TAMPERING = {
    "drop a file entry": (lambda a: (_extra_listed_file(a), _rewrite(a, lambda m: m["files"].pop("vocab.json"))),
                          r"contains vocab.json, which its manifest does not list"),
    "empty files": (lambda a: _rewrite(a, _set("files", {})), r"'files' records no sha256 for the library model.so"),
    "extra file": (lambda a: (a / "notes.txt").write_text("hi"), r"contains notes.txt, which its manifest does not list"),
    "extra directory": (lambda a: (a / "sub").mkdir(), r"contains sub, which its manifest does not list"),
    "flipped byte in model.so": (lambda a: _flip_byte(a / "model.so"), r"model.so was modified \(sha256 mismatch\)"),
    "flipped byte in a listed file": (lambda a: (_extra_listed_file(a), _flip_byte(a / "vocab.json")),
                                      r"vocab.json was modified \(sha256 mismatch\)"),
    "listed file missing": (lambda a: (_extra_listed_file(a), (a / "vocab.json").unlink()), r"vocab.json is missing"),
    "model.so a symlink": (lambda a: (shutil.move(a / "model.so", a.parent / "elsewhere.so"),
                                      (a / "model.so").symlink_to(a.parent / "elsewhere.so")),
                           r"model.so is not a regular file"),
    "edited field, not resealed": (lambda a: _rewrite(a, _set("outputs", 0, "quant", "scale", 0.2), seal=False),
                                   r"manifest.json was modified \(manifest_sha256 mismatch\)"),
    "edited seal": (lambda a: _rewrite(a, _set("manifest_sha256", "0" * 64), seal=False),
                    r"manifest.json was modified \(manifest_sha256 mismatch\)"),
    "no seal": (lambda a: _rewrite(a, lambda m: m.pop("manifest_sha256"), seal=False),
                r"has no manifest_sha256 \(written by an older nativeq or by hand\): recompile it"),
    "library ../x.so": (lambda a: _rewrite(a, _set("library", "../x.so")),
                        r"manifest field 'library' must name a file inside the artifact, got '../x.so'"),
    "library absolute": (lambda a: _rewrite(a, _set("library", "/tmp/x.so")),
                         r"manifest field 'library' must name a file inside the artifact, got '/tmp/x.so'"),
    "library not a string": (lambda a: _rewrite(a, _set("library", ["model.so"])),
                             r"manifest field 'library' must name a file inside the artifact"),
    "files entry outside": (lambda a: _rewrite(a, lambda m: m["files"].update({"../evil.so": "0" * 64})),
                            r"'files' lists '../evil.so'; entries must be file names inside the artifact"),
    "files digest not hex": (lambda a: _rewrite(a, _set("files", "model.so", "XYZ")),
                             r"manifest field 'files.model.so' must be a sha256"),
    "inputs not a list": (lambda a: _rewrite(a, _set("inputs", {"x": 1})), r"manifest field 'inputs' must be a list, got dict"),
    "input entry not an object": (lambda a: _rewrite(a, _set("inputs", ["x"])),
                                  r"manifest field 'inputs\[0\]' must be an object \{name, dtype, shape\}, got 'x'"),
    "shape a string": (lambda a: _rewrite(a, _set("inputs", 0, "shape", "1,T,64")),
                       r"manifest field 'inputs\[0\].shape' must be a list of dims, got '1,T,64'"),
    "shape dim a float": (lambda a: _rewrite(a, _set("inputs", 0, "shape", 2, 64.5)),
                          r"manifest field 'inputs\[0\].shape\[2\]' must be an int ≥ 0 or a dim name, got 64.5"),
    "shape dim negative": (lambda a: _rewrite(a, _set("outputs", 0, "shape", 2, -48)),
                           r"manifest field 'outputs\[0\].shape\[2\]' must be an int ≥ 0 or a dim name, got -48"),
    "dtype unknown": (lambda a: _rewrite(a, _set("inputs", 0, "dtype", "float33")),
                      r"manifest field 'inputs\[0\].dtype' must be a numpy dtype name \(e.g. float32, int8\), got 'float33'"),
    "dtype not a string": (lambda a: _rewrite(a, _set("outputs", 0, "dtype", 32)),
                           r"manifest field 'outputs\[0\].dtype' must be a non-empty string, got 32"),
    "quant scale a string": (lambda a: _rewrite(a, _set("outputs", 0, "quant", "scale", "0.1")),
                             r"manifest field 'outputs\[0\].quant.scale' must be a number or a non-empty list"),
    "input name repeated": (lambda a: _rewrite(a, lambda m: m["inputs"].append(dict(m["inputs"][0]))),
                            r"manifest field 'inputs' names 'x' more than once"),
    "missing outputs": (lambda a: _rewrite(a, lambda m: m.pop("outputs")), r"manifest field 'outputs' is missing"),
    "missing input name": (lambda a: _rewrite(a, lambda m: m["inputs"][0].pop("name")),
                           r"manifest field 'inputs\[0\].name' is missing"),
    "target not an object": (lambda a: _rewrite(a, _set("target", "host")),
                             r"manifest field 'target' must be an object, got 'host'"),
    "cpu_features a string": (lambda a: _rewrite(a, _set("target", "cpu_features", "avx2")),
                              r"manifest field 'target.cpu_features' must be a list, got 'avx2'"),
    "target.tvm missing": (lambda a: _rewrite(a, lambda m: m["target"].pop("tvm")), r"manifest field 'target.tvm' is missing"),
    "entry empty": (lambda a: _rewrite(a, _set("entry", "")), r"manifest field 'entry' must be a non-empty string, got ''"),
    "schema a string": (lambda a: _rewrite(a, _set("schema", "1")), r"manifest schema '1' is not supported"),
    "schema true": (lambda a: _rewrite(a, _set("schema", True)), r"manifest schema True is not supported"),
    "JSON list": (_write_raw("[1, 2]"), r"is not a nativeq manifest \(a JSON list, not an object\)"),
    "JSON number": (_write_raw("1"), r"is not a nativeq manifest \(a JSON int, not an object\)"),
    "invalid JSON": (_write_raw('{"schema": 1,'), r"manifest.json is not valid JSON"),
    "not UTF-8": (lambda a: (a / "manifest.json").write_bytes(b"\xff\xfe{}"), r"manifest.json is not valid JSON"),
    "repeated key": (lambda a: (a / "manifest.json").write_text(
        (a / "manifest.json").read_text().replace('"library": "model.so"', '"library": "model.so", "library": "x.so"')),
        r"manifest.json repeats key 'library'"),
}


@pytest.fixture
def artifact_copy(matmul_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(matmul_artifact[1], copy)
    return copy


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_artifact_is_refused_naming_the_problem(artifact_copy, case):
    tamper, message = TAMPERING[case]
    tamper(artifact_copy)
    with pytest.raises(NativeqError, match=message) as caught:
        nativeq.load(artifact_copy)
    assert "\n" not in str(caught.value)


def test_a_sealed_manifest_survives_reformatting_and_extra_listed_files(artifact_copy):
    """The seal is over the canonical JSON, not the bytes; an artifact with more (listed) files loads."""
    _extra_listed_file(artifact_copy)
    path = artifact_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=7, ensure_ascii=False))
    assert read_manifest(artifact_copy)["manifest_sha256"] == manifest_digest(manifest)
    assert nativeq.load(artifact_copy)(x=np.zeros((1, 2, 64), np.float32))["y"].shape == (1, 2, 48)


def test_compiled_manifest_is_sealed(two_io_artifact):
    manifest = json.loads((two_io_artifact[1] / "manifest.json").read_text())
    assert manifest["manifest_sha256"] == manifest_digest(manifest)
    assert [(s["name"], s["shape"]) for s in manifest["outputs"]] == [("y", [1, "T", 48]), ("r", [1, "T", 64])]


@pytest.mark.parametrize("case", ["extra file", "edited field, not resealed", "shape a string", "library ../x.so",
                                  "JSON list", "flipped byte in model.so"])
def test_cli_refuses_a_tampered_artifact_in_one_line(nativeq_cli, matmul_artifact, tmp_path, case):
    artifact = tmp_path / "art"
    shutil.copytree(matmul_artifact[1], artifact)
    TAMPERING[case][0](artifact)
    res = nativeq_cli("verify", artifact, "--onnx", matmul_artifact[0])
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr


# ----------------------------------------------------------------------------- 5. atomic_directory
_WRITER = """
import sys, time
from pathlib import Path
from nativeq._fs import atomic_directory
from nativeq.errors import NativeqError
out, me, sync = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
others = sys.argv[4:]
try:
    with atomic_directory(out, force="--force" in others) as tmp:
        (tmp / "who").write_text(me)
        (sync / f"ready-{me}").touch()
        deadline = time.time() + 60
        while not all((sync / f"ready-{o}").exists() for o in others if o != "--force") or (sync / "hold").exists():
            if time.time() > deadline:
                sys.exit("timed out waiting for the other writer")
            time.sleep(0.01)
except NativeqError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def _writer(out: Path, me: str, sync: Path, *others: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(out), me, str(sync), *others], env=PY_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)


def _litter(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_two_concurrent_writers_exactly_one_wins(tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    out = tmp_path / "out"
    procs = {me: _writer(out, me, sync, "a", "b") for me in ("a", "b")}  # both wait until both are writing
    results = {me: p.communicate(timeout=120) + (p.returncode,) for me, p in procs.items()}
    winners = [me for me, (_, _, rc) in results.items() if rc == 0]
    assert len(winners) == 1, results
    (loser,) = {"a", "b"} - set(winners)
    _, err, rc = results[loser]
    assert rc == 2 and err == (f"error: output {out} was created by another process while this one was writing; "
                               f"use --force to replace it\n"), err
    assert (out / "who").read_text() == winners[0] and _litter(tmp_path, "out") == []


def test_two_concurrent_forced_writers_both_succeed_and_one_is_left(tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "who").write_text("before")
    procs = [_writer(out, me, sync, "a", "b", "--force") for me in ("a", "b")]
    assert [p.communicate(timeout=120)[1] for p in procs] == ["", ""] and [p.returncode for p in procs] == [0, 0]
    assert (out / "who").read_text() in ("a", "b") and _litter(tmp_path, "out") == []


def test_killed_writer_litter_is_removed_by_the_next_write_not_before(tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    (sync / "hold").touch()
    out = tmp_path / "out"
    victim = _writer(out, "victim", sync)
    _wait_for(sync / "ready-victim", victim)
    (partial,) = _litter(tmp_path, "out")
    assert partial.startswith(f".out.{victim.pid}.") and partial.endswith(".partial")
    with atomic_directory(out) as tmp:  # the owner is alive: its directory stays
        (tmp / "who").write_text("me")
    assert _litter(tmp_path, "out") == [partial]
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL and _litter(tmp_path, "out") == [partial]
    with atomic_directory(out, force=True) as tmp:
        (tmp / "who").write_text("me again")
    assert _litter(tmp_path, "out") == [] and (out / "who").read_text() == "me again"


def test_stale_litter_rules(tmp_path):
    """Removed: a partial of a dead pid nobody locks, an `.old` of a dead pid. Kept: a partial or `.old` of a live
    pid, a partial locked by a live process, one without a pid (older nativeq), and the litter of other outputs."""
    import fcntl

    dead = 2**22 + 12345  # above Linux's pid_max: no such process
    names = {f".out.{dead}.abcd1234.partial": False, f".out.old.{dead}.0123abcd": False,
             f".out.old.{os.getpid()}.0123abcd": True,
             f".out.{os.getpid()}.live0000.partial": True, f".out.{dead}.locked00.partial": True,
             ".out.legacy00.partial": True, f".other.{dead}.abcd1234.partial": True}
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.so").write_text("half")
    lock = os.open(tmp_path / f".out.{dead}.locked00.partial", os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        child = subprocess.run([sys.executable, "-c", "from nativeq._fs import atomic_directory\n"
                                f"with atomic_directory({str(tmp_path / 'out')!r}) as tmp: pass"],
                               env=PY_ENV, capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr
    finally:
        os.close(lock)
    assert _litter(tmp_path, "out") == sorted(n for n, kept in names.items() if kept and n.startswith(".out."))
    assert (tmp_path / f".other.{dead}.abcd1234.partial").is_dir() and (tmp_path / "out").is_dir()


def test_forced_writers_in_threads_of_one_process(tmp_path):
    errors = []

    def write(k: int) -> None:
        try:
            for i in range(5):
                with atomic_directory(tmp_path / "out", force=True) as tmp:
                    (tmp / "who").write_text(f"{k}.{i}")
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    workers = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and (tmp_path / "out" / "who").read_text().endswith(".4") and _litter(tmp_path, "out") == []


def test_failure_inside_removes_the_partial_directory(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 6. input hardening
@pytest.mark.parametrize("inputs", [np.zeros((1, 4, 64), np.float32), [np.zeros((1, 4, 64), np.float32)], None])
def test_run_takes_a_mapping(matmul_artifact, inputs):
    model = nativeq.load(matmul_artifact[1])
    with pytest.raises(NativeqError, match=r"^run\(\) takes a dict of input name -> array, got \w+; e.g. "
                                           r"run\(\{'x': array\}\)$"):
        model.run(inputs)


def test_zero_length_symbolic_dim_is_refused(two_io_artifact):
    model = nativeq.load(two_io_artifact[1])
    feeds = {"x": np.zeros((1, 0, 64), np.float32), "z": np.zeros((1, 0, 48), np.float32)}
    with pytest.raises(NativeqError, match=r"^input 'x': dim 1 \(T\) is 0; the model needs at least 1"):
        model.run(feeds)


@pytest.mark.parametrize("bad, count", [(np.nan, "1 NaN or infinite value;"), (np.inf, "1 NaN or infinite value;"),
                                        (-np.inf, "1 NaN or infinite value;"), ("many", "6 NaN or infinite values;")])
def test_non_finite_float_inputs_are_refused_naming_the_input(two_io_artifact, bad, count):
    model = nativeq.load(two_io_artifact[1])
    feeds = _feeds(model.inputs, 12, 0)
    if bad == "many":
        feeds["z"][0, :3, :2] = np.nan
    else:
        feeds["z"][0, 5, 7] = bad
    with pytest.raises(NativeqError, match=rf"^input 'z' has {count} the model takes finite values only$"):
        model.run(feeds)


def test_finite_check_has_no_false_positives_and_covers_float64():
    big = np.full(1000, np.finfo(np.float32).max, np.float32)  # sums past float32's range, all finite
    check_inputs((TensorSpec("a", "float32", ("N",)),), {"a": big})
    check_inputs((TensorSpec("a", "float64", ("N",)),), {"a": np.full(8, 1e308)})  # overflows a float64 sum
    nan64 = np.full(8, 1e308)
    nan64[3] = np.nan
    with pytest.raises(NativeqError, match="input 'a' has 1 NaN or infinite value"):
        check_inputs((TensorSpec("a", "float64", ("N",)),), {"a": nan64})
    check_inputs((TensorSpec("i", "int8", ("N",)),), {"i": np.arange(5, dtype=np.int8)})  # ints are not checked


def _misaligned(array: np.ndarray) -> np.ndarray:
    """A writeable C-order copy of `array` 4 bytes past a 64-byte boundary (numpy's own arrays are often
    only 16-byte aligned)."""
    buffer = np.zeros(array.nbytes + 2 * 64, np.uint8)
    start = -buffer.ctypes.data % 64 + 4
    copy = buffer[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


def test_misaligned_inputs_give_the_aligned_result_and_leave_earlier_outputs_alone(two_io_artifact):
    """Inputs the kernels cannot read in place go through a per-thread aligned buffer reused by every call:
    results equal those of aligned inputs, and the outputs of a call survive the next call."""
    from nativeq.runtime.model import aligned

    model = nativeq.load(two_io_artifact[1])
    feeds = [_feeds(model.inputs, length, seed) for length, seed in ((12, 0), (12, 1), (20, 2))]
    expected = [model.run({name: aligned(x) for name, x in f.items()}) for f in feeds]
    got = [model.run({name: _misaligned(x) for name, x in f.items()}) for f in feeds]
    for want, have in zip(expected, got):
        assert want.keys() == have.keys()
        for name in want:
            np.testing.assert_array_equal(have[name], want[name])


def test_an_output_that_is_a_misaligned_input_is_not_overwritten_by_the_next_call(tmp_path):
    from onnx import TensorProto, helper

    from nativeq.compile import CompileConfig, compile_model

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "identity.onnx")
    compile_model(tmp_path / "identity.onnx", tmp_path / "artifact", CompileConfig(target="host", use_tuning=False))
    model = nativeq.load(tmp_path / "artifact")
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    first = model.run({"x": _misaligned(x)})["y"]
    second = model.run({"x": _misaligned(x + 100)})["y"]
    np.testing.assert_array_equal(first, x)
    np.testing.assert_array_equal(second, x + 100)


def test_ragged_input_is_not_an_array(matmul_artifact):
    model = nativeq.load(matmul_artifact[1])
    with pytest.raises(NativeqError, match=r"^input 'x' is not an array: "):
        model.run({"x": [[1.0, 2.0], [3.0]]})


def test_nested_atomic_directories_commit(tmp_path):
    """An atomic directory written inside another one's partial directory (the demo's data inside its output)
    commits without waiting for the outer one's lock (in a subprocess: a deadlock would hang the suite)."""
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from nativeq._fs import atomic_directory\n"
        "root = Path(sys.argv[1])\n"
        "with atomic_directory(root / 'out') as outer:\n"
        "    with atomic_directory(outer / 'data') as inner:\n"
        "        (inner / 'x').write_text('1')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / "out" / "data" / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
