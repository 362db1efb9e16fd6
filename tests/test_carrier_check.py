"""The fp16-carrier check: its figures, and that it refuses a conversion that broke a graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from citrus_edge.engines.carrier_check import (
    FP16_RTOL,
    CarrierCheckError,
    check_or_raise,
    compare_outputs,
)


def test_compare_outputs_is_the_worst_relative_difference_over_samples():
    ref = [{"y": np.array([1.0, -4.0])}, {"y": np.array([2.0, 0.5])}]
    got = [{"y": np.array([1.0, -4.02])}, {"y": np.array([2.03, 0.5])}]
    (e,) = compare_outputs("vision", ref, got)
    assert e.output == "y" and e.rtol == FP16_RTOL["vision"]
    assert e.max_abs == pytest.approx(0.03) and e.max_rel == pytest.approx(0.015)  # 0.03 / 2
    assert not e.ok  # over vision's 1e-2


def test_a_shape_change_or_nan_is_an_infinite_difference():
    ref = [{"a": np.ones(3), "b": np.ones(2)}]
    got = [{"a": np.ones(4), "b": np.array([1.0, np.nan])}]
    errors = {e.output: e for e in compare_outputs("llm", ref, got)}
    assert errors["a"].max_rel == np.inf and errors["b"].max_rel == np.inf


def test_check_or_raise_names_every_output_over_its_bound():
    ok = compare_outputs("llm", [{"logits": np.array([10.0])}], [{"logits": np.array([10.01])}])
    bad = compare_outputs("vision", [{"f": np.array([1.0])}], [{"f": np.array([np.inf])}])
    assert check_or_raise(ok)["llm"]["logits"]["max_rel"] == pytest.approx(1e-3)
    with pytest.raises(CarrierCheckError, match=r"vision f max rel inf > 1e-02"):
        check_or_raise(ok + bad)


def _graph(path, weight: np.ndarray) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    g = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_fp16_conversion_of_an_out_of_range_weight_is_caught(tmp_path):
    """A weight past fp16's range is clipped by the conversion: the check sees it."""
    from citrus_edge.engines.carrier_check import run_graph
    from citrus_edge.engines.float16 import fp16_carrier_file
    from citrus_edge.graph_specs import Sample

    class Spec:
        output_names = ["y"]

    w = np.eye(4, dtype=np.float32)
    w[0, 0] = 1e6  # fp16 max is 65504
    _graph(tmp_path / "g.onnx", w)
    (tmp_path / "h").mkdir()
    half = fp16_carrier_file(tmp_path / "g.onnx", tmp_path / "h" / "g.onnx")
    samples = [Sample("s", {"x": np.ones((2, 4), np.float32)})]
    want, got = run_graph(tmp_path / "g.onnx", Spec, samples), run_graph(half, Spec, samples)
    (e,) = compare_outputs("mask_decoder", want, got)
    assert e.max_rel == pytest.approx((1e6 - 65504) / 1e6, rel=1e-3)
    with pytest.raises(CarrierCheckError):
        check_or_raise([e])
