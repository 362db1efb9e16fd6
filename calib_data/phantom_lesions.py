"""Lesion outlines for the phantom: star-shaped radial functions, placement, masks, shadows.

An outline is a radius function rho(phi) about a centre: an ellipse, optionally modulated by low
harmonics (lobulation) and sharp spikes (spiculation). A pixel belongs to the lesion when its
centre is within rho of the lesion centre, so the mask, its soft edge and a surrounding halo all
come from one distance comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .phantom_bmode import Polar, Sector, gaussian_blur, inside_sector

_SAMPLES = np.linspace(0, 2 * np.pi, 720, endpoint=False)  # outline sampling for checks
_SPIKE_POWER = 40  # cos^p: spike angular half-width about 1/sqrt(p) rad


@dataclass(frozen=True)
class Outline:
    """A star-shaped lesion outline in pixel coordinates (x right, y down)."""

    cx: float
    cy: float
    a: float  # semi-axis along `angle` (pixels)
    b: float  # the other semi-axis (pixels)
    angle: float  # radians, from the x axis
    harmonics: np.ndarray  # [K, 3] order, relative amplitude, phase
    spikes: np.ndarray  # [J, 2] direction (radians), amplitude relative to `a`

    def radius(self, phi: np.ndarray) -> np.ndarray:
        """rho(phi) in pixels for directions `phi` (radians, atan2(dy, dx))."""
        p = phi - self.angle
        rho = self.a * self.b / np.sqrt((self.b * np.cos(p)) ** 2 + (self.a * np.sin(p)) ** 2)
        for k, amp, phase in self.harmonics:
            rho = rho * (1 + amp * np.cos(k * phi + phase))
        for psi, amp in self.spikes:
            rho = rho + self.a * amp * np.maximum(0.0, np.cos(phi - psi)) ** _SPIKE_POWER
        return rho

    def max_radius(self) -> float:
        return float(self.radius(_SAMPLES).max())

    def moved(self, cx: float, cy: float) -> Outline:
        return Outline(cx, cy, self.a, self.b, self.angle, self.harmonics, self.spikes)

    def scaled(self, factor: float) -> Outline:
        a, b = self.a * factor, self.b * factor
        return Outline(self.cx, self.cy, a, b, self.angle, self.harmonics, self.spikes)


def draw_outline(rng: np.random.Generator, shape: str, diameter_px: float) -> Outline:
    """An outline of `shape` ('round' | 'oval' | 'irregular') at the origin; long axis about
    `diameter_px` (spicules of irregular ones may reach a little further)."""
    a = diameter_px / 2
    no_harmonics, no_spikes = np.zeros((0, 3)), np.zeros((0, 2))
    if shape == "round":
        return Outline(
            0, 0, a, a * rng.uniform(0.92, 1.0), rng.uniform(0, np.pi), no_harmonics, no_spikes
        )
    if shape == "oval":
        ratio, tilt = rng.uniform(0.5, 0.72), rng.uniform(-0.45, 0.45)  # mostly wider than tall
        return Outline(0, 0, a, a * ratio, tilt, no_harmonics, no_spikes)
    if shape != "irregular":
        raise ValueError(f"unknown lesion shape {shape!r}")
    orders = np.arange(2, 7, dtype=np.float64)
    harmonics = np.stack(
        [orders, rng.uniform(0.0, 0.1, orders.size), rng.uniform(0, 2 * np.pi, orders.size)], 1
    )
    n_spikes = int(rng.integers(5, 11))
    spikes = np.stack([rng.uniform(0, 2 * np.pi, n_spikes), rng.uniform(0.2, 0.45, n_spikes)], 1)
    core = 0.8 * a
    return Outline(
        0, 0, core, core * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), harmonics, spikes
    )


def place(
    rng: np.random.Generator,
    outline: Outline,
    sector: Sector,
    placed: list[Outline],
    shape_hw: tuple[int, int],
    gap: float,
    tries: int = 60,
) -> Outline | None:
    """Move `outline` to a random spot inside the fan, `gap` pixels clear of `placed` outlines.

    Separation is tested on bounding circles, containment on the sampled outline, so a placed
    lesion never touches another or the fan's edge. Returns None after `tries` misses.
    """
    height, width = shape_hw
    rho = outline.radius(_SAMPLES) + gap  # [720]
    clear = np.array([rho.max() + o.max_radius() for o in placed])  # [P] centre distances
    others = np.array([(o.cx, o.cy) for o in placed]).reshape(-1, 2)  # [P, 2]
    for _ in range(tries):
        cx, cy = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
        if np.any(np.hypot(cx - others[:, 0], cy - others[:, 1]) < clear):
            continue
        xs, ys = cx + rho * np.cos(_SAMPLES), cy + rho * np.sin(_SAMPLES)
        if inside_sector(sector, xs, ys, margin=1.0):
            return outline.moved(cx, cy)
    return None


@dataclass(frozen=True)
class Rendered:
    """Full-size rasters of one lesion."""

    mask: np.ndarray  # [H, W] bool, pixel centres inside the outline
    soft: np.ndarray  # [H, W] float64 0..1, mask with a soft edge of `edge` pixels
    halo: np.ndarray  # [H, W] float64 0..1, a band just outside the outline


def render(outline: Outline, shape_hw: tuple[int, int], edge: float, halo_px: float) -> Rendered:
    """Rasterise `outline` on its bounding window only, then paste into full-size arrays."""
    height, width = shape_hw
    reach = outline.max_radius() + halo_px + edge + 2
    y0, y1 = max(0, int(outline.cy - reach)), min(height, int(outline.cy + reach) + 2)
    x0, x1 = max(0, int(outline.cx - reach)), min(width, int(outline.cx + reach) + 2)
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float64)  # [h, w] window
    dx, dy = x - outline.cx, y - outline.cy
    dist, rho = np.hypot(dx, dy), outline.radius(np.arctan2(dy, dx))
    mask, soft, halo = np.zeros(shape_hw, bool), np.zeros(shape_hw), np.zeros(shape_hw)
    mask[y0:y1, x0:x1] = dist <= rho
    soft[y0:y1, x0:x1] = np.clip((rho - dist) / edge + 0.5, 0, 1)
    if halo_px > 0:
        band = np.minimum(dist - rho, rho + halo_px - dist) + 0.5  # > 0 within the band
        halo[y0:y1, x0:x1] = np.clip(band, 0, 1)
    return Rendered(mask, soft, halo)


def posterior_factor(
    polar: Polar, sector: Sector, mask: np.ndarray, gain: float, fade_px: float
) -> np.ndarray:
    """Multiplier for the tissue behind `mask` along the beam (<1 shadow, >1 enhancement).

    Beams are radial lines from the apex; the effect starts at the far edge of the lesion in
    each beam and fades with depth. Returns [H, W] float64, 1 elsewhere.
    """
    n_bins = max(8, int(2 * sector.half_angle * sector.r0))  # about one pixel per bin at r0
    pos = (polar.theta + sector.half_angle) / (2 * sector.half_angle) * n_bins
    beam = np.clip(pos.astype(np.int64), 0, n_bins - 1)  # [H, W]
    far = np.full(n_bins, -np.inf)
    np.maximum.at(far, beam[mask], polar.r[mask])
    behind_by = polar.r - far[beam]  # [H, W], -inf..inf
    behind = polar.inside & (behind_by > 0)
    weight = np.where(behind, np.exp(-np.where(behind, behind_by, 0) / fade_px), 0.0)
    weight = gaussian_blur(weight, 1.0, 2.0) * polar.inside
    return 1 + (gain - 1) * weight
