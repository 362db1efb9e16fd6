"""Every command of the README's table and every documented default, through the real entry
point, asserting what they print and write (not exit codes alone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import cli

from citrus_edge import __version__
from citrus_edge.calib_data.phantom_set import default_phantom_manifest
from citrus_edge.defaults import DEMO_MODEL_DIR, resolve_model


def test_version(capsys):
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"citrus-edge {__version__}"


def test_without_model_every_command_uses_the_demo_model(tmp_path):
    assert resolve_model(None) == DEMO_MODEL_DIR
    assert (DEMO_MODEL_DIR / "model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path)


def test_data_phantoms_writes_a_set_and_refuses_to_overwrite(capsys, tmp_path):
    out = tmp_path / "set"
    code, printed, err = cli(
        capsys, "data", "phantoms", "--out", str(out), "--n", "4", "--seed", "5"
    )
    assert code == 0, err
    manifest = Path(printed.strip())
    assert manifest == out / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    images = {r["image"] for r in records}
    assert len(images) == 4 and all((out / i).is_file() for i in images)
    first = (out / sorted(images)[0]).read_bytes()
    code, _, err = cli(capsys, "data", "phantoms", "--out", str(out), "--n", "4", "--seed", "6")
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert (out / sorted(images)[0]).read_bytes() == first  # untouched
    code, _, _ = cli(capsys, "data", "phantoms", "--out", str(out), "--n", "4", "--seed", "6", "--overwrite")  # fmt: skip
    assert code == 0 and (out / sorted(images)[0]).read_bytes() != first


def test_export_validates_each_graph_at_the_sizes_asked(capsys, tiny_checkpoint, tmp_path):
    out = tmp_path / "export"
    code, printed, err = cli(
        capsys, "export", "--model", str(tiny_checkpoint), "--out", str(out),
        "--image-size", "56x84", "--image-size", "112X56",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "export_manifest.json").read_text())
    graphs = manifest["graphs"]
    assert set(graphs) == {"vision", "llm", "sam_encoder", "mask_decoder"}
    assert all(g["max_abs_error"] < 1e-3 for g in graphs.values()), graphs
    for name in graphs:
        assert name in printed
    code, _, err = cli(capsys, "export", "--out", str(tmp_path / "x"), "--image-size", "56by84")
    assert code == 2 and "HEIGHTxWIDTH" in err and not (tmp_path / "x").exists()


def test_eval_scores_a_model_on_a_manifest(capsys, tiny_checkpoint, small_phantom_set, tmp_path):
    report = tmp_path / "report.json"
    code, printed, err = cli(
        capsys, "eval", "--model", str(tiny_checkpoint), "--data", str(small_phantom_set),
        "--limit", "2", "--out", str(report),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["n"] == 2
    assert json.loads(report.read_text())["summary"] == summary


def test_eval_without_arguments_is_the_demo_model_on_the_default_set(capsys):
    code, printed, err = cli(capsys, "eval", "--limit", "6")
    assert code == 0, err
    title = "".join(printed.split())  # the table's title, wherever the terminal wrapped it
    assert f"demo_modelon{default_phantom_manifest()}[eval]" in title
    assert json.loads(printed.strip().splitlines()[-1])["n"] == 6


def test_a_provider_that_cannot_load_is_refused_in_one_line(capsys, tiny_fp32_bundle, tmp_path):
    from pydicom import examples

    code, _, err = cli(
        capsys, "run", str(tiny_fp32_bundle), str(examples.get_path("rgb_color")),
        "--provider", "CUDAExecutionProvider", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "CUDAExecutionProvider" in err and not any(tmp_path.iterdir())


def test_export_refuses_a_users_folder_before_loading_the_model(capsys, tmp_path, monkeypatch):
    import citrus_edge.modelling.checkpoint

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(citrus_edge.modelling.checkpoint, "load_checkpoint", never)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ((), ("--overwrite",)):
        code, _, err = cli(capsys, "export", "--out", str(out), *extra)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert "notes.txt" in err or "exists" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    from citrus_edge.export import export_all
    from citrus_edge.modelling.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("tiny-export") / "fp32"
    export_all(
        load_checkpoint(tiny_checkpoint),
        out,
        source_hash="random:citrus-v-tiny",
        tokenizer_json=tiny_checkpoint / "tokenizer.json",
    )
    return out


def test_quantize_writes_the_recipe_and_prints_its_table(
    capsys, tiny_export, small_phantom_set, tmp_path
):
    # The random TINY weights meet no accuracy budget (token agreement ~0.55), so the gate is
    # opened here to test the command; the default budget is tested on the demo model
    # (tests/test_default_build.py, tests/test_quantize_budget.py).
    out = tmp_path / "int8"
    code, printed, err = cli(
        capsys, "quantize", str(tiny_export), "--out", str(out), "--precision", "int8",
        "--calib", str(small_phantom_set), "--budget", "dice=100,tokens=0",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["recipe"]["name"] == "int8" and report["target"] == "cpu"
    assert report["budget"]["min_token_agreement"] == 0.0
    assert 0 < report["payload_ratio"] < 0.6
    assert set(report["components"]) == {"vision", "llm", "sam_encoder", "mask_decoder"}
    assert "SQNR" in printed and "token_agreement" in printed  # the table and its caption
    code, _, err = cli(capsys, "quantize", str(tiny_export), "--out", str(out))
    assert code == 1 and "exists" in err and len(err.strip().splitlines()) == 1


def test_engines_build_without_tensorrt_says_what_to_install(capsys, tiny_checkpoint, tmp_path):
    from citrus_edge.cli.bundle_build import BuildConfig, build

    bundle = tmp_path / "orin"
    build(BuildConfig("orin-nano-8", tiny_checkpoint, recipe="fp16", eval_limit=1), bundle)
    code, _, err = cli(capsys, "engines", "build", str(bundle))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: TensorRTUnavailableError: ") and "JetPack" in err
    assert not (tmp_path / "orin-engines").exists()  # nothing half-built


def test_plan_of_a_student_preset_on_the_smaller_jetsons(capsys):
    """`plan --student`: the 8B's students from dimensions (issue 18's "on paper" figures)."""
    code, out, _ = cli(capsys, "plan", "--target", "orin-nano-8", "--json")
    teacher = json.loads(out)
    assert code == 3 and not teacher["fits"]  # the 8B does not fit an Orin Nano 8GB
    code, out, _ = cli(capsys, "plan", "--target", "orin-nano-8", "--student", "8b-edge", "--json")
    student = json.loads(out)
    assert code == 0 and student["fits"]
    assert student["weight_bytes"] < 0.6 * teacher["weight_bytes"]
    assert (
        student["decode_tokens_per_s_upper_bound"]
        > 1.8 * teacher["decode_tokens_per_s_upper_bound"]
    )
    code, _, err = cli(capsys, "plan", "--target", "orin-nano-8", "--student", "llm-layers=99")
    assert code == 1 and "llm-layers" in err and len(err.strip().splitlines()) == 1
