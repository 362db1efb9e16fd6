"""The streaming INT4 AWQ-lite of the TensorRT LLM (`compress.int4_awq`), checked in numbers.

ONNX Runtime on the CPU runs the written graph (blocked INT4 DequantizeLinear, opset 21): its
outputs must equal the numpy dequantization formula (so the packing, the block layout and the
AWQ input scale are what ONNX means), AWQ must not lose to round-to-nearest on the calibration
rows, and the weights must move into the new external-data file, the source left as it was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from citrus_edge.compress.int4_awq import (  # noqa: E402
    StreamingInt4Quantizer,
    awq_scales,
    dequantize_blocks,
    pack_int4,
    quantize_blocks,
)
from citrus_edge.compress.registry import QuantRequest, get_quantizer  # noqa: E402
from citrus_edge.compress.settings import TRT_LLM, Int4AwqSettings  # noqa: E402

K, N, BLOCK = 40, 24, 16  # K is not a multiple of the block: the last block is shorter


def _graph(path: Path, external: bool) -> Path:
    """x [T, K] -> Mul(norm weight) -> MatMul a, MatMul b; channel 3 of x is an outlier (the
    pattern AWQ exists for)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, K).astype(np.float32), "norm_w"),
        numpy_helper.from_array(rng.normal(size=(K, N)).astype(np.float32), "w_a"),
        numpy_helper.from_array(rng.normal(size=(K, N)).astype(np.float32), "w_b"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "norm_w"], ["h"], name="norm/Mul"),
        helper.make_node("MatMul", ["h", "w_a"], ["a"], name="a/MatMul"),
        helper.make_node("MatMul", ["h", "w_b"], ["b"], name="b/MatMul"),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "norm_two_gemms",
        [helper.make_tensor_value_info("x", f32, ["T", K])],
        [helper.make_tensor_value_info(o, f32, ["T", N]) for o in ("a", "b")],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    if external:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            location=f"{path.name}.data",
            size_threshold=0,
        )
    else:
        onnx.save(model, str(path))
    return path


def _feeds(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(12, K)).astype(np.float32)
        x[:, 3] *= 30.0
        out.append({"x": x})
    return out


def _quantizer(src: Path, settings: Int4AwqSettings) -> StreamingInt4Quantizer:
    request = QuantRequest("llm", "int4", "tensorrt", src, src.parent, settings, _feeds(), "minmax")
    return get_quantizer("tensorrt", "int4")(request)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_blocks_round_trip_within_half_a_step():
    w = np.random.default_rng(2).normal(size=(K, N)).astype(np.float32)
    q, scale = quantize_blocks(w, BLOCK)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7
    assert scale.shape == (3, N)  # ceil(40 / 16)
    err = np.abs(dequantize_blocks(q, scale, BLOCK) - w)
    steps = np.repeat(scale, BLOCK, axis=0)[:K]
    assert np.all(err <= steps / 2 + 1e-6)


def test_int4_packing_is_what_onnx_reads():
    q = np.random.default_rng(3).integers(-8, 8, size=(5, 7)).astype(np.int8)  # odd count
    tensor = TensorProto(name="q", data_type=TensorProto.INT4, dims=[5, 7])
    tensor.raw_data = pack_int4(q)
    assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int8), q)


def test_awq_scale_is_one_at_alpha_zero_and_follows_the_activations():
    mean_abs = np.array([1.0, 4.0, 16.0], np.float32)
    assert np.allclose(awq_scales(mean_abs, 0.0), 1.0)
    s = awq_scales(mean_abs, 0.5)
    assert np.allclose(s, [0.5, 1.0, 2.0])  # sqrt, normalised by sqrt(max * min) = 2


@pytest.mark.parametrize("external", [False, True])
def test_written_graph_runs_as_the_formula_says(tmp_path, external):
    src = _graph(tmp_path / "llm.onnx", external)
    before = {p.name: _sha(p) for p in tmp_path.iterdir()}
    quant = _quantizer(src, Int4AwqSettings(block_size=BLOCK))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "llm.onnx"
    quant.write(dst, frozenset())
    assert {p.name: _sha(p) for p in tmp_path.iterdir() if p.is_file()} == before  # no probe left

    model = onnx.load(str(dst), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain == "") == 21
    onnx.checker.check_model(str(dst), full_check=True)
    if external:
        assert sorted(p.name for p in out_dir.iterdir()) == ["llm.onnx", "llm.onnx.data"]
        big = [t for t in model.graph.initializer if np.prod(t.dims) * 0.5 > 1024]
        assert all(t.data_location == TensorProto.EXTERNAL for t in big)
    full = onnx.load(str(dst))
    inits = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    assert {t.data_type for t in full.graph.initializer if t.name.endswith("weight_int4")} == {
        TensorProto.INT4
    }
    feeds = _feeds(1, seed=9)[0]
    got = dict(zip(("a", "b"), _run(dst, feeds), strict=True))
    ref = dict(zip(("a", "b"), _run(src, feeds), strict=True))
    h = feeds["x"] * inits["norm_w"]
    for name, node in (("a", "a/MatMul"), ("b", "b/MatMul")):
        w = dequantize_blocks(
            inits[f"{node}.weight_int4"].astype(np.int8), inits[f"{node}.weight_scale"], BLOCK
        )
        inv = inits.get(f"{node}.awq_inv_scale", np.ones(K, np.float32))
        formula = (h * inv) @ w
        assert np.max(np.abs(got[name] - formula)) <= 1e-4 * np.max(np.abs(formula))
        sqnr = 10 * np.log10(np.sum(ref[name] ** 2) / np.sum((got[name] - ref[name]) ** 2))
        print(f"{name}: INT4 AWQ SQNR {sqnr:.1f} dB, alpha {quant.describe()['calibration']}")
        assert sqnr >= 15.0


def test_awq_is_no_worse_than_round_to_nearest_on_the_calibration(tmp_path):
    src = _graph(tmp_path / "llm.onnx", external=False)
    quant = _quantizer(src, Int4AwqSettings(block_size=BLOCK))
    quant.write(tmp_path / "awq.onnx", frozenset())
    chosen = quant.describe()["calibration"]["alpha"]
    assert set(chosen) == {"a/MatMul", "b/MatMul"}
    for node, mse in quant._mse.items():
        assert mse[int(round(chosen[node] / 0.1))] == min(mse) <= mse[0]
    assert any(a > 0 for a in chosen.values())  # the outlier channel makes AWQ scale something
    rtn = _quantizer(src, Int4AwqSettings(block_size=BLOCK, method="rtn"))
    rtn.write(tmp_path / "rtn.onnx", frozenset())
    errs = {}
    for name in ("awq", "rtn"):
        e = 0.0
        for feeds in _feeds():
            got = _run(tmp_path / f"{name}.onnx", feeds)
            ref = _run(src, feeds)
            e += sum(float(np.sum((g - r) ** 2)) for g, r in zip(got, ref, strict=True))
        errs[name] = e
    print("calibration squared error", errs)
    assert errs["awq"] <= errs["rtn"]


def test_excluded_node_keeps_its_float_weight(tmp_path):
    src = _graph(tmp_path / "llm.onnx", external=True)
    quant = _quantizer(src, Int4AwqSettings(block_size=BLOCK))
    dst = tmp_path / "q.onnx"
    quant.write(dst, frozenset({"b/MatMul"}))
    model = onnx.load(str(dst))
    inits = {t.name: t for t in model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    assert "w_a" not in inits and "a/MatMul.weight_int4" in inits
    assert np.array_equal(numpy_helper.to_array(inits["w_b"]), original["w_b"])
    feeds = _feeds(1, seed=5)[0]
    assert np.array_equal(_run(dst, feeds)[1], _run(src, feeds)[1])


def test_tensorrt_int4_default_is_the_streaming_quantizer(tmp_path):
    src = _graph(tmp_path / "llm.onnx", external=False)
    assert isinstance(TRT_LLM["int4"], Int4AwqSettings)
    assert isinstance(_quantizer(src, TRT_LLM["int4"]), StreamingInt4Quantizer)
