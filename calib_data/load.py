"""Load any DICOM or ordinary image as RGB uint8 with its physical pixel spacing.

The format is detected from the content, never the extension: the 'DICM' marker after the
128-byte preamble means DICOM; otherwise Pillow is tried (PNG, JPEG, BMP, TIFF, ...); a file
Pillow cannot read is read as DICOM without a meta header (pydicom `force=True`), accepted only
when it holds pixel data. Every failure is a typed `ImageLoadError` naming the file.

Sizes are checked against `max_pixels` before anything is decoded.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .data_errors import (
    FrameOutOfRangeError,
    ImageLoadError,
    ImageTooLargeError,
    InvalidPixelValuesError,
    NotDicomError,
    UnreadableImageError,
)
from .dicom_pixels import (
    PIXEL_KEYWORDS,
    check_dicom,
    check_native_length,
    choose_plugins,
    decode_frame,
)
from .spacing import Calibration, PixelSpacing, dicom_calibration, dicom_spacing

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
PLAIN_MODALITY = ""  # modality reported for non-DICOM images

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Calibration",
    "LoadedImage",
    "PixelSpacing",
    "is_dicom",
    "iter_frames",
    "load_image",
]


@dataclass(frozen=True)
class LoadedImage:
    """One frame of an image, ready for preprocessing.

    `spacing` is the one pixel size the file states for its image (see
    `spacing.dicom_spacing`); measurements use `calibration` instead, which knows where in the
    image each stated pixel size holds and what was refused (`spacing.dicom_calibration`). An
    image built with a `spacing` and no `calibration` (an in-memory frame) is calibrated by
    that spacing over the whole image (`calibration_of`).
    """

    pixels: np.ndarray  # [H, W, 3] uint8 RGB
    modality: str  # DICOM Modality ("US", "CT", ...); "" where none is stated (ordinary images)
    n_frames: int
    frame: int
    spacing: PixelSpacing | None  # None when the file states none; never guessed
    path: str
    calibration: Calibration | None = None  # where each pixel size holds (None: see spacing)
    dicom: bool = False  # read from a DICOM file

    def calibration_of(self) -> Calibration | None:
        """`calibration`, else the whole image at `spacing`, else None (nothing to measure by)."""
        if self.calibration is not None:
            return self.calibration
        return None if self.spacing is None else Calibration.whole_image(self.spacing)


def is_dicom(path: str | os.PathLike) -> bool:
    """True when the file carries the DICOM 'DICM' marker after its 128-byte preamble."""
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def load_image(
    path: str | os.PathLike, frame: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> LoadedImage:
    """Load frame `frame` of a DICOM or ordinary image file as RGB uint8.

    Raises an `ImageLoadError` subclass (see `calib_data.errors`) naming the file and the fix.
    """
    source = _open(path, max_pixels)
    _check_frame(source, frame)
    return source.frame(frame)


def iter_frames(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[LoadedImage]:
    """Yield every frame of the file in order, decoding one frame at a time."""
    source = _open(path, max_pixels)
    for index in range(source.n_frames):
        yield source.frame(index)


def _check_frame(source: _DicomSource | _PillowSource, frame: int) -> None:
    if not 0 <= frame < source.n_frames:
        raise FrameOutOfRangeError(
            f"{source.path}: frame {frame} requested but the file has {source.n_frames} "
            f"frame(s); use an index from 0 to {source.n_frames - 1}"
        )


def _open(path: str | os.PathLike, max_pixels: int) -> _DicomSource | _PillowSource:
    name = os.fspath(path)
    if not Path(name).is_file():
        raise UnreadableImageError(f"{name}: no such file; check the path")
    if is_dicom(name):
        return _DicomSource(_read_dicom(name, force=False), name, max_pixels)
    try:
        return _PillowSource(name, max_pixels)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}; downsample the image") from e
    except (UnidentifiedImageError, OSError):
        pass
    ds = _forced_dicom(name)
    if ds is None:
        raise NotDicomError(
            f"{name}: neither DICOM with pixel data nor an image format Pillow reads (PNG, "
            "JPEG, BMP, TIFF, ...); check that the file is an image and was copied completely"
        )
    return _DicomSource(ds, name, max_pixels)


def _read_dicom(path: str, force: bool) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd value; errors matter
            return pydicom.dcmread(path, force=force)
    except Exception as e:  # pydicom raises many types on damaged headers
        raise UnreadableImageError(
            f"{path}: the DICOM header cannot be parsed ({type(e).__name__}: {e}); the file is "
            "damaged, copy it again from the source"
        ) from e


def _forced_dicom(path: str) -> Dataset | None:
    """A DICOM dataset without meta header, or None when the file is not one."""
    try:
        ds = _read_dicom(path, force=True)
    except (UnreadableImageError, InvalidDicomError):
        return None
    if not any(k in ds for k in PIXEL_KEYWORDS) or "Rows" not in ds:
        return None
    return ds


class _DicomSource:
    """A read DICOM dataset, validated, decoding frames on demand."""

    def __init__(self, ds: Dataset, path: str, max_pixels: int) -> None:
        self.ds, self.path = ds, path
        self.n_frames = check_dicom(ds, path, max_pixels)
        self.plugins = choose_plugins(ds, path)
        if self.plugins == ("",):  # uncompressed: the length is known before decoding
            check_native_length(ds, path)
        self.spacing = dicom_spacing(ds, path)
        self.calibration = dicom_calibration(ds, path)
        self.modality = str(ds.get("Modality", "") or "")

    def frame(self, index: int) -> LoadedImage:
        pixels = decode_frame(self.ds, index, self.plugins, self.path)
        return LoadedImage(
            pixels,
            self.modality,
            self.n_frames,
            index,
            self.spacing,
            self.path,
            self.calibration,
            dicom=True,
        )


class _PillowSource:
    """An ordinary image file opened lazily by Pillow (header read, pixels not yet decoded)."""

    def __init__(self, path: str, max_pixels: int) -> None:
        self.path = path
        with Image.open(path) as im:
            width, height = im.size
            self.n_frames = int(getattr(im, "n_frames", 1))
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{path}: {height} x {width} = {width * height} pixels exceeds max_pixels="
                f"{max_pixels}; raise max_pixels if the memory allows, or downsample the image"
            )
        log.debug("%s: ordinary image, no pixel spacing", path)

    def frame(self, index: int) -> LoadedImage:
        try:
            with Image.open(self.path) as im:
                im.seek(index)
                pixels = _pil_to_rgb(im, self.path)
        except ImageLoadError:
            raise
        except (OSError, EOFError, ValueError, SyntaxError) as e:
            raise UnreadableImageError(
                f"{self.path}: frame {index} cannot be decoded ({type(e).__name__}: {e}); the "
                "file is damaged, copy it again from the source"
            ) from e
        return LoadedImage(pixels, PLAIN_MODALITY, self.n_frames, index, None, self.path)


def _pil_to_rgb(im: Image.Image, path: str) -> np.ndarray:
    """Pillow image to [H, W, 3] uint8; 16-bit grey keeps its high byte, 32-bit is stretched."""
    if im.mode.startswith("I;16"):
        grey = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)  # [H, W]
    elif im.mode in ("I", "F"):
        values = np.asarray(im).astype(np.float64)  # [H, W]
        if not np.isfinite(values).all():
            raise InvalidPixelValuesError(f"{path}: NaN or infinite pixel values; re-export it")
        lo, hi = values.min(), values.max()
        grey = np.zeros(values.shape, np.uint8) if hi == lo else (values - lo) * 255 / (hi - lo)
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    else:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return np.repeat(grey[..., None], 3, axis=-1)
