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


@pytest.fixture(scope="session")
def speech_artifact(tmp_path_factory):
    """A tiny random float Conformer (the shipped architecture) compiled for `host`: for tests of the audio and
    transcribe paths, not of the model's accuracy. Shared read-only."""
    torch = pytest.importorskip("torch")
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.export.float_onnx import export_float
    from nativeq.models.conformer import ConformerConfig, ConformerCTC
    from nativeq.models.train import save_run

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("speech")
    save_run(root / "run", ConformerCTC(ConformerConfig(d_model=16, n_layers=1, n_heads=2, ff_mult=1, conv_kernel=3,
                                                        subsample_channels=4, dropout=0.0)))
    export_float(root / "run", root / "float.onnx")
    compile_model(root / "float.onnx", root / "host", CompileConfig(target="host", use_tuning=False))
    return root / "host"
