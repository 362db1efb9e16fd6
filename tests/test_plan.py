"""The planner: exact parameter counts against built models, and hand-checked arithmetic."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest

from citrus_edge.cli.memory_plan import format_plan, param_counts, plan, plan_table
from citrus_edge.config import CITRUS_V_8B, DEMO, TINY
from citrus_edge.recipes import FP8, FP16_W4, INT8, get_recipe
from citrus_edge.targets import UnsupportedPrecisionError, get_target

CONFIGS = {
    "tiny": TINY,
    "demo": DEMO,
    "tiny-residual": dataclasses.replace(TINY, projector="residual"),
    "tiny-tied": dataclasses.replace(
        TINY, text=dataclasses.replace(TINY.text, tie_word_embeddings=True)
    ),
}


@functools.cache
def built_counts(key: str) -> tuple[dict[str, tuple[int, int]], int, int]:
    """Per component (total, quantizable) params of a built model, the model's total, and the
    untied `lm_head`'s weights (0 when tied to the embedding table).

    quantizable = weights of Linear / Conv / ConvTranspose modules, `lm_head` excluded.
    """
    from torch import nn

    from citrus_edge.modelling.model import build_model

    model = build_model(CONFIGS[key])
    sam = model.sam2
    groups = {
        "vision": [model.mllm.model.visual],
        "llm": [model.mllm.model.language_model, model.mllm.lm_head],
        "sam_encoder": [sam.vision_encoder, sam.no_memory_embedding],
        "mask_decoder": [sam.prompt_encoder, sam.mask_decoder, model.seg_projector],
    }
    layers = (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
    out = {}
    for name, parts in groups.items():
        params, quantizable = {}, 0
        for part in parts:
            if isinstance(part, nn.Parameter):
                params[id(part)] = part.numel()
                continue
            params.update({id(p): p.numel() for p in part.parameters()})
            for m in part.modules():
                if isinstance(m, layers) and m is not model.mllm.lm_head:
                    quantizable += m.weight.numel()
        out[name] = (sum(params.values()), quantizable)
    head = model.mllm.lm_head.weight
    untied = head is not model.mllm.model.get_input_embeddings().weight
    return out, sum(p.numel() for p in model.parameters()), head.numel() if untied else 0


@pytest.mark.parametrize("key", list(CONFIGS))
def test_param_counts_match_built_model_exactly(key):
    built, model_total, head = built_counts(key)
    counted = param_counts(CONFIGS[key])
    for name, (total, quantizable) in built.items():
        assert (counted[name].total, counted[name].quantizable) == (total, quantizable), name
    assert sum(c.total for c in counted.values()) == model_total  # nothing left out
    llm = counted["llm"]
    text = CONFIGS[key].text
    untied = 0 if text.tie_word_embeddings else text.vocab_size * text.hidden_size
    assert llm.table == untied
    assert llm.head == head


def test_8b_sizes_match_published_models():
    counts = param_counts(CITRUS_V_8B)
    # Qwen2.5-VL-7B: ~7.6e9 language model, ~0.67e9 vision tower; SAM2 Hiera-L trunk ~0.21e9.
    assert counts["llm"].total == pytest.approx(7.6e9, rel=0.01)
    assert counts["vision"].total == pytest.approx(0.67e9, rel=0.015)
    assert 0.21e9 <= counts["sam_encoder"].total <= 0.22e9
    assert counts["mask_decoder"].total < 0.02e9  # 4.1 M SAM2 decoder + 12.8 M seg projector


def test_8b_on_orin_nano_by_hand():
    p = plan(CITRUS_V_8B, get_target("orin-nano-8"), FP16_W4, context_tokens=2048)
    # LLM: int4 (+ fp16 scale per 128) for the decoder layers' linear weights; embedding table,
    # lm_head, biases and norms in fp16.
    h, i, v, layers, kv = 3584, 18944, 151_668, 28, 4 * 128
    linear = layers * (h * h + 2 * h * kv + h * h + 3 * h * i)  # q, k, v, o, gate/up/down
    other = layers * (h + 2 * kv + 2 * h) + h + 2 * v * h  # biases, norms, final norm, tables
    assert linear == 6_525_288_448 and linear + other == 7_612_777_984
    llm_bytes = linear * (0.5 + 2 / 128) + other * 2
    assert p.component("llm").weight_bytes == pytest.approx(llm_bytes, rel=1e-12)
    assert llm_bytes == pytest.approx(5.539e9, rel=1e-3)
    # Vision tower in fp16: 2 bytes for every parameter.
    vh, vi, m = 1280, 3420, 1280 * 4
    vision = 3 * 2 * 14 * 14 * vh + 32 * (
        2 * vh + 3 * vh * vh + 3 * vh + vh * vh + vh + 2 * (vh * vi + vi) + vi * vh + vh
    )
    vision += vh + m * m + m + m * 3584 + 3584  # merger
    assert p.component("vision").params == vision == 676_550_144
    assert p.component("vision").weight_bytes == 2 * vision
    # KV cache: 2 x 28 layers x 4 kv heads x 128 x 2048 tokens x 2 bytes (fp16).
    kv_bytes = 2 * 28 * 4 * 128 * 2048 * 2
    assert p.kv_cache_bytes == kv_bytes == 117_440_512
    # Decode streams the LLM without the embedding table (one row per token) + the KV cache.
    per_token = llm_bytes - v * h * 2 + kv_bytes
    assert p.decode_bytes_per_token == pytest.approx(per_token, rel=1e-12)
    assert p.decode_tokens_per_s == pytest.approx(68e9 / per_token, rel=1e-12)
    assert p.decode_tokens_per_s == pytest.approx(14.88, abs=0.01)
    # Memory: ~7.5 GB of weights + KV does not fit the 8 - 2.5 GB left on an Orin Nano 8GB.
    assert p.usable_bytes == 5.5e9
    assert p.weight_bytes + p.kv_cache_bytes == pytest.approx(7.47e9, rel=1e-3)
    assert not p.fits and p.headroom_bytes < -2e9
    # The image: the 8B pixel budget (65535) turns the 448x448 profile max into 252x252.
    assert p.resized_hw == (252, 252) and p.vision_patches == 324 and p.image_tokens == 81


def test_int8_table_saves_one_byte_per_table_weight_and_nothing_else():
    """`--embeddings int8`: a quantized LLM's table at 1 byte a weight instead of 2 (fp16) or 4
    (CPU fp32 carrier); decode bytes unchanged (a gather reads one row); a float LLM keeps its
    table as the export wrote it."""
    v, h = CITRUS_V_8B.text.vocab_size, CITRUS_V_8B.text.hidden_size
    nano = get_target("orin-nano-8")
    base, small = (
        plan(CITRUS_V_8B, nano, FP16_W4, context_tokens=2048, embeddings=e) for e in (None, "int8")
    )
    saved = base.component("llm").weight_bytes - small.component("llm").weight_bytes
    assert saved == pytest.approx(v * h * (2 - 1), rel=1e-12)  # 0.54 GB
    assert small.decode_bytes_per_token == base.decode_bytes_per_token
    assert small.component("vision").weight_bytes == base.component("vision").weight_bytes
    cpu = get_target("cpu")
    w4 = get_recipe("int8-w4")
    saved = (
        plan(CITRUS_V_8B, cpu, w4).component("llm").weight_bytes
        - plan(CITRUS_V_8B, cpu, w4, embeddings="int8").component("llm").weight_bytes
    )
    assert saved == pytest.approx(v * h * (2 - 1), rel=1e-12)  # the CPU's low-bit table is fp16
    fp32 = get_recipe("fp32")
    assert (
        plan(CITRUS_V_8B, cpu, fp32, embeddings="int8").weight_bytes
        == plan(CITRUS_V_8B, cpu, fp32).weight_bytes
    )


def test_8b_on_agx_orin_fits_and_bound_is_above_published_decode():
    p = plan(CITRUS_V_8B, get_target("orin-agx-64"), FP16_W4)
    assert p.fits
    # Edge-LLM measured 32.3 tok/s for Qwen3-VL-8B (no draft) on AGX Orin: below our bound.
    assert 32.3 < p.decode_tokens_per_s == pytest.approx(204.8e9 / p.decode_bytes_per_token)


def test_fp8_plan_refused_on_orin():
    with pytest.raises(UnsupportedPrecisionError, match="thor, x86-ada, x86-hopper"):
        plan(CITRUS_V_8B, get_target("orin-agx-64"), FP8)
    assert plan(CITRUS_V_8B, get_target("x86-ada"), FP8).component("llm").precision == "fp8"


def test_unknown_bandwidth_is_unknown_not_invented():
    p = plan(CITRUS_V_8B, get_target("thor"), FP16_W4)
    assert p.bandwidth_gbs is None and p.decode_tokens_per_s is None
    assert p.decode_bytes_per_token > 0
    assert "decode: unknown" in format_plan(p)
    assert p.to_dict()["decode_tokens_per_s_upper_bound"] is None


def test_cpu_keeps_fp32_carrier_and_kv():
    cpu, gpu = get_target("cpu"), get_target("x86-ampere")
    p_cpu, p_gpu = plan(DEMO, cpu, INT8, context_tokens=512), plan(DEMO, gpu, INT8, 512)
    assert p_cpu.kv_dtype == "fp32" and p_gpu.kv_dtype == "fp16"
    assert p_cpu.kv_cache_bytes == 2 * p_gpu.kv_cache_bytes == 2 * 4 * 2 * 32 * 512 * 4
    vision = param_counts(DEMO)["vision"]
    assert p_cpu.component("vision").weight_bytes == (
        vision.quantizable * 1 + (vision.total - vision.quantizable) * 4
    )
    assert p_cpu.fits


def test_int4_on_cpu_and_fp32_recipe():
    counts = param_counts(DEMO)
    p = plan(DEMO, get_target("cpu"), get_recipe("int8-w4"), context_tokens=256)
    llm = counts["llm"]
    # The CPU quantizer (MatMulNBits, an fp32 scale per 128 weights) also quantizes lm_head
    # and stores the table in fp16.
    h, v = DEMO.text.hidden_size, DEMO.text.vocab_size
    assert llm.table == llm.head == h * v
    plain = llm.total - llm.quantizable - 2 * h * v
    assert p.component("llm").weight_bytes == (
        (llm.quantizable + h * v) * (0.5 + 4 / 128) + h * v * 2 + plain * 4
    )
    # Decode streams everything but the fp16 table, and the fp32 KV cache.
    assert p.decode_bytes_per_token == pytest.approx(
        p.component("llm").weight_bytes - h * v * 2 + p.kv_cache_bytes, rel=1e-12
    )
    assert p.component("llm").to_dict()["storage"] == {
        "carrier": "fp32",
        "weight": 0.5 + 4 / 128,
        "head": 0.5 + 4 / 128,
        "table": "fp16",
    }
    # A TensorRT target keeps lm_head and the table in its fp16 carrier (modelopt's presets).
    gpu = plan(DEMO, get_target("x86-ampere"), get_recipe("fp16-w4"), context_tokens=256)
    assert gpu.component("llm").weight_bytes == (
        llm.quantizable * (0.5 + 2 / 128) + (llm.total - llm.quantizable) * 2
    )
    p32 = plan(DEMO, get_target("x86-hopper"), get_recipe("fp32"), context_tokens=256)
    assert p32.weight_bytes == 4 * sum(c.total for c in counts.values())
    assert p32.kv_dtype == "fp32"


def test_input_validation():
    nano = get_target("orin-nano-8")
    with pytest.raises(ValueError, match="max_position_embeddings 1024"):
        plan(DEMO, nano, FP16_W4, context_tokens=2048)  # the demo model's context is 1024
    assert plan(DEMO, nano, FP16_W4).context_tokens == 1024  # the default stays within it
    with pytest.raises(ValueError, match="must exceed the 144 image tokens"):  # 336x336
        plan(DEMO, nano, FP16_W4, context_tokens=144)
    big = dataclasses.replace(
        CITRUS_V_8B, preprocess=dataclasses.replace(CITRUS_V_8B.preprocess, max_pixels=1 << 20)
    )
    with pytest.raises(ValueError, match="beyond orin-nano-8's engine profile max 448x448"):
        plan(big, nano, FP16_W4, image_hw=(1024, 1024))


def test_outputs_render_and_serialise():
    p = plan(CITRUS_V_8B, get_target("orin-nano-8"), FP16_W4)
    text = format_plan(p)
    assert "projection (upper bound)" in text and "DOES NOT FIT" in text
    assert "102 GB/s" in text  # the Super-mode note travels with the plan
    headers, body = plan_table(p)
    assert len(headers) == 5 and [r[0] for r in body[:4]] == [
        "vision",
        "llm",
        "sam_encoder",
        "mask_decoder",
    ]
    assert body[1][1] == "int4+fp16"
    rows = p.rows()
    assert rows[-1]["weight_bytes"] == pytest.approx(p.weight_bytes + p.kv_cache_bytes)
    assert rows[-1]["activation_bytes"] == max(c.activation_bytes for c in p.components)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["fits"] is False and d["recipe"]["name"] == "fp16-w4"
    assert d["total_bytes"] == pytest.approx(p.weight_bytes + p.kv_cache_bytes + p.activation_bytes)


def test_bundle_ratio_vs_fp32_on_cpu():
    """The weight-bytes ratio of a CPU recipe: the 8B's LLM is nine tenths of its weights, so
    the 4-bit LLM takes the bundle under a fifth of FP32; the demo model's LLM is a third of
    its weights, so its INT8 encoders alone keep it above (measured: 25 % with the 4-bit LLM)."""
    cpu = get_target("cpu")
    for cfg, int8_ratio, w4_ratio in ((CITRUS_V_8B, 0.2725, 0.1688), (DEMO, 0.2636, 0.2224)):
        p8, p4 = plan(cfg, cpu, INT8), plan(cfg, cpu, get_recipe("int8-w4"))
        assert p8.fp32_weight_bytes == 4 * sum(c.total for c in param_counts(cfg).values())
        assert p8.weight_ratio == pytest.approx(int8_ratio, abs=5e-4), cfg.name
        assert p4.weight_ratio == pytest.approx(w4_ratio, abs=5e-4), cfg.name
    assert plan(CITRUS_V_8B, cpu, get_recipe("int8-w4")).weight_ratio <= 0.20
    assert "16.9 % of the 34.08 GB FP32 weights" in format_plan(
        plan(CITRUS_V_8B, cpu, get_recipe("int8-w4"))
    )


def test_cpu_llm_storage_matches_the_cpu_quantizer():
    from citrus_edge.cli.memory_plan import CPU_LLM_BLOCK
    from citrus_edge.compress.settings import (
        CPU_WEIGHT_ONLY_INT4,
        CPU_WEIGHT_ONLY_INT8,
        QuantizeConfig,
    )

    assert CPU_WEIGHT_ONLY_INT4.block_size == CPU_WEIGHT_ONLY_INT8.block_size == CPU_LLM_BLOCK
    assert (CPU_WEIGHT_ONLY_INT4.bits, CPU_WEIGHT_ONLY_INT8.bits) == (4, 8)
    assert CPU_WEIGHT_ONLY_INT4.symmetric and CPU_WEIGHT_ONLY_INT8.symmetric  # no zero points
    assert QuantizeConfig().embeddings_dtype == "float16"
