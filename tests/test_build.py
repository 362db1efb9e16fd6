"""`citrus-edge build`: refusals, portable bundles, atomic replacement, tamper detection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from citrus_edge.bundle import BundleError, load_bundle, sha256_file
from citrus_edge.cli import app


def _build(ckpt, out, data, *extra):
    args = ["build", "--model", str(ckpt), "--out", str(out), "--eval", str(data), *extra]
    return CliRunner().invoke(app, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def cpu_bundle(tiny_checkpoint, small_phantom_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    res = _build(tiny_checkpoint, out, small_phantom_set, "--target", "cpu", "--precision", "fp32")
    assert res.exit_code == 0, res.output
    return out


def test_fp8_on_orin_is_refused_naming_capable_targets(
    tiny_checkpoint, small_phantom_set, tmp_path
):
    res = CliRunner().invoke(
        app,
        ["build", "--target", "orin-nano-8", "--precision", "fp8", "--out", str(tmp_path / "b")],
    )
    assert res.exit_code != 0
    msg = str(res.exception)
    assert "fp8" in msg and all(t in msg for t in ("thor", "x86-ada", "x86-hopper"))
    assert not (tmp_path / "b").exists()


def test_cpu_bundle_manifest_and_accuracy(cpu_bundle):
    b = load_bundle(cpu_bundle)
    m = b.manifest
    assert m["target"]["name"] == "cpu" and m["recipe"]["name"] == "fp32"
    assert set(m["components"]) >= {"vision", "llm", "sam_encoder", "mask_decoder", "embeddings"}
    acc = m["accuracy"]
    assert acc["measured"] and acc["records"] == 3
    assert acc["vs_fp32"]["token_agreement"] == 1.0  # fp32 ORT vs PyTorch: same greedy tokens
    assert abs(acc["vs_fp32"]["gt_dice_drop"]) < 1e-6
    assert "torch" in m["versions"] and "onnx" in m["versions"]


def _reference_answer(ckpt, image, prompt):
    """The PyTorch reference's answer for a DICOM (runtime and CLI default: 96 new tokens)."""
    from citrus_edge.calib_data.load import load_image
    from citrus_edge.modelling.reference import ReferencePipeline

    pipe = ReferencePipeline.from_checkpoint(ckpt, max_new_tokens=96)
    return pipe(load_image(image).pixels, prompt)


def test_run_uses_the_bundle_and_altered_byte_is_refused(
    cpu_bundle, tiny_checkpoint, small_phantom_set, tmp_path
):
    import shutil

    image = next((small_phantom_set.parent / "images").glob("*.dcm"))
    res = CliRunner().invoke(app, ["run", str(cpu_bundle), str(image), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / f"{image.stem}.json").read_text())
    assert out["bundle_id"] == load_bundle(cpu_bundle).bundle_id
    # what the fp32 bundle answered is the PyTorch model's answer on that image: the same
    # greedy tokens, text and log-probabilities. The segmentation prompt is decoded under its
    # grammar, so even the random TINY model gives one of the format's answers and stops.
    from citrus_edge.grammar import ANSWER_SENTENCES
    from citrus_edge.tasks import SEGMENT_ANSWER

    ref = _reference_answer(tiny_checkpoint, image, out["prompt"])
    assert out["prompt"] == "Please help segment the lesion in this scan."  # the CLI's default
    assert out["text"] in (SEGMENT_ANSWER, *ANSWER_SENTENCES) and out["stopped_by"] == "eos"
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text
    np.testing.assert_allclose(out["token_logprobs"], ref.token_logprobs, atol=1e-3)
    assert len(out["masks"]) == len(ref.masks)
    assert out["input"]["sha256"] == sha256_file(image) and out["input"]["frame"] == 0
    bad = tmp_path / "altered"
    shutil.copytree(cpu_bundle, bad)
    f = bad / "mask_decoder.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="mask_decoder.onnx"):
        from citrus_edge.runtime.pipeline import Pipeline

        Pipeline.from_bundle(bad)


def test_orin_portable_bundle_has_engine_plan(tiny_checkpoint, small_phantom_set, tmp_path):
    out = tmp_path / "orin"
    res = _build(
        tiny_checkpoint, out, small_phantom_set, "--target", "orin-agx-64", "--precision", "fp16"
    )
    assert res.exit_code == 0, res.output
    m = load_bundle(out).manifest
    plan = json.loads((out / "engine_plan.json").read_text())
    assert plan == m["engine_plan"] and plan["target"] == "orin-agx-64"
    comps = {c["component"]: c for c in plan["components"]}
    assert set(comps) == {"vision", "llm", "sam_encoder", "mask_decoder"}
    for c in comps.values():
        assert c["onnx"].endswith(".onnx") and c["precision"] == "fp16"
        assert c["profiles"] and "FP16" in c["builder_flags"]
    assert m["accuracy"]["measured"]  # fp32 ONNX graphs, scored with ORT


def test_killed_build_leaves_previous_bundle_intact(
    cpu_bundle, tiny_checkpoint, small_phantom_set, tmp_path
):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(cpu_bundle, out)
    before = load_bundle(out).bundle_id
    cmd = [sys.executable, "-m", "citrus_edge.cli", "build", "--target", "cpu", "--precision"]
    cmd += [
        "fp32",
        "--model",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--eval",
        str(small_phantom_set),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, writing = time.time() + 120, False
    while time.time() < deadline and not writing:  # kill once the export is writing graphs
        writing = any(p.suffix == ".onnx" for p in tmp_path.glob(".bundle.*/**/*"))
        time.sleep(0.1)
    assert writing and proc.poll() is None, "the build was not caught halfway"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_bundle(out).bundle_id == before  # verified, unchanged
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["bundle"]


def test_sigterm_during_build_removes_scratch_and_keeps_previous_bundle(
    cpu_bundle, tiny_checkpoint, small_phantom_set, tmp_path
):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(cpu_bundle, out)
    before = load_bundle(out).bundle_id
    cmd = [sys.executable, "-m", "citrus_edge.cli", "build", "--target", "cpu", "--precision"]
    cmd += [
        "fp32",
        "--model",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--eval",
        str(small_phantom_set),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, writing = time.time() + 120, False
    while time.time() < deadline and not writing:  # stop it once the export is writing graphs
        writing = any(p.suffix == ".onnx" for p in tmp_path.glob(".bundle.*/**/*"))
        time.sleep(0.1)
    assert writing and proc.poll() is None, "the build was not caught halfway"
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    # ended by SIGTERM, after its cleanup (stderr shown: once in CI it ended with status 1)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    assert load_bundle(out).bundle_id == before  # verified, unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .bundle.scratch-* left


def test_matching_gpu_needs_tensorrt_and_the_targets_sm(monkeypatch):
    """`build` compiles engines only with TensorRT and a GPU of the target's SM; otherwise it
    writes a portable bundle (None here). TensorRT and the GPU are faked."""
    from citrus_edge.cli.bundle_build import matching_gpu
    from citrus_edge.engines import device as dev
    from citrus_edge.engines.engine_errors import TensorRTUnavailableError
    from citrus_edge.targets import get_target

    orin = get_target("orin-agx-64")
    assert orin.sm == "8.7"
    calls = []

    def no_tensorrt():
        raise TensorRTUnavailableError("TensorRT is not installed here")

    def gpu(sm):
        def cuda_device(index=None):
            calls.append(sm)
            return dev.CudaDevice(index=0, name=f"GPU sm_{sm}", sm=sm)

        return cuda_device

    monkeypatch.setattr(dev, "import_tensorrt", no_tensorrt)
    monkeypatch.setattr(dev, "cuda_device", gpu("8.7"))
    assert matching_gpu(orin) is None and calls == []  # no TensorRT: the GPU is not even asked
    monkeypatch.setattr(dev, "import_tensorrt", lambda: object())
    monkeypatch.setattr(dev, "cuda_device", gpu("8.9"))  # an Ada card: engines would not load
    assert matching_gpu(orin) is None and calls == ["8.9"]
    assert matching_gpu(get_target("x86-ada")) == dev.CudaDevice(0, "GPU sm_8.9", "8.9")
    monkeypatch.setattr(dev, "cuda_device", gpu("8.7"))
    assert matching_gpu(orin) == dev.CudaDevice(0, "GPU sm_8.7", "8.7")
    assert matching_gpu(get_target("x86-ampere")) is None  # 8.6 is not 8.7


def test_which_bundles_onnx_runtime_can_score_here():
    """A CPU target's int4 (MatMulNBits, recipe int8-w4) is ONNX Runtime's own: scored. TensorRT
    INT4 / FP8 graphs are left to the device, with the reason (the slice's cpu int8-w4 build was
    reported "graphs run only in TensorRT")."""
    from citrus_edge.cli.bundle_build import not_measurable
    from citrus_edge.recipes import get_recipe
    from citrus_edge.targets import get_target

    assert not_measurable(get_target("cpu"), get_recipe("int8-w4")) is None
    assert not_measurable(get_target("cpu"), get_recipe("int8")) is None
    assert "int4" in not_measurable(get_target("orin-agx-64"), get_recipe("fp16-w4"))
    assert not_measurable(get_target("orin-agx-64"), get_recipe("fp16")) is None


def test_build_table_prints_metrics_an_eval_could_not_score():
    """An eval split without a segmentation answer or a count question leaves Dice or count
    accuracy None: the summary says n/a (it raised TypeError after the bundle was written)."""
    from citrus_edge.cli.build_command import _build_table

    manifest = {
        "bundle_id": "b",
        "target": {"name": "cpu"},
        "files": {"llm.onnx": {"bytes": 10}},
        "components": {"llm": {"file": "llm.onnx", "precision": "int8"}},
        "accuracy": {
            "measured": True,
            "records": 1,
            "metrics": {"dice": None, "count_accuracy": None},
            "vs_fp32": {"token_agreement": 0.5, "gt_dice_drop": None},
        },
    }
    caption = str(_build_table(manifest, Path("B")).caption)
    assert "Dice n/a" in caption and "count acc n/a" in caption
    assert "token agreement 0.5000" in caption and "Dice drop n/a" in caption


def test_sigterm_turned_into_another_error_by_c_code_still_ends_as_sigterm():
    """Once in CI, SIGTERM hit while onnxruntime's extension module was initialising: pybind11
    turned the handler's `Terminated` into "ImportError: initialization failed", and the build
    died with a traceback and status 1. Whatever a SIGTERM's exception becomes, the block ends
    with `Terminated` (status 143); without a SIGTERM, errors pass through unchanged."""
    from citrus_edge.bundle import SIGTERM_EXIT, Terminated, sigterm_cleanup

    with pytest.raises(Terminated) as info, sigterm_cleanup():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises here
        except Terminated:
            raise ImportError("initialization failed") from None
    assert info.value.code == SIGTERM_EXIT == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    with pytest.raises(ImportError), sigterm_cleanup():
        raise ImportError("a real import error")
