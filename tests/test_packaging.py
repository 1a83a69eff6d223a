"""What `pip install nativeq` gives: the shipped tuning databases found from any directory, a local
`./tuning_logs/` winning over them, `setup-arm` and missing extras as one-line errors, and (slow)
a wheel that carries the databases and compiles with them outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import onnx
import pytest
import qdq_models
from click.testing import CliRunner

from nativeq._data import LOCAL_TUNING_LOGS, shipped_tuning_logs
from nativeq.compile import CompileConfig, compile_model
from nativeq.compile.api import DATABASE_FILES, tuning_database
from nativeq.errors import NativeqError
from nativeq.targets import get_target

REPO = Path(__file__).resolve().parent.parent
VNNI = "x86-avx512-vnni"


def _host_base() -> str:
    return get_target("host").source.partition(":")[2]


def _tuned_model(path: Path) -> Path:
    """A QDQ matmul of the layer shape the shipped x86-avx512-vnni database holds a record for."""
    onnx.save(qdq_models.qdq_matmul(k=256, n=128, t=64, act_dtype="uint8"), path)
    return path


def _local_copy(root: Path, name: str) -> Path:
    local = root / "tuning_logs" / name
    local.mkdir(parents=True)
    for f in DATABASE_FILES:
        shutil.copy(shipped_tuning_logs() / VNNI / f, local / f)
    return local


def test_source_checkout_reads_the_repository_tuning_logs():
    link = REPO / "src" / "nativeq" / "tuning_logs"
    if shipped_tuning_logs() != link:
        pytest.skip("nativeq is not imported from this source checkout")
    assert link.is_symlink() and link.resolve() == REPO / "tuning_logs"


def test_compile_from_another_directory_applies_the_shipped_database(tmp_path, monkeypatch):
    if _host_base() != VNNI:
        pytest.skip(f"host is {get_target('host').source}, the shipped database is for {VNNI}")
    monkeypatch.chdir(tmp_path)
    assert not LOCAL_TUNING_LOGS.exists()
    model = _tuned_model(tmp_path / "mm.onnx")
    out = compile_model(model, tmp_path / "art", CompileConfig(target="host"))
    assert out.manifest["tuning"]["database"] == str(shipped_tuning_logs() / VNNI)
    assert out.manifest["tuning"]["applied"], out.manifest["tuning"]


def test_lookup_order_explicit_then_local_then_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = get_target(VNNI)
    assert tuning_database(CompileConfig(target=VNNI), target) == shipped_tuning_logs() / VNNI
    _local_copy(tmp_path, VNNI)
    assert tuning_database(CompileConfig(target=VNNI), target) == Path("tuning_logs") / VNNI
    explicit = _local_copy(tmp_path / "other", VNNI)
    assert tuning_database(CompileConfig(target=VNNI, tuning_log=str(explicit)), target) == explicit
    assert tuning_database(CompileConfig(target=VNNI, use_tuning=False), target) is None


def test_local_database_of_the_detected_target_wins_for_host(tmp_path, monkeypatch):
    base = _host_base()
    if not base:
        pytest.skip("host was not detected as a builtin target")
    monkeypatch.chdir(tmp_path)
    _local_copy(tmp_path, base)
    assert tuning_database(CompileConfig(target="host"), get_target("host")) == Path("tuning_logs") / base


def test_tune_status_from_another_directory_lists_shipped_and_local(nativeq_cli, tmp_path):
    shipped = shipped_tuning_logs() / VNNI
    res = nativeq_cli("tune", "--status")
    assert res.returncode == 0, res.stderr
    assert f"{shipped} (shipped with nativeq):" in res.stdout
    _local_copy(tmp_path, VNNI)
    res = nativeq_cli("tune", "--status")
    assert f"{Path('tuning_logs') / VNNI} (local):" in res.stdout
    assert f"{shipped} (shipped with nativeq):" in res.stdout


def test_tune_refuses_to_write_into_the_package():
    """An installed package (in a source checkout, the link leads out of it: tune writes the repository's records)."""
    from nativeq._data import PACKAGE_DIR
    from nativeq.tuning import TuneConfig, tune_model

    with pytest.raises(NativeqError, match="refusing to write tuning records into the installed nativeq package"):
        tune_model("unused.onnx", TuneConfig(target="host", work_dir=str(PACKAGE_DIR / "tuning_db" / VNNI)))


def test_tune_default_work_dir_is_the_current_directory(tmp_path, monkeypatch):
    from nativeq.tuning.tune import default_work_dir

    monkeypatch.chdir(tmp_path)
    assert default_work_dir(get_target(VNNI)) == Path("tuning_logs") / VNNI


def test_setup_arm_names_the_missing_apt_packages(nativeq_cli, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    res = nativeq_cli("setup-arm", env={**os.environ, "PATH": str(empty)})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: setup-arm needs aarch64-linux-gnu-g++, qemu-aarch64, gcc: install with "
        "`sudo apt-get install g++-aarch64-linux-gnu qemu-user gcc`"
    ]


def test_arm_runtime_goes_to_the_user_cache_outside_a_writable_venv(tmp_path, monkeypatch):
    from nativeq.runtime import emulate

    monkeypatch.delenv("NATIVEQ_ARM_RUNTIME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(emulate, "in_writable_venv", lambda: False)
    assert emulate.arm_runtime_dir() == tmp_path / "cache" / "nativeq" / "aarch64"
    monkeypatch.setattr(emulate, "in_writable_venv", lambda: True)
    assert emulate.arm_runtime_dir() == Path(sys.prefix) / "share" / "nativeq" / "aarch64"
    monkeypatch.setenv("NATIVEQ_ARM_RUNTIME", str(tmp_path / "mine"))
    assert emulate.arm_runtime_dir() == tmp_path / "mine"


def test_a_missing_extra_is_a_one_line_error(tmp_path, monkeypatch):
    from nativeq.cli import main

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "nativeq.models.average", raising=False)
    res = CliRunner().invoke(main, ["average", str(tmp_path), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == ["error: nativeq average needs torch: pip install 'nativeq[train]'"]


@pytest.mark.slow
def test_wheel_carries_the_tuning_logs_and_compiles_outside_the_repo(tmp_path):
    """`pip wheel .`, installed into a clean venv (no registry access: --no-index --no-deps; the
    dependencies come from this environment's site-packages through a .pth file), compiles and
    verifies a model from a directory outside the repository with the shipped tuning applied."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(wheels)],
                   cwd=REPO, check=True, capture_output=True)
    (wheel,) = wheels.glob("nativeq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (*DATABASE_FILES, "nativeq_tuning.json"):
        assert f"nativeq/tuning_logs/{VNNI}/{f}" in names
    assert "nativeq/targets/builtin.json" in names
    for shipped_model in ("conformer-tiny-int8", "conformer-tiny-int4-2to4"):
        assert {f"nativeq/pretrained/{shipped_model}/model.onnx", f"nativeq/pretrained/{shipped_model}/metrics.json"} <= names

    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # pip and the dependencies from this environment; a plain path line does not run its .pth files,
    # so this checkout's editable nativeq stays out.
    (purelib / "zz_nativeq_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
                   check=True, capture_output=True)

    work = tmp_path / "elsewhere"
    work.mkdir()
    model = _tuned_model(work / "mm.onnx")
    nativeq = venv / "bin" / "nativeq"

    def run(*args):
        res = subprocess.run([str(nativeq), *args], cwd=work, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return res.stdout

    listed = run("models")
    assert "conformer-tiny-int8" in listed and "conformer-tiny-int4-2to4" in listed
    shipped = purelib / "nativeq" / "tuning_logs" / VNNI
    assert f"{shipped} (shipped with nativeq):" in run("tune", "--status")
    if _host_base() != VNNI:
        pytest.skip(f"host is {get_target('host').source}: the shipped {VNNI} records do not apply to it")
    run("compile", model.name, "-t", "host", "-o", "art")
    manifest = json.loads((work / "art" / "manifest.json").read_text())
    assert manifest["tuning"]["database"] == str(shipped)
    assert manifest["tuning"]["applied"], manifest["tuning"]
    assert "PASS" in run("verify", "art", "--onnx", model.name)
