"""Images that are not ultrasound, for teaching the model to say so.

A model that has only seen ultrasound answers any picture as if it were one (a chest X-ray got
"Sure, it [SEG]." and a confident mask). Two offline sources:

- pydicom's own test images of other modalities (CT, MR, NM, a SEG mask, secondary captures of
  text and test patterns: `PYDICOM_NON_US`), read with the project's own loader and varied by a
  random crop, flip, contrast curve and size;
- procedural pictures: a chest-radiograph-like image, an axial CT-like slice, a natural-like
  landscape, a page of text and a test pattern of shapes (`SYNTHETIC_KINDS`).

Every task prompt has the one answer `NOT_US_ANSWER`; a record has no masks, boxes or lesions.
An image is a pure function of its seed (`np.random.default_rng([seed, NON_US_TAG])`).
"""

from __future__ import annotations

import functools
import logging
import warnings

import numpy as np
from PIL import Image, ImageDraw

from .phantom_bmode import gaussian_blur
from .phantom_chrome import Layer

log = logging.getLogger(__name__)

NON_US_TAG = 0x0A05
# pydicom test files (pydicom.data, shipped in its wheel) that are other modalities, one per
# distinct picture; the MR_small variants (RLE, big-endian, ...) hold the same pixels.
PYDICOM_NON_US = (
    "CT_small.dcm",  # CT (pydicom.examples.ct)
    "693_J2KI.dcm",  # CT, head
    "J2K_pixelrep_mismatch.dcm",  # CT, head
    "MR_small.dcm",  # MR (pydicom.examples.mr)
    "examples_overlay.dcm",  # MR, abdomen (pydicom.examples.overlay)
    "JPEG2000.dcm",  # NM
    "liver_1frame.dcm",  # SEG, a binary mask
    "GDCMJ2K_TextGBR.dcm",  # secondary capture: coloured text
    "image_dfl.dcm",  # secondary capture: a test pattern
    "SC_rgb_dcmtk_+eb+cr.dcm",  # secondary capture: colour bars
)
SYNTHETIC_KINDS = ("xray", "ct", "natural", "document", "shapes")
PYDICOM_SHARE = 0.4  # of non-US images, the share drawn from pydicom's files


@functools.lru_cache(maxsize=1)
def pydicom_non_us() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, RGB uint8 [H, W, 3]) of each `PYDICOM_NON_US` file this pydicom holds and the
    loader reads; a missing or unreadable one is logged and left out."""
    from pydicom.data import get_testdata_file

    from . import load

    found = []
    # These files state no ultrasound spacing, which the loader logs; nothing is measured here.
    quiet = logging.getLogger(load.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for name in PYDICOM_NON_US:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    path = get_testdata_file(name, download=False)
                    if path is None:
                        raise FileNotFoundError(name)
                    found.append((name, load.load_image(path).pixels))
            except (OSError, ValueError) as e:
                log.warning("pydicom test file %s left out of the non-US images: %s", name, e)
    finally:
        quiet.setLevel(level)
    return tuple(found)


def non_us_image(seed: int) -> tuple[np.ndarray, str]:
    """The non-ultrasound image of `seed`: RGB uint8 [H, W, 3] and where it came from
    ("pydicom:<file>" or "synthetic:<kind>")."""
    rng = np.random.default_rng([seed, NON_US_TAG])
    sources = pydicom_non_us()
    if sources and rng.uniform() < PYDICOM_SHARE:
        name, rgb = sources[int(rng.integers(len(sources)))]
        return _vary(rng, rgb), f"pydicom:{name}"
    kind = SYNTHETIC_KINDS[int(rng.integers(len(SYNTHETIC_KINDS)))]
    h, w = int(rng.integers(192, 352)), int(rng.integers(192, 384))
    return _SYNTHETIC[kind](rng, h, w), f"synthetic:{kind}"


def _vary(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """A random crop (70-100 % a side), flip, gamma, and a size of 128-384 px a side."""
    h, w = rgb.shape[:2]
    ch, cw = max(2, int(h * rng.uniform(0.7, 1.0))), max(2, int(w * rng.uniform(0.7, 1.0)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = rgb[y0 : y0 + ch, x0 : x0 + cw]
    if rng.uniform() < 0.5:
        out = out[:, ::-1]
    out = 255 * (out / 255.0) ** rng.uniform(0.7, 1.4)
    scale = rng.uniform(128, 384) / max(ch, cw)
    size = (max(32, int(cw * scale)), max(32, int(ch * scale)))
    return np.asarray(Image.fromarray(np.rint(out).astype(np.uint8)).resize(size, Image.BILINEAR))


def _grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    n = gaussian_blur(rng.standard_normal((h, w)), sigma, sigma, wrap=True)
    return n / (n.std() + 1e-12)


def _xray(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Bright body, two dark lungs crossed by rib arcs, a bright spine and heart, vignetting."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    body = ((x - 0.5) / 0.47) ** 2 + ((y - 0.55) / 0.6) ** 2 < 1
    img = np.where(body, 0.75, 0.08)
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.17, 0.22)
        lung = ((x - cx) / rng.uniform(0.13, 0.17)) ** 2 + (
            (y - 0.48) / rng.uniform(0.3, 0.36)
        ) ** 2
        img = np.where(lung < 1, 0.25 + 0.1 * np.clip(lung, 0, 1), img)
        for k in range(int(rng.integers(6, 10))):  # ribs: arcs across each lung
            yc = 0.2 + 0.075 * k
            arc = yc + 0.06 * ((x - cx) * side + 0.1)  # ribs fall away from the spine
            img = img + 0.18 * np.exp(-(((y - arc) / 0.012) ** 2)) * (lung < 1.2)
    img = img + 0.35 * np.exp(-(((x - 0.5) / 0.05) ** 2)) * body  # spine / mediastinum
    heart = ((x - 0.55) / 0.13) ** 2 + ((y - 0.62) / 0.12) ** 2 < 1
    img = np.where(heart, np.maximum(img, 0.7), img)
    img = gaussian_blur(img, 1.5, 1.5) + 0.03 * _noise(rng, h, w, 1.0)
    img = img * (1 - 0.3 * ((x - 0.5) ** 2 + (y - 0.5) ** 2))
    return _grey(np.clip(img, 0, 1))


def _ct(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An axial slice: round body in soft-tissue grey, a fat rim, organs, a bright vertebra."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    r = ((x - 0.5) / rng.uniform(0.38, 0.46)) ** 2 + ((y - 0.5) / rng.uniform(0.3, 0.4)) ** 2
    img = np.where(r < 1, 0.45, 0.0) + np.where((r > 0.8) & (r < 1), -0.12, 0.0)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy, a = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.15)
        organ = ((x - cx) / a) ** 2 + ((y - cy) / (a * rng.uniform(0.6, 1.4))) ** 2 < 1
        img = np.where(organ & (r < 0.8), rng.uniform(0.3, 0.65), img)
    vertebra = ((x - 0.5) / 0.06) ** 2 + ((y - 0.72) / 0.06) ** 2
    img = np.where(vertebra < 1, 0.95, img)
    img = img + 0.04 * _noise(rng, h, w, 0.8) * (r < 1)
    return _grey(np.clip(img, 0, 1))


def _natural(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sky gradient over hills of fractal texture, a sun, colour."""
    y = np.linspace(0, 1, h)[:, None]
    sky = np.stack([0.4 + 0.3 * y, 0.6 + 0.25 * y, 0.95 - 0.1 * y], -1) * np.ones((1, w, 1))
    horizon = rng.uniform(0.35, 0.65) + 0.08 * gaussian_blur(rng.standard_normal((1, w)), 0.1, 20)
    ground_col = np.array([rng.uniform(0.2, 0.5), rng.uniform(0.4, 0.7), rng.uniform(0.1, 0.3)])
    texture = 0.15 * _noise(rng, h, w, 2.0) + 0.1 * _noise(rng, h, w, 8.0)
    ground = ground_col * (1 + texture[..., None])
    img = np.where((y > horizon)[..., None], ground, sky)
    sy, sx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.9) * w
    yy, xx = np.mgrid[0:h, 0:w]
    sun = np.hypot(yy - sy, xx - sx) < rng.uniform(8, 20)
    img = np.where(sun[..., None], np.array([1.0, 0.95, 0.7]), img)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _document(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A page of text lines (a scanned form or a screenshot)."""
    layer = Layer(h, w)
    words = ("Report", "Patient", "Date", "Findings", "Normal", "Total", "Page", "Item", "Note")
    y = int(rng.integers(4, 16))
    while y < h - 12:
        line = " ".join(words[i] for i in rng.integers(0, len(words), int(rng.integers(2, 7))))
        layer.text(int(rng.integers(4, 20)), y, line, (20, 20, 30), int(rng.integers(9, 13)))
        y += int(rng.integers(13, 22))
    paper = np.full((h, w, 3), int(rng.integers(225, 256)), np.uint8)
    return layer.composite(paper)[0]


def _shapes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random filled rectangles and ellipses in flat colours on a plain background."""
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.rectangle if rng.uniform() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=colour)
    return np.asarray(im)


_SYNTHETIC = {"xray": _xray, "ct": _ct, "natural": _natural, "document": _document}
_SYNTHETIC["shapes"] = _shapes
