"""Exact parameter counts of a Citrus-V config's components, from its dimensions (torch-free).

Counts match the modules `citrus_edge.modelling.model.build_model` assembles; tests/test_plan.py checks
them against built TINY and DEMO models. Components follow the export split (see plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from citrus_edge.config import CitrusVConfig, Sam2Dims, TextDims, VisionDims

# transformers' SAM2 defaults the model is built with (Sam2*Config), not carried by Sam2Dims.
HIERA_MLP_RATIO = 4  # Sam2HieraDetConfig.mlp_ratio
PATCH_KERNEL = 7  # Hiera patch embedding: 7x7 conv, stride 4
MASK_INPUT_CHANNELS = 16  # Sam2PromptEncoderConfig.mask_input_channels
NUM_POINT_EMBEDDINGS = 4  # Sam2PromptEncoderConfig.num_point_embeddings
NUM_MASK_TOKENS = 4  # Sam2MaskDecoderConfig.num_multimask_outputs + 1
TWO_WAY_DEPTH = 2  # Sam2MaskDecoderConfig.num_hidden_layers
ATTN_DOWNSAMPLE = 2  # Sam2MaskDecoderConfig.attention_downsample_rate
# Decoder tokens: iou + 4 mask + object-score tokens, then 2 not-a-point + 1 projected [SEG].
DECODER_TOKENS = 1 + NUM_MASK_TOKENS + 1 + 3


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one component.

    `quantizable`: weights of linear and convolution layers a low-bit format stores (for the LLM,
    without `lm_head`). `table`: the LLM's token-embedding table when untied (one row is read per
    token, so it is not part of the bytes a decode step streams). `head`: the untied `lm_head`
    weight, low-bit or not depending on the backend (see `citrus_edge.cli.memory_plan.storage`).
    """

    total: int
    quantizable: int
    table: int = 0
    head: int = 0

    def __add__(self, other: ParamCount) -> ParamCount:
        return ParamCount(
            self.total + other.total,
            self.quantizable + other.quantizable,
            self.table + other.table,
            self.head + other.head,
        )


def _linear(d_in: int, d_out: int, bias: bool = True) -> ParamCount:
    weight = d_in * d_out
    return ParamCount(weight + (d_out if bias else 0), weight)


def _conv(c_in: int, c_out: int, kernel: int, bias: bool = True) -> ParamCount:
    return _linear(c_in * kernel, c_out, bias)  # kernel = product of the kernel's sides


def _plain(n: int) -> ParamCount:
    """Norm weights and biases, learned tokens, positional embeddings: never low-bit."""
    return ParamCount(n, 0)


def _mlp(d_in: int, hidden: int, d_out: int, layers: int) -> ParamCount:
    """SAM2's `Sam2FeedForward`: proj_in, (layers - 2) hidden linears, proj_out, all biased."""
    count = _linear(d_in, hidden) + _linear(hidden, d_out)
    for _ in range(layers - 2):
        count += _linear(hidden, hidden)
    return count


def vision_params(v: VisionDims) -> ParamCount:
    """Qwen2.5-VL vision tower: patch embed + blocks (RMSNorms, qkv, proj, SwiGLU) + merger."""
    h, i = v.hidden_size, v.intermediate_size
    patch = _conv(3, h, v.temporal_patch_size * v.patch_size**2, bias=False)  # Conv3d
    block = (
        _plain(2 * h)  # norm1, norm2 (RMSNorm)
        + _linear(h, 3 * h)  # attn.qkv
        + _linear(h, h)  # attn.proj
        + _linear(h, i)  # mlp.gate_proj
        + _linear(h, i)  # mlp.up_proj
        + _linear(i, h)  # mlp.down_proj
    )
    merged, m = v.merged_size, v.merger_width
    merger = _plain(h) + _linear(merged, m) + _linear(m, v.out_hidden_size)
    count = patch + merger
    for _ in range(v.depth):
        count += block
    return count


def llm_params(t: TextDims) -> ParamCount:
    """Qwen2.5 decoder: embeddings + layers (q/k/v with biases, o, RMSNorms, SwiGLU) + head."""
    h, i = t.hidden_size, t.intermediate_size
    q_dim, kv_dim = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    layer = (
        _linear(h, q_dim)  # q_proj
        + _linear(h, kv_dim)  # k_proj
        + _linear(h, kv_dim)  # v_proj
        + _linear(q_dim, h, bias=False)  # o_proj
        + _linear(h, i, bias=False)  # gate_proj
        + _linear(h, i, bias=False)  # up_proj
        + _linear(i, h, bias=False)  # down_proj
        + _plain(2 * h)  # input_layernorm, post_attention_layernorm
    )
    table = t.vocab_size * h
    count = ParamCount(table, 0, 0 if t.tie_word_embeddings else table)  # embed_tokens
    count += _plain(h)  # final norm
    if not t.tie_word_embeddings:
        head = h * t.vocab_size
        count += ParamCount(head, 0, 0, head)  # lm_head (no bias)
    for _ in range(t.num_layers):
        count += layer
    return count


def sam_encoder_params(s: Sam2Dims) -> ParamCount:
    """Hiera trunk (patch embed, positional embeddings, blocks with stage transitions), FPN neck
    and `no_memory_embedding`."""
    dims = s.embed_dim_per_stage
    c0, (bh, bw) = dims[0], s.window_pos_embed_bkg
    w0 = s.window_size_per_stage[0]
    count = _conv(3, c0, PATCH_KERNEL**2) + _plain(c0 * bh * bw + c0 * w0 * w0)
    for stage, blocks in enumerate(s.blocks_per_stage):
        for j in range(blocks):
            d_in = dims[stage - 1] if stage > 0 and j == 0 else dims[stage]
            d = dims[stage]
            hidden = HIERA_MLP_RATIO * d
            count += (
                _plain(2 * d_in + 2 * d)  # layer_norm1 (on the input), layer_norm2
                + _linear(d_in, 3 * d)  # attn.qkv
                + _linear(d, d)  # attn.proj
                + _linear(d, hidden)  # mlp.proj_in
                + _linear(hidden, d)  # mlp.proj_out
            )
            if d_in != d:
                count += _linear(d_in, d)  # proj: the stage transition's skip projection
    for c in dims:
        count += _conv(c, s.hidden_size, 1)  # FPN neck lateral 1x1 convs
    return count + _plain(s.hidden_size)  # no_memory_embedding


def _attention(d: int, internal: int) -> ParamCount:
    """SAM2 decoder attention: q, k, v (d -> internal) and o (internal -> d), all biased."""
    return _linear(d, internal) + _linear(d, internal) + _linear(d, internal) + _linear(internal, d)


def mask_decoder_params(s: Sam2Dims, text_hidden: int, projector: str) -> ParamCount:
    """Prompt encoder + two-way transformer, upscaling, hypernetwork MLPs, IoU and object-score
    heads + the seg projector (LLM hidden state at `[SEG]` -> SAM2 prompt token)."""
    d, mi = s.hidden_size, MASK_INPUT_CHANNELS
    prompt = (
        _conv(1, mi // 4, 4)  # mask_embed.conv1 (2x2)
        + _conv(mi // 4, mi, 4)  # mask_embed.conv2 (2x2)
        + _conv(mi, d, 1)  # mask_embed.conv3 (1x1)
        + _plain(2 * (mi // 4) + 2 * mi)  # mask_embed layer norms
        + _plain(d + NUM_POINT_EMBEDDINGS * d + d)  # no_mask, point, not_a_point embeddings
    )
    cross = _attention(d, d // ATTN_DOWNSAMPLE)
    layer = (
        _attention(d, d)  # self_attn
        + cross  # cross_attn_token_to_image
        + cross  # cross_attn_image_to_token
        + _linear(d, s.decoder_mlp_dim)  # mlp.proj_in
        + _linear(s.decoder_mlp_dim, d)  # mlp.proj_out
        + _plain(4 * 2 * d)  # layer_norm1..4
    )
    decoder = (
        _plain((1 + NUM_MASK_TOKENS + 1) * d)  # iou, mask and object-score tokens
        + cross  # final_attn_token_to_image
        + _plain(2 * d)  # layer_norm_final_attn
        + _conv(d, d // 4, 4)  # upscale_conv1 (transposed 2x2)
        + _conv(d // 4, d // 8, 4)  # upscale_conv2 (transposed 2x2)
        + _plain(2 * (d // 4))  # upscale_layer_norm
        + _mlp(d, s.iou_head_hidden_dim, NUM_MASK_TOKENS, 3)  # iou_prediction_head
        + _conv(d, d // 8, 1)  # conv_s0
        + _conv(d, d // 4, 1)  # conv_s1
        + _mlp(d, d, 1, 3)  # pred_obj_score_head
    )
    for _ in range(TWO_WAY_DEPTH):
        decoder += layer
    for _ in range(NUM_MASK_TOKENS):
        decoder += _mlp(d, d, d // 8, 3)  # output_hypernetworks_mlps
    seg = _linear(text_hidden, text_hidden) + _linear(text_hidden, d)
    if projector == "residual":
        seg += _linear(text_hidden, d, bias=False)  # skip
    return prompt + decoder + seg


def param_counts(cfg: CitrusVConfig) -> dict[str, ParamCount]:
    """Exact parameter counts per component, from the config's dimensions only."""
    return {
        "vision": vision_params(cfg.vision),
        "llm": llm_params(cfg.text),
        "sam_encoder": sam_encoder_params(cfg.sam2),
        "mask_decoder": mask_decoder_params(cfg.sam2, cfg.text.hidden_size, cfg.projector),
    }
