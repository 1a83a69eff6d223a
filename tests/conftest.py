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


@pytest.fixture(scope="session")
def matmul_artifact(tmp_path_factory):
    """`tests/qdq_models.qdq_matmul()` (symbolic T) compiled for `host`: (onnx_path, artifact_dir).

    Built without any tuning database, so it does not depend on the working directory's
    `tuning_logs/`. Shared read-only: copy the directory before modifying it.
    """
    import onnx
    import qdq_models

    from nativeq.compile import CompileConfig, compile_model

    root = tmp_path_factory.mktemp("matmul_artifact")
    onnx_path = root / "qdq_matmul.onnx"
    onnx.save(qdq_models.qdq_matmul(), onnx_path)
    compile_model(onnx_path, root / "artifact", CompileConfig(target="host", use_tuning=False))
    return onnx_path, root / "artifact"
