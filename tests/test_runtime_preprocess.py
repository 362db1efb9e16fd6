"""The runtime's input tensors equal the reference's and transformers' own: pixel patches against
the (PIL) Qwen2-VL image processor, prefill positions against transformers' `get_rope_index`,
and the tensors the runtime feeds its graphs against the reference's."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import CORPUS, random_rgb, tiny_tokenizer
from test_runtime_support import pipeline, variant_model

torch = pytest.importorskip("torch")
pil_processor = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

from citrus_edge.host_inputs import llm_prefill_inputs, vision_inputs  # noqa: E402
from citrus_edge.modelling.reference import mrope_inputs  # noqa: E402
from citrus_edge.preprocess import qwen_pixels  # noqa: E402
from citrus_edge.prompts import n_image_tokens, prompt_ids  # noqa: E402

PIXEL_ATOL = 1e-5
EMBED_ATOL = 1e-5  # image rows come from the ONNX vision graph, text rows are exact
SIZES = [(200, 260), (224, 224), (97, 301), (512, 384), (60, 60), (333, 120)]


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_pixels_equal_transformers_qwen2vl_processor(hw):
    cfg = pipeline("plain").model_config.preprocess
    try:
        processor = pil_processor.Qwen2VLImageProcessorPil(
            min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels,
            patch_size=cfg.patch_size,
            merge_size=cfg.merge_size,
            temporal_patch_size=cfg.temporal_patch_size,
        )
    except Exception as e:  # offline construction should work; say why it did not
        pytest.skip(f"Qwen2VLImageProcessorPil cannot be constructed offline: {e}")
    rgb = random_rgb(*hw, seed=hw[0])
    expected = processor(images=[rgb], return_tensors="np")
    got = qwen_pixels(rgb, cfg)
    assert tuple(int(v) for v in expected["image_grid_thw"][0]) == got.grid_thw
    assert got.pixel_values.shape == expected["pixel_values"].shape
    assert np.abs(got.pixel_values - expected["pixel_values"]).max() <= PIXEL_ATOL


@pytest.mark.parametrize("hw", SIZES[:4], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_prefill_tensors_equal_reference(hw):
    """Positions (transformers' get_rope_index) and the spliced embeddings the LLM sees."""
    model = variant_model("plain")
    cfg = model.config
    rgb = random_rgb(*hw, seed=1)
    qp = qwen_pixels(rgb, cfg.preprocess)
    ids = prompt_ids(tiny_tokenizer(), CORPUS[0], n_image_tokens(qp.grid_thw, 2))[None]  # [1, S]
    pipe = pipeline("plain")
    features = pipe.vision.run(vision_inputs(qp.pixel_values, qp.grid_thw, cfg.vision))
    feeds, _ = llm_prefill_inputs(
        ids, pipe.artifacts.embeddings, cfg, features["image_features"], [qp.grid_thw]
    )
    ids_t, grid_t = torch.from_numpy(ids), torch.tensor([qp.grid_thw])
    expected_pos = mrope_inputs(model, ids_t, grid_t).numpy()  # [3, 1, S]
    assert np.array_equal(feeds["position_ids"], expected_pos)
    with torch.no_grad():
        embeds = model.mllm.model.get_input_embeddings()(ids_t)
        out = model.mllm.model.get_image_features(torch.from_numpy(qp.pixel_values), grid_t)
        image = torch.cat(out.pooler_output)  # [n_image_tokens, H]
        mask = ids_t == cfg.tokens.image
        embeds[mask] = image.to(embeds.dtype)
    assert np.abs(feeds["inputs_embeds"] - embeds.numpy()).max() <= EMBED_ATOL
