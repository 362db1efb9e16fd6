"""SAM2 prompt encoder + mask decoder with the seg projector folded in, one graph per query.

Inputs: `seg_hidden` [N, H_llm] (the LLM's `[SEG]` states), and one image's encoder outputs
`image_embeddings` [1, D, h, w], `feat_s0`, `feat_s1` (batch 1, expanded to N inside).
Outputs: `mask_logits` [N, 3, 4h, 4w] (all three multimask outputs) and `iou_predictions`
[N, 3]. Picking the best mask is host work (`citrus_edge.postprocess.select_masks`): a
data-dependent selection kept out of the graph.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from citrus_edge.config import CitrusVConfig
from citrus_edge.modelling.model import CitrusV

from .export_config import ExportConfig
from .sam_encoder import feature_shapes
from .spec import Case, Component, GraphSpec, Sample, TensorSpec, register

NAME = "mask_decoder"
N_MASKS = 3  # multimask outputs


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


def mask_decoder_spec(cfg: CitrusVConfig, export_cfg: ExportConfig) -> GraphSpec:
    """Spec of the mask decoder graph: N (number of `[SEG]` states) dynamic."""
    shapes = feature_shapes(cfg)
    features = ("image_embeddings", "feat_s0", "feat_s1")
    _, mh, mw = shapes["feat_s0"]

    def make_sample(case: Case, seed: int) -> Sample:
        rng = np.random.default_rng(seed)
        feeds = {"seg_hidden": rng.standard_normal((case["n"], cfg.text.hidden_size))}
        feeds.update({k: rng.standard_normal((1, *shapes[k])) for k in features})
        feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
        return Sample(label=f"n {case['n']}", feeds=feeds)

    return GraphSpec(
        component=NAME,
        inputs=(
            TensorSpec("seg_hidden", ("n", cfg.text.hidden_size)),
            *(TensorSpec(k, (1, *shapes[k])) for k in features),
        ),
        outputs=(
            TensorSpec("mask_logits", ("n", N_MASKS, mh, mw)),
            TensorSpec("iou_predictions", ("n", N_MASKS)),
        ),
        make_sample=make_sample,
        export_case={"n": 2},
        validation_cases=({"n": 1}, {"n": 3}),
        atol=export_cfg.atol,
    )


@torch.no_grad()
def mask_decoder_reference(model: CitrusV, sample: Sample) -> dict[str, np.ndarray]:
    """The stock path: `model.decode_masks([feat_s0, feat_s1, image_embeddings], seg_hidden)`."""
    f = {k: torch.from_numpy(v) for k, v in sample.feeds.items()}
    low, iou = model.decode_masks(
        [f["feat_s0"], f["feat_s1"], f["image_embeddings"]], f["seg_hidden"]
    )
    return {"mask_logits": low.numpy(), "iou_predictions": iou.numpy()}


COMPONENT = register(
    Component(
        name=NAME,
        spec=mask_decoder_spec,
        wrapper=MaskDecoderExport,
        reference=mask_decoder_reference,
    )
)
