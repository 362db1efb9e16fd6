"""Distillation students (issue 18): the spec and its config (torch-free), students built from a
TINY teacher's weights, MLP channel importance, and layer importance. Fast: TINY widths."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from fixtures import tiny_model, tiny_tokenizer

from citrus_edge.calib_data.phantom import PhantomConfig
from citrus_edge.compress.student_spec import (
    STUDENT_PRESETS,
    StudentSpec,
    StudentSpecError,
    student_config,
)
from citrus_edge.config import CITRUS_V_8B, DEMO, TINY
from citrus_edge.modelling.layer_importance import (
    choose_layers,
    format_table,
    language_forward,
    layer_importance,
)
from citrus_edge.modelling.student import (
    MASK_DECODER,
    SAM_PROMPT_SIDE,
    VISION_TOWER,
    fresh_parts,
    make_student,
    mlp_importance,
    param_count,
)
from citrus_edge.modelling.train import TRAIN_SEED_BASE, collate, make_sample

LLM = "mllm.model.language_model.layers."
VIS = "mllm.model.visual.blocks."
HIERA = "grounding_encoder.sam2_model.vision_encoder.backbone.blocks."


@pytest.fixture(scope="module")
def teacher():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def batch():
    tok = tiny_tokenizer()
    samples = [make_sample(TINY, tok, TRAIN_SEED_BASE + i, PhantomConfig()) for i in range(4)]
    return collate(samples, TINY.tokens.pad)


# -- spec and config (torch-free) -----------------------------------------------------------
def test_parse_cli_form_and_round_trip():
    spec = StudentSpec.parse("llm-layers=0,3;vision-blocks=1,3;hiera=1,1,1,1;llm-mlp=0.5")
    assert spec.llm_layers == (0, 3) and spec.vision_blocks == (1, 3)
    assert spec.hiera_blocks == (1, 1, 1, 1) and spec.llm_mlp == 0.5
    assert spec.name == "l0.3-v1.3-h1.1.1.1-m0.5"
    assert StudentSpec.parse(spec.text()) == spec
    assert StudentSpec.parse("llm-layers=0-2,5;name=x").llm_layers == (0, 1, 2, 5)
    assert StudentSpec.parse("vision-blocks=all;name=x").vision_blocks is None
    assert StudentSpec.parse("demo-small") is STUDENT_PRESETS["demo-small"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("tiny-student", "not a preset"),
        ("llm-layers=3,1", "increasing"),
        ("llm-layers=0,0", "without repeats"),
        ("llm-layers=", "is not key=value"),
        ("llm-mlp=0", "must be in (0, 1]"),
        ("llm-mlp=1.5", "must be in (0, 1]"),
        ("llm-mlp=half", "not a number"),
        ("hiera=1,1,1", "4 numbers"),
        ("hiera=1,0,1,1", "4 numbers"),
        ("depth=3", "unknown key 'depth'"),
        ("llm-layers=1;llm-layers=2", "given twice"),
        ("llm-layers=x", "'x' is not an index"),
        ("llm-layers=4-2", "runs backwards"),
        ("vision-hidden=0", "vision-hidden 0: must be >= 1"),
        ("vision-hidden=6.5", "not a whole number"),
        ("sam-hidden=-8", "not a whole number"),
        ("vision-heads=0", "vision-heads 0: must be >= 1"),
        ("vision-mlp=0", "vision-mlp 0.0: must be in (0, 1]"),
        ("sam-decoder-mlp=2", "sam-decoder-mlp 2.0: must be in (0, 1]"),
        ("sam-decoder-mlp=wide", "not a number"),
    ],
)
def test_parse_errors_are_one_line_naming_the_input(text, words):
    with pytest.raises(StudentSpecError) as e:
        StudentSpec.parse(text)
    msg = str(e.value)
    assert words in msg and repr(text) in msg and "\n" not in msg


def test_student_config_dims():
    cfg = student_config(DEMO, STUDENT_PRESETS["demo-small"])
    assert cfg.name == "citrus-v-demo-demo-small"
    assert (cfg.text.num_layers, cfg.text.intermediate_size) == (2, 256)
    assert (cfg.vision.depth, cfg.vision.fullatt_block_indexes) == (2, (1,))  # teacher's 3
    assert cfg.sam2.blocks_per_stage == (1, 1, 1, 1) and cfg.sam2.global_attention_blocks == ()
    # Every other width is the teacher's.
    assert cfg.text.hidden_size == 128 and cfg.vision.hidden_size == 96
    assert cfg.sam2.embed_dim_per_stage == DEMO.sam2.embed_dim_per_stage
    assert cfg.tokens == DEMO.tokens and cfg.preprocess == DEMO.preprocess
    assert student_config(DEMO, StudentSpec()) == dataclasses.replace(
        DEMO, name="citrus-v-demo-student"
    )
    # 8B presets.
    half = student_config(CITRUS_V_8B, STUDENT_PRESETS["8b-half-layers"])
    assert half.text.num_layers == 14
    edge = student_config(CITRUS_V_8B, STUDENT_PRESETS["8b-edge"])
    assert edge.text.intermediate_size == 11_008  # Qwen2.5-VL-3B's MLP width
    assert edge.vision.depth == 16 and edge.vision.fullatt_block_indexes == (3, 7, 11, 15)
    # Hiera-L (2,6,36,4), globals 23,33,43 (stage 2 positions 15,25,35) -> Hiera-S depths:
    # stage 2 keeps positions 0..10, none global, so its last kept block (13) is global.
    assert edge.sam2.blocks_per_stage == (1, 2, 11, 2)
    assert edge.sam2.global_attention_blocks == (13,)


def test_width_keys_round_trip_and_scale_at_the_teachers_ratios():
    text = "vision-hidden=64;vision-heads=4;vision-mlp=0.5;sam-hidden=64;sam-decoder-mlp=0.25"
    spec = StudentSpec.parse(text)
    assert (spec.vision_hidden, spec.vision_heads, spec.vision_mlp) == (64, 4, 0.5)
    assert (spec.sam_hidden, spec.sam_decoder_mlp) == (64, 0.25)
    assert spec.name == "vh64-vn4-vm0.5-sh64-sm0.25"
    assert StudentSpec.parse(spec.text()) == spec
    tiny = STUDENT_PRESETS["demo-tiny"]
    assert StudentSpec.parse(tiny.text()) == tiny and StudentSpec.parse("demo-tiny") is tiny
    cfg = student_config(DEMO, tiny)
    # Vision: 64 wide, 4 heads, MLP 0.5 x the teacher's 384/96 = 4 -> 2 x 64 = 128 channels.
    v = cfg.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size) == (2, 64, 4, 128)
    assert v.fullatt_block_indexes == (1,) and v.out_hidden_size == 128  # the LLM's width
    # SAM2 prompt side 64 wide: decoder MLP 0.25 x 512/128 x 64 = 64, IoU head 128/128 x 64.
    s2 = cfg.sam2
    assert (s2.hidden_size, s2.decoder_mlp_dim, s2.iou_head_hidden_dim) == (64, 64, 64)
    assert s2.embed_dim_per_stage == DEMO.sam2.embed_dim_per_stage  # Hiera: the teacher's
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.intermediate_size) == (128, 2, 128)
    assert fresh_parts(DEMO, cfg) == (VISION_TOWER, *SAM_PROMPT_SIDE, "seg_projector.2.")
    assert fresh_parts(DEMO, student_config(DEMO, STUDENT_PRESETS["demo-small"])) == ()
    # Widths equal to the teacher's change nothing; a decoder MLP alone re-widens the decoder.
    same = StudentSpec(vision_hidden=96, sam_hidden=128, name="s")
    assert student_config(DEMO, same) == dataclasses.replace(DEMO, name="citrus-v-demo-s")
    mlp_only = student_config(DEMO, StudentSpec(sam_decoder_mlp=0.5))
    assert mlp_only.sam2.decoder_mlp_dim == 256 and fresh_parts(DEMO, mlp_only) == (MASK_DECODER,)
    heads = student_config(DEMO, StudentSpec(vision_heads=6))  # same shapes, other head split
    assert fresh_parts(DEMO, heads) == (VISION_TOWER,)
    for spec, words in [
        (StudentSpec(vision_hidden=60), "vision-hidden 60 / vision-heads 4: the head size"),
        (StudentSpec(vision_heads=5), "vision-hidden 96 / vision-heads 5"),
        (StudentSpec(sam_hidden=60), "sam-hidden 60: must be a multiple of 8"),
        (StudentSpec(sam_hidden=24), "sam-hidden 24: must be a multiple of 8 whose half the"),
    ]:
        # The 8B's mask decoder has 8 heads: 24 / 2 = 12 does not split into them.
        teacher_cfg = CITRUS_V_8B if spec.sam_hidden == 24 else DEMO
        with pytest.raises(StudentSpecError, match=words) as e:
            student_config(teacher_cfg, spec)
        assert "\n" not in str(e.value)


def test_demo_tiny_is_3x_smaller_with_the_teachers_llm_and_hiera(tmp_path):
    from citrus_edge.defaults import resolve_model
    from citrus_edge.modelling.checkpoint import load_checkpoint, save_checkpoint

    demo_dir = resolve_model(None)
    demo = load_checkpoint(demo_dir)
    student = make_student(demo, STUDENT_PRESETS["demo-tiny"])
    n, n_teacher = param_count(student), param_count(demo)
    print(f"demo-tiny: {n} of {n_teacher} parameters ({n_teacher / n:.3f}x fewer)")
    assert (n, n_teacher) == (1_027_105, 3_182_353)
    assert n_teacher / n >= 3.0
    ts, ss = demo.state_dict(), student.state_dict()
    fresh = fresh_parts(demo.config, student.config)
    inherited = [k for k in ss if not k.startswith(fresh)]
    # LLM layers 0,1 (MLP rows/columns Minitron-sliced), embeddings, lm_head, norm, Hiera
    # blocks 0,1,2,4, its embeddings, and the seg projector's input layer.
    for key in inherited:
        if ".mlp." in key and key.startswith(LLM):
            assert ss[key].shape != ts[key].shape and 128 in ss[key].shape, key
        elif key.startswith(HIERA):
            old = {"0": "0", "1": "1", "2": "2", "3": "4"}[key[len(HIERA)]]
            assert torch.equal(ss[key], ts[HIERA + old + key[len(HIERA) + 1 :]]), key
        else:
            assert torch.equal(ss[key], ts[key]), key
    assert "seg_projector.0.weight" in inherited and "mllm.lm_head.weight" in inherited
    n_fresh = sum(v.numel() for k, v in student.named_parameters() if k.startswith(fresh))
    # Vision tower 257,344; neck 15,616, prompt encoder 1,804, mask decoder 151,765,
    # no-memory embedding 64; seg projector output 8,256.
    assert n_fresh == 434_849
    # The fresh parts are the student's own seeded init: the same twice, another with a seed.
    again = make_student(demo, STUDENT_PRESETS["demo-tiny"]).state_dict()
    other = make_student(demo, STUDENT_PRESETS["demo-tiny"], seed=1).state_dict()
    key = VISION_TOWER + "merger.mlp.0.weight"
    assert torch.equal(again[key], ss[key]) and not torch.equal(other[key], ss[key])
    # An ordinary checkpoint: saved and loaded back tensor for tensor.
    save_checkpoint(student, tmp_path / "tiny", tokenizer_json=demo_dir / "tokenizer.json")
    loaded = load_checkpoint(tmp_path / "tiny")
    assert loaded.config == student.config
    lo = loaded.state_dict()
    assert lo.keys() == ss.keys() and all(torch.equal(lo[k], ss[k]) for k in ss)


def test_a_width_change_outside_the_fresh_parts_is_refused(teacher, monkeypatch):
    import citrus_edge.modelling.student as student_mod

    spec = StudentSpec(sam_hidden=16, name="narrow")  # TINY's SAM2 is 32 wide
    assert make_student(teacher, spec).config.sam2.hidden_size == 16
    monkeypatch.setattr(student_mod, "fresh_parts", lambda t, s: ())  # nothing may be fresh
    with pytest.raises(RuntimeError, match="teacher weights do not fit"):
        make_student(teacher, spec)


def test_student_config_checks_the_teacher():
    for spec, words in [
        (StudentSpec(llm_layers=(0, 2)), "llm-layers [2] out of range; the teacher has 2"),
        (StudentSpec(vision_blocks=(5,)), "vision-blocks [5] out of range"),
        (StudentSpec(hiera_blocks=(1, 1, 3, 1)), "stage 2: 3 > 2"),
    ]:
        with pytest.raises(StudentSpecError, match=words.replace("[", r"\[").replace("]", r"\]")):
            student_config(TINY, spec)
    # Full-attention remap: a kept full-attention block keeps its kind; none kept -> the last.
    assert student_config(TINY, StudentSpec(vision_blocks=(1,))).vision.fullatt_block_indexes == (
        0,
    )
    assert student_config(TINY, StudentSpec(vision_blocks=(0,))).vision.fullatt_block_indexes == (
        0,
    )
    cfg = student_config(DEMO, StudentSpec(vision_blocks=(0, 1, 2)))
    assert cfg.vision.fullatt_block_indexes == (1,)


# -- students built from the teacher --------------------------------------------------------
def test_student_keeping_everything_is_the_teacher(teacher, batch):
    student = make_student(teacher, StudentSpec())
    with torch.no_grad():
        diff = (language_forward(student, batch) - language_forward(teacher, batch)).abs().max()
        feats = zip(
            student.encode_image_sam(batch["sam_pixels"]),
            teacher.encode_image_sam(batch["sam_pixels"]),
            strict=True,
        )
        sam_diff = max((a - b).abs().max().item() for a, b in feats)
    assert diff.item() == 0.0 and sam_diff == 0.0
    ts, ss = teacher.state_dict(), student.state_dict()
    assert ts.keys() == ss.keys() and all(torch.equal(ts[k], ss[k]) for k in ts)
    # Copies: training the student leaves the teacher alone.
    with torch.no_grad():
        student.mllm.lm_head.weight.add_(1.0)
    assert not torch.equal(student.mllm.lm_head.weight, teacher.mllm.lm_head.weight)


def test_dropped_layer_student_holds_the_teachers_kept_weights(teacher, batch):
    spec = StudentSpec(llm_layers=(1,), vision_blocks=(1,), hiera_blocks=(1, 1, 1, 1))
    student = make_student(teacher, spec)
    assert student.config.text.num_layers == 1 and student.config.vision.depth == 1
    ts, ss = teacher.state_dict(), student.state_dict()
    # TINY Hiera (1,1,2,1): teacher blocks 0,1,2,4 kept (stage 2 loses its second block, 3).
    moves = [(LLM + "1.", LLM + "0."), (VIS + "1.", VIS + "0.")]
    moves += [(f"{HIERA}{o}.", f"{HIERA}{n}.") for o, n in ((0, 0), (1, 1), (2, 2), (4, 3))]
    checked = 0
    for key, value in ss.items():
        for new, old in ((n, o) for o, n in moves):
            if key.startswith(new):
                assert torch.equal(value, ts[old + key[len(new) :]]), key
                checked += 1
                break
        else:
            assert torch.equal(value, ts[key]), key  # embeddings, merger, SAM2 rest, projector
    # 12 tensors per LLM layer and vision block; Hiera blocks 12, 14 for a stage's first block
    # after stage 0 (its width-changing `proj`): blocks 0, 1, 2, 4 -> 12 + 3 * 14.
    assert checked == 12 + 12 + 12 + 3 * 14
    assert len(ss) == len(ts) - 12 - 12 - 12  # teacher LLM layer 0, vision block 0, Hiera 3
    with torch.no_grad():
        logits = language_forward(student, batch)
    assert torch.isfinite(logits).all()
    assert (logits - language_forward(teacher, batch)).abs().max().item() > 0


def test_mlp_pruning_identity_at_one_and_importance_beats_random(teacher, batch):
    same = make_student(teacher, StudentSpec(llm_mlp=1.0))
    ts = teacher.state_dict()
    assert all(torch.equal(v, ts[k]) for k, v in same.state_dict().items())
    half = StudentSpec(llm_mlp=0.5)
    with torch.no_grad():
        ref = language_forward(teacher, batch)

        def err(model) -> float:
            return (language_forward(model, batch) - ref).abs().mean().item()

        by_act = make_student(teacher, half, batches=[batch])
        by_weight = make_student(teacher, half)
        g = torch.Generator().manual_seed(0)
        rand = [
            err(
                make_student(
                    teacher,
                    half,
                    channels={i: torch.randperm(128, generator=g)[:64] for i in range(2)},
                )
            )  # fmt: skip
            for _ in range(5)
        ]
    assert by_act.config.text.intermediate_size == 64
    assert by_act.mllm.model.language_model.layers[0].mlp.down_proj.weight.shape == (64, 64)
    # Measured: activation-based 0.0151, weight-based 0.0170, random 0.0177..0.0192.
    assert err(by_act) < min(rand)
    assert err(by_weight) < sum(rand) / len(rand)
    # Kept channels are the teacher's rows, in the teacher's order.
    keep = mlp_importance(teacher, [batch])[0].topk(64).indices.sort().values
    up = teacher.mllm.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(by_act.mllm.model.language_model.layers[0].mlp.up_proj.weight, up[keep])


def test_student_save_load_round_trip(teacher, batch, tmp_path):
    from citrus_edge.modelling.checkpoint import load_checkpoint, save_checkpoint

    student = make_student(teacher, STUDENT_PRESETS["demo-small"].__class__(
        llm_layers=(0,), llm_mlp=0.5, vision_blocks=(1,), hiera_blocks=(1, 1, 1, 1), name="s"
    ))  # fmt: skip
    tok = tmp_path / "tokenizer.json"
    tiny_tokenizer().save(str(tok))
    save_checkpoint(student, tmp_path / "student", tokenizer_json=tok)
    loaded = load_checkpoint(tmp_path / "student")
    assert loaded.config == student.config and loaded.config.name == "citrus-v-tiny-s"
    a, b = student.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(language_forward(loaded, batch), language_forward(student, batch))


# -- layer importance -----------------------------------------------------------------------
def test_layer_importance_rows_and_choice(teacher, batch):
    rows = layer_importance(teacher, [batch])
    llm = [r for r in rows if r["part"] == "llm"]
    assert [r["index"] for r in llm] == [0, 1]
    assert len([r for r in rows if r["part"] == "vision"]) == 2
    hiera = [r for r in rows if r["part"] == "hiera"]
    assert len(hiera) == 5 and [r["droppable"] for r in hiera] == [False] * 3 + [True, False]
    for r in llm:
        assert all(math.isfinite(r[k]) for k in ("loss_increase", "kl", "block_influence"))
        assert r["kl"] >= 0 and 0 <= r["block_influence"] <= 2
    assert math.isfinite(hiera[3]["loss_increase"])
    top = max(llm, key=lambda r: r["loss_increase"])["index"]
    assert choose_layers(rows, 1) == (top,)
    assert choose_layers(rows, 2) == (0, 1)
    assert choose_layers(rows, 4, part="hiera") == (0, 1, 2, 4)  # stage openers always kept
    with pytest.raises(ValueError, match="keep 3 is not 1..2"):
        choose_layers(rows, 3)
    table = format_table(rows)
    assert len(table.splitlines()) == 1 + len(rows) and "loss_increase" in table


def test_a_vision_student_without_a_windowed_block_is_refused_in_one_line(tmp_path):
    """TINY's vision tower cut to its full-attention block ignores the window layout inputs;
    its export says so in one typed line before any graph is traced (it raised KeyError:
    'gather_index' after the LLM's export); a trace that drops a spec input anyway is refused
    by name."""
    from citrus_edge.export.export_manifest import random_source_hash
    from citrus_edge.export.export_run import export_all
    from citrus_edge.modelling.onnx_trace import UnexportableModelError

    student = make_student(tiny_model(), StudentSpec(vision_blocks=(1,)))
    with pytest.raises(UnexportableModelError, match="every vision block is full-attention"):
        export_all(student, tmp_path / "x", source_hash=random_source_hash("s"))
    assert not (tmp_path / "x").exists()


def test_a_trace_that_drops_a_spec_input_is_refused_by_name():
    from types import SimpleNamespace

    import onnx

    from citrus_edge.modelling.onnx_trace import UnexportableModelError, _declare_shapes

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["a"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    t = lambda name: SimpleNamespace(name=name, dtype="float32", shape=(1,))  # noqa: E731
    spec = SimpleNamespace(component="vision", inputs=[t("a"), t("gather_index")], outputs=[t("y")])
    with pytest.raises(
        UnexportableModelError, match=r"vision: the traced graph has no \['gather_index'\]"
    ):
        _declare_shapes(graph, spec)


def test_vision_and_merger_mlps_are_minitron_pruned_at_the_teachers_width(teacher, batch, tmp_path):
    """At the teacher's vision width a narrower SwiGLU or merger MLP keeps the teacher's
    channels (no fresh tower), saves and loads back, and the planner counts it exactly."""
    from citrus_edge.cli.model_params import param_counts
    from citrus_edge.modelling.checkpoint import load_checkpoint, save_checkpoint
    from citrus_edge.modelling.distill import visual_loss
    from citrus_edge.modelling.student import vision_channels

    spec = StudentSpec.parse("vision-mlp=0.5;merger-mlp=0.25;name=vm")
    cfg = student_config(TINY, spec)
    tv = TINY.vision
    assert cfg.vision.intermediate_size == tv.intermediate_size // 2
    assert cfg.vision.merger_width == tv.merged_size // 4 and tv.merger_intermediate_size is None
    assert fresh_parts(TINY, cfg) == ()
    student = make_student(teacher, spec)
    kept = vision_channels(teacher, cfg)
    assert set(kept) == {*(f"block.{i}" for i in range(tv.depth)), "merger"}
    ts, ss = teacher.state_dict(), student.state_dict()
    m = VISION_TOWER + "merger.mlp."
    assert torch.equal(ss[m + "0.weight"], ts[m + "0.weight"][kept["merger"]])
    assert torch.equal(ss[m + "0.bias"], ts[m + "0.bias"][kept["merger"]])
    assert torch.equal(ss[m + "2.weight"], ts[m + "2.weight"][:, kept["merger"]])
    assert torch.equal(ss[m + "2.bias"], ts[m + "2.bias"])
    b = VISION_TOWER + "blocks.1.mlp."
    assert torch.equal(ss[b + "up_proj.weight"], ts[b + "up_proj.weight"][kept["block.1"]])
    assert torch.equal(ss[b + "down_proj.weight"], ts[b + "down_proj.weight"][:, kept["block.1"]])
    assert torch.equal(ss[VISION_TOWER + "patch_embed.proj.weight"],
                       ts[VISION_TOWER + "patch_embed.proj.weight"])  # fmt: skip
    # The pruned tower approximates the teacher's visual tokens better than the same widths
    # with random channels (normalised MSE; 1.0 = predicting zeros).
    from citrus_edge.modelling.train import llm_forward

    def tokens(model) -> torch.Tensor:
        with torch.no_grad():
            return llm_forward(model, batch)[0]

    ref = tokens(teacher)
    pruned = visual_loss(tokens(student), ref).item()
    g = torch.Generator().manual_seed(0)
    rand_ch = {k: torch.randperm(len(ts[m + "0.bias"]) if k == "merger" else tv.intermediate_size,
                                 generator=g)[: len(v)].sort().values for k, v in kept.items()}  # fmt: skip
    import citrus_edge.modelling.student as student_mod

    orig = student_mod.vision_channels
    student_mod.vision_channels = lambda *_: rand_ch
    try:
        randomly = visual_loss(tokens(make_student(teacher, spec)), ref).item()
    finally:
        student_mod.vision_channels = orig
    print(f"visual-token error: pruned {pruned:.4f}, random channels {randomly:.4f}")
    assert pruned < randomly and pruned < 1.0
    # An ordinary checkpoint: the merger width is in its config.json, the teacher's has none.
    tok = tmp_path / "tokenizer.json"
    tiny_tokenizer().save(str(tok))
    save_checkpoint(student, tmp_path / "s", tokenizer_json=tok)
    assert (
        '"merger_intermediate_size": ' + str(cfg.vision.merger_width)
        in (tmp_path / "s" / "config.json").read_text()
    )
    assert "merger_intermediate_size" not in str(TINY.to_dict())
    loaded = load_checkpoint(tmp_path / "s")
    assert loaded.config == student.config
    assert torch.equal(tokens(loaded), tokens(student))
    assert sum(c.total for c in param_counts(cfg).values()) == param_count(student)


def test_demo_lite_keeps_the_teachers_vision_tower_pruned_and_is_3x_smaller():
    from citrus_edge.defaults import resolve_model
    from citrus_edge.modelling.checkpoint import load_checkpoint

    demo = load_checkpoint(resolve_model(None))
    lite = make_student(demo, STUDENT_PRESETS["demo-lite"])
    n = param_count(lite)
    print(f"demo-lite: {n} of {param_count(demo)} parameters ({param_count(demo) / n:.3f}x)")
    assert n == 1_046_465 and param_count(demo) / n >= 3.0
    v = lite.config.vision
    assert (v.hidden_size, v.num_heads, v.intermediate_size, v.merger_width) == (96, 4, 96, 64)
    # Only the SAM2 prompt side (64 wide) is fresh; the vision tower is the teacher's, pruned.
    assert fresh_parts(demo.config, lite.config) == (*SAM_PROMPT_SIDE, "seg_projector.2.")


def test_a_student_of_a_pruned_teacher_keeps_or_prunes_the_teachers_own_merger_width():
    """merger-mlp is a fraction of the teacher's merger (the shipped demo-lite's is 64 wide):
    1.0 keeps it, 0.5 halves it; neither asks for channels the teacher does not have."""
    from citrus_edge.defaults import SHIPPED_MODELS
    from citrus_edge.modelling.checkpoint import load_checkpoint

    lite = load_checkpoint(SHIPPED_MODELS["demo-lite"])
    same = student_config(lite.config, StudentSpec(llm_layers=(0,), name="l0"))
    assert same.vision.merger_width == 64 and same.vision.merger_intermediate_size == 64
    half = make_student(lite, StudentSpec(merger_mlp=0.5, name="m"))
    assert half.config.vision.merger_width == 32
    assert half.mllm.model.visual.merger.mlp[0].weight.shape == (32, 384)
    assert fresh_parts(lite.config, half.config) == ()
    # Back to a full-width merger: the config says nothing (Qwen2.5-VL's own width).
    assert student_config(DEMO, StudentSpec(merger_mlp=1.0)).vision.merger_intermediate_size is None


# -- a narrower Hiera (hiera-width) ------------------------------------------------------------
def test_hiera_width_parses_and_sets_each_stage_to_a_multiple_of_its_heads():
    spec = StudentSpec.parse("hiera=1,1,1,1;hiera-width=0.5")
    assert spec.hiera_width == 0.5 and spec.name == "h1.1.1.1-hw0.5"
    assert StudentSpec.parse(spec.text()) == spec
    assert student_config(DEMO, spec).sam2.embed_dim_per_stage == (8, 16, 32, 64)
    # heads (1, 1, 2, 4): 0.3 of (16, 32, 64, 128) rounds to a multiple of each stage's heads
    assert student_config(DEMO, StudentSpec(hiera_width=0.3)).sam2.embed_dim_per_stage == (
        5, 10, 20, 40,
    )  # fmt: skip
    # The 8B's Hiera-S students: Hiera-L's 144..1152 channels to Hiera-S's 96..768.
    for name in ("8b-hiera-s", "8b-edge"):
        s2 = student_config(CITRUS_V_8B, STUDENT_PRESETS[name]).sam2
        assert s2.embed_dim_per_stage == (96, 192, 384, 768)
        assert s2.heads_per_stage == CITRUS_V_8B.sam2.heads_per_stage
    for bad in ("hiera-width=0", "hiera-width=1.5", "hiera-width=half"):
        with pytest.raises(StudentSpecError, match="hiera-width"):
            StudentSpec.parse(bad)


def test_hiera_width_prunes_the_teachers_encoder_by_activation_better_than_at_random(tmp_path):
    """A half-width Hiera of the demo model keeps the teacher's weights (sliced), not a fresh
    encoder: its SAM2 image embeddings on unseen phantoms stay closer to the teacher's than a
    random choice of residual channels does; it is an ordinary checkpoint, and the planner's
    parameter count (torch-free) is the model's."""
    from citrus_edge.cli.model_params import param_counts
    from citrus_edge.defaults import resolve_model
    from citrus_edge.modelling.checkpoint import load_checkpoint, save_checkpoint
    from citrus_edge.modelling.student import hiera_channels, hiera_images

    demo = load_checkpoint(resolve_model(None))
    spec = StudentSpec(hiera_width=0.5, name="hw")
    cfg = student_config(demo.config, spec)
    images = hiera_images(demo.config, 12)[8:]  # phantoms the ranking (seeds 0..7) never saw

    def embeddings(model) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_image_sam(images)[2].flatten(1)

    ref = embeddings(demo)
    same = make_student(demo, StudentSpec(hiera_width=1.0, name="same"))
    assert torch.equal(embeddings(same), ref)  # full width: the teacher's function exactly
    student = make_student(demo, spec)
    assert fresh_parts(demo.config, cfg) == ()  # nothing re-initialised
    kept = hiera_channels(demo, cfg)
    bb = demo.sam2.vision_encoder.backbone.blocks
    sb = student.sam2.vision_encoder.backbone.blocks
    # Block 4 opens stage 3 (64 -> 128 channels, 4 heads): its MLP's first matrix is the
    # teacher's at the kept hidden and stage-3 channels; its attention reads stage 2's.
    w = bb[4].mlp.proj_in.weight[kept["block.4.mlp"]][:, kept["stage.3"]]
    assert torch.equal(sb[4].mlp.proj_in.weight, w)
    qkv, qk, s2 = bb[4].attn.qkv.weight, kept["block.4.qk"], kept["stage.2"]
    # queries rescaled by sqrt(kept / teacher head size) = sqrt(16 / 32); keys as they were
    assert torch.allclose(sb[4].attn.qkv.weight[:64], qkv[qk][:, s2] * 0.5**0.5)
    assert torch.equal(sb[4].attn.qkv.weight[64:128], qkv[128 + qk][:, s2])

    # The ranking, on three quarters of the channels: closer to the teacher than random choices
    # of the residual channels (mean of four draws; at half width the two are alike).
    quarters = StudentSpec(hiera_width=0.75, name="hw75")
    kept75 = hiera_channels(demo, student_config(demo.config, quarters))
    cos = (
        torch.nn.functional.cosine_similarity(embeddings(make_student(demo, quarters)), ref)
        .mean()
        .item()
    )
    import citrus_edge.modelling.student as student_mod

    orig, randomly = student_mod.hiera_channels, []
    try:
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            widths = demo.config.sam2.embed_dim_per_stage
            rand_ch = {
                k: torch.randperm(widths[int(k[-1])], generator=g)[: len(v)].sort().values
                if k.startswith("stage.")
                else v
                for k, v in kept75.items()
            }
            student_mod.hiera_channels = lambda *_, ch=rand_ch: ch
            emb = embeddings(make_student(demo, quarters))
            randomly.append(torch.nn.functional.cosine_similarity(emb, ref).mean().item())
    finally:
        student_mod.hiera_channels = orig
    print(f"SAM2 image embeddings vs the teacher's (cosine): ranked {cos:.3f}, random {randomly}")
    assert cos > sum(randomly) / len(randomly) + 0.03 and cos > 0.75

    n = param_count(student)
    assert sum(c.total for c in param_counts(cfg).values()) == n
    print(f"half-width Hiera: {n} of {param_count(demo)} parameters")
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes((resolve_model(None) / "tokenizer.json").read_bytes())
    save_checkpoint(student, tmp_path / "s", tokenizer_json=tok)
    loaded = load_checkpoint(tmp_path / "s")
    assert loaded.config.sam2.embed_dim_per_stage == (8, 16, 32, 64)
    assert torch.equal(embeddings(loaded), embeddings(student))


def test_prune_student_script_writes_a_checkpoint_and_refuses_bad_input(tmp_path, capsys):
    """scripts/prune_student.py: the student of any checkpoint (here a TINY model at half its
    Hiera width), an ordinary checkpoint; bad input is one line, nothing written."""
    import importlib.util
    from pathlib import Path

    from fixtures import tiny_tokenizer

    from citrus_edge.modelling.checkpoint import load_checkpoint, save_checkpoint

    script = Path(__file__).resolve().parents[1] / "scripts" / "prune_student.py"
    spec = importlib.util.spec_from_file_location("prune_student", script)
    prune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prune)
    tok = tmp_path / "tokenizer.json"
    tiny_tokenizer().save(str(tok))
    source = tiny_model(seed=0)
    save_checkpoint(source, tmp_path / "src", tokenizer_json=tok)
    assert prune.main([str(tmp_path / "src"), "hiera-width=0.5;name=hw", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    student = load_checkpoint(tmp_path / "s")
    assert f"{param_count(student):,} parameters (from {param_count(source):,})" in out
    widths = TINY.sam2.embed_dim_per_stage
    assert student.config.sam2.embed_dim_per_stage == tuple(w // 2 for w in widths)
    assert (tmp_path / "s" / "tokenizer.json").read_bytes() == tok.read_bytes()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a checkpoint")
    for argv, what in (
        ([str(tmp_path / "src"), "hiera-width=2", str(tmp_path / "t")], "StudentSpecError"),
        ([str(tmp_path / "nowhere"), "hiera-width=0.5", str(tmp_path / "t")], "no config.json"),
        ([str(tmp_path / "src"), "hiera-width=0.5", str(tmp_path / "mine")], "refusing"),
    ):
        assert prune.main(argv) == 1
        err = capsys.readouterr().err
        assert what in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists() and os.listdir(tmp_path / "mine") == ["notes.txt"]
