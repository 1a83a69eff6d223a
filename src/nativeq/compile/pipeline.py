"""The per-target Relax compile pipeline, as a plain list of passes read top to bottom.

Modelled on `tvm/relax/backend/cpu_generic/pipeline.py`, with nativeq's three hooks:

1. `int8_passes(target)` (compile/passes/int8.py): right after ONNX import, before any
   constant folding, rewrite dequantize -> matmul/conv -> quantize into integer ops;
2. `kernel_relax_passes(target)` (compile/schedules): choose int8 kernel layouts (e.g. pack
   constant weights) while the ops are still high level;
3. `schedule_passes(target)` (compile/schedules): after FuseTIR, give every PrimFunc a
   default schedule for the target (tensorized int8 dot products, parallel loops).

A MetaSchedule tuning database, when one is used, is applied right before the default
schedules, so tuned functions keep their tuned schedule.

The TIR lowering after `relax.build` hands the kernels over is TVM's own (`s_tir`) with two passes
appended (`tir_pipeline`): `passes/local_tiles_on_stack.py` keeps register tiles on the stack, and
`passes/gather_table_lookups.py` turns vectors of table lookups into AVX-512 gathers.
"""

from __future__ import annotations

from pathlib import Path

from nativeq.compile._tvm import TVMTarget, relax, tvm
from nativeq.compile.passes.canonical_shape_func import CanonicalShapeFunc
from nativeq.compile.passes.empty_constants import EmptyConstantsAsAllocations
from nativeq.compile.passes.fold_constant import FoldConstant
from nativeq.compile.passes.int8 import int8_passes
from nativeq.compile.passes.kernel_argument_shapes import KernelArgumentShapes
from nativeq.compile.passes.legalize_like_ort import legalize_like_ort
from nativeq.compile.passes.lut_elementwise import MarkLutElementwise
from nativeq.compile.passes.repack_after_legalize import RepackAfterLegalize
from nativeq.compile.passes.rewrite_dataflow_reshape import RewriteDataflowReshape
from nativeq.compile.passes.scalars_as_tensors import scalars_as_tensors
from nativeq.compile.passes.symbolic_reshapes_as_views import symbolic_reshapes_as_views
from nativeq.compile.schedules import kernel_relax_passes, schedule_passes


def tuning_passes(database_dir: Path | None, target=None) -> list:
    """Apply the best schedules recorded in a MetaSchedule JSON database directory (corrupt lines skipped)."""
    if database_dir is None:
        return []
    from nativeq.tuning.apply import ApplyTuningDatabase

    return [ApplyTuningDatabase(database_dir, target)]


def compile_passes(target, *, int8: bool = True, tuning_database: Path | None = None,
                   compressed_weights: bool = True) -> list:
    """Every Relax pass `nativeq compile` runs for `target` (a `nativeq.targets.Target`), in order.

    compressed_weights: False stores every int8 matmul weight dense and 8-bit (`--dense-weights`).
    Built inside the TVM target's context: some passes read the current target when created.
    """
    with TVMTarget(target.tvm_dict()):
        return _passes(target, int8=int8, tuning_database=tuning_database, compressed_weights=compressed_weights)


def _passes(target, *, int8: bool, tuning_database: Path | None, compressed_weights: bool) -> list:
    return [
        # int8 lowering and kernel layouts (skipped with --no-int8: TVM's float QDQ path)
        *(int8_passes(target) if int8 else []),
        *(kernel_relax_passes(target, compressed_weights=compressed_weights) if int8 else []),
        # library dispatch and legalization to TIR, then fusion
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(customize_legalize_map={**scalars_as_tensors(target), **legalize_like_ort(),
                                                           **symbolic_reshapes_as_views()}),
        *([RepackAfterLegalize()] if int8 else []),
        KernelArgumentShapes(),
        relax.transform.AnnotateTIROpPattern(),
        MarkLutElementwise(),
        FoldConstant(),  # TVM's, each distinct kernel built once
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),  # one PrimFunc per distinct fused kernel (BlockBuilder.add_func deduplicates)
        # schedules: tuned ones first, then nativeq's defaults for the rest
        *tuning_passes(tuning_database, target),
        *schedule_passes(target),
        # dataflow lowering (TVM's CPU backend)
        RewriteDataflowReshape(),  # TVM's, with kernels its analysis cannot decide left as kernels
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        EmptyConstantsAsAllocations(),  # TVM's loader refuses a serialized [1, 0] tensor
        # finalization: memory planning and the VM calling convention (TVM's CPU backend)
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        CanonicalShapeFunc(),  # VMShapeLower's stores in a fixed order: the same model, the same bytes
        relax.transform.AttachGlobalSymbol(),
    ]


def compile_pipeline(target, *, int8: bool = True, tuning_database: Path | None = None,
                     compressed_weights: bool = True) -> tvm.transform.Pass:
    """`compile_passes` as one Sequential pass, for `relax.build(..., relax_pipeline=...)`."""
    return tvm.transform.Sequential(
        compile_passes(target, int8=int8, tuning_database=tuning_database, compressed_weights=compressed_weights),
        name="nativeq_compile",
    )


TIR_PIPELINE = "nativeq"


def _tir_pipeline_factory():
    """TVM's default s_tir lowering, then `LocalTilesOnStack` and `GatherTableLookups`; TVM's host and device
    finalization."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    from nativeq.compile.passes.gather_table_lookups import GatherTableLookups
    from nativeq.compile.passes.local_tiles_on_stack import LocalTilesOnStack

    lowering, finalize_host, finalize_device = default_s_tir_pipeline()
    passes = [lowering, LocalTilesOnStack, GatherTableLookups]
    return tvm.transform.Sequential(passes, name="nativeq_tir"), finalize_host, finalize_device


def tir_pipeline() -> str:
    """The name of nativeq's TIR pipeline (registered with TVM on first use), for `relax.build(tir_pipeline=...)`."""
    from tvm.tirx.compilation_pipeline import PIPELINE_MAP, register_tir_pipeline

    if TIR_PIPELINE not in PIPELINE_MAP:
        register_tir_pipeline(TIR_PIPELINE, _tir_pipeline_factory)
    return TIR_PIPELINE
