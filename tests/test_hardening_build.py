"""Issue 15 §1 and §4: `build` never touches a user's files, refuses `--out` at once, follows
the umask, gives the same bundle_id to identical builds, and keeps the quantizers off stdout.

Builds use the TINY model (tests/fixtures.py) on 10 phantoms with one eval record.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from fixtures import tiny_export_with_phantoms, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from citrus_edge.bundle import (
    BUNDLE_KIND,
    MANIFEST,
    OutputFolderError,
    bundle_id_of,
    check_bundle_out,
    foreign_entries,
    load_bundle,
    sha256_file,
    staged_directory,
    write_manifest,
)
from citrus_edge.cli import app

LOOSE_BUDGET = "dice=100,tokens=0"  # a random TINY model: measure, never search


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _save_tiny(root: Path, name: str, nudge: float = 0.0) -> Path:
    """The TINY checkpoint at `root/name`; `nudge` is added to one weight."""
    import torch

    from citrus_edge.modelling.checkpoint import save_checkpoint

    model = tiny_model()
    if nudge:
        with torch.no_grad():
            next(model.seg_projector.parameters()).view(-1)[0] += nudge
    tok = root / "tokenizer-src.json"
    tiny_tokenizer().save(str(tok))
    save_checkpoint(model, root / name, tokenizer_json=tok)
    return root / name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    from citrus_edge.calib_data.phantom_set import write_phantom_set

    root = tmp_path_factory.mktemp("inputs")
    return _save_tiny(root, "tiny"), write_phantom_set(root / "ph", n=10, seed=3)


def _build(ckpt: Path, phantoms: Path, out: Path, recipe: str = "fp32") -> dict:
    from citrus_edge.cli.bundle_build import BuildConfig, build

    cfg = BuildConfig(
        target="cpu",
        model_dir=ckpt,
        recipe=recipe,
        calib=phantoms,
        eval_data=phantoms,
        eval_limit=1,
        budget=LOOSE_BUDGET,
    )
    return build(cfg, out)


@pytest.fixture(scope="module")
def bundle(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    _build(*inputs, out)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b"<dir>"
        for p in folder.rglob("*")
    }


# -- 1. never lose a user's files; refuse --out before any work ----------------------------------


def test_user_folder_with_a_manifest_is_refused_at_once_and_kept(inputs, tmp_path, monkeypatch):
    import citrus_edge.cli.bundle_build  # noqa: F401  (imports are not what is timed)
    import citrus_edge.defaults  # noqa: F401
    import citrus_edge.modelling.checkpoint

    loads = []
    monkeypatch.setattr(citrus_edge.modelling.checkpoint, "load_checkpoint", loads.append)
    ckpt, phantoms = inputs
    user = tmp_path / "D"
    user.mkdir()
    (user / "manifest.json").write_text('{"patients": 12}\n')
    (user / "notes.txt").write_text("scan notes\n")
    before = _snapshot(user)
    args = ["build", "--target", "cpu", "--precision", "fp32", "--model", str(ckpt)]
    args += ["--out", str(user), "--eval", str(phantoms)]
    t0 = time.process_time()  # CPU seconds: the export alone takes several
    res = CliRunner().invoke(app, args)
    seconds = time.process_time() - t0
    assert res.exit_code != 0 and isinstance(res.exception, OutputFolderError)
    assert "notes.txt" in str(res.exception) and "manifest.json" in str(res.exception)
    assert loads == [] and seconds < 0.5, f"refused after {seconds:.1f} CPU s, not before the work"
    assert _snapshot(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D"]  # no scratch, no staging


def test_bundle_with_a_stray_file_is_refused_naming_it(bundle, inputs, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    (out / "notes.txt").write_text("mine\n")
    (out / "extra").mkdir()
    (out / "extra" / "scan.dcm").write_bytes(b"\0" * 8)
    before = _snapshot(out)
    with pytest.raises(OutputFolderError, match=r"\['extra/', 'notes.txt'\]"):
        _build(*inputs, out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_file_added_during_the_build_is_kept(bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    with pytest.raises(OutputFolderError, match="late.txt"):
        with staged_directory(out) as tmp:
            (tmp / "x.bin").write_bytes(b"new")
            (out / "late.txt").write_text("put there while building\n")
    assert (out / "late.txt").read_text() == "put there while building\n"
    assert load_bundle(out).bundle_id == load_bundle(bundle).bundle_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_bundle_holding_only_its_files_is_replaced(bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    with staged_directory(out) as tmp:
        (tmp / "x.bin").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == ["x.bin"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask_now()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .old-/.building- left


def _umask_now() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_cli_refusal_is_one_line_without_traceback(tmp_path):
    user = tmp_path / "D"
    user.mkdir()
    (user / "notes.txt").write_text("x\n")
    cmd = [sys.executable, "-m", "citrus_edge.cli", "build", "--target", "cpu"]
    res = subprocess.run(cmd + ["--out", str(user)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "OutputFolderError" in res.stderr and "notes.txt" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert (user / "notes.txt").read_text() == "x\n"


def test_replaceable_means_listed_files_only(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for rel in ("a/one.onnx", "a/sub/two.bin", "a/sub/mine.txt", "a/other/x"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "a" / "link").symlink_to(tmp_path / "a" / "one.onnx")
    listed = ["one.onnx", "sub/two.bin"]
    assert foreign_entries(tmp_path / "a", listed) == ["link", "other/", "sub/mine.txt"]
    check_bundle_out(tmp_path / "absent")  # absent and empty folders are fine
    (tmp_path / "empty").mkdir()
    check_bundle_out(tmp_path / "empty")
    escape = tmp_path / "escape"
    escape.mkdir()
    (escape / MANIFEST).write_text(json.dumps({"kind": BUNDLE_KIND, "files": {"../x": {}}}))
    with pytest.raises(OutputFolderError, match="not a folder citrus-edge build wrote"):
        check_bundle_out(escape)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="not a folder"):
        check_bundle_out(tmp_path / "file")


def test_export_out_check_is_torch_free_and_keeps_user_files(tmp_path):
    user = tmp_path / "E"
    user.mkdir()
    (user / "export_manifest.json").write_text('{"kind": "mine", "files": {}}')
    (user / "notes.txt").write_text("x\n")
    code = (
        "import sys; from citrus_edge.export.export_manifest import check_export_out\n"
        f"try:\n    check_export_out({str(user)!r}, overwrite=True)\n"
        "except FileExistsError as e:\n    print(type(e).__name__, e)\n"
        "print('torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = res.stdout.splitlines()
    assert lines[0].startswith("OutputFolderError") and "notes.txt" in lines[0], res.stderr
    assert lines[-1] == "False"  # no torch: callable before a model is loaded
    assert (user / "notes.txt").read_text() == "x\n"


def test_eval_limit_below_one_is_refused(inputs, tmp_path):
    from citrus_edge.cli.bundle_build import BuildConfig

    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"eval_limit {bad}"):
            BuildConfig(target="cpu", model_dir=inputs[0], eval_limit=bad)
    args = ["build", "--target", "cpu", "--out", str(tmp_path / "b"), "--eval-limit", "0"]
    res = CliRunner().invoke(app, args)  # the option refuses it too (a usage error)
    assert res.exit_code != 0 and "eval-limit" in res.output
    assert not (tmp_path / "b").exists()


def test_unknown_table_dtype_is_refused_before_any_work(inputs, tmp_path):
    from citrus_edge.cli.bundle_build import BuildConfig

    with pytest.raises(ValueError, match="embeddings 'int4' is not one of float16, int8"):
        BuildConfig(target="cpu", model_dir=inputs[0], embeddings="int4")
    commands = (
        ["build", "--target", "cpu", "--out", str(tmp_path / "b")],
        ["plan", "--target", "orin-nano-8"],
    )
    for command in commands:
        cmd = [sys.executable, "-m", "citrus_edge.cli", *command, "--embeddings", "int4"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode == 1, res.stderr
        assert "ValueError" in res.stderr and "'int4' is not one of" in res.stderr
        assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "b").exists()


# -- modes follow the umask ------------------------------------------------------------------


def test_bundle_and_external_data_follow_the_umask(inputs, tmp_path, monkeypatch):
    import citrus_edge.export.graph as graph

    monkeypatch.setattr(graph, "_weight_bytes", lambda module: 1 << 40)  # external data
    with umask(0o027):
        _build(*inputs, tmp_path / "bundle")
    out = tmp_path / "bundle"
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    data = [rel for rel in modes if rel.endswith(".onnx.data")]
    assert len(data) == 4  # every graph keeps its weights in <graph>.onnx.data
    assert out.stat().st_mode & 0o777 == 0o750  # mkdtemp's 0700 before
    assert {rel: m for rel, m in modes.items() if m != 0o640} == {}  # onnx's 0600 before
    load_bundle(out)  # and it verifies


def test_checkpoint_and_atomic_files_follow_the_umask(tmp_path):
    from citrus_edge.atomic import atomic_path

    with umask(0o027):
        ckpt = _save_tiny(tmp_path, "ckpt")
        with atomic_path(tmp_path / "m.jsonl") as tmp:
            tmp.write_text("{}\n")
    assert ckpt.stat().st_mode & 0o777 == 0o750  # 0755 whatever the umask before
    assert {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()} == {
        "config.json": 0o640,
        "model.safetensors": 0o640,
        "tokenizer.json": 0o640,
    }
    assert (tmp_path / "m.jsonl").stat().st_mode & 0o777 == 0o640  # 0644 before


def test_save_checkpoint_keeps_a_users_files(tmp_path):
    from citrus_edge.modelling.checkpoint import CheckpointError, save_checkpoint

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "notes.txt").write_text("mine\n")
    with pytest.raises(CheckpointError, match="notes.txt"):
        save_checkpoint(tiny_model(), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes.txt"]
    assert (folder / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# -- 4. bundle_id: content only ---------------------------------------------------------------


def test_identical_builds_share_the_bundle_id(inputs, tmp_path):
    ckpt, phantoms = inputs  # int8: the CPU default, whose quantize report holds timings
    a = _build(ckpt, phantoms, tmp_path / "a", "int8")
    b = _build(ckpt, phantoms, tmp_path / "b", "int8")
    assert a["bundle_id"] == b["bundle_id"]  # differed before: timings and paths were hashed
    differ = sorted(rel for rel in a["files"] if a["files"][rel] != b["files"][rel])
    assert "quantize_report.json" in differ and "export_manifest.json" in differ  # records
    assert all(rel.endswith(".json") for rel in differ)  # graphs and tables: byte-identical
    assert json.loads((tmp_path / "a" / "quantize_report.json").read_text())["seconds"] > 0
    assert load_bundle(tmp_path / "a").bundle_id == load_bundle(tmp_path / "b").bundle_id


def test_a_changed_weight_changes_the_bundle_id(bundle, inputs, tmp_path):
    nudged = _save_tiny(tmp_path, "nudged", nudge=1e-2)  # one seg projector weight
    c = _build(nudged, inputs[1], tmp_path / "c")
    assert c["bundle_id"] != load_bundle(bundle).bundle_id
    load_bundle(tmp_path / "c")  # the runtime's check: every file's sha256 and the id


def test_schema_1_bundles_still_load_and_ids_cover_defining_fields(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"graph")
    (tmp_path / "export_manifest.json").write_text('{"total_seconds": 1.5}')
    files = {
        name: {"sha256": sha256_file(tmp_path / name), "bytes": (tmp_path / name).stat().st_size}
        for name in ("g.onnx", "export_manifest.json")
    }
    old = {"schema": 1, "kind": BUNDLE_KIND, "files": files}
    old["bundle_id"] = bundle_id_of(old)
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    assert load_bundle(tmp_path).bundle_id == old["bundle_id"]  # bundles built before still load
    new = write_manifest(tmp_path, {"target": {"name": "cpu"}})
    (tmp_path / "export_manifest.json").write_text('{"total_seconds": 9.9}')
    assert write_manifest(tmp_path, {"target": {"name": "cpu"}})["bundle_id"] == new["bundle_id"]
    assert write_manifest(tmp_path, {"target": {"name": "thor"}})["bundle_id"] != new["bundle_id"]


# -- 4. the quantizers print nothing -------------------------------------------------------------


def test_quantize_prints_nothing_and_logs_the_quantizers_output(tmp_path, capfd, caplog):
    import dataclasses

    from citrus_edge.compress.quantize import quantize
    from citrus_edge.compress.settings import CPU_STATIC_INT8, GEMM_OP_TYPES, QuantizeConfig

    root, export, manifest = tiny_export_with_phantoms(tmp_path, n_phantoms=10)
    capfd.readouterr()
    # The CPU default leaves Conv float; quantizing the SAM2 side's Convs too makes ONNX
    # Runtime's quantizer warn through the root logger (non-constant biases), which is what
    # this test needs to see routed to our log.
    with_conv = dataclasses.replace(CPU_STATIC_INT8, op_types=GEMM_OP_TYPES)
    settings = {"sam_encoder": with_conv, "mask_decoder": with_conv}
    with caplog.at_level(logging.INFO, logger="citrus_edge.compress.quantize"):
        quantize(
            export,
            "int8",
            "cpu",
            manifest,
            budget=None,
            out_dir=root / "int8",
            config=QuantizeConfig(max_new_tokens=8, settings=settings),
        )
        print("after", flush=True)  # stdout works again afterwards
        os.write(1, b"fd after\n")
    out, err = capfd.readouterr()
    assert out == "after\nfd after\n"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantizer: ")]
    # ONNX Runtime's calibrator printed these lines for each of the three static-INT8 graphs.
    assert sum("Collecting tensor data and making histogram" in m for m in lines) == 3
    # ... and its root-logger warnings (non-constant biases) are log lines here, not on stderr.
    assert any("Expected bias" in m for m in lines)
    assert not [r for r in caplog.records if r.name == "root"]
    assert "Expected bias" not in err
