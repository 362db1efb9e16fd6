"""Every target's default recipe builds, with no GPU, on the TINY model (`build`, recipe=None).

House rule: every path a user gets without flags is exercised here. `citrus-edge build --target
orin` died in ModelOpt's fused AWQ-lite (`settings.ModelOptInt4Settings.awq_fuse_nodes`); the
TINY model's norm weights are drawn away from 1 so that its RMSNorm `Mul`s carry weights ModelOpt
folds (a freshly initialised norm of ones exports without them and never reached that code).

The accuracy budget is the one thing not left at its default: a random TINY model's logits are
near ties, so its greedy tokens flip under any quantization (token agreement 0.55 measured with
int4) and the default budget (`dice=1,tokens=99`) could only fail. The budget path itself is
exercised by `test_quantize_budget.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from citrus_edge.targets import TARGETS

pytest.importorskip("modelopt.onnx.quantization")
onnx = pytest.importorskip("onnx")

# A budget a random model can meet (see the module docstring); everything else is the default.
NO_GATE = "dice=100,tokens=0"
TINY_LLM_MATMULS = 15  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
TINY_LLM_INT4 = 14  # TensorRT INT4 keeps the lm_head float (`Int4AwqSettings.keep_lm_head`)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    import torch

    from citrus_edge.modelling.checkpoint import save_checkpoint

    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # U(0.5, 1.5), not ones
    root = tmp_path_factory.mktemp("ckpt")
    tok = root / "tokenizer.json"
    tiny_tokenizer().save(str(tok))
    save_checkpoint(model, root / "tiny", tokenizer_json=tok)
    return root / "tiny"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from citrus_edge.calib_data.phantom_set import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("ph") / "set", n=10, seed=3)


def _int4_weights(path: Path) -> int:
    """DequantizeLinear nodes whose quantized input is an INT4 initializer."""
    model = onnx.load(str(path))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return sum(
        1
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) == onnx.TensorProto.INT4
    )


def _qdq_nodes(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


@pytest.mark.parametrize("name", list(TARGETS))
def test_default_recipe_builds(name, tiny_ckpt, phantoms, tmp_path):
    from citrus_edge.bundle import load_bundle
    from citrus_edge.cli.bundle_build import BuildConfig, build

    target = TARGETS[name]
    cfg = BuildConfig(
        name, tiny_ckpt, calib=phantoms, eval_data=phantoms, eval_limit=3, budget=NO_GATE
    )
    assert cfg.recipe is None  # the target's default recipe
    out = tmp_path / "bundle"
    manifest = build(cfg, out)
    load_bundle(out)  # every file's sha256 verifies
    if target.tensorrt:
        assert manifest["optimize"] == "size" and "latency_choice" not in manifest
        assert manifest["recipe"]["name"] == target.default_recipe
    else:  # the default optimises latency: each component timed here against its fp32 graph
        choice = manifest["latency_choice"]
        assert manifest["optimize"] == "latency"
        assert choice["requested_recipe"]["name"] == target.default_recipe
        assert manifest["recipe"] == choice["chosen_recipe"]
        for c, t in choice["components"].items():
            assert t["fp32_ms"] > 0 and t["quantized_ms"] > 0
            pays = (
                t["speedup"] * (1 - choice["margin"]) >= 1 - 1e-9
                and t["quantized_ms"] < t["fp32_ms"]
            )
            assert t["kept"] == (t["precision"] if pays else "fp32"), (c, t)
            assert manifest["components"][c]["precision"] == t["kept"]
    assert manifest["target"]["name"] == name
    assert manifest["target_request"] == {
        "requested": name,
        "resolved": name,
        "how": "exact",
        "device": None,
    }
    comps = manifest["components"]
    if target.default_recipe == "fp16-w4":
        assert _int4_weights(out / comps["llm"]["file"]) == TINY_LLM_INT4
        for c in ("vision", "sam_encoder", "mask_decoder"):
            assert comps[c]["precision"] == "fp16" and _qdq_nodes(out / comps[c]["file"]) == 0
    else:  # cpu: int8 (static Q/DQ encoders and decoder, 8-bit MatMulNBits LLM) where it paid
        assert target.default_recipe == "int8"
        for c in ("vision", "sam_encoder", "mask_decoder"):
            int8 = comps[c]["precision"] == "int8"
            assert (_qdq_nodes(out / comps[c]["file"]) > 0) == int8, c
        llm = onnx.load(str(out / comps["llm"]["file"]), load_external_data=False)
        nbits = sum(n.op_type == "MatMulNBits" for n in llm.graph.node)
        assert nbits == (TINY_LLM_MATMULS if comps["llm"]["precision"] == "int8" else 0)
    plan_file = out / "engine_plan.json"
    assert plan_file.is_file() == target.tensorrt == ("engine_plan" in manifest)
    from citrus_edge.engines.float16 import is_fp16_carrier

    for c in ("vision", "llm", "sam_encoder", "mask_decoder"):
        graph = onnx.load(str(out / comps[c]["file"]), load_external_data=False)
        # TensorRT bundles carry fp16 weights (what the engines consume); CPU ones fp32/int8
        assert is_fp16_carrier(graph) == target.tensorrt, c
        if target.tensorrt:
            types = {t.data_type for t in graph.graph.initializer if len(t.dims) >= 2}
            assert onnx.TensorProto.FLOAT not in types, (c, types)  # no fp32 matrix left
    if target.tensorrt:  # each fp16 graph checked against its validated fp32 original
        from citrus_edge.engines.carrier_check import FP16_RTOL

        checked = manifest["fp16_carriers"]
        assert set(checked) == {"vision", "llm", "sam_encoder", "mask_decoder"}
        for c, outputs in checked.items():
            worst = max(e["max_rel"] for e in outputs.values())
            assert 0 < worst <= FP16_RTOL[c], (c, worst)  # fp16 rounding seen, within bound
    else:
        assert "fp16_carriers" not in manifest
    if target.tensorrt:
        plan = json.loads(plan_file.read_text())
        assert plan == manifest["engine_plan"] and plan["target"] == name
        by_name = {c["component"]: c for c in plan["components"]}
        assert by_name["llm"]["strongly_typed"] and by_name["llm"]["quant_types"] == ["int4"]
        assert "FP16" in by_name["vision"]["builder_flags"]


def test_build_target_orin_as_users_type_it(tiny_ckpt, phantoms, tmp_path):
    """`citrus-edge build --target orin` (the family name): off a Jetson, orin-agx-64."""
    from citrus_edge.cli import app

    out = tmp_path / "B"
    args = ["build", "--target", "orin", "--out", str(out), "--model", str(tiny_ckpt)]
    args += ["--calib", str(phantoms), "--eval", str(phantoms), "--eval-limit", "3"]
    res = CliRunner().invoke(app, [*args, "--budget", NO_GATE], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target_request"]["requested"] == "orin"
    assert manifest["target_request"]["resolved"] == "orin-agx-64" == manifest["target"]["name"]
    assert manifest["target_request"]["how"] == "family default"
    assert manifest["recipe"]["name"] == "fp16-w4"
    assert np.isclose(manifest["target"]["memory_gb"], 64.0)
