"""The seed's metrics, computed the same way for every backend (numpy only)."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two bool masks; both empty counts as 1."""
    p, t = pred.astype(bool), target.astype(bool)
    denom = p.sum() + t.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, t).sum() / denom)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; both empty counts as 1."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes (x2, y2 exclusive)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / area) if area > 0 else 0.0


def precision_at_1(
    pred_boxes: list[list[float]], gt_boxes: list[list[float]], thr: float = 0.5
) -> float:
    """1 if the first predicted box overlaps some ground-truth box with IoU >= thr.

    No lesion and no predicted box counts as correct; a box where there is no lesion, or no box
    where there is one, counts as wrong.
    """
    if not gt_boxes:
        return float(not pred_boxes)
    if not pred_boxes:
        return 0.0
    return float(max(box_iou(pred_boxes[0], g) for g in gt_boxes) >= thr)


def field_accuracy(pred: list[dict] | None, truth: list[dict], fields: tuple[str, ...]) -> float:
    """Fraction of (lesion, field) pairs reported correctly, lesions matched in order.

    A missing or unparsable report scores 0 on every field; extra predicted lesions are ignored
    (the count metric judges them). No lesion in the truth and none predicted scores 1.
    """
    if not truth:
        return float(pred is not None and len(pred) == 0)
    if pred is None:
        return 0.0
    hits = 0
    for i, t in enumerate(truth):
        p = pred[i] if i < len(pred) else {}
        hits += sum(str(p.get(f)) == str(t.get(f)) for f in fields)
    return hits / (len(truth) * len(fields))


def token_agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two greedy token sequences agree (over the longer length)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    return sum(x == y for x, y in zip(a, b, strict=False)) / n
