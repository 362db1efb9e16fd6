"""How each graph is quantized: typed settings per scheme, and the presets (torch-free).

One frozen dataclass per scheme; presets are the named constants below and variants come from
`dataclasses.replace` (never by mutating a preset). `QuantizeConfig` ties them to the components
for one `quantize` run.

Measured facts the presets rest on (this machine: x86-64 AVX2 without VNNI, ONNX Runtime 1.24):
- static QDQ with `reduce_range=True` (7-bit weights) — Qwen2.5-VL ViT output relative error
  0.044 with it, 0.42 without (u8s8 without VNNI saturates the 16-bit accumulators);
- dynamic quantization with UInt8 weights (the u8u8 kernels are the fast exact path there).
Norms, softmax and residual adds stay out of INT8: only the GEMM-like op types are quantized
(ANCHORS.md: ViT INT8 cosine 0.61 -> 0.98 when LayerNorm, softmax and residual adds stay float).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citrus_edge.host_inputs import check_table_dtype

QUANTIZE_CONFIG_VERSION = 1

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Default activation calibration per backend, chosen by measurement. Static INT8, CPU target,
# worst output SQNR (dB) per graph against FP32 on the recorded eval inputs of 60 phantoms
# (18 answers, 6 first masks), first-mask Dice drop and token agreement against FP32:
#
#   shipped demo model (citrus_edge/demo_model)  vision  sam_enc  mask_dec  Dice drop  tokens  time
#     minmax                                       46.9    37.2     46.2     0.0093   0.998    25 s
#     percentile (99.999)                          47.7    37.6     44.3     0.0095   0.998    22 s
#     entropy (2048 bins)                          19.8    38.8      5.7     0.1781   1.000   270 s
#   demo config at training step 1900 (measured first, before the demo model was shipped)
#     minmax                                       47.0    38.7     42.5     0.0056   0.997    29 s
#     percentile (99.999)                          48.2    39.4     42.6     0.0050   0.997    23 s
#     entropy (2048 bins)                          20.4    37.3      5.9     0.0151   0.997   329 s
#
# Percentile and minmax are close; percentile gives the higher worst-graph SQNR on both models
# (the SAM2 encoder, 37.6 vs 37.2 and 39.4 vs 38.7) and on the vision encoder, minmax the
# higher IoU-head SQNR of the shipped decoder; the Dice drops differ by less than one mask pixel
# in a thousand. Entropy (KL) clips the wide-tailed activations of these small models far too
# hard, and ORT's Python KL search is slow. (TINY random export: percentile 30.0 / 29.4 / 23.1,
# minmax 29.9 / 29.4 / 22.4.) ModelOpt (TensorRT targets) has no percentile; "minmax" ("max")
# is its default here, not ModelOpt's own "entropy", for the same reason.
DEFAULT_METHODS = {"onnxruntime": "percentile", "tensorrt": "minmax"}

# Op types whose weights / activations get INT8 in the encoders and the decoder (TensorRT).
GEMM_OP_TYPES = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# ONNX Runtime's CPU static INT8: MatMul and Gemm only. A QDQ Conv becomes the integer
# QLinearConv only with a Q on its output too (there is no "ConvIntegerToFloat";
# `StaticQdqSettings.quantize_outputs` stays off), so a quantized Conv ran as DequantizeLinear of
# its weight on every call plus a float Conv whose weight is no longer a constant (no NCHWc
# pre-packing). Measured on the demo's SAM2 encoder (ORT profiler, per-node medians, 1 thread,
# Intel Xeon with AVX-512 VNNI and AMX, 2026-12-03): its 5 such Convs 1.56 ms against 0.99 ms for
# the float graph's 7, plus 0.33 ms of DequantizeLinear; the whole int8 graph 1.16x the float
# one's node time. Conv and ConvTranspose stay float.
CPU_GEMM_OP_TYPES = ("MatMul", "Gemm")
# What "quantize the norms, softmax and residual adds too" adds (deliberately bad; tests).
EVERYTHING_OP_TYPES = GEMM_OP_TYPES + (
    "Add",
    "Mul",
    "Div",
    "Softmax",
    "LayerNormalization",
    "ReduceMean",
    "Pow",
    "Sqrt",
)


@dataclass(frozen=True)
class StaticQdqSettings:
    """ONNX Runtime static INT8 QDQ (CPU): calibrated activations, per-channel weights.

    `matmul_const_b_only`: quantize only MatMuls with a constant (weight) input, leaving the
    attention score / value products (softmax output x V) in float (ORT's QDQ quantizer ignores
    its own "MatMulConstBOnly", so those MatMuls are excluded by name). `quantize_outputs`:
    also put Q/DQ on the outputs of the quantized ops (an int8 rounding before the bias and
    residual adds); measured on TINY: SAM2 encoder 9.6 dB with it vs 29.4 without, mask
    decoder 0.0 vs 22.1, so it is off. `reduce_range` off measured 20.6 vs 29.4 dB (SAM2
    encoder) and 10.4 vs 22.1 dB (mask decoder) on this CPU. `skip_first` / `skip_last`: how
    many of the first / last quantizable nodes (graph order) stay float.
    `percentile`: the kept percentile of `|x|` for the "percentile" method. `entropy_bins` /
    `entropy_quantized_bins`: histogram of the "entropy" (KL) method; ORT's defaults (128 / 128)
    leave the KL search one candidate, the full range, so "entropy" would equal "minmax"
    (measured: identical ranges and SQNR); 2048 bins is TensorRT's entropy calibrator's choice.
    """

    op_types: tuple[str, ...] = CPU_GEMM_OP_TYPES
    per_channel: bool = True
    reduce_range: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    matmul_const_b_only: bool = True
    quantize_outputs: bool = False
    skip_first: int = 0
    skip_last: int = 0
    nodes_to_exclude: tuple[str, ...] = ()
    percentile: float = 99.999
    entropy_bins: int = 2048
    entropy_quantized_bins: int = 128
    scheme: str = "ort-static-qdq"

    def __post_init__(self) -> None:
        _check_common(self)
        for name in ("activation_type", "weight_type"):
            if getattr(self, name) not in ("uint8", "int8"):
                raise ValueError(f"{name} must be 'uint8' or 'int8', got {getattr(self, name)!r}")
        if not 90.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must lie in [90, 100], got {self.percentile}")
        if self.entropy_bins <= self.entropy_quantized_bins:
            raise ValueError("entropy_bins must exceed entropy_quantized_bins")


@dataclass(frozen=True)
class DynamicSettings:
    """ONNX Runtime dynamic INT8 (CPU): int8 weights, activations quantized per run."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "uint8"  # measured: u8 weights are the fast path without VNNI
    skip_first: int = 0
    skip_last: int = 0
    nodes_to_exclude: tuple[str, ...] = ()
    scheme: str = "ort-dynamic"

    def __post_init__(self) -> None:
        _check_common(self)
        if self.weight_type not in ("uint8", "int8"):
            raise ValueError(f"weight_type must be 'uint8' or 'int8', got {self.weight_type!r}")


@dataclass(frozen=True)
class WeightOnlySettings:
    """ONNX Runtime MatMulNBits (CPU): block-quantized weights, float activations.

    `accuracy_level` 4 lets the kernel quantize activations to int8 for the dot products
    (faster, MLAS); None keeps float32 compute.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = 4
    op_types: tuple[str, ...] = ("MatMul",)
    skip_first: int = 0
    skip_last: int = 0
    nodes_to_exclude: tuple[str, ...] = ()
    scheme: str = "ort-matmulnbits"

    def __post_init__(self) -> None:
        _check_common(self)
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")


@dataclass(frozen=True)
class ModelOptOnnxSettings:
    """NVIDIA ModelOpt ONNX PTQ (TensorRT targets): explicit Q/DQ for int8 or fp8.

    `high_precision_dtype` "fp32": ModelOpt's default "fp16" converts the rest of the graph to
    float16, which ONNX Runtime on the CPU cannot validate; TensorRT chooses fp16 at engine
    build time anyway. `disable_mha_qdq` keeps the attention MatMuls unquantized.
    `calibration_eps`: ONNX Runtime providers ModelOpt calibrates with, in order ("cpu",
    "cuda:0", "trt"); the CPU by default, so a build machine needs no GPU.
    """

    mode: str = "int8"
    op_types_to_exclude: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()
    high_precision_dtype: str = "fp32"
    disable_mha_qdq: bool = False
    skip_first: int = 0
    skip_last: int = 0
    op_types: tuple[str, ...] = GEMM_OP_TYPES
    calibration_eps: tuple[str, ...] = ("cpu",)
    scheme: str = "modelopt-onnx"

    def __post_init__(self) -> None:
        _check_common(self)
        if self.mode not in ("int8", "fp8"):
            raise ValueError(f"mode must be 'int8' or 'fp8', got {self.mode!r}")
        if self.high_precision_dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"high_precision_dtype {self.high_precision_dtype!r} is unknown")


@dataclass(frozen=True)
class ModelOptLlmSettings:
    """NVIDIA ModelOpt PyTorch PTQ of the LLM, then re-export of its step graph (TensorRT).

    `algorithm`: "smoothquant" (int8 W8A8) or "max" (fp8). INT4 goes through
    `ModelOptInt4Settings` (see `modelopt_llm` for why).
    """

    algorithm: str = "smoothquant"
    max_calib_samples: int = 64
    scheme: str = "modelopt-torch"

    def __post_init__(self) -> None:
        if self.algorithm not in ("smoothquant", "max"):
            raise ValueError(f"algorithm {self.algorithm!r} is not smoothquant or max")


@dataclass(frozen=True)
class ModelOptInt4Settings:
    """NVIDIA ModelOpt ONNX INT4 weight-only (W4A16, blocked DequantizeLinear, opset 21) of the
    LLM step graph for TensorRT: AWQ ("awq_lite", "awq_clip") on the recorded prefill feeds, or
    round-to-nearest ("rtn_dq").

    `awq_fuse_nodes` (ModelOpt's `awqlite_fuse_nodes`, True in ModelOpt): one mean AWQ scale per
    shared activation, folded into the RMSNorm weight before it. Off here: from ModelOpt 0.23
    through 0.47 that folding calls cupy's `.get()` on a numpy array whenever cupy has no GPU
    (`int4._quantize_awq_lite`, no `has_cupy` check), which is every build machine without a
    GPU and every Jetson (ModelOpt's `[onnx]` extra installs no cupy on aarch64):
    `AttributeError: 'numpy.ndarray' object has no attribute 'get'`. Unfused, each weight keeps
    its own AWQ scale (searched per weight, not averaged) as a `Mul` on its input, which TensorRT
    runs as one elementwise op before the GEMM. `test_quantize_modelopt.py::
    test_modelopt_awq_fusion_defect_is_still_there` fails once a ModelOpt upgrade fixes it.
    """

    method: str = "awq_lite"
    block_size: int = 128
    nodes_to_exclude: tuple[str, ...] = ()
    skip_first: int = 0
    skip_last: int = 0
    op_types: tuple[str, ...] = ("MatMul",)
    calibration_eps: tuple[str, ...] = ("cpu",)
    awq_fuse_nodes: bool = False
    scheme: str = "modelopt-onnx-int4"

    def __post_init__(self) -> None:
        _check_common(self)
        if self.method not in ("awq_lite", "awq_clip", "rtn_dq"):
            raise ValueError(f"method {self.method!r} is not awq_lite, awq_clip or rtn_dq")
        if self.awq_fuse_nodes and self.method != "awq_lite":
            raise ValueError("awq_fuse_nodes is an awq_lite option; leave it False")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")


@dataclass(frozen=True)
class Int4AwqSettings:
    """INT4 weight-only (W4A16, blocked DequantizeLinear, opset 21) of the LLM step graph for
    TensorRT, weights streamed one at a time (`int4_awq`): AWQ-lite ("awq_lite": a per-input-
    channel scale searched over alpha = 0, alpha_step, ..., 1 on at most `max_tokens` recorded
    rows per MatMul input) or round-to-nearest ("rtn"). The default for the TensorRT targets'
    int4 LLM; `ModelOptInt4Settings` selects ModelOpt's ONNX INT4 instead (small graphs only:
    see `int4_awq` for its memory).

    `keep_lm_head`: the MatMuls that make the `logits` output (the vocabulary projection, in
    slices for a large vocabulary) stay float, as in ModelOpt's and TensorRT-LLM's INT4 AWQ
    defaults and the planner (`memory_plan`: "lm_head fp16"): every answer token is read from
    them."""

    method: str = "awq_lite"
    block_size: int = 128
    alpha_step: float = 0.1
    max_tokens: int = 256
    nodes_to_exclude: tuple[str, ...] = ()
    skip_first: int = 0
    skip_last: int = 0
    op_types: tuple[str, ...] = ("MatMul",)
    keep_lm_head: bool = True
    scheme: str = "awq-lite-int4"

    def __post_init__(self) -> None:
        _check_common(self)
        if self.method not in ("awq_lite", "rtn"):
            raise ValueError(f"method {self.method!r} is not awq_lite or rtn")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if not 0 < self.alpha_step <= 1:
            raise ValueError(f"alpha_step must be in (0, 1], got {self.alpha_step}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


Settings = (
    StaticQdqSettings
    | DynamicSettings
    | WeightOnlySettings
    | ModelOptOnnxSettings
    | ModelOptLlmSettings
    | ModelOptInt4Settings
    | Int4AwqSettings
)


def _check_common(s: Any) -> None:
    if s.skip_first < 0 or s.skip_last < 0:
        raise ValueError(f"skip_first / skip_last must be >= 0, got {s.skip_first}/{s.skip_last}")
    if not s.op_types:
        raise ValueError("op_types must name at least one op type")
    object.__setattr__(s, "op_types", tuple(s.op_types))
    object.__setattr__(s, "nodes_to_exclude", tuple(s.nodes_to_exclude))


# -- presets ---------------------------------------------------------------------------------
# CPU (ONNX Runtime): the encoders and the mask decoder (MatMul and Gemm: CPU_GEMM_OP_TYPES).
CPU_STATIC_INT8 = StaticQdqSettings()
# CPU LLM, "int8" recipe: both candidates keep 8-bit weights (a 4-bit LLM is the "int4"
# precision, recipe "int8-w4"; picking it for "int8" would be a silent downgrade).
CPU_DYNAMIC_INT8 = DynamicSettings()
CPU_WEIGHT_ONLY_INT8 = WeightOnlySettings(bits=8, block_size=128)
# CPU LLM, "int4" precision: MatMulNBits, block 128 (recipes.INT4_GROUP, what the planner
# sizes); block 32 measured +1.6 dB SQNR but 13% slower decode and 17% larger (below).
CPU_WEIGHT_ONLY_INT4 = WeightOnlySettings(bits=4, block_size=128)
# Which int8 LLM scheme the CPU target uses: the faster one at equal accuracy. Measured here
# (AMD EPYC, AVX2 without VNNI, ORT 1.24, 1 thread, a random LLM step graph of hidden 1024,
# 4 layers, FFN 2816, vocab 4096; median of 15):
#
#   scheme               size MB  prefill 128 tok  decode 1 tok  SQNR logits
#   fp32                  197.2       266 ms          40.4 ms        -
#   dynamic int8 (u8)      49.7       208 ms          13.4 ms      28.1 dB
#   MatMulNBits 8, b32     55.6       417 ms          17.4 ms      36.2 dB
#   MatMulNBits 8, b128    50.9       420 ms          14.2 ms      34.1 dB
#   MatMulNBits 4, b32     30.9       288 ms          10.2 ms      15.6 dB
#   MatMulNBits 4, b128    26.3       262 ms           9.0 ms      14.0 dB
#
# Accuracy end to end on the step-1900 demo model (18 eval answers, 48 tokens): token agreement
# dynamic 0.995, MatMulNBits-8 0.997. On the shipped demo model, whole eval split (180 answers,
# 96 tokens, encoders and decoder static INT8 in both): dynamic 0.9866, MatMulNBits-8 b32
# 0.9919 (accuracy level 4; 0.9917 with float compute), LLM logits SQNR 31.2 vs 42.0 dB; with
# the LLM left FP32, 0.9939. Dynamic INT8 misses the default budget (0.99) where MatMulNBits-8
# holds it: accuracy is not equal, so the more accurate MatMulNBits-8 is the default and dynamic
# stays selectable (`QuantizeConfig.settings={"llm": CPU_DYNAMIC_INT8}`). (Dynamic with signed
# int8 weights: 24.1 dB vs 37.5 dB for uint8 on the TINY LLM, the no-VNNI saturation again.)
# Block 128 against 32 on the shipped (stage-3) demo model, whole eval split: token agreement
# 0.9972 vs 0.9927, LLM SQNR 39.8 vs 43.7 dB, payload 29.2 % vs 29.9 % of FP32, and faster
# decode (table above): block 128 is the default, the same group as the int4 LLM.
CPU_LLM_INT8 = CPU_WEIGHT_ONLY_INT8

# TensorRT targets (ModelOpt ONNX): encoders and decoder.
TRT_INT8 = ModelOptOnnxSettings(mode="int8")
# ModelOpt's fp8 mode quantizes Gemm, MatMul, Conv (and Add) only: no ConvTranspose.
TRT_FP8 = ModelOptOnnxSettings(mode="fp8", op_types=("MatMul", "Gemm", "Conv"))
# The vision encoder's own settings: its RMSNorms are decomposed into Pow/ReduceMean/Sqrt/Div/
# Mul and its residuals are plain Adds, which ModelOpt's int8 heuristics would otherwise put
# Q/DQ on (ModelOpt quantizes Add and Mul for int8); keep them float (ANCHORS.md pitfalls).
TRT_VISION_INT8 = dataclasses.replace(TRT_INT8, op_types_to_exclude=("Add", "Mul"))
TRT_VISION_FP8 = dataclasses.replace(TRT_FP8, op_types_to_exclude=("Add", "Mul"))
# TensorRT LLM: ModelOpt PyTorch for int8 (SmoothQuant) and fp8; our streaming AWQ-lite for
# int4 (`int4_awq`: ModelOpt's ONNX INT4 holds several copies of the weights and cannot write a
# graph past 2 GB), block 128 (recipes.INT4_GROUP, the TensorRT Edge-LLM INT4-AWQ group size).
TRT_LLM = {
    "int8": ModelOptLlmSettings(algorithm="smoothquant"),
    "int4": Int4AwqSettings(method="awq_lite", block_size=128),
    "fp8": ModelOptLlmSettings(algorithm="max"),
}

# (backend, precision) -> component -> settings; "*" serves every component not named.
DEFAULT_SETTINGS: dict[tuple[str, str], dict[str, Settings]] = {
    ("onnxruntime", "int8"): {"*": CPU_STATIC_INT8, "llm": CPU_LLM_INT8},
    ("onnxruntime", "int4"): {"llm": CPU_WEIGHT_ONLY_INT4},
    ("tensorrt", "int8"): {"*": TRT_INT8, "vision": TRT_VISION_INT8, "llm": TRT_LLM["int8"]},
    ("tensorrt", "fp8"): {"*": TRT_FP8, "vision": TRT_VISION_FP8, "llm": TRT_LLM["fp8"]},
    ("tensorrt", "int4"): {"llm": TRT_LLM["int4"]},
}


def default_settings(backend: str, precision: str, component: str) -> Settings | None:
    """The preset for `component` at `precision` on `backend`; None where there is none."""
    table = DEFAULT_SETTINGS.get((backend, precision), {})
    return table.get(component, table.get("*"))


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of one `quantize` run besides the recipe, target, data and budget.

    settings: per-component overrides of `default_settings` (component -> settings).
    max_new_tokens: greedy answer length of the FP32 and quantized pipelines on the splits.
    max_calib_records / max_eval_records: cap the records used from each split (None: all).
    search: run the sensitivity search when the budget is missed (False: fail at once).
    max_search_steps: how many layer groups the search may return to float at most.
    search_patience: stop (BudgetNotMetError) after this many steps in a row that did not bring
        the measurements closer to the budget (`Measured.excess`).
    compact: compact every graph the CPU backend writes (`compact.compact_graph`), before it is
        measured.
    embeddings_dtype: how the token embedding table is stored when the LLM is quantized
        ("float16": half the bytes, rows cast to float32 on lookup; "int8": a quarter plus a
        float32 scale per row, `host_inputs.int8_rows_dtype`; "float32": unchanged).

    Run options (`RUN_OPTIONS`; not part of `to_dict`, the report's record of the settings):
    method: activation calibration, "minmax", "entropy" or "percentile"; None: the backend's
        measured default (`DEFAULT_METHODS`). The report records the method it used.
    checkpoint: the float checkpoint, needed by the TensorRT LLM path (ModelOpt PyTorch).
    overwrite: replace an existing output folder that a previous `quantize` wrote.
    """

    settings: Mapping[str, Settings] = field(default_factory=dict)
    max_new_tokens: int = 96
    max_calib_records: int | None = None
    max_eval_records: int | None = None
    search: bool = True
    max_search_steps: int = 12
    search_patience: int = 4
    compact: bool = True
    embeddings_dtype: str = "float16"
    version: int = QUANTIZE_CONFIG_VERSION
    method: str | None = None
    checkpoint: Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", dict(self.settings))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("max_calib_records", "max_eval_records"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.max_search_steps < 0:
            raise ValueError(f"max_search_steps must be >= 0, got {self.max_search_steps}")
        check_table_dtype(self.embeddings_dtype, "embeddings_dtype")
        if self.search_patience < 1:
            raise ValueError(f"search_patience must be >= 1, got {self.search_patience}")
        if self.version != QUANTIZE_CONFIG_VERSION:
            raise ValueError(f"quantize config version {self.version} is not supported")

    def settings_for(self, backend: str, precision: str, component: str) -> Settings | None:
        """The override for `component`, else the preset."""
        if component in self.settings:
            return self.settings[component]
        return default_settings(backend, precision, component)

    def to_dict(self) -> dict[str, Any]:
        """The settings, without the run options (`RUN_OPTIONS`)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_OPTIONS}
        d["settings"] = {k: settings_to_dict(v) for k, v in self.settings.items()}
        return d


# `QuantizeConfig` fields that say how to run, not how to quantize (kept out of its `to_dict`).
RUN_OPTIONS = ("method", "checkpoint", "overwrite")
DEFAULT_CONFIG = QuantizeConfig()


def settings_to_dict(s: Settings) -> dict[str, Any]:
    """JSON-ready form of any settings dataclass (its scheme included)."""
    return dataclasses.asdict(s)
