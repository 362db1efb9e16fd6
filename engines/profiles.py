"""TensorRT optimisation profiles (min/opt/max per dynamic axis) of each component.

Profiles are derived from the target's resolution profile (`Target.resolution`) and the model
config, never hard-coded per model. They are first built per named dynamic axis (`AxisProfile`,
the axis names of the export specs in `export/*.py`), then resolved against the inputs an ONNX
file declares (`resolve_profile`), so input names and ranks come from the graph itself.

- vision (`n_patches`, `n_units`, `n_windows`): min and max cover every image size
  `smart_resize` can produce inside the target's `max_hw` box for the model's pixel budget
  (min_pixels..max_pixels, overshot by the rounding of a scaled image's sides: see
  `admissible_sizes`), so no admissible image falls outside the engine; opt is
  `smart_resize(opt_hw)`.
- llm (`batch`, `seq`, `past`, `total` = past + seq): two profiles, as TensorRT Edge-LLM builds
  them: `prefill` (the whole prompt, empty cache: past = 0) and `decode` (one token, past from
  1 to max_context - 1).
- sam_encoder (`batch`): the SAM2 image size is fixed by the graph (checked against the
  target's `sam_max_side`); batch 1..max_batch.
- mask_decoder (`n`, the number of `[SEG]` states): 1..max_seg (4 by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .engine_errors import EnginePlanError
from .fields import field, int_tuple

if TYPE_CHECKING:
    from citrus_edge.config import CitrusVConfig
    from citrus_edge.targets import Target

    from .graph_info import GraphInput

PROFILE_CONFIG_VERSION = 1
DEFAULT_MAX_CONTEXT = 2048  # as citrus_edge.cli.memory_plan's default context_tokens
MAX_ASPECT = 200  # smart_resize refuses images more elongated than this


@dataclass(frozen=True)
class ProfileConfig:
    """Token and batch budgets of the engines (the image sizes come from the target).

    max_batch: largest batch of the LLM and the SAM2 encoder (the vision graph takes one image).
    max_context: KV-cache length, prompt included; None: min(2048, max_position_embeddings).
    opt_text_tokens / max_text_tokens: prompt tokens besides the image tokens.
    opt_new_tokens: generated tokens the decode profile is tuned for, after an opt prompt.
    max_seg: most `[SEG]` states decoded into masks at once.
    """

    max_batch: int = 1
    max_context: int | None = None
    opt_text_tokens: int = 64
    max_text_tokens: int = 512
    opt_new_tokens: int = 64
    max_seg: int = 4
    version: int = PROFILE_CONFIG_VERSION

    def __post_init__(self) -> None:
        for name in ("max_batch", "opt_text_tokens", "max_text_tokens", "max_seg"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProfileConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.opt_new_tokens < 0:
            raise ValueError(
                f"ProfileConfig.opt_new_tokens must be >= 0, got {self.opt_new_tokens}"
            )
        if self.opt_text_tokens > self.max_text_tokens:
            raise ValueError("ProfileConfig.opt_text_tokens must not exceed max_text_tokens")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"ProfileConfig.max_context must be >= 2, got {self.max_context}")
        if self.version != PROFILE_CONFIG_VERSION:
            raise ValueError(
                f"ProfileConfig version {self.version} is not {PROFILE_CONFIG_VERSION}"
            )

    def context(self, cfg: CitrusVConfig) -> int:
        """The KV-cache length the LLM engine serves for `cfg`."""
        limit = cfg.text.max_position_embeddings
        ctx = self.max_context if self.max_context is not None else min(DEFAULT_MAX_CONTEXT, limit)
        if ctx > limit:
            raise ValueError(
                f"max_context {ctx} exceeds {cfg.name}'s max_position_embeddings {limit}; "
                "pass a smaller max_context"
            )
        return ctx

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "profile_config") -> ProfileConfig:
        names = {"max_batch", "opt_text_tokens", "max_text_tokens", "opt_new_tokens", "max_seg"}
        kw = {n: field(d, n, int, where) for n in sorted(names)}
        kw["max_context"] = field(d, "max_context", (int, type(None)), where)
        kw["version"] = field(d, "version", int, where)
        try:
            return cls(**kw)
        except ValueError as e:
            raise EnginePlanError(f"{where}: {e}") from e


@dataclass(frozen=True)
class AxisRange:
    """min <= opt <= max of one dynamic axis."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"axis range must satisfy 0 <= min <= opt <= max, got {self}")

    @property
    def fixed(self) -> bool:
        return self.min == self.max

    def pinned(self) -> AxisRange:
        """The range fixed at its opt value (DLA takes no dynamic dimensions)."""
        return AxisRange(self.opt, self.opt, self.opt)


@dataclass(frozen=True)
class AxisProfile:
    """One optimisation profile per named dynamic axis, e.g. `decode`: seq 1..1, past 1..2047."""

    name: str
    axes: tuple[tuple[str, AxisRange], ...]

    def range(self, axis: str) -> AxisRange:
        for name, r in self.axes:
            if name == axis:
                return r
        raise KeyError(axis)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    def pinned(self) -> AxisProfile:
        return AxisProfile(self.name, tuple((n, r.pinned()) for n, r in self.axes))

    def to_dict(self) -> dict[str, Any]:
        return {n: [r.min, r.opt, r.max] for n, r in self.axes}


def _axes(name: str, **ranges: tuple[int, int, int]) -> AxisProfile:
    return AxisProfile(name, tuple((k, AxisRange(*v)) for k, v in ranges.items()))


@dataclass(frozen=True)
class InputShape:
    """min/opt/max shape of one dynamic graph input: what `IOptimizationProfile.set_shape` takes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"input {self.name}: min/opt/max ranks differ")
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not 0 <= lo <= mid <= hi:
                raise ValueError(f"input {self.name}: need 0 <= min <= opt <= max per dim")

    @property
    def fixed(self) -> bool:
        return self.min == self.max


@dataclass(frozen=True)
class OptimizationProfile:
    """A resolved profile: axis ranges (readable) and the per-input shapes TensorRT gets.

    Inputs whose dims are all fixed in the graph are not listed (they need no `set_shape`).
    """

    name: str
    axes: AxisProfile
    inputs: tuple[InputShape, ...]

    @property
    def fixed(self) -> bool:
        return all(s.fixed for s in self.inputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "axes": self.axes.to_dict(),
            "inputs": {
                s.name: {"min": list(s.min), "opt": list(s.opt), "max": list(s.max)}
                for s in self.inputs
            },
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> OptimizationProfile:
        """Inverse of `to_dict`; EnginePlanError naming the field on bad input."""
        name = field(d, "name", str, where)
        axes_d = field(d, "axes", dict, where)
        inputs_d = field(d, "inputs", dict, where)
        axes, inputs = [], []
        try:
            for k, v in axes_d.items():
                axes.append((k, AxisRange(*int_tuple(v, f"{where}.axes.{k}"))))
            for k, v in inputs_d.items():
                at = f"{where}.inputs.{k}"
                dims = [int_tuple(field(v, key, list, at), f"{at}.{key}") for key in _MIN_OPT_MAX]
                inputs.append(InputShape(k, *dims))
        except EnginePlanError:
            raise
        except (TypeError, ValueError) as e:
            raise EnginePlanError(f"{where}: {e}") from e
        return cls(name, AxisProfile(name, tuple(axes)), tuple(inputs))


_MIN_OPT_MAX = ("min", "opt", "max")


# -- vision --------------------------------------------------------------------------------
def vision_axes(hw: tuple[int, int], cfg: CitrusVConfig) -> dict[str, int]:
    """Axis sizes of the vision graph for one image already resized to `hw` (multiples of 28).

    n_patches = (h/14)(w/14); n_units = n_patches / merge^2 (= the image's LLM tokens);
    n_windows = ceil(units_h / side) * ceil(units_w / side), side = window_size / 14 / merge.
    """
    v = cfg.vision
    factor = v.patch_size * v.spatial_merge_size
    h, w = hw
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not a multiple of {factor}")
    uh, uw = h // factor, w // factor  # merge units per side
    side = v.window_size // v.patch_size // v.spatial_merge_size  # merge units per window side
    units = uh * uw
    return {
        "n_patches": units * v.spatial_merge_size**2,
        "n_units": units,
        "n_windows": math.ceil(uh / side) * math.ceil(uw / side),
    }


def admissible_sizes(target: Target, cfg: CitrusVConfig) -> list[tuple[int, int]]:
    """Every (h, w) `smart_resize` can return inside the target's `max_hw` box.

    Sides are multiples of f = 28 with aspect at most 200, and the area is either within
    [min_pixels, max_pixels] (rounded as is), or what scaling to a budget with floored or
    ceiled sides leaves: h*w <= max_pixels < (h+f)(w+f) for an image scaled down,
    (h-f)(w-f) < min_pixels <= h*w for one scaled up. So with a narrow budget (min = max)
    a size may fall below min_pixels or above max_pixels.
    """
    pp = cfg.preprocess
    f = pp.factor
    lo, hi = pp.min_pixels, pp.max_pixels
    top_h, top_w = target.resolution.max_hw

    def reachable(h: int, w: int) -> bool:
        area = h * w
        return lo <= area <= hi or area <= hi < (h + f) * (w + f) or (h - f) * (w - f) < lo <= area

    sizes = [
        (h, w)
        for h in range(f, top_h + 1, f)
        for w in range(f, top_w + 1, f)
        if reachable(h, w) and max(h, w) / min(h, w) <= MAX_ASPECT
    ]
    if not sizes:
        raise ValueError(
            f"no image size fits {target.name}'s profile (max {top_h}x{top_w}) within "
            f"{cfg.name}'s pixel budget {pp.min_pixels}..{pp.max_pixels}"
        )
    return sizes


def _resized(hw: tuple[int, int], cfg: CitrusVConfig) -> tuple[int, int]:
    from citrus_edge.preprocess import smart_resize  # numpy + Pillow: only when planning

    pp = cfg.preprocess
    return smart_resize(hw[0], hw[1], pp.factor, pp.min_pixels, pp.max_pixels)


def vision_ranges(target: Target, cfg: CitrusVConfig) -> dict[str, AxisRange]:
    """Axis ranges of the vision graph on `target` (see the module docstring)."""
    per_size = [vision_axes(hw, cfg) for hw in admissible_sizes(target, cfg)]
    opt_hw = _resized(target.resolution.opt_hw, cfg)
    top = target.resolution.max_hw
    if opt_hw[0] > top[0] or opt_hw[1] > top[1]:
        raise ValueError(f"{target.name}: opt size {opt_hw} resizes beyond max_hw {top}")
    opt = vision_axes(opt_hw, cfg)
    return {
        axis: AxisRange(min(s[axis] for s in per_size), opt[axis], max(s[axis] for s in per_size))
        for axis in opt
    }


def vision_profiles(target: Target, cfg: CitrusVConfig, pc: ProfileConfig) -> tuple[AxisProfile]:
    """One profile: every admissible image size (one image per call)."""
    r = vision_ranges(target, cfg)
    return (AxisProfile("default", tuple(r.items())),)


# -- LLM -----------------------------------------------------------------------------------
def llm_profiles(
    target: Target, cfg: CitrusVConfig, pc: ProfileConfig
) -> tuple[AxisProfile, AxisProfile]:
    """`prefill` (past = 0, the prompt) and `decode` (seq = 1, past 1..max_context-1)."""
    image = vision_ranges(target, cfg)["n_units"]  # image tokens = merge units
    ctx = pc.context(cfg)
    opt_prompt = image.opt + pc.opt_text_tokens
    max_prompt = image.max + pc.max_text_tokens
    if max_prompt >= ctx:
        raise ValueError(
            f"the longest prompt ({image.max} image + {pc.max_text_tokens} text tokens) leaves "
            f"no room to generate within max_context {ctx}; raise max_context or lower "
            "max_text_tokens"
        )
    b = (1, 1, pc.max_batch)
    prompt = (1, min(opt_prompt, max_prompt), max_prompt)
    opt_past = min(opt_prompt + pc.opt_new_tokens, ctx - 1)
    past = (1, opt_past, ctx - 1)
    prefill = _axes("prefill", batch=b, seq=prompt, past=(0, 0, 0), total=prompt)
    decode = _axes("decode", batch=b, seq=(1, 1, 1), past=past, total=tuple(p + 1 for p in past))
    return prefill, decode


# -- SAM2 ----------------------------------------------------------------------------------
def sam_encoder_profiles(
    target: Target, cfg: CitrusVConfig, pc: ProfileConfig
) -> tuple[AxisProfile]:
    """Batch 1..max_batch; the image size is fixed in the graph."""
    if cfg.sam2.image_size > target.resolution.sam_max_side:
        raise ValueError(
            f"SAM2 input {cfg.sam2.image_size} exceeds {target.name}'s engine profile "
            f"({target.resolution.sam_max_side}); this model cannot be built for this target"
        )
    return (_axes("default", batch=(1, 1, pc.max_batch)),)


def mask_decoder_profiles(
    target: Target, cfg: CitrusVConfig, pc: ProfileConfig
) -> tuple[AxisProfile]:
    """n (`[SEG]` states per call) 1..max_seg, tuned for one."""
    return (_axes("default", n=(1, 1, pc.max_seg)),)


ProfileBuilder = Callable[["Target", "CitrusVConfig", ProfileConfig], tuple[AxisProfile, ...]]
PROFILE_BUILDERS: dict[str, ProfileBuilder] = {
    "vision": vision_profiles,
    "llm": llm_profiles,
    "sam_encoder": sam_encoder_profiles,
    "mask_decoder": mask_decoder_profiles,
}


def axis_profiles(
    component: str, target: Target, cfg: CitrusVConfig, pc: ProfileConfig
) -> tuple[AxisProfile, ...]:
    """The axis profiles of `component` on `target` (registry `PROFILE_BUILDERS`)."""
    try:
        builder = PROFILE_BUILDERS[component]
    except KeyError:
        raise ValueError(
            f"no profile builder for component {component!r}; known: {sorted(PROFILE_BUILDERS)}"
        ) from None
    return builder(target, cfg, pc)


def resolve_profile(
    axes: AxisProfile, inputs: Sequence[GraphInput], component: str
) -> OptimizationProfile:
    """Per-input min/opt/max shapes of `axes` for the graph inputs `inputs`.

    Raises EnginePlanError when an input has an unnamed dynamic dim, or a named axis the profile
    does not cover (the export and this module disagree on the axis names).
    """
    shapes = []
    for inp in inputs:
        if not inp.dynamic:
            continue
        lo, mid, hi = [], [], []
        for i, d in enumerate(inp.dims):
            if d is None:
                raise EnginePlanError(
                    f"{component}: input {inp.name} dim {i} is dynamic without a name; "
                    "re-export the graph with named dynamic axes"
                )
            if isinstance(d, int):
                r = AxisRange(d, d, d)
            elif d in axes.axis_names:
                r = axes.range(d)
            else:
                raise EnginePlanError(
                    f"{component}: input {inp.name} has dynamic axis {d!r}, which the "
                    f"{axes.name!r} profile does not cover (it covers {list(axes.axis_names)}); "
                    "the export's axis names and citrus_edge.engines.profiles disagree"
                )
            lo.append(r.min)
            mid.append(r.opt)
            hi.append(r.max)
        shapes.append(InputShape(inp.name, tuple(lo), tuple(mid), tuple(hi)))
    return OptimizationProfile(axes.name, axes, tuple(shapes))
