"""Run an ONNX model with ONNX Runtime, for `nativeq bench --emulate` (ORT as the aarch64 peer).

Executed by Debian's arm64 python3 under `qemu-aarch64` with the aarch64 onnxruntime and numpy
wheels on PYTHONPATH (`nativeq setup-arm`); needs nothing else (stdlib, numpy, onnxruntime):

    ort_run.py MODEL.onnx INPUTS.npz OUTPUTS.npz [--level all[,basic,...]] [--repeat N]

Creates one session on one thread at the first graph-optimization level ORT accepts (its
full optimizer rejects some valid QDQ graphs; prints the level used), runs it once on the inputs, then N more times (so a run with
--repeat N minus a run without it is N steady-state inferences: python startup, imports and the
session creation cancel out), and writes the last outputs in the session's output order
(out0, out1, ...). Exit 2 with "ort_run: ..." on stderr for a usage, model or input error.
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ort_run.py")
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    parser.add_argument("--level", default="all", help="comma-separated levels, tried in order: all, basic, disabled")
    parser.add_argument("--repeat", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    # NOTE: ORT 1.32 starts a telemetry thread that writes a database under $HOME at session creation;
    # its work depends on time and on that database, which would make the instruction counts noisy.
    ort.disable_telemetry_events()
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    wanted = args.level.split(",")
    unknown = [w for w in wanted if w not in levels]
    if unknown:
        print(f"ort_run: unknown optimization level {unknown[0]!r} (known: {', '.join(levels)})", file=sys.stderr)
        return 2
    session, failures = None, []
    for level in wanted:
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[level]
        # NOTE: one thread: the instruction-count plugin has one counter, and one core is what is compared.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
            break
        except Exception as e:  # noqa: BLE001 - ORT raises its own pybind exception types
            failures.append(f"{level}: {(str(e).strip().splitlines() or [type(e).__name__])[0][:160]}")
    if session is None:
        print(f"ort_run: ONNX Runtime cannot load {args.model} ({'; '.join(failures)})", file=sys.stderr)
        return 2
    try:
        with np.load(args.inputs, allow_pickle=False) as data:
            feeds = {name: data[name] for name in data.files}
        names = [i.name for i in session.get_inputs()]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise ValueError(f"inputs {missing} of the model are not in {args.inputs}")
        feeds = {n: feeds[n] for n in names}
        outputs = session.run(None, feeds)
        for _ in range(args.repeat):
            outputs = session.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - ORT raises its own pybind exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"ort_run: {first[:300]}", file=sys.stderr)
        return 2
    np.savez(args.outputs, **{f"out{i}": np.asarray(o) for i, o in enumerate(outputs)})
    print(f"outputs {len(outputs)} level {level}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
