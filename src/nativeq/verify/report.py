"""Per-output comparison of an artifact against ONNX Runtime, and the report users read.

Quantized outputs (integer dtype, or float produced by a DequantizeLinear) are compared in
quantization steps: |artifact - reference| / scale (per channel along the DequantizeLinear
axis), 1 for integer outputs. They pass when the largest difference is within `tol_steps`.
Plain float outputs pass when max |diff| <= rtol · max |reference| (default rtol
`DEFAULT_RTOL` = 1e-3). NaN/Inf where the reference is finite always fails.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from nativeq._text import aligned_table
from nativeq.errors import VerificationFailed

DEFAULT_RTOL = 1e-3


@dataclass
class OutputComparison:
    """The agreement of one output, accumulated over all runs."""

    name: str
    dtype: str
    shape: tuple = ()
    quantized: bool = False
    quant_dtype: str | None = None
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_steps: float | None = None
    exact_pct: float | None = None
    tolerance: str = ""
    passed: bool = True
    problem: str | None = None
    _elements: int = field(default=0, repr=False)
    _abs_sum: float = field(default=0.0, repr=False)
    _exact: int = field(default=0, repr=False)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["shape"] = list(self.shape)
        return d


def _step_sizes(quant: dict | None, shape: tuple[int, ...]) -> np.ndarray:
    """Per-element quantization step of a dequantized output (broadcastable to `shape`)."""
    scale = np.asarray(quant["scale"], np.float64)
    if scale.ndim == 0 or quant.get("axis") is None:
        return scale
    axis = quant["axis"] % len(shape)
    view = [1] * len(shape)
    view[axis] = -1
    return scale.reshape(view)


def accumulate(comp: OutputComparison, got: np.ndarray, ref: np.ndarray, quant: dict | None,
               tol_steps: float, rtol: float) -> None:
    """Fold one run's `got` vs `ref` for this output into `comp`."""
    if got.shape != ref.shape:
        comp.passed = False
        comp.problem = f"shape {tuple(got.shape)} vs reference {tuple(ref.shape)}"
        return
    comp.shape = tuple(ref.shape)
    is_int = np.issubdtype(ref.dtype, np.integer) or ref.dtype == np.bool_
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    nonfinite = ~np.isfinite(got.astype(np.float64)) & np.isfinite(ref.astype(np.float64))
    if nonfinite.any():
        comp.passed = False
        comp.problem = f"{int(nonfinite.sum())} non-finite values where the reference is finite"
        diff = np.where(nonfinite, np.inf, diff)
    diff = np.nan_to_num(diff, nan=0.0, posinf=np.inf)
    if diff.size:
        comp.max_abs = max(comp.max_abs, float(diff.max()))
    comp._abs_sum += float(diff[np.isfinite(diff)].sum())
    comp._elements += diff.size
    comp.mean_abs = comp._abs_sum / max(comp._elements, 1)
    if is_int or quant is not None:
        comp.quantized = True
        comp.quant_dtype = ref.dtype.name if is_int else quant["dtype"]
        steps = diff if is_int else diff / _step_sizes(quant, ref.shape)
        comp._exact += int((steps < 0.5).sum())
        comp.max_steps = max(comp.max_steps or 0.0, float(steps.max()) if steps.size else 0.0)
        comp.exact_pct = 100.0 * comp._exact / comp._elements if comp._elements else None  # an empty output: "-"
        # NOTE: 8- and 16-bit integers are quantized values, a step apart; wider integers and booleans (an ArgMax's
        # token ids, lengths, masks) are not: one off is as wrong as any other value, so they must be exact.
        tolerance = tol_steps if not is_int or ref.dtype.itemsize <= 2 and ref.dtype != np.bool_ else 0.0
        comp.tolerance = "exact" if tolerance == 0 else f"{tolerance:g} step" + ("" if tolerance == 1 else "s")
        if comp.max_steps > tolerance + 1e-3:
            comp.passed = False
    else:
        bound = rtol * float(np.abs(ref).max()) if ref.size else 0.0
        comp.tolerance = f"rtol {rtol:g} (|diff| <= {bound:.3g})"
        if diff.size and float(diff.max()) > bound:
            comp.passed = False


@dataclass
class VerifyReport:
    artifact: str
    onnx: str
    target: str
    execution: str  # "native" or "emulated (...)"
    ort_opt: str
    runs: int
    seed: int
    dims: dict
    inputs_from: str
    outputs: list[OutputComparison]
    notes: list[str] = field(default_factory=list)
    localizations: list = field(default_factory=list)  # `localize.Localization`s of a failure
    accept_ties: bool = False

    @property
    def within_tolerance(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def ties_accepted(self) -> bool:
        """Some output is beyond tolerance, and every such output localizes to a tie the site reproduces in isolation."""
        failed = {o.name for o in self.outputs if not o.passed}
        covered = {name for loc in self.localizations if loc.kind == "tie" and loc.isolated_agrees for name in loc.outputs}
        return (self.accept_ties and bool(failed) and failed <= covered
                and all(loc.kind == "tie" and loc.isolated_agrees for loc in self.localizations))

    @property
    def passed(self) -> bool:
        return self.within_tolerance or self.ties_accepted

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k not in ("outputs", "localizations")}
        d["outputs"] = [o.to_json() for o in self.outputs]
        if self.localizations:
            d["localization"] = self.localizations[0].to_json()
            if len(self.localizations) > 1:
                d["localizations"] = [loc.to_json() for loc in self.localizations]
        d["ties_accepted"] = self.ties_accepted
        d["passed"] = self.passed
        return json.dumps(d, indent=2)

    def table(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        head = (
            f"verify {self.artifact} (target {self.target}, {self.execution}) vs ONNX Runtime "
            f"(graph optimizations: {self.ort_opt}) on {self.onnx}\n"
            f"inputs: {self.inputs_from}; runs: {self.runs}; seed: {self.seed}" + (f"; dims: {dims}" if dims else "")
        )
        header = ("output", "dtype", "shape", "max|diff|", "mean|diff|", "max steps", "exact %", "tolerance", "result")
        rows = []
        for o in self.outputs:
            rows.append((
                o.name,
                o.dtype + (f" (q {o.quant_dtype})" if o.quantized and o.quant_dtype != o.dtype else ""),
                "[" + ", ".join(map(str, o.shape)) + "]",
                f"{o.max_abs:.4g}",
                f"{o.mean_abs:.3g}",
                "-" if o.max_steps is None else f"{o.max_steps:.3g}",
                "-" if o.exact_pct is None else f"{o.exact_pct:.3f}",
                o.tolerance,
                ("ok" if o.passed else "FAIL") + (f": {o.problem}" if o.problem else ""),
            ))
        lines = [head, aligned_table(header, rows)]
        lines += [f"note: {n}" for n in self.notes]
        lines += [loc.paragraph() for loc in self.localizations]
        failed = [o.name for o in self.outputs if not o.passed]
        if not failed:
            lines.append("PASS")
        elif self.ties_accepted:
            lines.append(f"PASS (--accept-ties): {', '.join(failed)} beyond tolerance, from rounding ties only")
        else:
            lines.append(f"FAIL: {', '.join(failed)} beyond tolerance")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        failed = [o for o in self.outputs if not o.passed]
        if not failed or self.ties_accepted:
            return
        details = "; ".join(
            f"{o.name}: {o.problem or (f'max {o.max_steps:.3g} steps > {o.tolerance}' if o.quantized else f'max |diff| {o.max_abs:.3g} > {o.tolerance}')}"
            for o in failed
        )
        raise VerificationFailed(f"{len(failed)} of {len(self.outputs)} outputs differ from ONNX Runtime beyond tolerance ({details})")
