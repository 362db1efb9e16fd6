"""Building blocks of a procedural B-mode image: fan geometry, tissue layers, speckle, display.

Everything is vectorised numpy over the whole [H, W] grid; randomness comes only from the
`np.random.Generator` passed in, so a phantom is a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sector:
    """A curvilinear field of view: an annulus sector hanging from a virtual apex above row 0."""

    apex_x: float  # column of the apex (pixels)
    apex_y: float  # row of the apex, negative = above the image (pixels)
    r0: float  # probe-face radius (pixels from the apex)
    r1: float  # deepest radius (pixels from the apex)
    half_angle: float  # radians either side of the vertical


@dataclass(frozen=True)
class Polar:
    """Polar coordinates of every pixel centre about the sector apex."""

    r: np.ndarray  # [H, W] float32 distance from the apex (pixels)
    theta: np.ndarray  # [H, W] float32 angle from the vertical, positive to the right
    depth: np.ndarray  # [H, W] float32 (r - r0) / (r1 - r0): 0 at the probe, 1 at the bottom
    inside: np.ndarray  # [H, W] bool, pixel centre within the sector


def draw_sector(
    rng: np.random.Generator, height: int, width: int, apex_offset: tuple[float, float]
) -> Sector:
    """A fan whose depth spans the image and whose bottom corners nearly touch its sides."""
    a = rng.uniform(*apex_offset) * height  # apex this many pixels above row 0
    r0, r1 = a + 2.0, a + height - 3.0
    half_max = np.arcsin(min(1.0, (width / 2 - 3.0) / r1))
    half = rng.uniform(0.88, 1.0) * half_max
    return Sector((width - 1) / 2, -a, r0, r1, float(half))


def polar_grid(sector: Sector, height: int, width: int) -> Polar:
    """Polar coordinates of the pixel grid and the sector mask."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)  # [H, W] each
    dx, dy = x - np.float32(sector.apex_x), y - np.float32(sector.apex_y)
    r = np.hypot(dx, dy)
    theta = np.arctan2(dx, dy)
    depth = (r - np.float32(sector.r0)) / np.float32(sector.r1 - sector.r0)
    inside = (r >= sector.r0) & (r <= sector.r1) & (np.abs(theta) <= sector.half_angle)
    return Polar(r, theta, depth, inside)


def inside_sector(sector: Sector, xs: np.ndarray, ys: np.ndarray, margin: float) -> bool:
    """True when all points (pixel coordinates) lie at least `margin` pixels inside the fan."""
    dx, dy = xs - sector.apex_x, ys - sector.apex_y
    r = np.hypot(dx, dy)
    lateral = r * np.sin(sector.half_angle - np.abs(np.arctan2(dx, dy)))  # distance to side edge
    return bool(
        np.all(r >= sector.r0 + margin)
        and np.all(r <= sector.r1 - margin)
        and np.all(lateral >= margin)
    )


def gaussian_blur(a: np.ndarray, sigma_y: float, sigma_x: float, wrap: bool = False) -> np.ndarray:
    """Gaussian blur by FFT; reflect-padded unless `wrap` (fine for stationary noise)."""
    pad = 0 if wrap else int(3 * max(sigma_y, sigma_x)) + 1
    p = np.pad(a, pad, mode="reflect") if pad else a
    fy = np.fft.fftfreq(p.shape[0])[:, None]  # [H, 1]
    transfer = lambda f2: np.exp(-2 * np.pi**2 * f2)  # noqa: E731
    if np.iscomplexobj(p):
        fx = np.fft.fftfreq(p.shape[1])[None, :]
        out = np.fft.ifft2(np.fft.fft2(p) * transfer(sigma_y**2 * fy**2 + sigma_x**2 * fx**2))
    else:
        fx = np.fft.rfftfreq(p.shape[1])[None, :]
        spec = np.fft.rfft2(p) * transfer(sigma_y**2 * fy**2 + sigma_x**2 * fx**2)
        out = np.fft.irfft2(spec, s=p.shape)
    return out[pad : pad + a.shape[0], pad : pad + a.shape[1]] if pad else out


def tissue_layers(rng: np.random.Generator, polar: Polar) -> np.ndarray:
    """Mean echogenicity of skin, fat, gland/muscle and deep tissue following the fan's arcs.

    Returns [H, W] float64 around 0.2..1 (linear amplitude, before speckle).
    """
    th, d = polar.theta, polar.depth
    f32 = lambda v: np.asarray(v, np.float32)[:, None, None]  # noqa: E731  per-layer [3, 1, 1]
    bounds = f32(np.sort(rng.uniform([0.03, 0.15, 0.5], [0.05, 0.3, 0.75])))  # skin/fat/gland
    wobble, freq = f32(rng.uniform(0.005, 0.03, 3)), f32(rng.uniform(9.0, 30.0, 3))
    phase = f32(rng.uniform(0, 2 * np.pi, 3))
    edges = bounds + wobble * np.sin(freq * th[None] + phase)  # [3, H, W]
    layer = (d[None] > edges).sum(axis=0)  # [H, W] 0 skin .. 3 deep
    levels = (np.array([1.0, 0.3, 0.65, 0.45]) * rng.uniform(0.85, 1.15, 4)).astype(np.float32)
    echo = levels[layer]
    fascia = np.exp(-(((d[None] - edges) * np.float32(125.0)) ** 2)).sum(axis=0)  # bright lines
    n_stripes, stripe_phase = rng.uniform(12, 25), rng.uniform(0, 6.3)
    stripes = 1 + 0.25 * np.sin(d * np.float32(2 * np.pi * n_stripes) + np.float32(stripe_phase))
    echo = echo * np.where(layer == 2, stripes, np.float32(1)) + np.float32(0.6) * fascia
    texture = gaussian_blur(rng.standard_normal(d.shape), 6.0, 10.0, wrap=True)
    texture *= 0.25 / (texture.std() + 1e-12)
    return echo.astype(np.float64) * np.exp(texture)


def speckle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Fully developed speckle: magnitude of low-pass complex Gaussian noise, Rayleigh, mean 1.

    The point spread function is wider laterally than axially, as in a B-mode scan. White
    complex Gaussian noise has white complex Gaussian Fourier coefficients, so the noise is drawn
    directly in the frequency domain and only the inverse FFT is computed.
    Returns [H, W] float64.
    """
    spectrum = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)  # [H, W] complex
    fy, fx = np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :]
    psf = np.exp(-2 * np.pi**2 * (0.7**2 * fy**2 + 1.4**2 * fx**2))
    env = np.abs(np.fft.ifft2(spectrum * psf))
    return env / env.mean()


def depth_gain(rng: np.random.Generator, polar: Polar) -> np.ndarray:
    """Attenuation with depth, partly undone by time-gain compensation. [H, W] float64."""
    alpha = rng.uniform(0.8, 1.8)  # nepers over the full depth
    tgc = rng.uniform(0.3, 0.7)  # fraction of the loss the operator compensated
    d = np.clip(polar.depth, 0, 1)
    return np.exp(-alpha * (1 - tgc) * d) * (1 + 0.3 * np.exp(-d / 0.05))


def log_compress(rng: np.random.Generator, env: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Log compression to a display dynamic range; black outside the fan. [H, W] uint8."""
    db = 20 * np.log10(env + 1e-6)
    top = np.percentile(db[inside], 99.7)
    dynamic_range = rng.uniform(42, 55)
    grey = np.clip((db - top + dynamic_range) / dynamic_range, 0, 1) * 255
    return np.where(inside, np.rint(grey), 0).astype(np.uint8)


GEOMETRIES = ("curvilinear", "linear", "phased")


def draw_fov(
    rng: np.random.Generator,
    geometry: str,
    height: int,
    width: int,
    apex_offset: tuple[float, float],
) -> Sector:
    """The field of view of a probe kind, as a `Sector` (so placement, layers and posterior
    features work unchanged for all three):

    - curvilinear: `draw_sector` (apex `apex_offset` image heights above row 0);
    - linear: an apex 40 image heights above, so beams are parallel to within a degree and the
      field is a rectangle whose top and bottom sag under one pixel;
    - phased: the apex just above row 0 and a pie slice of up to +-45 degrees.
    """
    if geometry == "curvilinear":
        return draw_sector(rng, height, width, apex_offset)
    if geometry == "linear":
        a = 40.0 * height
        r0, r1 = a + 2.0, a + height - 3.0
        half_width = (width / 2 - 3.0) * rng.uniform(0.8, 1.0)
        return Sector((width - 1) / 2, -a, r0, r1, float(half_width / r1))
    if geometry == "phased":
        a = rng.uniform(0.0, 0.03) * height
        r0, r1 = a + 2.0, a + height - 3.0
        half_max = min(np.arcsin(min(1.0, (width / 2 - 3.0) / r1)), np.pi / 4)
        return Sector((width - 1) / 2, -a, r0, r1, float(rng.uniform(0.88, 1.0) * half_max))
    raise ValueError(f"unknown probe geometry {geometry!r}; expected one of {GEOMETRIES}")


@dataclass(frozen=True)
class Display:
    """The operator's display settings of a screen-like phantom: overall gain, dynamic range
    and the TGC sliders (dB at evenly spaced depths from the probe face to the bottom)."""

    gain_db: float
    dynamic_range: float
    tgc_db: tuple[float, ...]


def draw_display(rng: np.random.Generator) -> Display:
    """Random settings within what a sonographer would leave on screen."""
    tgc = np.cumsum(rng.normal(0.0, 1.5, 8))
    return Display(
        float(rng.uniform(-6, 6)), float(rng.uniform(40, 60)), tuple(float(v) for v in tgc)
    )


def display_compress(env: np.ndarray, polar: Polar, display: Display) -> np.ndarray:
    """`log_compress` under `display`: TGC sliders added in dB along depth, the brightest echo
    moved by the gain, then the dynamic range mapped to 0..255; black outside. [H, W] uint8."""
    depth = np.clip(polar.depth, 0, 1)
    tgc = np.interp(depth, np.linspace(0, 1, len(display.tgc_db)), display.tgc_db)
    db = 20 * np.log10(env + 1e-6) + tgc
    top = np.percentile(db[polar.inside], 99.7) - display.gain_db
    dr = display.dynamic_range
    grey = np.clip((db - top + dr) / dr, 0, 1) * 255
    return np.where(polar.inside, np.rint(grey), 0).astype(np.uint8)
