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
