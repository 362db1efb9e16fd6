"""The command line's own conventions, through the real entry point (`citrus_edge.cli.entry`):
-h, -v after the command, plain-text errors and help, --json, exit codes, output names."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from citrus_edge.cli import EXIT_DOES_NOT_FIT, EXIT_NOTHING_TRACKED, entry
from citrus_edge.recipes import RECIPES
from citrus_edge.targets import TARGETS


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `citrus-edge ARGV` in-process: (exit code, stdout, stderr)."""
    try:
        entry(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_short_help_and_defaults_in_brackets_survive(capsys):
    code, out, _ = cli(capsys, "plan", "-h")
    assert code == 0
    assert "--context" in out and "[default: 2048, or the" in out  # was eaten as markup


def test_python_m_cli_knows_every_command():
    for args in (["-m", "citrus_edge.cli", "quantize", "--help"], ["-m", "citrus_edge", "-h"]):
        res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    assert "--precision" in res.stdout or "quantize" in res.stdout


def test_verbose_is_accepted_after_the_command(capsys):
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.WARNING)
        code, out, _ = cli(capsys, "targets", "--json", "-v")
        assert code == 0 and root.level == logging.INFO
    finally:
        root.setLevel(level)
    assert [t["name"] for t in json.loads(out)] == list(TARGETS)


def test_targets_table_never_truncates_names_when_piped_narrow():
    env = {**os.environ, "COLUMNS": "60"}
    res = subprocess.run(
        [sys.executable, "-m", "citrus_edge", "targets"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    for name, target in TARGETS.items():
        assert name in res.stdout  # the name one types
        assert target.default_recipe in res.stdout


def test_recipes_are_listed_with_the_targets_that_run_them(capsys):
    code, out, _ = cli(capsys, "recipes", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert list(rows) == list(RECIPES)
    assert rows["int8-w4"]["components"] == {
        "vision": "int8",
        "llm": "int4",
        "sam_encoder": "int8",
        "mask_decoder": "int8",
    }
    assert "orin-nano-8" not in rows["fp8"]["targets"]  # Orin has no FP8
    assert {"thor", "x86-ada", "x86-hopper"} <= set(rows["fp8"]["targets"])
    assert rows["int8"]["targets"][0] == "cpu"


def test_plan_exits_3_when_the_model_does_not_fit(capsys):
    code, out, _ = cli(capsys, "plan", "--target", "orin-nano-8", "--precision", "fp16", "--json")
    assert code == EXIT_DOES_NOT_FIT == 3
    p = json.loads(out)
    assert p["fits"] is False
    code, out, _ = cli(capsys, "plan", "--target", "orin-agx-64", "--json")
    assert code == 0 and json.loads(out)["fits"] is True
    code, out, _ = cli(capsys, "plan", "--target", "orin-nano-8", "--precision", "fp16")
    assert code == 3 and "DOES NOT FIT" in out


@pytest.mark.parametrize(
    "argv",
    [
        # --model names no checkpoint: if the number passed, the run fails fast (exit 1).
        ["build", "--target", "cpu", "--out", "x", "--model", "none", "--eval-limit", "-3"],
        ["eval", "--model", "none", "--limit", "0"],
        ["plan", "--target", "cpu", "--context", "0"],
        ["data", "phantoms", "--out", "x", "--n", "0"],
    ],
)
def test_out_of_range_numbers_are_usage_errors(capsys, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "Invalid value" in err
    assert not (tmp_path / "x").exists()


def test_missing_bundle_and_directory_input_are_named(capsys, tmp_path):
    code, _, err = cli(capsys, "engines", "build", str(tmp_path / "no-such-dir"))
    assert code == 2 and "does not exist" in err and "--target" not in err
    code, _, err = cli(capsys, "run", str(tmp_path), str(tmp_path))
    assert code == 2 and "is a directory" in err


def test_typed_error_is_one_plain_line_with_brackets_kept(capsys, tmp_path):
    bundle = tmp_path / "[red]bundle"
    bundle.mkdir()
    image = tmp_path / "[bold]x.dcm"
    image.write_bytes(b"not an image")
    code, out, err = cli(capsys, "run", str(bundle), str(image))
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: BundleError: ") and "[red]bundle" in lines[0]
    # A message written over two lines by the library still prints as one.
    code, _, err = cli(capsys, "build", "--target", "cpu", "--precision", "fp16", "--out", "b")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "fp16" in err


def test_run_names_results_per_frame_and_prints_the_total(capsys, tiny_fp32_bundle, tmp_path):
    from pydicom import examples

    cine = examples.get_path("ybr_color")  # 30-frame ultrasound
    totals = []
    for frame in ("0", "15"):
        code, out, err = cli(
            capsys, "run", str(tiny_fp32_bundle), str(cine), "--frame", frame,
            "--out", str(tmp_path), "--max-new-tokens", "4", "--json",
        )  # fmt: skip
        assert code == 0, err
        printed = json.loads(out)
        saved = json.loads((tmp_path / f"{Path(cine).stem}.frame{int(frame):04d}.json").read_text())
        assert printed["token_ids"] == saved["token_ids"]
        # The result traces to its input, prompt, bundle and settings.
        assert saved["input"] == {
            "path": str(cine),
            "sha256": hashlib.sha256(Path(cine).read_bytes()).hexdigest(),
            "frame": int(frame),
        }
        assert saved["prompt"] == "Please help segment the lesion in this scan."
        assert (
            saved["bundle_id"]
            == json.loads((tiny_fp32_bundle / "manifest.json").read_text())["bundle_id"]
        )
        assert (
            saved["runtime"]["max_new_tokens"] == 4 and saved["runtime"]["backend"] == "onnxruntime"
        )
        totals.append(saved["timings_ms"]["total"])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".png", ".png"]
    code, out, _ = cli(
        capsys, "run", str(tiny_fp32_bundle), str(cine), "--out", str(tmp_path / "t"),
        "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0
    saved = json.loads((tmp_path / "t" / f"{Path(cine).stem}.frame0000.json").read_text())
    row = next(line for line in out.splitlines() if "total ms" in line)
    printed_total = float(row.split("total ms")[1].strip(" │|\n"))
    stages = sum(v for k, v in saved["timings_ms"].items() if k != "total")
    assert printed_total == pytest.approx(saved["timings_ms"]["total"], abs=0.06)
    assert printed_total < stages * 1.5  # not the stages plus the total (twice the time)


def test_video_without_seg_on_the_key_frame_says_so_and_exits_4(capsys, tiny_fp32_bundle, tmp_path):
    from pydicom import examples

    cine = examples.get_path("ybr_color")
    code, out, err = cli(
        capsys, "run", str(tiny_fp32_bundle), str(cine), "--video", "--out", str(tmp_path),
        "--max-new-tokens", "4", "--prompt", "Describe the findings in this scan.",
    )  # fmt: skip
    key = json.loads((tmp_path / Path(cine).stem / "frame_0000.json").read_text())
    assert key["masks"] == []  # the random TINY model answers 4 tokens with no [SEG]
    assert code == EXIT_NOTHING_TRACKED == 4
    assert "nothing tracked" in err and "tracked 29 frames" not in out
    assert sorted(p.name for p in (tmp_path / Path(cine).stem).iterdir()) == [
        "frame_0000.json",
        "frame_0000.overlay.png",
    ]


def test_run_context_cap_default_is_the_runtime_default():
    import inspect

    from citrus_edge.cli import run_cmd
    from citrus_edge.prompts import DEFAULT_MAX_CONTEXT_TOKENS

    default = inspect.signature(run_cmd).parameters["max_context_tokens"].default
    assert default == DEFAULT_MAX_CONTEXT_TOKENS


def test_run_refuses_a_prompt_past_the_cap_in_one_line(capsys, tiny_fp32_bundle, tmp_path):
    from pydicom import examples

    code, _, err = cli(
        capsys, "run", str(tiny_fp32_bundle), str(examples.get_path("rgb_color")),
        "--prompt", "lesion " * 400, "--max-context-tokens", "300", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 1 and err.startswith("error: PromptTooLongError: ")
    assert len(err.strip().splitlines()) == 1 and "300" in err and not any(tmp_path.iterdir())
