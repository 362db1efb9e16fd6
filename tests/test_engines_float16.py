"""fp16 carriers for strongly typed TensorRT builds (`engines.float16`), checked on the CPU.

A Q/DQ graph is built strongly typed, so its float32 carriers would make every unquantized
layer run FP32/TF32; the builder parses an fp16-carrier copy instead. Here the rewrite is run on
the TINY export (real graph structure: RMSNorm with its float32 casts, attention, SAM2) and on
a Q/DQ INT4 graph, checked by ONNX's strict type inference (`full_check`) and against the
float32 graph in ONNX Runtime. Measured on the TINY export (random feeds of the export spec):
vision 63.6 dB, LLM 61.6 dB, SAM2 encoder 59.3 dB, mask decoder 64.3 dB (worst output).
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from citrus_edge.config import TINY  # noqa: E402
from citrus_edge.engines.component import FP16_CARRIER_KEEP_FP32  # noqa: E402
from citrus_edge.engines.float16 import fp16_carrier  # noqa: E402

MIN_SQNR_DB = 50.0


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from citrus_edge.export.export_manifest import random_source_hash
    from citrus_edge.export.export_run import export_all

    out = tmp_path_factory.mktemp("f16") / "fp32"
    export_all(tiny_model(), out, source_hash=random_source_hash("tiny"))
    return out


def _feeds(component: str) -> dict[str, np.ndarray]:
    from citrus_edge.export.export_config import ExportConfig
    from citrus_edge.export.spec import REGISTRY

    spec = REGISTRY[component].spec(TINY, ExportConfig())
    return spec.make_sample(spec.validation_cases[0], 0).feeds


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    err = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / max(err, 1e-30))


@pytest.mark.parametrize("component", ["vision", "llm", "sam_encoder", "mask_decoder"])
def test_fp16_carrier_of_the_tiny_export(tiny_export, component):
    model = onnx.load(str(tiny_export / f"{component}.onnx"))
    keep = FP16_CARRIER_KEEP_FP32.get(component, ())
    half = fp16_carrier(model, keep)
    onnx.checker.check_model(half, full_check=True)  # strict type inference: types agree
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [
        i.type.tensor_type.elem_type for i in model.graph.input
    ]  # the runtime's feeds and outputs keep their types
    floats = [i.name for i in half.graph.initializer if i.data_type == TensorProto.FLOAT]
    halves = [i for i in half.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert len(halves) > 10 and len(floats) < len(halves) / 4
    wrapped = [n for n in half.graph.node if "__in0_fp32" in "".join(n.output)]
    assert (len(wrapped) > 0) == bool(keep)  # the norms run float32 between casts
    feeds = _feeds(component)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    worst = min(
        _sqnr(a, b) for a, b in zip(ref.run(None, feeds), got.run(None, feeds), strict=True)
    )
    print(component, "fp16 carrier worst output SQNR", round(worst, 1), "dB")
    assert worst >= MIN_SQNR_DB


def test_qdq_scales_become_fp16_so_dequantized_weights_are_fp16():
    """An INT4 weight-only GEMM: the DQ's output takes its scale's type (fp16), and the
    activation is cast from the float32 input, so the MatMul runs fp16 x fp16."""
    k, n = 32, 8
    rng = np.random.default_rng(0)
    inits = [
        helper.make_tensor("w_q", TensorProto.INT4, [k, n], rng.integers(-8, 8, k * n).tolist()),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, (k // 16, n)).astype(np.float32), "w_s"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], "dq", axis=0, block_size=16),
        helper.make_node("MatMul", ["x", "w"], ["y"], "mm"),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", f32, [2, k])],
        [helper.make_tensor_value_info("y", f32, [2, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    half = fp16_carrier(model)
    onnx.checker.check_model(half, full_check=True)
    scale = next(i for i in half.graph.initializer if i.name == "w_s")
    assert scale.data_type == TensorProto.FLOAT16
    x = rng.normal(size=(2, k)).astype(np.float32)
    a = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    b = ort.InferenceSession(half.SerializeToString()).run(None, {"x": x})[0]
    assert b.dtype == np.float32 and _sqnr(a, b) >= 40.0  # 45.3 dB measured (fp16 rounding)
    old = model.opset_import[0]
    old.version = 17
    with pytest.raises(ValueError, match="opset 17: fp16 Q/DQ scales need opset 19"):
        fp16_carrier(model)


@pytest.mark.parametrize("component", ["llm", "sam_encoder"])
def test_file_version_streams_the_same_graph_through_external_data(
    tiny_export, tmp_path, component
):
    """`fp16_carrier_file` (what builds use: one weight at a time, any size) writes what the
    in-memory `fp16_carrier` makes, with the weights in `<dst>.data`; converting twice is a
    no-op (bundles for TensorRT targets already hold fp16 carriers)."""
    from onnx.external_data_helper import uses_external_data

    from citrus_edge.engines.float16 import fp16_carrier_file, is_fp16_carrier

    keep = FP16_CARRIER_KEEP_FP32.get(component, ())
    src = tmp_path / "src" / f"{component}.onnx"
    src.parent.mkdir()
    model = onnx.load(str(tiny_export / f"{component}.onnx"))
    onnx.save(model, str(src), save_as_external_data=True, location=f"{src.name}.data",
              size_threshold=0)  # fmt: skip
    dst = fp16_carrier_file(src, tmp_path / f"{component}.onnx", keep)
    written = onnx.load(str(dst), load_external_data=False)
    assert is_fp16_carrier(written)
    assert all(uses_external_data(t) for t in written.graph.initializer if t.dims)
    streamed = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    model = onnx.load(str(tiny_export / f"{component}.onnx"))  # saving moved its data out
    in_memory = fp16_carrier(model, keep)
    expected = {t.name: numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    assert streamed.keys() == expected.keys()
    assert all(
        streamed[k].dtype == expected[k].dtype and np.array_equal(streamed[k], expected[k])
        for k in expected
    )
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in in_memory.graph.node]
    feeds = _feeds(component)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds)
    ref = ort.InferenceSession(in_memory.SerializeToString(), providers=["CPUExecutionProvider"])
    assert all(np.array_equal(a, b) for a, b in zip(got, ref.run(None, feeds), strict=True))
    again = fp16_carrier_file(dst, tmp_path / "again.onnx", keep)
    twice = onnx.load(str(again))
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in in_memory.graph.node]
    assert fp16_carrier(in_memory, keep).graph == in_memory.graph
