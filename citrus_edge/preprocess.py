"""Image preprocessing shared by the PyTorch reference and the torch-free runtime.

Both branches of Citrus-V see the same RGB uint8 image:
- the Qwen2.5-VL branch resizes with `smart_resize` (sides multiples of 28, pixel budget) and
  cuts the image into flattened 14x14 patches, two temporal copies each, in merge-window order;
- the SAM2 branch resizes to a square input (no padding) and normalises with ImageNet mean/std.
Everything here is numpy + Pillow so the cart runs the exact code the reference runs.

Images whose short side is below `PreprocessConfig.factor` (28 px: one merged 2x2 patch of
14 px) or whose long side is over `MAX_ASPECT` times the short one are refused
(`ImageTooSmallError`) rather than upsampled: a 1x1 PNG would otherwise become a 336x336 blur of
one colour that the model answers anyway. 28 px is the smallest side that gives the vision
encoder one whole merged patch of real pixels (earlier transformers releases of Qwen2-VL's
`smart_resize` refused sides below it too); the aspect bound is Qwen2.5-VL's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# CLIP mean/std used by the Qwen2.5-VL image processor.
QWEN_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
QWEN_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# ImageNet mean/std used by SAM2.
SAM_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
SAM_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MAX_ASPECT = 200  # Qwen2.5-VL refuses images more elongated than this


class ImageTooSmallError(ValueError):
    """An image too small (short side) or too elongated (aspect ratio) to be read reliably."""


def check_image_size(height: int, width: int, min_side: int, source: str = "") -> None:
    """Raise `ImageTooSmallError` for a side below `min_side` pixels or an aspect over 200;
    the message starts with `source` (the input's path) when given."""
    name = f"{source}: image" if source else "image"
    if min(height, width) < min_side:
        raise ImageTooSmallError(
            f"{name} is {height}x{width} pixels (height x width): its short side is below the "
            f"minimum of {min_side} px the model can read; use the original, larger image"
        )
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise ImageTooSmallError(
            f"{name} is {height}x{width} pixels: its aspect ratio is over {MAX_ASPECT}, which "
            "Qwen2.5-VL cannot take; crop it to the region of interest"
        )


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 65535
) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule: both sides multiples of `factor`, area within [min, max] pixels.

    Returns (resized_height, resized_width). Aspect ratio is kept as closely as the grid allows.
    """
    check_image_size(height, width, 1)
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class PreprocessConfig:
    """What both branches need to turn an RGB image into model inputs."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 65535
    sam_image_size: int = 1024

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class QwenPixels:
    """Flattened patches for the Qwen2.5-VL vision encoder."""

    pixel_values: np.ndarray  # [grid_t * grid_h * grid_w, C * T * P * P] float32
    grid_thw: tuple[int, int, int]
    resized_hw: tuple[int, int]


def qwen_pixels(rgb: np.ndarray, cfg: PreprocessConfig) -> QwenPixels:
    """Resize (bicubic, as the Qwen2-VL image processor does) and patchify an RGB uint8 image.

    Raises `ImageTooSmallError` for a short side below `cfg.factor` (28 px) or an aspect over 200.
    """
    h, w = rgb.shape[:2]
    check_image_size(h, w, cfg.factor)
    rh, rw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.BICUBIC), dtype=np.float32)
    x = (resized / 255.0 - QWEN_MEAN) / QWEN_STD  # [H, W, C]
    x = np.transpose(x, (2, 0, 1))[None]  # [1, C, H, W]
    x = np.repeat(x, cfg.temporal_patch_size, axis=0)  # [T, C, H, W]
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = rh // p, rw // p
    c = x.shape[1]
    x = x.reshape(1, t, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, T, P, P]
    flat = x.reshape(gh * gw, c * t * p * p).astype(np.float32)
    return QwenPixels(flat, (1, gh, gw), (rh, rw))


def sam_pixels(rgb: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Resize to the square SAM2 input (bilinear, no padding), ImageNet-normalise. [1, 3, S, S].

    Refuses the images `qwen_pixels` refuses (`ImageTooSmallError`), e.g. a tracked video frame.
    """
    check_image_size(*rgb.shape[:2], cfg.factor)
    s = cfg.sam_image_size
    resized = np.asarray(Image.fromarray(rgb).resize((s, s), Image.BILINEAR), dtype=np.float32)
    x = (resized / 255.0 - SAM_MEAN) / SAM_STD
    return np.ascontiguousarray(np.transpose(x, (2, 0, 1))[None], dtype=np.float32)
