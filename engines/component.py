"""One component's engine: its graph, precision, typing, builder flags, FP32 layers, DLA core.

`ComponentEngine` validates itself (EnginePlanError naming the field); the functions below make
the per-component decisions `plan.make_engine_plan` records:
- typing: an explicitly quantized (Q/DQ) graph is built strongly typed, so its own types decide
  precision and it takes no precision flags; a float graph is built weakly typed with the
  recipe's float flag (FP16 / BF16). A low-bit recipe needs a graph quantized to that type
  (`check_quantization`): no silent up- or downgrade.
- FP32 layers: Qwen2.5-VL's vision encoder built in plain FP16 gives garbage (RMSNorm overflow,
  ANCHORS.md "Known pitfalls"); its norms (`norm1`, `norm2`, the merger's `ln_q`) stay in FP32
  with OBEY_PRECISION_CONSTRAINTS whenever the vision graph gets the FP16 flag.
- fp32 precision clears TF32 (on by default in TensorRT): an fp32 recipe means fp32 math.
- DLA (only where requested): the SAM2 image encoder (the encoder with convolutions: patch
  embedding, FPN neck), FP16 only (DLA runs FP16/INT8, and INT8 on DLA would need TensorRT's
  deprecated implicit calibration), with GPU fallback for what DLA cannot run (attention) and
  fixed shapes (DLA takes no dynamic dimensions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from citrus_edge.recipes import COMPONENTS, PRECISIONS

from . import fields as f
from .engine_errors import EnginePlanError
from .graph_info import ORT_QUANT_OPS, GraphInfo
from .profiles import OptimizationProfile

# trt.BuilderFlag members a plan may name.
BUILDER_FLAGS = (
    "FP16",
    "BF16",
    "INT8",
    "FP8",
    "TF32",
    "OBEY_PRECISION_CONSTRAINTS",
    "GPU_FALLBACK",
)
PRECISION_FLAGS = frozenset({"FP16", "BF16", "INT8", "FP8"})  # forbidden when strongly typed
# Builder flags of a float precision built from a float32 graph (weakly typed network).
FLOAT_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}
# Low-bit element types an explicitly quantized graph must carry, per recipe precision.
QUANT_TYPES = {
    "int8": frozenset({"int8"}),
    "fp8": frozenset({"fp8"}),
    "int4": frozenset({"int4"}),
    "nvfp4": frozenset({"fp4", "fp8"}),  # fp4 weights, fp8 block scales
}
# ONNX Runtime's static int8 quantization keeps activations in uint8 by default (QUInt8) and
# stores biases as int32 dequantized with the product of input and weight scales.
ORT_EXTRA_QUANT_TYPES = {"int8": frozenset({"uint8", "int32"})}
# Layers kept in FP32 when a component is built with the FP16 flag: regexes on TensorRT layer
# names, which the ONNX parser takes from node names ("/norm1/Pow", "/visual/blocks.3/norm2/Add").
FP32_LAYER_PATTERNS: dict[str, tuple[str, ...]] = {
    "vision": (r"(^|/)norm[12](_\d+)?/", r"(^|/)ln_q(_\d+)?/"),
}
FP32_FOR_PRECISIONS = frozenset({"fp16"})  # bf16 has fp32's exponent range
# Strongly typed (Q/DQ) graphs are parsed from an fp16-carrier copy (`engines.float16`) so their
# unquantized layers run FP16, not FP32/TF32; these nodes stay float32 in it (regexes on ONNX
# node names): the vision RMSNorms (the fp16 overflow above) and the LLM's RMSNorms, which
# Qwen2's own code computes in float32 (`hidden_states.to(torch.float32)`).
FP16_CARRIER_KEEP_FP32: dict[str, tuple[str, ...]] = {
    "vision": FP32_LAYER_PATTERNS["vision"],
    "llm": (r"(^|/)(input_layernorm|post_attention_layernorm|norm)(_\d+)?/",),
}
DLA_COMPONENTS = ("sam_encoder",)
DLA_PRECISIONS = frozenset({"fp16"})


@dataclass(frozen=True)
class DataFile:
    """An external-data file of a graph (bundle-relative) and its sha256."""

    file: str
    sha256: str


@dataclass(frozen=True)
class ComponentEngine:
    """How one component's graph becomes one engine. Validates itself (EnginePlanError)."""

    component: str
    onnx: str  # bundle-relative path of the graph
    onnx_sha256: str
    precision: str
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    profiles: tuple[OptimizationProfile, ...]
    engine: str  # file name of the engine (or optimized graph) in the output directory
    cleared_flags: tuple[str, ...] = ()
    fp32_layers: tuple[str, ...] = ()  # regexes on layer names
    fp32_nodes_matched: int = 0  # ONNX nodes the regexes matched when the plan was made
    dla_core: int | None = None
    quant_types: tuple[str, ...] = ()
    external_data: tuple[DataFile, ...] = ()
    fp16_carrier: bool = False  # parse an fp16-carrier copy of the Q/DQ graph (engines.float16)

    def __post_init__(self) -> None:
        where = f"components[{self.component}]"
        if self.component not in COMPONENTS:
            raise EnginePlanError(f"{where}.component: not one of {COMPONENTS}")
        if self.precision not in PRECISIONS:
            raise EnginePlanError(
                f"{where}.precision: {self.precision!r} not one of {list(PRECISIONS)}"
            )
        for name in ("builder_flags", "cleared_flags"):
            unknown = sorted(set(getattr(self, name)) - set(BUILDER_FLAGS))
            if unknown:
                raise EnginePlanError(
                    f"{where}.{name}: unknown flags {unknown}; known: {BUILDER_FLAGS}"
                )
        self._check_typing(where)
        self._check_fp32(where)
        self._check_dla(where)
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise EnginePlanError(f"{where}.profiles: duplicate profile names {names}")

    def _check_typing(self, where: str) -> None:
        precision_flags = sorted(set(self.builder_flags) & PRECISION_FLAGS)
        if self.strongly_typed and precision_flags:
            raise EnginePlanError(
                f"{where}.builder_flags: {precision_flags} on a strongly typed network; its "
                "graph's own types decide precision, so it takes no precision flags"
            )
        expected = sorted(FLOAT_FLAGS.get(self.precision, ()))
        if (
            not self.strongly_typed
            and self.precision in FLOAT_FLAGS
            and precision_flags != expected
        ):
            raise EnginePlanError(
                f"{where}.builder_flags: a weakly typed {self.precision} network takes the "
                f"precision flags {expected}, got {precision_flags}"
            )
        if not self.strongly_typed and self.precision in QUANT_TYPES:
            raise EnginePlanError(
                f"{where}.strongly_typed: {self.precision} needs an explicitly quantized (Q/DQ) "
                "graph built strongly typed; quantize the component with compress first"
            )

    def _check_fp32(self, where: str) -> None:
        obey = "OBEY_PRECISION_CONSTRAINTS" in self.builder_flags
        if bool(self.fp32_layers) != obey:
            raise EnginePlanError(
                f"{where}.fp32_layers: layers forced to FP32 need OBEY_PRECISION_CONSTRAINTS in "
                "builder_flags, and that flag needs fp32_layers"
            )
        if self.fp32_layers and self.strongly_typed:
            raise EnginePlanError(f"{where}.fp32_layers: not allowed on a strongly typed network")
        if self.fp16_carrier and not self.strongly_typed:
            raise EnginePlanError(
                f"{where}.fp16_carrier: only strongly typed (Q/DQ) graphs are rewritten to fp16 "
                "carriers; a weakly typed one takes the FP16 builder flag"
            )
        for pattern in self.fp32_layers:
            try:
                re.compile(pattern)
            except re.error as e:
                raise EnginePlanError(f"{where}.fp32_layers: bad regex {pattern!r}: {e}") from e

    def _check_dla(self, where: str) -> None:
        fallback = "GPU_FALLBACK" in self.builder_flags
        if self.dla_core is None:
            if fallback:
                raise EnginePlanError(f"{where}.builder_flags: GPU_FALLBACK without a dla_core")
            return
        if self.dla_core < 0 or not fallback:
            raise EnginePlanError(f"{where}.dla_core: needs a core >= 0 and GPU_FALLBACK")
        if self.component not in DLA_COMPONENTS or self.precision not in DLA_PRECISIONS:
            raise EnginePlanError(
                f"{where}.dla_core: DLA serves {DLA_COMPONENTS} in {sorted(DLA_PRECISIONS)} only"
            )
        if not all(p.fixed for p in self.profiles):
            raise EnginePlanError(f"{where}.profiles: DLA needs min == opt == max on every axis")

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "onnx": self.onnx,
            "onnx_sha256": self.onnx_sha256,
            "external_data": [{"file": x.file, "sha256": x.sha256} for x in self.external_data],
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "quant_types": list(self.quant_types),
            "builder_flags": list(self.builder_flags),
            "cleared_flags": list(self.cleared_flags),
            "fp32_layers": list(self.fp32_layers),
            "fp32_nodes_matched": self.fp32_nodes_matched,
            "dla_core": self.dla_core,
            "fp16_carrier": self.fp16_carrier,
            "engine": self.engine,
            "profiles": [p.to_dict() for p in self.profiles],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ComponentEngine:
        data = [
            DataFile(
                f.field(x, "file", str, f"{where}.external_data[{i}]"),
                f.field(x, "sha256", str, f"{where}.external_data[{i}]"),
            )
            for i, x in enumerate(f.field(d, "external_data", list, where))
        ]
        profiles = f.field(d, "profiles", list, where)
        return cls(
            component=f.field(d, "component", str, where),
            onnx=f.field(d, "onnx", str, where),
            onnx_sha256=f.field(d, "onnx_sha256", str, where),
            external_data=tuple(data),
            precision=f.field(d, "precision", str, where),
            strongly_typed=f.field(d, "strongly_typed", bool, where),
            quant_types=f.str_tuple(d, "quant_types", where),
            builder_flags=f.str_tuple(d, "builder_flags", where),
            cleared_flags=f.str_tuple(d, "cleared_flags", where),
            fp32_layers=f.str_tuple(d, "fp32_layers", where),
            fp32_nodes_matched=f.field(d, "fp32_nodes_matched", int, where),
            dla_core=f.field(d, "dla_core", (int, type(None)), where),
            fp16_carrier=f.field(d, "fp16_carrier", bool, where, default=False),
            engine=f.field(d, "engine", str, where),
            profiles=tuple(
                OptimizationProfile.from_dict(p, f"{where}.profiles[{i}]")
                for i, p in enumerate(profiles)
            ),
        )


def quantized(graph: GraphInfo) -> bool:
    """True when the graph carries low-bit types of its own (Q/DQ or quantized operators)."""
    return bool(graph.quant_types)


def check_quantization(component: str, precision: str, graph: GraphInfo, backend: str) -> None:
    """The graph's quantization must be what the recipe asks for: no silent up/downgrade."""
    is_quantized = quantized(graph)
    if backend == "tensorrt" and is_quantized and not graph.has_qdq:
        raise EnginePlanError(
            f"{component}: {graph.path.name} is quantized with ONNX Runtime operators "
            f"({sorted(graph.op_types & set(ORT_QUANT_OPS))}), which TensorRT does not parse; "
            "quantize it for TensorRT (explicit Q/DQ) with `citrus-edge compress`"
        )
    if precision not in QUANT_TYPES:
        if is_quantized:
            raise EnginePlanError(
                f"{component}: recipe asks for {precision} but {graph.path.name} is quantized "
                f"({sorted(graph.quant_types)}); use the recipe the graph was quantized for"
            )
        return
    need = QUANT_TYPES[precision]
    allowed = need
    if backend == "onnxruntime":
        allowed = need | ORT_EXTRA_QUANT_TYPES.get(precision, frozenset())
    if not is_quantized:
        raise EnginePlanError(
            f"{component}: recipe asks for {precision} but {graph.path.name} has no Q/DQ "
            "(explicit quantization) nodes; quantize it with `citrus-edge compress` first "
            "(TensorRT's implicit INT8 calibrator is deprecated and not used)"
        )
    wrong = sorted(graph.quant_types - allowed)
    if wrong or not graph.quant_types & need:
        raise EnginePlanError(
            f"{component}: recipe asks for {precision} ({sorted(need)}) but {graph.path.name} "
            f"carries {sorted(graph.quant_types)}; re-quantize it or pick the matching recipe"
        )


def fp32_layers_for(
    component: str, precision: str, graph: GraphInfo
) -> tuple[tuple[str, ...], int]:
    """Patterns forcing FP32 for this component at this precision, and the nodes they match."""
    patterns = FP32_LAYER_PATTERNS.get(component, ())
    if not patterns or precision not in FP32_FOR_PRECISIONS:
        return (), 0
    regexes = [re.compile(p) for p in patterns]
    matched = sum(1 for n in graph.node_names if any(r.search(n) for r in regexes))
    if matched == 0:
        raise EnginePlanError(
            f"{component}: no node of {graph.path.name} matches the FP32 patterns {patterns}; "
            "the norms would run in FP16 (Qwen2.5-VL overflows): update FP32_LAYER_PATTERNS "
            "to the graph's node names"
        )
    return patterns, matched


def builder_flags_for(
    precision: str, strongly_typed: bool, fp32: bool, dla: bool
) -> tuple[tuple, tuple]:
    """(builder flags to set, flags to clear)."""
    flags = [] if strongly_typed else list(FLOAT_FLAGS.get(precision, ()))
    if fp32:
        flags.append("OBEY_PRECISION_CONSTRAINTS")
    if dla:
        flags.append("GPU_FALLBACK")
    cleared = ("TF32",) if precision == "fp32" and not strongly_typed else ()
    return tuple(flags), cleared
