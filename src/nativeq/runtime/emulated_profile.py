"""Where an aarch64 artifact's instructions go, kernel by kernel, under qemu (`nativeq profile --emulate`).

Without a device, the speed signal is the count of guest instructions qemu executes
(`emulate.count_instructions`). This module splits that count by kernel:

- qemu runs the artifact with nativeq's counting plugin in per-block mode (`tb=on`): at exit the
  plugin lists the instructions executed per translation-block start address;
- the runner copies the guest's `/proc/self/maps` at the end of the run (`--maps`), which gives
  the address `model.so` was loaded at and the other libraries' ranges;
- the function symbols of the aarch64 `model.so` (read from its ELF symbol table, standard library
  only) turn a block address into a function: TVM's packed wrapper `__tvm_ffi_<kernel>` and any
  `<kernel>_compute_...` body are both counted to `<kernel>`, the name in the manifest's kernel
  table; model.so's other functions (the VM's shape functions, compiler helpers) keep their own
  names; every block outside model.so is runtime/VM work (libtvm_runtime, libtvm_ffi, libc, the
  runner), counted by library.

Steady state as in `count_instructions`: one run with one inference, one with 1 + `repeat`; each
function's difference divided by `repeat`. A block is counted to the function its first
instruction lies in (a block never crosses a call, so only fall-through between adjacent
functions could blur this).

Imports numpy and the standard library only (this is `runtime/`).
"""

from __future__ import annotations

import bisect
import json
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from nativeq._text import aligned_table, nodes_text
from nativeq.errors import NativeqError
from nativeq.runtime.manifest import by_onnx_op, by_onnx_op_line, input_specs, kernel_onnx_nodes, kernel_onnx_op, read_manifest
from nativeq.runtime.profile import ProfileConfig, prepare_inputs

_NAME_WIDTH = 72  # kernel names in the table are cut in the middle to this width (--json has them whole)
_WRAPPER_PREFIX = "__tvm_ffi_"  # TVM's packed-function wrapper of a kernel (tvm-ffi ABI)
_COMPUTE_MARK = "_compute_"  # TVM's name of a kernel's body when it is not inlined into the wrapper
_NO_SYMBOL = "[model.so, no symbol]"
_VENEER_PREFIXES = ("e843419@", "e835769@")  # ld's names of its erratum workaround stubs


@dataclass(frozen=True)
class KernelInsns:
    """One function group's instructions per inference, with what the manifest says of it."""

    name: str
    instructions: int  # per inference, steady state
    share: float  # of the whole per-inference count
    where: str  # "kernel" (in the manifest's table), "model.so" (another function of it), "runtime" (a library)
    kind: str | None = None  # contraction / reduction / elementwise (manifest)
    schedule: str | None = None  # the schedule it was built with (manifest)
    calls: int | None = None  # call sites the compiler counted (manifest)
    macs: int | None = None  # multiply-accumulates per inference, all calls, at the manifest's kernel_dims
    mac_share: float | None = None  # its share of the model's MACs (manifest)
    onnx_nodes: tuple[str, ...] = ()  # the ONNX nodes its calls compute (manifest; compute nodes first)
    onnx_op: str | None = None  # the op of the first of them


@dataclass(frozen=True)
class EmulatedProfile:
    artifact: str
    target: str
    cpu: str
    inputs_from: str
    repeat: int
    dims: dict[str, int]  # the symbolic sizes profiled
    kernel_dims: dict[str, int] | None  # the sizes the manifest's MAC counts assume
    rows: tuple[KernelInsns, ...]  # kernels, model.so's other functions, runtime libraries; most first
    whole: int  # per inference, from the plugin's whole-run counts of the same two runs
    startup: int  # the one-inference run: loading, VM init, .npy I/O, first call
    lost_blocks: int  # translation blocks the plugin could not count per address (out of memory)

    @property
    def total(self) -> int:
        return sum(r.instructions for r in self.rows)

    def _sum(self, where: str) -> int:
        return sum(r.instructions for r in self.rows if r.where == where)

    input_dims: tuple[str, ...] = ()  # the symbolic sizes of the inputs (kernel_dims may name derived ones too)

    @property
    def macs_at_profiled_dims(self) -> bool:
        """The manifest's MAC counts hold for the profiled sizes (so instructions per MAC mean something):
        every input size the MAC counts assume is the one profiled (derived sizes follow from them)."""
        return self.kernel_dims is not None and all(self.dims.get(k) == v for k, v in self.kernel_dims.items()
                                                    if k in self.input_dims)

    def insns_per_mac(self, row: KernelInsns) -> float | None:
        if not self.macs_at_profiled_dims or not row.macs:
            return None
        return row.instructions / row.macs

    def table(self, top: int | None = 20) -> str:
        kernels = [r for r in self.rows if r.where == "kernel"]
        shown = kernels if top is None or top <= 0 else kernels[:top]
        per_mac = self.macs_at_profiled_dims
        lines = [f"{self.artifact} (target {self.target}, qemu-aarch64 -cpu {self.cpu}) on {self.inputs_from}: "
                 f"guest instructions per inference (steady state, mean of {self.repeat})"]
        rows = []
        for k in shown:
            name = k.name if len(k.name) <= _NAME_WIDTH else k.name[:_NAME_WIDTH - 28] + "..." + k.name[-25:]
            mac = "-" if k.mac_share is None else f"{100 * k.mac_share:.1f}%"
            row = [name, "-" if k.calls is None else str(k.calls), f"{k.instructions:,}", f"{100 * k.share:.1f}%",
                   k.kind or "-", k.schedule or "-", mac]
            if per_mac:
                ipm = self.insns_per_mac(k)
                row.append("-" if ipm is None else f"{ipm:.3f}")
            rows.append((*row, nodes_text(k.onnx_nodes)))
        header = ["kernel", "calls", "instructions", "share", "kind", "schedule", "MACs"] + (["insn/MAC"] if per_mac else []) \
            + ["ONNX nodes"]
        lines.append(aligned_table(tuple(header), rows))
        rest = kernels[len(shown):]
        if rest:
            lines.append(f"... {len(rest)} more kernel{'s' if len(rest) > 1 else ''}: "
                         f"{sum(k.instructions for k in rest):,} ({100 * sum(k.share for k in rest):.1f}%); "
                         f"--top 0 or --json lists all")
        for where, title in (("model.so", "other model.so functions"), ("runtime", "runtime/VM (outside model.so)")):
            group = [r for r in self.rows if r.where == where and r.instructions]
            if group:
                parts = ", ".join(f"{r.name} {r.instructions:,}" for r in group[:6])
                more = f", ... {len(group) - 6} more" if len(group) > 6 else ""
                lines.append(f"{title}: {self._sum(where):,} ({100 * self._sum(where) / max(self.whole, 1):.1f}%): "
                             f"{parts}{more}")
        if not per_mac and self.kernel_dims:
            sizes = ", ".join(f"{k}={v}" for k, v in sorted(self.kernel_dims.items()))
            lines.append(f"MACs: shares at the manifest's sizes ({sizes}); instructions per MAC need --dim at those "
                         f"sizes")
        by_op = by_onnx_op_line(self.by_op, "kernel instructions")
        if by_op:
            lines.append(by_op)
        lines.append(f"total {self.total:,} per inference (kernels {100 * self._sum('kernel') / max(self.whole, 1):.1f}%, "
                     f"runtime/VM {100 * self._sum('runtime') / max(self.whole, 1):.1f}%) vs the whole count "
                     f"{self.whole:,}; startup and first call {self.startup / 1e6:.1f} M"
                     + (f"; {self.lost_blocks} blocks uncounted" if self.lost_blocks else ""))
        return "\n".join(lines)

    @property
    def by_op(self) -> dict[str, float]:
        """Kernel instructions per inference by the ONNX op of each kernel's first node (`manifest.by_onnx_op`)."""
        return by_onnx_op((r.onnx_op, r.instructions) for r in self.rows if r.where == "kernel")

    def to_json(self) -> str:
        data = asdict(self)
        data["rows"] = [dict(asdict(r), insns_per_mac=self.insns_per_mac(r)) for r in self.rows]
        data.update(total=self.total, kernels_total=self._sum("kernel"), model_so_other_total=self._sum("model.so"),
                    runtime_total=self._sum("runtime"), by_onnx_op=self.by_op)
        return json.dumps(data, indent=2)


# ----------------------------------------------------------------------------- ELF symbols
def _sext(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) & 1 else value


def _code_references(code: bytes, at: int, start: int, end: int) -> set[int]:
    """Addresses the aarch64 code in [start, end) (mapped at link-time address `at`) computes or calls:
    ADR, ADRP + ADD (how TVM passes a parallel lambda to TVMBackendParallelLaunch) and BL. Not B: its
    targets are a function's own labels (or a tail call), not functions of their own."""
    targets, pages = set(), {}
    for pc in range(start - start % 4, end - 3, 4):
        offset = pc - at
        if offset < 0 or offset + 4 > len(code):
            continue
        insn = int.from_bytes(code[offset:offset + 4], "little")
        if insn & 0x1F000000 == 0x10000000:  # ADR / ADRP
            imm = _sext(((insn >> 5) & 0x7FFFF) << 2 | (insn >> 29) & 3, 21)
            if insn >> 31:
                pages[insn & 0x1F] = (pc & ~0xFFF) + (imm << 12)
            else:
                targets.add(pc + imm)
        elif insn & 0xFF800000 == 0x91000000:  # ADD Xd, Xn, #imm{, LSL #12}
            base = pages.get((insn >> 5) & 0x1F)
            if base is not None:
                targets.add(base + (((insn >> 10) & 0xFFF) << (12 if insn >> 22 & 1 else 0)))
        elif insn & 0xFC000000 == 0x94000000:  # BL
            targets.add(pc + (_sext(insn & 0x3FFFFFF, 26) << 2))
    return targets


def elf_functions(path) -> tuple[list[tuple[int, int, str]], int]:
    """Functions of an aarch64 ELF64 library as (start, end, name) sorted by start, and the link-time
    address of the file's start (first PT_LOAD's p_vaddr - p_offset; 0 for a shared library).

    Named functions come from `.symtab` (local ones too), or `.dynsym` of a stripped library. TVM
    emits its parallel lambdas (and some `_compute_` bodies) with private linkage, hence without a
    symbol: code outside every symbol that a function references (ADR / ADRP+ADD / BL, how the
    wrapper hands its lambda to TVMBackendParallelLaunch) is taken as a function of the referencing
    function's name, up to the next function, transitively. A symbol's run-time address is its
    address + (the load address of file offset 0 - the returned link-time address).
    """
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise NativeqError(f"{path} is not a 64-bit little-endian ELF file")
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 0x36)
    base = None
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr = struct.unpack_from("<IIQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1 and base is None:  # PT_LOAD
            base = p_vaddr - p_offset
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    # the code: the executable sections (.init, .plt, .text, .fini), which the linker puts together
    executable = [(addr, offset, size) for _, kind, flags, addr, offset, size, *_ in sections if kind == 1 and flags & 4]
    if not executable:
        return [], base or 0
    code_at = min(addr for addr, _, _ in executable)
    code_end = max(addr + size for addr, _, size in executable)
    first = min(executable)
    code = data[first[1]:first[1] + code_end - code_at]
    names = data[sections[struct.unpack_from("<H", data, 0x3E)[0]][4]:] if e_shnum else b""
    plt = [(addr, addr + size) for name, kind, flags, addr, _, size, *_ in sections
           if kind == 1 and flags & 4 and names[name:names.index(b"\0", name)] == b".plt"]
    tables = [s for s in sections if s[1] == 2] or [s for s in sections if s[1] == 11]  # SHT_SYMTAB, else SHT_DYNSYM
    named: dict[int, tuple[int, str]] = {}
    for _, _, _, _, offset, size, link, _, _, entsize in tables[:1]:
        strtab = sections[link]
        strings = data[strtab[4]:strtab[4] + strtab[5]]
        for at in range(offset, offset + size, entsize or 24):
            st_name, st_info, _, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", data, at)
            if st_info & 0xF == 2 and st_shndx != 0 and st_value:  # STT_FUNC, defined
                name = strings[st_name:strings.index(b"\0", st_name)].decode(errors="replace")
                if name.startswith(_VENEER_PREFIXES) or name.endswith("_veneer"):
                    continue  # a linker stub (erratum 843419, long branch): its caller's, found by reference below
                if st_size >= named.get(st_value, (0, ""))[0]:
                    named[st_value] = (st_size, name)
    for start, end in plt:  # the PLT's stubs (calls into the TVM runtime and libc): apart, not any one kernel's
        named.setdefault(start, (end - start, "[model.so plt]"))
    starts = sorted(named)

    def covered(address: int) -> bool:
        i = bisect.bisect_right(starts, address) - 1
        return i >= 0 and address < starts[i] + max(named[starts[i]][0], 4)

    # unnamed code referenced from a named function, then from what that found, and so on, in rounds: an
    # unnamed function ends where the next known one starts, so every start a round can find is known
    # before the next round scans (a range reaching over other lambdas would claim their code)
    found: dict[int, str] = {}
    frontier = [(start, start + size, name) for start, (size, name) in named.items() if size]
    while frontier:
        new: dict[int, str] = {}
        for start, end, name in frontier:
            for target in sorted(_code_references(code, code_at, start, end)):
                if code_at <= target < code_end and target % 4 == 0 and not covered(target) \
                        and target not in found and target not in new:
                    new[target] = name
        found.update(new)
        bounds = sorted({*starts, *found, code_end})
        frontier = [(target, bounds[bisect.bisect_right(bounds, target)], name) for target, name in new.items()]
    boundaries = sorted({*starts, *found, code_end})
    functions = []
    for start in sorted({*starts, *found}):
        following = boundaries[bisect.bisect_right(boundaries, start)] if start < boundaries[-1] else start + 4
        if start in named:
            size, name = named[start]
            functions.append((start, start + size if size else following, name))
        else:
            functions.append((start, following, found[start]))
    return functions, base or 0


# ----------------------------------------------------------------------------- attribution
@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    offset: int
    path: str


def _parse_maps(text: str) -> list[_Mapping]:
    maps = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        start, _, end = fields[0].partition("-")
        try:
            maps.append(_Mapping(int(start, 16), int(end, 16), int(fields[2], 16), fields[5] if len(fields) > 5 else ""))
        except ValueError:
            continue
    maps.sort(key=lambda m: m.start)
    return maps


def _parse_tb_log(log: str, artifact) -> tuple[dict[int, int], int]:
    counts, lost = {}, 0
    for line in log.splitlines():
        if line.startswith("tb "):
            _, addr, value = line.split()
            counts[int(addr, 16)] = int(value)
        elif line.startswith("tb_lost "):
            lost = int(line.split()[1])
    if not counts:
        raise NativeqError(f"the qemu instruction-count plugin reported no per-block counts for artifact {artifact} "
                           f"(an older plugin build? run `nativeq setup-arm --force`)")
    return counts, lost


def kernel_of(symbol: str, kernels: Mapping[str, dict]) -> str:
    """The manifest kernel a function symbol of model.so belongs to, else the symbol itself
    (`__tvm_ffi_K`, `K_compute_`, `K_compute_.N` -> K; any `shape_func*` -> shape_func)."""
    name = symbol.removeprefix(_WRAPPER_PREFIX)
    if _COMPUTE_MARK in name:
        name = name[:name.index(_COMPUTE_MARK)]
    if name in kernels:
        return name
    stem = name.split(".", 1)[0]  # LLVM's clones and outlined parts: K.1, K.extracted, ...
    if stem in kernels:
        return stem
    return "shape_func" if stem.startswith("shape_func") else name


class _Attributor:
    """Maps a guest address to (group, name): a model.so function or a library, from one run's memory map."""

    def __init__(self, maps_text: str, library: str, functions, link_base: int, kernels: Mapping[str, dict]):
        self.maps = _parse_maps(maps_text)
        self.starts = [m.start for m in self.maps]
        mine = [m for m in self.maps if m.path == library]
        if not mine:
            raise NativeqError(f"the guest's memory map does not list {library}: cannot place its kernels")
        self.bias = min(m.start - m.offset for m in mine) - link_base
        self.library = library
        self.addresses = [f[0] for f in functions]
        self.functions = functions
        self.kernels = kernels

    def __call__(self, address: int) -> tuple[str, str]:
        i = bisect.bisect_right(self.starts, address) - 1
        mapping = self.maps[i] if i >= 0 and address < self.maps[i].end else None
        if mapping is None:
            return "runtime", "[unmapped]"
        if mapping.path != self.library:
            return "runtime", Path(mapping.path).name if mapping.path.startswith("/") else (mapping.path or "[anon]")
        local = address - self.bias
        j = bisect.bisect_right(self.addresses, local) - 1
        if j < 0:
            return "model.so", _NO_SYMBOL
        _, end, name = self.functions[j]
        if local >= end:
            return "model.so", _NO_SYMBOL
        kernel = kernel_of(name, self.kernels)
        if self.kernels:
            return ("kernel" if kernel in self.kernels else "model.so"), kernel
        # an artifact without a kernel table: every function but the VM's shape functions counts as a kernel
        return ("model.so" if kernel == "shape_func" else "kernel"), kernel


def _by_function(run, artifact, functions, link_base, kernels) -> tuple[dict[tuple[str, str], int], int, int]:
    """One run's instructions by (group, name), its whole count, and its uncounted blocks."""
    from nativeq.runtime.emulate import _insns

    counts, lost = _parse_tb_log(run.plugin_log, artifact)
    where = _Attributor(run.maps, run.library, functions, link_base, kernels)
    groups: dict[tuple[str, str], int] = {}
    for address, insns in counts.items():
        key = where(address)
        groups[key] = groups.get(key, 0) + insns
    return groups, _insns(run.plugin_log, artifact), lost


def _manifest_kernels(manifest: dict) -> dict[str, dict]:
    records = manifest.get("kernels")
    if not isinstance(records, list):
        return {}
    return {r["name"]: r for r in records if isinstance(r, dict) and isinstance(r.get("name"), str)}


def _optional(record: dict, key: str, kinds):
    value = record.get(key)
    return value if isinstance(value, kinds) and not isinstance(value, bool) else None


def _macs(record: dict) -> int | None:
    """A kernel's multiply-accumulates per inference: the manifest counts them per call."""
    macs, calls = _optional(record, "macs", int), _optional(record, "calls", int)
    return None if macs is None else macs * (1 if calls is None else calls)


def profile_emulated(artifact, cfg: ProfileConfig = ProfileConfig(emulate=True), *, cpu: str | None = None,
                     timeout: float | None = None) -> EmulatedProfile:
    """Guest instructions per inference of each kernel of an aarch64 `artifact`, under qemu (module docstring).

    `cfg.runs` is the number of inferences the long run makes beyond the short run's one; the
    runs are single-threaded (`cfg.threads` must be unset or 1). `cpu` overrides the emulated CPU
    model (default: the target's `qemu_cpu`).
    """
    from nativeq.runtime import emulate

    repeat = cfg.runs
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise NativeqError(f"--runs must be at least 1, got {repeat!r}")
    if cfg.threads not in (None, 1):
        raise NativeqError(f"--threads {cfg.threads}: instruction counts under qemu are taken on one thread "
                           f"(per-thread counters are not kept); drop --threads")
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    target = manifest["target"]
    if target.get("arch") != "aarch64":
        raise NativeqError(f"artifact {artifact} is for {target.get('arch')} (target {target.get('name')}): "
                           f"--emulate profiles aarch64 artifacts only (drop --emulate to time it here)")
    inputs, source = prepare_inputs(manifest, cfg)
    library = artifact / manifest["library"]
    functions, link_base = elf_functions(library)
    kernels = _manifest_kernels(manifest)
    plugin = emulate.build_insn_plugin()
    timeout = timeout or emulate.DEFAULT_TIMEOUT_S
    runs = [emulate.emulate_run(artifact, inputs, cpu, timeout, 1, runner_args, plugin, ("tb=on",), maps=True)
            for runner_args in ([], ["--repeat", str(repeat)])]
    (once, base, lost_once), (many, total, lost_many) = (
        _by_function(run, artifact, functions, link_base, kernels) for run in runs)
    whole = round((total - base) / repeat)
    rows = []
    for key in set(once) | set(many):
        where, name = key
        insns = round((many.get(key, 0) - once.get(key, 0)) / repeat)
        if insns == 0 and where != "kernel":
            continue
        record = kernels.get(name, {}) if where == "kernel" else {}
        rows.append(KernelInsns(
            name=name, instructions=insns, share=insns / whole if whole else 0.0, where=where,
            kind=_optional(record, "kind", str), schedule=_optional(record, "schedule", str),
            calls=_optional(record, "calls", int), macs=_macs(record),
            mac_share=_optional(record, "share", (int, float)), onnx_nodes=kernel_onnx_nodes(record),
            onnx_op=kernel_onnx_op(record),
        ))
    for name, record in kernels.items():  # a kernel that never ran still gets its row (0 instructions)
        if ("kernel", name) not in once and ("kernel", name) not in many:
            rows.append(KernelInsns(name=name, instructions=0, share=0.0, where="kernel",
                                    kind=_optional(record, "kind", str), schedule=_optional(record, "schedule", str),
                                    calls=_optional(record, "calls", int), macs=_macs(record),
                                    mac_share=_optional(record, "share", (int, float)),
                                    onnx_nodes=kernel_onnx_nodes(record), onnx_op=kernel_onnx_op(record)))
    rows.sort(key=lambda r: (-r.instructions, r.name))
    kernel_dims = manifest.get("kernel_dims") if isinstance(manifest.get("kernel_dims"), dict) else None
    return EmulatedProfile(
        artifact=str(artifact), target=str(target.get("name")), cpu=cpu or target.get("qemu_cpu") or "max",
        inputs_from=source, repeat=repeat, dims=dict(cfg.dims), kernel_dims=kernel_dims, rows=tuple(rows),
        whole=whole, startup=base, lost_blocks=lost_once + lost_many,
        input_dims=tuple(sorted({d for spec in input_specs(manifest) for d in (spec.shape or ()) if isinstance(d, str)})),
    )
