"""The int8 lowering stage of the pipeline (runs right after ONNX import, before any folding).

`int8_passes(target)` is the ordered list of Relax passes; `explain_sites(mod, target)` reports, for
every matmul/conv, whether that list turns it into an integer kernel or leaves it float and why.
"""

from __future__ import annotations

from nativeq.compile._tvm import relax
from nativeq.compile.passes.conv_transpose_as_conv import ConvTransposeAsConv
from nativeq.compile.passes.fold_bias_into_accumulator import FoldBiasIntoAccumulator
from nativeq.compile.passes.fold_constant_dequantize import FoldConstantDequantize
from nativeq.compile.passes.fold_dequantize_quantize import FoldDequantizeQuantize
from nativeq.compile.passes.fold_quantize_dequantize import FoldQuantizeDequantize
from nativeq.compile.passes.lower_qdq_to_integer import LowerQDQToInteger
from nativeq.compile.passes.lut_elementwise import LutElementwise
from nativeq.compile.passes.remove_identity_reshapes import RemoveIdentityReshapes
from nativeq.compile.passes.softmax_reads_integers import SoftmaxReadsIntegers
from nativeq.compile.provenance import span_node
from nativeq.compile.passes.qdq_sites import (
    CONTRACTION_OPS,
    ActivationProductSite,
    QdqSite,
    match_activation_product,
    match_site,
    op_name,
)

_INTEGER_DTYPES = ("int8", "uint8")


def activation_dtype(target) -> str | None:
    """The activation dtype the target's int8 instructions read: u8 x s8 on x86 (VNNI), s8 x s8 on ARM."""
    return {"x86_64": "uint8", "aarch64": "int8"}.get(target.arch)


def lowering_passes(kernel_activation_dtype: str | None) -> list:
    """The int8 passes in pipeline order, for kernels reading `kernel_activation_dtype` activations."""
    return [
        ConvTransposeAsConv(),
        RemoveIdentityReshapes(),
        LowerQDQToInteger(kernel_activation_dtype),
        FoldBiasIntoAccumulator(require_exact=True),
        FoldDequantizeQuantize(),
        LutElementwise(),
        SoftmaxReadsIntegers(),
        FoldQuantizeDequantize(),
        FoldConstantDequantize(),
    ]


def int8_passes(target) -> list:
    """Relax passes that turn dequantize -> matmul/conv -> quantize into integer kernels for `target`."""
    return lowering_passes(activation_dtype(target))


def _name(var) -> str:
    return str(getattr(var, "name", None) or var.name_hint)


def _is_integer_contraction(call) -> bool:
    args = call.args[:2]
    return str(call.ty.dtype) == "int32" and all(str(a.ty.dtype) in _INTEGER_DTYPES for a in args)


def explain_sites(mod, target) -> list[dict]:
    """One dict per matmul/conv in `mod`: site (its ONNX node, from the call's span, else the Relax var),
    op, status ("int8"/"float"), reason.

    Works on the module as imported (what the int8 passes will do) and on an already lowered one.
    """
    kernel_dtype = activation_dtype(target)
    sites = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        var2val = relax.analysis.get_var2val(func)
        for var, value in var2val.items():
            op = CONTRACTION_OPS.get(op_name(value))
            if op is None:
                continue
            name = (span_node(value.span) or ("", f"{_name(gvar)}/{_name(var)}"))[1]
            if _is_integer_contraction(value):
                dtypes = " x ".join(str(a.ty.dtype) for a in value.args[:2])
                sites.append({"site": name, "op": op, "status": "int8", "reason": f"integer {dtypes} -> int32"})
                continue
            site = match_site(value, var2val)
            if isinstance(site, QdqSite):
                act = kernel_dtype or site.x_dtype
                weight = f"W{list(site.weight.shape)}"
                if site.w_scale is None:
                    reason = f"{act} x int8 -> int32, {weight}, int32 result"
                else:
                    granularity = "per-channel" if site.w_scale.ndim else "per-tensor"
                    reason = f"{act} x int8 -> int32, {weight}, {granularity} weight scale"
                sites.append({"site": name, "op": op, "status": "int8", "reason": reason})
            elif isinstance(product := match_activation_product(value, var2val), ActivationProductSite):
                act = kernel_dtype or product.lhs_dtype
                reason = f"{act} x int8 -> int32, activation x activation (run-time zero-point sums)"
                sites.append({"site": name, "op": op, "status": "int8", "reason": reason})
            else:
                sites.append({"site": name, "op": op, "status": "float", "reason": site})
    return sites
