"""The Citrus-V module: transformers' Qwen2.5-VL + transformers' SAM2 + the seg projector.

Imports torch and transformers; keep it off the runtime's and the CLI's start-up path.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Sam2Config,
    Sam2Model,
)

from citrus_edge.config import CitrusVConfig


def qwen_config(cfg: CitrusVConfig) -> Qwen2_5_VLConfig:
    """The transformers config of the Qwen2.5-VL half."""
    t, v, tok = cfg.text, cfg.vision, cfg.tokens
    text = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "mrope_section": list(t.mrope_section),
        },
        bos_token_id=tok.pad,
        eos_token_id=tok.eos,
        pad_token_id=tok.pad,
    )
    vision = dict(
        depth=v.depth,
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_heads=v.num_heads,
        out_hidden_size=v.out_hidden_size,
        patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size,
        window_size=v.window_size,
        fullatt_block_indexes=list(v.fullatt_block_indexes),
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.image,
        video_token_id=tok.video,
        vision_start_token_id=tok.vision_start,
        vision_end_token_id=tok.vision_end,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def sam2_config(cfg: CitrusVConfig) -> Sam2Config:
    """The transformers config of the SAM2 half (image mode; video memory unused)."""
    s = cfg.sam2
    stride0 = s.image_size // 4
    backbone = dict(
        model_type="sam2_hiera_det_model",
        hidden_size=s.embed_dim_per_stage[0],
        num_attention_heads=s.heads_per_stage[0],
        image_size=[s.image_size, s.image_size],
        blocks_per_stage=list(s.blocks_per_stage),
        embed_dim_per_stage=list(s.embed_dim_per_stage),
        num_attention_heads_per_stage=list(s.heads_per_stage),
        window_size_per_stage=list(s.window_size_per_stage),
        global_attention_blocks=list(s.global_attention_blocks),
        window_positional_embedding_background_size=list(s.window_pos_embed_bkg),
    )
    vision = dict(
        backbone_config=backbone,
        backbone_channel_list=list(reversed(s.embed_dim_per_stage)),
        backbone_feature_sizes=[[stride0 >> i, stride0 >> i] for i in range(3)],
        fpn_hidden_size=s.hidden_size,
    )
    prompt = dict(hidden_size=s.hidden_size, image_size=s.image_size, patch_size=16)
    decoder = dict(
        hidden_size=s.hidden_size,
        mlp_dim=s.decoder_mlp_dim,
        num_attention_heads=s.decoder_heads,
        iou_head_hidden_dim=s.iou_head_hidden_dim,
        # The stability switch swaps masks at eval time; Citrus-V always takes multimask output.
        dynamic_multimask_via_stability=False,
    )
    return Sam2Config(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
    )


class ResidualSegProjector(nn.Module):
    """Residual projector variant: Linear-ReLU-Linear plus a linear skip."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, d_in), nn.ReLU(), nn.Linear(d_in, d_out))
        self.skip = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.skip(x)


def seg_projector(cfg: CitrusVConfig) -> nn.Module:
    """LLM hidden state at `[SEG]` -> SAM2 prompt token. `seg_projector.{0,2}` in the checkpoint."""
    d_in, d_out = cfg.text.hidden_size, cfg.sam2.hidden_size
    if cfg.projector == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_in), nn.ReLU(), nn.Linear(d_in, d_out))
    return ResidualSegProjector(d_in, d_out)


class GroundingEncoder(nn.Module):
    """Holds the SAM2 model under the checkpoint's `grounding_encoder.sam2_model` prefix."""

    def __init__(self, cfg: CitrusVConfig):
        super().__init__()
        self.sam2_model = Sam2Model(sam2_config(cfg))
        # The original SAM2 has one random Fourier matrix for image and prompt positions;
        # transformers initialises two. Make them one, as in every real checkpoint.
        with torch.no_grad():
            self.sam2_model.shared_image_embedding.positional_embedding.copy_(
                self.sam2_model.prompt_encoder.shared_embedding.positional_embedding
            )


class CitrusV(nn.Module):
    """Citrus-V: `mllm` (Qwen2.5-VL), `grounding_encoder.sam2_model` (SAM2), `seg_projector`."""

    def __init__(self, cfg: CitrusVConfig):
        super().__init__()
        self.config = cfg
        self.mllm = Qwen2_5_VLForConditionalGeneration(qwen_config(cfg))
        if cfg.vision.merger_intermediate_size is not None:
            # A pruned merger (transformers' has no setting for its MLP width): same layout,
            # fewer hidden channels.
            v, mlp = cfg.vision, self.mllm.model.visual.merger.mlp
            mlp[0] = nn.Linear(v.merged_size, v.merger_width)
            mlp[2] = nn.Linear(v.merger_width, v.out_hidden_size)
        self.grounding_encoder = GroundingEncoder(cfg)
        self.seg_projector = seg_projector(cfg)

    @property
    def sam2(self) -> Sam2Model:
        return self.grounding_encoder.sam2_model

    # -- SAM2 pieces, split as they are exported ----------------------------------------
    def encode_image_sam(self, sam_pixels: torch.Tensor) -> list[torch.Tensor]:
        """SAM2 image encoder: [B,3,S,S] -> [feat_s0, feat_s1, image_embeddings] (NCHW)."""
        sam = self.sam2
        out = sam.get_image_features(sam_pixels, return_dict=True)
        maps = list(out.fpn_hidden_states)
        maps[-1] = maps[-1] + sam.no_memory_embedding
        b = sam_pixels.shape[0]
        return [
            f.permute(1, 2, 0).reshape(b, -1, *size)
            for f, size in zip(maps, sam.backbone_feature_sizes, strict=True)
        ]

    def sparse_prompt(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """[N, H_llm] `[SEG]` states -> [N, 1, 3, D] sparse prompt: 2 not-a-point + projected SEG."""
        sam = self.sam2
        n = seg_hidden.shape[0]
        points = torch.zeros(n, 1, 1, 2, dtype=seg_hidden.dtype, device=seg_hidden.device)
        labels = -torch.ones(n, 1, 1, dtype=torch.int32, device=seg_hidden.device)
        sparse, _ = sam.prompt_encoder(points, labels, None, None)  # [N, 1, 2, D]
        seg = self.seg_projector(seg_hidden)[:, None, None, :]  # [N, 1, 1, D]
        return torch.cat([sparse, seg], dim=2)

    def decode_masks(
        self, features: list[torch.Tensor], seg_hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask decoder for N `[SEG]` states; `features` hold one image (batch 1) or N images.

        Returns low-res mask logits [N, 3, h, w] and IoU predictions [N, 3].
        """
        sam = self.sam2
        n = seg_hidden.shape[0]
        sparse = self.sparse_prompt(seg_hidden)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            n, -1, *sam.prompt_encoder.image_embedding_size
        )
        pos = sam.get_image_wide_positional_embeddings().expand(n, -1, -1, -1)
        feats = [f.expand(n, -1, -1, -1) if f.shape[0] == 1 else f for f in features]
        masks, iou, _, _ = sam.mask_decoder(
            image_embeddings=feats[-1],
            image_positional_embeddings=pos,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            high_resolution_features=feats[:-1],
        )
        return masks[:, 0], iou[:, 0]


def build_model(cfg: CitrusVConfig, seed: int | None = 0) -> CitrusV:
    """A Citrus-V with random weights from a config; never touches the network."""
    if seed is not None:
        torch.manual_seed(seed)
    model = CitrusV(cfg)
    model.eval()
    return model
