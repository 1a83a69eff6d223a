#!/usr/bin/env python3
"""Run a nativeq model on the device with only the TVM runtime (no compiler, no nativeq).

Shipped in every `nativeq bundle`; needs numpy and the `apache-tvm` + `apache-tvm-ffi` wheels
(of the versions in model/manifest.json).

    python3 run.py FEATURES.npy [-o outputs.npz] [--repeat 20]
    python3 run.py SPEECH.wav                          # 16 kHz mono 16-bit; log-mel front end in frontend.py
    python3 run.py NAME=FILE.npy [NAME=FILE.npy ...]   # models with several inputs

With a `vocab.json` beside this file (nativeq speech models), the first output is decoded
greedily (CTC: best token per frame, repeats merged, blanks dropped) and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# NOTE: must be set before the first `import tvm`: loads libtvm_runtime.so only, not the 250 MB compiler.
os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def cpu_features() -> set[str]:
    """CPU flags as /proc/cpuinfo spells them (`Features` on ARM, `flags` on x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Features", "flags"):
            return set(value.split())
    return set()


def wav_features(path: str, spec: dict) -> np.ndarray:
    """16 kHz mono 16-bit WAV -> log-mel features shaped like `spec` ([1, T, 80] or [1, 80, T])."""
    import wave

    sys.path.insert(0, str(HERE))
    try:
        import frontend
    except ImportError:
        fail("this bundle has no frontend.py: pass features as .npy")
    try:
        with wave.open(path, "rb") as w:
            rate, channels, width, promised = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            frames = w.readframes(promised)
    except (OSError, wave.Error, EOFError) as e:
        fail(f"cannot read {path} as a WAV file: {str(e) or 'it ends inside its header (empty or cut short)'}")
    if (rate, channels, width) != (frontend.SAMPLE_RATE, 1, 2):
        fail(f"{path} is {rate} Hz, {channels} channel(s), {8 * width}-bit; the front end takes "
             f"{frontend.SAMPLE_RATE} Hz mono 16-bit (convert with: sox {path} -r 16000 -c 1 -b 16 out.wav)")
    present = len(frames) // 2
    if present == 0:
        fail(f"{path}: no audio samples")
    if present < promised and promised < 0xFFFFFFFF // 2:  # 0xFFFFFFFF bytes: a streaming writer's "unknown"
        print(f"warning: {path}: the WAV header promises {promised} samples but the file holds {present}: "
              f"truncated; using the samples present", file=sys.stderr)
    feats = frontend.fbank(np.frombuffer(frames[: 2 * present], dtype="<i2").astype(np.float32) / 32768.0)  # [T, 80]
    shape = spec["shape"]
    if len(shape) == 3 and shape[2] == feats.shape[1]:
        return feats[None]
    if len(shape) == 3 and shape[1] == feats.shape[1]:
        return np.ascontiguousarray(feats.T[None])
    fail(f"input {spec['name']!r} has shape {shape}: not a [1, T, {feats.shape[1]}] or [1, {feats.shape[1]}, T] feature input")


def ctc_greedy(logits: np.ndarray, vocab: list[str]) -> str:
    """Best token per frame, repeats merged, blanks (id 0) dropped."""
    ids = logits.reshape(-1, logits.shape[-1]).argmax(axis=-1)
    kept = [int(i) for n, i in enumerate(ids) if i != 0 and (n == 0 or i != ids[n - 1])]
    return "".join(vocab[i] for i in kept)


def read_inputs(args: list[str], specs: list[dict]) -> list[np.ndarray]:
    """Arrays in the manifest's input order from `FILE.npy` (single input) or `NAME=FILE.npy` arguments."""
    named = {}
    for arg in args:
        name, sep, path = arg.partition("=")
        if not sep:
            if len(specs) != 1:
                fail(f"the model has {len(specs)} inputs ({', '.join(s['name'] for s in specs)}): pass NAME=FILE.npy")
            name, path = specs[0]["name"], arg
        named[name] = path
    arrays = []
    for spec in specs:
        if spec["name"] not in named:
            fail(f"missing input {spec['name']!r} ({spec['dtype']}{spec['shape']})")
        path = named.pop(spec["name"])
        try:
            array = wav_features(path, spec) if path.lower().endswith(".wav") else np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            fail(f"cannot read input {spec['name']!r}: {e}")
        if array.dtype != np.dtype(spec["dtype"]):
            fail(f"input {spec['name']!r} is {array.dtype}; the model takes {spec['dtype']} (convert with .astype)")
        if array.ndim != len(spec["shape"]) or any(
            isinstance(want, int) and want != got for want, got in zip(spec["shape"], array.shape)
        ):
            fail(f"input {spec['name']!r} has shape {list(array.shape)}; the model takes {spec['shape']}")
        if spec.get("value") is not None and not np.array_equal(array.reshape(-1), np.asarray(spec["value"], array.dtype)):
            fail(f"input {spec['name']!r} was fixed to {spec['value']} when the artifact was compiled "
                 "(compile --input-value)")
        arrays.append(np.require(array, requirements="C"))  # 0-d stays 0-d (ascontiguousarray: 1-d)
    if named:
        fail(f"unknown inputs {sorted(named)}; the model's inputs are {[s['name'] for s in specs]}")
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a nativeq model with the TVM runtime.")
    parser.add_argument("inputs", nargs="+", help="FILE.npy or SPEECH.wav, or NAME=FILE per input")
    parser.add_argument("-o", "--out", default="outputs.npz", help="where to write the outputs (.npz by output name)")
    parser.add_argument("--model", default=str(HERE / "model"), help="the model directory (default: ./model)")
    parser.add_argument("--repeat", type=int, default=0, help="also time this many runs")
    args = parser.parse_args()

    model_dir = Path(args.model)
    try:
        manifest = json.loads((model_dir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        fail(f"cannot read {model_dir / 'manifest.json'}: {e}")
    target = manifest["target"]
    machine = {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine().lower(), platform.machine().lower())
    if target["arch"] != machine:
        fail(f"the model is compiled for {target['arch']} (target {target['name']}); this machine is {machine}")
    have = cpu_features()
    missing = [f for f in target.get("cpu_features", []) if f not in have]
    if missing and have:
        fail(f"this CPU lacks {', '.join(missing)}, which target {target['name']} needs")
    arrays = read_inputs(args.inputs, manifest["inputs"])

    import tvm
    from tvm import runtime
    from tvm.runtime.vm import VirtualMachine

    if tvm.__version__ != manifest["tvm_version"]:
        print(f"warning: model built with TVM {manifest['tvm_version']}, running TVM {tvm.__version__}", file=sys.stderr)
    device = runtime.cpu(0)
    vm = VirtualMachine(runtime.load_module(str(model_dir / manifest["library"])), device)
    entry = vm[manifest.get("entry", "main")]
    tensors = [runtime.tensor(a, device) for a in arrays]
    result = entry(*tensors)
    values = [result] if isinstance(result, runtime.Tensor) else list(result)
    outputs = {spec["name"]: value.numpy() for spec, value in zip(manifest["outputs"], values)}
    tmp = Path(args.out).with_name(f".{Path(args.out).name}.tmp.npz")
    np.savez(tmp, **outputs)
    os.replace(tmp, args.out)
    for name, value in outputs.items():
        print(f"{name}: {value.dtype}{list(value.shape)}")
    print(f"wrote {args.out}")
    vocab_file = HERE / "vocab.json"
    if vocab_file.is_file():
        vocab = json.loads(vocab_file.read_text())
        first = values[0].numpy()
        if first.shape[-1] == len(vocab):
            print(f"transcript: {ctc_greedy(first, vocab)}")
    if args.repeat > 0:
        start = time.perf_counter()
        for _ in range(args.repeat):
            entry(*tensors)
        print(f"time_ms {(time.perf_counter() - start) * 1000 / args.repeat:.3f}")


if __name__ == "__main__":
    main()
