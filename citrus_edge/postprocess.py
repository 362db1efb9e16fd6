"""Host-side mask post-processing shared by the reference and the runtime (numpy only).

SAM2 returns three low-resolution mask logits per prompt; choosing the best one is done here,
not in the graph (a data-dependent choice is brittle in TensorRT).
"""

from __future__ import annotations

import numpy as np


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a half-pixel (align_corners=False) bilinear resize."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (src - lo).astype(np.float32)
    return lo, hi, w


def resize_bilinear(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [..., h, w] float logits like torch's interpolate(align_corners=False)."""
    ylo, yhi, wy = _bilinear_axis(x.shape[-2], out_hw[0])
    xlo, xhi, wx = _bilinear_axis(x.shape[-1], out_hw[1])
    rows = x[..., ylo, :] * (1 - wy)[:, None] + x[..., yhi, :] * wy[:, None]
    return rows[..., xlo] * (1 - wx) + rows[..., xhi] * wx


def resize_nearest(mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a [h, w] mask (index = floor(dst * in / out))."""
    ys = np.minimum((np.arange(out_hw[0]) * mask.shape[0]) // out_hw[0], mask.shape[0] - 1)
    xs = np.minimum((np.arange(out_hw[1]) * mask.shape[1]) // out_hw[1], mask.shape[1] - 1)
    return mask[ys[:, None], xs[None, :]]


def select_masks(
    low_res_logits: np.ndarray, iou: np.ndarray, sam_size: int, orig_hw: tuple[int, int]
) -> tuple[list[np.ndarray], list[float]]:
    """Keep the highest-IoU mask per prompt; sigmoid > 0.5 at SAM input size; nearest to original.

    low_res_logits: [N, 3, h, w]; iou: [N, 3]. Returns N bool masks [H, W] and their IoU scores.
    """
    masks, scores = [], []
    for logits, pred in zip(low_res_logits, iou, strict=True):
        k = int(np.argmax(pred))
        up = resize_bilinear(logits[k].astype(np.float32), (sam_size, sam_size))
        masks.append(resize_nearest(up > 0.0, orig_hw))  # sigmoid(x) > 0.5  <=>  x > 0
        scores.append(float(pred[k]))
    return masks, scores
