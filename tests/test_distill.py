"""Distillation (issue 18): the losses in numbers, a short run lowers the KL, exact resume,
and the command's one-line refusals."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from fixtures import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from citrus_edge.compress.distill_config import DistillConfig, DistillConfigError
from citrus_edge.compress.student_spec import StudentSpec
from citrus_edge.modelling.checkpoint import save_checkpoint
from citrus_edge.modelling.distill import (
    distill,
    feature_loss,
    kl_loss,
    mask_kd_loss,
    seg_embedding_loss,
    visual_loss,
)

SPEC = "llm-layers=1;hiera=1,1,1,1"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    tiny_tokenizer().save(str(root / "tokenizer.json"))
    save_checkpoint(tiny_model(), root / "model", tokenizer_json=root / "tokenizer.json")
    return root / "model"


def test_losses_in_numbers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g)
    assert kl_loss(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # By hand: two classes, teacher (0.5, 0.5), student (0.25, 0.75) at T = 1.
    s, t = torch.tensor([[0.0, math.log(3)]]), torch.zeros(1, 2)
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_loss(s, t, 1.0).item() == pytest.approx(by_hand, rel=1e-5)
    assert kl_loss(2 * s, 2 * t, 2.0).item() == pytest.approx(4 * by_hand, rel=1e-5)  # T^2
    assert kl_loss(s[:0], t[:0], 1.0).item() == 0.0  # no answer tokens: nothing to match
    emb = torch.randn(3, 8, generator=g)
    assert seg_embedding_loss(emb, emb.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert seg_embedding_loss(emb, 3 * emb).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert seg_embedding_loss(emb, -emb).item() == pytest.approx(2.0, abs=1e-6)
    assert seg_embedding_loss(emb, emb + 1, "mse").item() == pytest.approx(1.0)
    tokens = 5 * torch.randn(6, 8, generator=g)
    assert visual_loss(tokens, tokens.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert visual_loss(torch.zeros_like(tokens), tokens).item() == pytest.approx(1.0)
    assert visual_loss(0.5 * tokens, tokens).item() == pytest.approx(0.25)  # scale-free
    with pytest.raises(ValueError, match="visual tokens"):
        visual_loss(tokens, tokens[:, :4])
    feats = torch.randn(2, 4, 8, 8, generator=g)
    assert feature_loss(feats, feats + 0.5).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same neck width"):
        feature_loss(feats, feats[:, :2])
    # Mask KD falls monotonically as the student's logits move toward the teacher's.
    t_masks = 4 * torch.randn(2, 3, 16, 16, generator=g)
    s0 = torch.randn(2, 3, 16, 16, generator=g)
    kd = [mask_kd_loss(s0 + a * (t_masks - s0), t_masks).item() for a in (0, 0.25, 0.5, 0.75, 1)]
    assert all(b < a for a, b in zip(kd, kd[1:], strict=False)), kd
    assert kd[0] - kd[-1] > 0.1


def test_config_checks_and_round_trip():
    cfg = DistillConfig(steps=10, train=(("w_mask", 2.0),))
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.train_fields()["w_mask"] == 2.0 and cfg.accumulation(2) == 2  # 8 = 2 x 2 x 2
    for bad, match in [
        ({"temperature": 0.0}, "temperature"),
        ({"w_kl": -1.0}, "w_kl"),
        ({"seg_loss": "l1"}, "seg_loss"),
        ({"batch_size": 6, "micro_batch": 4}, "multiple of micro_batch"),
        ({"train": (("lr", 1.0),)}, r"train overrides \['lr'\]"),
        ({"w_vis": -0.5}, "w_vis -0.5"),
        (
            {"w_kl": 0, "w_seg": 0, "w_mask_kd": 0, "w_feat": 0, "w_vis": 0, "w_gt": 0},
            "nothing to train",
        ),
    ]:
        with pytest.raises(DistillConfigError, match=match):
            DistillConfig(**bad)
    with pytest.raises(DistillConfigError, match="split into 3 processes"):
        DistillConfig(batch_size=8, micro_batch=2).accumulation(3)
    old = {k: v for k, v in cfg.to_dict().items() if k != "w_vis"} | {"version": 1}
    with pytest.raises(DistillConfigError, match="version 1 is not 2"):
        DistillConfig.from_dict(old)  # a run folder from before the visual-token term


def test_short_distillation_lowers_the_kl(teacher, tmp_path):
    cfg = DistillConfig(
        w_seg=0, w_mask_kd=0, w_feat=0, w_vis=0, w_gt=0, steps=6, batch_size=2, micro_batch=2, lr=3e-4,
        warmup=1, eval_every=0, eval_samples=4, ckpt_every=0,
    )  # fmt: skip
    student = distill(teacher, StudentSpec.parse(SPEC), cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 6]
    before, after = rows[0]["kl"], rows[-1]["kl"]
    print(f"held-out KL: step 0 {before:.5f} -> step 6 {after:.5f}")
    assert after < 0.7 * before
    assert len(student.mllm.model.language_model.layers) == 1
    assert (tmp_path / "run" / "model" / "config.json").is_file()  # an ordinary checkpoint


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_is_exact(teacher, tmp_path):
    cfg = DistillConfig(
        steps=4, batch_size=2, micro_batch=1, warmup=1, lr=1e-3, eval_every=2, eval_samples=2,
        ckpt_every=2, log_every=2,
    )  # fmt: skip
    spec = StudentSpec.parse(SPEC)
    straight = distill(teacher, spec, cfg, tmp_path / "a")

    def crash_at_step_3(ev):
        if ev["kind"] == "step" and ev["step"] == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        distill(teacher, spec, cfg, tmp_path / "b", progress=crash_at_step_3)
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=False)["step"] == 2
    with pytest.raises(DistillConfigError, match=r"resuming with different settings \(config.lr"):
        distill(teacher, spec, DistillConfig(**{**cfg.__dict__, "lr": 5e-4}), tmp_path / "b")
    other = StudentSpec.parse("llm-layers=0;hiera=1,1,1,1")
    with pytest.raises(DistillConfigError, match=r"run.student"):
        distill(teacher, other, cfg, tmp_path / "b")
    resumed = distill(teacher, spec, cfg, tmp_path / "b")
    a, b = straight.state_dict(), resumed.state_dict()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed vs straight: state max abs diff {diff}")
    assert diff == 0.0
    curve = [json.loads(x) for x in (tmp_path / "b" / "curve.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (tmp_path / "b" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [2, 4] and [r["step"] for r in evals] == [0, 2, 4]
    straight_evals = (tmp_path / "a" / "eval.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in straight_evals] == evals


def test_a_rewidened_student_distils_through_adapters_and_resumes_exactly(teacher, tmp_path):
    """TINY's vision tower 32 -> 16 wide and SAM2 32 -> 16: fresh parts, the visual-token
    term, and the feature and [SEG] terms through the training-only adapters; an interrupted
    run resumes bit-identical (the adapters are in state.pt), and the student has none."""
    spec = StudentSpec.parse("llm-layers=1;hiera=1,1,1,1;vision-hidden=16;sam-hidden=16")
    cfg = DistillConfig(
        steps=2, batch_size=2, micro_batch=2, warmup=1, lr=1e-3, eval_every=0, eval_samples=4,
        ckpt_every=1, log_every=1,
    )  # fmt: skip
    straight = distill(teacher, spec, cfg, tmp_path / "a")
    rows = [json.loads(x) for x in (tmp_path / "a" / "curve.jsonl").read_text().splitlines()]
    rows += [json.loads(x) for x in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    terms = {k for r in rows for k in r}
    assert {"vis", "feat", "seg", "mask_kd", "kl", "lm", "mask"} <= terms, terms
    assert all(math.isfinite(v) for r in rows for v in r.values())
    print("step 0 eval:", {k: round(v, 4) for k, v in rows[-2].items()})
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=False)
    assert state["adapters"]["feat.weight"].shape == (32, 16, 1, 1)  # 1x1 conv, 16 -> 32
    assert state["adapters"]["seg.weight"].shape == (32, 16)
    assert not any("adapter" in k for k in straight.state_dict())
    assert straight.config.sam2.hidden_size == 16 and straight.config.vision.hidden_size == 16

    def crash_at_step_2(ev):
        if ev["kind"] == "step" and ev["step"] == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        distill(teacher, spec, cfg, tmp_path / "b", progress=crash_at_step_2)
    resumed = distill(teacher, spec, cfg, tmp_path / "b")
    a, b = straight.state_dict(), resumed.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    sa, sb = (torch.load(tmp_path / d / "state.pt", weights_only=False) for d in "ab")
    assert all(torch.equal(sa["adapters"][k], sb["adapters"][k]) for k in sa["adapters"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--student", "nonsense"], "StudentSpecError: student spec 'nonsense': not a preset"),
        (["--student", "llm-layers=0", "--batch-size", "3"], "multiple of micro_batch"),
        (["--student", "llm-layers=0", "--temperature", "0"], "temperature 0.0"),
        (["--student", "llm-layers=0", "--teacher", "NOPE"], "NOPE: no config.json"),
        (["--student", "llm-layers=0", "--data", "NOPE.jsonl"], "--data NOPE.jsonl: no such"),
        (["--student", "llm-layers=0", "--train", "w_foo=1"], "--train 'w_foo=1': expected KEY"),
        (["--student", "llm-layers=0", "--train", "steps=9"], "--train 'steps=9': expected KEY"),
        (["--student", "llm-layers=0", "--train", "w_first=-1"], "finite number >= 0"),
        (["--student", "llm-layers=0", "--train", "centre_loss=x"], "centre_loss is one of"),
        (
            ["--student", "llm-layers=0", "--train", "w_first=3", "--train", "w_first=2"],
            "--train w_first: given twice (3.0 and 2.0)",
        ),
    ],
)
def test_command_refuses_bad_input_in_one_line(tmp_path, extra, message, monkeypatch, capsys):
    from citrus_edge.cli import entry

    monkeypatch.chdir(tmp_path)
    argv = ["distill", "--steps", "2", "--out", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as e:
        entry(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_command_refuses_foreign_out_dir_and_a_folder_without_config(tmp_path, capsys):
    from citrus_edge.cli import entry

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    for extra, message in [
        (["--student", "llm-layers=0"], "not empty and not a distillation run"),
        (["--student", str(tmp_path / "empty")], "a folder without config.json"),
    ]:
        with pytest.raises(SystemExit) as e:
            entry(["distill", "--steps", "2", "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and len(err.splitlines()) == 1 and message in err, err


def test_command_runs_and_resumes(teacher, tmp_path):
    from citrus_edge.cli import app

    args = ["distill", "--teacher", str(teacher), "--student", SPEC, "--batch-size", "2"]
    args += ["--eval-every", "1", "--out", str(tmp_path / "run")]
    first = CliRunner().invoke(app, [*args, "--steps", "1"])
    assert first.exit_code == 0, first.output
    assert "eval step 0:" in first.output and "eval step 1:" in first.output
    again = CliRunner().invoke(app, [*args, "--steps", "2"])  # a changed run is refused
    assert again.exit_code != 0 and "config.steps" in str(again.exception)
    same = CliRunner().invoke(app, [*args, "--steps", "1"])  # the same command: done already
    assert same.exit_code == 0 and str(tmp_path / "run" / "model") in same.output


def test_distill_without_optional_flags_uses_the_demo_teacher_and_fresh_phantoms(tmp_path):
    """The path a user gets with only the required flags: the shipped demo model as teacher,
    fresh training phantoms, the default batch and evaluation (one step)."""
    from citrus_edge.cli import entry
    from citrus_edge.modelling.checkpoint import load_checkpoint
    from citrus_edge.modelling.student import param_count

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        entry(["distill", "--student", "demo-small", "--steps", "1", "--out", str(out)])
    assert done.value.code in (0, None)
    student = load_checkpoint(out / "model")
    assert param_count(student) == 2_145_425  # demo-small of the shipped demo model
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k != "step")
    assert rows[0]["kl"] > 0.5  # an undistilled student disagrees with its teacher


def test_train_options_are_training_loop_fields_of_the_same_kind():
    """`--train KEY=VALUE` is checked torch-free; its table must match TrainConfig."""
    from citrus_edge.compress.distill_config import TRAIN_OPTIONS, parse_train_option
    from citrus_edge.modelling.train import CENTRE_LOSSES, TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, kind in TRAIN_OPTIONS.items():
        default = getattr(TrainConfig(), key)
        assert key in fields and isinstance(default, str if isinstance(kind, tuple) else float)
    assert TRAIN_OPTIONS["centre_loss"] == CENTRE_LOSSES
    assert parse_train_option(" w_first = 3 ") == ("w_first", 3.0)
    assert parse_train_option("centre_loss=focal") == ("centre_loss", "focal")
    tc = TrainConfig(**DistillConfig(train=(parse_train_option("w_count=1"),)).train_fields())
    assert tc.w_count == 1.0 and tc.w_first == TrainConfig().w_first


def test_first_token_kl_is_the_kl_at_each_answers_first_position(teacher):
    from citrus_edge.calib_data.phantom import PhantomConfig
    from citrus_edge.config import TINY
    from citrus_edge.modelling.checkpoint import load_checkpoint
    from citrus_edge.modelling.distill import DistillStep
    from citrus_edge.modelling.train import IGNORE, TrainConfig, collate, llm_forward, make_sample

    t_model, student = load_checkpoint(teacher), tiny_model(seed=1)
    tok = tiny_tokenizer()
    samples = [make_sample(TINY, tok, seed, PhantomConfig()) for seed in (3, 4, 5)]
    batch = collate(samples, TINY.tokens.pad)
    cfg = DistillConfig(w_kl=0.0, w_kl_first=3.0, w_seg=0, w_mask_kd=0, w_feat=0, w_vis=0)
    step = DistillStep(student, t_model, cfg, TrainConfig(**cfg.train_fields()))
    losses = step(batch)
    with torch.no_grad():
        _, _, s_logits = llm_forward(student, batch)
        _, _, t_logits = llm_forward(t_model, batch)
    answer = batch["labels"][:, 1:] != IGNORE
    first = answer.float().argmax(dim=1)  # each row's first answer position
    rows = torch.arange(len(first))
    by_hand = kl_loss(s_logits[rows, first], t_logits[rows, first], cfg.temperature)
    assert losses["kl_first"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert by_hand.item() > 1e-4 and "kl" not in losses  # a real difference; all-token KL off
    assert step.weights["kl_first"] == 3.0
    with pytest.raises(DistillConfigError, match="w_kl_first -1"):
        DistillConfig(w_kl_first=-1.0)
