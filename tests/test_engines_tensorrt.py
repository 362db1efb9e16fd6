"""TensorRT engine builds: the real build on a GPU, and the error where TensorRT is absent.

The build test needs the TensorRT Python package and an NVIDIA GPU that is one of the targets
(`citrus_edge.targets`); elsewhere it skips, saying why. No TensorRT behaviour is simulated.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from fixtures import tiny_model

from citrus_edge.config import TINY
from citrus_edge.engines import (
    TensorRTUnavailableError,
    build_engines,
    check_engine_compat,
    make_engine_plan,
)
from citrus_edge.engines.compat import targets_with_sm
from citrus_edge.engines.tensorrt_builder import sidecar_path
from citrus_edge.recipes import FP16

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _export(out):
    from citrus_edge.export.export_manifest import random_source_hash
    from citrus_edge.export.export_run import export_all

    export_all(tiny_model(), out, image_sizes=((56, 140),), source_hash=random_source_hash("tiny"))
    return out


def _gpu_target() -> tuple[str, object]:
    from citrus_edge.engines.device import cuda_device

    try:
        device = cuda_device()
    except TensorRTUnavailableError as e:
        pytest.skip(f"no GPU: {e}")
    able = targets_with_sm(device.sm)
    if not able:
        pytest.skip(f"{device.name} (sm {device.sm}) is none of the targets")
    return able[0], device


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here"
)
def test_build_without_tensorrt_says_where_to_build(tmp_path):
    from test_engines_plan import make_graphs

    graphs = make_graphs(tmp_path / "g")
    plan = make_engine_plan(graphs, "orin-agx-64", FP16, TINY)
    with pytest.raises(TensorRTUnavailableError) as err:
        build_engines(plan, graphs, tmp_path / "engines")
    message = str(err.value)
    assert "citrus-edge engines build BUNDLE" in message
    assert "pip install 'citrus-edge[tensorrt]'" in message and "JetPack" in message
    assert not (tmp_path / "engines").exists()


@pytest.mark.tensorrt
def test_build_engines_on_this_gpu(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="tensorrt not installed / no GPU")
    target, device = _gpu_target()
    bundle = _export(tmp_path / "bundle")
    plan = make_engine_plan(bundle, target, FP16, TINY)
    engines = build_engines(plan, bundle, tmp_path / "engines")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for component, path in engines.items():
        side = json.loads(sidecar_path(path).read_text())
        assert side["tensorrt_version"] == trt.__version__ and side["device"]["sm"] == device.sm
        assert side["source_onnx_sha256"] == plan.component(component).onnx_sha256
        check_engine_compat(side, trt.__version__, device.sm)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        assert engine is not None, component
        assert engine.num_optimization_profiles == len(plan.component(component).profiles)
    vision = json.loads(sidecar_path(engines["vision"]).read_text())
    assert vision["fp32_layers_pinned"] > 0 and "FP16" in vision["builder_flags"]
    assert (tmp_path / plan.timing_cache).stat().st_size > 0  # the timing cache was saved
