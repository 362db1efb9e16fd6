"""Physical pixel spacing of a DICOM image, read from the attributes and never invented.

Two views of the same attributes:

- `dicom_calibration` (what measurements use): every place of the image with a stated pixel
  size. An ultrasound file's `SequenceOfUltrasoundRegions` gives one `CalibratedRegion` per
  region whose PhysicalUnitsX/YDirection are both 3 (cm) — a dual-pane image has two, each
  valid only inside its own pixel bounds; regions in any other unit (none, percent, dB, seconds,
  Hz, ...) are not spatial and are skipped. Without ultrasound regions, `PixelSpacing` (row,
  column in mm; top level or the shared functional groups of an enhanced multi-frame object),
  else `ImagerPixelSpacing` (at the detector, projection radiography), covers the whole image.
- `dicom_spacing` (one number pair for the image, as `LoadedImage.spacing`): the ultrasound
  region holding the image data (tissue data type first, then the region containing the image
  centre, then the largest one), else `PixelSpacing`, else `ImagerPixelSpacing`.

Implausible calibration is refused, never used: a pixel size that is not a number, <= 0, or above
`MAX_MM_PER_PIXEL` (10 mm per pixel: coarser than any ultrasound, CT, MR or radiograph pixel; a
1e6 cm/pixel delta would otherwise print 1e17 mm²), and an ultrasound region whose bounds lie
beyond the image (the image was cropped or resized after the scanner calibrated it, so which
pixel size its pixels have is unknown). `Calibration.refused` says what was refused and why.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

US_REGIONS = "SequenceOfUltrasoundRegions"
PIXEL_SPACING = "PixelSpacing"
IMAGER_PIXEL_SPACING = "ImagerPixelSpacing"
CALLER = "caller"  # stated by the caller with an in-memory frame (a cart's own calibration)
SPACING_SOURCES = (US_REGIONS, PIXEL_SPACING, IMAGER_PIXEL_SPACING, CALLER)
MAX_MM_PER_PIXEL = 10.0  # see the module docstring

_UNITS_CM = 3  # PS3.3 C.8.5.5.1.15: 3 = cm
_DATA_TYPE_TISSUE = 1  # PS3.3 C.8.5.5.1.2: 1 = tissue


class ImplausibleSpacingError(ValueError):
    """A pixel size that is not a positive number of at most MAX_MM_PER_PIXEL mm."""


@dataclass(frozen=True)
class PixelSpacing:
    """Size of one pixel in mm along rows (vertical) and columns (horizontal).

    Raises `ImplausibleSpacingError` unless 0 < row_mm, col_mm <= MAX_MM_PER_PIXEL.
    """

    row_mm: float
    col_mm: float
    source: str = CALLER  # one of SPACING_SOURCES

    def __post_init__(self) -> None:
        if self.source not in SPACING_SOURCES:
            raise ValueError(f"spacing source {self.source!r} is not one of {SPACING_SOURCES}")
        for name in ("row_mm", "col_mm"):
            value = getattr(self, name)
            if not _plausible(value):
                raise ImplausibleSpacingError(
                    f"pixel spacing {name}={value!r} is not a plausible pixel size: it must be a "
                    f"number > 0 and <= {MAX_MM_PER_PIXEL} mm; check the calibration's units"
                )
            object.__setattr__(self, name, float(value))


def _plausible(value: object) -> bool:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool) and math.isfinite(v) and 0 < v <= MAX_MM_PER_PIXEL


@dataclass(frozen=True)
class CalibratedRegion:
    """Pixels with one physical size: a rectangle (inclusive pixel bounds, clipped to the image)
    or, with `bounds` None, the whole image. `index` is the region's item number in
    SequenceOfUltrasoundRegions (None for whole-image spacing)."""

    spacing: PixelSpacing
    bounds: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) = (col, row, col, row)
    index: int | None = None

    @property
    def name(self) -> str:
        return "the whole image" if self.index is None else f"ultrasound region {self.index}"


@dataclass(frozen=True)
class Calibration:
    """Where an image states a pixel size, and what it states that was refused (one line each)."""

    regions: tuple[CalibratedRegion, ...] = ()
    refused: tuple[str, ...] = ()

    @classmethod
    def whole_image(cls, spacing: PixelSpacing) -> Calibration:
        return cls((CalibratedRegion(spacing),))


def dicom_calibration(ds: Dataset, path: str = "") -> Calibration:
    """Every calibrated region of `ds` (see the module docstring); empty when it states none."""
    if ds.get(US_REGIONS):
        found = [_us_region(r, i, ds) for i, r in enumerate(ds[US_REGIONS].value)]
        regions = tuple(r for r in found if isinstance(r, CalibratedRegion))
        refused = tuple(r for r in found if isinstance(r, str))
    else:
        regions, refused = (), ()
        for keyword in (PIXEL_SPACING, IMAGER_PIXEL_SPACING):
            value = _find(ds, keyword)
            if value is None:
                continue
            try:
                regions = (CalibratedRegion(_pair(value, keyword)),)
            except (ImplausibleSpacingError, TypeError, ValueError) as e:
                refused = (f"{keyword} {_show(value)} refused: {_reason(e)}",)
            break
    for line in refused:
        log.warning("%s: %s", path or "DICOM dataset", line)
    return Calibration(regions, refused)


def dicom_spacing(ds: Dataset, path: str = "") -> PixelSpacing | None:
    """The pixel spacing of `ds` from its attributes, or None (logged) when it has none or
    states an implausible one. Measurements use `dicom_calibration`, which also refuses
    ultrasound regions that do not fit the image."""
    if ds.get(US_REGIONS):
        return _region_spacing(ds, path)
    for keyword in (PIXEL_SPACING, IMAGER_PIXEL_SPACING):
        value = _find(ds, keyword)
        try:
            return _pair(value, keyword)
        except (ImplausibleSpacingError, TypeError, ValueError):
            continue
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


def _pair(value: object, source: str) -> PixelSpacing:
    """PixelSpacing of a (row, column) mm pair; raises TypeError/ValueError on anything else."""
    row, col = (float(v) for v in value)  # type: ignore[union-attr]
    return PixelSpacing(row, col, source)


def _us_region(region: Dataset, index: int, ds: Dataset) -> CalibratedRegion | str | None:
    """The region as calibration, a line saying why it is refused, or None (not spatial)."""
    units = (region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection"))
    if units != (_UNITS_CM, _UNITS_CM):
        return None
    name = f"ultrasound region {index}"
    dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
    spacing = _delta_spacing(dx, dy)
    if spacing is None:
        return (
            f"{name} refused: PhysicalDeltaX/Y {dx}, {dy} cm per pixel is not a pixel size "
            f"> 0 and <= {MAX_MM_PER_PIXEL} mm"
        )
    bounds = _region_bounds(region)
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if bounds is None:
        return f"{name} refused: it states no pixel bounds (RegionLocationMin/Max)"
    x0, y0, x1, y1 = bounds
    # One pixel past the last row / column is a common off-by-one of scanners: tolerated.
    if not (0 <= x0 <= x1 <= cols and 0 <= y0 <= y1 <= rows) or x0 >= cols or y0 >= rows:
        return (
            f"{name} refused: it spans x {x0}-{x1}, y {y0}-{y1}, beyond the {cols} x {rows} "
            "image; the image was cropped or resized after calibration, so its pixel size is "
            "unknown"
        )
    return CalibratedRegion(spacing, (x0, y0, min(x1, cols - 1), min(y1, rows - 1)), index)


def _delta_spacing(dx: object, dy: object) -> PixelSpacing | None:
    """PhysicalDeltaX/Y (cm per pixel) as a spacing; rows run along Y. None when implausible."""
    try:
        return PixelSpacing(float(dy) * 10.0, float(dx) * 10.0, US_REGIONS)  # type: ignore[arg-type]
    except (ImplausibleSpacingError, TypeError, ValueError):
        return None


def _region_bounds(region: Dataset) -> tuple[int, int, int, int] | None:
    keys = ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1")
    values = [region.get(k) for k in (*keys, "RegionLocationMaxY1")]
    if any(v is None for v in values):
        return None
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _show(value: object) -> str:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "[" + ", ".join(str(v) for v in value) + "]"  # type: ignore[union-attr]
    return str(value)


def _reason(error: Exception) -> str:
    if isinstance(error, ImplausibleSpacingError):
        return f"not a pixel size > 0 and <= {MAX_MM_PER_PIXEL} mm"
    return "not a pair of numbers"


def _region_spacing(ds: Dataset, path: str) -> PixelSpacing | None:
    """Spacing of the ultrasound region that holds the image data."""
    region = max(ds[US_REGIONS].value, key=lambda r: _region_rank(r, ds))
    units = (region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection"))
    dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
    spacing = _delta_spacing(dx, dy) if units == (_UNITS_CM, _UNITS_CM) else None
    if spacing is None:
        log.info(
            "%s: the ultrasound image region has physical units %s (3 = cm is needed) and "
            "deltas %s, %s cm (a pixel size > 0 and <= %s mm is needed); no pixel spacing",
            path,
            units,
            dx,
            dy,
            MAX_MM_PER_PIXEL,
        )
    return spacing


def _region_rank(region: Dataset, ds: Dataset) -> tuple[bool, bool, int]:
    """Sort key: tissue data first, then containing the image centre, then area."""
    x0, y0 = region.get("RegionLocationMinX0", 0), region.get("RegionLocationMinY0", 0)
    x1, y1 = region.get("RegionLocationMaxX1", 0), region.get("RegionLocationMaxY1", 0)
    cx, cy = (int(ds.get("Columns", 0)) - 1) / 2, (int(ds.get("Rows", 0)) - 1) / 2
    tissue = region.get("RegionDataType") == _DATA_TYPE_TISSUE
    contains_centre = x0 <= cx <= x1 and y0 <= cy <= y1
    return tissue, contains_centre, max(0, x1 - x0 + 1) * max(0, y1 - y0 + 1)
