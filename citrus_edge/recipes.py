"""Precision recipes: which number format each exported component runs in (torch-free).

A `Recipe` names one precision per component (`vision`, `llm`, `sam_encoder`, `mask_decoder`).
Recipes are frozen; derive variants with `Recipe.with_component` (a `dataclasses.replace`),
never by mutating a preset. `RECIPES` is the registry of named presets; `get_recipe` looks one up.

What a precision costs in bytes per weight lives in `PRECISIONS`, so the planner and reports
read one table instead of branching on names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

COMPONENTS: tuple[str, ...] = ("vision", "llm", "sam_encoder", "mask_decoder")

# fp16 scale per group of 128 int4 weights (AWQ / GPTQ / ORT MatMulNBits block size 128).
INT4_GROUP = 128
# NVFP4: one FP8 (E4M3) scale per block of 16 FP4 weights (plus one FP32 scale per tensor, ignored).
NVFP4_BLOCK = 16


@dataclass(frozen=True)
class Precision:
    """A number format and what one weight costs in it.

    `weight_bytes` counts the group scales of block formats (int4: +2/128 bytes, one fp16 scale
    per 128 weights; nvfp4: +1/16 bytes, one fp8 scale per 16). Per-channel int8 scales and
    per-tensor fp8 scales are under 0.1% of a layer and are not counted. `low_bit` formats
    apply to matmul/conv weights only; the other parameters (norms, biases, embedding tables)
    stay in the target's carrier float format. `llm_only` formats are weight-only schemes that
    exist for the LLM's GEMMs and GEMVs (int4 W4A16), not for the encoders.
    """

    name: str
    weight_bytes: float
    low_bit: bool
    llm_only: bool = False


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", 4.0, low_bit=False),
        Precision("fp16", 2.0, low_bit=False),
        Precision("bf16", 2.0, low_bit=False),
        Precision("int8", 1.0, low_bit=True),
        Precision("fp8", 1.0, low_bit=True),
        Precision("int4", 0.5 + 2 / INT4_GROUP, low_bit=True, llm_only=True),
        Precision("nvfp4", 0.5 + 1 / NVFP4_BLOCK, low_bit=True),
    )
}
# Precisions that need a quantization pass; fp32/fp16/bf16 graphs stay float in ONNX (TensorRT
# applies fp16 through builder flags).
LOW_BIT = frozenset(name for name, p in PRECISIONS.items() if p.low_bit)


def get_precision(name: str) -> Precision:
    """The `Precision` called `name`; ValueError listing the known names otherwise."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}"
        ) from None


@dataclass(frozen=True)
class Recipe:
    """One precision per component. Validates itself on construction."""

    name: str
    vision: str
    llm: str
    sam_encoder: str
    mask_decoder: str

    def __post_init__(self) -> None:
        for component in COMPONENTS:
            precision = get_precision(getattr(self, component))
            if precision.llm_only and component != "llm":
                raise ValueError(
                    f"recipe {self.name!r}: {precision.name} is a weight-only format for the "
                    f"LLM; give {component} one of fp32, fp16, bf16, int8, fp8, nvfp4"
                )

    def precision(self, component: str) -> str:
        """The precision name of `component`."""
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")
        return getattr(self, component)

    def items(self) -> tuple[tuple[str, str], ...]:
        """(component, precision) pairs in pipeline order."""
        return tuple((c, getattr(self, c)) for c in COMPONENTS)

    def with_component(self, component: str, precision: str, name: str | None = None) -> Recipe:
        """A derived recipe with `component` in `precision`; the original is left untouched.

        The derived name defaults to `<name>+<component>=<precision>` so reports never show a
        preset's name on a recipe that differs from it.
        """
        self.precision(component)  # validates the component name
        new_name = name or f"{self.name}+{component}={precision}"
        return dataclasses.replace(self, name=new_name, **{component: precision})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: name and the per-component precisions."""
        return {"name": self.name, "components": dict(self.items())}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """Inverse of `to_dict`."""
        return cls(name=d["name"], **d["components"])


FP32 = Recipe("fp32", vision="fp32", llm="fp32", sam_encoder="fp32", mask_decoder="fp32")
FP16 = Recipe("fp16", vision="fp16", llm="fp16", sam_encoder="fp16", mask_decoder="fp16")
INT8 = Recipe("int8", vision="int8", llm="int8", sam_encoder="int8", mask_decoder="int8")
# int8 encoders and decoder, int4 weight-only (W4A16) LLM.
INT8_W4 = Recipe("int8-w4", vision="int8", llm="int4", sam_encoder="int8", mask_decoder="int8")
# fp16 encoders and decoder, int4 weight-only LLM: the TensorRT Edge-LLM deployment
# (INT4-AWQ LLM + FP16 vision, ANCHORS.md "Published latencies").
FP16_W4 = Recipe("fp16-w4", vision="fp16", llm="int4", sam_encoder="fp16", mask_decoder="fp16")
# FP8 everywhere; needs sm_89+ (Ada, Hopper, Blackwell). Never on Jetson Orin.
FP8 = Recipe("fp8", vision="fp8", llm="fp8", sam_encoder="fp8", mask_decoder="fp8")

RECIPES: dict[str, Recipe] = {r.name: r for r in (FP32, FP16, INT8, INT8_W4, FP16_W4, FP8)}


def get_recipe(name: str) -> Recipe:
    """The preset recipe called `name`; ValueError listing the known names otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
