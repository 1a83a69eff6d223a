"""Target entries: the builtin table, user files, and the `host` entry detected from this CPU."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from nativeq.errors import NativeqError
from nativeq.runtime.cpu import cpu_features, machine_arch

INT8_FAMILIES = ("avx512-vnni", "avx2", "neon", "sdot")
_BUILTIN = Path(__file__).with_name("builtin.json")
_user_file: Path | None = None


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str  # "x86_64" or "aarch64"
    tvm: dict  # TVM 0.27 target dict (the string form is refused by TVM)
    cores: int
    int8: str  # int8 instruction family the schedules use, one of INT8_FAMILIES
    cpu_features: tuple[str, ...] = ()  # /proc/cpuinfo flags a CPU needs to run the code
    cross_compiler: str | None = None  # None: the host's C++ compiler
    cross_package: str | None = None  # Debian package that provides cross_compiler
    qemu_cpu: str | None = None  # `qemu-aarch64 -cpu` model to emulate this device
    source: str = "builtin"
    extra: dict = field(default_factory=dict)

    @property
    def has_vnni(self) -> bool:
        return self.int8 == "avx512-vnni"

    @property
    def has_dotprod(self) -> bool:
        return self.int8 == "sdot"

    @property
    def is_cross(self) -> bool:
        return self.arch != host_arch()

    def tvm_dict(self, num_cores: int | None = None) -> dict:
        d = dict(self.tvm)
        d["num-cores"] = int(num_cores or self.cores)
        return d

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["cpu_features"] = list(self.cpu_features)
        return d


def set_user_targets_file(path: str | os.PathLike | None) -> None:
    """Use `path` (a JSON file of target entries) in addition to the builtin table."""
    global _user_file
    _user_file = Path(path) if path else None
    _load_all.cache_clear()


def host_arch() -> str:
    return machine_arch()


def host_cpu_features() -> frozenset[str]:
    """CPU features of this machine, as Linux spells them (see `nativeq.runtime.cpu`)."""
    return cpu_features()


def _entry_to_target(entry: dict, source: str, known: dict[str, Target]) -> Target:
    entry = dict(entry)
    base = entry.pop("inherit", None)
    if base is not None:
        if base not in known:
            raise NativeqError(f"{source}: target {entry.get('name')!r} inherits unknown target {base!r}")
        merged = known[base].to_json()
        merged.pop("source", None)
        merged.update(entry)
        entry = merged
    names = {f.name for f in dataclasses.fields(Target)}
    missing = [k for k in ("name", "arch", "tvm", "int8") if k not in entry]
    if missing:
        raise NativeqError(f"{source}: target entry {entry.get('name', '?')!r} lacks {', '.join(missing)}")
    if entry["int8"] not in INT8_FAMILIES:
        raise NativeqError(
            f"{source}: target {entry['name']!r} has int8={entry['int8']!r}; expected one of {', '.join(INT8_FAMILIES)}"
        )
    if not isinstance(entry["tvm"], dict) or "kind" not in entry["tvm"]:
        raise NativeqError(f"{source}: target {entry['name']!r}: 'tvm' must be a TVM target dict with a 'kind'")
    extra = {k: v for k, v in entry.items() if k not in names}
    kwargs = {k: v for k, v in entry.items() if k in names and k not in ("source", "extra")}
    kwargs.setdefault("description", "")
    kwargs.setdefault("cores", 1)
    kwargs["cpu_features"] = tuple(kwargs.get("cpu_features", ()))
    return Target(**kwargs, source=source, extra=extra)


def _read_entries(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NativeqError(f"targets file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise NativeqError(f"targets file {path} is not valid JSON: {e}") from None
    entries = data.get("targets") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise NativeqError(f"targets file {path}: expected a list of entries or {{'targets': [...]}}")
    return entries


def _user_files() -> list[Path]:
    files = []
    default = Path.home() / ".config" / "nativeq" / "targets.json"
    if default.is_file():
        files.append(default)
    if os.environ.get("NATIVEQ_TARGETS"):
        files.append(Path(os.environ["NATIVEQ_TARGETS"]))
    if _user_file is not None:
        files.append(_user_file)
    return files


def _detect_host(known: dict[str, Target]) -> Target | None:
    """The best builtin entry this CPU can run, renamed `host`, with this machine's core count."""
    flags = host_cpu_features()
    arch = host_arch()
    order = ["x86-avx512-vnni", "x86-avx2"] if arch == "x86_64" else ["rpi5", "aarch64"]
    for name in order:
        t = known.get(name)
        if t is not None and set(t.cpu_features) <= flags:
            tvm = dict(t.tvm)
            if arch == "aarch64":
                tvm.pop("mtriple", None)
            return dataclasses.replace(
                t,
                name="host",
                description=f"this machine ({arch}, detected as {name})",
                tvm=tvm,
                cores=os.cpu_count() or 1,
                cross_compiler=None,
                cross_package=None,
                qemu_cpu=None,
                source=f"detected:{name}",
            )
    return None


@lru_cache(maxsize=1)
def _load_all() -> dict[str, Target]:
    known: dict[str, Target] = {}
    for entry in _read_entries(_BUILTIN):
        t = _entry_to_target(entry, "builtin", known)
        known[t.name] = t
    host = _detect_host(known)
    if host is not None:
        known["host"] = host
    for path in _user_files():
        for entry in _read_entries(path):
            t = _entry_to_target(entry, str(path), known)
            known[t.name] = t
    return known


def list_targets() -> list[Target]:
    return list(_load_all().values())


def get_target(name: str) -> Target:
    known = _load_all()
    if name not in known:
        raise NativeqError(f"unknown target {name!r}; valid targets: {', '.join(known)}")
    return known[name]
