"""The sensitivity search edits a quantized graph in memory only when the result fits protobuf.

The slice's default Orin build died with `EncodeError: Failed to serialize proto`: its INT4 LLM
graph (0.5 GB) was small enough for in-memory surgery, but returning the float `lm_head` (2.2 GB)
to it made a proto past 2 GiB. The size that counts is the quantized graph's plus the float
graph's it takes weights from.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from citrus_edge.compress import sensitivity  # noqa: E402


def _graph(path, n: int):
    w = numpy_helper.from_array(np.ones((n, 4), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    onnx.save(helper.make_model(g), str(path))
    return path


@pytest.mark.parametrize("float_rows, surgery", [(4, True), (4000, False)])
def test_surgery_counts_the_float_weights_it_may_return(tmp_path, monkeypatch, float_rows, surgery):
    current = _graph(tmp_path / "q.onnx", 4)
    src = _graph(tmp_path / "fp32.onnx", float_rows)
    limit = current.stat().st_size + 2000  # the quantized graph alone always fits
    monkeypatch.setattr(sensitivity, "SURGERY_MAX_BYTES", limit)
    quantizer = SimpleNamespace(component="llm", src=src, qdq_graph=True)
    trials = sensitivity._Trials(quantizer, set(), [], [], "reference", current, tmp_path)
    assert trials.surgery is surgery
