"""Accuracy budget, SQNR, layer groups, Q/DQ surgery and checks, and the quantizer registry.

Seconds: hand-made graphs and plans only; the quantize runs are in test_quantize_cpu.py,
test_quantize_search.py and test_quantize_modelopt.py.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from citrus_edge.compress.budget import DEFAULT_BUDGET, Budget, Measured, parse_budget  # noqa: E402
from citrus_edge.compress.fidelity import sqnr_db  # noqa: E402
from citrus_edge.compress.qdq_check import (  # noqa: E402
    QuantizedGraphError,
    check_graph,
    require_ok,
)
from citrus_edge.compress.quantize import describe_plan, plan_components  # noqa: E402
from citrus_edge.compress.registry import (  # noqa: E402
    Candidate,
    UnsupportedQuantizationError,
    get_quantizer,
)
from citrus_edge.compress.sensitivity import block_of, layer_group, revert_to_float  # noqa: E402
from citrus_edge.compress.settings import (  # noqa: E402
    CPU_WEIGHT_ONLY_INT4,
    QuantizeConfig,
    StaticQdqSettings,
)
from citrus_edge.recipes import FP16, INT8, INT8_W4, get_recipe  # noqa: E402
from citrus_edge.targets import UnsupportedPrecisionError, get_target  # noqa: E402

# -- budget ------------------------------------------------------------------------------


def test_budget_parses_points_and_percent():
    assert parse_budget("dice=1,tokens=99") == Budget(max_dice_drop=0.01, min_token_agreement=0.99)
    b = parse_budget(" dice=2.5 , sqnr=20 ")
    assert b.max_dice_drop == pytest.approx(0.025)
    assert b.min_token_agreement == DEFAULT_BUDGET.min_token_agreement
    assert b.min_sqnr_db == 20.0
    assert parse_budget(str(b)) == b


@pytest.mark.parametrize(
    ("text", "match"),
    [("dice", "key=value"), ("speed=3", "key one of"), ("dice=x", "not a number"), (",", "names")],
)
def test_budget_refuses_what_it_cannot_read(text, match):
    with pytest.raises(ValueError, match=match):
        parse_budget(text)


def test_budget_validates_ranges():
    with pytest.raises(ValueError, match="max_dice_drop"):
        Budget(max_dice_drop=1.5)
    with pytest.raises(ValueError, match="min_token_agreement"):
        parse_budget("tokens=120")


def test_measured_violations_and_excess():
    budget = Budget(max_dice_drop=0.01, min_token_agreement=0.99, min_sqnr_db=20.0)
    ok = Measured(0.005, 0.995, {"vision": 31.0}, 6, 2)
    assert ok.violations(budget) == [] and ok.excess(budget) <= 0
    bad = Measured(0.03, 0.90, {"vision": 15.0}, 6, 2)
    lines = bad.violations(budget)
    assert len(lines) == 3 and "Dice drop 0.0300 > 0.0100" in lines[0]
    # token agreement 0.90 against an allowance of 0.01: nine allowances over
    assert bad.excess(budget) == pytest.approx(9.0)
    assert Measured(None, None, {}).violations(budget) == []  # nothing measured, nothing broken
    assert Measured(0.0, 1.0, {"llm": math.inf}).to_dict()["sqnr_db"] == {"llm": "inf"}


# -- SQNR ----------------------------------------------------------------------------------


def test_sqnr_numbers():
    ref = np.ones(4)
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0)  # 4 / (4 * 0.01) = 100 -> 20 dB
    assert sqnr_db(ref, ref + 0.01) == pytest.approx(40.0)
    assert math.isinf(sqnr_db(ref, ref))


# -- layer groups ----------------------------------------------------------------------------


def test_layer_groups_name_the_layer_and_op_kind():
    qkv = Candidate("/vision_encoder/backbone/blocks.0/attn/qkv/MatMul", "MatMul")
    residual = Candidate("/mask_decoder/transformer/layers.1/Add_3", "Add")
    root = Candidate("/Add_7", "Add")
    assert layer_group(qkv) == "/vision_encoder/backbone/blocks.0/attn/qkv:MatMul"
    assert layer_group(residual) == "/mask_decoder/transformer/layers.1:Add"
    assert layer_group(root) == "/:Add"
    assert block_of(qkv) == "/vision_encoder/backbone/blocks.0"
    assert block_of(residual) == "/mask_decoder/transformer/layers.1"
    assert block_of(root) == "/"


# -- a hand-made Q/DQ graph ------------------------------------------------------------------


def _float_and_qdq(per_channel: bool = True):
    """y = x @ W (float), and the same with x and W behind int8 Q/DQ (W per channel)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)  # [K, N]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    wf = numpy_helper.from_array(w, "W")
    fmodel = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["y"], "/fc/MatMul")], "f", [x], [y], [wf]
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)  # [N]
    if not per_channel:
        w_scale = np.array(np.abs(w).max() / 127, dtype=np.float32)
    w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(w_q, "W_q"),
        numpy_helper.from_array(w_scale, "W_scale"),
        numpy_helper.from_array(np.zeros_like(w_scale, dtype=np.int8), "W_zp"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], "x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], "x_DQ"),
        helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zp"], ["W_dq"], "W_DQ", axis=1),
        helper.make_node("MatMul", ["x_dq", "W_dq"], ["y"], "/fc/MatMul"),
    ]
    qmodel = helper.make_model(
        helper.make_graph(nodes, "q", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    return fmodel, qmodel


def _run(model_or_bytes, x):
    graph = (
        model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString()
    )
    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_revert_to_float_gives_the_float_result_and_restores_the_graph():
    fmodel, qmodel = _float_and_qdq()
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    before = qmodel.SerializeToString()
    reverted = revert_to_float(qmodel, fmodel, {"/fc/MatMul"})
    np.testing.assert_array_equal(_run(reverted, x), _run(fmodel, x))
    assert sqnr_db(_run(fmodel, x), _run(qmodel, x)) < 60  # the Q/DQ graph really differs
    assert qmodel.SerializeToString() == before


def test_check_graph_reads_qdq_structure(tmp_path):
    _, qmodel = _float_and_qdq()
    onnx.save(qmodel, tmp_path / "q.onnx")
    facts = check_graph(tmp_path / "q.onnx", "int8", "ort-static-qdq", per_channel=True)
    assert facts["ok"], facts["problems"]
    assert facts["quantized_ops"] == {"MatMul": 1}
    assert facts["zero_point_types"] == {"INT8": 3}
    assert facts["per_channel_weight_dq"] == 1
    # asked for FP8, an INT8 graph fails
    wrong = check_graph(tmp_path / "q.onnx", "fp8", "modelopt-onnx")
    assert not wrong["ok"] and "FLOAT8E4M3FN" in wrong["problems"][0]
    with pytest.raises(QuantizedGraphError, match="FLOAT8E4M3FN"):
        require_ok("fc", wrong)


def test_check_graph_wants_per_channel_and_finite_scales(tmp_path):
    _, per_tensor = _float_and_qdq(per_channel=False)
    onnx.save(per_tensor, tmp_path / "t.onnx")
    facts = check_graph(tmp_path / "t.onnx", "int8", "ort-static-qdq", per_channel=True)
    assert facts["problems"] == ["no per-channel weight scales, but per-channel weights were asked"]
    _, broken = _float_and_qdq()
    scale = next(i for i in broken.graph.initializer if i.name == "x_scale")
    scale.CopyFrom(numpy_helper.from_array(np.array(np.inf, np.float32), "x_scale"))
    onnx.save(broken, tmp_path / "b.onnx")
    problems = check_graph(tmp_path / "b.onnx", "int8", "ort-static-qdq")["problems"]
    assert any("not finite and positive" in p for p in problems)


# -- registry and plans ----------------------------------------------------------------------


def test_registry_names_what_exists():
    assert get_quantizer("onnxruntime", "int8") is get_quantizer("onnxruntime", "int8")
    with pytest.raises(UnsupportedQuantizationError, match="onnxruntime/int8"):
        get_quantizer("onnxruntime", "fp8")


def test_plans_per_target():
    cpu = plan_components(INT8, get_target("cpu"))
    assert {c: p.settings.scheme for c, p in cpu.items()} == {
        "vision": "ort-static-qdq",
        "llm": "ort-matmulnbits",
        "sam_encoder": "ort-static-qdq",
        "mask_decoder": "ort-static-qdq",
    }
    assert cpu["llm"].settings.bits == 8
    w4 = plan_components(INT8_W4, get_target("cpu"))
    assert w4["llm"].settings.scheme == "ort-matmulnbits" and w4["llm"].settings.bits == 4
    trt = describe_plan(FP16.with_component("sam_encoder", "fp8"), "x86-ada")
    assert trt == [
        ("vision", "fp16", "engine-build"),
        ("llm", "fp16", "engine-build"),
        ("sam_encoder", "fp8", "modelopt-onnx"),
        ("mask_decoder", "fp16", "engine-build"),
    ]


def test_requests_that_cannot_be_honoured_are_refused_before_any_work():
    with pytest.raises(
        UnsupportedPrecisionError, match="targets that can: thor, x86-ada, x86-hopper"
    ):
        plan_components(get_recipe("fp8"), get_target("orin-agx-64"))
    with pytest.raises(UnsupportedPrecisionError, match="fp16"):
        plan_components(FP16, get_target("cpu"))
    four_bit = QuantizeConfig(settings={"llm": CPU_WEIGHT_ONLY_INT4})
    with pytest.raises(UnsupportedQuantizationError, match="never changed silently"):
        plan_components(INT8, get_target("cpu"), four_bit)
    with pytest.raises(UnsupportedQuantizationError, match="max or entropy"):
        plan_components(
            FP16.with_component("mask_decoder", "int8"),
            get_target("x86-hopper"),
            method="percentile",
        )
    with pytest.raises(UnsupportedQuantizationError, match="checkpoint"):
        plan_components(FP16.with_component("llm", "int8"), get_target("x86-hopper"))
    static_for_llm = QuantizeConfig(settings={"llm": StaticQdqSettings()})
    with pytest.raises(UnsupportedQuantizationError, match="ModelOptLlmSettings"):
        plan_components(FP16.with_component("llm", "int8"), get_target("thor"), static_for_llm)
    with pytest.raises(ValueError, match="method"):
        plan_components(INT8, get_target("cpu"), method="mse")


def test_importing_quantize_loads_neither_torch_nor_modelopt():
    code = (
        "import sys, citrus_edge.compress.quantize;"
        "from citrus_edge.compress.registry import load_builtin; load_builtin();"
        "print(sorted(m for m in ('torch', 'modelopt', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_compare_runs_scores_answer_masks_and_reports_probes_apart():
    from citrus_edge.compress.calibrate import Outcome, PipelineRun
    from citrus_edge.compress.fidelity import compare_runs

    full = np.ones((4, 4), bool)
    half = np.zeros((4, 4), bool)
    half[:2] = True
    ref = PipelineRun(
        [
            Outcome("a", "segment", [1, 2], full),  # mask vs the same mask: 1
            Outcome("b", "segment", [1, 3], full),  # mask vs half of it: 2/3
            Outcome("c", "segment", [1, 4], full),  # a mask vs no [SEG] (a probe): 0
            Outcome("d", "segment", [5], half, probe=True),  # no mask either side: 1
            Outcome("e", "report", [7, 8, 9, 9], None),
        ]
    )
    got = PipelineRun(
        [
            Outcome("a", "segment", [1, 2], full),
            Outcome("b", "segment", [1, 3], half),
            Outcome("c", "segment", [1, 0], full, probe=True),
            Outcome("d", "segment", [5], full, probe=True),
            Outcome("e", "report", [7, 8, 0, 0], None),
        ]
    )
    fid = compare_runs(ref, got)
    assert fid.dice_drop == pytest.approx(1 - (1 + 2 / 3 + 0 + 1) / 4)
    assert fid.probe_dice_drop == pytest.approx(1 - 2 / 3)  # half vs full, reported apart
    assert fid.n_masks == 4 and fid.n_probes == 1
    assert fid.per_record["c"]["dice"] == 0.0 and "probe_dice" not in fid.per_record["c"]
    assert fid.token_agreement == pytest.approx((1 + 1 + 0.5 + 1 + 0.5) / 5)


def test_broken_bounds_relax_what_holds():
    budget = Budget(max_dice_drop=0.01, min_token_agreement=0.99, min_sqnr_db=20.0)
    tokens_only = Measured(0.002, 0.95, {"llm": 30.0}).broken_bounds(budget)
    assert tokens_only == Budget(max_dice_drop=1.0, min_token_agreement=0.99, min_sqnr_db=None)
    # a graph costing Dice only is not over the broken (token) bound; one costing tokens is
    assert Measured(0.5, 1.0).excess(tokens_only) <= 0 < Measured(0.0, 0.97).excess(tokens_only)
    dice_only = Measured(0.05, 0.999, {"vision": 10.0}).broken_bounds(budget)
    assert dice_only == Budget(max_dice_drop=0.01, min_token_agreement=0.0, min_sqnr_db=20.0)
