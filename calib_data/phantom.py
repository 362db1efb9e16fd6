"""Procedural B-mode ultrasound phantoms with exact lesion masks and attributes.

A phantom is a pure function of its seed (`np.random.default_rng(seed)` is the only source of
randomness): a curvilinear fan (black outside), tissue layers following the fan's arcs, 0-3
non-overlapping lesions entirely inside the fan (round / oval / irregular; anechoic, hypoechoic,
isoechoic with a thin hypoechoic halo, or hyperechoic; posterior shadowing, enhancement or
none), multiplicative Rayleigh speckle, depth attenuation with partial TGC and log compression.

Conventions of the lesion attributes (the task texts depend on them):
- `box` is (x1, y1, x2, y2) in original pixels with x2/y2 exclusive (max index + 1);
- `location` compares the mask centroid with the image centre ((W-1)/2, (H-1)/2); a centroid
  exactly on the centre line counts as lower / right;
- `size_mm` is the longest distance between two boundary pixel centres of the mask times the
  pixel spacing, rounded half up to an integer.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from .phantom_bmode import (
    Display,
    Polar,
    Sector,
    depth_gain,
    display_compress,
    draw_sector,
    log_compress,
    polar_grid,
    speckle,
    tissue_layers,
)
from .phantom_lesions import Outline, draw_outline, place, posterior_factor, render

log = logging.getLogger(__name__)

SHAPES = ("round", "oval", "irregular")
ECHOGENICITIES = ("anechoic", "hypoechoic", "isoechoic", "hyperechoic")
POSTERIORS = ("shadowing", "enhancement", "none")
MARGINS = ("circumscribed", "irregular")
LOCATIONS = ("upper left", "upper right", "lower left", "lower right")

_REFERENCE_ECHO = 0.55  # linear echo level that lesion echogenicities are relative to
_ECHO_LEVEL = {"anechoic": (0.01, 0.03), "hypoechoic": (0.15, 0.3), "hyperechoic": (2.0, 3.0)}
_POSTERIOR_GAIN = {"shadowing": (0.15, 0.4), "enhancement": (1.8, 2.6)}


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that shapes a phantom except its seed. Serialises with `to_dict`."""

    version: int = 1
    height: int = 256
    width: int = 256
    spacing_mm: float = 0.2  # square pixels
    lesion_count_probs: tuple[float, ...] = (0.2, 0.5, 0.2, 0.1)  # P(0 lesions), P(1), ...
    diameter_mm: tuple[float, float] = (6.0, 18.0)  # nominal longest diameter range
    shape_probs: tuple[float, ...] = (0.35, 0.35, 0.3)  # in SHAPES order
    echogenicity_probs: tuple[float, ...] = (0.2, 0.4, 0.15, 0.25)  # in ECHOGENICITIES order
    # P(shadowing, enhancement, none) for each echogenicity, in ECHOGENICITIES order.
    posterior_probs: tuple[tuple[float, ...], ...] = (
        (0.0, 0.75, 0.25),
        (0.35, 0.15, 0.5),
        (0.1, 0.1, 0.8),
        (0.4, 0.0, 0.6),
    )
    apex_offset: tuple[float, float] = (0.5, 1.0)  # fan apex above row 0, in image heights
    gap_px: float = 4.0  # minimum clearance between lesions (beyond the halo)
    halo_px: float = 3.0  # width of the hypoechoic halo of isoechoic lesions

    def __post_init__(self) -> None:
        if self.height < 64 or self.width < 64 or self.spacing_mm <= 0:
            raise ValueError(f"need height, width >= 64 and spacing_mm > 0, got {self}")
        groups = [self.lesion_count_probs, self.shape_probs, self.echogenicity_probs]
        for probs in groups + list(self.posterior_probs):
            if min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
                raise ValueError(f"probabilities {probs} must be >= 0 and sum to 1")
        sizes = (len(self.shape_probs), len(self.echogenicity_probs), len(self.posterior_probs))
        if sizes != (len(SHAPES), len(ECHOGENICITIES), len(ECHOGENICITIES)):
            raise ValueError(f"probability tables have sizes {sizes}, expected 3, 4, 4")
        if any(len(p) != len(POSTERIORS) for p in self.posterior_probs):
            raise ValueError("each posterior_probs row needs 3 values (shadowing, enh., none)")
        lo, hi = self.diameter_mm
        if not 0 < lo <= hi or hi / self.spacing_mm > min(self.height, self.width) / 2.5:
            raise ValueError(f"diameter_mm {self.diameter_mm} must be ordered and fit the image")

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return _lists(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> PhantomConfig:
        """Inverse of `to_dict`."""
        return cls(**{k: _tuples(v) for k, v in data.items()})


@dataclass(frozen=True)
class Lesion:
    """One lesion: its exact mask and the attributes a report states."""

    mask: np.ndarray = field(repr=False)  # [H, W] bool
    box: tuple[int, int, int, int]  # x1, y1, x2, y2; x2, y2 exclusive
    shape: str  # SHAPES
    echogenicity: str  # ECHOGENICITIES
    margin: str  # MARGINS
    location: str  # LOCATIONS
    size_mm: int
    posterior: str  # POSTERIORS

    def to_dict(self) -> dict:
        """Attributes without the mask, JSON-ready."""
        data = {k: v for k, v in asdict(self).items() if k != "mask"}
        data["box"] = list(self.box)
        return data


@dataclass(frozen=True)
class Phantom:
    """A B-mode image and its lesions (sorted left to right by box x1).

    A clean phantom is grey [H, W]; a screen-like one (`phantom_screen`) is RGB [H, W, 3],
    states its layout in `screen` and every pixel its display drew on in `overlay`."""

    image: np.ndarray = field(repr=False)  # [H, W] uint8, or [H, W, 3] for a screen
    lesions: tuple[Lesion, ...]
    spacing_mm: float
    seed: int
    fov: np.ndarray | None = field(default=None, repr=False)  # [H, W] bool, the fan(s)
    screen: dict | None = field(default=None, repr=False)  # layout of a screen-like phantom
    overlay: np.ndarray | None = field(default=None, repr=False)  # [H, W] bool, drawn over


DEFAULT_CONFIG = PhantomConfig()


def generate_phantom(seed: int, config: PhantomConfig = DEFAULT_CONFIG) -> Phantom:
    """Generate the phantom of `seed`; the same seed and config always give the same arrays."""
    rng = np.random.default_rng(seed)
    sector = draw_sector(rng, config.height, config.width, config.apex_offset)
    scan = render_scan(rng, config, sector)
    return Phantom(scan.image, scan.lesions, config.spacing_mm, seed, scan.inside)


@dataclass(frozen=True)
class Scan:
    """One rendered field of view: the grey image, its lesions (sorted by box) and the fan."""

    image: np.ndarray  # [H, W] uint8
    lesions: tuple[Lesion, ...]
    inside: np.ndarray  # [H, W] bool


FLAT_LESION, FLAT_TISSUE = 255, 110  # grey levels of a `flat` rendering


def render_scan(
    rng: np.random.Generator,
    config: PhantomConfig,
    sector: Sector,
    display: Display | None = None,
    flat: bool = False,
) -> Scan:
    """Tissue, lesions, posterior features, speckle and display mapping inside `sector`.

    `display` None is the clean phantom's own mapping (`log_compress`, which draws its dynamic
    range from `rng`); a `Display` applies a screen's gain, dynamic range and TGC instead.
    `flat` renders lesions FLAT_LESION on FLAT_TISSUE (no speckle or shading) with the same
    masks: the noise-free picture that checks where a screen puts each lesion's pixels.
    """
    hw = (config.height, config.width)
    polar = polar_grid(sector, *hw)
    echo = tissue_layers(rng, polar)  # [H, W]
    n_lesions = int(rng.choice(len(config.lesion_count_probs), p=config.lesion_count_probs))
    lesions, posteriors = [], []
    for outline, shape in _place_outlines(rng, config, sector, n_lesions):
        echogenicity = ECHOGENICITIES[rng.choice(4, p=config.echogenicity_probs)]
        posterior = POSTERIORS[
            rng.choice(3, p=config.posterior_probs[ECHOGENICITIES.index(echogenicity)])
        ]
        halo = config.halo_px if echogenicity == "isoechoic" else 0.0
        drawn = render(outline, hw, edge=2.0 if shape == "irregular" else 0.8, halo_px=halo)
        echo = _apply_echogenicity(rng, echo, drawn.soft, drawn.halo, echogenicity)
        posteriors.append((drawn.mask, posterior))
        spacing = config.spacing_mm
        lesions.append(describe_lesion(drawn.mask, shape, echogenicity, posterior, spacing))
    lesions.sort(key=lambda les: (les.box[0], les.box[1]))
    if flat:
        union = np.zeros(hw, dtype=bool)
        for mask, _ in posteriors:
            union |= mask
        image = np.where(union, FLAT_LESION, np.where(polar.inside, FLAT_TISSUE, 0))
        return Scan(image.astype(np.uint8), tuple(lesions), polar.inside)
    for mask, posterior in posteriors:
        echo = echo * _posterior(rng, polar, sector, mask, posterior)
    env = echo * speckle(rng, hw) * depth_gain(rng, polar)
    if display is None:
        image = log_compress(rng, env, polar.inside)
    else:
        image = display_compress(env, polar, display)
    return Scan(image, tuple(lesions), polar.inside)


def _place_outlines(
    rng: np.random.Generator, config: PhantomConfig, sector: Sector, n_lesions: int
) -> list[tuple[Outline, str]]:
    """Draw and place up to `n_lesions` outlines; a lesion that does not fit shrinks, then is
    dropped (logged), so a crowded draw can yield fewer lesions but never overlapping ones."""
    placed: list[tuple[Outline, str]] = []
    min_px = config.diameter_mm[0] / config.spacing_mm
    for _ in range(n_lesions):
        shape = SHAPES[rng.choice(3, p=config.shape_probs)]
        diameter = rng.uniform(*config.diameter_mm) / config.spacing_mm
        outline = draw_outline(rng, shape, diameter)
        spot = None
        for _attempt in range(4):
            others = [o for o, _ in placed]
            gap = config.gap_px + config.halo_px
            spot = place(rng, outline, sector, others, (config.height, config.width), gap)
            if spot is not None:
                break
            factor = max(0.85, min_px / diameter)
            outline, diameter = outline.scaled(factor), diameter * factor
        if spot is None:
            log.debug("a %s lesion did not fit beside %d others; dropped", shape, len(placed))
            continue
        placed.append((spot, shape))
    return placed


def _apply_echogenicity(
    rng: np.random.Generator, echo: np.ndarray, soft: np.ndarray, halo: np.ndarray, kind: str
) -> np.ndarray:
    """Blend the lesion's echo level into the tissue; isoechoic keeps it and darkens a halo.

    Hypo- and hyperechoic levels are also bounded by the local tissue, so they stay darker or
    brighter than their surroundings in any layer."""
    if kind == "isoechoic":
        return echo * (1 - (1 - rng.uniform(0.08, 0.2)) * halo)
    level = _REFERENCE_ECHO * rng.uniform(*_ECHO_LEVEL[kind])
    if kind == "hypoechoic":  # darker than wherever it sits
        level = np.minimum(level, 0.45 * echo)
    elif kind == "hyperechoic":  # brighter than wherever it sits
        level = np.maximum(level, 2.2 * echo)
    return echo + soft * (level - echo)


def _posterior(
    rng: np.random.Generator, polar: Polar, sector: Sector, mask: np.ndarray, kind: str
) -> np.ndarray | float:
    # Draw for every kind, so the posterior choice never shifts the rest of the random stream.
    strength, fade = rng.uniform(), rng.uniform(60, 150)
    if kind == "none":
        return 1.0
    lo, hi = _POSTERIOR_GAIN[kind]
    return posterior_factor(polar, sector, mask, lo + strength * (hi - lo), fade)


def describe_lesion(
    mask: np.ndarray, shape: str, echo: str, posterior: str, spacing: float
) -> Lesion:
    """The `Lesion` of `mask` in the image it is drawn in (box, location and size follow the
    mask, so a screen re-describes a scan's lesion on its own canvas)."""
    margin = "irregular" if shape == "irregular" else "circumscribed"
    size = int(np.floor(longest_diameter_px(mask) * spacing + 0.5))
    return Lesion(mask, box_of(mask), shape, echo, margin, location_of(mask), size, posterior)


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of a non-empty mask, x2/y2 exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(row, column) of the mask's centroid, in pixel indices."""
    ys, xs = np.nonzero(mask)
    return float(ys.mean()), float(xs.mean())


def location_of(mask: np.ndarray) -> str:
    """Quadrant of the mask centroid relative to the image centre."""
    cy, cx = centroid(mask)
    height, width = mask.shape
    vertical = "upper" if cy < (height - 1) / 2 else "lower"
    horizontal = "left" if cx < (width - 1) / 2 else "right"
    return f"{vertical} {horizontal}"


def boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with at least one 4-neighbour outside the mask. [H, W] bool."""
    p = np.pad(mask, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def longest_diameter_px(mask: np.ndarray) -> float:
    """Largest distance between two boundary pixel centres of `mask`, in pixels."""
    pts = np.argwhere(boundary(mask)).astype(np.float64)  # [N, 2]
    diff = pts[:, None, :] - pts[None, :, :]  # [N, N, 2]
    return float(np.sqrt((diff**2).sum(-1).max()))


def longest_diameter_ends(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (row, column) pixels at the two ends of `longest_diameter_px` (where calipers go)."""
    pts = np.argwhere(boundary(mask))  # [N, 2]
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)  # [N, N]
    i, j = np.unravel_index(int(d2.argmax()), d2.shape)
    return (int(pts[i][0]), int(pts[i][1])), (int(pts[j][0]), int(pts[j][1]))


def _lists(value: object) -> object:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _tuples(value: object) -> object:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
