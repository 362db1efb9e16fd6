"""Official checkpoint layout: write, read back, identical outputs; bad keys are named."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import tiny_model
from safetensors.torch import load_file, save_file

from citrus_edge.modelling.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _outputs(model):
    torch.manual_seed(1)
    pv = torch.randn(64, 3 * 2 * 14 * 14)
    grid = torch.tensor([[1, 8, 8]])
    ids = torch.tensor([[2, 3] + [model.config.tokens.image] * 16 + [4, 20, 21, 22]])
    mm = (ids == model.config.tokens.image).int()
    with torch.no_grad():
        pos, _ = model.mllm.model.get_rope_index(ids, mm, image_grid_thw=grid)
        h = model.mllm.model(input_ids=ids, pixel_values=pv, image_grid_thw=grid, position_ids=pos)
        s = model.config.sam2.image_size
        feats = model.encode_image_sam(torch.randn(1, 3, s, s))
        masks, iou = model.decode_masks(feats, h.last_hidden_state[0, -2:])
    return [h.last_hidden_state, masks, iou, *feats]


@pytest.mark.parametrize("projector", ["mlp", "residual"])
def test_roundtrip_identical(tmp_path, projector):
    model = tiny_model(projector=projector)
    save_checkpoint(model, tmp_path / "ckpt")
    keys = load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    assert any(k.startswith("mllm.model.language_model.") for k in keys)
    assert any(k.startswith("mllm.model.visual.") for k in keys)
    assert "mllm.lm_head.weight" in keys
    assert "grounding_encoder.sam2_model.image_encoder.trunk.pos_embed" in keys
    assert any(k.startswith("grounding_encoder.sam2_model.sam_mask_decoder.") for k in keys)
    if projector == "mlp":
        assert {"seg_projector.0.weight", "seg_projector.2.weight"} <= set(keys)
    loaded = load_checkpoint(tmp_path / "ckpt")
    for a, b in zip(_outputs(model), _outputs(loaded), strict=True):
        assert (a - b).abs().max().item() == 0.0
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "citrus_v" and cfg["seg_token_idx"] == model.config.tokens.seg


def test_renamed_key_is_named(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(f))
    key = "grounding_encoder.sam2_model.sam_mask_decoder.iou_prediction_head.layers.0.weight"
    assert key in state
    state[key.replace("layers.0", "layer_zero")] = state.pop(key)
    save_file(state, str(f))
    with pytest.raises((CheckpointError, KeyError), match="layer_zero"):
        load_checkpoint(tmp_path / "ckpt")


def test_renamed_llm_key_is_named(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(f))
    state["mllm.model.language_model.norm.weightx"] = state.pop(
        "mllm.model.language_model.norm.weight"
    )
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match=r"norm\.weight"):
        load_checkpoint(tmp_path / "ckpt")
