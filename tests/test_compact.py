"""`compress.compact`: what it may store as float16, and what it must leave alone."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from citrus_edge.compress.compact import FP16_MIN_BYTES, compact_graph  # noqa: E402
from citrus_edge.compress.qdq_check import check_graph  # noqa: E402

CHANNELS = 5120  # the 8B vision merger's width: a per-channel scale of 20 KiB


def _graph(path):
    """x -> MatMul(DQ(int8 W, per-channel scale)) + a large float table read by an Add."""
    rng = np.random.default_rng(0)
    k = 8
    w = rng.integers(-127, 128, size=(k, CHANNELS)).astype(np.int8)
    scale = rng.uniform(1e-3, 2e-3, CHANNELS).astype(np.float32)
    table = rng.normal(size=CHANNELS).astype(np.float32)
    assert scale.nbytes >= FP16_MIN_BYTES and table.nbytes >= FP16_MIN_BYTES
    inits = [
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(scale, "w_scale"),
        numpy_helper.from_array(np.zeros(CHANNELS, np.int8), "w_zp"),
        numpy_helper.from_array(table, "table"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=1, name="dq"),
        helper.make_node("MatMul", ["x", "w"], ["y0"], name="mm"),
        helper.make_node("Add", ["y0", "table"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, CHANNELS])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_per_channel_scales_stay_float32_constants(tmp_path):
    path = _graph(tmp_path / "g.onnx")
    x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    before = _run(path, x)
    facts = compact_graph(path)
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert inits[dq.input[1]].data_type == TensorProto.FLOAT  # the scale: untouched
    assert facts.constants_to_fp16 == 1  # the table only
    facts_check = check_graph(path, "int8", "ort-static-qdq", per_channel=True)
    assert facts_check["ok"], facts_check
    after = _run(path, x)
    # Only the table moved to float16: the error is its rounding, not the scales'.
    assert np.max(np.abs(after - before)) <= 2**-11 * np.max(np.abs(before))
