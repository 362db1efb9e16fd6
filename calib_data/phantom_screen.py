"""Screen-like phantoms: the scan of `phantom.render_scan` inside the display of a real scanner.

Real ultrasound frames (and the DICOMs made from them) carry the scanner's screen: a banner of
vendor, preset, probe and acoustic-output text, annotations (gain, dynamic range, frame rate,
depth), a grey bar, a depth scale with a focus marker, calipers with their measurement label,
a colour Doppler box with its colour bar, one or two panes, and a curvilinear, linear or phased
field of view under random gain, depth and TGC, often saved as JPEG. A model trained only on
clean phantoms (a fan on black filling the image) has never seen any of that.

What stays exact:
- every lesion's mask is the scan's mask pasted at the pane's offset (no resampling), and
  `box`, `location` and `size_mm` are computed again on the canvas (`describe_lesion`), so
  location is relative to the whole screen, as for any image;
- pixels the display draws over the scan (caliper marks, Doppler flow and box, the depth scale
  beside a fan) are recorded in `Phantom.overlay`; every other pixel of a lesion is the scan's
  own (`flat=True` renders lesions in one grey level to check this);
- the pixel spacing is the scan's (both panes share one depth), so measurements in mm and the
  calipers' label (the longest diameter, as `size_mm`, in cm) agree.

Dual-pane rule: the two panes are independent scans with the same probe and depth, and the
image's lesions are the lesions of both panes (its count is their sum). The second pane draws
its lesion count from the config's distribution cut at what the first left, so a screen never
holds more lesions than a clean phantom can.

A screen phantom is a pure function of (seed, config, screen); its randomness comes from
`np.random.default_rng([seed, SCREEN_TAG, k])` streams (k = 0 layout and display, 1 and 2 the
panes, DARK_STREAM the dark display), disjoint from the clean phantom of the same seed.

Dark displays: real scanners are set much darker than a phantom whose brightest speckle maps
to white (pydicom's ultrasound examples average 10-40 of 255: black fluid, a dim field, a few
bright reflectors). A model that saw only bright fields took real screens for "not
ultrasound" (stage 8's first run: 70 of 96 answers on pydicom's examples). `dark_prob` of the
screens are drawn through a gamma of 1.6-3.2 and a level of 0.45-0.9, which keeps the order of
grey levels (every lesion keeps its contrast sign) and leaves masks untouched.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from .phantom import (
    DEFAULT_CONFIG,
    FLAT_LESION,
    Lesion,
    Phantom,
    PhantomConfig,
    boundary,
    describe_lesion,
    longest_diameter_ends,
    longest_diameter_px,
    render_scan,
)
from .phantom_bmode import (
    GEOMETRIES,
    Sector,
    draw_display,
    draw_fov,
    gaussian_blur,
    polar_grid,
)
from .phantom_chrome import Layer

SCREEN_TAG = 0x5C2EE7
DARK_STREAM = 50  # the dark display's own stream: drawing it moves no other draw
LAYOUTS = ("single", "dual")
_VENDORS = ("SONOVEX", "ECHORA", "ULTRAVIEW", "AXIOSCAN", "LUMASONO", "HELIX US", "NOVASONIC")
_PRESETS = ("Breast", "Thyroid", "Abdomen", "Sm Parts", "MSK", "Liver", "Renal", "Vascular")
_PROBES = {
    "curvilinear": ("C5-1", "C6-2", "C3-1", "AC5"),
    "linear": ("L12-5", "L15-7", "L10-4", "LA14"),
    "phased": ("P4-2", "S5-1", "PA3"),
}
_TEXT_COLOURS = ((235, 235, 235), (200, 200, 200), (240, 220, 90), (120, 220, 230))
_CALIPER_COLOURS = ((240, 230, 60), (90, 235, 90), (245, 245, 245))


class ScreenConfigError(ValueError):
    """A screen configuration that cannot be drawn (bad probabilities or sizes)."""


@dataclass(frozen=True)
class ScreenConfig:
    """How often each element of a screen appears, and the canvas sizes drawn from."""

    version: int = 1
    geometry_probs: tuple[float, ...] = (0.45, 0.35, 0.2)  # in GEOMETRIES order
    dual_prob: float = 0.25
    doppler_prob: float = 0.3
    caliper_prob: float = 0.4
    jpeg_prob: float = 0.6
    dark_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 90)
    heights: tuple[int, ...] = (240, 256, 288)
    aspects: tuple[float, ...] = (1.0, 4 / 3, 1.5)  # canvas width / height

    def __post_init__(self) -> None:
        p = self.geometry_probs
        if len(p) != len(GEOMETRIES) or min(p) < 0 or abs(sum(p) - 1) > 1e-6:
            raise ScreenConfigError(f"geometry_probs {p} needs 3 values >= 0 summing to 1")
        for name in ("dual_prob", "doppler_prob", "caliper_prob", "jpeg_prob", "dark_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ScreenConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 95:
            raise ScreenConfigError(f"jpeg_quality {self.jpeg_quality} must be within 1..95")
        if not self.heights or min(self.heights) < 200 or not self.aspects:
            raise ScreenConfigError(f"heights {self.heights} must be >= 200 (and aspects given)")
        if min(self.aspects) < 0.9:
            raise ScreenConfigError(f"aspects {self.aspects} must be >= 0.9")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


DEFAULT_SCREEN = ScreenConfig()


@dataclass(frozen=True)
class Pane:
    """Where a scan sits on the canvas (pixels)."""

    x0: int
    y0: int
    width: int
    height: int


@dataclass(frozen=True)
class Layout:
    """The drawn decisions of one screen (cheap to draw: no pixels)."""

    height: int
    width: int
    kind: str  # LAYOUTS
    geometry: str  # GEOMETRIES
    panes: tuple[Pane, ...]
    margins: tuple[int, int, int, int]  # top, bottom, left, right
    depth_cm: float
    spacing_mm: float
    doppler_pane: int  # -1: no colour Doppler box
    calipers: bool
    jpeg_quality: int  # 0: saved losslessly

    def to_dict(self) -> dict:
        data = asdict(self)
        data["panes"] = [list(asdict(p).values()) for p in self.panes]
        data["margins"] = list(self.margins)
        return data


def draw_layout(
    seed: int, config: PhantomConfig = DEFAULT_CONFIG, screen: ScreenConfig = DEFAULT_SCREEN
) -> Layout:
    """The layout of the screen phantom of `seed` (the first draws of its layout stream)."""
    return _draw_layout(_rng(seed, 0), config, screen)


def _rng(seed: int, stream: int) -> np.random.Generator:
    if seed < 0:
        raise ScreenConfigError(f"a screen phantom's seed must be >= 0, got {seed}")
    return np.random.default_rng([seed, SCREEN_TAG, stream])


def _draw_layout(rng: np.random.Generator, config: PhantomConfig, screen: ScreenConfig) -> Layout:
    dual = rng.uniform() < screen.dual_prob
    geometry = GEOMETRIES[rng.choice(len(GEOMETRIES), p=screen.geometry_probs)]
    height = int(rng.choice(screen.heights))
    aspect = float(rng.choice(screen.aspects))
    aspect = max(aspect, 4 / 3) if dual else aspect
    width = int(round(height * aspect / 8)) * 8
    top, bottom = int(rng.integers(14, 24)), int(rng.integers(14, 24))
    left, right = int(rng.integers(28, 44)), int(rng.integers(20, 32))
    ph, avail = height - top - bottom, width - left - right
    if dual:
        gap = int(rng.integers(4, 10))
        pw = (avail - gap) // 2
        panes = (Pane(left, top, pw, ph), Pane(left + pw + gap, top, pw, ph))
    else:
        want = {"curvilinear": (1.0, 1.3), "linear": (0.7, 1.05), "phased": (1.3, 1.5)}[geometry]
        pw = min(avail, int(ph * rng.uniform(*want)))
        panes = (Pane(left + (avail - pw) // 2, top, pw, ph),)
    # Depth: a round half-centimetre at which the largest lesion still fits the pane (the
    # PhantomConfig rule), up to 0.45 mm per pixel.
    s_min = 2.5 * config.diameter_mm[1] / min(ph, pw)
    lo = math.ceil(ph * s_min / 10 * 2 * (1 + 1e-9)) / 2
    hi = max(lo, math.floor(ph * 0.45 / 10 * 2) / 2)
    depth = lo + 0.5 * int(rng.integers(0, int(round((hi - lo) * 2)) + 1))
    doppler = int(rng.integers(len(panes))) if rng.uniform() < screen.doppler_prob else -1
    calipers = bool(rng.uniform() < screen.caliper_prob)
    q = int(rng.integers(screen.jpeg_quality[0], screen.jpeg_quality[1] + 1))
    quality = q if rng.uniform() < screen.jpeg_prob else 0
    return Layout(
        height, width, "dual" if dual else "single", geometry, panes,
        (top, bottom, left, right), depth, depth * 10 / ph, doppler, calipers, quality,
    )  # fmt: skip


def generate_screen_phantom(
    seed: int,
    config: PhantomConfig = DEFAULT_CONFIG,
    screen: ScreenConfig = DEFAULT_SCREEN,
    flat: bool = False,
) -> Phantom:
    """The screen-like phantom of `seed` (RGB); `flat` draws lesions FLAT_LESION on a flat
    tissue grey without speckle, tint or JPEG (same masks, same display), for checking."""
    rng = _rng(seed, 0)
    layout = _draw_layout(rng, config, screen)
    hw = (layout.height, layout.width)
    canvas = np.zeros((*hw, 3), dtype=np.uint8)
    fov = np.zeros(hw, dtype=bool)
    lesions: list[Lesion] = []
    sectors: list[Sector] = []
    most = len(config.lesion_count_probs) - 1
    for k, pane in enumerate(layout.panes):
        probs = np.asarray(config.lesion_count_probs[: most - len(lesions) + 1], np.float64)
        probs = tuple(probs / probs.sum()) if probs.sum() > 0 else (1.0,)
        pane_cfg = replace(
            config,
            height=pane.height,
            width=pane.width,
            spacing_mm=layout.spacing_mm,
            lesion_count_probs=probs,
        )
        prng = _rng(seed, k + 1)
        sector = draw_fov(prng, layout.geometry, pane.height, pane.width, config.apex_offset)
        scan = render_scan(prng, pane_cfg, sector, draw_display(prng), flat=flat)
        grey = scan.image if flat else darken(scan.image, _rng(seed, DARK_STREAM), screen)
        window = (slice(pane.y0, pane.y0 + pane.height), slice(pane.x0, pane.x0 + pane.width))
        canvas[window] = grey[..., None]
        fov[window] = scan.inside
        for les in scan.lesions:
            mask = np.zeros(hw, dtype=bool)
            mask[window] = les.mask
            lesions.append(
                describe_lesion(mask, les.shape, les.echogenicity, les.posterior, layout.spacing_mm)
            )
        sectors.append(sector)
    # Some vendors tint their grey map. Drawn in a flat rendering too, so that it shares every
    # later draw (the display) with the real one.
    tinted, tint = rng.uniform() < 0.25, np.array([1.0, *rng.uniform([0.94, 0.85], [1.0, 0.97])])
    if tinted and not flat:
        canvas = np.rint(canvas * tint).astype(np.uint8)
    layer = Layer(*hw)
    _draw_chrome(layer, rng, layout, lesions, sectors)
    image, overlay = layer.composite(canvas)
    if layout.jpeg_quality and not flat:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=layout.jpeg_quality)
        image = np.asarray(Image.open(buf).convert("RGB")).copy()
    lesions.sort(key=lambda les: (les.box[0], les.box[1]))
    return Phantom(image, tuple(lesions), layout.spacing_mm, seed, fov, layout.to_dict(), overlay)


def darken(grey: np.ndarray, rng: np.random.Generator, screen: ScreenConfig) -> np.ndarray:
    """A dark display of `grey` (uint8) for `screen.dark_prob` of the draws of `rng`, else
    `grey` itself: a gamma then a level, both monotone (black stays black)."""
    if not rng.uniform() < screen.dark_prob:
        return grey
    gamma, level = rng.uniform(1.6, 3.2), rng.uniform(0.45, 0.9)
    out = 255.0 * level * (grey / 255.0) ** gamma
    return np.rint(out).astype(np.uint8)


def _draw_chrome(
    layer: Layer,
    rng: np.random.Generator,
    layout: Layout,
    lesions: list[Lesion],
    sectors: list[Sector],
) -> None:
    """Banner, annotations, grey bar, depth scale, Doppler box, calipers, TGC curve."""
    top, bottom, left, right = layout.margins
    h, w = layout.height, layout.width
    text = _TEXT_COLOURS[rng.integers(len(_TEXT_COLOURS))]
    if rng.uniform() < 0.7:  # a banner band
        grey = int(rng.integers(24, 56))
        layer.rect(0, 0, w, top - 2, (grey, grey, grey + int(rng.integers(0, 12))))
    freq = {"curvilinear": (2.0, 5.0), "linear": (7.0, 15.0), "phased": (1.7, 3.5)}
    mhz = rng.uniform(*freq[layout.geometry])
    probe = _PROBES[layout.geometry][rng.integers(len(_PROBES[layout.geometry]))]
    size = int(rng.integers(8, 11))
    x = 3 + layer.text(3, 2, _VENDORS[rng.integers(len(_VENDORS))], text, size) + 8
    x += layer.text(x, 2, _PRESETS[rng.integers(len(_PRESETS))], text, size) + 8
    layer.text(x, 2, f"{probe} {mhz:.1f}MHz", text, size)
    mi, ti = rng.uniform(0.2, 1.4), rng.uniform(0.1, 1.2)
    layer.text(w - 80, 2, f"MI {mi:.1f} TIs {ti:.1f}", text, size - 1)
    notes = [
        "2D",
        f"G {int(rng.integers(30, 80))}",
        f"DR {int(rng.integers(45, 80))}",
        f"FR {int(rng.integers(12, 60))}",
        f"D{layout.depth_cm:.1f}",
        "THI" if rng.uniform() < 0.5 else f"{mhz:.0f}M",
    ]
    for k, note in enumerate(notes[: int(rng.integers(3, len(notes) + 1))]):
        layer.text(2, top + 3 + 11 * k, note, text, 8)
    ramp = np.linspace(255, 0, int(rng.integers(48, 80)))
    layer.bar(3, h - bottom - len(ramp) - 4, np.stack([ramp] * 3, 1), 5)
    for k, pane in enumerate(layout.panes):
        _depth_scale(layer, rng, layout, pane, text, labels=k == len(layout.panes) - 1)
    if layout.kind == "dual":
        for pane, name in zip(layout.panes, ("TRANS", "SAG"), strict=True):
            layer.text(pane.x0 + 2, pane.y0 + 2, name, text, 8)
    if layout.doppler_pane >= 0:
        pane = layout.panes[layout.doppler_pane]
        _doppler(layer, rng, pane, sectors[layout.doppler_pane], lesions, layout)
    if layout.calipers and lesions:
        _calipers(layer, rng, layout, lesions)
    if rng.uniform() < 0.4:  # the TGC curve at the right edge
        pane = layout.panes[-1]
        curve = np.cumsum(rng.normal(0, 1.2, 8))
        ys = np.linspace(pane.y0, pane.y0 + pane.height - 1, 8)
        xs = w - right // 2 + np.clip(curve, -right // 2 + 2, right // 2 - 2)
        for k in range(len(ys) - 1):
            layer.line((ys[k], xs[k]), (ys[k + 1], xs[k + 1]), (150, 150, 150))


def _depth_scale(
    layer: Layer, rng: np.random.Generator, layout: Layout, pane: Pane, colour, labels: bool
) -> None:
    """Ticks every 0.5 cm (long ones per cm) beside the pane, cm labels, a focus marker."""
    x = pane.x0 + pane.width + 1
    per_cm = 10 / layout.spacing_mm
    for k in range(int(layout.depth_cm * 2) + 1):
        y = int(round(pane.y0 + 2 + k * per_cm / 2))
        if y >= pane.y0 + pane.height:
            break
        long = k % 2 == 0
        layer.line((y, x), (y, x + (4 if long else 2)), (200, 200, 200))
        if labels and long and (k // 2) % (2 if layout.depth_cm > 6 else 1) == 0:
            layer.text(x + 6, y - 4, str(k // 2), colour, 8)
    focus = int(pane.y0 + 2 + rng.uniform(0.3, 0.7) * (pane.height - 4))
    for d in range(3):
        layer.line((focus - d, x + 2 + d), (focus + d, x + 2 + d), (230, 230, 120))


def _doppler(
    layer: Layer,
    rng: np.random.Generator,
    pane: Pane,
    sector: Sector,
    lesions: list[Lesion],
    layout: Layout,
) -> None:
    """A colour box inside the field of view, dashed outline, vessels with a parabolic flow
    profile coloured red (towards the probe) or blue (away), kept off the lesions; its colour
    bar with the velocity scale in the left margin."""
    polar = polar_grid(sector, pane.height, pane.width)
    span = 2 * sector.half_angle * rng.uniform(0.3, 0.6)
    t0 = rng.uniform(-sector.half_angle, sector.half_angle - span)
    depth = sector.r1 - sector.r0
    r_lo = sector.r0 + rng.uniform(0.05, 0.4) * depth
    r_hi = min(sector.r1, r_lo + rng.uniform(0.3, 0.5) * depth)
    box = polar.inside & (polar.theta >= t0) & (polar.theta <= t0 + span)
    box &= (polar.r >= r_lo) & (polar.r <= r_hi)
    if not box.any():
        return
    window = (slice(pane.y0, pane.y0 + pane.height), slice(pane.x0, pane.x0 + pane.width))
    union = np.zeros(box.shape)
    for les in lesions:
        union += les.mask[window]
    near = gaussian_blur(np.minimum(union, 1), 1.5, 1.5) > 0.01 if union.any() else union > 0
    flow = np.zeros(box.shape)
    for _ in range(int(rng.integers(1, 3))):
        centre = rng.uniform(r_lo, r_hi) + rng.uniform(-0.3, 0.3) * (polar.theta - t0) * r_lo
        centre = centre + rng.uniform(0, 5) * np.sin(rng.uniform(5, 20) * polar.theta)
        radius = rng.uniform(2.5, 6.0)
        speed = np.clip(1 - ((polar.r - centre) / radius) ** 2, 0, 1) * rng.uniform(0.5, 1.0)
        flow = np.where(np.abs(speed) > np.abs(flow), speed * rng.choice([-1.0, 1.0]), flow)
    flow *= rng.uniform(0.8, 1.2, flow.shape)
    keep = box & ~near & (np.abs(flow) > 0.05)
    v = np.clip(np.abs(flow[keep]), 0, 1)
    pos = flow[keep] > 0
    red = np.stack([90 + 165 * v, 20 + 180 * v**3, np.zeros_like(v)], 1)
    blue = np.stack([np.zeros_like(v), 40 + 160 * v**3, 90 + 165 * v], 1)
    ys, xs = np.nonzero(keep)
    layer.paint((ys + pane.y0, xs + pane.x0), np.where(pos[:, None], red, blue))
    ey, ex = np.nonzero(boundary(box))
    dashed = ((ey + ex) // 2) % 2 == 0
    layer.points(ey[dashed] + pane.y0, ex[dashed] + pane.x0, (210, 210, 210))
    ramp = np.linspace(1, -1, 40)
    column = np.where(
        ramp[:, None] > 0,
        np.stack([90 + 165 * ramp, 20 + 180 * ramp**3, 0 * ramp], 1),
        np.stack([0 * ramp, 40 + 160 * np.abs(ramp) ** 3, 90 + 165 * np.abs(ramp)], 1),
    )
    top = layout.margins[0]
    layer.bar(12, top + 72, column, 5)
    scale = rng.uniform(5, 60)
    layer.text(10, top + 62, f"+{scale:.1f}", (220, 220, 220), 7)
    layer.text(10, top + 114, f"-{scale:.1f}", (220, 220, 220), 7)


def _calipers(
    layer: Layer, rng: np.random.Generator, layout: Layout, lesions: list[Lesion]
) -> None:
    """'+' marks at the ends of up to two lesions' longest diameters, dotted lines between
    them sometimes, and their labels ("1 D 1.23 cm", the lesion's `size_mm`) below the panes."""
    colour = _CALIPER_COLOURS[rng.integers(len(_CALIPER_COLOURS))]
    dotted = rng.uniform() < 0.5
    y_label = layout.height - layout.margins[1] + 3
    for k, les in enumerate(sorted(lesions, key=lambda les: les.box)[:2]):
        (y0, x0), (y1, x1) = longest_diameter_ends(les.mask)
        layer.cross(y0, x0, 3, colour)
        layer.cross(y1, x1, 3, colour)
        if dotted:
            layer.line((y0, x0), (y1, x1), colour, dash=2)
        cm = longest_diameter_px(les.mask) * layout.spacing_mm / 10
        layer.text(layout.margins[2] + 80 * k, y_label, f"{k + 1} D {cm:.2f} cm", colour, 9)


def flat_lesion_pixels(phantom: Phantom) -> np.ndarray:
    """[H, W] bool: pixels of a `flat` screen phantom showing the lesion grey (all channels)."""
    return np.all(phantom.image == FLAT_LESION, axis=-1)


KINDS = ("clean", "screen", "non_us")
KIND_TAG = 0x4B1D


def image_kind(seed: int, screen: float = 0.0, non_us: float = 0.0) -> str:
    """What the image of phantom seed `seed` is in a mix: "non_us" with probability `non_us`,
    else "screen" with probability `screen` (a fraction of the ultrasound images), else
    "clean". A pure function of the seed, so a set or a training stream can be rebuilt; with
    both fractions 0 nothing is drawn and every image is clean, as before mixes existed."""
    for name, value in (("screen", screen), ("non_us", non_us)):
        if not 0 <= value <= 1:
            raise ScreenConfigError(f"{name} fraction must be in [0, 1], got {value}")
    if screen == 0 and non_us == 0:
        return "clean"
    u_non_us, u_screen = np.random.default_rng([abs(seed), KIND_TAG]).uniform(size=2)
    if u_non_us < non_us:
        return "non_us"
    return "screen" if u_screen < screen else "clean"
