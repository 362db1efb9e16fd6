"""Memory and speed plan of a Citrus-V config on a target at a recipe (torch-free).

Everything is computed from the config's dimensions: no weights, no torch. Parameter counts
are exact for the modules `citrus_edge.modelling.model.build_model` assembles (tests/test_plan.py checks
them against built TINY and DEMO models); bytes, activations and speed are estimates and
projections, labelled as such.

Components, as the export splits the model:
- `vision`: the Qwen2.5-VL vision transformer and patch merger (`mllm.model.visual`);
- `llm`: the Qwen2.5 decoder and its untied `lm_head` (`mllm.model.language_model`, `lm_head`);
- `sam_encoder`: SAM2's Hiera trunk and FPN neck (`vision_encoder`) plus `no_memory_embedding`,
  which the encoder graph adds to its lowest-resolution output for a lone image;
- `mask_decoder`: SAM2's prompt encoder and mask decoder plus the `seg_projector`.
Their sum is every parameter of the built model. Buffers (rotary frequencies, SAM2's random
Fourier matrix) are not parameters and are not counted.

Bytes: a low-bit precision (int8, fp8, int4, nvfp4) applies to the weights of linear and
convolution layers ("quantizable"); the rest (norms, biases, embedding tables, positional
embeddings, learned tokens) stays in the target's carrier format: fp16 where the target runs
fp16, fp32 on the CPU. The LLM's token-embedding table is never low-bit (an embedding is a
gather). Its `lm_head` follows the backend's quantizer: modelopt's INT4-AWQ / INT8 / FP8 presets
(TensorRT targets) leave `*lm_head*` in the carrier format; the CPU quantizer
(`compress.ort_quant`, MatMulNBits) quantizes every MatMul of the LLM graph, `lm_head` included,
and stores the table in fp16 beside a low-bit LLM (`QuantizeConfig.embeddings_dtype`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from citrus_edge.cli.model_params import (
    DECODER_TOKENS,
    HIERA_MLP_RATIO,
    NUM_MASK_TOKENS,
    ParamCount,
    llm_params,
    param_counts,
)
from citrus_edge.host_inputs import TABLE_PRECISIONS
from citrus_edge.preprocess import smart_resize
from citrus_edge.recipes import COMPONENTS, Recipe, get_precision
from citrus_edge.targets import Target, check_recipe

if TYPE_CHECKING:
    from citrus_edge.config import CitrusVConfig, Sam2Dims, TextDims, VisionDims

GB = 1e9  # data-sheet gigabyte, as in citrus_edge.targets
DEFAULT_CONTEXT = 2048  # KV-cache tokens planned when none are given


# -- bytes ---------------------------------------------------------------------------------
def carrier_precision(target: Target, precision: str) -> str:
    """The format of the parameters a precision leaves alone.

    A float format (fp32/fp16/bf16) holds everything itself; a low-bit format leaves norms,
    biases and tables in fp16 where the target runs fp16, in fp32 otherwise (the CPU).
    """
    if not get_precision(precision).low_bit:
        return precision
    return "fp16" if target.supports("fp16") else "fp32"


# The CPU quantizer (`compress.settings.CPU_WEIGHT_ONLY_INT8` / `_INT4`) stores every MatMul of
# a low-bit LLM, `lm_head` included, as ONNX Runtime MatMulNBits: `bits` per weight plus one
# scale in the graph's float format per block of CPU_LLM_BLOCK weights (symmetric: no zero
# points); tests/test_plan.py checks these against compress.settings.
CPU_LLM_BLOCK = 128
_MATMULNBITS_BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class Storage:
    """How one component's parameters are stored on a target.

    `weight`: bytes per quantizable weight, block scales included; `head`: bytes per `lm_head`
    weight; `table`: format of the untied embedding table; everything else is in `carrier`.
    """

    carrier: str
    weight: float
    head: float
    table: str


def storage(
    target: Target, component: str, precision: str, embeddings: str | None = None
) -> Storage:
    """The storage of `component` at `precision` on `target`.

    TensorRT recipes (modelopt) quantize the linear and convolution weights and leave `lm_head`
    and the table in the carrier format; int4 then costs 0.5 + 2/128 bytes per weight (an fp16
    scale per group of 128) and nvfp4 0.5 + 1/16 (see `citrus_edge.recipes.PRECISIONS`). On the
    CPU a low-bit LLM is MatMulNBits throughout, `lm_head` included, with its table in fp16
    (`compress.settings.QuantizeConfig.embeddings_dtype`). `embeddings` ("float16", "int8",
    "float32"; None: the default) is how a quantized LLM's table is stored (`build
    --embeddings`); int8 rows also carry a float32 scale each, 4 bytes a row, not counted here
    (0.6 MB of the 8B's 0.54 GB table).
    """
    carrier = carrier_precision(target, precision)
    low, rest = get_precision(precision), get_precision(carrier).weight_bytes
    if component == "llm" and low.low_bit and not target.tensorrt:
        per_weight = _MATMULNBITS_BITS[precision] / 8 + rest / CPU_LLM_BLOCK
        store = Storage(carrier, per_weight, per_weight, "fp16")
    else:
        store = Storage(carrier, low.weight_bytes, rest, carrier)
    if component == "llm" and embeddings is not None and precision != carrier:
        store = dataclasses.replace(store, table=TABLE_PRECISIONS[embeddings])
    return store


def weight_bytes(count: ParamCount, store: Storage) -> float:
    """Bytes of a component's parameters stored as `store`."""
    rest = count.total - count.quantizable - count.table - count.head
    return (
        count.quantizable * store.weight
        + count.head * store.head
        + count.table * get_precision(store.table).weight_bytes
        + rest * get_precision(store.carrier).weight_bytes
    )


def kv_cache_dtype(target: Target, recipe: Recipe) -> str:
    """KV-cache format: fp32 on the CPU or for an fp32 LLM, bf16 for a bf16 LLM, else fp16."""
    if target.kind == "cpu" or recipe.llm == "fp32":
        return "fp32"
    return "bf16" if recipe.llm == "bf16" else "fp16"


def kv_cache_bytes(t: TextDims, context_tokens: int, dtype: str) -> float:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x context x bytes."""
    elem = get_precision(dtype).weight_bytes
    return 2 * t.num_layers * t.num_kv_heads * t.head_dim * context_tokens * elem


# -- activations (estimate) ----------------------------------------------------------------
# A deliberately simple estimate of the peak live activations of one component, batch 1:
#   layer  = tokens x (3 x width + mlp_hidden + 2 x width)   q/k/v, MLP hidden, input + residual
#   scores = heads x query_tokens x key_tokens                an unfused attention matrix
# Encoders count the score matrix of their largest attention (exported as plain ONNX attention,
# which TensorRT may or may not fuse); the LLM runs fused GQA / FMHA kernels, so it counts none
# but adds fp32 logits over the vocabulary. Components run one after another, so the plan adds
# the largest component's activations to the resident weights and KV cache.
def _layer(tokens: int, width: int, mlp_hidden: int) -> int:
    return tokens * (5 * width + mlp_hidden)


def vision_activations(v: VisionDims, patches: int) -> int:
    """Elements live in the vision tower's largest layer for `patches` 14x14 patches."""
    full = patches if v.fullatt_block_indexes else (v.window_size // v.patch_size) ** 2
    return _layer(patches, v.hidden_size, 2 * v.intermediate_size) + v.num_heads * patches * full


def llm_activations(t: TextDims, tokens: int) -> int:
    """Elements live in one decoder layer during a prefill of `tokens` (fused attention)."""
    return _layer(tokens, t.hidden_size, 2 * t.intermediate_size)


def sam_encoder_activations(s: Sam2Dims) -> int:
    """Elements live in the largest Hiera block plus the three FPN maps kept for the decoder."""
    side0 = s.image_size // 4  # tokens per side after the stride-4 patch embedding
    starts = [sum(s.blocks_per_stage[:i]) for i in range(4)]
    peak = 0
    for stage, (d, heads, win) in enumerate(
        zip(s.embed_dim_per_stage, s.heads_per_stage, s.window_size_per_stage, strict=True)
    ):
        tokens = (side0 >> stage) ** 2
        blocks = range(starts[stage], starts[stage] + s.blocks_per_stage[stage])
        keys = tokens if any(b in s.global_attention_blocks for b in blocks) else win * win
        peak = max(peak, _layer(tokens, d, HIERA_MLP_RATIO * d) + heads * tokens * keys)
    fpn = s.hidden_size * sum((side0 >> i) ** 2 for i in range(3))
    return peak + fpn


def mask_decoder_activations(s: Sam2Dims) -> int:
    """Elements live in the two-way transformer for one query, plus the upscaled masks."""
    image_tokens = (s.image_size // 16) ** 2
    attention = 4 * s.hidden_size * image_tokens + s.decoder_heads * DECODER_TOKENS * image_tokens
    upscaled = (s.hidden_size // 8 + NUM_MASK_TOKENS) * (s.image_size // 4) ** 2
    return attention + upscaled


def activation_bytes_per_elem(target: Target, precision: str) -> int:
    """fp32 activations on the CPU or in an fp32 component, 16-bit ones otherwise."""
    return 4 if target.kind == "cpu" or precision == "fp32" else 2


# -- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentPlan:
    """One component's row: parameters, the bytes they take, its activation estimate."""

    component: str
    precision: str
    storage: Storage
    params: int
    quantizable_params: int
    weight_bytes: float
    activation_bytes: float  # estimate

    @property
    def carrier(self) -> str:
        return self.storage.carrier

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["storage"] = dict(self.storage.__dict__)
        return out


@dataclass(frozen=True)
class Plan:
    """Memory and decode-speed plan of one model on one target at one recipe.

    `decode_tokens_per_s` is a projection (upper bound): bandwidth / bytes streamed per decode
    step, i.e. perfect bandwidth use and no compute time; None when the target's bandwidth is
    unknown. Activations are estimates (see the formulas above `vision_activations`).
    """

    model: str
    target: str
    target_family: str
    recipe: Recipe
    context_tokens: int
    image_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    vision_patches: int
    image_tokens: int
    sam_image_size: int
    components: tuple[ComponentPlan, ...]
    kv_dtype: str
    kv_cache_bytes: float
    memory_gb: float
    os_reserve_gb: float
    bandwidth_gbs: float | None
    decode_bytes_per_token: float
    decode_tokens_per_s: float | None
    notes: tuple[str, ...] = ()

    @property
    def weight_bytes(self) -> float:
        return sum(c.weight_bytes for c in self.components)

    @property
    def fp32_weight_bytes(self) -> float:
        """The same parameters in fp32: what an FP32 bundle's weights take."""
        return 4.0 * sum(c.params for c in self.components)

    @property
    def weight_ratio(self) -> float:
        """Weight bytes at this recipe over the FP32 weight bytes (the bundle-size ratio)."""
        return self.weight_bytes / self.fp32_weight_bytes

    @property
    def activation_bytes(self) -> float:
        """Peak activation estimate: the largest component's (they run one after another)."""
        return max(c.activation_bytes for c in self.components)

    @property
    def total_bytes(self) -> float:
        """Resident weights + KV cache at `context_tokens` + peak activations."""
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gb - self.os_reserve_gb) * GB

    @property
    def headroom_bytes(self) -> float:
        """Usable memory left over; negative when the plan does not fit."""
        return self.usable_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def component(self, name: str) -> ComponentPlan:
        for c in self.components:
            if c.component == name:
                return c
        raise ValueError(f"no component {name!r}; choose one of {COMPONENTS}")

    def rows(self) -> list[dict[str, Any]]:
        """Table rows with raw numbers: one per component, then KV cache and total.

        A component's precision reads `int4+fp16` when a low-bit format leaves its other
        parameters in a carrier format.
        """
        rows = [
            {
                "item": c.component,
                "precision": c.precision
                if c.precision == c.carrier
                else f"{c.precision}+{c.carrier}",
                "params": c.params,
                "weight_bytes": c.weight_bytes,
                "activation_bytes": c.activation_bytes,
            }
            for c in self.components
        ]
        rows.append(
            {
                "item": f"kv cache ({self.context_tokens} tokens)",
                "precision": self.kv_dtype,
                "params": None,
                "weight_bytes": self.kv_cache_bytes,
                "activation_bytes": None,
            }
        )
        rows.append(
            {
                "item": "total (peak activations)",
                "precision": self.recipe.name,
                "params": sum(c.params for c in self.components),
                "weight_bytes": self.weight_bytes + self.kv_cache_bytes,
                "activation_bytes": self.activation_bytes,
            }
        )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the derived totals."""
        return {
            "model": self.model,
            "target": self.target,
            "target_family": self.target_family,
            "recipe": self.recipe.to_dict(),
            "context_tokens": self.context_tokens,
            "image_hw": list(self.image_hw),
            "resized_hw": list(self.resized_hw),
            "vision_patches": self.vision_patches,
            "image_tokens": self.image_tokens,
            "sam_image_size": self.sam_image_size,
            "components": [c.to_dict() for c in self.components],
            "kv_dtype": self.kv_dtype,
            "kv_cache_bytes": self.kv_cache_bytes,
            "weight_bytes": self.weight_bytes,
            "fp32_weight_bytes": self.fp32_weight_bytes,
            "weight_ratio": self.weight_ratio,
            "activation_bytes_estimate": self.activation_bytes,
            "total_bytes": self.total_bytes,
            "memory_gb": self.memory_gb,
            "os_reserve_gb": self.os_reserve_gb,
            "usable_bytes": self.usable_bytes,
            "headroom_bytes": self.headroom_bytes,
            "fits": self.fits,
            "bandwidth_gbs": self.bandwidth_gbs,
            "decode_bytes_per_token": self.decode_bytes_per_token,
            "decode_tokens_per_s_upper_bound": self.decode_tokens_per_s,
            "notes": list(self.notes),
        }


def _vision_input(
    cfg: CitrusVConfig, target: Target, image_hw: tuple[int, int] | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(requested, resized) image sizes; the target's largest profile size by default."""
    h, w = (int(x) for x in image_hw) if image_hw is not None else target.resolution.max_hw
    pp = cfg.preprocess
    resized = smart_resize(h, w, pp.factor, pp.min_pixels, pp.max_pixels)
    hw = (h, w)
    top = target.resolution.max_hw
    if resized[0] > top[0] or resized[1] > top[1]:
        raise ValueError(
            f"image {hw[0]}x{hw[1]} resizes to {resized[0]}x{resized[1]}, beyond {target.name}'s "
            f"engine profile max {top[0]}x{top[1]}; pass an image_hw that resizes within it"
        )
    if cfg.sam2.image_size > target.resolution.sam_max_side:
        raise ValueError(
            f"SAM2 input {cfg.sam2.image_size} exceeds {target.name}'s engine profile "
            f"({target.resolution.sam_max_side}); this model cannot be planned on this target"
        )
    return hw, resized


def _component_rows(
    cfg: CitrusVConfig,
    target: Target,
    recipe: Recipe,
    patches: int,
    context_tokens: int,
    embeddings: str | None = None,
) -> tuple[ComponentPlan, ...]:
    """One `ComponentPlan` per component, in pipeline order."""
    elements = {
        "vision": vision_activations(cfg.vision, patches),
        "llm": llm_activations(cfg.text, context_tokens),
        "sam_encoder": sam_encoder_activations(cfg.sam2),
        "mask_decoder": mask_decoder_activations(cfg.sam2),
    }
    rows = []
    for name, count in param_counts(cfg).items():
        precision = recipe.precision(name)
        store = storage(target, name, precision, embeddings)
        act = elements[name] * activation_bytes_per_elem(target, precision)
        if name == "llm":
            act += cfg.text.vocab_size * 4  # fp32 logits of the last position
        weights = weight_bytes(count, store)
        act = float(act)
        rows.append(
            ComponentPlan(name, precision, store, count.total, count.quantizable, weights, act)
        )
    return tuple(rows)


def _notes(
    cfg: CitrusVConfig, target: Target, hw: tuple[int, int], resized: tuple[int, int]
) -> tuple[str, ...]:
    """Caveats printed under the plan."""
    notes = [
        "activations are estimates; decode tok/s is a projection (upper bound): "
        "bandwidth / bytes streamed per token, no compute time"
    ]
    if target.bandwidth_gbs is None:
        notes.append(f"{target.name}: memory bandwidth unknown, so no decode projection")
    if target.notes:
        notes.append(f"{target.name}: {target.notes}")
    if resized != hw:
        pp = cfg.preprocess
        notes.append(
            f"image {hw[0]}x{hw[1]} resized to {resized[0]}x{resized[1]} by the model's "
            f"pixel budget ({pp.min_pixels}..{pp.max_pixels})"
        )
    return tuple(notes)


def plan(
    model_cfg: CitrusVConfig,
    target: Target,
    recipe: Recipe,
    context_tokens: int | None = None,
    image_hw: tuple[int, int] | None = None,
    embeddings: str | None = None,
) -> Plan:
    """Plan `model_cfg` on `target` at `recipe`, from the config's dimensions only.

    `context_tokens` is the KV-cache length (image tokens included; by default
    `DEFAULT_CONTEXT` or the model's `max_position_embeddings` if smaller); `image_hw` the input
    image (height, width) before the model's `smart_resize`, by default the target's largest
    profile size; `embeddings` how a quantized LLM stores its table (`storage`). Bytes
    streamed per decode step = LLM weights without the untied embedding table (a gather reads
    one row) + the whole KV cache at `context_tokens`. Raises
    `UnsupportedPrecisionError` when the target cannot run the recipe, ValueError when the image
    or context does not fit the model or the target's engine profiles.
    """
    check_recipe(target, recipe)
    hw, resized = _vision_input(model_cfg, target, image_hw)
    v, t = model_cfg.vision, model_cfg.text
    patches = (resized[0] // v.patch_size) * (resized[1] // v.patch_size)
    image_tokens = patches // v.spatial_merge_size**2
    if context_tokens is None:
        context_tokens = min(DEFAULT_CONTEXT, t.max_position_embeddings)
    if not image_tokens < context_tokens <= t.max_position_embeddings:
        raise ValueError(
            f"context_tokens {context_tokens} must exceed the {image_tokens} image tokens and "
            f"stay within max_position_embeddings {t.max_position_embeddings}; "
            "pass a context_tokens in that range"
        )
    rows = _component_rows(model_cfg, target, recipe, patches, context_tokens, embeddings)
    kv_dtype = kv_cache_dtype(target, recipe)
    kv = kv_cache_bytes(t, context_tokens, kv_dtype)
    llm = rows[COMPONENTS.index("llm")]
    table_bytes = llm_params(t).table * get_precision(llm.storage.table).weight_bytes
    per_token = llm.weight_bytes - table_bytes
    per_token += kv
    bw = target.bandwidth_gbs
    return Plan(
        model=model_cfg.name,
        target=target.name,
        target_family=target.family,
        recipe=recipe,
        context_tokens=context_tokens,
        image_hw=hw,
        resized_hw=resized,
        vision_patches=patches,
        image_tokens=image_tokens,
        sam_image_size=model_cfg.sam2.image_size,
        components=rows,
        kv_dtype=kv_dtype,
        kv_cache_bytes=kv,
        memory_gb=target.memory_gb,
        os_reserve_gb=target.os_reserve_gb,
        bandwidth_gbs=bw,
        decode_bytes_per_token=per_token,
        decode_tokens_per_s=bw * GB / per_token if bw is not None else None,
        notes=_notes(model_cfg, target, hw, resized),
    )


# -- text ----------------------------------------------------------------------------------
def _count(n: float | None) -> str:
    if n is None:
        return ""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def _bytes(n: float | None) -> str:
    if n is None:
        return ""
    for div, unit in ((GB, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


TABLE_HEADERS = ("item", "precision", "params", "weights / cache", "activations (est.)")


def plan_table(p: Plan) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(headers, rows of strings) of `Plan.rows()`, for the CLI's rich table and `format_plan`."""
    body = [
        (
            r["item"],
            r["precision"],
            _count(r["params"]),
            _bytes(r["weight_bytes"]),
            _bytes(r["activation_bytes"]),
        )
        for r in p.rows()
    ]
    return TABLE_HEADERS, body


def plan_summary(p: Plan) -> list[str]:
    """The lines under the table: memory verdict and the decode projection."""
    usable = p.memory_gb - p.os_reserve_gb
    verdict = (
        f"fits, {_bytes(p.headroom_bytes)} headroom"
        if p.fits
        else f"DOES NOT FIT, short by {_bytes(-p.headroom_bytes)}"
    )
    lines = [
        f"weights: {_bytes(p.weight_bytes)}, {100 * p.weight_ratio:.1f} % of the "
        f"{_bytes(p.fp32_weight_bytes)} FP32 weights",
        f"memory: {_bytes(p.total_bytes)} needed of {usable:.1f} GB usable "
        f"({p.memory_gb:.0f} GB - {p.os_reserve_gb:.1f} GB kept for OS and cart software): "
        + verdict,
    ]
    if p.decode_tokens_per_s is None:
        lines.append(
            f"decode: unknown (bandwidth not confirmed); {_bytes(p.decode_bytes_per_token)} "
            "streamed per token"
        )
    else:
        lines.append(
            f"decode: <= {p.decode_tokens_per_s:.1f} tok/s, projection (upper bound) = "
            f"{p.bandwidth_gbs:g} GB/s / {_bytes(p.decode_bytes_per_token)} per token"
        )
    return lines


def format_plan(p: Plan) -> str:
    """The plan as a plain-text table with a header line, the verdict and the notes."""
    headers, body = plan_table(p)
    widths = [max(len(row[i]) for row in (headers, *body)) for i in range(len(headers))]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    title = (
        f"{p.model} on {p.target} [{p.target_family}], recipe {p.recipe.name}; "
        f"image {p.resized_hw[0]}x{p.resized_hw[1]} -> {p.image_tokens} tokens, "
        f"SAM2 {p.sam_image_size}x{p.sam_image_size}, context {p.context_tokens}"
    )
    rule = "-" * len(line(headers))
    out = [title, line(headers), rule, *(line(r) for r in body[:-1]), rule, line(body[-1])]
    out += plan_summary(p)
    out += [f"note: {n}" for n in p.notes]
    return "\n".join(out)
