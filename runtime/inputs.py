"""Turn what a caller passes (RGB array, file path, loaded frame) into one `LoadedImage`."""

from __future__ import annotations

import os

import numpy as np

from citrus_edge.calib_data.load import LoadedImage, load_image

from .errors import InputImageError

ImageInput = np.ndarray | str | os.PathLike | LoadedImage


def from_array(rgb: np.ndarray) -> LoadedImage:
    """An in-memory RGB uint8 [H, W, 3] image; it carries no pixel spacing."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3:
        raise InputImageError(
            f"expected an RGB uint8 array [H, W, 3], got {getattr(rgb, 'dtype', type(rgb))} "
            f"{getattr(rgb, 'shape', '')}; convert grey images with np.repeat(x[..., None], 3, -1)"
        )
    if rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise InputImageError(f"expected an RGB uint8 array [H, W, 3], got shape {rgb.shape}")
    return LoadedImage(np.ascontiguousarray(rgb), "", 1, 0, None, "")


def load_input(image: ImageInput, frame: int = 0) -> LoadedImage:
    """A file is read with `calib_data.load.load_image` (DICOM spacing kept); arrays and
    `LoadedImage`s are taken as they are, and then `frame` must be 0 (or the image's own)."""
    if isinstance(image, LoadedImage):
        if frame not in (0, image.frame):
            raise InputImageError(f"frame {frame} asked for an already loaded frame {image.frame}")
        return image
    if isinstance(image, np.ndarray):
        if frame != 0:
            raise InputImageError(f"frame {frame} asked for a single in-memory image")
        return from_array(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, frame)
    raise InputImageError(
        f"expected an RGB uint8 array, a path or a LoadedImage, got {type(image).__name__}"
    )
