"""Engines folders from `citrus-edge engines build`: the `cpu` target's ONNX Runtime-optimized
graphs run with the reference's tokens; altered, foreign or mismatched folders are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_runtime_support import CASES, bundle, case_image, copy_bundle, mask_iou, pipeline

pytest.importorskip("onnx")  # the engines stage reads graphs with onnx

from citrus_edge.engines import build_bundle_engines  # noqa: E402
from citrus_edge.runtime.engine_folder import (  # noqa: E402
    ENGINES_KIND,
    ENGINES_MANIFEST,
    SIDECARS,
    EngineFolderError,
    default_engine_folder,
)
from citrus_edge.runtime.onnxruntime_flavour import OnnxRuntimeSetupError  # noqa: E402
from citrus_edge.runtime.pipeline import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def cpu_engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "cpu"
    build_bundle_engines(bundle("seg"), target="cpu", out=out, recipe="fp32")
    return out


def test_optimized_graphs_match_the_bundle_graphs(cpu_engines):
    pipe = Pipeline.from_bundle(
        bundle("seg"), engines=cpu_engines, max_new_tokens=24, constrained_decoding=False
    )
    assert pipe.engines is not None and pipe.engines.target == "cpu"
    assert pipe.engines.files["vision"].name == "vision.ort.onnx"
    for case in CASES:
        got = pipe(case_image(case), case[3])
        expected = pipeline("seg")(case_image(case), case[3])
        assert got.token_ids == expected.token_ids
        assert all(mask_iou(a, b) >= 0.99 for a, b in zip(got.masks, expected.masks, strict=True))


def test_altered_engine_is_refused_naming_it(cpu_engines, tmp_path):
    folder = shutil.copytree(cpu_engines, tmp_path / "cpu")
    engine = folder / "llm.ort.onnx"
    data = bytearray(engine.read_bytes())
    data[-10] ^= 0x01
    engine.write_bytes(bytes(data))
    with pytest.raises(EngineFolderError, match="llm.ort.onnx"):
        Pipeline.from_bundle(bundle("seg"), engines=folder)


def test_engines_of_another_bundle_are_refused(cpu_engines):
    with pytest.raises(EngineFolderError, match="not this bundle's"):
        Pipeline.from_bundle(bundle("plain"), engines=cpu_engines)


def test_engines_for_another_backend_are_refused(cpu_engines, tmp_path):
    folder = shutil.copytree(cpu_engines, tmp_path / "cpu")
    manifest = json.loads((folder / "engines.json").read_text())
    manifest["backend"] = "tensorrt"
    (folder / "engines.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFolderError, match="built for 'tensorrt'"):
        Pipeline.from_bundle(bundle("seg"), engines=folder)


def test_cpu_optimized_graphs_refuse_another_provider(cpu_engines):
    with pytest.raises(OnnxRuntimeSetupError, match="optimized for"):
        Pipeline.from_bundle(
            bundle("seg"), engines=cpu_engines, providers=["CUDAExecutionProvider"]
        )


def test_default_engine_folder_is_the_one_beside_the_bundle(tmp_path):
    path = copy_bundle("plain", tmp_path / "b")
    root = tmp_path / "b-engines"
    with pytest.raises(EngineFolderError, match="0 tensorrt engines folders"):
        default_engine_folder(path, "tensorrt")
    for target, backend in (("x86-hopper", "tensorrt"), ("cpu", "onnxruntime")):
        (root / target).mkdir(parents=True)
        (root / target / "engines.json").write_text(json.dumps({"backend": backend}))
    assert default_engine_folder(path, "tensorrt") == (root / "x86-hopper").resolve()
    (root / "x86-ada").mkdir()
    (root / "x86-ada" / "engines.json").write_text(json.dumps({"backend": "tensorrt"}))
    with pytest.raises(EngineFolderError, match="2 tensorrt engines folders"):
        default_engine_folder(path, "tensorrt")


def test_folder_layout_agrees_with_the_engines_stage():
    """The runtime reads what `citrus_edge.engines` writes (names kept in step by this test)."""
    from citrus_edge.engines import engines_output as output
    from citrus_edge.engines import ort_sessions, tensorrt_builder

    assert (ENGINES_MANIFEST, ENGINES_KIND) == (output.ENGINES_MANIFEST, output.ENGINES_KIND)
    engine, graph = Path("x/vision.engine"), Path("x/vision.ort.onnx")
    assert SIDECARS["tensorrt"].path(engine) == tensorrt_builder.sidecar_path(engine)
    assert SIDECARS["onnxruntime"].path(graph) == ort_sessions.sidecar_path(graph)
