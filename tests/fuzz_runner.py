"""The child-process runner the seeded fuzz campaigns share (`fuzz_models.py`, `fuzz_inputs.py`).

A campaign's worker (the same script with `--worker ... --indices i,j,...`) appends one JSON line per case to
`out`: `{"index": i, "started": true}` before the case and the case's record (with an "outcome") after it. A
crash in native code kills the worker, not the campaign: the case it started is recorded as a crash by
`crash_record` and a new worker goes on with the cases left. A worker that writes nothing for `case_timeout`
seconds is killed the same way (a hang).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable


def run_in_children(worker: list[str], count: int, out: Path, workdir: Path,
                    crash_record: Callable[[int, int | None], dict], case_timeout: float,
                    poll_seconds: float = 0.5) -> list[dict]:
    """Run cases 0..count-1 through `worker` + `--indices ...` child processes; one record per case, in order."""
    out.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    done: dict[int, dict] = {}
    todo = list(range(count))
    with (workdir / "campaign.log").open("ab") as log:  # what TVM and ONNX Runtime print while the cases run
        while todo:
            proc = subprocess.Popen([*worker, "--indices", ",".join(map(str, todo))],
                                    env={**os.environ, "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"},
                                    stdout=log, stderr=subprocess.STDOUT)
            last_progress, seen = time.monotonic(), 0
            while proc.poll() is None:
                time.sleep(poll_seconds)
                lines = out.read_text().splitlines() if out.exists() else []
                if len(lines) != seen:
                    seen, last_progress = len(lines), time.monotonic()
                elif time.monotonic() - last_progress > case_timeout:
                    proc.kill()
                    proc.wait()
            records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
            for r in records:
                if "outcome" in r:
                    done[r["index"]] = r
            died = [r["index"] for r in records if r.get("started") and r["index"] not in done]
            for index in died:
                done[index] = crash_record(index, proc.returncode)
                with out.open("a") as f:
                    f.write(json.dumps(done[index]) + "\n")
            todo = [i for i in range(count) if i not in done]
    return [done[i] for i in range(count)]
