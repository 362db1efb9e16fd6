"""Explicit Q/DQ graphs for TensorRT targets from NVIDIA ModelOpt, checked on the CPU.

INT8 (mask decoder) and FP8 (SAM2 encoder) for x86-hopper from one quantize run; INT8 graphs
are also measured in ONNX Runtime with optimizations off, FP8 ones only structurally (ORT on
the CPU cannot run FP8 faithfully). Orin never gets FP8. The ModelOpt PyTorch LLM path is
`slow` (modelopt.torch import and calibration).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures import tiny_export_with_phantoms, tiny_model

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("modelopt.onnx.quantization")

from onnx import TensorProto, numpy_helper  # noqa: E402

from citrus_edge.compress.budget import DEFAULT_BUDGET, BudgetNotMeasurableError  # noqa: E402
from citrus_edge.compress.quantize import quantize  # noqa: E402
from citrus_edge.compress.settings import QuantizeConfig  # noqa: E402
from citrus_edge.recipes import FP16  # noqa: E402
from citrus_edge.targets import UnsupportedPrecisionError  # noqa: E402

CONFIG = QuantizeConfig(max_new_tokens=16)
RECIPE = FP16.with_component("mask_decoder", "int8").with_component("sam_encoder", "fp8")
# Worst output SQNR of ModelOpt's INT8 mask decoder, ORT with optimizations off: 26.6 dB.
MIN_INT8_SQNR_DB = 24.0
QDQ = ("QuantizeLinear", "DequantizeLinear")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_export_with_phantoms(tmp_path_factory.mktemp("quant-trt"))


@pytest.fixture(scope="module")
def hopper(data):
    root, export, manifest = data
    report = quantize(export, RECIPE, "x86-hopper", manifest, None, root / "hopper", config=CONFIG)
    return report, root / "hopper"


def _facts(path):
    """Per GEMM-like node: are its activation and weight inputs behind DQ; DQ zero-point types."""
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    behind_dq = {
        n.name: [
            producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
            for i in n.input[:2]
        ]
        for n in gemms
    }
    zero_points = {
        TensorProto.DataType.Name(inits[n.input[2]].data_type)
        for n in model.graph.node
        if n.op_type in QDQ and len(n.input) > 2 and n.input[2] in inits
    }
    scales = [
        numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node if n.op_type in QDQ
    ]
    return model, behind_dq, zero_points, scales


def test_int8_qdq_graph_for_hopper(hopper):
    report, out = hopper
    model, behind_dq, zero_points, scales = _facts(out / "mask_decoder.onnx")
    quantized = [n for n, (a, w) in behind_dq.items() if a and w]
    print("mask_decoder int8: GEMMs with Q/DQ on both inputs", len(quantized), "of", len(behind_dq))
    assert len(quantized) >= 40  # 42 measured: every weight MatMul, Gemm and the attention ones
    assert zero_points == {"INT8"}
    assert scales and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    # high_precision_dtype fp32: nothing was converted to float16 (ORT on the CPU checks it)
    assert not [i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16]
    c = report.components["mask_decoder"]
    assert c.scheme == "modelopt-onnx" and c.check["ok"] and c.check["per_channel_weight_dq"] >= 40
    assert c.sqnr_mode == "reference"
    print("mask_decoder int8 SQNR", c.sqnr_db)
    assert c.worst_sqnr_db >= MIN_INT8_SQNR_DB


def test_fp8_qdq_graph_for_hopper_is_checked_structurally(hopper):
    report, out = hopper
    model, behind_dq, zero_points, scales = _facts(out / "sam_encoder.onnx")
    quantized = [n for n, (a, w) in behind_dq.items() if a and w]
    print("sam_encoder fp8: GEMMs with Q/DQ on both inputs", len(quantized), "of", len(behind_dq))
    assert len(quantized) >= 30  # 33 MatMul + 3 Conv measured; ModelOpt fp8 keeps small Convs
    assert zero_points == {"FLOAT8E4M3FN"}
    assert all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales)
    c = report.components["sam_encoder"]
    assert c.check["ok"] and c.check["zero_point_types"] == {
        "FLOAT8E4M3FN": c.check["quantize_linear"] + c.check["dequantize_linear"]
    }
    # never an accuracy number from a run ORT cannot do faithfully
    assert c.sqnr_db is None and c.sqnr_mode is None
    assert report.measured["dice_drop"] is None and report.measured["token_agreement"] is None
    assert "sam_encoder" in report.measured["unmeasured_why"]
    assert report.rows()[3][4] == "structural ok"
    # fp16 components are left for the engine build
    assert report.components["vision"].status == "engine-build"
    assert (out / "vision.onnx").read_bytes() == (
        Path(report.export_dir) / "vision.onnx"
    ).read_bytes()


def test_fp8_with_a_budget_is_refused_not_guessed(data):
    root, export, manifest = data
    recipe = FP16.with_component("sam_encoder", "fp8")
    with pytest.raises(BudgetNotMeasurableError, match="structurally only"):
        quantize(export, recipe, "x86-ada", manifest, DEFAULT_BUDGET, root / "ada", config=CONFIG)
    assert not (root / "ada").exists()


@pytest.mark.parametrize("target", ["orin-agx-64", "orin-nano-8"])
def test_orin_refuses_fp8_naming_the_targets_that_can(data, target):
    root, export, manifest = data
    for recipe in ("fp8", RECIPE):
        with pytest.raises(UnsupportedPrecisionError) as info:
            quantize(export, recipe, target, manifest, None, root / "orin", config=CONFIG)
        message = str(info.value)
        assert f"{target} cannot run fp8" in message
        assert "targets that can: thor, x86-ada, x86-hopper" in message
    assert not (root / "orin").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "zero_point"), [("int8", "INT8"), ("int4", None), ("fp8", None)]
)
def test_llm_for_tensorrt(data, precision, zero_point):
    """INT8 SmoothQuant / FP8 through ModelOpt PyTorch + the export/ LLM wrapper, INT4-AWQ
    through ModelOpt ONNX. Measured on TINY: int8 39.7 dB, int4 17.8 dB (ORT reference mode)."""
    from citrus_edge.modelling.checkpoint import save_checkpoint

    root, export, manifest = data
    checkpoint = root / "checkpoint"
    if not checkpoint.exists():
        save_checkpoint(tiny_model(), checkpoint, root / "tokenizer-src.json")
    recipe = FP16.with_component("llm", precision)
    out = root / f"llm-{precision}"
    report = quantize(
        export, recipe, "x86-hopper", manifest, None, out, config=CONFIG, checkpoint=checkpoint
    )
    c = report.components["llm"]
    print(precision, c.scheme, c.check, c.sqnr_db)
    assert c.check["ok"]
    assert c.check["quantized_ops"].get("MatMul", 0) >= 14  # every linear layer but lm_head
    if zero_point:
        assert set(c.check["zero_point_types"]) == {zero_point}
        assert c.worst_sqnr_db >= 35.0
    if precision == "int4":
        assert c.check["weight_types"] == {"INT4": 14} and c.worst_sqnr_db >= 15.0
        assert c.weight_bytes_after < 0.3 * c.weight_bytes_before
    if precision == "fp8":
        assert c.check["custom_ops"]["trt::TRT_FP8QuantizeLinear"] >= 14 and c.sqnr_db is None


def _norm_then_two_gemms(path: Path, k: int = 32, n: int = 32) -> Path:
    """x [4, k] -> Mul(norm weight) -> two MatMuls: the RMSNorm -> q/k pattern AWQ-lite fuses."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, k).astype(np.float32), "norm_w"),
        numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "w_a"),
        numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "w_b"),
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
        [helper.make_tensor_value_info("x", f32, [4, k])],
        [helper.make_tensor_value_info(o, f32, [4, n]) for o in ("a", "b")],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _awq_lite(src: Path, dst: Path, fuse: bool) -> None:
    from modelopt.onnx.quantization import quantize as modelopt_quantize

    feeds = [
        {"x": np.random.default_rng(i).normal(size=(4, 32)).astype(np.float32)} for i in (1, 2)
    ]
    modelopt_quantize(
        onnx_path=str(src),
        quantize_mode="int4",
        calibration_method="awq_lite",
        calibration_data_reader=iter(feeds),
        calibration_eps=["cpu"],
        block_size=16,
        output_path=str(dst),
        log_level="WARNING",
        awqlite_fuse_nodes=fuse,
    )


def test_modelopt_awq_fusion_defect_is_still_there(tmp_path):
    """ModelOpt 0.23-0.47's fused AWQ-lite calls cupy's `.get()` on a numpy array without a GPU.

    `settings.ModelOptInt4Settings.awq_fuse_nodes` is False because of it. When this test fails,
    a ModelOpt upgrade fixed the defect: drop the workaround (and this test).
    """
    from modelopt.onnx.quantization import int4

    if int4.has_cupy:
        pytest.skip("cupy has a GPU here: ModelOpt's fused path works on cupy arrays")
    src = _norm_then_two_gemms(tmp_path / "g.onnx")
    with pytest.raises(AttributeError, match="'numpy.ndarray' object has no attribute 'get'"):
        _awq_lite(src, tmp_path / "fused.onnx", fuse=True)


def test_unfused_awq_lite_writes_int4_weights(tmp_path):
    """The setting we ship: the same graph quantizes, each weight with its own AWQ scale."""
    from citrus_edge.compress.modelopt_quant import _awq_options
    from citrus_edge.compress.settings import ModelOptInt4Settings

    assert _awq_options(ModelOptInt4Settings()) == {"awqlite_fuse_nodes": False}
    src = _norm_then_two_gemms(tmp_path / "g.onnx")
    _awq_lite(src, tmp_path / "q.onnx", fuse=False)
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    int4 = [n for n in dq if inits[n.input[0]].data_type == TensorProto.INT4]
    assert len(int4) == 2  # both weights, 4-bit
    assert {n.op_type for n in model.graph.node}.issuperset({"Mul", "MatMul"})
    pre_scale_muls = [n for n in model.graph.node if n.op_type == "Mul" and n.name != "norm/Mul"]
    assert len(pre_scale_muls) == 2  # one AWQ input scale per weight, the norm weight untouched
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(src)).graph.initializer}
    assert np.array_equal(numpy_helper.to_array(inits["norm_w"]), original["norm_w"])


def test_external_data_modelopt_names_its_own_way_is_adopted(tmp_path):
    """ModelOpt writes a large INT4 graph's weights as `llm.onnx_data`; the bundle and the
    structural check expect `llm.onnx.data`: the file is renamed and the tensors point to it."""
    import numpy as np
    from onnx import helper, numpy_helper

    from citrus_edge.compress.modelopt_quant import adopt_external_data

    weight = np.arange(64, dtype=np.float32).reshape(8, 8)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "llm.onnx"
    onnx.save_model(
        helper.make_model(graph),
        str(path),
        save_as_external_data=True,
        location="llm.onnx_data",
        size_threshold=0,
    )
    adopt_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm.onnx", "llm.onnx.data"]
    loaded = onnx.load(str(path))  # reads the renamed file
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight)
    adopt_external_data(path)  # already ours: nothing changes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm.onnx", "llm.onnx.data"]


def test_int4_llm_with_external_data_passes_its_structural_check(tmp_path):
    """The 8B's LLM graph lives in external data: the INT4 quantizer writes its weights and
    scales there too, and the structural check must read them beside the graph (it read them
    from the working directory, so the slice's default Orin build failed with 'not regular
    file')."""
    from fixtures import tiny_export_with_phantoms

    from citrus_edge.compress.quantize import quantize

    _, export, manifest = tiny_export_with_phantoms(tmp_path, n_phantoms=6)
    llm = onnx.load(str(export / "llm.onnx"))
    onnx.save_model(
        llm, str(export / "llm.onnx"), save_as_external_data=True,
        location="llm.onnx.data", size_threshold=0,
    )  # fmt: skip
    report = quantize(export, "fp16-w4", "orin-agx-64", manifest, None, tmp_path / "q")
    assert report.components["llm"].check["ok"], report.components["llm"].check
    assert (tmp_path / "q" / "llm.onnx.data").is_file()
    assert not list((tmp_path / "q").glob("*.onnx_data"))
