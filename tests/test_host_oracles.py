"""The host code the reference and the runtime share, checked against oracles that are not ours:
torch's `interpolate` for the mask resizes and the SAM2 input, and hand-computed cases for the
mask choice. (The reference and runtime share these functions, so parity tests between them
cannot see a fault here.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from citrus_edge.postprocess import resize_bilinear, resize_nearest, select_masks
from citrus_edge.preprocess import SAM_MEAN, SAM_STD, PreprocessConfig, sam_pixels

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
    """Logits just above and below 0 (sigmoid 0.5) fall on either side of the threshold."""
    logits = np.array([[[[0.01, -0.01], [0.5, -0.5]]] * 3], dtype=np.float32)  # [1, 3, 2, 2]
    masks, _ = select_masks(logits, np.array([[1.0, 0.0, 0.0]]), sam_size=2, orig_hw=(2, 2))
    np.testing.assert_array_equal(masks[0], [[True, False], [True, False]])


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
    theirs = (theirs / 255.0 - torch.tensor(SAM_MEAN)[:, None, None]) / torch.tensor(SAM_STD)[
        :, None, None
    ]
    diff = np.abs(ours - theirs.numpy())
    assert ours.shape == (1, 3, 256, 256) and ours.dtype == np.float32
    assert diff.max() < 0.04 and diff.mean() < 0.01, (diff.max(), diff.mean())
