"""Host-side inputs of the exported graphs, in numpy only.

The torch-free runtime on a cart imports this module, so it must never import torch or
transformers. Everything that depends on the image grid or on the decoding state is computed
here (with `citrus_edge.positions`) and fed to the graphs, which therefore serve every
resolution, prompt length and cache length:

- vision: window order, its inverse, rotary cos/sin in window order and the padded window
  layout (`vision_inputs`);
- LLM: token embedding lookup and image splicing, 3-D mRoPE positions, the attention mask and
  the KV cache (`llm_prefill_inputs`, `llm_decode_inputs`, `empty_past`, `next_past`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from citrus_edge import positions
from citrus_edge.config import CitrusVConfig, TextDims, VisionDims

# Graph input names of the vision encoder, in graph order.
VISION_INPUTS = (
    "pixel_values",  # [n_patches, C*T*P*P] float32, merge order (rows of preprocess.qwen_pixels)
    "window_index",  # [n_units] int64, merge unit at each window-order slot
    "reverse_index",  # [n_units] int64, inverse permutation: merged tokens back to merge order
    "cos",  # [n_patches, head_dim] float32, window order
    "sin",  # [n_patches, head_dim] float32, window order
    "gather_index",  # [n_windows, window_tokens] int64, window-order token per padded slot
    "window_valid",  # [n_windows, window_tokens] bool, real tokens (False: padding)
    "scatter_index",  # [n_patches] int64, padded slot of each window-order token
)


def past_key(i: int) -> str:
    return f"past_key_{i}"


def past_value(i: int) -> str:
    return f"past_value_{i}"


def present_key(i: int) -> str:
    return f"present_key_{i}"


def present_value(i: int) -> str:
    return f"present_value_{i}"


def past_names(num_layers: int) -> list[str]:
    """`past_key_0, past_value_0, past_key_1, ...` in graph order."""
    return [n for i in range(num_layers) for n in (past_key(i), past_value(i))]


def present_names(num_layers: int) -> list[str]:
    """`present_key_0, present_value_0, ...` in graph order."""
    return [n for i in range(num_layers) for n in (present_key(i), present_value(i))]


# --------------------------------------------------------------------------- vision


def window_tokens(vision: VisionDims) -> int:
    """Patches per padded attention window (fixed by the config; 64 for Qwen2.5-VL)."""
    side = vision.window_size // vision.patch_size // vision.spatial_merge_size
    return (side * vision.spatial_merge_size) ** 2


def vision_inputs(
    pixel_values: np.ndarray, grid_thw: Sequence[int], vision: VisionDims
) -> dict[str, np.ndarray]:
    """Feeds of the vision graph for ONE image of grid `(1, h, w)`.

    `pixel_values` are the rows `preprocess.qwen_pixels` returns, `[h*w, C*T*P*P]`, in merge
    order. The graph's full-attention blocks attend over all its tokens, so one call takes one
    image (grid t == 1); run several images as several calls.
    """
    t, h, w = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"the vision graph takes one image per call (grid t == 1), got t = {t}")
    pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
    if pixels.ndim != 2 or pixels.shape[0] != h * w:
        raise ValueError(
            f"pixel_values {pixels.shape} do not hold {h * w} patches of grid {grid_thw}"
        )
    grid = (t, h, w)
    args = (vision.window_size, vision.patch_size, vision.spatial_merge_size)
    order, _ = positions.window_index(grid, *args)
    cos, sin = positions.vision_cos_sin(
        grid, vision.head_dim, vision.spatial_merge_size, vision.window_size, vision.patch_size
    )
    layout = positions.padded_windows(grid, *args)
    return {
        "pixel_values": pixels,
        "window_index": order.astype(np.int64),
        "reverse_index": positions.reverse_index(order),
        "cos": cos.astype(np.float32),
        "sin": sin.astype(np.float32),
        "gather_index": layout.gather_index.astype(np.int64),
        "window_valid": layout.valid.astype(bool),
        "scatter_index": layout.scatter_index.astype(np.int64),
    }


# --------------------------------------------------------------------------- LLM


# How a quantized LLM's embedding table may be stored (`QuantizeConfig.embeddings_dtype`,
# `build --embeddings`); the first is the default.
TABLE_DTYPES = ("float16", "int8", "float32")
# Each as the recipes' precisions name it (bundle manifest, planner).
TABLE_PRECISIONS = {"float16": "fp16", "int8": "int8", "float32": "fp32"}


def check_table_dtype(value: str, name: str = "embeddings") -> str:
    """`value` if it is one of `TABLE_DTYPES`, else `ValueError` naming `name` (the option or
    field that carried it)."""
    if value not in TABLE_DTYPES:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(TABLE_DTYPES)}")
    return value


def int8_rows_dtype(hidden: int) -> np.dtype:
    """One row of an int8 embedding table: its float32 scale, then `hidden` int8 values; the
    row is `q * scale`. A table of these records is one `.npy` of shape `[V]` that the runtime
    maps from disk and reads row by row, like the float tables."""
    return np.dtype([("scale", "<f4"), ("q", "i1", (hidden,))])


def quantize_rows(rows: np.ndarray, first: int = 0) -> np.ndarray:
    """Float rows `[N, H]` -> int8 records (`int8_rows_dtype`): symmetric, one scale per row
    (max |x| / 127, at least float32's smallest normal; an all-zero row keeps scale 1), round
    to nearest. `ValueError` on a row that is not finite (numbered from `first`)."""
    rows = np.asarray(rows, dtype=np.float32)
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        raise ValueError(f"embedding row {first + int(np.argmax(bad))} is not finite (inf or nan)")
    amax = np.abs(rows).max(axis=1)
    tiny = np.finfo(np.float32).tiny
    scale = np.where(amax > 0, np.maximum(amax / 127.0, tiny), 1.0).astype(np.float32)
    out = np.empty(len(rows), dtype=int8_rows_dtype(rows.shape[1]))
    out["scale"] = scale
    out["q"] = np.clip(np.rint(rows / scale[:, None]), -127, 127)
    return out


def table_dtype(embeddings: np.ndarray) -> str:
    """How a table stores its rows: "float32", "float16", "int8" (`int8_rows_dtype`) or, for
    anything else, its numpy dtype as text."""
    dtype = embeddings.dtype
    if dtype.names == ("scale", "q") and dtype == int8_rows_dtype(int(np.prod(dtype["q"].shape))):
        return "int8"
    return str(dtype)


def embed(input_ids: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Token embedding lookup: `[B, S]` ids -> `[B, S, H]` float32 (float rows cast, int8
    rows scaled)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= len(embeddings)):
        raise ValueError(
            f"token ids must lie in [0, {len(embeddings)}), got {ids.min()}..{ids.max()}"
        )
    rows = embeddings[ids]
    if embeddings.dtype.names:
        return rows["q"].astype(np.float32) * rows["scale"][..., None]
    return rows.astype(np.float32)


def splice_image_features(
    inputs_embeds: np.ndarray,
    input_ids: np.ndarray,
    image_features: np.ndarray,
    image_token_id: int,
) -> np.ndarray:
    """Put the vision features in place of the image placeholder tokens (row-major order).

    Same as transformers' `masked_scatter`: the k-th placeholder of the flattened batch takes
    row k of `image_features` `[n_visual_tokens, H]` (images concatenated in prompt order).
    """
    is_image = np.asarray(input_ids) == image_token_id  # [B, S]
    n = int(is_image.sum())
    if n != len(image_features):
        raise ValueError(
            f"{n} image tokens in input_ids but {len(image_features)} image feature rows; "
            "the prompt and the image grid disagree"
        )
    out = np.array(inputs_embeds, dtype=np.float32, copy=True)
    out[is_image] = image_features
    return out


def empty_past(batch: int, text: TextDims, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """A zero-length KV cache: `past_key_i` / `past_value_i` of shape `[B, kvH, 0, d]`."""
    shape = (batch, text.num_kv_heads, 0, text.head_dim)
    return {name: np.zeros(shape, dtype=dtype) for name in past_names(text.num_layers)}


def next_past(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The cache of the next step: `present_*` outputs renamed `past_*`."""
    return {
        k.replace("present_", "past_", 1): v for k, v in outputs.items() if k.startswith("present_")
    }


def llm_prefill_inputs(
    input_ids: np.ndarray,
    embeddings: np.ndarray,
    cfg: CitrusVConfig,
    image_features: np.ndarray | None = None,
    image_grid_thw: Sequence[Sequence[int]] = (),
    attention_mask: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Feeds of the prefill step (empty cache) and the rope deltas decoding continues from.

    input_ids: `[B, S]` prompt ids (left padded where `attention_mask` is 0); image_features:
    `[n_visual_tokens, H]`, the vision graph's outputs of the images in prompt order;
    image_grid_thw: their grids. Positions are `positions.mrope_position_ids`, i.e.
    transformers' `get_rope_index`. Returns `(feeds, rope_deltas [B, 1])`.
    """
    ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))  # [B, S]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
    tok = cfg.tokens
    embeds = embed(ids, embeddings)  # [B, S, H]
    if image_features is not None:
        embeds = splice_image_features(embeds, ids, image_features, tok.image)
    elif (ids == tok.image).any():
        raise ValueError("input_ids hold image tokens but no image_features were given")
    pos, rope_deltas = positions.mrope_position_ids(
        ids,
        [tuple(g) for g in image_grid_thw],
        tok.image,
        tok.vision_start,
        cfg.vision.spatial_merge_size,
        attention_mask=mask,
    )
    feeds = {"inputs_embeds": embeds, "position_ids": pos, "attention_mask": mask}
    feeds.update(empty_past(len(ids), cfg.text))
    return feeds, rope_deltas


def llm_decode_inputs(
    token_ids: np.ndarray,
    embeddings: np.ndarray,
    rope_deltas: np.ndarray,
    attention_mask: np.ndarray,
    past: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Feeds of one decode step: one new token per row after a cache of `P` tokens.

    token_ids: `[B]`; attention_mask: `[B, P]`, the mask the previous step was fed (its
    `attention_mask` feed); past: `past_*` arrays, e.g. `next_past(previous outputs)`. The new
    token's position is `attended + rope_delta` on all three axes (`positions.decode_position_ids`),
    which for an unpadded row is `max(prompt positions) + 1 + step`, as the reference decodes.
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)  # [B, 1]
    mask = np.asarray(attention_mask, dtype=np.int64)  # [B, P]
    if mask.ndim != 2 or mask.shape[0] != len(ids):
        raise ValueError(f"attention_mask {mask.shape} must be [B, P] with B = {len(ids)}")
    cache_len = next(iter(past.values())).shape[2] if past else 0
    if cache_len != mask.shape[1]:
        raise ValueError(f"attention_mask covers {mask.shape[1]} tokens, the cache {cache_len}")
    pos = positions.decode_position_ids(rope_deltas, mask.sum(-1), n_new=1)  # [3, B, 1]
    feeds = {
        "inputs_embeds": embed(ids, embeddings),
        "position_ids": pos,
        "attention_mask": np.concatenate([mask, np.ones_like(ids)], axis=1),
    }
    feeds.update(past)
    return feeds
