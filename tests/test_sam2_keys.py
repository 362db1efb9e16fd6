"""SAM2 key mapping between facebookresearch/sam2 names and transformers' Sam2Model, on tiny models."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2Model,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)

from citrus_edge.modelling.sam2_keys import (  # noqa: E402
    HF_ONLY_KEYS,
    Sam2KeyError,
    Sam2TensorMismatchError,
    hf_to_original,
    is_known_unused,
    original_to_hf,
)

GAUSSIAN = "prompt_encoder.shared_embedding.positional_embedding"
GAUSSIAN_COPY = "shared_image_embedding.positional_embedding"

# Shapes of real SAM2.1 Hiera-L keys, read off facebookresearch/sam2's SAM2Base built from
# configs/sam2.1/sam2.1_hiera_l.yaml (903 keys: 743 for the image path, 160 for video memory).
HIERA_L_ORIGINAL_SHAPES = {
    "no_mem_embed": (1, 1, 256),
    "image_encoder.trunk.patch_embed.proj.weight": (144, 3, 7, 7),
    "image_encoder.trunk.pos_embed": (1, 144, 7, 7),
    "image_encoder.trunk.pos_embed_window": (1, 144, 8, 8),
    "image_encoder.trunk.blocks.0.attn.qkv.weight": (432, 144),
    "image_encoder.trunk.blocks.2.proj.weight": (288, 144),
    "image_encoder.trunk.blocks.8.proj.weight": (576, 288),
    "image_encoder.trunk.blocks.44.proj.weight": (1152, 576),
    "image_encoder.trunk.blocks.47.mlp.layers.1.weight": (1152, 4608),
    "image_encoder.neck.convs.0.conv.weight": (256, 1152, 1, 1),
    "image_encoder.neck.convs.3.conv.weight": (256, 144, 1, 1),
    "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
    "sam_prompt_encoder.point_embeddings.3.weight": (1, 256),
    "sam_prompt_encoder.mask_downscaling.6.weight": (256, 16, 1, 1),
    "sam_mask_decoder.transformer.layers.1.self_attn.out_proj.weight": (256, 256),
    "sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight": (2048, 256),
    "sam_mask_decoder.transformer.norm_final_attn.weight": (256,),
    "sam_mask_decoder.output_hypernetworks_mlps.3.layers.2.weight": (32, 256),
    "sam_mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
    "sam_mask_decoder.pred_obj_score_head.layers.2.weight": (1, 256),
    "sam_mask_decoder.output_upscaling.3.weight": (64, 32, 2, 2),
    "sam_mask_decoder.conv_s0.weight": (32, 256, 1, 1),
}
HIERA_L_IMAGE_KEYS = 743

# Names every SAM2 checkpoint has (index 0 of each repeated module); the tiny model must yield them.
REAL_ORIGINAL_NAMES = [
    "no_mem_embed",
    "image_encoder.trunk.patch_embed.proj.weight",
    "image_encoder.trunk.pos_embed",
    "image_encoder.trunk.pos_embed_window",
    "image_encoder.trunk.blocks.0.norm1.weight",
    "image_encoder.trunk.blocks.0.attn.qkv.weight",
    "image_encoder.trunk.blocks.0.attn.proj.bias",
    "image_encoder.trunk.blocks.0.mlp.layers.0.weight",
    "image_encoder.trunk.blocks.0.mlp.layers.1.bias",
    "image_encoder.trunk.blocks.1.proj.weight",
    "image_encoder.neck.convs.0.conv.weight",
    "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "sam_prompt_encoder.point_embeddings.0.weight",
    "sam_prompt_encoder.not_a_point_embed.weight",
    "sam_prompt_encoder.no_mask_embed.weight",
    "sam_prompt_encoder.mask_downscaling.0.weight",
    "sam_prompt_encoder.mask_downscaling.1.bias",
    "sam_prompt_encoder.mask_downscaling.4.weight",
    "sam_mask_decoder.iou_token.weight",
    "sam_mask_decoder.mask_tokens.weight",
    "sam_mask_decoder.obj_score_token.weight",
    "sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
    "sam_mask_decoder.transformer.layers.0.cross_attn_token_to_image.out_proj.weight",
    "sam_mask_decoder.transformer.layers.0.cross_attn_image_to_token.v_proj.bias",
    "sam_mask_decoder.transformer.layers.0.norm4.weight",
    "sam_mask_decoder.transformer.layers.0.mlp.layers.1.weight",
    "sam_mask_decoder.transformer.final_attn_token_to_image.k_proj.weight",
    "sam_mask_decoder.transformer.norm_final_attn.bias",
    "sam_mask_decoder.output_upscaling.0.weight",
    "sam_mask_decoder.output_upscaling.1.weight",
    "sam_mask_decoder.output_upscaling.3.bias",
    "sam_mask_decoder.conv_s0.weight",
    "sam_mask_decoder.conv_s1.bias",
    "sam_mask_decoder.output_hypernetworks_mlps.0.layers.2.weight",
    "sam_mask_decoder.iou_prediction_head.layers.0.weight",
    "sam_mask_decoder.pred_obj_score_head.layers.1.weight",
]

# One key of each video-memory module of a real SAM2.1 checkpoint.
MEMORY_KEYS = {
    "memory_attention.layers.0.self_attn.q_proj.weight": (8, 8),
    "memory_attention.layers.0.cross_attn_image.k_proj.weight": (8, 4),
    "memory_attention.norm.bias": (8,),
    "memory_encoder.mask_downsampler.encoder.0.weight": (4, 1, 3, 3),
    "memory_encoder.fuser.layers.0.gamma": (8,),
    "memory_encoder.out_proj.weight": (4, 8, 1, 1),
    "maskmem_tpos_enc": (7, 1, 1, 4),
    "no_mem_pos_enc": (1, 1, 8),
    "no_obj_ptr": (1, 8),
    "no_obj_embed_spatial": (1, 4),
    "mask_downsample.weight": (1, 1, 4, 4),
    "obj_ptr_proj.layers.2.bias": (8,),
    "obj_ptr_tpos_proj.weight": (4, 8),
}


def tiny_config(iou_head_depth: int = 3) -> Sam2Config:
    """A 4-stage Hiera (dims 16..128) with a 32-wide FPN, prompt encoder and mask decoder."""
    hiera = Sam2HieraDetConfig(
        hidden_size=16,
        embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 2, 2],
        blocks_per_stage=[1, 1, 2, 1],
        global_attention_blocks=[3],  # not a stage's first block (q-pool needs a window)
        window_positional_embedding_background_size=[4, 4],
        window_size_per_stage=[8, 4, 4, 2],
        image_size=[256, 256],
    )
    vision = Sam2VisionConfig(
        backbone_config=hiera,
        backbone_channel_list=[128, 64, 32, 16],
        backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
        fpn_hidden_size=32,
    )
    prompt = Sam2PromptEncoderConfig(hidden_size=32, image_size=256, patch_size=16)
    decoder = Sam2MaskDecoderConfig(
        hidden_size=32,
        mlp_dim=64,
        num_attention_heads=2,
        iou_head_depth=iou_head_depth,
        iou_head_hidden_dim=32,
    )
    return Sam2Config(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
    )


def hiera_l_config() -> Sam2Config:
    """SAM2.1 Hiera-L as transformers' convert_sam2_to_hf.py configures it."""
    hiera = Sam2HieraDetConfig(
        hidden_size=144,
        embed_dim_per_stage=[144, 288, 576, 1152],
        num_attention_heads_per_stage=[2, 4, 8, 16],
        blocks_per_stage=[2, 6, 36, 4],
        global_attention_blocks=[23, 33, 43],
        window_positional_embedding_background_size=[7, 7],
        window_size_per_stage=[8, 4, 16, 8],
    )
    vision = Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[1152, 576, 288, 144])
    return Sam2Config(vision_config=vision)


def tiny_model(iou_head_depth: int = 3, seed: int = 0) -> Sam2Model:
    """A tiny Sam2Model with every tensor random (norms and zero-initialised ones included)."""
    torch.manual_seed(seed)
    model = Sam2Model(tiny_config(iou_head_depth)).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn_like(tensor))
        # As after a real conversion: both HF copies hold the one original matrix.
        model.shared_image_embedding.positional_embedding.copy_(
            model.prompt_encoder.shared_embedding.positional_embedding
        )
    return model


def predict(model: Sam2Model) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [1, 1, 3, 64, 64] and IoU scores [1, 1, 3] for one fixed image and two points."""
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 256, 256)
    points = torch.tensor([[[[40.0, 200.0], [180.0, 60.0]]]])  # [B, objects, points, xy]
    labels = torch.tensor([[[1, 0]]])
    with torch.no_grad():
        out = model(pixel_values=pixels, input_points=points, input_labels=labels)
    return out.pred_masks, out.iou_scores


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, and for each key the same shape, dtype and values (max abs diff 0)."""
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert a[key].dtype == b[key].dtype, key
        assert (a[key] - b[key]).abs().max().item() == 0.0, key


def test_tiny_model_runs() -> None:
    masks, scores = predict(tiny_model())
    assert masks.shape == (1, 1, 3, 64, 64)
    assert scores.shape == (1, 1, 3)
    assert torch.isfinite(masks).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("iou_head_depth", [3, 4])
def test_round_trip_hf_original_hf_is_exact(iou_head_depth: int) -> None:
    state = tiny_model(iou_head_depth).state_dict()
    original = hf_to_original(state)
    back, unused = original_to_hf(original)
    assert unused == []
    assert_same_state(back, state)


@pytest.mark.parametrize("iou_head_depth", [3, 4])
def test_original_weights_load_into_a_fresh_model_and_predict_the_same(iou_head_depth: int) -> None:
    source = tiny_model(iou_head_depth, seed=0)
    original = hf_to_original(source.state_dict())
    target = tiny_model(iou_head_depth, seed=1)
    hf_state, _ = original_to_hf(original)
    target.load_state_dict(hf_state, strict=True)
    (masks_a, scores_a), (masks_b, scores_b) = predict(source), predict(target)
    assert (masks_a - masks_b).abs().max().item() == 0.0
    assert (scores_a - scores_b).abs().max().item() == 0.0


def test_original_names_are_real_sam2_names() -> None:
    original = hf_to_original(tiny_model().state_dict())
    missing = [name for name in REAL_ORIGINAL_NAMES if name not in original]
    assert missing == []
    prefixes = ("image_encoder.trunk.", "image_encoder.neck.", "sam_prompt_encoder.")
    assert all(
        k.startswith((*prefixes, "sam_mask_decoder.")) or k == "no_mem_embed" for k in original
    )
    assert not any(is_known_unused(k) for k in original)


def test_mlp_layers_map_to_proj_in_hidden_proj_out() -> None:
    state = tiny_model(iou_head_depth=4).state_dict()
    original = hf_to_original(state)
    head, hf_head = "sam_mask_decoder.iou_prediction_head", "mask_decoder.iou_prediction_head"
    pairs = {0: "proj_in", 1: "layers.0", 2: "layers.1", 3: "proj_out"}
    for k, slot in pairs.items():
        assert original[f"{head}.layers.{k}.weight"] is state[f"{hf_head}.{slot}.weight"]
    assert f"{head}.layers.4.weight" not in original


def test_point_embeddings_are_the_rows_of_point_embed() -> None:
    state = tiny_model().state_dict()
    original = hf_to_original(state)
    table = state["prompt_encoder.point_embed.weight"]  # [4, C]
    for k in range(4):
        row = original[f"sam_prompt_encoder.point_embeddings.{k}.weight"]  # [1, C]
        assert row.shape == (1, table.shape[1])
        assert (row[0] - table[k]).abs().max().item() == 0.0


def test_gaussian_matrix_fills_both_hf_copies() -> None:
    assert set(HF_ONLY_KEYS) == {GAUSSIAN_COPY}
    original = hf_to_original(tiny_model().state_dict())
    hf_state, _ = original_to_hf(original)
    matrix = original["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert hf_state[GAUSSIAN] is matrix
    assert (hf_state[GAUSSIAN_COPY] - matrix).abs().max().item() == 0.0


def test_differing_gaussian_copies_are_refused() -> None:
    state = tiny_model().state_dict()
    state[GAUSSIAN_COPY] = state[GAUSSIAN] + 1.0
    with pytest.raises(Sam2TensorMismatchError, match=GAUSSIAN_COPY):
        hf_to_original(state)


def test_gaussian_copy_without_its_source_is_refused() -> None:
    state = dict(tiny_model().state_dict())
    del state[GAUSSIAN]
    with pytest.raises(Sam2KeyError, match=GAUSSIAN.replace(".", r"\.")):
        hf_to_original(state)


def test_memory_keys_are_reported_unused_not_dropped() -> None:
    original = hf_to_original(tiny_model().state_dict())
    memory = {k: torch.zeros(shape) for k, shape in MEMORY_KEYS.items()}
    hf_state, unused = original_to_hf({**original, **memory})
    assert sorted(unused) == sorted(MEMORY_KEYS)
    assert_same_state(hf_state, original_to_hf(original)[0])
    assert not is_known_unused("no_mem_embed")  # used: added to image features with no memory


@pytest.mark.parametrize(
    "key",
    [
        "sam_mask_decoder.token_attn.weight",  # e.g. a module added by a Sa2VA variant
        "image_encoder.trunk.blocks.0.attn.qkv.scale",
        "grounding_encoder.sam2_model.no_mem_embed",  # prefix not stripped
        "sam_mask_decoder.pred_obj_score_head.weight",  # Linear head (pred_obj_scores_mlp=False)
    ],
)
def test_unknown_original_key_raises_naming_it(key: str) -> None:
    original = hf_to_original(tiny_model().state_dict())
    with pytest.raises(Sam2KeyError, match=key.replace(".", r"\.")) as info:
        original_to_hf({**original, key: torch.zeros(1)})
    assert info.value.keys == [key]


def test_unknown_hf_key_raises_naming_it() -> None:
    state = dict(tiny_model().state_dict())
    state["mask_decoder.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(Sam2KeyError, match=r"mask_decoder\.extra_head\.weight"):
        hf_to_original(state)


def test_gap_in_mlp_layers_raises() -> None:
    original = hf_to_original(tiny_model().state_dict())
    del original["sam_mask_decoder.iou_prediction_head.layers.1.weight"]
    del original["sam_mask_decoder.iou_prediction_head.layers.1.bias"]
    with pytest.raises(Sam2KeyError, match="iou_prediction_head"):
        original_to_hf(original)


def test_hiera_l_maps_every_key_both_ways_on_meta() -> None:
    with torch.device("meta"):
        model = Sam2Model(hiera_l_config())
    state = model.state_dict()
    original = hf_to_original(state)
    assert len(original) == HIERA_L_IMAGE_KEYS
    for name, shape in HIERA_L_ORIGINAL_SHAPES.items():
        assert tuple(original[name].shape) == shape, name
    back, unused = original_to_hf(original)
    assert unused == []
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)
