"""ONNX's own backend node tests of the quantization operators, through compile + load + run.

Every case of the installed `onnx` whose model uses QuantizeLinear, DequantizeLinear,
DynamicQuantizeLinear, QLinearMatMul, QLinearConv, MatMulInteger or ConvInteger is compiled
for `host` (once), loaded, run on its `test_data_set_0` inputs and compared with its expected
outputs: integer outputs and DequantizeLinear's float outputs exactly (bitwise), other float
outputs with the tolerance of ONNX's backend runner (rtol 1e-3, atol 1e-7). A case nativeq
refuses by design must be refused at compile time with a one-line NativeqError, and is listed
in `EXPECTED_REFUSALS` with the start of that message; a listed case that compiles fails, so
the table stays honest. docs/conformance.md is this table.

Cases come from `onnx/backend/test/data/node/test_*/` when the installed onnx ships the data
directories; otherwise (the PyPI wheels ship only the generators) they are generated in process
from the modules of `onnx.backend.test.case.node` that define these operators' cases, as
`onnx.backend.test.cmd_tools generate-data` would write them.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nativeq.errors import NativeqError

QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv",
             "MatMulInteger", "ConvInteger")
# The modules of onnx.backend.test.case.node that define these operators' cases (and their expansions).
_CASE_MODULES = ("quantizelinear", "dequantizelinear", "dynamicquantizelinear", "qlinearmatmul", "qlinearconv",
                 "matmulinteger", "convinteger")

# case name -> the start of the one-line NativeqError nativeq refuses it with.
EXPECTED_REFUSALS = {
    "test_dequantizelinear_e4m3fn": "DequantizeLinear node 'y': float8e4m3fn quantization is not supported",
    "test_dequantizelinear_e4m3fn_float16": "DequantizeLinear node 'y': float8e4m3fn quantization is not supported",
    "test_dequantizelinear_e4m3fn_zero_point": "DequantizeLinear node 'y': float8e4m3fn quantization is not supported",
    "test_dequantizelinear_e5m2": "DequantizeLinear node 'y': float8e5m2 quantization is not supported",
    "test_dequantizelinear_float4e2m1": "DequantizeLinear node 'y': float4e2m1 quantization is not supported",
    "test_dequantizelinear_int2": "DequantizeLinear node 'y': int2 quantization is not supported",
    "test_dequantizelinear_uint2": "DequantizeLinear node 'y': uint2 quantization is not supported",
    "test_quantizelinear_e4m3fn": "QuantizeLinear node 'y': float8e4m3fn quantization is not supported",
    "test_quantizelinear_e5m2": "QuantizeLinear node 'y': float8e5m2 quantization is not supported",
    "test_quantizelinear_float4e2m1": "QuantizeLinear node 'y': float4e2m1 quantization is not supported",
    "test_quantizelinear_int2": "QuantizeLinear node 'y': int2 quantization is not supported",
    "test_quantizelinear_uint2": "QuantizeLinear node 'y': uint2 quantization is not supported",
}

_DATA_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"


def _uses_quant_op(model: onnx.ModelProto) -> bool:
    return any(node.op_type in QUANT_OPS for node in model.graph.node)


def _array(value) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def _cases_from_data_dir() -> dict[str, tuple[onnx.ModelProto, list, list]]:
    cases = {}
    for case_dir in sorted(_DATA_DIR.glob("test_*")):
        model_path = case_dir / "model.onnx"
        if not model_path.is_file():
            continue
        model = onnx.load(model_path)
        if not _uses_quant_op(model):
            continue
        data = case_dir / "test_data_set_0"
        inputs = [onnx.load_tensor(str(data / f"input_{k}.pb")) for k in range(len(list(data.glob("input_*.pb"))))]
        outputs = [onnx.load_tensor(str(data / f"output_{k}.pb")) for k in range(len(list(data.glob("output_*.pb"))))]
        cases[case_dir.name] = (model, inputs, outputs)
    return cases


def _cases_generated() -> dict[str, tuple[onnx.ModelProto, list, list]]:
    node_cases = importlib.import_module("onnx.backend.test.case.node")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _CASE_MODULES:
            importlib.import_module(f"onnx.backend.test.case.node.{name}")
    cases = {}
    for case in node_cases._NodeTestCases:
        if case.kind == "node" and _uses_quant_op(case.model) and case.data_sets:
            inputs, outputs = case.data_sets[0]
            cases[case.name] = (case.model, list(inputs), list(outputs))
    return dict(sorted(cases.items()))


def discover_cases() -> dict[str, tuple[onnx.ModelProto, list, list]]:
    """name -> (model, inputs, expected outputs) of every node test case that uses a quantization op."""
    return _cases_from_data_dir() if any(_DATA_DIR.glob("test_*")) else _cases_generated()


CASES = discover_cases()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Compile, load and run every case once: name -> ("ok", outputs) or ("refused", NativeqError)."""
    import nativeq
    from nativeq.compile import CompileConfig, compile_model

    root = tmp_path_factory.mktemp("onnx_conformance")
    done = {}
    for name, (model, inputs, _) in CASES.items():
        path = root / f"{name}.onnx"
        onnx.save(model, path)
        try:
            compile_model(path, root / name, CompileConfig(target="host", use_tuning=False))
        except NativeqError as e:
            done[name] = ("refused", e)
            continue
        feed = {info.name: _array(value) for info, value in zip(model.graph.input, inputs)}
        done[name] = ("ok", nativeq.load(root / name).run(feed))
    return done


def test_discovery_finds_every_operator():
    ops = {node.op_type for model, _, _ in CASES.values() for node in model.graph.node} & set(QUANT_OPS)
    assert ops == set(QUANT_OPS)
    assert set(EXPECTED_REFUSALS) <= set(CASES), sorted(set(EXPECTED_REFUSALS) - set(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_node_case(name, results):
    model, _, expected_outputs = CASES[name]
    kind, value = results[name]
    if name in EXPECTED_REFUSALS:
        assert kind == "refused", f"{name} is listed as refused but now compiles: update EXPECTED_REFUSALS"
        message = str(value)
        assert "\n" not in message and message.startswith(EXPECTED_REFUSALS[name]), message
        return
    assert kind == "ok", f"{name} refused: {value}"
    exact = {node.op_type for node in model.graph.node} & {"DequantizeLinear"} or None
    for info, expected in zip(model.graph.output, expected_outputs):
        want, got = _array(expected), np.asarray(value[info.name])
        assert got.dtype == want.dtype and got.shape == want.shape, (info.name, got.dtype, got.shape, want.dtype, want.shape)
        if want.dtype.kind in "iub" or exact:
            np.testing.assert_array_equal(got.view(f"u{got.itemsize}") if got.dtype.kind == "f" else got,
                                          want.view(f"u{want.itemsize}") if want.dtype.kind == "f" else want,
                                          err_msg=f"{name}: output {info.name!r}")
        else:
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7, err_msg=f"{name}: output {info.name!r}")


@pytest.mark.slow
def test_no_other_onnx_case_uses_a_quantization_op():
    """Every case of the whole node test collection that uses one of these ops is in CASES."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        every = {case.name for case in collect_testcases(None) if case.kind == "node" and _uses_quant_op(case.model)}
    assert every <= set(CASES), sorted(every - set(CASES))
