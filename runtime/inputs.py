"""Turn what a caller passes (RGB array, file path, loaded frame) into one `LoadedImage`."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from citrus_edge.bundle import sha256_file
from citrus_edge.calib_data.load import LoadedImage, load_image
from citrus_edge.calib_data.spacing import Calibration, PixelSpacing
from citrus_edge.result import InputRecord

from .runtime_errors import InputImageError

ImageInput = np.ndarray | str | os.PathLike | LoadedImage


def from_array(rgb: np.ndarray, spacing: PixelSpacing | None = None) -> LoadedImage:
    """An in-memory RGB uint8 [H, W, 3] image (a cart's capture), with the pixel spacing the
    caller states for the whole frame, or none (then nothing is measured in mm)."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3:
        raise InputImageError(
            f"expected an RGB uint8 array [H, W, 3], got {getattr(rgb, 'dtype', type(rgb))} "
            f"{getattr(rgb, 'shape', '')}; convert grey images with np.repeat(x[..., None], 3, -1)"
        )
    if rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise InputImageError(f"expected an RGB uint8 array [H, W, 3], got shape {rgb.shape}")
    if spacing is not None and not isinstance(spacing, PixelSpacing):
        raise InputImageError(
            f"spacing must be a PixelSpacing(row_mm, col_mm), got {type(spacing).__name__}; "
            "build one with citrus_edge.calib_data.spacing.PixelSpacing"
        )
    calibration = None if spacing is None else Calibration.whole_image(spacing)
    return LoadedImage(np.ascontiguousarray(rgb), "", 1, 0, spacing, "", calibration)


def load_input(
    image: ImageInput, frame: int = 0, spacing: PixelSpacing | None = None
) -> LoadedImage:
    """A file is read with `calib_data.load.load_image` (DICOM spacing kept); arrays and
    `LoadedImage`s are taken as they are, and then `frame` must be 0 (or the image's own).
    `spacing` is for arrays only: a file or a `LoadedImage` carries its own calibration."""
    if spacing is not None and not isinstance(image, np.ndarray):
        raise InputImageError(
            "a spacing was passed with a file or a LoadedImage, which carry their own "
            "calibration; pass spacing only with an in-memory RGB array"
        )
    if isinstance(image, LoadedImage):
        if frame not in (0, image.frame):
            raise InputImageError(f"frame {frame} asked for an already loaded frame {image.frame}")
        return image
    if isinstance(image, np.ndarray):
        if frame != 0:
            raise InputImageError(f"frame {frame} asked for a single in-memory image")
        return from_array(image, spacing)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, frame)
    raise InputImageError(
        f"expected an RGB uint8 array, a path or a LoadedImage, got {type(image).__name__}"
    )


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(Path(path))  # cached per (path, mtime, size): a cine is hashed once


def input_record(image: LoadedImage) -> InputRecord:
    """Where `image` came from: its file's path and sha256 and the frame (None for pixels)."""
    if not image.path:
        return InputRecord(None, None, image.frame)
    st = os.stat(image.path)
    return InputRecord(
        image.path, _file_sha256(image.path, st.st_mtime_ns, st.st_size), image.frame
    )
