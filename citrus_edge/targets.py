"""Deployment targets: what each machine has and which precisions it can run (torch-free).

The runtime on a cart imports this module, so it imports the standard library,
`citrus_edge.recipes` and `citrus_edge.jetson` (standard library only) and nothing else.

Users name targets as they say them: an exact name (`orin-nano-8`) or a family (`orin`,
`orin-agx`, `orin-nx`, `orin-nano`; `thor` is both). `resolve_target` turns a family into one
member: on a Jetson of that family, the module this machine is (device tree + memory size,
`citrus_edge.jetson`); elsewhere the family's documented default member (`FAMILIES`). Device figures come from /work/shared/ANCHORS.md (NVIDIA data
sheets and the TensorRT Edge-LLM support matrix); each number carries its source in a comment.
Figures marked "representative" describe one card we picked for a class of machine, and figures
marked "assumption" are our own choices (memory kept for the OS and the cart's software, engine
resolution profiles); neither is a measurement.

Units: GB = 1e9 bytes, GB/s = 1e9 bytes/s (data-sheet units; conservative for memory sold in
GiB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from citrus_edge.jetson import JetsonModule, detect_jetson
from citrus_edge.recipes import COMPONENTS, PRECISIONS, RECIPES, Recipe

KINDS = ("cpu", "jetson", "x86-gpu")

# Why a precision is missing on a target, by precision; `{family}` is the target's family.
_MISSING_WHY = {
    "fp16": "{family} runs fp32/int8/int4 kernels only; fp16 is not a CPU format here",
    "bf16": "{family} runs fp32/int8/int4 kernels only; bf16 is not a CPU format here",
    "fp8": "{family} has no FP8 tensor cores; FP8 needs sm_89+ (Ada, Hopper, Blackwell)",
    "nvfp4": "{family} has no FP4 tensor cores; NVFP4 needs Blackwell",
}


class UnsupportedPrecisionError(ValueError):
    """A recipe asks a target for a precision its hardware or runtime cannot run."""


@dataclass(frozen=True)
class ResolutionProfile:
    """Image sizes the target's engines are built for (TensorRT optimisation profiles).

    `min_hw`, `opt_hw`, `max_hw`: (height, width) in pixels of the image the Qwen2.5-VL branch
    sees after `smart_resize`; sides are multiples of 28 (patch 14 x merge 2).
    `sam_max_side`: the largest square SAM2 input the target's engines are built for.
    """

    min_hw: tuple[int, int]
    opt_hw: tuple[int, int]
    max_hw: tuple[int, int]
    sam_max_side: int = 1024

    def __post_init__(self) -> None:
        sides = (*self.min_hw, *self.opt_hw, *self.max_hw)
        if any(s <= 0 or s % 28 for s in sides):
            raise ValueError(f"resolution profile sides {sides} must be positive multiples of 28")
        for lo, hi in ((self.min_hw, self.opt_hw), (self.opt_hw, self.max_hw)):
            if lo[0] > hi[0] or lo[1] > hi[1]:
                raise ValueError(f"resolution profile must grow min <= opt <= max, got {self}")
        if self.sam_max_side <= 0 or self.sam_max_side % 32:
            raise ValueError(f"sam_max_side {self.sam_max_side} must be a positive multiple of 32")

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_hw": list(self.min_hw),
            "opt_hw": list(self.opt_hw),
            "max_hw": list(self.max_hw),
            "sam_max_side": self.sam_max_side,
        }


@dataclass(frozen=True)
class Target:
    """One deployment machine class.

    `memory_gb` is the memory the models share: unified LPDDR5 on Jetson, system RAM on the
    CPU target, the card's VRAM on x86 GPUs. `os_reserve_gb` is kept for the OS and the cart's
    own software. `bandwidth_gbs` is None where no figure is confirmed (the planner then says
    "unknown" instead of inventing one). `int8_tops` is the data-sheet sparse INT8 figure, None
    where there is none we can cite.
    """

    name: str
    kind: str
    family: str  # short architecture name used in messages, e.g. "Jetson Orin (Ampere sm_87)"
    gpu: str
    sm: str | None
    memory_gb: float
    bandwidth_gbs: float | None
    int8_tops: float | None
    precisions: frozenset[str]
    dla_cores: int
    default_recipe: str
    resolution: ResolutionProfile
    os_reserve_gb: float
    tensorrt: bool
    notes: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"target {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if (self.sm is None) != (self.kind == "cpu"):
            raise ValueError(f"target {self.name}: sm must be None exactly for the cpu kind")
        unknown = self.precisions - set(PRECISIONS)
        if unknown:
            raise ValueError(f"target {self.name}: unknown precisions {sorted(unknown)}")
        if not 0 <= self.os_reserve_gb < self.memory_gb:
            raise ValueError(f"target {self.name}: os_reserve_gb must lie in [0, memory_gb)")
        if self.default_recipe not in RECIPES:
            raise ValueError(
                f"target {self.name}: default recipe {self.default_recipe!r} is not one of "
                f"{', '.join(RECIPES)}"
            )
        missing = {p for _, p in RECIPES[self.default_recipe].items()} - self.precisions
        if missing:
            raise ValueError(
                f"target {self.name}: default recipe {self.default_recipe!r} needs "
                f"{sorted(missing)}, which the target does not support"
            )

    @property
    def usable_memory_gb(self) -> float:
        """Memory left for the models: `memory_gb - os_reserve_gb`."""
        return self.memory_gb - self.os_reserve_gb

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (precisions sorted)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "family": self.family,
            "gpu": self.gpu,
            "sm": self.sm,
            "memory_gb": self.memory_gb,
            "bandwidth_gbs": self.bandwidth_gbs,
            "int8_tops": self.int8_tops,
            "precisions": sorted(self.precisions),
            "dla_cores": self.dla_cores,
            "default_recipe": self.default_recipe,
            "resolution": self.resolution.to_dict(),
            "os_reserve_gb": self.os_reserve_gb,
            "tensorrt": self.tensorrt,
            "notes": self.notes,
        }


# -- precision sets ------------------------------------------------------------------------
# CPU: ONNX Runtime fp32, int8 (QDQ / dynamic), int4 weight-only (MatMulNBits). No fp16.
CPU_PRECISIONS = frozenset({"fp32", "int8", "int4"})
# Jetson Orin = Ampere sm_87: FP16/BF16/INT8, INT4 weight-only. NO FP8 or FP4 (TensorRT
# Edge-LLM support matrix: "Jetson Orin does not run FP8 or FP4 model engines").
AMPERE_PRECISIONS = frozenset({"fp32", "fp16", "bf16", "int8", "int4"})
# Ada sm_89 and Hopper sm_90 add FP8 (Edge-LLM support matrix: FP8 needs SM89+).
FP8_PRECISIONS = AMPERE_PRECISIONS | {"fp8"}
# Blackwell (Jetson Thor) adds NVFP4 (ANCHORS.md: "FP8 yes, and NVFP4").
BLACKWELL_PRECISIONS = FP8_PRECISIONS | {"nvfp4"}

# -- resolution profiles (assumption: our engine profiles, sized to each memory class) -------
# The 8B model's own pixel budget (max_pixels 65535) resizes to at most 252x252; larger
# profiles leave room for configs with a bigger budget.
SMALL_PROFILE = ResolutionProfile(min_hw=(56, 56), opt_hw=(252, 252), max_hw=(448, 448))
MEDIUM_PROFILE = ResolutionProfile(min_hw=(56, 56), opt_hw=(252, 252), max_hw=(728, 728))
LARGE_PROFILE = ResolutionProfile(min_hw=(56, 56), opt_hw=(504, 504), max_hw=(1008, 1008))

# Default recipes: every GPU target defaults to "fp16-w4" (fp16 encoders and decoder, int4
# weight-only LLM), the configuration TensorRT Edge-LLM publishes for Qwen2.5-VL-7B on Orin and
# Thor (ANCHORS.md), so one validated accuracy profile serves all GPU carts; fp8 is opt-in on
# sm_89+ and never the default (never on Orin at all). The CPU target defaults to "int8"
# (ONNX Runtime int8 everywhere).
_TARGETS = (
    Target(
        name="cpu",
        kind="cpu",
        family="x86-64 CPU (ONNX Runtime)",
        gpu="none (x86-64 CPU, ONNX Runtime CPU execution provider)",
        sm=None,
        memory_gb=32.0,  # representative cart PC (assumption)
        bandwidth_gbs=76.8,  # representative: dual-channel DDR5-4800, 2 x 38.4 GB/s (assumption)
        int8_tops=None,
        precisions=CPU_PRECISIONS,
        dla_cores=0,
        default_recipe="int8",
        resolution=SMALL_PROFILE,
        os_reserve_gb=8.0,  # assumption: OS + cart software on a general-purpose PC
        tensorrt=False,
        notes="representative figures (32 GB DDR5-4800 dual channel), not a specific machine",
    ),
    Target(
        name="orin-agx-64",
        kind="jetson",
        family="Jetson Orin (Ampere sm_87)",
        gpu="Ampere, 2048 CUDA cores / 64 Tensor Cores",  # Jetson AGX Orin data sheet DS-10662-001
        sm="8.7",  # data sheet / Edge-LLM support matrix
        memory_gb=64.0,  # 64 GB shared LPDDR5, DS-10662-001
        bandwidth_gbs=204.8,  # DS-10662-001
        int8_tops=275.0,  # sparse, GPU 171 + DLA 105, DS-10662-001
        precisions=AMPERE_PRECISIONS,
        dla_cores=2,  # 2x NVDLA v2, DS-10662-001
        default_recipe="fp16-w4",
        resolution=MEDIUM_PROFILE,
        os_reserve_gb=8.0,  # assumption
        tensorrt=True,
    ),
    Target(
        name="orin-agx-32",
        kind="jetson",
        family="Jetson Orin (Ampere sm_87)",
        gpu="Ampere, 1792 CUDA cores / 56 Tensor Cores",  # DS-10662-001
        sm="8.7",  # DS-10662-001
        memory_gb=32.0,  # 32 GB shared LPDDR5, DS-10662-001
        bandwidth_gbs=204.8,  # DS-10662-001
        int8_tops=200.0,  # sparse, DS-10662-001
        precisions=AMPERE_PRECISIONS,
        dla_cores=2,  # DS-10662-001
        default_recipe="fp16-w4",
        resolution=MEDIUM_PROFILE,
        os_reserve_gb=6.0,  # assumption
        tensorrt=True,
    ),
    Target(
        name="orin-nx-16",
        kind="jetson",
        family="Jetson Orin (Ampere sm_87)",
        gpu="Ampere, 1024 CUDA cores / 32 Tensor Cores",  # Jetson Orin NX data sheet
        sm="8.7",  # Orin NX data sheet
        memory_gb=16.0,  # 16 GB shared LPDDR5, Orin NX data sheet
        bandwidth_gbs=102.4,  # Orin NX data sheet
        int8_tops=100.0,  # sparse, Orin NX data sheet (157 in "Super" mode: unconfirmed)
        precisions=AMPERE_PRECISIONS,
        dla_cores=2,  # Orin NX data sheet
        default_recipe="fp16-w4",
        resolution=SMALL_PROFILE,
        os_reserve_gb=4.0,  # assumption
        tensorrt=True,
        notes='157 INT8 TOPS in "Super" mode is unconfirmed (ANCHORS.md)',
    ),
    Target(
        name="orin-nano-8",
        kind="jetson",
        family="Jetson Orin (Ampere sm_87)",
        gpu="Ampere, 1024 CUDA cores / 32 Tensor Cores",  # Jetson Orin Nano data sheet
        sm="8.7",  # Orin Nano data sheet
        memory_gb=8.0,  # 8 GB shared LPDDR5, Orin Nano data sheet
        bandwidth_gbs=68.0,  # Orin Nano data sheet; 102 GB/s in "Super" mode (JetPack 6.2)
        int8_tops=40.0,  # sparse, Orin Nano data sheet (67 in "Super" mode)
        precisions=AMPERE_PRECISIONS,
        dla_cores=0,  # Orin Nano has no DLA (data sheet)
        default_recipe="fp16-w4",
        resolution=SMALL_PROFILE,
        os_reserve_gb=2.5,  # assumption: JetPack desktop ~1.5 GB + the cart's own software
        tensorrt=True,
        notes='68 GB/s at the stock power mode; 102 GB/s (67 INT8 TOPS) in "Super" mode',
    ),
    Target(
        name="thor",
        kind="jetson",
        family="Jetson Thor (Blackwell)",
        gpu="Blackwell",  # ANCHORS.md (Jetson AGX Thor)
        sm="11.0",  # not in ANCHORS.md: CUDA 13 names Thor sm_110 (sm_101 in CUDA 12.8); verify
        memory_gb=128.0,  # 128 GB shared, ANCHORS.md (Jetson AGX Thor)
        bandwidth_gbs=None,  # "not confirmed" in ANCHORS.md: unknown, not invented
        int8_tops=None,  # ANCHORS.md gives "up to 2070 FP4 TFLOPS" only
        precisions=BLACKWELL_PRECISIONS,
        dla_cores=0,  # ANCHORS.md lists none ("-")
        default_recipe="fp16-w4",
        resolution=LARGE_PROFILE,
        os_reserve_gb=12.0,  # assumption
        tensorrt=True,
        notes="memory bandwidth not confirmed (ANCHORS.md); up to 2070 FP4 TFLOPS",
    ),
    Target(
        name="x86-ampere",
        kind="x86-gpu",
        family="Ampere (RTX A6000, sm_86)",
        gpu="NVIDIA RTX A6000 (representative Ampere workstation card)",
        sm="8.6",  # representative: RTX A6000 (GA102)
        memory_gb=48.0,  # representative: RTX A6000, 48 GB GDDR6
        bandwidth_gbs=768.0,  # representative: RTX A6000, 768 GB/s
        int8_tops=None,  # not in ANCHORS.md; the planner does not need it
        precisions=AMPERE_PRECISIONS,
        dla_cores=0,
        default_recipe="fp16-w4",
        resolution=LARGE_PROFILE,
        os_reserve_gb=1.5,  # assumption: CUDA context + display on a dedicated card
        tensorrt=True,
        notes="representative card (RTX A6000), not a measured machine",
    ),
    Target(
        name="x86-ada",
        kind="x86-gpu",
        family="Ada (RTX 6000 Ada, sm_89)",
        gpu="NVIDIA RTX 6000 Ada Generation (representative Ada workstation card)",
        sm="8.9",  # representative: RTX 6000 Ada (AD102); FP8 from sm_89 (Edge-LLM matrix)
        memory_gb=48.0,  # representative: RTX 6000 Ada, 48 GB GDDR6
        bandwidth_gbs=960.0,  # representative: RTX 6000 Ada, 960 GB/s
        int8_tops=None,  # not in ANCHORS.md; the planner does not need it
        precisions=FP8_PRECISIONS,
        dla_cores=0,
        default_recipe="fp16-w4",
        resolution=LARGE_PROFILE,
        os_reserve_gb=1.5,  # assumption
        tensorrt=True,
        notes="representative card (RTX 6000 Ada), not a measured machine",
    ),
    Target(
        name="x86-hopper",
        kind="x86-gpu",
        family="Hopper (H100 PCIe, sm_90)",
        gpu="NVIDIA H100 PCIe (representative Hopper card)",
        sm="9.0",  # representative: H100 (GH100)
        memory_gb=80.0,  # representative: H100 PCIe, 80 GB HBM2e
        bandwidth_gbs=2000.0,  # representative: H100 PCIe, 2.0 TB/s
        int8_tops=None,  # not in ANCHORS.md; the planner does not need it
        precisions=FP8_PRECISIONS,
        dla_cores=0,
        default_recipe="fp16-w4",
        resolution=LARGE_PROFILE,
        os_reserve_gb=1.5,  # assumption
        tensorrt=True,
        notes="representative card (H100 PCIe), not a measured machine",
    ),
)

TARGETS: dict[str, Target] = {t.name: t for t in _TARGETS}


@dataclass(frozen=True)
class Family:
    """Targets users name together, e.g. `orin`. `default` is the member a family name means on
    a machine that is not one of its Jetsons (a workstation cross-building for the device)."""

    name: str
    members: tuple[str, ...]
    default: str

    def __post_init__(self) -> None:
        if self.default not in self.members or not set(self.members) <= set(TARGETS):
            raise ValueError(f"family {self.name}: members must be targets, default a member")


# The default of each family is its largest module (the one TensorRT Edge-LLM publishes for):
# a bundle built for it plans the widest engine profiles; `citrus-edge engines build` on a
# smaller module re-plans for that module (engines are built on the device anyway).
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("orin", ("orin-agx-64", "orin-agx-32", "orin-nx-16", "orin-nano-8"), "orin-agx-64"),
        Family("orin-agx", ("orin-agx-64", "orin-agx-32"), "orin-agx-64"),
        Family("orin-nx", ("orin-nx-16",), "orin-nx-16"),
        Family("orin-nano", ("orin-nano-8",), "orin-nano-8"),
    )
}
# Device-tree family (citrus_edge.jetson.family_of) -> the targets that are such a module.
MODULE_FAMILIES: dict[str, tuple[str, ...]] = {
    "orin-agx": ("orin-agx-64", "orin-agx-32"),
    "orin-nx": ("orin-nx-16",),
    "orin-nano": ("orin-nano-8",),
    "thor": ("thor",),
}
# MemTotal is below the nominal size (carve-outs: ~7.6 GB of an 8 GB Orin Nano) and a module
# with half the memory must not pass for the larger one: accept [0.75, 1.25] x nominal.
MEMORY_TOLERANCE = (0.75, 1.25)


class UnknownModuleError(ValueError):
    """This Jetson is a module no target describes (e.g. an Orin NX 8GB, an Orin Nano 4GB)."""


@dataclass(frozen=True)
class TargetResolution:
    """How a target name a user typed became a target.

    `how`: "exact" (a target name), "this device" (a family name on a Jetson of that family:
    the module this machine is), or "family default" (a family name anywhere else).
    `device`: the Jetson's device-tree model and memory where one was read, else None.
    """

    requested: str
    target: Target
    how: str
    device: str | None = None

    def describe(self) -> str:
        """One line for a summary, e.g. "orin -> orin-agx-64 (the orin family's default ...)"."""
        if self.how == "exact":
            return f"target {self.target.name}"
        if self.how == "this device":
            return f"target {self.requested} -> {self.target.name} (this device: {self.device})"
        members = ", ".join(FAMILIES[self.requested].members)
        return (
            f"target {self.requested} -> {self.target.name} (no {self.requested} Jetson here: "
            f"the family's default; members {members}; pass one of them to choose)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "resolved": self.target.name,
            "how": self.how,
            "device": self.device,
        }


def module_target(module: JetsonModule) -> Target:
    """The target a detected Jetson module is; UnknownModuleError if none describes it."""
    members = MODULE_FAMILIES.get(module.family or "", ())
    if not members:
        raise UnknownModuleError(
            f"this Jetson ({module.describe()}) is none of the targets' modules; pass an exact "
            f"--target ({', '.join(TARGETS)}) or add the module to citrus_edge/targets.py"
        )
    if module.memory_gb is None:
        if len(members) == 1:
            return TARGETS[members[0]]
        raise UnknownModuleError(
            f"cannot read /proc/meminfo to tell {', '.join(members)} apart on {module.model}; "
            "pass the exact --target"
        )
    lo, hi = MEMORY_TOLERANCE
    fits = [
        m
        for m in members
        if lo * TARGETS[m].memory_gb <= module.memory_gb <= hi * TARGETS[m].memory_gb
    ]
    if not fits:
        sizes = ", ".join(f"{m} {TARGETS[m].memory_gb:g} GB" for m in members)
        raise UnknownModuleError(
            f"this Jetson ({module.describe()}) has a memory size no target has ({sizes}); "
            "pass an exact --target to build for one of those modules anyway, or add this "
            "module to citrus_edge/targets.py"
        )
    return TARGETS[max(fits, key=lambda m: TARGETS[m].memory_gb)]


def resolve_target(name: str, root: Any = None) -> TargetResolution:
    """The target `name` means here: an exact target name, or a family (see `FAMILIES`).

    root: the file-system root the Jetson detection reads (`citrus_edge.jetson`; tests pass a
    folder of fake device-tree files). ValueError listing the names otherwise;
    UnknownModuleError on a Jetson of the family that no target describes.
    """
    if name in TARGETS:
        return TargetResolution(name, TARGETS[name], "exact")
    family = FAMILIES.get(name)
    if family is None:
        raise ValueError(
            f"unknown target {name!r}; choose one of {', '.join(TARGETS)} or a family "
            f"({', '.join(FAMILIES)})"
        )
    module = detect_jetson(root)
    if module is not None and set(MODULE_FAMILIES.get(module.family or "", ())) & set(
        family.members
    ):
        target = module_target(module)
        return TargetResolution(name, target, "this device", module.describe())
    device = None if module is None else module.describe()
    return TargetResolution(name, TARGETS[family.default], "family default", device)


def get_target(name: str) -> Target:
    """The target called `name` (an exact name or a family, see `resolve_target`); ValueError
    listing the known names otherwise."""
    return resolve_target(name).target


def family_lines() -> list[str]:
    """One line per family name, for `citrus-edge targets`: what it resolves to and where."""
    return [
        f"{f.name}: {', '.join(f.members)} (on such a Jetson: this module; elsewhere: {f.default})"
        for f in FAMILIES.values()
    ]


def targets_supporting(precision: str) -> list[str]:
    """Names of the targets that can run `precision`, in table order."""
    return [t.name for t in TARGETS.values() if precision in t.precisions]


def check_recipe(target: Target, recipe: Recipe) -> None:
    """Raise `UnsupportedPrecisionError` if `target` cannot run every component of `recipe`.

    The message names each refused component and precision, why the target lacks it, and the
    targets that do support it, so the caller can pick another recipe or another target.
    """
    problems = []
    for component in COMPONENTS:
        precision = recipe.precision(component)
        if target.supports(precision):
            continue
        why = _MISSING_WHY.get(precision, "{family} does not support it").format(
            family=target.family
        )
        able = ", ".join(targets_supporting(precision)) or "none"
        problems.append(
            f"{target.name} cannot run {precision} for {component} ({why}); "
            f"targets that can: {able}"
        )
    if problems:
        raise UnsupportedPrecisionError(
            f"recipe {recipe.name!r} does not run on {target.name}:\n  "
            + "\n  ".join(problems)
            + f"\nUse a recipe the target supports (its default is {target.default_recipe!r}) "
            "or choose one of the targets named."
        )
