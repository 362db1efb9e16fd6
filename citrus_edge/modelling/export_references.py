"""The stock PyTorch paths each exported graph is validated against (the oracles).

`<component>_reference(model, sample)` runs the stock modules of `model` on a sample's feeds
(`citrus_edge.graph_specs.Sample`) and returns numpy outputs by the graph's output names.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from citrus_edge.graph_specs import Sample
from citrus_edge.modelling.model import CitrusV


@torch.no_grad()
def vision_reference(model: CitrusV, sample: Sample) -> dict[str, np.ndarray]:
    """The stock tower: `model.mllm.model.visual(pixel_values, grid_thw)`'s merged features."""
    pixels = torch.from_numpy(sample.feeds["pixel_values"])
    grid = torch.tensor([sample.context["grid_thw"]])
    out = model.mllm.model.visual(pixels, grid_thw=grid).pooler_output
    return {"image_features": out.numpy()}


@torch.no_grad()
def llm_reference(model: CitrusV, sample: Sample) -> dict[str, np.ndarray]:
    """The stock language model with a `DynamicCache` filled from the past, then `lm_head`."""
    f = {k: torch.from_numpy(v) for k, v in sample.feeds.items()}
    lm = model.mllm.model.language_model
    n = len(lm.layers)
    cache = DynamicCache(config=model.mllm.config.text_config)
    if f["past_key_0"].shape[2]:
        for i in range(n):
            cache.update(f[f"past_key_{i}"], f[f"past_value_{i}"], i)
    out = lm(
        inputs_embeds=f["inputs_embeds"],
        attention_mask=f["attention_mask"],
        position_ids=f["position_ids"],
        cache=cache,
        use_cache=True,
    )
    hidden = out.last_hidden_state
    result = {"logits": model.mllm.lm_head(hidden).numpy(), "last_hidden_state": hidden.numpy()}
    for i in range(n):
        result[f"present_key_{i}"] = cache.layers[i].keys.numpy()
        result[f"present_value_{i}"] = cache.layers[i].values.numpy()
    return result


@torch.no_grad()
def sam_encoder_reference(model: CitrusV, sample: Sample) -> dict[str, np.ndarray]:
    """The stock path: `model.encode_image_sam(pixels)`."""
    feat_s0, feat_s1, emb = model.encode_image_sam(torch.from_numpy(sample.feeds["pixels"]))
    return {"image_embeddings": emb.numpy(), "feat_s0": feat_s0.numpy(), "feat_s1": feat_s1.numpy()}


@torch.no_grad()
def mask_decoder_reference(model: CitrusV, sample: Sample) -> dict[str, np.ndarray]:
    """The stock path: `model.decode_masks([feat_s0, feat_s1, image_embeddings], seg_hidden)`."""
    f = {k: torch.from_numpy(v) for k, v in sample.feeds.items()}
    low, iou = model.decode_masks(
        [f["feat_s0"], f["feat_s1"], f["image_embeddings"]], f["seg_hidden"]
    )
    return {"mask_logits": low.numpy(), "iou_predictions": iou.numpy()}
