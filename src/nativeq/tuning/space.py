"""The MetaSchedule search space for a target: schedule rules, postprocessors, mutators.

nativeq's own int8 matmul kernels are searched through their schedule's knobs
(`template.int8_matmul_space`); the rules below serve every other contraction kernel.
There the int8 rule is `MultiLevelTilingWithIntrin` with the target's int8 dot intrinsic from
`compile/schedules/intrinsics.py` (nativeq's corrected VNNI one on x86 AVX-512 VNNI, TVM's
`sdot` / NEON ones on ARM). Blocks it cannot tensorize (float epilogues, unpacked weights,
other ops) get the plain `MultiLevelTiling` rule. Two settings are not optional (field notes):

- `max_vectorize_extent=-1`: a tensorized block inside a vectorized loop fails to build
  ("Cannot broadcast lanes=16 ... to 64");
- an explicit postproc list with `RewriteTensorize(vectorize_init_loop=True)`: with TVM's
  "llvm" defaults the tensorize annotation is silently ignored and no `vpdpbusd` is emitted.
"""

from __future__ import annotations

from nativeq.compile._tvm import meta_schedule as ms
from nativeq.targets import Target

def dot_intrin(target: Target):
    """The target's int8 dot intrinsic (`DotIntrin`, registered with TVM), or None."""
    from nativeq.compile.schedules.intrinsics import dot_intrin_for

    return dot_intrin_for(target)


def _tiling(intrin_name: str | None):
    common = dict(
        structure="SSRSRS",
        max_innermost_factor=64,
        reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global"),
    )
    if intrin_name is None:
        return ms.schedule_rule.MultiLevelTiling(**common)
    return ms.schedule_rule.MultiLevelTilingWithIntrin(intrin_name, **common)


def schedule_rules(target: Target) -> list:
    intrin = dot_intrin(target)
    tensorized = intrin is not None
    return [
        ms.schedule_rule.ApplyCustomRule(),
        ms.schedule_rule.InlineConstantScalars(),
        ms.schedule_rule.AutoInline(
            into_producer=False,
            into_consumer=True,
            inline_const_tensor=True,
            disallow_if_then_else=True,
            require_injective=True,
            require_ordered=True,
            disallow_op=["tirx.exp"],
        ),
        ms.schedule_rule.AddRFactor(max_jobs_per_core=16, max_innermost_factor=64),
        *([_tiling(intrin.name)] if tensorized else []),
        _tiling(None),
        ms.schedule_rule.ParallelizeVectorizeUnroll(
            max_jobs_per_core=16,
            max_vectorize_extent=-1 if tensorized else 64,
            unroll_max_steps=[0, 16, 64, 512],
            unroll_explicit=True,
        ),
        ms.schedule_rule.RandomComputeLocation(),
    ]


def postprocs(target: Target) -> list:
    return [
        ms.postproc.DisallowDynamicLoop(),
        ms.postproc.RewriteParallelVectorizeUnroll(),
        ms.postproc.RewriteReductionBlock(),
        ms.postproc.RewriteTensorize(vectorize_init_loop=True),
    ]


def space_generator(target: Target, int8_template: bool = False):
    """nativeq's int8 matmul knobs (`template.py`) for its int8 matmul kernels, else MetaSchedule's rules."""
    if int8_template:
        from nativeq.tuning.template import int8_matmul_space

        return int8_matmul_space(dot_intrin(target), postprocs(target))
    return ms.space_generator.PostOrderApply(
        sch_rules=schedule_rules(target), postprocs=postprocs(target), mutator_probs="llvm"
    )
