"""Qwen2.5-VL vision encoder (ViT + patch merger) as one graph for every image resolution.

Everything that depends on the image grid -- window order and its inverse, rotary cos/sin in
window order, the attention windows -- is computed on the host (`host_inputs.vision_inputs`)
and fed in: it comes from loops and data-dependent indexing that ONNX and TensorRT handle badly.
Windowed blocks run as a batch of windows padded to a fixed width (padded keys masked), not as a
quadratic block-diagonal mask; full-attention blocks attend over all tokens, so one call takes
one image. The output is the merged image features in the original (merge) order, the rows the
LLM's image placeholders take.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from citrus_edge.config import CitrusVConfig
from citrus_edge.host_inputs import VISION_INPUTS, vision_inputs, window_tokens
from citrus_edge.modelling.model import CitrusV

from .attention import attend, masked_bias
from .export_config import ExportConfig
from .spec import Case, Component, GraphSpec, Sample, TensorSpec, register

NAME = "vision"
EXPORT_GRID = (8, 12)  # (h, w) patches of the traced sample: 2 windows, unlike any image size


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
        x = self.visual.patch_embed(pixel_values)  # [S, C] merge order
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


def _grid_of(image_hw: tuple[int, int], cfg: CitrusVConfig) -> tuple[int, int]:
    v = cfg.vision
    factor = v.patch_size * v.spatial_merge_size
    h, w = image_hw
    if h % factor or w % factor:
        raise ValueError(
            f"image size {h}x{w} is not a multiple of {factor}; give resized sizes "
            "(preprocess.smart_resize) as image_sizes"
        )
    return h // v.patch_size, w // v.patch_size


def vision_spec(cfg: CitrusVConfig, export_cfg: ExportConfig) -> GraphSpec:
    """Spec of the vision graph; validated at the grids of `export_cfg.image_sizes`."""
    v = cfg.vision
    patch_dim = 3 * v.temporal_patch_size * v.patch_size**2
    tw = window_tokens(v)
    shapes = {
        "pixel_values": (("n_patches", patch_dim), "float32"),
        "window_index": (("n_units",), "int64"),
        "reverse_index": (("n_units",), "int64"),
        "cos": (("n_patches", v.head_dim), "float32"),
        "sin": (("n_patches", v.head_dim), "float32"),
        "gather_index": (("n_windows", tw), "int64"),
        "window_valid": (("n_windows", tw), "bool"),
        "scatter_index": (("n_patches",), "int64"),
    }
    inputs = tuple(TensorSpec(n, *shapes[n]) for n in VISION_INPUTS)
    outputs = (TensorSpec("image_features", ("n_units", v.out_hidden_size)),)

    def make_sample(case: Case, seed: int) -> Sample:
        h, w = case["grid_h"], case["grid_w"]
        rng = np.random.default_rng(seed)
        pixels = rng.standard_normal((h * w, patch_dim)).astype(np.float32)
        return Sample(
            label=f"grid 1x{h}x{w} ({h * v.patch_size}x{w * v.patch_size} px)",
            feeds=vision_inputs(pixels, (1, h, w), v),
            context={"grid_thw": (1, h, w)},
        )

    grids = [_grid_of(hw, cfg) for hw in export_cfg.image_sizes]
    return GraphSpec(
        component=NAME,
        inputs=inputs,
        outputs=outputs,
        make_sample=make_sample,
        export_case={"grid_h": EXPORT_GRID[0], "grid_w": EXPORT_GRID[1]},
        validation_cases=tuple({"grid_h": h, "grid_w": w} for h, w in grids),
        atol=export_cfg.atol,
    )


@torch.no_grad()
def vision_reference(model: CitrusV, sample: Sample) -> dict[str, np.ndarray]:
    """The stock tower: `model.mllm.model.visual(pixel_values, grid_thw)`'s merged features."""
    pixels = torch.from_numpy(sample.feeds["pixel_values"])
    grid = torch.tensor([sample.context["grid_thw"]])
    out = model.mllm.model.visual(pixels, grid_thw=grid).pooler_output
    return {"image_features": out.numpy()}


COMPONENT = register(
    Component(name=NAME, spec=vision_spec, wrapper=VisionExport, reference=vision_reference)
)
