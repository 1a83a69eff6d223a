"""Artifacts of one model timed alternately in one process: the first is the reference, each other's time a ratio.

    python -m benchmarks.alternate SYMBOLIC_ART STATIC_ART [MORE_ART ...] --dim T=200 [--turns 20] [--threads 2]

Each turn runs every artifact in order (3 warm-up runs, then 10 timed), so a change of the machine's speed touches all
of them; the medians over the turns are printed with the ratio to the first artifact, and whether every output is
bit-identical to the first artifact's on the same seeded input. For builds of one model that should compute the same
(a symbolic and a `--dim` build, the code before and after a schedule change): the noise of two separate runs on a
shared VM is larger than the differences measured here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from nativeq.runtime import load
from nativeq.runtime.manifest import input_specs
from nativeq.runtime.profile import random_inputs


def alternate(artifacts: list[str], dims: dict[str, int], turns: int, threads: int) -> list[dict]:
    """Per artifact: median ms per run over `turns` alternating turns, and whether its outputs equal the first's."""
    models = [load(path, threads=threads) for path in artifacts]
    inputs = random_inputs(input_specs(models[0].manifest), dims)  # what `nativeq profile --dim` feeds
    reference = models[0].run(inputs)
    identical = [all(np.array_equal(np.asarray(out[k]), np.asarray(reference[k])) for k in reference)
                 for out in (model.run(inputs) for model in models)]
    times = [[] for _ in models]
    for _ in range(turns):
        for model, samples in zip(models, times):
            for _ in range(3):
                model.run(inputs)
            start = time.perf_counter()
            for _ in range(10):
                model.run(inputs)
            samples.append((time.perf_counter() - start) / 10)
    return [{"artifact": path, "ms": float(np.median(samples)) * 1e3, "identical": same}
            for path, samples, same in zip(artifacts, times, identical)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", help="artifact directories; the first is the reference")
    parser.add_argument("--dim", action="append", default=[], help="a symbolic size, e.g. T=200 (repeatable)")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if len(args.artifacts) < 2:
        parser.error("give at least two artifacts")
    dims = {name: int(size) for name, size in (d.split("=", 1) for d in args.dim)}
    rows = alternate(args.artifacts, dims, args.turns, args.threads)
    first = rows[0]["ms"]
    for row in rows:
        print(f"{row['artifact']}: {row['ms']:.3f} ms  {row['ms'] / first:.2f}x  "
              f"{'bit-identical' if row['identical'] else 'OUTPUTS DIFFER'}")


if __name__ == "__main__":
    main()
