import os
import sys
from pathlib import Path

import pytest

# Keep test processes from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TVM_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def nativeq_cli(tmp_path):
    """Run `nativeq ...` as a user would; returns CompletedProcess (text)."""
    import subprocess

    exe = Path(sys.executable).with_name("nativeq")

    def run(*args, check=False, **kw):
        return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, check=check,
                              cwd=kw.pop("cwd", tmp_path), **kw)

    return run
