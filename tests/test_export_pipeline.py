"""`export_all`: every graph, the embeddings and the manifests in one atomic folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np
import pytest
from fixtures import tiny_model, tiny_tokenizer

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from citrus_edge.config import CitrusVConfig  # noqa: E402
from citrus_edge.export import ExportValidationError, export_all  # noqa: E402
from citrus_edge.export.export_manifest import library_versions, sha256_file  # noqa: E402
from citrus_edge.export.spec import REGISTRY  # noqa: E402

ATOL = 1e-4
GRAPHS = {"vision", "llm", "sam_encoder", "mask_decoder"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    tokenizer = root / "tokenizer-src.json"
    tiny_tokenizer().save(str(tokenizer))
    model = tiny_model()
    manifest = export_all(
        model, root / "out", source_hash="random:citrus-v-tiny", tokenizer_json=tokenizer
    )
    return model, root, manifest


def test_bundle_holds_every_artifact(bundle):
    model, root, manifest = bundle
    out = root / "out"
    expected = {f"{g}{ext}" for g in GRAPHS for ext in (".onnx", ".manifest.json")}
    expected |= {"embeddings.npy", "embeddings.manifest.json", "config.json", "tokenizer.json"}
    assert {p.name for p in out.iterdir()} == expected | {"export_manifest.json"}
    assert set(manifest["files"]) == expected
    assert all(sha256_file(out / name) == digest for name, digest in manifest["files"].items())
    assert json.loads((out / "export_manifest.json").read_text()) == manifest
    assert CitrusVConfig.load(out / "config.json") == model.config
    assert sorted(p.name for p in root.iterdir()) == ["out", "tokenizer-src.json"]  # no temp left


def test_bundle_manifest_records_errors_versions_and_source(bundle):
    _, root, manifest = bundle
    assert manifest["source"] == "random:citrus-v-tiny"
    assert manifest["versions"] == library_versions()
    assert set(manifest["graphs"]) == GRAPHS
    for name, graph in manifest["graphs"].items():
        print(f"{name}: max abs {graph['max_abs_error']:.2e}")
        assert graph["max_abs_error"] <= ATOL
        per_graph = json.loads((root / "out" / graph["manifest"]).read_text())
        assert per_graph["sha256"] == manifest["files"][graph["file"]]
        assert per_graph["source"] == "random:citrus-v-tiny"
    assert manifest["export_config"]["image_sizes"] == [[224, 224], [168, 280], [280, 196]]


def test_existing_folder_is_refused_or_replaced_only_when_safe(bundle, tmp_path):
    model, root, _ = bundle
    with pytest.raises(FileExistsError, match="overwrite"):
        export_all(model, root / "out", source_hash="random:x")
    stray = tmp_path / "mine"
    stray.mkdir()
    (stray / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="export_manifest"):
        export_all(model, stray, source_hash="random:x", overwrite=True)
    assert (stray / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_a_previous_export(tmp_path, monkeypatch):
    _only(monkeypatch, "mask_decoder")
    model = tiny_model()
    first = export_all(model, tmp_path / "b", source_hash="random:one")
    second = export_all(model, tmp_path / "b", source_hash="random:two", overwrite=True)
    assert first["source"] == "random:one" and second["source"] == "random:two"
    assert (
        json.loads((tmp_path / "b" / "export_manifest.json").read_text())["source"] == "random:two"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    (tmp_path / "b" / "extra.bin").write_bytes(b"")
    with pytest.raises(FileExistsError, match="extra.bin"):
        export_all(model, tmp_path / "b", source_hash="random:x", overwrite=True)


def test_failed_validation_leaves_nothing(tmp_path, monkeypatch):
    component = _only(monkeypatch, "mask_decoder")

    def off_by_a_bit(model, sample):
        out = component.reference(model, sample)
        return {**out, "iou_predictions": out["iou_predictions"] + 1e-3}

    monkeypatch.setitem(
        REGISTRY, "mask_decoder", dataclasses.replace(component, reference=off_by_a_bit)
    )
    with pytest.raises(ExportValidationError) as info:
        export_all(tiny_model(), tmp_path / "b", source_hash="random:x")
    assert {e.output for e in info.value.errors} == {"mask_logits", "iou_predictions"}
    assert list(tmp_path.iterdir()) == []


def test_half_precision_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        export_all(tiny_model().half(), tmp_path / "b", source_hash="random:x")
    assert list(tmp_path.iterdir()) == []


def _only(monkeypatch, name):
    """Leave one component in the registry for the duration of a test (speed)."""
    import citrus_edge.export.components  # noqa: F401

    kept = REGISTRY[name]
    for other in [n for n in REGISTRY if n != name]:
        monkeypatch.delitem(REGISTRY, other)
    return kept


@pytest.mark.slow
def test_demo_config_exports_all_four(tmp_path, caplog):
    """DEMO with random weights (until the trained checkpoint lands): < 5 minutes on 2 cores."""
    from citrus_edge.config import DEMO
    from citrus_edge.modelling.model import build_model

    caplog.set_level(logging.INFO, logger="citrus_edge.export")
    t0 = time.perf_counter()
    manifest = export_all(build_model(DEMO), tmp_path / "demo", source_hash="random:citrus-v-demo")
    seconds = time.perf_counter() - t0
    errors = {n: g["max_abs_error"] for n, g in manifest["graphs"].items()}
    print(f"DEMO export: {seconds:.1f} s; max abs errors {errors}")
    assert set(errors) == GRAPHS and max(errors.values()) <= ATOL
    assert seconds < 300
    table = np.load(tmp_path / "demo" / "embeddings.npy")
    assert table.shape == (DEMO.text.vocab_size, DEMO.text.hidden_size)
