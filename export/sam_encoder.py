"""SAM2 image encoder (Hiera + FPN neck + the decoder's s0/s1 projections) as one graph.

pixels [B, 3, S, S] (`preprocess.sam_pixels`, S = the config's SAM image size) ->
`image_embeddings` [B, D, S/16, S/16], `feat_s0` [B, D/8, S/4, S/4], `feat_s1` [B, D/4, S/8, S/8]:
exactly `CitrusV.encode_image_sam`. It runs once per image; the mask decoder graph runs per
`[SEG]` on its outputs (the SAM "split" export).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from citrus_edge.config import CitrusVConfig
from citrus_edge.modelling.model import CitrusV

from .export_config import ExportConfig
from .spec import Case, Component, GraphSpec, Sample, TensorSpec, register

NAME = "sam_encoder"
OUTPUTS = ("image_embeddings", "feat_s0", "feat_s1")


def feature_shapes(cfg: CitrusVConfig) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of each SAM2 encoder output for one image."""
    s, d = cfg.sam2.image_size, cfg.sam2.hidden_size
    return {
        "image_embeddings": (d, s // 16, s // 16),
        "feat_s0": (d // 8, s // 4, s // 4),
        "feat_s1": (d // 4, s // 8, s // 8),
    }


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


def sam_encoder_spec(cfg: CitrusVConfig, export_cfg: ExportConfig) -> GraphSpec:
    """Spec of the SAM2 encoder graph: batch dynamic, image size fixed by the config."""
    s = cfg.sam2.image_size
    shapes = feature_shapes(cfg)

    def make_sample(case: Case, seed: int) -> Sample:
        rng = np.random.default_rng(seed)
        pixels = rng.standard_normal((case["batch"], 3, s, s)).astype(np.float32)
        return Sample(label=f"batch {case['batch']}", feeds={"pixels": pixels})

    return GraphSpec(
        component=NAME,
        inputs=(TensorSpec("pixels", ("batch", 3, s, s)),),
        outputs=tuple(TensorSpec(n, ("batch", *shapes[n])) for n in OUTPUTS),
        make_sample=make_sample,
        export_case={"batch": 1},
        validation_cases=({"batch": 2},),
        atol=export_cfg.atol,
    )


@torch.no_grad()
def sam_encoder_reference(model: CitrusV, sample: Sample) -> dict[str, np.ndarray]:
    """The stock path: `model.encode_image_sam(pixels)`."""
    feat_s0, feat_s1, emb = model.encode_image_sam(torch.from_numpy(sample.feeds["pixels"]))
    return {"image_embeddings": emb.numpy(), "feat_s0": feat_s0.numpy(), "feat_s1": feat_s1.numpy()}


COMPONENT = register(
    Component(
        name=NAME, spec=sam_encoder_spec, wrapper=SamEncoderExport, reference=sam_encoder_reference
    )
)
