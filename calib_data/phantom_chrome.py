"""Drawing the surroundings of an ultrasound display onto a screen-like phantom.

Everything is drawn into a `Layer` (colour + coverage) that is composited over the canvas at
the end, so the screen knows exactly which pixels its display covered (`Layer.coverage`):
the tests check that every other pixel of a lesion is the lesion's own.
Text uses Pillow's bundled default font (FreeType, identical on every machine with this Pillow).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


class Layer:
    """An RGB drawing with per-pixel opacity over an [H, W] canvas."""

    def __init__(self, height: int, width: int):
        self.rgb = np.zeros((height, width, 3), dtype=np.float32)
        self.alpha = np.zeros((height, width), dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.alpha.shape

    def paint(self, where: np.ndarray, colour: Colour | np.ndarray, alpha=1.0) -> None:
        """Paint `colour` ([3] or [N, 3] for the N selected pixels) where `where` ([H, W] bool
        or an index tuple) selects, at opacity `alpha` (scalar or [N]), over what the layer
        already holds (painter's order: later strokes on top)."""
        a = np.broadcast_to(np.asarray(alpha, np.float32), self.alpha[where].shape)
        col = np.broadcast_to(np.asarray(colour, np.float32), self.rgb[where].shape)
        old_a = self.alpha[where]
        new_a = a + old_a * (1 - a)
        mixed = col * a[:, None] + self.rgb[where] * (old_a * (1 - a))[:, None]
        self.rgb[where] = mixed / np.maximum(new_a, 1e-6)[:, None]
        self.alpha[where] = new_a

    def points(self, ys, xs, colour: Colour) -> None:
        """Opaque pixels at integer (row, column) pairs; those off the canvas are skipped."""
        ys, xs = np.asarray(ys, np.int64).ravel(), np.asarray(xs, np.int64).ravel()
        h, w = self.shape
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        self.paint((ys[ok], xs[ok]), colour)

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: Colour, alpha=1.0) -> None:
        """A filled rectangle [x0, x1) x [y0, y1), clipped to the canvas."""
        h, w = self.shape
        x0, x1, y0, y1 = max(0, x0), min(w, x1), max(0, y0), min(h, y1)
        if x1 > x0 and y1 > y0:
            where = np.zeros(self.shape, bool)
            where[y0:y1, x0:x1] = True
            self.paint(where, colour, alpha)

    def line(self, p0, p1, colour: Colour, dash: int = 0) -> None:
        """A one-pixel line from (row, col) p0 to p1; every `dash`-th pixel gap when dash > 0."""
        n = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 1
        t = np.linspace(0, 1, n)
        ys = np.rint(p0[0] + t * (p1[0] - p0[0])).astype(np.int64)
        xs = np.rint(p0[1] + t * (p1[1] - p0[1])).astype(np.int64)
        if dash > 0:
            keep = (np.arange(n) // dash) % 2 == 0
            ys, xs = ys[keep], xs[keep]
        self.points(ys, xs, colour)

    def cross(self, y: int, x: int, arm: int, colour: Colour) -> None:
        """A caliper '+' centred on (y, x)."""
        r = np.arange(-arm, arm + 1)
        self.points(np.full_like(r, y), x + r, colour)
        self.points(y + r, np.full_like(r, x), colour)

    def text(self, x: int, y: int, s: str, colour: Colour, size: int = 9) -> int:
        """Antialiased text with its top-left at (x, y); returns its width in pixels."""
        font = _font(size)
        left, top, right, bottom = font.getbbox(s)
        w, h = max(1, right - left), max(1, bottom - top)
        glyphs = Image.new("L", (w, h), 0)
        ImageDraw.Draw(glyphs).text((-left, -top), s, fill=255, font=font)
        a = np.asarray(glyphs, np.float32) / 255.0
        H, W = self.shape
        ys, xs = np.nonzero(a > 0)
        ok = (ys + y >= 0) & (ys + y < H) & (xs + x >= 0) & (xs + x < W)
        ys, xs = ys[ok], xs[ok]
        self.paint((ys + y, xs + x), colour, a[ys, xs])
        return w

    def bar(self, x: int, y: int, column: np.ndarray, width: int) -> None:
        """A vertical colour bar: `column` [N, 3] from top to bottom, `width` pixels wide."""
        n = len(column)
        h, w = self.shape
        for k in range(n):
            if 0 <= y + k < h:
                sel = (np.full(width, y + k), np.clip(np.arange(x, x + width), 0, w - 1))
                self.paint(sel, column[k])

    def composite(self, canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`canvas` [H, W, 3] uint8 under the layer, and the covered pixels [H, W] bool."""
        a = self.alpha[..., None]
        out = canvas.astype(np.float32) * (1 - a) + self.rgb * a
        return np.rint(out).astype(np.uint8), self.alpha > 0
