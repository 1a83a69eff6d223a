"""What an artifact costs on the device: weight, code, library and activation-arena bytes; debug stripping.

`compile_model` fills the manifest's `sizes` field from three sources:

- weight bytes: the tensor constants of the Relax module exactly as it goes to the VM code
  generator (after every packing pass: a weight stored two int4 values per byte, or compressed,
  counts as stored), each distinct content once, as the VM constant pool keeps it. Each kernel
  record gets the bytes of the distinct constants its calls read (`weight_bytes`).
- code and library bytes: the ELF section headers of `model.so` (read here, stdlib only, so an
  aarch64 library reads the same as an x86 one): code is the `.text` section.
- arena bytes: the storage `StaticPlanBlockMemory` plans (every `alloc_storage` of the Relax
  functions). A size in a symbolic dim (e.g. `64 * T`) is kept as an expression (`arena_expr`)
  and evaluated at the kernel report's sizes (`arena_dims`); the outputs, allocated per call,
  are not part of it.

Debug sections: TVM's LLVM code generator always emits DWARF, and nothing in TVM 0.27 turns it
off; the library is linked with `-Wl,--strip-debug` (`LINK_STRIP_OPTIONS`), so it never carries
it, and `strip_debug` (`strip --strip-debug`, `objcopy --strip-debug`, or `<triple>-strip` for a
cross target) is the fallback when a linker kept it.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from nativeq._text import first_line
from nativeq.errors import NativeqError

LINK_STRIP_OPTIONS = ["-Wl,--strip-debug"]
DEBUG_PREFIXES = (".debug", ".zdebug")
PLANNED_PASS = "StaticPlanBlockMemory"  # the pass after which the planned storage is read
MB = 1e6


# ----------------------------------------------------------------------------- ELF
@dataclass(frozen=True)
class Section:
    name: str
    type: int
    flags: int
    size: int


_NOBITS = 8  # SHT_NOBITS (.bss): takes no file bytes


def elf_sections(path: str | Path) -> list[Section]:
    """The section headers of the ELF file `path` (32 or 64 bit, either byte order)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise NativeqError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise NativeqError(f"{path} is not an ELF file")
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    try:
        if wide:
            shoff, = struct.unpack_from(order + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)
            layout = order + "IIQQQQIIQQ"  # name, type, flags, addr, offset, size, link, info, align, entsize
        else:
            shoff, = struct.unpack_from(order + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x2E)
            layout = order + "IIIIIIIIII"
        headers = [struct.unpack_from(layout, data, shoff + i * shentsize) for i in range(shnum)]
        names = headers[shstrndx] if shnum else None
    except (struct.error, IndexError):
        raise NativeqError(f"{path} is a truncated ELF file (its section headers are cut off)") from None

    def name(offset: int) -> str:
        if names is None:
            return ""
        start = names[4] + offset
        end = data.find(b"\0", start)
        return data[start:end if end >= 0 else len(data)].decode("ascii", "replace")

    return [Section(name(h[0]), h[1], h[2], h[5]) for h in headers]


def debug_sections(sections: list[Section]) -> list[Section]:
    return [s for s in sections if s.name.startswith(DEBUG_PREFIXES)]


def code_bytes(sections: list[Section]) -> int:
    """Bytes of machine code: the `.text` section."""
    return sum(s.size for s in sections if s.name == ".text")


# ----------------------------------------------------------------------------- stripping
def strip_tools(cross_compiler: str | None) -> list[list[str]]:
    """Commands (without the file) that drop debug sections, in order of preference; [] when none is installed.

    A cross target uses the binutils of its compiler's triple (`aarch64-linux-gnu-g++` ->
    `aarch64-linux-gnu-strip`); the host uses `strip`, else `objcopy`.
    """
    if cross_compiler:
        stem = Path(cross_compiler).name
        prefix = stem[:stem.rfind("-") + 1] if "-" in stem else ""
        names = [f"{prefix}strip", f"{prefix}objcopy"] if prefix else []
    else:
        names = ["strip", "objcopy"]
    return [[found, "--strip-debug"] for found in (shutil.which(n) for n in names) if found]


def strip_debug(path: str | Path, cross_compiler: str | None = None) -> bool:
    """Drop the debug sections of the library `path` in place; True when it has none afterwards.

    Without a strip tool (or when it fails) the file stays as it is, with a warning that says so.
    """
    path = Path(path)
    if not debug_sections(elf_sections(path)):
        return True
    tools = strip_tools(cross_compiler)
    if not tools:
        wanted = "binutils for " + Path(cross_compiler).name if cross_compiler else "strip or objcopy (apt-get install binutils)"
        warnings.warn(f"{path.name} keeps its debug sections: no tool to strip them found (install {wanted})",
                      stacklevel=2)
        return False
    problem = ""
    for cmd in tools:
        try:
            done = subprocess.run([*cmd, str(path)], capture_output=True, text=True)
        except OSError as e:
            problem = e.strerror or str(e)
            continue
        if done.returncode == 0 and not debug_sections(elf_sections(path)):
            return True
        problem = first_line(done.stderr) or f"exit {done.returncode}"
    warnings.warn(f"{path.name} keeps its debug sections: {' '.join(tools[-1][:2])} failed ({problem})", stacklevel=2)
    return False


# ----------------------------------------------------------------------------- capturing the module
def capture_instrument():
    """A pass instrument keeping the Relax module after `StaticPlanBlockMemory` (`.planned`) and after each
    Relax-level pass (`.final`: the module as the VM code generator gets it)."""
    from nativeq.compile._tvm import relax, tvm

    @tvm.instrument.pass_instrument
    class CaptureSizes:
        def __init__(self):
            self.planned = None
            self.final = None

        def run_after_pass(self, mod, info):
            # the TIR lowering that follows runs in the same context: only modules with Relax functions count
            if not any(isinstance(f, relax.Function) for _, f in mod.functions_items()):
                return
            self.final = mod
            if info.name == PLANNED_PASS:
                self.planned = mod

    return CaptureSizes()


# ----------------------------------------------------------------------------- weights
def is_tensor_constant(expr) -> bool:
    """A Relax constant holding a tensor (not a dtype, string or shape: those are GenericConst too)."""
    from nativeq.compile._tvm import tvm

    if not isinstance(expr, tvm.ir.GenericConst):
        return False
    value = expr.value
    return hasattr(value, "shape") and hasattr(getattr(value, "dtype", None), "bits")


def _relax_functions(mod) -> list:
    from nativeq.compile._tvm import relax

    return [f for _, f in mod.functions_items() if isinstance(f, relax.Function)]


def constant_bytes(const) -> int:
    """Bytes of one tensor constant as stored: element count x bits (sub-byte types packed) rounded up."""
    value = const.value
    count = 1
    for dim in value.shape:
        count *= int(dim)
    dtype = value.dtype
    return (count * int(dtype.bits) * int(dtype.lanes) + 7) // 8


def _content_key(const):
    """Equal for constants of equal dtype, shape and bytes (the VM constant pool keeps such constants once)."""
    value = const.value
    try:
        digest = hashlib.sha256(value.numpy().tobytes()).hexdigest()
    except Exception:  # noqa: BLE001  (a dtype numpy cannot hold: fall back to the object itself)
        digest = f"object:{id(value)}"
    return str(value.dtype), tuple(int(d) for d in value.shape), digest


def weight_bytes(mod) -> tuple[int, dict[str, int]]:
    """(bytes of every distinct tensor constant of `mod`'s Relax functions, {kernel: bytes of the distinct
    constants its calls read}); a kernel is a called GlobalVar (a PrimFunc after CallTIRRewrite) or the
    callee of a `call_tir`."""
    from nativeq.compile._tvm import relax, tvm

    everything: dict = {}
    per_kernel: dict[str, dict] = {}
    for func in _relax_functions(mod):
        bound = {}
        for block in getattr(func.body, "blocks", []):
            for binding in block.bindings:
                if is_tensor_constant(binding.value):
                    bound[binding.var] = binding.value

        def constants_in(expr, out):
            if is_tensor_constant(expr):
                out.append(expr)
            elif isinstance(expr, relax.Var) and expr in bound:
                out.append(bound[expr])
            elif isinstance(expr, relax.Tuple):
                for field in expr.fields:
                    constants_in(field, out)

        def visit(expr):
            if is_tensor_constant(expr):
                everything.setdefault(_content_key(expr), constant_bytes(expr))
                return
            if not isinstance(expr, relax.Call):
                return
            if isinstance(expr.op, tvm.ir.GlobalVar):
                name, args = expr.op.name_hint, list(expr.args)
            elif expr.args and isinstance(expr.args[0], tvm.ir.GlobalVar):  # call_tir and its kin
                name, args = expr.args[0].name_hint, list(expr.args[1:])
            else:
                return
            found: list = []
            for arg in args:
                constants_in(arg, found)
            if found:
                reads = per_kernel.setdefault(name, {})
                for const in found:
                    reads.setdefault(_content_key(const), constant_bytes(const))

        relax.analysis.post_order_visit(func.body, visit)
    return sum(everything.values()), {name: sum(reads.values()) for name, reads in per_kernel.items()}


# ----------------------------------------------------------------------------- activation arena
def arena(mod, dims: dict[str, int]) -> tuple[int | None, str | None, dict[str, int]]:
    """(bytes, expression, the dims it was evaluated at) of the storage planned in `mod` (after
    StaticPlanBlockMemory): every `alloc_storage` of its Relax functions, summed. The expression is None
    when every size is static; bytes None when a size stays symbolic after binding `dims` (names missing
    from `dims` take the kernel report's defaults)."""
    from nativeq.compile._tvm import Analyzer, relax, tirx, tvm
    from nativeq.compile.kernels import report_dims

    alloc = tvm.ir.Op.get("relax.memory.alloc_storage")
    sizes: list = []

    def visit(expr):
        # alloc_storage(size, device index, scope, dtype): the size is in bytes whatever the dtype (a hint)
        if isinstance(expr, relax.Call) and expr.op.same_as(alloc) and isinstance(expr.args[0], relax.ShapeExpr):
            size = 1
            for value in expr.args[0].values:
                size = size * value
            sizes.append(size)

    for func in _relax_functions(mod):
        relax.analysis.post_order_visit(func.body, visit)
    if not sizes:
        return 0, None, {}
    analyzer = Analyzer()
    total = sizes[0]
    for size in sizes[1:]:
        total = total + size
    total = analyzer.simplify(total)
    if isinstance(total, tirx.IntImm):
        return int(total), None, {}
    free = list(tirx.analysis.undefined_vars(total, []))  # two functions' `T` are two vars of one name
    at = report_dims([var.name for var in free], dims)
    bound = Analyzer()
    for var in free:
        bound.bind(var, tirx.IntImm(var.ty.dtype, int(at[var.name])))
    value = bound.simplify(total)
    # NOTE: None at sizes the model cannot take (a waveform of 64 samples, shorter than its first conv's kernel,
    # gives negative lengths): the expression still says what the arena costs
    known = isinstance(value, tirx.IntImm) and int(value) >= 0
    return (int(value) if known else None), expr_text(total), at


_BINARY = {"Add": "+", "Sub": "-", "Mul": "*", "FloorDiv": "//", "FloorMod": "%", "Div": "/"}


def expr_text(expr) -> str:
    """A size expression with its variables' own names (`64*T + 128`; TVMScript would print `T_1 * T.int64(64)`)."""
    from nativeq.compile._tvm import tirx

    if isinstance(expr, tirx.IntImm):
        return str(int(expr.value))
    if isinstance(expr, tirx.Var):
        return expr.name
    kind = type(expr).__name__
    if kind in _BINARY:
        a, b = expr_text(expr.a), expr_text(expr.b)
        if kind == "Mul" and isinstance(expr.b, tirx.IntImm):
            a, b = b, a  # 64*T, not T*64
        left, right = (expr.b, expr.a) if kind == "Mul" and isinstance(expr.b, tirx.IntImm) else (expr.a, expr.b)

        def wrap(child, text: str, is_left: bool) -> str:
            inner = type(child).__name__
            plain = (inner not in _BINARY or kind == "Add" or (kind == "Mul" and inner == "Mul")
                     or (kind == "Sub" and is_left and inner in ("Add", "Sub")))
            return text if plain else f"({text})"

        a, b = wrap(left, a, True), wrap(right, b, False)
        return f"{a}{_BINARY[kind]}{b}" if kind == "Mul" else f"{a} {_BINARY[kind]} {b}"
    if kind in ("Min", "Max"):
        return f"{kind.lower()}({expr_text(expr.a)}, {expr_text(expr.b)})"
    if isinstance(expr, tirx.Cast):
        return expr_text(expr.value)
    return str(expr)


# ----------------------------------------------------------------------------- the manifest field
def sizes_field(library: Path, weights: int | None, arena_result) -> dict:
    """The manifest's `sizes`: {weight_bytes, code_bytes, library_bytes, debug_bytes, stripped, arena_bytes,
    arena_expr, arena_dims}."""
    sections = elf_sections(library)
    debug = sum(s.size for s in debug_sections(sections))
    arena_bytes, arena_expr, arena_dims = arena_result if arena_result is not None else (None, None, {})
    return {
        "weight_bytes": weights,
        "code_bytes": code_bytes(sections),
        "library_bytes": library.stat().st_size,
        "debug_bytes": debug,
        "stripped": debug == 0,
        "arena_bytes": arena_bytes,
        "arena_expr": arena_expr,
        "arena_dims": dict(arena_dims),
    }


def _mb(value) -> str:
    if value is None:
        return "?"
    return f"{value / 1e3:.1f} kB" if value < 100_000 else f"{value / MB:.2f} MB"


def sizes_line(sizes: dict | None) -> str | None:
    """`weights 0.62 MB, code 0.41 MB, library 1.10 MB (stripped), activation arena 0.35 MB (T=64)`, or None."""
    if not sizes:
        return None
    at = ", ".join(f"{k}={v}" for k, v in (sizes.get("arena_dims") or {}).items())
    return (f"weights {_mb(sizes.get('weight_bytes'))}, code {_mb(sizes.get('code_bytes'))}, "
            f"library {_mb(sizes.get('library_bytes'))}"
            + ("" if sizes.get("stripped", True) else f" (debug sections {_mb(sizes.get('debug_bytes'))})")
            + f", activation arena {_mb(sizes.get('arena_bytes'))}" + (f" ({at})" if at else ""))
