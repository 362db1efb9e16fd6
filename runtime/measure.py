"""Physical size of masks: area in mm² and longest diameter in mm, only where the input has a
pixel spacing (a DICOM that states one). Without a spacing nothing is measured, never guessed.

The longest diameter is the largest distance between the centres of two boundary pixels of the
mask, with row and column differences scaled by their own spacing (anisotropic pixels). The
farthest pair of any point set lies on its convex hull, and every hull vertex of a pixel mask is
the leftmost or rightmost pixel of its row (a boundary pixel), so only those are compared.
"""

from __future__ import annotations

import numpy as np

from citrus_edge.calib_data.spacing import PixelSpacing
from citrus_edge.result import Measurement


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull vertices of [N, 2] points (Andrew's monotone chain), [K, 2]."""
    pts = np.unique(points, axis=0)  # sorted by (x, then y), duplicates removed
    if len(pts) <= 2:
        return pts

    def chain(seq: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for p in seq:
            while len(out) >= 2 and _cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return np.array(chain(pts) + chain(pts[::-1]))


def row_extremes(mask: np.ndarray) -> np.ndarray:
    """(row, col) of the leftmost and rightmost pixel of every non-empty row, [K, 2] int64."""
    rows = np.flatnonzero(mask.any(axis=1))  # [R]
    first = mask[rows].argmax(axis=1)  # [R]
    last = mask.shape[1] - 1 - mask[rows][:, ::-1].argmax(axis=1)  # [R]
    return np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)])


def longest_diameter_mm(mask: np.ndarray, row_mm: float, col_mm: float) -> float:
    """Largest centre-to-centre distance (mm) between two pixels of `mask` [H, W] bool."""
    if not mask.any():
        return 0.0
    scaled = row_extremes(mask).astype(np.float64) * np.array([row_mm, col_mm])  # [K, 2] mm
    hull = _hull(scaled)  # [M, 2]
    diff = hull[:, None, :] - hull[None, :, :]  # [M, M, 2]
    return float(np.sqrt((diff**2).sum(-1)).max())


def measure_mask(mask: np.ndarray, spacing: PixelSpacing) -> Measurement:
    """Area (pixel count x row_mm x col_mm) and longest diameter of one [H, W] bool mask."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be [H, W], got shape {mask.shape}")
    area = float(mask.sum()) * spacing.row_mm * spacing.col_mm
    diameter = longest_diameter_mm(mask, spacing.row_mm, spacing.col_mm)
    return Measurement(area, diameter, spacing.source)


def measure_masks(masks: list[np.ndarray], spacing: PixelSpacing | None) -> list[Measurement]:
    """One measurement per mask, or none at all when the image has no physical spacing."""
    if spacing is None:
        return []
    return [measure_mask(m, spacing) for m in masks]
