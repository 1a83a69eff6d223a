"""Legalization rule: a reshape with a symbolic size stays a reshape, which the VM runs as a view.

Pipeline position: an entry of the `customize_legalize_map` of the pipeline's `LegalizeOps` (beside
`legalize_like_ort` and `scalars_as_tensors`).

TVM legalizes every reshape to a copy kernel and turns it back into a view after fusion
(`RewriteDataflowReshape`) when it can prove the kernel's index map is the identity on the flat buffer. With
a symbolic size that proof fails (every index is a division and a modulo by a run-time length), so the
reshape stays a copy at about 1 GB/s: a waveform model whose GroupNorm with one group reshapes [N, C, L] to
[N, 1, C * L] and back spent a fifth of its time in such copies (and one case crashes the rewrite:
`CanProveDivisible` on a reshape to [N, C, (L + 2) * 2]). A reshape of a contiguous tensor never needs a
copy: left unlegalized, the VM runs it as `vm.builtin.reshape`, a view of the same storage. Reshapes of
static shapes keep TVM's rule (their copies fuse into neighbouring kernels and come back as views).
"""

from __future__ import annotations

from nativeq.compile._tvm import reshape_legalization, tirx, topi

_DEFAULT = reshape_legalization(topi.reshape, "reshape")  # TVM's own rule


def _static(shape) -> bool:
    return all(isinstance(d, tirx.IntImm) for d in shape.values)


def _reshape_rule(builder, call):
    if _static(call.args[0].ty.shape) and _static(call.ty.shape):
        return _DEFAULT(builder, call)
    return call


def symbolic_reshapes_as_views() -> dict:
    """`LegalizeOps(customize_legalize_map=...)` entries: op name -> legalization function."""
    return {"relax.reshape": _reshape_rule}
