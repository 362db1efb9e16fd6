"""Physical pixel spacing of a DICOM image, read from the attributes and never invented.

Order of preference:
1. Ultrasound `SequenceOfUltrasoundRegions`: the region holding the image data (tissue data
   type first, then the region containing the image centre, then the largest one). Its
   PhysicalDeltaX/Y count only when PhysicalUnitsX/YDirection are 3 (cm); any other unit code
   (none, percent, dB, seconds, Hz, ...) means that region has no physical spacing.
2. `PixelSpacing` (row, column in mm), at the top level or in the shared functional groups of an
   enhanced multi-frame object.
3. `ImagerPixelSpacing` (spacing at the detector, projection radiography).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

US_REGIONS = "SequenceOfUltrasoundRegions"
PIXEL_SPACING = "PixelSpacing"
IMAGER_PIXEL_SPACING = "ImagerPixelSpacing"
SPACING_SOURCES = (US_REGIONS, PIXEL_SPACING, IMAGER_PIXEL_SPACING)

_UNITS_CM = 3  # PS3.3 C.8.5.5.1.15: 3 = cm
_DATA_TYPE_TISSUE = 1  # PS3.3 C.8.5.5.1.2: 1 = tissue


@dataclass(frozen=True)
class PixelSpacing:
    """Size of one pixel in mm along rows (vertical) and columns (horizontal)."""

    row_mm: float
    col_mm: float
    source: str  # one of SPACING_SOURCES

    def __post_init__(self) -> None:
        if self.source not in SPACING_SOURCES:
            raise ValueError(f"spacing source {self.source!r} is not one of {SPACING_SOURCES}")
        if not (self.row_mm > 0 and self.col_mm > 0):
            raise ValueError(f"pixel spacing must be positive, got {self.row_mm}, {self.col_mm}")


def dicom_spacing(ds: Dataset, path: str = "") -> PixelSpacing | None:
    """The pixel spacing of `ds` from its attributes, or None (logged) when it has none."""
    if ds.get(US_REGIONS):
        return _region_spacing(ds, path)
    for keyword in (PIXEL_SPACING, IMAGER_PIXEL_SPACING):
        spacing = _pair_spacing(_find(ds, keyword), keyword)
        if spacing is not None:
            return spacing
    log.info("%s: no pixel spacing in the DICOM attributes; sizes in mm are unavailable", path)
    return None


def _find(ds: Dataset, keyword: str) -> object:
    """`keyword` at the top level, else in SharedFunctionalGroupsSequence > PixelMeasures."""
    if keyword in ds:
        return ds[keyword].value
    shared = ds.get("SharedFunctionalGroupsSequence")
    if keyword == PIXEL_SPACING and shared:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures and PIXEL_SPACING in measures[0]:
            return measures[0].PixelSpacing
    return None


def _pair_spacing(value: object, source: str) -> PixelSpacing | None:
    try:
        row, col = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if row > 0 and col > 0:
        return PixelSpacing(row, col, source)
    return None


def _region_spacing(ds: Dataset, path: str) -> PixelSpacing | None:
    """Spacing of the ultrasound region that holds the image data."""
    region = max(ds[US_REGIONS].value, key=lambda r: _region_rank(r, ds))
    units = (region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection"))
    dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
    if units != (_UNITS_CM, _UNITS_CM) or not dx or not dy:
        log.info(
            "%s: the ultrasound image region has physical units %s (3 = cm is needed) and "
            "deltas %s, %s; no pixel spacing",
            path,
            units,
            dx,
            dy,
        )
        return None
    # PhysicalDeltaX/Y are cm per pixel; rows run along Y.
    return PixelSpacing(abs(float(dy)) * 10.0, abs(float(dx)) * 10.0, US_REGIONS)


def _region_rank(region: Dataset, ds: Dataset) -> tuple[bool, bool, int]:
    """Sort key: tissue data first, then containing the image centre, then area."""
    x0, y0 = region.get("RegionLocationMinX0", 0), region.get("RegionLocationMinY0", 0)
    x1, y1 = region.get("RegionLocationMaxX1", 0), region.get("RegionLocationMaxY1", 0)
    cx, cy = (int(ds.get("Columns", 0)) - 1) / 2, (int(ds.get("Rows", 0)) - 1) / 2
    tissue = region.get("RegionDataType") == _DATA_TYPE_TISSUE
    contains_centre = x0 <= cx <= x1 and y0 <= cy <= y1
    return tissue, contains_centre, max(0, x1 - x0 + 1) * max(0, y1 - y0 + 1)
