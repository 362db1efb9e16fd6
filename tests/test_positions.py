"""citrus_edge.positions against transformers' own Qwen2.5-VL code, on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest

from citrus_edge import positions as P

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionRotaryEmbedding,
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import (  # noqa: E402
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

# 16x16 is divided by the 4-unit window; the others leave partial edge windows.
GRIDS = [(1, 16, 16), (1, 8, 12), (1, 20, 14), (1, 22, 36)]
GRIDS_T = GRIDS + [(2, 8, 12)]
VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=32,
    window_size=112,
    patch_size=14,
    spatial_merge_size=2,
    fullatt_block_indexes=[1],
)
HEAD_DIM = VISION["hidden_size"] // VISION["num_heads"]
M = VISION["spatial_merge_size"]
# Token ids of the tiny LLM (vocab 64).
PAD, IMAGE, VIDEO, VSTART, VEND = 0, 60, 61, 62, 63


def _win_args() -> tuple[int, int, int]:
    return VISION["window_size"], VISION["patch_size"], M


@pytest.fixture(scope="module")
def vision() -> Qwen2_5_VisionTransformerPretrainedModel:
    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**VISION)).eval()


@pytest.fixture(scope="module")
def vlm() -> Qwen2_5_VLForConditionalGeneration:
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=VISION,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _pixels(grid: tuple[int, int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(grid))
    return torch.randn(int(np.prod(grid)), 3 * 2 * 14 * 14, generator=gen)  # [t*h*w, C*T*P*P]


def _grid_t(grid: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([grid])  # [1, 3]


# --------------------------------------------------------------------------- vision


@pytest.mark.parametrize("grid", GRIDS_T)
def test_vision_position_ids_match(grid):
    ref = get_vision_position_ids(_grid_t(grid), M).numpy()
    assert np.array_equal(P.vision_position_ids(grid, M), ref)


@pytest.mark.parametrize("grid", GRIDS)
def test_vision_rotary_matches_module_inv_freq(grid, vision):
    inv_freq = vision.rotary_pos_emb.inv_freq  # [head_dim // 4]
    pos = get_vision_position_ids(_grid_t(grid), M).float()  # [S, 2]
    ref = (pos[..., None] * inv_freq).reshape(len(pos), -1).numpy()  # [S, head_dim // 2]
    table = P.vision_rotary(grid, HEAD_DIM, M)
    assert table.dtype == np.float32 and table.shape == ref.shape
    assert np.abs(table - ref).max() < 1e-6


@pytest.mark.parametrize("grid", GRIDS)
def test_vision_rotary_at_qwen25_vl_head_dim(grid):
    # The released encoders: hidden 1280, 16 heads -> head_dim 80, rope_theta 10000.
    cfg = Qwen2_5_VLVisionConfig(hidden_size=1280, num_heads=16)
    inv_freq, _ = Qwen2_5_VLVisionRotaryEmbedding.compute_axial_rope_parameters(cfg)  # [20]
    pos = get_vision_position_ids(_grid_t(grid), M).float()  # [S, 2]
    ref = (pos[..., None] * inv_freq).reshape(len(pos), -1).numpy()  # [S, 40]
    table = P.vision_rotary(grid, 80, M, cfg.rope_parameters["rope_theta"])
    assert np.abs(table - ref).max() < 1e-6


@pytest.mark.parametrize("grid", GRIDS_T)
def test_window_index_matches(grid):
    ref_index, ref_cu = get_vision_window_index(_grid_t(grid), M, VISION["window_size"], 14)
    index, cu = P.window_index(grid, *_win_args())
    assert index.dtype == np.int64 and cu.dtype == np.int32
    assert np.array_equal(index, ref_index.numpy())
    assert np.array_equal(cu, ref_cu.numpy())
    assert np.array_equal(P.reverse_index(index), torch.argsort(ref_index).numpy())


@pytest.mark.parametrize("grid", GRIDS_T)
def test_full_attention_cu_seqlens_match(grid):
    ref = get_vision_cu_seqlens(_grid_t(grid)).numpy()
    cu = P.full_attention_cu_seqlens(grid)
    assert cu.dtype == ref.dtype and np.array_equal(cu, ref)


def _capture_block_inputs(vision, grid) -> tuple[list[dict], torch.Tensor]:
    seen = []
    hooks = [
        blk.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw), with_kwargs=True)
        for blk in vision.blocks
    ]
    try:
        with torch.no_grad():
            out = vision(_pixels(grid), grid_thw=_grid_t(grid)).pooler_output
    finally:
        for hook in hooks:
            hook.remove()
    return seen, out


@pytest.mark.parametrize("grid", GRIDS)
def test_cos_sin_and_cu_seqlens_are_what_blocks_receive(grid, vision):
    seen, _ = _capture_block_inputs(vision, grid)
    cos, sin = P.vision_cos_sin(grid, HEAD_DIM, M, *_win_args()[:2])
    _, cu_window = P.window_index(grid, *_win_args())
    expected_cu = {0: cu_window, 1: P.full_attention_cu_seqlens(grid)}  # block 1 is full attention
    for layer, kwargs in enumerate(seen):
        ref_cos, ref_sin = (t.numpy() for t in kwargs["position_embeddings"])
        assert np.abs(cos - ref_cos).max() < 1e-6
        assert np.abs(sin - ref_sin).max() < 1e-6
        assert np.array_equal(kwargs["cu_seqlens"].numpy(), expected_cu[layer])


def _forward_from_host_inputs(vision, grid) -> torch.Tensor:
    """The vision forward with every grid-dependent tensor from the host, as an export graph."""
    order, cu_window = P.window_index(grid, *_win_args())
    cos, sin = P.vision_cos_sin(grid, HEAD_DIM, M, *_win_args()[:2])
    pixels = P.to_window_order(_pixels(grid).numpy(), order, M)  # [S, C*T*P*P] window order
    emb = (torch.from_numpy(cos), torch.from_numpy(sin))
    cu = {0: torch.from_numpy(cu_window), 1: torch.from_numpy(P.full_attention_cu_seqlens(grid))}
    with torch.no_grad():
        hidden = vision.patch_embed(torch.from_numpy(pixels))  # [S, hidden]
        for layer, blk in enumerate(vision.blocks):
            hidden = blk(hidden, cu_seqlens=cu[layer], position_embeddings=emb)
        merged = vision.merger(hidden)  # [S / m^2, out_hidden]
        return merged[torch.from_numpy(P.reverse_index(order))]


@pytest.mark.parametrize("grid", GRIDS)
def test_host_inputs_reproduce_stock_forward(grid, vision):
    _, stock = _capture_block_inputs(vision, grid)
    ours = _forward_from_host_inputs(vision, grid)
    assert stock.shape == ours.shape
    assert (stock - ours).abs().max().item() < 1e-5


@pytest.mark.parametrize("grid", GRIDS)
def test_stock_forward_accepts_precomputed_kwargs(grid, vision):
    # transformers 5 pops these kwargs instead of computing them (vision_utils.get_vision_*).
    index, cu_window = P.window_index(grid, *_win_args())
    precomputed = dict(
        position_ids=torch.from_numpy(P.vision_position_ids(grid, M)),
        cu_seqlens=torch.from_numpy(P.full_attention_cu_seqlens(grid)),
        window_index=torch.from_numpy(index),
        cu_window_seqlens=torch.from_numpy(cu_window),
    )
    _, stock = _capture_block_inputs(vision, grid)
    with torch.no_grad():
        fed = vision(_pixels(grid), grid_thw=_grid_t(grid), **precomputed).pooler_output
    assert (stock - fed).abs().max().item() < 1e-5


@pytest.mark.parametrize("grid", GRIDS_T)
def test_padded_windows_layout(grid):
    _, cu = P.window_index(grid, *_win_args())
    layout = P.padded_windows(grid, *_win_args())
    n_windows, width = layout.valid.shape
    assert width == 64 and n_windows == len(cu) - 1
    assert np.array_equal(layout.valid.sum(axis=1), np.diff(cu))
    tokens = np.arange(cu[-1])  # window-order token ids
    assert np.array_equal(tokens[layout.gather_index][layout.valid], tokens)
    assert np.array_equal(tokens[layout.gather_index].reshape(-1)[layout.scatter_index], tokens)
    assert layout.valid[:, 0].all()  # no empty window, so no fully masked softmax row


def _padded_window_attention(attn, hidden, cos, sin, layout: P.PaddedWindows) -> torch.Tensor:
    """A vision attention layer run on padded windows instead of cu_window_seqlens."""
    seq = hidden.shape[0]
    q, k, v = attn.qkv(hidden).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [S, heads, head_dim]
    gather = torch.from_numpy(layout.gather_index)  # [W, T]
    q, k, v = (x[gather].transpose(1, 2) for x in (q, k, v))  # [W, heads, T, head_dim]
    mask = torch.from_numpy(layout.valid)[:, None, None, :]  # [W, 1, 1, T] keys
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(-1, attn.dim)  # [W*T, hidden]
    return attn.proj(out[torch.from_numpy(layout.scatter_index)])  # [S, hidden]


@pytest.mark.parametrize("grid", GRIDS)
def test_padded_windows_match_block_diagonal_attention(grid, vision):
    _, cu_window = P.window_index(grid, *_win_args())
    cos, sin = (torch.from_numpy(x) for x in P.vision_cos_sin(grid, HEAD_DIM, M, 112, 14))
    hidden = torch.randn(int(np.prod(grid)), VISION["hidden_size"])
    attn = vision.blocks[0].attn
    with torch.no_grad():
        ref = attn(hidden, cu_seqlens=torch.from_numpy(cu_window), position_embeddings=(cos, sin))
        ours = _padded_window_attention(attn, hidden, cos, sin, P.padded_windows(grid, 112, 14, M))
    assert (ref - ours).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "call",
    [
        lambda: P.vision_rotary((1, 7, 8), HEAD_DIM, M),  # h not divisible by the merge size
        lambda: P.vision_rotary((0, 8, 8), HEAD_DIM, M),  # empty grid
        lambda: P.vision_rotary((1, 8, 8), 18, M),  # head_dim not a multiple of 4
        lambda: P.window_index((1, 8, 10), 112, 14, 3),
        lambda: P.window_index((1, 8, 8), 14, 14, M),  # window smaller than a merge unit
    ],
)
def test_vision_rejects_bad_inputs(call):
    with pytest.raises(ValueError):
        call()


# --------------------------------------------------------------------------- mRoPE


def _prompt(grid, n_before: int, n_after: int) -> list[int]:
    n_image = grid[0] * (grid[1] // M) * (grid[2] // M)
    return [5] * n_before + [VSTART] + [IMAGE] * n_image + [VEND] + [7] * n_after


def _batch(grids, texts, pad: bool) -> tuple[np.ndarray, np.ndarray]:
    rows = [_prompt(g, *t) for g, t in zip(grids, texts, strict=True)]
    seq = max(len(r) for r in rows)
    if not pad and any(len(r) != seq for r in rows):
        raise AssertionError("unpadded test rows must have equal length")
    ids = np.array([[PAD] * (seq - len(r)) + r for r in rows])  # [B, S] left padded
    mask = np.array([[0] * (seq - len(r)) + [1] * len(r) for r in rows])  # [B, S]
    return ids, mask


# (grids, (text before, text after) per row, left padded). 24 and 70 image tokens.
BATCHES = [
    ([(1, 8, 12), (1, 20, 14)], [(3, 4), (2, 6)], True),
    ([(1, 20, 14), (1, 8, 12)], [(1, 2), (9, 40)], False),
    ([(1, 22, 36), (1, 16, 16)], [(4, 3), (0, 1)], True),
]


@pytest.mark.parametrize(
    "grids, texts, pad, with_mask",
    [
        (*batch, with_mask)
        for batch in BATCHES
        for with_mask in (True, False)
        if with_mask or not batch[2]
    ],
)
def test_mrope_matches_get_rope_index(grids, texts, pad, with_mask, vlm):
    ids, mask = _batch(grids, texts, pad)
    mask_or_none = mask if with_mask else None
    ref_pos, ref_delta = vlm.model.get_rope_index(
        torch.from_numpy(ids),
        mm_token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int32)),
        image_grid_thw=torch.tensor(grids),
        attention_mask=None if mask_or_none is None else torch.from_numpy(mask_or_none),
    )
    pos, delta = P.mrope_position_ids(ids, grids, IMAGE, VSTART, M, attention_mask=mask_or_none)
    assert pos.dtype == np.int64 and delta.shape == (len(grids), 1)
    assert np.array_equal(pos, ref_pos.numpy())
    assert np.array_equal(delta, ref_delta.numpy())


@pytest.mark.parametrize("grids, texts, pad", BATCHES[:2])
def test_positions_match_generate(grids, texts, pad, vlm):
    """Prefill and decode positions equal those `generate` feeds the language model."""
    ids, mask = _batch(grids, texts, pad)
    seen = []
    hook = vlm.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    pixels = torch.cat([_pixels(g) for g in grids])
    try:
        vlm.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            mm_token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int32)),
            pixel_values=pixels,
            image_grid_thw=torch.tensor(grids),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
        )
    finally:
        hook.remove()
    pos, delta = P.mrope_position_ids(ids, grids, IMAGE, VSTART, M, attention_mask=mask)
    assert len(seen) == 4 and seen[0].shape[0] == 4  # [text, t, h, w] rows
    assert np.array_equal(seen[0][1:].numpy(), pos)
    attended = mask.sum(-1)  # [B] non-padding tokens of the prompt
    for step, fed in enumerate(seen[1:]):
        assert np.array_equal(fed[1:].numpy(), P.decode_position_ids(delta, attended + step, 1))


def test_decode_positions_without_padding():
    delta = np.array([[-5], [3]])
    out = P.decode_position_ids(delta, cache_len=10, n_new=2)
    assert out.shape == (3, 2, 2)
    assert np.array_equal(out, np.broadcast_to([[5, 6], [13, 14]], (3, 2, 2)))


@pytest.mark.parametrize(
    "ids, grids, message",
    [
        ([5, VSTART] + [IMAGE] * 23 + [VEND], [(1, 8, 12)], "does not match grid"),
        ([5, 5] + [IMAGE] * 24 + [VEND], [(1, 8, 12)], "vision_start"),
        ([5, VSTART] + [IMAGE] * 24 + [VEND], [], "more image token runs"),
        ([5, VSTART] + [IMAGE] * 24 + [VEND], [(1, 8, 12)] * 2, "more grids"),
    ],
)
def test_mrope_rejects_inconsistent_prompts(ids, grids, message):
    with pytest.raises(ValueError, match=message):
        P.mrope_position_ids(np.array([ids]), grids, IMAGE, VSTART, M)
