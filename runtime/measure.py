"""Physical size of masks: area in mm² and longest diameter in mm, only where the input has a
pixel spacing (a DICOM that states one). Without a spacing nothing is measured, never guessed.

A mask is measured only when all its pixels lie in one calibrated region of the image
(`calib_data.spacing.Calibration`: an ultrasound region, or the whole image for `PixelSpacing`
or a caller's spacing), with that region's pixel size. A mask that crosses regions, reaches
outside its region or lies outside every region gets no measurement and a warning, and so does
every mask of an image whose stated calibration was refused as implausible. Each `Measurement`
names its mask, so a missing one is explicit.

The longest diameter is the largest distance between the centres of two boundary pixels of the
mask, with row and column differences scaled by their own spacing (anisotropic pixels). The
farthest pair of any point set lies on its convex hull, and every hull vertex of a pixel mask is
the leftmost or rightmost pixel of its row (a boundary pixel), so only those are compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from citrus_edge.calib_data.load import LoadedImage
from citrus_edge.calib_data.spacing import CalibratedRegion, Calibration, PixelSpacing
from citrus_edge.result import Measurement

NO_MM = "no size in mm"


@dataclass(frozen=True)
class Measured:
    """Measurements of the measurable masks and one warning per mask (or refused calibration)
    that could not be measured."""

    measurements: list[Measurement] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


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


def measure_mask(mask: np.ndarray, spacing: PixelSpacing, index: int = 0) -> Measurement:
    """Area (pixel count x row_mm x col_mm) and longest diameter of one [H, W] bool mask, the
    mask `index` of its result; `spacing` must hold for every pixel of the mask."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be [H, W], got shape {mask.shape}")
    area = float(mask.sum()) * spacing.row_mm * spacing.col_mm
    diameter = longest_diameter_mm(mask, spacing.row_mm, spacing.col_mm)
    return Measurement(area, diameter, spacing.source, index)


def measure_masks(masks: list[np.ndarray], spacing: PixelSpacing | None) -> list[Measurement]:
    """One measurement per mask with one spacing over the whole image, or none without one."""
    if spacing is None:
        return []
    return [measure_mask(m, spacing, i) for i, m in enumerate(masks)]


def measure_image(masks: list[np.ndarray], image: LoadedImage) -> Measured:
    """`measure_calibrated` with the image's calibration (`LoadedImage.calibration_of`)."""
    return measure_calibrated(masks, image.calibration_of())


def measure_calibrated(masks: list[np.ndarray], calibration: Calibration | None) -> Measured:
    """Measure each mask that lies wholly in one calibrated region; warn for the others.

    Nothing is measured, and nothing warned, without any stated calibration (an ordinary image).
    """
    if not masks or calibration is None:
        return Measured()
    out = Measured(warnings=[f"{line}; {NO_MM}" for line in calibration.refused])
    if not calibration.regions:  # nothing calibrated: the refused lines say all there is
        return out
    for i, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)  # [H, W]
        region, why = _region_of(mask, calibration.regions)
        if region is None:
            out.warnings.append(f"masks[{i}] {why}; {NO_MM}")
        else:
            out.measurements.append(measure_mask(mask, region.spacing, i))
    return out


def _inside(mask: np.ndarray, region: CalibratedRegion) -> np.ndarray:
    """The part of `mask` within `region` ([h, w] view)."""
    if region.bounds is None:
        return mask
    x0, y0, x1, y1 = region.bounds
    return mask[y0 : y1 + 1, x0 : x1 + 1]


def _region_of(
    mask: np.ndarray, regions: tuple[CalibratedRegion, ...]
) -> tuple[CalibratedRegion | None, str]:
    """The region holding every pixel of `mask`, or None and why there is none."""
    total = int(mask.sum())
    holding = [r for r in regions if int(_inside(mask, r).sum()) == total]
    sizes = {(r.spacing.row_mm, r.spacing.col_mm) for r in holding}
    if len(sizes) == 1:
        return holding[0], ""
    if len(sizes) > 1:
        names = " and ".join(r.name for r in holding)
        return None, f"lies in {names}, which state different pixel sizes"
    touched = [r for r in regions if _inside(mask, r).any()]
    if len(touched) > 1:
        return None, f"crosses ultrasound regions ({' and '.join(r.name for r in touched)})"
    if touched:
        return None, f"reaches outside {touched[0].name}, the only calibrated region it touches"
    return None, "lies outside every calibrated region"
