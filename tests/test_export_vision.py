"""The vision graph: one export serves every resolution, equal to transformers' own tower."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from fixtures import random_rgb, tiny_model

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from citrus_edge.export.export_manifest import library_versions, sha256_file  # noqa: E402
from citrus_edge.export.graph import export_component  # noqa: E402
from citrus_edge.host_inputs import VISION_INPUTS, vision_inputs  # noqa: E402
from citrus_edge.preprocess import qwen_pixels  # noqa: E402

ATOL = 1e-4
# (image h, w) -> expected patch grid; the graph was traced on grid (1, 8, 12).
SIZES = {(224, 224): (1, 16, 16), (168, 280): (1, 12, 20), (280, 196): (1, 20, 14)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    out = tmp_path_factory.mktemp("vision")
    result = export_component("vision", model, out, source_hash="random:citrus-v-tiny")
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    return model, result, session


def test_export_validates_at_three_grids(exported):
    _, result, _ = exported
    labels = {e.sample for e in result.errors}
    assert {f"grid 1x{h}x{w}" for _, h, w in SIZES.values()} == {s.split(" (")[0] for s in labels}
    print({e.sample: f"{e.max_abs:.2e}" for e in result.errors})
    assert result.max_abs <= ATOL


@pytest.mark.parametrize("size", list(SIZES))
def test_one_graph_matches_stock_tower_on_real_images(exported, size):
    """Preprocessed images of three shapes (one square) through the ONE graph vs transformers."""
    model, _, session = exported
    cfg = model.config
    pre = dataclasses.replace(cfg.preprocess, max_pixels=280 * 280)  # keep the sizes as given
    qp = qwen_pixels(random_rgb(*size, seed=sum(size)), pre)
    assert qp.grid_thw == SIZES[size] and qp.resized_hw == size
    feeds = vision_inputs(qp.pixel_values, qp.grid_thw, cfg.vision)
    (got,) = session.run(["image_features"], feeds)
    with torch.no_grad():
        want = model.mllm.model.visual(
            torch.from_numpy(qp.pixel_values), grid_thw=torch.tensor([qp.grid_thw])
        ).pooler_output.numpy()
    err = float(np.abs(got - want).max())
    print(f"vision {size}: max abs {err:.2e}")
    assert got.shape == (qp.grid_thw[1] * qp.grid_thw[2] // 4, cfg.vision.out_hidden_size)
    assert err <= ATOL


def test_graph_inputs_are_symbolic(exported):
    import onnx

    _, result, _ = exported
    graph = onnx.load(str(result.onnx_path)).graph
    assert [i.name for i in graph.input] == list(VISION_INPUTS)
    assert [o.name for o in graph.output] == ["image_features"]
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in graph.input
    }
    assert dims["pixel_values"] == ["n_patches", 3 * 2 * 14 * 14]
    assert dims["gather_index"] == ["n_windows", 64] and dims["window_index"] == ["n_units"]


def test_manifest_describes_the_graph(exported):
    _, result, _ = exported
    m = json.loads(result.manifest_path.read_text())
    assert m["component"] == "vision" and m["file"] == "vision.onnx"
    assert m["sha256"] == sha256_file(result.onnx_path)
    assert m["source"] == "random:citrus-v-tiny" and m["opset"] >= 17
    assert set(m["versions"]) == set(library_versions())
    assert m["inputs"][0] == {
        "name": "pixel_values",
        "shape": ["n_patches", 1176],
        "dtype": "float32",
    }
    assert m["validation"]["max_abs"] <= ATOL and len(m["validation"]["errors"]) == 3


def test_vision_inputs_reject_bad_input():
    cfg = tiny_model().config
    pixels = np.zeros((16 * 16, 1176), np.float32)
    with pytest.raises(ValueError, match="one image per call"):
        vision_inputs(np.zeros((2 * 256, 1176), np.float32), (2, 16, 16), cfg.vision)
    with pytest.raises(ValueError, match="patches"):
        vision_inputs(pixels, (1, 16, 20), cfg.vision)


def test_bad_image_size_is_refused(tmp_path):
    from citrus_edge.export.export_config import ExportConfig

    with pytest.raises(ValueError, match="multiple of 28"):
        export_component(
            "vision",
            tiny_model(),
            tmp_path,
            source_hash="random:x",
            export_cfg=ExportConfig(image_sizes=((224, 230),)),
        )
