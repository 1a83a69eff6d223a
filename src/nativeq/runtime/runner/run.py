#!/usr/bin/env python3
"""Run a nativeq model on the device with only the TVM runtime (no compiler, no nativeq).

Shipped in every `nativeq bundle`; needs numpy and the `apache-tvm` + `apache-tvm-ffi` wheels
(of the versions in model/manifest.json).

    python3 run.py FEATURES.npy [-o outputs.npz] [--repeat 20]
    python3 run.py NAME=FILE.npy [NAME=FILE.npy ...]   # models with several inputs
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
        try:
            array = np.load(named.pop(spec["name"]), allow_pickle=False)
        except (OSError, ValueError) as e:
            fail(f"cannot read input {spec['name']!r}: {e}")
        if array.dtype != np.dtype(spec["dtype"]):
            fail(f"input {spec['name']!r} is {array.dtype}; the model takes {spec['dtype']} (convert with .astype)")
        if array.ndim != len(spec["shape"]) or any(
            isinstance(want, int) and want != got for want, got in zip(spec["shape"], array.shape)
        ):
            fail(f"input {spec['name']!r} has shape {list(array.shape)}; the model takes {spec['shape']}")
        arrays.append(np.ascontiguousarray(array))
    if named:
        fail(f"unknown inputs {sorted(named)}; the model's inputs are {[s['name'] for s in specs]}")
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a nativeq model with the TVM runtime.")
    parser.add_argument("inputs", nargs="+", help="FILE.npy, or NAME=FILE.npy per input")
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
    if args.repeat > 0:
        start = time.perf_counter()
        for _ in range(args.repeat):
            entry(*tensors)
        print(f"time_ms {(time.perf_counter() - start) * 1000 / args.repeat:.3f}")


if __name__ == "__main__":
    main()
