"""The TensorRT backend against ONNX Runtime on the same bundle (needs TensorRT 10 and a GPU).

Engines are built with the product path, `citrus_edge.engines.build_bundle_engines` (what
`citrus-edge engines build` runs), for the known target whose SM is this GPU's, at fp32.
Skipped, with the reason, where tensorrt, cuda-python, a GPU or a matching target is absent.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_runtime_support import (
    CASES,
    MAX_NEW,
    bundle,
    case_image,
    copy_bundle,
    mask_iou,
    pipeline,
)

pytestmark = pytest.mark.tensorrt

trt = pytest.importorskip(
    "tensorrt", reason="TensorRT is not installed (pip install 'citrus-edge[tensorrt]')"
)

from citrus_edge.engines import build_bundle_engines  # noqa: E402
from citrus_edge.engines.compat import targets_with_sm  # noqa: E402
from citrus_edge.engines.device import cuda_device  # noqa: E402
from citrus_edge.engines.engine_errors import TensorRTUnavailableError  # noqa: E402
from citrus_edge.runtime.engine_folder import EngineFolderError  # noqa: E402
from citrus_edge.runtime.pipeline import Pipeline  # noqa: E402

MASK_IOU_MIN = 0.99
SCORE_ATOL = 1e-3


def _target() -> str:
    try:
        sm = cuda_device().sm
    except TensorRTUnavailableError as e:
        pytest.skip(f"no usable GPU or cuda-python: {e}")
    targets = targets_with_sm(sm)
    if not targets:
        pytest.skip(f"no citrus-edge target has this GPU's SM {sm}")
    return targets[0]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "engines"
    build_bundle_engines(bundle("seg"), target=_target(), out=out, recipe="fp32")
    return out


@pytest.fixture(scope="module")
def trt_pipe(engines):
    return Pipeline.from_bundle(
        bundle("seg"), backend="tensorrt", engines=engines, max_new_tokens=MAX_NEW
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_tensorrt_matches_onnxruntime(trt_pipe, case):
    rgb, prompt = case_image(case), case[3]
    got, expected = trt_pipe(rgb, prompt), pipeline("seg")(rgb, prompt)
    assert got.backend.startswith("tensorrt/")
    assert got.token_ids == expected.token_ids and got.stopped_by == expected.stopped_by
    for a, b in zip(got.masks, expected.masks, strict=True):
        assert mask_iou(a, b) >= MASK_IOU_MIN
    np.testing.assert_allclose(got.mask_scores, expected.mask_scores, atol=SCORE_ATOL)


def test_kv_cache_stays_on_the_device(trt_pipe):
    result = trt_pipe(case_image(CASES[0]), CASES[0][3])
    llm = trt_pipe.llm
    assert llm.cache_len > len(result.token_ids) - 1
    per_token = llm.kv_heads * llm.head_dim * llm.engine.dtypes[llm.past[0]].itemsize
    assert all(buf.nbytes >= llm.cache_len * per_token for buf in llm.cache.values())


def test_tensorrt_needs_an_engines_folder(tmp_path):
    _target()

    lone = copy_bundle("seg", tmp_path / "bundle")  # no <bundle>-engines beside it
    with pytest.raises(EngineFolderError, match="citrus-edge engines build"):
        Pipeline.from_bundle(lone, backend="tensorrt")
