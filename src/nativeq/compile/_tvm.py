"""The one place that imports churn-prone TVM APIs (0.27 moved many of them).

Everything else in nativeq imports TVM names from here, so the next TVM release means
editing one file.
"""

import tvm  # noqa: F401
from tvm import relax  # noqa: F401
from tvm.relax.frontend.onnx import from_onnx  # noqa: F401
from tvm.support import cc  # noqa: F401  (was tvm.contrib.cc)
from tvm.target import Target as TVMTarget  # noqa: F401
from tvm.target.codegen import target_has_features  # noqa: F401

try:
    from tvm.s_tir import meta_schedule  # noqa: F401
except ImportError:  # pragma: no cover
    meta_schedule = None

# Scheduling (TensorIR) names used by nativeq.compile.schedules.
from tvm import s_tir, te, tirx  # noqa: F401,E402
from tvm.s_tir import Schedule, TensorIntrin  # noqa: F401,E402
from tvm.s_tir.dlight import ApplyDefaultSchedule  # noqa: F401,E402
from tvm.s_tir.dlight.cpu import Reduction as DlightCpuReduction  # noqa: F401,E402
from tvm.script import tirx as T  # noqa: F401,E402


def onnx_convert_map() -> dict:
    """The ONNX importer's op -> converter table (private in TVM 0.27; read-only use)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return _get_convert_map()


from tvm.relax.frontend.onnx import onnx_frontend  # noqa: F401,E402  (the importer nativeq extends)

# Tuning (nativeq.tuning): RPC client and the decorator for Python MetaSchedule callbacks.
from tvm import rpc  # noqa: F401,E402
from tvm.ir.utils import derived_object  # noqa: F401,E402
from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock  # noqa: F401,E402

from tvm import topi  # noqa: F401,E402
from tvm.relax.transform.legalize_ops.manipulate import _reshape as reshape_legalization  # noqa: F401,E402
from tvm.sym import Analyzer  # noqa: F401,E402  (was tvm.arith.Analyzer: proofs on symbolic shapes)
from tvm.sym import detect_linear_equation  # noqa: F401,E402  (was tvm.arith.detect_linear_equation)
from tvm_ffi import structural_equal  # noqa: F401,E402  (was tvm.ir.structural_equal)
from tvm_ffi import structural_hash  # noqa: F401,E402  (was tvm.ir.structural_hash)


def cached_flags(sch, block):
    """TVM's cached (affine_binding, region_cover, stage_pipeline) of `block` in Schedule `sch` (a test hook of
    ScheduleState, `_get_cached_flags`)."""
    return sch.state._get_cached_flags(sch.get_sref(block))


def with_type_of(expr, like):
    """`expr` (a freshly built Relax expression) given the type `like` has, without renormalizing it."""
    from tvm.relax.expr import _update_type

    _update_type(expr, like.ty)
    return expr
