"""Backend registry and setup errors (never a silent fallback), input errors, and the benchmark."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from fixtures import random_rgb
from test_runtime_support import CASES, bundle, case_image, pipeline

from citrus_edge.runtime.backends import available_backends, create_backend
from citrus_edge.runtime.bench import run_bench, summarize
from citrus_edge.runtime.onnxruntime_flavour import OnnxRuntimeSetupError
from citrus_edge.runtime.pipeline import Pipeline, RuntimeConfig
from citrus_edge.runtime.runtime_errors import (
    InputImageError,
    RuntimeSetupError,
    TensorRTSetupError,
    UnknownBackendError,
)


def test_registry_lists_both_backends_and_refuses_others():
    assert {"onnxruntime", "tensorrt"} <= set(available_backends())
    with pytest.raises(UnknownBackendError, match="onnxruntime"):
        create_backend("openvino-magic")


def test_cpu_is_the_default_provider():
    backend = create_backend("onnxruntime")
    assert backend.providers == ["CPUExecutionProvider"] and backend.cache_device == "cpu"


def test_unavailable_provider_is_an_error():
    with pytest.raises(OnnxRuntimeSetupError, match="NoSuchExecutionProvider"):
        create_backend("onnxruntime", ["NoSuchExecutionProvider"])


def test_cuda_provider_is_honoured_or_refused_never_dropped():
    """Where CUDA cannot load (no GPU here), ONNX Runtime would quietly run on the CPU."""
    try:
        pipe = Pipeline.from_bundle(bundle("plain"), providers=["CUDAExecutionProvider"])
    except OnnxRuntimeSetupError as e:
        assert "CUDAExecutionProvider" in str(e)
        return
    assert pipe.backend.label == "onnxruntime/CUDAExecutionProvider"
    assert "CUDAExecutionProvider" in pipe.vision.session.get_providers()


def _fake_distributions(monkeypatch, installed: dict[str, str]) -> None:
    """Make `importlib.metadata` report exactly `installed` (name -> version) as installed."""
    from importlib import metadata

    from citrus_edge.runtime import onnxruntime_flavour

    def version(name):
        if name in installed:
            return installed[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(onnxruntime_flavour.metadata, "version", version)


def test_runtime_refuses_to_start_without_onnx_runtime(monkeypatch):
    from citrus_edge.runtime.onnxruntime_flavour import check_onnxruntime, installed_flavours

    plain = bundle("plain")  # built before the environment is faked
    _fake_distributions(monkeypatch, {"numpy": "2.0"})
    assert installed_flavours() == []
    for start in (
        check_onnxruntime,
        lambda: create_backend("onnxruntime"),
        lambda: Pipeline.from_bundle(plain),
    ):
        with pytest.raises(OnnxRuntimeSetupError, match="ONNX Runtime is not installed") as e:
            start()
        assert "pip install 'citrus-edge[cpu]'" in str(e.value)
        assert "'citrus-edge[gpu]'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "flavours",
    [
        ("onnxruntime", "onnxruntime-gpu"),
        ("onnxruntime-gpu", "onnxruntime-openvino"),
        ("onnxruntime", "onnxruntime-directml", "onnxruntime-gpu"),
    ],
)
def test_runtime_refuses_to_start_with_two_onnx_runtime_flavours(monkeypatch, flavours):
    from citrus_edge.runtime.onnxruntime_flavour import check_onnxruntime, installed_flavours

    plain = bundle("plain")
    _fake_distributions(monkeypatch, dict.fromkeys(flavours, "1.20.1"))
    assert sorted(installed_flavours()) == sorted(flavours)
    for start in (check_onnxruntime, lambda: Pipeline.from_bundle(plain)):
        with pytest.raises(OnnxRuntimeSetupError, match="several ONNX Runtime builds") as e:
            start()
        msg = str(e.value)
        assert f"pip uninstall -y {' '.join(installed_flavours())}" in msg
        assert all(f in msg for f in flavours)


@pytest.mark.parametrize("flavour", ["onnxruntime", "onnxruntime-gpu"])
def test_one_flavour_is_accepted_and_named(monkeypatch, flavour):
    from citrus_edge.runtime.onnxruntime_flavour import check_onnxruntime

    _fake_distributions(monkeypatch, {flavour: "1.20.1", "numpy": "2.0"})
    assert check_onnxruntime() == flavour
    assert create_backend("onnxruntime").flavour == flavour


def test_a_flavour_that_does_not_import_is_refused(monkeypatch):
    import sys

    from citrus_edge.runtime.onnxruntime_flavour import check_onnxruntime

    _fake_distributions(monkeypatch, {"onnxruntime-gpu": "1.20.1"})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    with pytest.raises(OnnxRuntimeSetupError, match="onnxruntime-gpu is installed but does not"):
        check_onnxruntime()


def test_tensorrt_backend_takes_no_providers():
    with pytest.raises(RuntimeSetupError, match="TensorrtExecutionProvider"):
        create_backend("tensorrt", ["CUDAExecutionProvider"])


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here"
)
def test_tensorrt_missing_says_how_to_install():
    with pytest.raises(TensorRTSetupError) as e:
        Pipeline.from_bundle(bundle("plain"), backend="tensorrt")
    assert "pip install 'citrus-edge[tensorrt]'" in str(e.value)
    assert "citrus-edge engines build" in str(e.value)


def test_config_is_typed_and_validated():
    assert RuntimeConfig(providers=["CPUExecutionProvider"]).providers == ("CPUExecutionProvider",)
    with pytest.raises(ValueError, match="max_new_tokens"):
        RuntimeConfig(max_new_tokens=0)
    assert RuntimeConfig().to_dict()["backend"] == "onnxruntime"


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((32, 32), np.uint8),  # grey
        np.zeros((32, 32, 3), np.float32),  # not uint8
        np.zeros((32, 32, 4), np.uint8),  # RGBA
    ],
    ids=["grey", "float", "rgba"],
)
def test_bad_arrays_are_refused(image):
    with pytest.raises(InputImageError, match="RGB uint8"):
        pipeline("plain")(image, "x")


def test_frame_of_an_array_is_refused():
    with pytest.raises(InputImageError, match="frame 3"):
        pipeline("plain")(random_rgb(64, 64), "x", frame=3)


def test_summarize():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["p50"] == 2.5 and s["mean"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["p95"] == pytest.approx(3.85)
    assert summarize([]) == {"n": 0}


def test_bench_reports_every_number(monkeypatch):
    # The rigged "seg" model emits [SEG] free-running; under the task grammars a random model's
    # answers need not contain one, and this test needs the SAM2 stages to run.
    from_bundle = Pipeline.from_bundle.__func__

    def free(cls, *args, **kw):
        return from_bundle(cls, *args, **{**kw, "constrained_decoding": False})

    monkeypatch.setattr(Pipeline, "from_bundle", classmethod(free))
    cases = [(case_image(c), c[3]) for c in CASES[:2]]
    frames = [random_rgb(240, 180, seed=1)] * 4  # CASES[1]'s image
    out = run_bench(
        bundle("seg"),
        cases,
        max_new_tokens=8,
        repeats=2,
        warmup=1,
        video=frames,
        video_prompt=CASES[1][3],
    )
    assert out["e2e_ms"]["n"] == 4 and 0 < out["e2e_ms"]["p50"] <= out["e2e_ms"]["p95"]
    assert out["decode_ms_per_token"]["p50"] > 0 and out["prefill_ms"]["p50"] > 0
    assert {"vision_encoder", "prefill", "decode", "sam_encoder", "mask_decoder"} <= set(
        out["stages_ms"]
    )
    assert out["video"]["ms_per_frame"]["n"] == 3 and out["video"]["key_frame_ms"]["n"] == 1
    assert out["video"]["n_seg"] >= 1  # CASES[1]: [SEG] within the first 8 tokens
    assert out["peak_rss_mb"] > 0 and out["bundle_id"] == pipeline("seg").bundle_id
    cold = out["cold_start"]
    assert cold["process_ms"] > cold["cold_start_ms"] > cold["first_result_ms"] > 0
    assert 0 < cold["peak_rss_mb"] < out["peak_rss_mb"]  # the child holds no torch
    assert cold["heavy_modules"] == []  # a fresh runtime process never imports torch
