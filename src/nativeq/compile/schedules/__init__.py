"""CPU kernel selection and default schedules (int8 dot-product tensorization, parallel loops).

Two hooks, called by `compile/pipeline.py`:

- `kernel_relax_passes(target)`: Relax passes run before LegalizeOps. Runs int8 convs channels-last
  (`channels_last.py`: full convs as im2col + matmul, `conv_as_matmul.py`, the im2col implicit where the
  channels fill whole vectors; depthwise convs as their own
  kernel, `depthwise.py`), moves a 2-D conv's epilogue before the reshape of its GEMM rows
  (`epilogues_on_rows.py`), packs the constant weights of int8 matmuls for the
  target's dot intrinsic (`pack_weights.py`; 4-bit packed or block-sparse where the values allow,
  `weight_formats.py`) and, at run time, the int8 activation rhs of
  activation x activation matmuls (attention's Q.K^T, P.V; `pack_activations.py`). Float32 convs and
  matmuls with constant weights run the same packed kernel with a float multiply-add intrinsic. (Float `erf`,
  GELU's, is legalized by `compile/passes/legalize_like_ort.py` as MLAS computes it: vectorizable
  and bit-identical.)
- `schedule_passes(target)`: TIR passes run after FuseOps/FuseTIR. Rebuilds the recurrent input projections with
  the target's register tile (`recurrent_projection.py`), then gives every PrimFunc a
  schedule without tuning (`default_schedule.py`): tensorized int8 matmuls (`matmul.py`), channels-vectorized
  int8 depthwise convs (`depthwise.py`),
  dlight's CPU reduction rule (softmax, layer norm), and a parallel + vectorized fallback for
  everything else (`generic.py`).

Code asks the target what it has (`int8` family, `cores`), never its name.
"""

from __future__ import annotations

from nativeq.compile.schedules.intrinsics import dot_intrin_for, fma_intrin_for


def kernel_relax_passes(target, compressed_weights: bool = True) -> list:
    """Relax-level passes that choose int8 kernel layouts (pack weights), run before legalization.

    compressed_weights: 4-bit packed / block-sparse weights where the values allow (`weight_formats.py`)."""
    from nativeq.compile.schedules.attention import FloatAttentionInRowBlocks
    from nativeq.compile.schedules.channels_last import Int8ConvsChannelsLast
    from nativeq.compile.schedules.epilogues_on_rows import EpiloguesOnRows
    from nativeq.compile.schedules.pack_activations import PackInt8Activations
    from nativeq.compile.schedules.pack_weights import PackInt8Weights

    intrin, fma = dot_intrin_for(target), fma_intrin_for(target)
    if intrin is None:
        return []
    packing = PackInt8Weights(intrin, sparse=compressed_weights, int4=compressed_weights)
    float_packing = PackInt8Weights(fma, sparse=False, int4=False)
    return [FloatAttentionInRowBlocks(fma), Int8ConvsChannelsLast(intrin, fma), EpiloguesOnRows(), packing, float_packing, PackInt8Activations(intrin),
            PackInt8Activations(fma)]


def schedule_passes(target) -> list:
    """TIR-level passes, run after FuseTIR, that give every PrimFunc a good default schedule for `target`."""
    from nativeq.compile.schedules.default_schedule import DefaultCpuSchedule, vector_bits
    from nativeq.compile.schedules.recurrent_projection import RecurrentProjectionTiles

    return [RecurrentProjectionTiles(vector_bits(target)), DefaultCpuSchedule(target)]
