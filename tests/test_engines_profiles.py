"""Optimisation profiles from targets and configs, with numbers checked by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from citrus_edge.config import CITRUS_V_8B, DEMO, TINY
from citrus_edge.engines.engine_errors import EnginePlanError
from citrus_edge.engines.graph_info import GraphInput
from citrus_edge.engines.profiles import (
    AxisRange,
    ProfileConfig,
    admissible_sizes,
    axis_profiles,
    llm_profiles,
    resolve_profile,
    vision_axes,
    vision_profiles,
    vision_ranges,
)
from citrus_edge.preprocess import smart_resize
from citrus_edge.targets import TARGETS, ResolutionProfile, get_target


def _ranges(profile) -> dict[str, tuple[int, int, int]]:
    return {name: (r.min, r.opt, r.max) for name, r in profile.axes}


def test_vision_profile_of_the_8b_on_orin_nx_checked_by_hand():
    # orin-nx-16: SMALL profile, max 448x448 -> sides of 1..16 merge units (28 px each).
    # Citrus-V 8B pixel budget 3136..65535 -> 4 <= units = a*b <= 83 (65535 / 784 = 83.6).
    # Most units: 83 is prime, 82 = 2*41 (41 > 16), 81 = 9*9 -> 81 units, 324 patches.
    # Windows are 4x4 units (112 / 14 / 2): 9x9 units -> 3*3 = 9; a 5..8-unit side allows at
    # most 16 on the other -> 2*4 = 8; so 9 is the most. Opt 252x252 -> 9x9 units.
    (profile,) = vision_profiles(get_target("orin-nx-16"), CITRUS_V_8B, ProfileConfig())
    assert _ranges(profile) == {
        "n_patches": (16, 324, 324),
        "n_units": (4, 81, 81),
        "n_windows": (1, 9, 9),
    }


def test_llm_profiles_of_the_8b_on_orin_nx_checked_by_hand():
    # Image tokens = merge units: opt 81, max 81. Prompt text: opt 64, max 512 (ProfileConfig).
    # Prefill seq: 1 .. 81+64 = 145 .. 81+512 = 593, empty cache. Decode: one token after
    # 1 .. 145+64 = 209 .. 2047 cached (max_context 2048 = min(2048, 128000)).
    prefill, decode = llm_profiles(get_target("orin-nx-16"), CITRUS_V_8B, ProfileConfig())
    assert prefill.name == "prefill" and decode.name == "decode"
    assert _ranges(prefill) == {
        "batch": (1, 1, 1),
        "seq": (1, 145, 593),
        "past": (0, 0, 0),
        "total": (1, 145, 593),
    }
    assert _ranges(decode) == {
        "batch": (1, 1, 1),
        "seq": (1, 1, 1),
        "past": (1, 209, 2047),
        "total": (2, 210, 2048),
    }


def test_sam_and_decoder_profiles():
    pc = ProfileConfig(max_batch=2, max_seg=4)
    target = get_target("orin-agx-64")
    (sam,) = axis_profiles("sam_encoder", target, CITRUS_V_8B, pc)
    (dec,) = axis_profiles("mask_decoder", target, CITRUS_V_8B, pc)
    assert _ranges(sam) == {"batch": (1, 1, 2)}
    assert _ranges(dec) == {"n": (1, 1, 4)}
    prefill, decode = llm_profiles(target, CITRUS_V_8B, pc)
    assert prefill.range("batch") == decode.range("batch") == AxisRange(1, 1, 2)


def test_elongated_images_need_more_windows_than_the_square():
    # DEMO (budget 336^2 = 144 units of 28 px, windows of 4x4 units) on orin-agx-64 (box 728 =
    # 26 units): the square 336x336 has 12x12 units = 3x3 windows. A 200x380 image is scaled up
    # with ceiled sides to 252x476 (9x17 units = 153 > 144, over the budget) = 3x5 windows; a
    # large 1000x2000 one is scaled down with floored sides to 224x448 (8x16 units = 128 < 144,
    # under it) = 2x4 windows.
    target = get_target("orin-agx-64")
    pp = DEMO.preprocess
    assert pp.min_pixels == pp.max_pixels == 336 * 336
    assert smart_resize(200, 380, pp.factor, pp.min_pixels, pp.max_pixels) == (252, 476)
    assert smart_resize(1000, 2000, pp.factor, pp.min_pixels, pp.max_pixels) == (224, 448)
    assert vision_axes((252, 476), DEMO)["n_windows"] == 15
    assert vision_axes((224, 448), DEMO)["n_windows"] == 8
    assert vision_axes((336, 336), DEMO)["n_windows"] == 9
    assert vision_ranges(target, DEMO)["n_windows"] == AxisRange(8, 9, 15)
    assert vision_ranges(target, DEMO)["n_units"] == AxisRange(120, 144, 168)


@pytest.mark.parametrize("target", ["orin-nano-8", "orin-agx-64", "thor", "cpu"])
@pytest.mark.parametrize("cfg", [CITRUS_V_8B, DEMO], ids=lambda c: c.name)
def test_every_resized_image_inside_the_box_fits_the_vision_profile(target, cfg):
    t = get_target(target)
    ranges = vision_ranges(t, cfg)
    pp = cfg.preprocess
    rng = np.random.default_rng(0)
    checked = 0
    for h, w in rng.integers(20, 3000, size=(400, 2)):
        if max(h, w) / min(h, w) > 200:
            continue
        rh, rw = smart_resize(int(h), int(w), pp.factor, pp.min_pixels, pp.max_pixels)
        if rh > t.resolution.max_hw[0] or rw > t.resolution.max_hw[1]:
            continue  # the planner refuses these sizes on this target
        for axis, size in vision_axes((rh, rw), cfg).items():
            assert ranges[axis].min <= size <= ranges[axis].max, (axis, (rh, rw))
        checked += 1
    assert checked > 100


def test_admissible_sizes_respect_box_and_budget():
    sizes = admissible_sizes(get_target("orin-nx-16"), CITRUS_V_8B)
    assert (252, 252) in sizes and (56, 56) in sizes
    assert all(h <= 448 and w <= 448 and 3136 <= h * w <= 65535 for h, w in sizes)


def test_sam_larger_than_the_target_profile_is_refused():
    small = dataclasses.replace(
        get_target("orin-nano-8"),
        resolution=ResolutionProfile((56, 56), (252, 252), (448, 448), sam_max_side=512),
    )
    with pytest.raises(ValueError, match="SAM2 input 1024 exceeds"):
        axis_profiles("sam_encoder", small, CITRUS_V_8B, ProfileConfig())


def test_context_limits():
    # DEMO's max_position_embeddings is 1024: the default context follows it.
    _, decode = llm_profiles(get_target("cpu"), DEMO, ProfileConfig())
    assert decode.range("total").max == 1024
    with pytest.raises(ValueError, match="max_position_embeddings"):
        llm_profiles(get_target("cpu"), DEMO, ProfileConfig(max_context=4096))
    with pytest.raises(ValueError, match="raise max_context"):
        llm_profiles(get_target("cpu"), DEMO, ProfileConfig(max_context=300))


@pytest.mark.parametrize(
    "kw", [{"max_batch": 0}, {"opt_text_tokens": 600}, {"max_context": 1}, {"version": 2}]
)
def test_profile_config_validates(kw):
    with pytest.raises(ValueError):
        ProfileConfig(**kw)


def test_profile_config_json_round_trip():
    pc = ProfileConfig(max_batch=2, max_context=1024, max_seg=3)
    assert ProfileConfig.from_dict(pc.to_dict()) == pc
    with pytest.raises(EnginePlanError, match=r"profile_config\.max_seg"):
        ProfileConfig.from_dict({**pc.to_dict(), "max_seg": "4"})


def test_resolve_profile_maps_axes_onto_graph_inputs():
    prefill, _ = llm_profiles(get_target("orin-nx-16"), CITRUS_V_8B, ProfileConfig())
    t = CITRUS_V_8B.text
    inputs = [
        GraphInput("inputs_embeds", ("batch", "seq", t.hidden_size), "float32"),
        GraphInput("position_ids", (3, "batch", "seq"), "int64"),
        GraphInput("attention_mask", ("batch", "total"), "int64"),
        GraphInput("past_key_0", ("batch", t.num_kv_heads, "past", t.head_dim), "float32"),
        GraphInput("fixed", (1, 2), "float32"),
    ]
    resolved = resolve_profile(prefill, inputs, "llm")
    shapes = {s.name: (s.min, s.opt, s.max) for s in resolved.inputs}
    assert "fixed" not in shapes  # static inputs need no set_shape
    assert shapes["inputs_embeds"] == ((1, 1, 3584), (1, 145, 3584), (1, 593, 3584))
    assert shapes["position_ids"] == ((3, 1, 1), (3, 1, 145), (3, 1, 593))
    assert shapes["past_key_0"] == ((1, 4, 0, 128),) * 3


def test_resolve_profile_refuses_unknown_or_unnamed_axes():
    (profile,) = axis_profiles("mask_decoder", get_target("cpu"), TINY, ProfileConfig())
    with pytest.raises(EnginePlanError, match="dynamic axis 'num_seg'.*covers \\['n'\\]"):
        resolve_profile(profile, [GraphInput("seg_hidden", ("num_seg", 64), "float32")], "dec")
    with pytest.raises(EnginePlanError, match="without a name"):
        resolve_profile(profile, [GraphInput("seg_hidden", (None, 64), "float32")], "dec")


def test_pinned_profiles_are_fixed():
    (profile,) = axis_profiles("sam_encoder", get_target("orin-agx-64"), TINY, ProfileConfig(2))
    assert profile.pinned().range("batch") == AxisRange(1, 1, 1)


def test_every_target_has_profiles_for_every_component():
    for target in TARGETS.values():
        for component in ("vision", "llm", "sam_encoder", "mask_decoder"):
            assert axis_profiles(component, target, CITRUS_V_8B, ProfileConfig())
