"""The models shipped in the package and `--model NAME` (issue 18: the distilled student)."""

from __future__ import annotations

import json

import pytest

from citrus_edge.config import CitrusVConfig
from citrus_edge.defaults import DEMO_MODEL_DIR, SHIPPED_MODELS, resolve_model


def test_every_shipped_name_resolves_to_a_checkpoint_and_a_path_wins(tmp_path, monkeypatch):
    assert resolve_model(None) == DEMO_MODEL_DIR == resolve_model("demo")
    for name, path in SHIPPED_MODELS.items():
        assert resolve_model(name) == path and (path / "model.safetensors").is_file(), name
        assert (path / "tokenizer.json").read_bytes() == (
            DEMO_MODEL_DIR / "tokenizer.json"
        ).read_bytes()
    # A folder of that name in the working directory is the user's: it is taken, not ours.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-lite").mkdir()
    with pytest.raises(FileNotFoundError, match="demo-lite: no config.json"):
        resolve_model("demo-lite")


def test_the_shipped_student_is_demo_lite_and_3x_smaller():
    from citrus_edge.cli.model_params import param_counts

    lite = CitrusVConfig.load(SHIPPED_MODELS["demo-lite"] / "config.json")
    demo = CitrusVConfig.load(DEMO_MODEL_DIR / "config.json")
    n = sum(c.total for c in param_counts(lite).values())
    n_demo = sum(c.total for c in param_counts(demo).values())
    assert (n, n_demo) == (1_046_465, 3_182_353) and n_demo / n >= 3.0
    raw = json.loads((SHIPPED_MODELS["demo-lite"] / "config.json").read_text())
    assert raw["vision_config"]["merger_intermediate_size"] == 64
    assert lite.text.num_layers == 2 and lite.sam2.hidden_size == 64


def test_the_smaller_student_is_demo_lite_at_half_its_hiera_width():
    """`demo-lite-s`: demo-lite with every Hiera stage at half width, 3.72x fewer parameters
    than the demo model; everything else demo-lite's shapes."""
    from citrus_edge.cli.model_params import param_counts

    small = CitrusVConfig.load(SHIPPED_MODELS["demo-lite-s"] / "config.json")
    lite = CitrusVConfig.load(SHIPPED_MODELS["demo-lite"] / "config.json")
    demo = CitrusVConfig.load(DEMO_MODEL_DIR / "config.json")
    n = sum(c.total for c in param_counts(small).values())
    n_demo = sum(c.total for c in param_counts(demo).values())
    assert n == 855_425 and n_demo / n >= 3.7
    assert small.sam2.embed_dim_per_stage == tuple(d // 2 for d in lite.sam2.embed_dim_per_stage)
    assert (small.text, small.vision) == (lite.text, lite.vision)


@pytest.mark.parametrize("name", ["demo-lite", "demo-lite-s"])
def test_export_takes_the_student_by_name(tmp_path, name):
    """`citrus-edge export --model NAME`: every graph validated against PyTorch."""
    from typer.testing import CliRunner

    from citrus_edge.cli import app

    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", "--model", name, "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["model_config"] == CitrusVConfig.load(SHIPPED_MODELS[name] / "config.json").name
    assert sorted(manifest["graphs"]) == ["llm", "mask_decoder", "sam_encoder", "vision"]
    for name, graph in manifest["graphs"].items():
        assert graph["max_abs_error"] < 1e-3, name
