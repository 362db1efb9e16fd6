"""The host code the reference and the runtime share, checked against oracles that are not ours:
torch's `interpolate` for the mask resizes and the SAM2 input, and hand-computed cases for the
mask choice. (The reference and runtime share these functions, so parity tests between them
cannot see a fault here.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from citrus_edge.postprocess import resize_bilinear, resize_nearest, select_masks
from citrus_edge.preprocess import (
    ImageTooSmallError,
    PreprocessConfig,
    check_image_size,
    qwen_pixels,
    sam_pixels,
    smart_resize,
)

SIZES = [((64, 64), (256, 256)), ((64, 64), (300, 410)), ((256, 256), (97, 61)), ((7, 5), (7, 5))]


@pytest.mark.parametrize(("in_hw", "out_hw"), SIZES)
def test_bilinear_logit_resize_equals_torch(in_hw, out_hw):
    x = np.random.default_rng(0).normal(size=(2, *in_hw)).astype(np.float32)  # [N, h, w]
    ours = resize_bilinear(x, out_hw)
    theirs = F.interpolate(
        torch.from_numpy(x)[:, None], size=out_hw, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    assert ours.shape == theirs.shape == (2, *out_hw)
    # torch takes the source coordinate in float32, ours in float64: 1e-4 apart on unit-variance
    # logits at non-integer scales; a half-pixel shift would be ~0.5 apart.
    assert np.abs(ours - theirs).max() < 5e-4


@pytest.mark.parametrize(("in_hw", "out_hw"), SIZES)
def test_nearest_mask_resize_equals_torch(in_hw, out_hw):
    mask = np.random.default_rng(1).random(in_hw) > 0.5
    ours = resize_nearest(mask, out_hw)
    theirs = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=out_hw, mode="nearest")
    np.testing.assert_array_equal(ours, theirs[0, 0].numpy() > 0.5)


def test_nearest_resize_by_hand():
    """2x2 -> 3x3: source index floor(dst * 2 / 3) = 0, 0, 1 on both axes."""
    mask = np.array([[1, 0], [0, 0]], dtype=bool)
    expected = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(resize_nearest(mask, (3, 3)), expected)


def test_the_highest_predicted_iou_mask_is_kept():
    """Prompt 0 prefers mask 2 (IoU 0.9), prompt 1 mask 0 (0.8); each mask is one lit quadrant,
    so the kept mask shows which one was chosen."""
    logits = np.full((2, 3, 4, 4), -5.0, dtype=np.float32)  # [N, 3, h, w]
    for k, (r, c) in enumerate([(0, 0), (0, 2), (2, 0)]):
        logits[:, k, r : r + 2, c : c + 2] = 5.0
    iou = np.array([[0.2, 0.1, 0.9], [0.8, 0.3, 0.5]], dtype=np.float32)
    masks, scores = select_masks(logits, iou, sam_size=8, orig_hw=(4, 4))
    assert scores == pytest.approx([0.9, 0.8])
    expected_2 = np.zeros((4, 4), bool)
    expected_2[2:, :2] = True
    expected_0 = np.zeros((4, 4), bool)
    expected_0[:2, :2] = True
    np.testing.assert_array_equal(masks[0], expected_2)
    np.testing.assert_array_equal(masks[1], expected_0)


def test_mask_threshold_is_sigmoid_one_half():
    """Logits just above and below 0 (sigmoid 0.5) fall on either side of the threshold; 0
    itself (sigmoid exactly 0.5) is outside, as SAM2's `mask_threshold` 0.0 with `>`."""
    logits = np.array([[[[0.01, -0.01], [0.5, 0.0]]] * 3], dtype=np.float32)  # [1, 3, 2, 2]
    masks, _ = select_masks(logits, np.array([[1.0, 0.0, 0.0]]), sam_size=2, orig_hw=(2, 2))
    np.testing.assert_array_equal(masks[0], [[True, False], [True, False]])


@pytest.mark.parametrize("hw", [(300, 500), (64, 64)])
def test_sam_input_of_a_uniform_image_by_hand(hw):
    """A uniform image resizes to itself, so the SAM2 input is (v / 255 - mean) / std exactly,
    with ImageNet's mean and std (transformers' constants)."""
    rgb = np.empty((*hw, 3), np.uint8)
    rgb[...] = (255, 0, 128)
    got = sam_pixels(rgb, PreprocessConfig(sam_image_size=32))  # [1, 3, 32, 32]
    expected = [
        (v / 255 - m) / s
        for v, m, s in zip((255, 0, 128), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, strict=True)
    ]
    assert got.shape == (1, 3, 32, 32) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got[0, :, 0, 0], expected, atol=1e-6)
    assert np.ptp(got, axis=(2, 3)).max() == 0.0  # uniform


@pytest.mark.parametrize("hw", [(180, 240), (600, 800), (1024, 1024)])
def test_sam_input_equals_torch_antialiased_bilinear(hw):
    """SAM2's processor resizes to the square input with bilinear filtering (PIL, antialiased
    when shrinking) and normalises with ImageNet mean/std; torch's antialiased bilinear
    interpolate is an independent implementation of the same filter. PIL rounds to uint8, so
    the two differ by at most ~1 grey level (1/255/0.224 = 0.0175 after normalisation)."""
    cfg = PreprocessConfig(sam_image_size=256)
    rgb = np.random.default_rng(2).integers(0, 256, (*hw, 3), dtype=np.uint8)
    smooth = np.kron(rgb[::8, ::8], np.ones((8, 8, 1), dtype=np.uint8))[: hw[0], : hw[1]]
    ours = sam_pixels(smooth, cfg)  # [1, 3, S, S]
    x = torch.from_numpy(smooth).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    theirs = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False, antialias=True)
    # ImageNet mean/std from transformers (what SAM2's processor uses), not this module's copy
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    theirs = (theirs / 255.0 - mean) / std
    diff = np.abs(ours - theirs.numpy())
    assert ours.shape == (1, 3, 256, 256) and ours.dtype == np.float32
    assert diff.max() < 0.04 and diff.mean() < 0.01, (diff.max(), diff.mean())


qwen_processor = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def _random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Image sizes with sides 28..3000 px and aspect <= 200 (what `qwen_pixels` accepts)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        h, w = (int(v) for v in rng.integers(28, 3001, 2))
        if max(h, w) <= 200 * min(h, w):
            out.append((h, w))
    return out


# (min_pixels, max_pixels): the 8B's, the demo model's (every image ~336 x 336), transformers'
PIXEL_BOUNDS = [(3136, 65535), (336 * 336, 336 * 336), (3136, 1003520)]
EDGE_SIZES = [(28, 28), (28, 5600), (5600, 28), (29, 41), (255, 256), (2000, 11), (11, 2000)]


def test_smart_resize_equals_transformers():
    """Qwen2-VL's `smart_resize` from transformers on 300 random sizes and the edges (a
    28-px side, aspect exactly 200, sides rounding up and down, both budget branches)."""
    sizes = [s for s in _random_sizes(300) + EDGE_SIZES if min(s) >= 28]
    branches = set()
    for min_px, max_px in PIXEL_BOUNDS:
        for h, w in sizes:
            ours = smart_resize(h, w, 28, min_px, max_px)
            assert ours == qwen_processor.smart_resize(h, w, 28, min_px, max_px), (h, w)
            assert ours[0] % 28 == 0 and ours[1] % 28 == 0
            area = round(h / 28) * 28 * round(w / 28) * 28
            branches.add("max" if area > max_px else "min" if area < min_px else "kept")
    assert branches == {"max", "min", "kept"}  # every branch of the rule was compared


@pytest.mark.parametrize("hw", [(97, 301), (256, 256), (480, 640), (1000, 90), (28, 28)])
@pytest.mark.parametrize("which", ["8b", "demo"])
def test_qwen_pixels_equal_transformers_processor(hw, which):
    """The flattened patches and grid equal transformers' Qwen2-VL processor (PIL backend,
    bicubic, CLIP mean/std) for the 8B's and the demo model's settings; no bundle needed."""
    from citrus_edge.config import CITRUS_V_8B, DEMO

    cfg = {"8b": CITRUS_V_8B, "demo": DEMO}[which].preprocess
    processor = qwen_processor.Qwen2VLImageProcessorPil(
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        patch_size=cfg.patch_size,
        merge_size=cfg.merge_size,
        temporal_patch_size=cfg.temporal_patch_size,
    )
    rgb = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    expected = processor(images=[rgb], return_tensors="np")
    got = qwen_pixels(rgb, cfg)
    grid = tuple(int(v) for v in expected["image_grid_thw"][0])
    assert got.grid_thw == grid and got.resized_hw == (grid[1] * 14, grid[2] * 14)
    assert got.pixel_values.shape == expected["pixel_values"].shape
    assert got.pixel_values.dtype == np.float32
    assert np.abs(got.pixel_values - expected["pixel_values"]).max() <= 1e-5


def test_preprocess_defaults_are_the_8bs_and_qwen25vls():
    """A config without a preprocess section gets the 8B's preprocessing; its patch, merge and
    temporal sizes and pixel floor are Qwen2.5-VL's processor defaults (transformers)."""
    from citrus_edge.config import CITRUS_V_8B

    cfg = PreprocessConfig()
    assert cfg == CITRUS_V_8B.preprocess and cfg.factor == 28
    proc = qwen_processor.Qwen2VLImageProcessorPil
    assert (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size) == (
        proc.patch_size,
        proc.merge_size,
        proc.temporal_patch_size,
    )
    assert cfg.min_pixels == proc.size["shortest_edge"] == 56 * 56
    assert cfg.sam_image_size == 1024 and cfg.max_pixels == 65535  # the 8B's choices
    # smart_resize's own defaults are the 8B's too (56 x 56 is the pixel floor exactly;
    # 1000 x 90 is not a multiple of 28 and over the budget)
    # 72 x 882 is one of the sizes whose budget branch rounds differently at 65536 pixels
    for h, w in ((56, 56), (480, 640), (1000, 90), (30, 30), (72, 882)):
        assert smart_resize(h, w) == smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    assert smart_resize(56, 56) == (56, 56) and smart_resize(72, 882) == (56, 868)
    assert qwen_processor.smart_resize(72, 882, 28, 3136, 65535) == (56, 868)
    demo = PreprocessConfig(min_pixels=336 * 336, max_pixels=336 * 336, sam_image_size=256)
    assert PreprocessConfig(**demo.to_dict()) == demo and demo.to_dict()["sam_image_size"] == 256


def test_smart_resize_refuses_only_empty_or_elongated_images():
    """`smart_resize` itself takes any side >= 1 px (the 28-px floor is `qwen_pixels`')."""
    assert smart_resize(1, 100) == (28, 112) and smart_resize(1, 1) == (56, 56)
    for h, w in ((0, 10), (10, 0), (1, 201)):
        with pytest.raises(ImageTooSmallError, match=f"{h}x{w}"):
            smart_resize(h, w)


@pytest.mark.parametrize(
    ("hw", "ok"),
    [
        ((28, 28), True),
        ((27, 500), False),
        ((500, 27), False),
        ((28, 5600), True),  # aspect exactly 200
        ((28, 5601), False),
        ((5601, 28), False),
    ],
)
def test_image_size_limits_at_the_boundary(hw, ok):
    """28 px on the short side and aspect 200 are the last sizes accepted, by both branches."""
    rgb = np.zeros((*hw, 3), np.uint8)
    cfg = PreprocessConfig(sam_image_size=64)
    if ok:
        assert qwen_pixels(rgb, cfg).grid_thw[0] == 1
        assert sam_pixels(rgb, cfg).shape == (1, 3, 64, 64)
        check_image_size(*hw, 28, source="scan.dcm")
        return
    for call in (lambda: qwen_pixels(rgb, cfg), lambda: sam_pixels(rgb, cfg)):
        with pytest.raises(ImageTooSmallError, match=f"{hw[0]}x{hw[1]}"):
            call()
    with pytest.raises(ImageTooSmallError, match=r"^scan\.dcm: image is"):
        check_image_size(*hw, 28, source="scan.dcm")
