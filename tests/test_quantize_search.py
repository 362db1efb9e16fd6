"""The accuracy budget catches a deliberately bad quantization and the sensitivity search repairs
it; a budget that cannot be met raises with the measured numbers. TINY export, CPU target.

Only the mask decoder is quantized (recipe fp32 + mask_decoder=int8), so every pipeline run
spends its time in the graph under test. The bad setting quantizes the residual and bias Adds
too (`op_types` + "Add"): worst output SQNR 23.1 dB (default settings) -> 17.0 dB, first-mask
Dice drop 0.037; the search returned two bias Adds (hypernetwork MLPs 2 and 3, +2.8 and +2.0
dB) and ended at 21.8 dB, Dice drop 0.028 (measured).
"""

from __future__ import annotations

import dataclasses

import pytest
from fixtures import tiny_export_with_phantoms

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from citrus_edge.compress.budget import Budget, BudgetNotMetError  # noqa: E402
from citrus_edge.compress.quantize import quantize  # noqa: E402
from citrus_edge.compress.settings import (  # noqa: E402
    CPU_STATIC_INT8,
    GEMM_OP_TYPES,
    QuantizeConfig,
)
from citrus_edge.recipes import FP32  # noqa: E402

RECIPE = FP32.with_component("mask_decoder", "int8")
# Adds in INT8 as well (per-tensor: a per-channel bias Add makes no QLinearAdd in ORT).
ADDS_IN_INT8 = dataclasses.replace(
    CPU_STATIC_INT8, op_types=GEMM_OP_TYPES + ("Add",), per_channel=False
)
# 25 dB: with the task grammars the decoder is fed what constrained answers give (measured: the
# bad setting 22.5 dB, repaired 26.4 dB on the TINY model).
BUDGET = Budget(max_dice_drop=0.03, min_token_agreement=0.99, min_sqnr_db=25.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_export_with_phantoms(tmp_path_factory.mktemp("quant-search"))


def test_bad_setting_is_caught_and_repaired(data):
    root, export, manifest = data
    config = QuantizeConfig(max_new_tokens=16, settings={"mask_decoder": ADDS_IN_INT8})
    report = quantize(export, RECIPE, "cpu", manifest, BUDGET, root / "repaired", config=config)
    before, after = report.measured_initial, report.measured
    print("before", before, "\nafter", after)
    for step in report.search:
        print(step["group"], step["sqnr_gain_db"], [p["chosen"] for p in step["path"]])
    # caught: the bad setting breaks the budget ...
    assert before["sqnr_db"]["mask_decoder"] < BUDGET.min_sqnr_db
    # ... and repaired: the final graph meets every bound
    assert after["sqnr_db"]["mask_decoder"] >= BUDGET.min_sqnr_db
    assert after["dice_drop"] <= BUDGET.max_dice_drop
    assert after["token_agreement"] >= BUDGET.min_token_agreement
    # the search returned the Adds first: the op kind the bad setting added
    steps = report.search
    assert 1 <= len(steps) <= 4
    assert steps[0]["path"][0] == {
        "level": "op kind",
        "chosen": "Add",
        "gain_db": steps[0]["path"][0]["gain_db"],
        "alternatives": 4,
    }
    assert steps[0]["group"].endswith(":Add") and steps[0]["sqnr_gain_db"] > 0
    assert all(s["component"] == "mask_decoder" for s in steps)
    # what was returned is float in the written graph, and named in the report
    returned = sorted(n for s in steps for n in s["nodes"])
    assert report.components["mask_decoder"].float_nodes == returned
    graph = onnx.load(str(root / "repaired" / "mask_decoder.onnx"))
    producer = {o: n for n in graph.graph.node for o in n.output}
    for node in (n for n in graph.graph.node if n.name in returned):
        assert not any(
            producer.get(i) and producer[i].op_type == "DequantizeLinear" for i in node.input
        )


def test_budget_that_cannot_be_met_raises_with_the_numbers(data):
    root, export, manifest = data
    impossible = Budget(max_dice_drop=0.0, min_token_agreement=1.0, min_sqnr_db=80.0)
    config = QuantizeConfig(max_new_tokens=16, max_search_steps=1)
    with pytest.raises(BudgetNotMetError, match="misses budget") as info:
        quantize(export, RECIPE, "cpu", manifest, impossible, root / "never", config=config)
    error = info.value
    print(error)
    assert error.budget == impossible
    assert 15.0 < error.measured.sqnr_db["mask_decoder"] < 80.0
    assert len(error.excluded["mask_decoder"]) >= 1  # one search step was taken
    assert "max_search_steps" in str(error)
    assert not (root / "never").exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
