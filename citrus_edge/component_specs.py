"""The graph spec of each exported component, and the random feeds they are traced and checked
on (numpy only).

One spec builder per component -- `vision_spec`, `llm_spec`, `sam_encoder_spec`,
`mask_decoder_spec`, each `(model_config, export_config) -> GraphSpec` -- and the feed makers
their samples are drawn with (`vision_feeds`, `llm_step_feeds`, `normal_feeds`). The export stage
validates its graphs on these samples, and engines/feeds.py checks an optimized graph against
its source on feeds from the same makers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from citrus_edge.config import CitrusVConfig, TextDims, VisionDims
from citrus_edge.graph_specs import Case, ExportConfig, GraphSpec, Sample, TensorSpec
from citrus_edge.host_inputs import (
    VISION_INPUTS,
    past_names,
    present_names,
    vision_inputs,
    window_tokens,
)

# -- feed makers ---------------------------------------------------------------------------------


def normal_feeds(
    shapes: Mapping[str, Sequence[int]],
    rng: np.random.Generator,
    dtypes: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Standard-normal feeds, drawn in the order of `shapes`; float32 unless `dtypes` says."""
    dtypes = dtypes or {}
    return {
        name: rng.standard_normal(tuple(shape)).astype(dtypes.get(name, "float32"))
        for name, shape in shapes.items()
    }


def vision_feeds(
    v: VisionDims, grid_thw: tuple[int, int, int], patch_dim: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Feeds of one image of `grid_thw` patches: random pixels through `host_inputs.vision_inputs`."""
    _, h, w = grid_thw
    pixels = rng.standard_normal((h * w, patch_dim)).astype(np.float32)
    return vision_inputs(pixels, grid_thw, v)


def llm_step_feeds(
    t: TextDims, batch: int, seq: int, past: int, pad: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random step inputs: left padding of `pad` tokens in the cache of rows 1.., mRoPE-like
    positions (text positions plus a different offset per axis, 0 on padding), random
    embeddings and cache."""
    b, s, p = batch, seq, past
    if pad > p:
        raise ValueError("padding must lie in the cache so every query sees a key")
    mask = np.ones((b, p + s), dtype=np.int64)
    mask[1:, :pad] = 0  # [B, P+S]
    attended = np.cumsum(mask, axis=1) - 1  # [B, P+S]
    offsets = rng.integers(0, 6, size=(3, 1, 1))
    pos = np.where(mask[None] == 1, attended[None] + offsets, 0)[:, :, p:]  # [3, B, S]
    feeds = {
        "inputs_embeds": rng.standard_normal((b, s, t.hidden_size)).astype(np.float32),
        "position_ids": pos.astype(np.int64),
        "attention_mask": mask,
    }
    kv_shape = (b, t.num_kv_heads, p, t.head_dim)
    for name in past_names(t.num_layers):
        feeds[name] = rng.standard_normal(kv_shape).astype(np.float32)
    return feeds


# -- vision ----------------------------------------------------------------------------------------

VISION = "vision"
EXPORT_GRID = (8, 12)  # (h, w) patches of the traced sample: 2 windows, unlike any image size


def grid_of(image_hw: tuple[int, int], cfg: CitrusVConfig) -> tuple[int, int]:
    """(h, w) patches of an image of `image_hw` pixels, a multiple of the merge factor."""
    v = cfg.vision
    factor = v.patch_size * v.spatial_merge_size
    h, w = image_hw
    if h % factor or w % factor:
        raise ValueError(
            f"image size {h}x{w} is not a multiple of {factor}; give resized sizes "
            "(preprocess.smart_resize) as image_sizes"
        )
    return h // v.patch_size, w // v.patch_size


def vision_spec(cfg: CitrusVConfig, export_cfg: ExportConfig) -> GraphSpec:
    """Spec of the vision graph; validated at the grids of `export_cfg.image_sizes`."""
    v = cfg.vision
    patch_dim = 3 * v.temporal_patch_size * v.patch_size**2
    tw = window_tokens(v)
    shapes = {
        "pixel_values": (("n_patches", patch_dim), "float32"),
        "window_index": (("n_units",), "int64"),
        "reverse_index": (("n_units",), "int64"),
        "cos": (("n_patches", v.head_dim), "float32"),
        "sin": (("n_patches", v.head_dim), "float32"),
        "gather_index": (("n_windows", tw), "int64"),
        "window_valid": (("n_windows", tw), "bool"),
        "scatter_index": (("n_patches",), "int64"),
    }
    inputs = tuple(TensorSpec(n, *shapes[n]) for n in VISION_INPUTS)
    outputs = (TensorSpec("image_features", ("n_units", v.out_hidden_size)),)

    def make_sample(case: Case, seed: int) -> Sample:
        h, w = case["grid_h"], case["grid_w"]
        rng = np.random.default_rng(seed)
        return Sample(
            label=f"grid 1x{h}x{w} ({h * v.patch_size}x{w * v.patch_size} px)",
            feeds=vision_feeds(v, (1, h, w), patch_dim, rng),
            context={"grid_thw": (1, h, w)},
        )

    grids = [grid_of(hw, cfg) for hw in export_cfg.image_sizes]
    return GraphSpec(
        component=VISION,
        inputs=inputs,
        outputs=outputs,
        make_sample=make_sample,
        export_case={"grid_h": EXPORT_GRID[0], "grid_w": EXPORT_GRID[1]},
        validation_cases=tuple({"grid_h": h, "grid_w": w} for h, w in grids),
        atol=export_cfg.atol,
    )


# -- LLM step ----------------------------------------------------------------------------------------

LLM = "llm"
# Traced sample: batch 2, 3 new tokens after 4 cached ones, row 1 left-padded by 2.
LLM_EXPORT_CASE = {"batch": 2, "seq": 3, "past": 4, "pad": 2}
LLM_VALIDATION_CASES = (
    {"batch": 1, "seq": 7, "past": 0, "pad": 0},  # prefill
    {"batch": 3, "seq": 1, "past": 9, "pad": 3},  # decode, left-padded rows
    {"batch": 1, "seq": 1, "past": 5, "pad": 0},  # decode, batch 1
)


def llm_spec(cfg: CitrusVConfig, export_cfg: ExportConfig) -> GraphSpec:
    """Spec of the LLM step graph for `cfg.text.num_layers` layers."""
    t = cfg.text
    kv = ("batch", t.num_kv_heads, "past", t.head_dim)
    kv_out = ("batch", t.num_kv_heads, "total", t.head_dim)
    inputs = (
        TensorSpec("inputs_embeds", ("batch", "seq", t.hidden_size)),
        TensorSpec("position_ids", (3, "batch", "seq"), "int64"),
        TensorSpec("attention_mask", ("batch", "total"), "int64"),
        *(TensorSpec(n, kv) for n in past_names(t.num_layers)),
    )
    outputs = (
        TensorSpec("logits", ("batch", "seq", t.vocab_size)),
        TensorSpec("last_hidden_state", ("batch", "seq", t.hidden_size)),
        *(TensorSpec(n, kv_out) for n in present_names(t.num_layers)),
    )

    def make_sample(case: Case, seed: int) -> Sample:
        b, s, p, pad = case["batch"], case["seq"], case["past"], case["pad"]
        feeds = llm_step_feeds(t, b, s, p, pad, np.random.default_rng(seed))
        return Sample(label=f"batch {b}, seq {s}, past {p}, pad {pad}", feeds=feeds)

    return GraphSpec(
        component=LLM,
        inputs=inputs,
        outputs=outputs,
        make_sample=make_sample,
        export_case=LLM_EXPORT_CASE,
        validation_cases=LLM_VALIDATION_CASES,
        atol=export_cfg.atol,
    )


# -- SAM2 image encoder ------------------------------------------------------------------------------

SAM_ENCODER = "sam_encoder"
SAM_OUTPUTS = ("image_embeddings", "feat_s0", "feat_s1")


def feature_shapes(cfg: CitrusVConfig) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of each SAM2 encoder output for one image."""
    s, d = cfg.sam2.image_size, cfg.sam2.hidden_size
    return {
        "image_embeddings": (d, s // 16, s // 16),
        "feat_s0": (d // 8, s // 4, s // 4),
        "feat_s1": (d // 4, s // 8, s // 8),
    }


def sam_encoder_spec(cfg: CitrusVConfig, export_cfg: ExportConfig) -> GraphSpec:
    """Spec of the SAM2 encoder graph: batch dynamic, image size fixed by the config."""
    s = cfg.sam2.image_size
    shapes = feature_shapes(cfg)

    def make_sample(case: Case, seed: int) -> Sample:
        rng = np.random.default_rng(seed)
        feeds = normal_feeds({"pixels": (case["batch"], 3, s, s)}, rng)
        return Sample(label=f"batch {case['batch']}", feeds=feeds)

    return GraphSpec(
        component=SAM_ENCODER,
        inputs=(TensorSpec("pixels", ("batch", 3, s, s)),),
        outputs=tuple(TensorSpec(n, ("batch", *shapes[n])) for n in SAM_OUTPUTS),
        make_sample=make_sample,
        export_case={"batch": 1},
        validation_cases=({"batch": 2},),
        atol=export_cfg.atol,
    )


# -- SAM2 mask decoder -------------------------------------------------------------------------------

MASK_DECODER = "mask_decoder"
N_MASKS = 3  # multimask outputs


def mask_decoder_spec(cfg: CitrusVConfig, export_cfg: ExportConfig) -> GraphSpec:
    """Spec of the mask decoder graph: N (number of `[SEG]` states) dynamic."""
    shapes = feature_shapes(cfg)
    features = ("image_embeddings", "feat_s0", "feat_s1")
    _, mh, mw = shapes["feat_s0"]

    def make_sample(case: Case, seed: int) -> Sample:
        sizes = {"seg_hidden": (case["n"], cfg.text.hidden_size)}
        sizes.update({k: (1, *shapes[k]) for k in features})
        feeds = normal_feeds(sizes, np.random.default_rng(seed))
        return Sample(label=f"n {case['n']}", feeds=feeds)

    return GraphSpec(
        component=MASK_DECODER,
        inputs=(
            TensorSpec("seg_hidden", ("n", cfg.text.hidden_size)),
            *(TensorSpec(k, (1, *shapes[k])) for k in features),
        ),
        outputs=(
            TensorSpec("mask_logits", ("n", N_MASKS, mh, mw)),
            TensorSpec("iou_predictions", ("n", N_MASKS)),
        ),
        make_sample=make_sample,
        export_case={"n": 2},
        validation_cases=({"n": 1}, {"n": 3}),
        atol=export_cfg.atol,
    )
