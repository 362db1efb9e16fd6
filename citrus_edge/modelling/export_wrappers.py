"""The export-only `nn.Module` wrappers: each component's stock weights with a graph-friendly
forward, traced by `onnx_trace.trace_graph` into the graphs `citrus_edge.component_specs`
describes.

- `VisionExport`: Qwen2.5-VL vision encoder (ViT + patch merger) over host-computed grid inputs
  (`host_inputs.vision_inputs`). Windowed blocks run as a batch of windows padded to a fixed
  width (padded keys masked), full-attention blocks attend over all tokens; the output is the
  merged image features in merge order.
- `LlmStepExport`: the Qwen2.5 language model + lm_head as one step with an explicit KV cache
  (prefill and decode); its own KV concat and causal + padding mask from `attention_mask`,
  instead of transformers' cache objects and mask helpers, which do not trace to a graph with a
  dynamic cache length.
- `SamEncoderExport`: SAM2 image encoder (Hiera + FPN neck + the decoder's s0/s1 projections),
  exactly `CitrusV.encode_image_sam`.
- `MaskDecoderExport`: SAM2 prompt encoder + mask decoder with the seg projector folded in.

Attention is written out as MatMul / Add / Softmax (`attend`) instead of
`scaled_dot_product_attention`, so the ONNX graph is the same for every exporter and TensorRT
version and padded keys take an additive bias.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
    repeat_kv,
)

from citrus_edge.modelling.model import CitrusV

MAX_TENSOR_BYTES = 1 << 30  # largest single weight in the graph (protobuf's limit is 2 GiB)


# -- attention -------------------------------------------------------------------------------------


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v in float32; q [..., Sq, d], k/v [..., Sk, d] -> [..., Sq, d]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [..., Sq, Sk]
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(weights, v)


def masked_bias(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive bias from a boolean "may attend" mask: 0 where allowed, the dtype's min elsewhere."""
    zero = torch.zeros((), dtype=dtype)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, low)


# -- vision -------------------------------------------------------------------------------------


class VisionExport(nn.Module):
    """Export-only forward of the stock vision tower over host-computed grid inputs.

    Re-uses the stock modules and weights: `patch_embed`, each block's `norm1`, `attn.qkv`,
    `attn.proj`, `norm2`, `mlp`, and the `merger`.
    """

    def __init__(self, model: CitrusV):
        super().__init__()
        self.visual = model.mllm.model.visual
        self.full_attention = frozenset(self.visual.fullatt_block_indexes)
        self.unit = self.visual.spatial_merge_unit
        # The patch embedding is a Conv3d whose kernel equals its stride and its input: one
        # linear map of each flattened patch. Exported as that MatMul, its weight a plain 2-D
        # initializer [3*T*P*P, C] (the exporter folds no Flatten/Transpose of a parameter):
        # ONNX Runtime's CPU Conv has no fast 3-D path (demo shapes, 576 patches: 8.9 ms as
        # Conv, 0.70 ms as MatMul, one thread), and quantizers take a constant-weight MatMul.
        weight = self.visual.patch_embed.proj.weight  # [C, 3, T, P, P]
        self.register_buffer("patch_matrix", weight.detach().flatten(1).t().contiguous())

    def forward(
        self,
        pixel_values: torch.Tensor,  # [S, C*T*P*P] merge order
        window_index: torch.Tensor,  # [S/m^2]
        reverse_index: torch.Tensor,  # [S/m^2]
        cos: torch.Tensor,  # [S, d] window order
        sin: torch.Tensor,  # [S, d]
        gather_index: torch.Tensor,  # [W, T]
        window_valid: torch.Tensor,  # [W, T] bool
        scatter_index: torch.Tensor,  # [S]
    ) -> torch.Tensor:
        x = pixel_values.to(self.patch_matrix.dtype) @ self.patch_matrix  # [S, C] merge order
        c = x.shape[-1]
        x = x.reshape(-1, self.unit, c)[window_index].reshape(-1, c)  # [S, C] window order
        key_bias = masked_bias(window_valid)[:, None, None, :]  # [W, 1, 1, T]
        windows = (gather_index, key_bias, scatter_index)
        for i, block in enumerate(self.visual.blocks):
            layout = None if i in self.full_attention else windows
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, layout)
            x = x + block.mlp(block.norm2(x))
        merged = self.visual.merger(x)  # [S/m^2, out_hidden] window order
        return merged[reverse_index]  # [S/m^2, out_hidden] merge order

    @staticmethod
    def _attention(
        attn: nn.Module,
        x: torch.Tensor,  # [S, C]
        cos: torch.Tensor,
        sin: torch.Tensor,
        windows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        qkv = attn.qkv(x).reshape(-1, 3, attn.num_heads, attn.head_dim)  # [S, 3, nh, d]
        q, k, v = qkv.permute(1, 0, 2, 3).unbind(0)  # [S, nh, d] each
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        if windows is None:  # full attention over the whole image
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [nh, S, d]
            out = attend(q, k, v, attn.scaling, None).transpose(0, 1)  # [S, nh, d]
            return attn.proj(out.reshape(-1, attn.dim))
        gather, bias, scatter = windows
        q, k, v = (t[gather].transpose(1, 2) for t in (q, k, v))  # [W, nh, T, d]
        out = attend(q, k, v, attn.scaling, bias).transpose(1, 2)  # [W, T, nh, d]
        out = out.reshape(-1, attn.dim)[scatter]  # [S, C] padding dropped
        return attn.proj(out)


# -- LLM step -----------------------------------------------------------------------------------


def causal_padding_bias(attention_mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """Additive attention bias [B, 1, S, P+S] from a [B, P+S] padding mask.

    Query i (cache slot P+i) sees key j when j <= P+i and `attention_mask[b, j] == 1`.
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total)  # [P+S]
    query_pos = torch.arange(n_new) + (total - n_new)  # [S]
    causal = key_pos[None, :] <= query_pos[:, None]  # [S, P+S]
    allowed = causal[None] & attention_mask[:, None, :].bool()  # [B, S, P+S]
    return masked_bias(allowed)[:, None]  # [B, 1, S, P+S]


class LlmStepExport(nn.Module):
    """Export-only forward of the stock language model + lm_head with an explicit KV cache."""

    def __init__(self, model: CitrusV):
        super().__init__()
        self.lm = model.mllm.model.language_model
        self.lm_head = model.mllm.lm_head
        # A head over MAX_TENSOR_BYTES goes in as vocabulary slices (views, no copy): the 8B's
        # is 2.2 GB fp32, and graph tools that hold a graph in one protobuf (ModelOpt's ONNX
        # quantizer) cannot serialize a single tensor over 2 GiB.
        rows = head_rows_per_slice(self.lm_head.weight)
        self.head_slices = nn.ParameterList(
            [nn.Parameter(w, requires_grad=False) for w in self.lm_head.weight.split(rows)]
            if rows < self.lm_head.weight.shape[0]
            else []
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [B, S, H]
        position_ids: torch.Tensor,  # [3, B, S]
        attention_mask: torch.Tensor,  # [B, P+S]
        *past: torch.Tensor,  # past_key_0, past_value_0, ... [B, kvH, P, d]
    ) -> tuple[torch.Tensor, ...]:
        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids)  # [B, S, d] each
        bias = causal_padding_bias(attention_mask, inputs_embeds.shape[1])
        h = inputs_embeds
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.lm.layers):
            h, k, v = self._layer(layer, h, cos, sin, bias, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        hidden = self.lm.norm(h)  # [B, S, H]
        if len(self.head_slices):
            logits = torch.cat([hidden @ w.t() for w in self.head_slices], dim=-1)  # [B, S, V]
        else:
            logits = self.lm_head(hidden)  # [B, S, V]
        return (logits, hidden, *presents)

    @staticmethod
    def _layer(
        layer: nn.Module,
        h: torch.Tensor,  # [B, S, H]
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,  # [B, 1, S, P+S]
        past_k: torch.Tensor,  # [B, kvH, P, d]
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        heads = (*x.shape[:2], -1, attn.head_dim)
        q = attn.q_proj(x).view(heads).transpose(1, 2)  # [B, nH, S, d]
        k = attn.k_proj(x).view(heads).transpose(1, 2)  # [B, kvH, S, d]
        v = attn.v_proj(x).view(heads).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = torch.cat([past_k, k], dim=2)  # [B, kvH, P+S, d]
        v = torch.cat([past_v, v], dim=2)
        groups = attn.num_key_value_groups
        out = attend(q, repeat_kv(k, groups), repeat_kv(v, groups), attn.scaling, bias)
        out = out.transpose(1, 2).reshape(*h.shape[:2], -1)  # [B, S, nH*d]
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k, v


def head_rows_per_slice(weight: torch.Tensor) -> int:
    """Vocabulary rows per `lm_head` slice so that no slice exceeds `MAX_TENSOR_BYTES`."""
    vocab = weight.shape[0]
    n = -(-weight.numel() * weight.element_size() // MAX_TENSOR_BYTES)  # ceil
    return -(-vocab // max(1, n))


# -- SAM2 ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _constant_pos_embed(backbone: nn.Module, pos: torch.Tensor) -> Iterator[None]:
    """Make the Hiera backbone return `pos` as its position embedding, for this block only.

    The embedding depends only on the fixed input size; traced, it becomes a bicubic Resize
    plus a Tile behind two If nodes. A constant is exact and leaves none of them in the graph.
    """

    def fixed(hw: tuple[int, int]) -> torch.Tensor:
        assert tuple(hw) == tuple(pos.shape[1:3]), (hw, pos.shape)
        return pos

    backbone._get_pos_embed = fixed  # an instance attribute shadows the method
    try:
        yield
    finally:
        del backbone._get_pos_embed


class SamEncoderExport(nn.Module):
    """Export-only wrapper: the stock `encode_image_sam`, outputs in graph order.

    The backbone's position embedding is computed once here by the stock code and fed as a
    constant while the wrapper runs.
    """

    def __init__(self, model: CitrusV):
        super().__init__()
        self.model = model
        backbone = model.sam2.vision_encoder.backbone
        s = model.config.sam2.image_size
        with torch.no_grad():
            hw = backbone.patch_embed(torch.zeros(1, 3, s, s)).shape[1:3]
            self.register_buffer("pos_embed", backbone._get_pos_embed(hw), persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with _constant_pos_embed(self.model.sam2.vision_encoder.backbone, self.pos_embed):
            feat_s0, feat_s1, image_embeddings = self.model.encode_image_sam(pixels)
        return image_embeddings, feat_s0, feat_s1


class MaskDecoderExport(nn.Module):
    """Export-only form of `CitrusV.decode_masks`: seg projector + prompt + stock mask decoder.

    The prompt pieces that do not depend on the query -- the two not-a-point tokens, the
    no-mask dense embedding and the image-wide positional encoding -- are computed here once by
    the stock modules and enter the graph as constants (no Fourier features, ScatterND or
    Sin/Cos per query); only the projected `[SEG]` token is computed per query.
    """

    def __init__(self, model: CitrusV):
        super().__init__()
        self.model = model
        sam = model.sam2
        self.size = tuple(sam.prompt_encoder.image_embedding_size)  # (h, w)
        with torch.no_grad():
            probe = torch.zeros(1, model.config.text.hidden_size)
            fixed_tokens = model.sparse_prompt(probe)[:, :, :-1]  # [1, 1, 2, D]
            dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # [1, D, 1, 1]
            self.register_buffer("fixed_tokens", fixed_tokens, persistent=False)
            self.register_buffer("dense", dense.clone(), persistent=False)
            pe = sam.get_image_wide_positional_embeddings()  # [1, D, h, w]
            self.register_buffer("image_pe", pe, persistent=False)

    def forward(
        self,
        seg_hidden: torch.Tensor,  # [N, H_llm]
        image_embeddings: torch.Tensor,  # [1, D, h, w]
        feat_s0: torch.Tensor,  # [1, D/8, 4h, 4w]
        feat_s1: torch.Tensor,  # [1, D/4, 2h, 2w]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = seg_hidden.shape[0]
        seg = self.model.seg_projector(seg_hidden)[:, None, None, :]  # [N, 1, 1, D]
        sparse = torch.cat([self.fixed_tokens.expand(n, -1, -1, -1), seg], dim=2)  # [N, 1, 3, D]
        masks, iou, _, _ = self.model.sam2.mask_decoder(
            image_embeddings=image_embeddings.expand(n, -1, -1, -1),
            image_positional_embeddings=self.image_pe.expand(n, -1, -1, -1),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=self.dense.expand(n, -1, *self.size),
            multimask_output=True,
            high_resolution_features=[feat_s0.expand(n, -1, -1, -1), feat_s1.expand(n, -1, -1, -1)],
        )
        return masks[:, 0], iou[:, 0]  # [N, 3, 4h, 4w], [N, 3]
