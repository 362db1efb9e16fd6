"""SAM2 split export: image encoder once per image, prompt + mask decoder (with the seg projector)
per `[SEG]` state, both against the stock `encode_image_sam` / `decode_masks`."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import random_rgb, tiny_model

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from citrus_edge.export.graph import export_component  # noqa: E402
from citrus_edge.preprocess import sam_pixels  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model(projector="residual")  # the projector variant with a skip path
    out = tmp_path_factory.mktemp("sam")
    results = {
        name: export_component(name, model, out, source_hash="random:citrus-v-tiny")
        for name in ("sam_encoder", "mask_decoder")
    }
    cpu = ["CPUExecutionProvider"]
    sessions = {
        n: ort.InferenceSession(str(r.onnx_path), providers=cpu) for n, r in results.items()
    }
    return model, results, sessions


def _dims(path):
    graph = onnx.load(str(path)).graph
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*graph.input, *graph.output)
    }


def test_exports_validate(exported):
    _, results, _ = exported
    for name, r in results.items():
        print(f"{name}: max abs {r.max_abs:.2e} over {sorted({e.sample for e in r.errors})}")
        assert r.max_abs <= ATOL
    assert {e.sample for e in results["sam_encoder"].errors} == {"batch 2"}  # traced on batch 1
    assert {e.sample for e in results["mask_decoder"].errors} == {"n 1", "n 3"}  # traced on 2


def test_graph_io(exported):
    model, results, _ = exported
    s, d = model.config.sam2.image_size, model.config.sam2.hidden_size
    enc = _dims(results["sam_encoder"].onnx_path)
    assert enc == {
        "pixels": ["batch", 3, s, s],
        "image_embeddings": ["batch", d, s // 16, s // 16],
        "feat_s0": ["batch", d // 8, s // 4, s // 4],
        "feat_s1": ["batch", d // 4, s // 8, s // 8],
    }
    dec = _dims(results["mask_decoder"].onnx_path)
    assert dec["seg_hidden"] == ["n", model.config.text.hidden_size]
    assert dec["image_embeddings"] == [1, d, s // 16, s // 16]  # one image, expanded inside
    assert dec["mask_logits"] == ["n", 3, s // 4, s // 4] and dec["iou_predictions"] == ["n", 3]


def test_graphs_hold_no_control_flow(exported):
    """The constant position embeddings leave no If (encoder) or ScatterND (decoder) behind."""
    _, results, _ = exported
    ops = {
        n: {x.op_type for x in onnx.load(str(r.onnx_path)).graph.node} for n, r in results.items()
    }
    assert "If" not in ops["sam_encoder"] and "LayerNormalization" in ops["sam_encoder"]
    assert not {"If", "ScatterND", "Sin"} & ops["mask_decoder"]


def test_image_to_masks_matches_pytorch(exported):
    """A real image through both graphs equals encode_image_sam + decode_masks, all 3 masks."""
    model, _, sessions = exported
    pixels = sam_pixels(random_rgb(180, 240, seed=4), model.config.preprocess)  # [1, 3, S, S]
    emb, s0, s1 = sessions["sam_encoder"].run(
        ["image_embeddings", "feat_s0", "feat_s1"], {"pixels": pixels}
    )
    seg = np.random.default_rng(0).standard_normal((2, model.config.text.hidden_size))
    seg = seg.astype(np.float32)
    feeds = {"seg_hidden": seg, "image_embeddings": emb, "feat_s0": s0, "feat_s1": s1}
    masks, iou = sessions["mask_decoder"].run(["mask_logits", "iou_predictions"], feeds)
    with torch.no_grad():
        feats = model.encode_image_sam(torch.from_numpy(pixels))
        want_masks, want_iou = model.decode_masks(feats, torch.from_numpy(seg))
    errors = {
        "image_embeddings": np.abs(emb - feats[2].numpy()).max(),
        "mask_logits": np.abs(masks - want_masks.numpy()).max(),
        "iou_predictions": np.abs(iou - want_iou.numpy()).max(),
    }
    print({k: f"{v:.2e}" for k, v in errors.items()})
    assert masks.shape == (2, 3, *want_masks.shape[-2:])
    assert max(errors.values()) <= ATOL
