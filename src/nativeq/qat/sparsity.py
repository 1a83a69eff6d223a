"""Sparsity-aware training: magnitude masks on the integer QAT layers.

`sparsify_(model, SparsityConfig(...))` gives every selected `QuantLayer` a weight mask;
`update_masks(model, step)` recomputes it on schedule. The mask is applied to the float
master weight *before* it is quantized (prune, then quantize), so the integer product
never sees a pruned weight and the integer weights satisfy the pattern exactly.

Patterns act on the weight viewed as the GEMM matrix [out, in] (a conv weight
[out, in/groups, *kernel] is flattened to [out, in/groups * prod(kernel)]):
- "unstructured": the smallest |w| of the layer.
- "N:M" (e.g. "2:4", "1:4"): at most N non-zeros in each run of M consecutive inputs.
- "RxC" blocks (e.g. "1x4": 1 output x 4 inputs, "4x1"): blocks ranked by sum |w|.
- "RxCb" balanced blocks (e.g. "16x4b": 16 outputs x 4 consecutive inputs, the tile of a
  VNNI/sdot int8 kernel that skips zero blocks): the rows are cut into bands of R outputs
  (the last band may be shorter) and the inputs into blocks of C (the last may be
  narrower); inside each band the blocks are ranked by sum |w| and the top
  K = max(1, round_half_up((1 - s) * ceil(in / C))) are kept, the rest are zero. Every band
  keeps the same K blocks, so a kernel's per-band block lists have equal length. Ties keep
  the lower input index.

Schedule (Zhu & Gupta's cubic ramp): s(t) = s_f + (s_i - s_f) * (1 - p)^3 with
p = (t - start_step) / (end_step - start_step) clipped to [0, 1]; the masks are recomputed
every `update_every` steps until `end_step`, then frozen. For N:M, s(t) sets how many of
each group's M weights are pruned (round(s(t) * M), reaching M - N at the end); for "RxCb",
how many blocks each band keeps (K above with s = s(t)).

A layer's `sparsity_pattern` (recorded per layer in the QDQ export's metadata) is the
pattern, with the final sparsity appended where the pattern does not fix it
("unstructured:0.5", "16x4b:0.5"; "2:4" and, as before, plain "RxC" blocks as given):
`pattern_violations` checks an integer weight against it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nativeq.errors import NativeqError
from nativeq.qat.quantize import quant_layers

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^(\d+)x(\d+)$")
_BALANCED = re.compile(r"^(\d+)x(\d+)b$")


@dataclass(frozen=True)
class SparsityConfig:
    """pattern: "unstructured", "N:M", "RxC" or "RxCb" (balanced blocks, e.g. "16x4b");
    sparsity: final fraction of zeros (for N:M it is 1 - N/M and may be left None); the cubic
    ramp runs from `initial_sparsity` at `start_step` to `sparsity` at `end_step`, recomputing
    masks every `update_every` steps."""

    pattern: str = "2:4"
    sparsity: float | None = None
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 0
    update_every: int = 1

    def __post_init__(self):
        kind = self.kind
        if kind == "nm":
            n, m = self.nm
            if m < 1 or n < 1 or n >= m:
                raise NativeqError(f"sparsity pattern {self.pattern!r}: need 1 <= N < M in N:M")
            if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise NativeqError(f"sparsity pattern {self.pattern!r} fixes sparsity at {1 - n / m:g}, not {self.sparsity:g}")
        elif self.sparsity is None:
            raise NativeqError(f"sparsity pattern {self.pattern!r} needs a final sparsity (e.g. 0.5)")
        if kind in ("block", "balanced") and min(self.block) < 1:
            raise NativeqError(f"sparsity pattern {self.pattern!r}: block sizes must be >= 1")
        final = self.final_sparsity
        if not 0.0 < final < 1.0:
            raise NativeqError(f"sparsity {final:g} must be in (0, 1)")
        if not 0.0 <= self.initial_sparsity <= final:
            raise NativeqError(f"initial sparsity {self.initial_sparsity:g} must be in [0, {final:g}]")
        if self.start_step < 0 or self.end_step < self.start_step:
            raise NativeqError(f"sparsity schedule: need 0 <= start_step <= end_step (got {self.start_step}, {self.end_step})")
        if self.update_every < 1:
            raise NativeqError(f"sparsity update_every {self.update_every} must be >= 1")

    @property
    def kind(self) -> str:
        if self.pattern == "unstructured":
            return "unstructured"
        if _NM.match(self.pattern):
            return "nm"
        if _BLOCK.match(self.pattern):
            return "block"
        if _BALANCED.match(self.pattern):
            return "balanced"
        raise NativeqError(f"sparsity pattern {self.pattern!r} not understood (use 'unstructured', 'N:M' like 2:4, "
                           "a block 'RxC' like 1x4, or balanced blocks 'RxCb' like 16x4b)")

    @property
    def nm(self) -> tuple[int, int]:
        n, m = _NM.match(self.pattern).groups()
        return int(n), int(m)

    @property
    def block(self) -> tuple[int, int]:
        r, c = (_BLOCK.match(self.pattern) or _BALANCED.match(self.pattern)).groups()
        return int(r), int(c)

    @property
    def layer_pattern(self) -> str:
        """What a sparsified layer records as its `sparsity_pattern` (and the export as its metadata)."""
        if self.kind == "unstructured":
            return f"unstructured:{self.final_sparsity:g}"
        if self.kind == "balanced":
            return f"{self.pattern}:{self.final_sparsity:g}"
        return self.pattern

    @property
    def final_sparsity(self) -> float:
        if self.kind == "nm":
            n, m = self.nm
            return 1.0 - n / m
        return float(self.sparsity)

    def sparsity_at(self, step: int) -> float:
        if self.end_step == self.start_step:
            return self.final_sparsity if step >= self.start_step else self.initial_sparsity
        p = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - p) ** 3


# ---------------------------------------------------------------- masks

def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).to(torch.float32)


def _keep_top(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """1 for all but the `n_prune` smallest scores (flattened)."""
    flat = scores.reshape(-1)
    keep = torch.ones_like(flat)
    if n_prune > 0:
        idx = torch.topk(flat, n_prune, largest=False).indices
        keep[idx] = 0.0
    return keep.reshape(scores.shape)


def balanced_blocks_kept(n_blocks: int, sparsity: float) -> int:
    """Blocks each band keeps in an "RxCb" pattern: round half up of (1 - sparsity) * n_blocks,
    at least 1 (a band never goes all-zero) and at most n_blocks."""
    kept = math.floor(round((1.0 - sparsity) * n_blocks, 9) + 0.5)
    return max(1, min(n_blocks, kept))


def balanced_layer_pattern(pattern: str) -> tuple[int, int, float] | None:
    """(R, C, s) of a layer's balanced-block pattern "RxCb:s" (None for any other pattern)."""
    name, _, amount = pattern.partition(":")
    if not _BALANCED.match(name):
        return None
    if not amount:
        raise NativeqError(f"balanced block pattern {pattern!r} needs its sparsity (e.g. {name}:0.5)")
    try:
        cfg = SparsityConfig(name, sparsity=float(amount))
    except ValueError:
        raise NativeqError(f"balanced block pattern {pattern!r}: {amount!r} is not a number") from None
    return (*cfg.block, cfg.final_sparsity)


def _block_grid(mat: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[bands, blocks per band] sums of `mat` [rows, cols] over RxC blocks (zero-padded at the ragged edges)."""
    r, c = block
    rows, cols = mat.shape
    pr, pc = (-rows) % r, (-cols) % c
    padded = F.pad(mat, (0, pc, 0, pr))
    return padded.reshape((rows + pr) // r, r, (cols + pc) // c, c).sum(dim=(1, 3))


def compute_mask(weight: torch.Tensor, config: SparsityConfig, sparsity: float) -> torch.Tensor:
    """The magnitude mask of `weight` at `sparsity` (a fraction of zeros) for the config's pattern."""
    mag = _as_matrix(weight)
    rows, cols = mag.shape
    kind = config.kind
    if kind == "unstructured":
        mask = _keep_top(mag, int(round(sparsity * mag.numel())))
    elif kind == "nm":
        n, m = config.nm
        n_prune = min(int(round(sparsity * m)), m - n)
        pad = (-cols) % m
        # padding scores -1: pruned first, so a short last group keeps at most N real weights
        padded = F.pad(mag, (0, pad), value=-1.0).reshape(rows, -1, m)
        if n_prune > 0:
            idx = torch.topk(padded, n_prune, dim=-1, largest=False).indices
            keep = torch.ones_like(padded).scatter_(-1, idx, 0.0)
        else:
            keep = torch.ones_like(padded)
        mask = keep.reshape(rows, -1)[:, :cols]
    elif kind == "balanced":
        r, c = config.block
        scores = _block_grid(mag.to(torch.float64), (r, c))  # [bands, blocks per band]
        kept = balanced_blocks_kept(scores.shape[1], sparsity)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :kept]
        keep = torch.zeros_like(scores, dtype=torch.float32).scatter_(1, order, 1.0)
        mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    else:
        r, c = config.block
        pr, pc = (-rows) % r, (-cols) % c
        padded = F.pad(mag, (0, pc, 0, pr))
        blocks = padded.reshape((rows + pr) // r, r, (cols + pc) // c, c).sum(dim=(1, 3))
        keep = _keep_top(blocks, int(round(sparsity * blocks.numel())))
        mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    return mask.reshape(weight.shape).to(weight.dtype)


def pattern_violations(int_weight: torch.Tensor, pattern: str) -> int:
    """How often an integer weight breaks a layer's pattern (0 = the pattern holds exactly).

    "N:M": groups of M consecutive inputs with more than N non-zeros. "RxCb:s" (balanced
    blocks at final sparsity s): bands of R outputs with more than K non-zero RxC blocks
    (K from `balanced_blocks_kept`; a kept block may hold zeros after rounding, so a band may
    have fewer, never more). Plain block and unstructured patterns bound only how many
    weights are zero: check those with `zero_blocks` / the zero fraction."""
    balanced = balanced_layer_pattern(pattern)
    if balanced is not None:
        r, c, sparsity = balanced
        counts = band_block_counts(int_weight, (r, c))
        cols = int_weight.reshape(int_weight.shape[0], -1).shape[1]
        return int((counts > balanced_blocks_kept(-(-cols // c), sparsity)).sum())
    if not _NM.match(pattern):
        return 0
    mat = int_weight.reshape(int_weight.shape[0], -1)
    rows, cols = mat.shape
    n, m = map(int, pattern.split(":"))
    nz = F.pad((mat != 0).to(torch.int32), (0, (-cols) % m)).reshape(rows, -1, m).sum(-1)
    return int((nz > n).sum())


def band_block_counts(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per band of R outputs: how many of its RxC blocks hold a non-zero ([bands] int64)."""
    mat = (weight.reshape(weight.shape[0], -1) != 0).to(torch.float32)
    return (_block_grid(mat, block) > 0).sum(dim=1)


def zero_blocks(int_weight: torch.Tensor, block: tuple[int, int]) -> float:
    """Fraction of RxC blocks that are entirely zero."""
    mat = (int_weight.reshape(int_weight.shape[0], -1) != 0).to(torch.float32)
    r, c = block
    rows, cols = mat.shape
    mat = F.pad(mat, (0, (-cols) % c, 0, (-rows) % r))
    blocks = mat.reshape(mat.shape[0] // r, r, mat.shape[1] // c, c).sum(dim=(1, 3))
    return float((blocks == 0).float().mean())


# ---------------------------------------------------------------- attaching and stepping

def sparsify_(model: nn.Module, config: SparsityConfig,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Give the selected quantized layers of `model` a magnitude mask (in place); returns `model`.

    Call after `quantize_`. The masks are set for step 0 right away; call
    `update_masks(model, step)` once per training step.
    """
    layers = quant_layers(model)
    if not layers:
        raise NativeqError("sparsify_: the model has no quantized layers (call quantize_ first)")
    chosen = [(n, m) for n, m in layers if filter_fn is None or filter_fn(m, n)]
    if not chosen:
        raise NativeqError(f"sparsify_: the layer filter matched no quantized layer in {type(model).__name__}")
    for _, layer in chosen:
        layer.sparsity_config = config
        layer.sparsity_pattern = config.layer_pattern
        layer.weight_mask = torch.ones_like(layer.weight, requires_grad=False)
        layer.register_buffer("mask_frozen", torch.tensor(False))
    update_masks(model, 0)
    return model


@torch.no_grad()
def update_masks(model: nn.Module, step: int) -> int:
    """Recompute the masks that are due at `step`; freeze them at `end_step`. Returns how many changed."""
    changed = 0
    for _, layer in quant_layers(model):
        cfg = getattr(layer, "sparsity_config", None)
        if cfg is None or bool(layer.mask_frozen):
            continue
        final = step >= cfg.end_step
        due = step >= cfg.start_step and (step - cfg.start_step) % cfg.update_every == 0
        if not (due or final):
            continue
        s = cfg.sparsity_at(step)
        layer.weight_mask.copy_(compute_mask(layer.weight, cfg, s))
        changed += 1
        if final:
            layer.mask_frozen.fill_(True)
    return changed


def sparsity_report(model: nn.Module) -> dict[str, dict]:
    """Per layer: pattern, fraction of zero integer weights, and pattern violations (N:M, RxCb)."""
    out = {}
    for name, layer in quant_layers(model):
        q = layer.integer_weight()
        out[name] = {
            "pattern": layer.sparsity_pattern,
            "zeros": float((q == 0).float().mean()),
            "violations": pattern_violations(q, layer.sparsity_pattern),
        }
    return out


def sparsity_summary(model: nn.Module) -> dict | None:
    """The sparse layers of `model` together: their patterns, zero fraction (weighted by size)
    and total pattern violations; None if no layer is sparse."""
    layers = dict(quant_layers(model))
    sparse = {n: r for n, r in sparsity_report(model).items() if r["pattern"] != "dense"}
    if not sparse:
        return None
    sizes = {n: layers[n].weight.numel() for n in sparse}
    return {"pattern": ",".join(sorted({r["pattern"] for r in sparse.values()})),
            "zeros": sum(r["zeros"] * sizes[n] for n, r in sparse.items()) / sum(sizes.values()),
            "violations": sum(r["violations"] for r in sparse.values())}
