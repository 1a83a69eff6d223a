"""Targets are data: the builtin table, `host` detection, user files with `inherit`, bad entries."""

from __future__ import annotations

import json

import pytest

from nativeq.errors import NativeqError
from nativeq.runtime.cpu import cpu_features
from nativeq.targets import get_target, list_targets, set_user_targets_file

BUILTIN = {"x86-avx2", "x86-avx512-vnni", "rpi4", "rpi5", "aarch64", "host"}


@pytest.fixture
def user_targets(tmp_path):
    """Write a user targets file and select it; restore the builtin table afterwards."""

    def use(entries):
        path = tmp_path / "targets.json"
        path.write_text(json.dumps(entries) if not isinstance(entries, str) else entries)
        set_user_targets_file(path)
        return path

    yield use
    set_user_targets_file(None)


def test_builtin_targets_and_capabilities():
    names = {t.name for t in list_targets()}
    assert BUILTIN <= names
    assert get_target("x86-avx512-vnni").has_vnni and not get_target("x86-avx2").has_vnni
    assert get_target("rpi5").has_dotprod and not get_target("rpi4").has_dotprod
    for name in ("rpi4", "rpi5", "aarch64"):
        t = get_target(name)
        assert t.arch == "aarch64" and t.is_cross and t.cross_compiler == "aarch64-linux-gnu-g++"
        assert t.cross_package == "g++-aarch64-linux-gnu" and t.qemu_cpu
    assert not get_target("host").is_cross and get_target("host").cross_compiler is None


def test_every_builtin_tvm_dict_is_accepted_by_tvm_with_the_right_features():
    from nativeq.compile._tvm import TVMTarget, target_has_features

    for t in list_targets():
        tvm_target = TVMTarget(t.tvm_dict())
        assert int(tvm_target.attrs["num-cores"]) == t.cores
    assert target_has_features("avx512vnni", TVMTarget(get_target("x86-avx512-vnni").tvm_dict()))
    assert not target_has_features("avx512vnni", TVMTarget(get_target("x86-avx2").tvm_dict()))
    assert target_has_features("dotprod", TVMTarget(get_target("rpi5").tvm_dict()))
    assert not target_has_features("dotprod", TVMTarget(get_target("rpi4").tvm_dict()))


def test_host_is_a_target_this_cpu_runs():
    host = get_target("host")
    assert set(host.cpu_features) <= cpu_features()
    assert host.source.startswith("detected:")


def test_user_file_inherits_and_overrides(user_targets):
    user_targets({"targets": [
        {"name": "pi5-2core", "inherit": "rpi5", "cores": 2, "description": "a Pi 5 limited to 2 cores"},
        {"name": "rpi4", "inherit": "rpi4", "qemu_cpu": "cortex-a53"},
    ]})
    t = get_target("pi5-2core")
    assert t.cores == 2 and t.tvm_dict()["num-cores"] == 2
    assert t.tvm == get_target("rpi5").tvm and t.has_dotprod and t.cross_compiler == "aarch64-linux-gnu-g++"
    assert t.source.endswith("targets.json")
    assert get_target("rpi4").qemu_cpu == "cortex-a53"


def test_cli_targets_lists_user_targets(nativeq_cli, tmp_path):
    (tmp_path / "t.json").write_text(json.dumps([{"name": "my-box", "inherit": "x86-avx2", "cores": 16}]))
    res = nativeq_cli("--targets-file", "t.json", "targets", "--json")
    assert res.returncode == 0, res.stderr
    entries = {e["name"]: e for e in json.loads(res.stdout)}
    assert BUILTIN | {"my-box"} <= set(entries)
    assert entries["my-box"]["cores"] == 16 and entries["my-box"]["int8"] == "avx2"
    res = nativeq_cli("--targets-file", "t.json", "targets")
    assert res.returncode == 0
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("my-box "))
    assert '"num-cores":16' in line and "avx2" in line


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"name": "x", "inherit": "nope"}], "inherits unknown target 'nope'"),
        ([{"name": "x", "arch": "x86_64", "tvm": {"kind": "llvm"}}], "lacks int8"),
        ([{"name": "x", "arch": "x86_64", "tvm": {"kind": "llvm"}, "int8": "amx"}], "has int8='amx'; expected one of"),
        ([{"name": "x", "arch": "x86_64", "tvm": "llvm -mcpu=znver4", "int8": "avx2"}], "must be a TVM target dict"),
        ("{not json", "is not valid JSON"),
        ({"nothing": 1}, "expected a list of entries"),
    ],
)
def test_bad_user_entries(user_targets, entries, message):
    user_targets(entries)
    with pytest.raises(NativeqError, match=message.replace("(", r"\(").replace("[", r"\[")):
        list_targets()


def test_bad_targets_file_via_cli(nativeq_cli, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x", "inherit": "nope"}]))
    for args in (["--targets-file", "bad.json", "targets"], ["--targets-file", "missing.json", "targets"]):
        res = nativeq_cli(*args)
        assert res.returncode == 2
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
        assert "Traceback" not in res.stderr
    assert "missing.json does not exist" in res.stderr


def test_unknown_target_lists_valid_ones():
    with pytest.raises(NativeqError) as e:
        get_target("rpi9")
    assert "unknown target 'rpi9'" in str(e.value)
    for name in BUILTIN:
        assert name in str(e.value)


def test_target_dict_tvm_refuses_is_one_line_error():
    import dataclasses

    from nativeq.compile.api import make_tvm_target

    bad = dataclasses.replace(get_target("host"), name="bad", tvm={"kind": "no-such-kind"})
    with pytest.raises(NativeqError, match=r"^target bad: TVM refuses its target .*no-such-kind"):
        make_tvm_target(bad)
