"""`nativeq bundle`: the deployable archive, both runners in it, and safe extraction."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import onnx
import pytest

import qdq_models
from nativeq._fs import sha256_file
from nativeq.compile import CompileConfig, compile_model
from nativeq.errors import NativeqError
from nativeq.runtime.bundle import BundleConfig, bundle_artifact, extract_bundle
from nativeq.verify.api import ort_session

OUT_SCALE = 0.1  # output QuantizeLinear scale of the qdq_models builders
QEMU = "qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu {cpu}"


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    onnx_path = root / "conv.onnx"
    onnx.save(qdq_models.qdq_conv1d(), onnx_path)
    return root, onnx_path


def _reference(onnx_path, x):
    return ort_session(onnx_path, "disable").run(None, {"x": x})[0]


@pytest.mark.arm
def test_rpi5_bundle_contents_and_cpp_runner_under_qemu(conv, nativeq_cli, tmp_path):
    root, onnx_path = conv
    artifact = root / "rpi5"
    compile_model(onnx_path, artifact, CompileConfig(target="rpi5"))
    archive = tmp_path / "rpi5-asr.tar.gz"
    proc = nativeq_cli("bundle", artifact, "-o", archive)
    assert proc.returncode == 0, proc.stderr
    assert "tar xzf rpi5-asr.tar.gz" in proc.stdout

    with tarfile.open(archive) as tar:
        modes = {m.name: m.mode for m in tar.getmembers()}
    expected = {"README.md", "run.py", "run.sh", "bin/nativeq_runner", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so",
                "model/model.so", "model/manifest.json"}
    assert set(modes) == {f"rpi5-asr/{name}" for name in expected}
    for exe in ("run.sh", "run.py", "bin/nativeq_runner"):
        assert modes[f"rpi5-asr/{exe}"] & 0o111

    unpacked = extract_bundle(archive, tmp_path / "device") / "rpi5-asr"
    manifest = json.loads((unpacked / "model" / "manifest.json").read_text())
    assert sha256_file(unpacked / "model" / "model.so") == manifest["files"]["model.so"]
    readme = (unpacked / "README.md").read_text()
    assert "pip install numpy apache-tvm==" in readme and "./run.sh out features.npy" in readme

    x = np.random.default_rng(5).normal(0, 1.5, (1, 32, 40)).astype(np.float32)
    np.save(tmp_path / "features.npy", x)
    env = dict(os.environ, NATIVEQ_EMULATOR=QEMU.format(cpu="cortex-a76"))
    run = subprocess.run(["sh", str(unpacked / "run.sh"), str(tmp_path / "out"), str(tmp_path / "features.npy")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    got = np.load(tmp_path / "out" / "out0.npy")
    assert got.shape == (1, 48, 40)
    assert np.abs(got - _reference(onnx_path, x)).max() <= OUT_SCALE * (1 + 1e-4)

    env["NATIVEQ_EMULATOR"] = QEMU.format(cpu="cortex-a72")  # a Pi 4 CPU: no dotprod
    run = subprocess.run(["sh", str(unpacked / "run.sh"), str(tmp_path / "out4"), str(tmp_path / "features.npy")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 3 and "this CPU lacks dotprod (asimddp)" in run.stderr


def test_python_runner_uses_only_the_tvm_runtime(conv, tmp_path):
    """run.py on a host artifact: same outputs as ORT, and libtvm_compiler.so is never loaded."""
    root, onnx_path = conv
    artifact = root / "host"
    compile_model(onnx_path, artifact, CompileConfig(target="host"))
    result = bundle_artifact(artifact, tmp_path / "host-asr.tgz")
    assert all(not name.startswith("host-asr/bin/") for name, _ in result.members)  # no C++ runner off aarch64
    unpacked = extract_bundle(result.path, tmp_path / "device") / "host-asr"

    x = np.random.default_rng(6).normal(0, 1.5, (1, 32, 25)).astype(np.float32)
    np.save(tmp_path / "features.npy", x)
    probe = (
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
        "maps = open('/proc/self/maps').read(); "
        "print('compiler loaded' if 'libtvm_compiler' in maps else 'runtime only', 'libtvm_runtime' in maps)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    run = subprocess.run([sys.executable, "-c", probe, str(unpacked / "run.py"), str(tmp_path / "features.npy"),
                          "-o", str(tmp_path / "outputs.npz")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "runtime only True" in run.stdout and "y: float32[1, 48, 25]" in run.stdout
    with np.load(tmp_path / "outputs.npz") as outputs:
        got = outputs["y"]
    assert np.abs(got - _reference(onnx_path, x)).max() <= OUT_SCALE * (1 + 1e-4)

    np.save(tmp_path / "wrong.npy", x.astype(np.float64))
    run = subprocess.run([sys.executable, str(unpacked / "run.py"), str(tmp_path / "wrong.npy")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and "is float64; the model takes float32" in run.stderr


@pytest.mark.arm
def test_bundle_refuses_existing_output_bad_name_and_modified_artifact(conv, tmp_path):
    root, onnx_path = conv
    artifact = tmp_path / "art"
    compile_model(onnx_path, artifact, CompileConfig(target="aarch64"))
    with pytest.raises(NativeqError, match=r"must end in \.tar\.gz or \.tgz"):
        bundle_artifact(artifact, tmp_path / "model.zip")
    (tmp_path / "taken.tar.gz").write_bytes(b"x")
    with pytest.raises(NativeqError, match="already exists"):
        bundle_artifact(artifact, tmp_path / "taken.tar.gz")
    with (artifact / "model.so").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(NativeqError, match="was modified"):
        bundle_artifact(artifact, tmp_path / "new.tar.gz", BundleConfig(force=True))
    assert not (tmp_path / "new.tar.gz").exists()


def _tar_with(tmp_path, *members) -> str:
    """A .tar.gz holding `members`: (name, kind, linkname) with kind file/dir/sym/hard/fifo."""
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, link in members:
            info = tarfile.TarInfo(name)
            data = b""
            if kind == "file":
                data = b"payload"
                info.size = len(data)
            else:
                info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                             "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[kind]
                info.linkname = link or ""
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return path


@pytest.mark.parametrize("members, problem", [
    ([("/etc/evil", "file", None)], "absolute path"),
    ([("b/../../evil", "file", None)], "contains '..'"),
    ([("b/link", "sym", "../../etc")], "outside the bundle"),
    ([("b/link", "sym", "/etc/passwd")], "outside the bundle"),
    ([("b/hard", "hard", "../outside")], "outside the bundle"),
    ([("b/d", "dir", None), ("b/d/up", "sym", ".."), ("b/d/up/x", "file", None)], "lies below the link"),
    ([("b/f", "file", None), ("b/f", "file", None)], "appears twice"),
    ([("b/pipe", "fifo", None)], "special file"),
    ([("b/tty", "chr", None)], "special file"),
])
def test_extract_refuses_unsafe_members(tmp_path, members, problem):
    archive = _tar_with(tmp_path, *members)
    dest = tmp_path / "dest"
    with pytest.raises(NativeqError, match=problem):
        extract_bundle(archive, dest)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz"]  # nothing written, no temp dir left


def test_extract_keeps_links_inside_the_tree(tmp_path):
    archive = _tar_with(tmp_path, ("b/d/f", "file", None), ("b/alias", "sym", "d/f"), ("b/d/g", "hard", "b/d/f"))
    dest = extract_bundle(archive, tmp_path / "dest")
    assert (dest / "b" / "alias").read_bytes() == b"payload" and (dest / "b" / "d" / "g").read_bytes() == b"payload"
    with pytest.raises(NativeqError, match="already exists"):
        extract_bundle(archive, dest)
    with pytest.raises(NativeqError, match="not a readable tar archive"):
        (tmp_path / "junk.tgz").write_bytes(b"not a tar")
        extract_bundle(tmp_path / "junk.tgz", tmp_path / "dest2")


def _write_wav(path, samples: np.ndarray, rate: int = 16000) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def test_speech_bundle_runs_a_wav_file_and_prints_the_ctc_transcript(tmp_path):
    """A model shaped like nativeq's encoder ([1, T, 80] -> [1, T, 29]) gets the numpy front end and vocabulary;
    run.py on a WAV equals ORT on `frontend_np.fbank` of the same samples, and its transcript is their CTC decode."""
    from nativeq.models import frontend_np, text

    onnx_path = tmp_path / "asr.onnx"
    onnx.save(qdq_models.qdq_matmul(k=80, n=text.VOCAB_SIZE, seed=3), onnx_path)
    compile_model(onnx_path, tmp_path / "asr", CompileConfig(target="host", int8=False))  # the bundle, not the kernels
    result = bundle_artifact(tmp_path / "asr", tmp_path / "asr.tar.gz")
    names = {name for name, _ in result.members}
    assert {"asr/frontend.py", "asr/vocab.json"} <= names
    unpacked = extract_bundle(result.path, tmp_path / "device") / "asr"

    rng = np.random.default_rng(8)
    t = np.arange(16000) / 16000
    samples = (0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32)
    _write_wav(tmp_path / "speech.wav", samples)
    run = subprocess.run([sys.executable, str(unpacked / "run.py"), str(tmp_path / "speech.wav"), "-o",
                          str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr

    quantized = np.round(samples * 32767).astype(np.float32) / 32768.0  # what the WAV holds
    feats = frontend_np.fbank(quantized)[None]
    ref = ort_session(onnx_path, "disable").run(None, {"x": feats})[0]
    with np.load(tmp_path / "out.npz") as out:
        got = out["y"]
    assert got.shape == ref.shape == (1, 98, text.VOCAB_SIZE)
    assert np.abs(got - ref).max() <= OUT_SCALE * (1 + 1e-4)
    ids = ref[0].argmax(-1)
    expected = "".join(text.VOCAB[i] for n, i in enumerate(ids) if i != 0 and (n == 0 or i != ids[n - 1]))
    assert expected and f"transcript: {expected}\n" in run.stdout

    _write_wav(tmp_path / "8k.wav", samples[:8000], rate=8000)
    run = subprocess.run([sys.executable, str(unpacked / "run.py"), str(tmp_path / "8k.wav")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "is 8000 Hz" in run.stderr and "sox" in run.stderr
