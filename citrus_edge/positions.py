"""Grid-dependent position inputs of Qwen2.5-VL, computed on the host in numpy.

The exported vision and LLM graphs take these as inputs instead of computing them: they depend on
the image grid through loops, padding and data-dependent indexing that ONNX/TensorRT handle badly,
and the cart has no torch. Each function reproduces transformers 5's code exactly (integers bit
for bit, floats in float32 like the module):

- vision encoder (`Qwen2_5_VisionTransformerPretrainedModel.forward`, which calls
  `transformers.vision_utils.get_vision_position_ids / get_vision_window_index /
  get_vision_cu_seqlens` and `Qwen2_5_VLVisionRotaryEmbedding`): rotary table, window order,
  `cu_seqlens` of full-attention blocks, `cu_window_seqlens` of windowed blocks, or a padded
  per-window layout for graphs that batch windows instead of using a block-diagonal mask;
- LLM (`Qwen2_5_VLModel.get_rope_index` and the generation loop): 3-D mRoPE position ids of the
  prompt and of decode steps. Images only: video tokens (temporal spacing by
  `tokens_per_second * second_per_grid_ts`) are not supported.

Patch order conventions. "Merge order" is the order of the rows of `pixel_values` (see
`preprocess.qwen_pixels`): merge units of `m x m` patches, units in raster order over the
`(h/m, w/m)` grid, the `m*m` patches of a unit contiguous. "Window order" is what the vision
blocks see: merge units regrouped window by window (`window_index`), each unit still contiguous.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

GridTHW = tuple[int, int, int]


def _check_grid(grid_thw: Sequence[int], spatial_merge_size: int) -> tuple[int, int, int]:
    if len(grid_thw) != 3 or min(int(v) for v in grid_thw) < 1:
        raise ValueError(f"grid_thw must be three positive ints (t, h, w), got {grid_thw}")
    t, h, w = (int(v) for v in grid_thw)
    if h % spatial_merge_size or w % spatial_merge_size:
        raise ValueError(
            f"grid (h, w) = ({h}, {w}) is not divisible by spatial_merge_size "
            f"{spatial_merge_size}; resize with preprocess.smart_resize first"
        )
    return t, h, w


# --------------------------------------------------------------------------- vision rotary


def vision_position_ids(grid_thw: GridTHW, spatial_merge_size: int) -> np.ndarray:
    """(row, col) patch coordinates in merge order, as `get_vision_position_ids` returns them.

    Returns int64 `[t*h*w, 2]`; column 0 is the patch row, column 1 the patch column. Frames of a
    `t > 1` grid repeat the same coordinates.
    """
    t, h, w = _check_grid(grid_thw, spatial_merge_size)
    m = spatial_merge_size
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # [h, w] each
    blocks = (h // m, m, w // m, m)
    rows = rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)  # [h*w] merge order
    cols = cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)  # [h*w]
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int64)  # [t*h*w, 2]


def _inv_freq(head_dim: int, theta: float) -> np.ndarray:
    # Same float32 ops as Qwen2_5_VLVisionRotaryEmbedding.compute_axial_rope_parameters.
    spatial_dim = head_dim // 2
    exponent = np.arange(0, spatial_dim, 2, dtype=np.float32) / np.float32(spatial_dim)
    return np.float32(1.0) / np.power(np.float32(theta), exponent)  # [head_dim // 4]


def vision_rotary(
    grid_thw: GridTHW, head_dim: int, spatial_merge_size: int, theta: float = 10000.0
) -> np.ndarray:
    """Rotary angle table `rotary_pos_emb` of the vision encoder, in merge order.

    Row i holds the angles of patch i of `pixel_values`: `row * inv_freq` followed by
    `col * inv_freq`, with `inv_freq = theta ** -(arange(0, head_dim/2, 2) / (head_dim/2))`
    (the vision config's `rope_parameters["rope_theta"]`, 10000 for Qwen2.5-VL). The attention
    blocks use `cat(table, table)` over the full head dim (see `vision_cos_sin`).

    Returns float32 `[t*h*w, head_dim // 2]`.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for 2-D axial rope, got {head_dim}")
    positions = vision_position_ids(grid_thw, spatial_merge_size).astype(np.float32)  # [S, 2]
    angles = positions[:, :, None] * _inv_freq(head_dim, theta)  # [S, 2, head_dim // 4]
    return angles.reshape(len(positions), -1)  # [S, head_dim // 2]


def vision_cos_sin(
    grid_thw: GridTHW,
    head_dim: int,
    spatial_merge_size: int,
    window_size: int,
    patch_size: int,
    theta: float = 10000.0,
) -> tuple[np.ndarray, np.ndarray]:
    """`(cos, sin)` exactly as every vision block receives them as `position_embeddings`.

    That is `cos/sin(cat(rotary, rotary))` permuted into window order; the same pair serves the
    windowed and the full-attention blocks. Returns two float32 `[t*h*w, head_dim]` arrays.
    """
    rotary = vision_rotary(grid_thw, head_dim, spatial_merge_size, theta)  # [S, head_dim // 2]
    emb = np.concatenate([rotary, rotary], axis=-1)  # [S, head_dim]
    order, _ = window_index(grid_thw, window_size, patch_size, spatial_merge_size)
    emb = to_window_order(emb, order, spatial_merge_size)  # [S, head_dim]
    return np.cos(emb), np.sin(emb)


# --------------------------------------------------------------------------- windows


def window_index(
    grid_thw: GridTHW, window_size: int, patch_size: int, spatial_merge_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Window order of the merge units and the windows' patch boundaries (`get_vision_window_index`).

    A window covers `window_size // patch_size // spatial_merge_size` merge units per side; edge
    windows of a grid the window does not divide are smaller. Returns
    - `window_index`: int64 `[t*h*w / m^2]`, merge unit taken at each window-order slot;
    - `cu_window_seqlens`: int32 `[n_windows + 1]`, cumulative patch counts per window. Empty
      windows are left out, as the module's `unique_consecutive` drops them.
    """
    t, h, w = _check_grid(grid_thw, spatial_merge_size)
    m = spatial_merge_size
    side = window_size // m // patch_size  # merge units per window side
    if side < 1:
        raise ValueError(
            f"window_size {window_size} is smaller than one merge unit ({m * patch_size})"
        )
    uh, uw = h // m, w // m  # merge units per image side
    nh, nw = -(-uh // side), -(-uw // side)  # windows per image side
    padded = np.full((t, nh * side, nw * side), -1, dtype=np.int64)
    padded[:, :uh, :uw] = np.arange(t * uh * uw).reshape(t, uh, uw)
    windows = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4)
    windows = windows.reshape(t * nh * nw, side * side)  # [windows, units per window]
    valid = windows >= 0
    counts = valid.sum(axis=1)  # [windows] merge units
    cu = np.concatenate([[0], np.cumsum(counts[counts > 0]) * m * m])
    return windows[valid], cu.astype(np.int32)


def reverse_index(window_index: np.ndarray) -> np.ndarray:
    """Inverse permutation of `window_index` (`argsort`): puts merged tokens back in merge order.

    The module applies it after the patch merger: `merged[reverse_index]`. Returns int64.
    """
    return np.argsort(window_index, kind="stable").astype(np.int64)


def to_window_order(x: np.ndarray, window_index: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """Permute per-patch rows from merge order to window order (`permute_input_for_window_attn`).

    `x` is `[t*h*w, ...]`; merge units of `m*m` rows move as one. Since the patch embedding works
    row by row, this also applies to `pixel_values` on the host.
    """
    unit = spatial_merge_size * spatial_merge_size
    units = x.reshape(len(x) // unit, unit, *x.shape[1:])  # [S / m^2, m^2, ...]
    return units[window_index].reshape(x.shape)


def full_attention_cu_seqlens(grid_thw: GridTHW) -> np.ndarray:
    """`cu_seqlens` of the full-attention blocks (`get_vision_cu_seqlens`): one segment per frame.

    Returns int32 `[t + 1]`: `0, h*w, 2*h*w, ..., t*h*w`.
    """
    t, h, w = _check_grid(grid_thw, 1)
    return (np.arange(t + 1) * h * w).astype(np.int32)


@dataclass(frozen=True)
class PaddedWindows:
    """Windows of one grid padded to a fixed token count, for a graph that batches windows.

    Tokens are patches in window order (after `to_window_order`); window k holds tokens
    `cu_window_seqlens[k] : cu_window_seqlens[k + 1]`, in that order, left-aligned in its row.
    `window_tokens = (window_size // patch_size // m * m) ** 2` is fixed by the config (64 for
    Qwen2.5-VL); only `n_windows` depends on the grid. A windowed block then runs as

        xw = x[gather_index]                                 # [n_windows, window_tokens, C]
        attention over axis 1, keys masked where ~valid      # padded queries see valid keys only
        x = xw.reshape(n_windows * window_tokens, C)[scatter_index]   # [t*h*w, C]

    which equals the module's block-diagonal attention over `cu_window_seqlens`. Every window has
    at least one valid token, so no softmax row is fully masked.
    """

    gather_index: np.ndarray  # [n_windows, window_tokens] int64, window-order token; pads -> 0
    valid: np.ndarray  # [n_windows, window_tokens] bool, True for real tokens
    scatter_index: np.ndarray  # [t*h*w] int64, slot of each token in the flattened padded rows


def padded_windows(
    grid_thw: GridTHW, window_size: int, patch_size: int, spatial_merge_size: int
) -> PaddedWindows:
    """Padded per-window layout equivalent to `cu_window_seqlens`; see `PaddedWindows`."""
    _, cu = window_index(grid_thw, window_size, patch_size, spatial_merge_size)
    side = window_size // spatial_merge_size // patch_size * spatial_merge_size  # patches
    slots = np.arange(side * side)  # [window_tokens]
    lengths = np.diff(cu).astype(np.int64)  # [n_windows] patches per window
    valid = slots[None, :] < lengths[:, None]  # [n_windows, window_tokens]
    gather = np.where(valid, cu[:-1, None].astype(np.int64) + slots[None, :], 0)
    # Row-major over (window, slot), the k-th valid slot holds token k.
    scatter = np.flatnonzero(valid.reshape(-1)).astype(np.int64)  # [t*h*w]
    return PaddedWindows(gather_index=gather, valid=valid, scatter_index=scatter)


# --------------------------------------------------------------------------- LLM mRoPE


def _image_positions(grid_thw: GridTHW, spatial_merge_size: int, start: int) -> np.ndarray:
    # Qwen2_5_VLModel.get_vision_position_ids with time_interval 1 (images): [3, t*h*w/m^2].
    t, h, w = grid_thw
    m = spatial_merge_size
    axes = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
    return np.stack(axes).reshape(3, -1) + start


def _check_image_run(
    ids: np.ndarray, start: int, end: int, grid: GridTHW, vision_start_token_id: int, m: int
) -> None:
    t, h, w = grid
    expected = t * (h // m) * (w // m)
    if end - start != expected:
        raise ValueError(
            f"image token run of length {end - start} does not match grid {grid} "
            f"({expected} tokens); the prompt and image_grid_thw disagree"
        )
    if start == 0 or ids[start - 1] != vision_start_token_id:
        raise ValueError(
            f"image tokens at {start} are not preceded by vision_start_token_id "
            f"{vision_start_token_id}; build the prompt with the chat template"
        )


def _row_positions(
    ids: np.ndarray, grids: Iterator, image_token_id: int, vision_start_token_id: int, m: int
) -> np.ndarray:
    # Positions of one unpadded row: [3, len(ids)].
    is_image = ids == image_token_id
    cuts = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(ids)]])
    chunks, current = [], 0
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if not is_image[start]:  # text: 1-D positions repeated on the 3 axes
            chunks.append(
                np.broadcast_to(np.arange(current, current + end - start), (3, end - start))
            )
            current += end - start
            continue
        grid = next(grids, None)
        if grid is None:
            raise ValueError("more image token runs in input_ids than grids in image_grid_thw")
        grid = _check_grid(grid, m)
        _check_image_run(ids, start, end, grid, vision_start_token_id, m)
        chunks.append(_image_positions(grid, m, current))
        current += max(grid[1], grid[2]) // m
    return np.concatenate(chunks, axis=1)


def mrope_position_ids(
    input_ids: np.ndarray,
    image_grid_thw: Sequence[GridTHW],
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D mRoPE position ids of a prompt with images, as `Qwen2_5_VLModel.get_rope_index`.

    Text tokens get `current, current+1, ...` on all three axes. An image run (consecutive
    `image_token_id`s, which must follow a `vision_start_token_id`) of grid `(t, h, w)` gets
    `(current + ti, current + hi, current + wi)` over its `(t, h/m, w/m)` merged grid, then
    `current` advances by `max(h, w) / m`. Grids are consumed in order, across the batch rows.
    Padding (`attention_mask == 0`) is skipped and its slots hold 0, as in transformers 5.

    Returns
    - position_ids: int64 `[3, B, S]` (axes t, h, w);
    - rope_deltas: int64 `[B, 1]`, `max position + 1 - number of attended tokens` of each row
      (transformers 5 counts attended tokens only; 4.x counted the padded length).
    Videos are not supported.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {input_ids.shape}")
    keep = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
    keep = keep.astype(bool)  # [B, S]
    batch, seq = input_ids.shape
    position_ids = np.zeros((3, batch, seq), dtype=np.int64)
    rope_deltas = np.zeros((batch, 1), dtype=np.int64)
    grids = iter(image_grid_thw)
    for b in range(batch):
        ids = input_ids[b][keep[b]]  # [n_b] attended tokens
        if len(ids) == 0:
            raise ValueError(f"row {b} of attention_mask attends to no token")
        row = _row_positions(ids, grids, image_token_id, vision_start_token_id, spatial_merge_size)
        position_ids[:, b, keep[b]] = row
        rope_deltas[b, 0] = row.max() + 1 - len(ids)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more grids than input_ids has image token runs")
    return position_ids, rope_deltas


def decode_position_ids(
    rope_delta: np.ndarray, cache_len: int | np.ndarray, n_new: int = 1
) -> np.ndarray:
    """mRoPE position ids of `n_new` text tokens appended after the cache, as generation does.

    Text tokens carry the same position on the three axes: `attended + i + rope_delta`. Since
    transformers 5 takes `rope_deltas` relative to attended tokens, `cache_len` must count the
    non-padding tokens already in the cache of each row (`attention_mask.sum(-1)` before the new
    tokens), not the raw KV length; the two agree for unpadded rows.

    Args:
        rope_delta: `[B, 1]` (or `[B]`) from `mrope_position_ids`.
        cache_len: an int for all rows, or `[B]` attended tokens per row.
        n_new: tokens fed in this step (1 for a decode step).

    Returns int64 `[3, B, n_new]`.
    """
    rope_delta = np.asarray(rope_delta, dtype=np.int64).reshape(-1, 1)  # [B, 1]
    cache_len = np.asarray(cache_len, dtype=np.int64).reshape(-1, 1)  # [B or 1, 1]
    positions = cache_len + np.arange(n_new, dtype=np.int64)[None, :] + rope_delta  # [B, n_new]
    return np.broadcast_to(positions, (3, *positions.shape)).copy()
