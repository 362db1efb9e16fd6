"""Specs, registry, export config, manifests and the validation error (no graph export here)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from citrus_edge.export.export_config import ExportConfig
from citrus_edge.export.export_manifest import (
    checkpoint_source_hash,
    manifest_path,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from citrus_edge.export.spec import REGISTRY, Component, GraphSpec, Sample, TensorSpec, register
from citrus_edge.export.validate import ExportValidationError, compare, validate_graph


def _spec() -> GraphSpec:
    return GraphSpec(
        component="toy",
        inputs=(TensorSpec("x", ("batch", 4)), TensorSpec("ids", ("batch", "seq"), "int64")),
        outputs=(TensorSpec("y", ("batch", 4)), TensorSpec("z", ("batch", "seq"))),
        make_sample=lambda case, seed: Sample("s", {}),
        export_case={"batch": 2},
        validation_cases=({"batch": 3},),
    )


def test_dynamic_axes_come_from_symbolic_dims():
    assert _spec().dynamic_axes() == {
        "x": {0: "batch"},
        "ids": {0: "batch", 1: "seq"},
        "y": {0: "batch"},
        "z": {0: "batch", 1: "seq"},
    }


def test_check_feeds_binds_axes_and_rejects_mismatches():
    spec = _spec()
    x, ids = np.zeros((2, 4), np.float32), np.zeros((2, 5), np.int64)
    assert spec.check_feeds({"x": x, "ids": ids}) == {"batch": 2, "seq": 5}
    with pytest.raises(ValueError, match="missing"):
        spec.check_feeds({"x": x})
    with pytest.raises(ValueError, match="int64"):
        spec.check_feeds({"x": x, "ids": ids.astype(np.int32)})
    with pytest.raises(ValueError, match="batch = 2"):
        spec.check_feeds({"x": x, "ids": np.zeros((3, 5), np.int64)})
    with pytest.raises(ValueError, match="expected"):
        spec.check_feeds({"x": np.zeros((2, 3), np.float32), "ids": ids})


def test_registry_refuses_a_second_component_of_the_same_name():
    import citrus_edge.export.components  # noqa: F401

    assert set(REGISTRY) == {"vision", "llm", "sam_encoder", "mask_decoder"}
    clone = dataclasses.replace(REGISTRY["llm"])
    with pytest.raises(ValueError, match="already registered"):
        register(clone)


def test_export_config_validates_itself():
    assert ExportConfig().to_dict()["image_sizes"] == [[224, 224], [168, 280], [280, 196]]
    for bad in (dict(opset=13), dict(image_sizes=()), dict(atol=0.0), dict(version=0)):
        with pytest.raises(ValueError):
            ExportConfig(**bad)


def test_compare_reports_abs_and_relative_error():
    e = compare("s", "y", np.array([1.0, 2.5]), np.array([1.0, 2.0]), atol=1e-4)
    assert e.max_abs == pytest.approx(0.5) and e.max_rel == pytest.approx(0.25) and not e.ok
    shape = compare("s", "y", np.zeros(3), np.zeros(4), atol=1e-4)
    assert shape.max_abs == float("inf") and not shape.ok


def test_validation_error_lists_every_output(tmp_path, monkeypatch):
    """One bad output fails validation; the error lists all outputs with their numbers."""
    spec = _spec()
    sample = Sample(
        "batch 3", {"x": np.ones((3, 4), np.float32), "ids": np.zeros((3, 2), np.int64)}
    )

    class FakeSession:
        def run(self, names, feeds):
            return [feeds["x"] * 2, np.zeros((3, 2), np.float32)]

    monkeypatch.setattr("citrus_edge.export.validate.cpu_session", lambda path: FakeSession())
    good = {"y": np.full((3, 4), 2.0), "z": np.zeros((3, 2))}
    assert len(validate_graph(tmp_path / "g.onnx", spec, [sample], lambda s: good)) == 2
    bad = {"y": np.full((3, 4), 2.01), "z": np.zeros((3, 2))}
    with pytest.raises(ExportValidationError) as info:
        validate_graph(tmp_path / "g.onnx", spec, [sample], lambda s: bad)
    assert [e.output for e in info.value.errors] == ["y", "z"]
    assert "y [batch 3]" in str(info.value) and "z [batch 3]" in str(info.value)
    assert "max abs 1.000e-02" in str(info.value) and "FAIL" in str(info.value)


def test_manifest_files_are_atomic_and_hashed(tmp_path):
    path = manifest_path(tmp_path / "vision.onnx")
    assert path.name == "vision.manifest.json"
    write_json_atomic(path, {"schema": 1, "a": [1, 2]})
    assert read_manifest(path) == {"schema": 1, "a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["vision.manifest.json"]  # no temp left
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert checkpoint_source_hash(tmp_path) == "sha256:" + sha256_file(
        tmp_path / "model.safetensors"
    )
    with pytest.raises(FileNotFoundError):
        checkpoint_source_hash(tmp_path / "missing")
    path.write_text(json.dumps({"schema": 99}))
    with pytest.raises(ValueError, match="schema"):
        read_manifest(path)


def test_package_and_host_inputs_import_no_torch():
    """The runtime on a cart imports these without torch or transformers."""
    code = (
        "import sys\n"
        "import citrus_edge.export, citrus_edge.host_inputs, citrus_edge.export.spec\n"
        "import citrus_edge.export.export_manifest, citrus_edge.export.validate\n"
        "import citrus_edge.graph_specs, citrus_edge.component_specs\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_component_fields_are_callables():
    import citrus_edge.export.components  # noqa: F401

    for component in REGISTRY.values():
        assert isinstance(component, Component)
        assert all(callable(f) for f in (component.spec, component.wrapper, component.reference))
