"""Random-weights slices of a preset (citrus_edge.modelling.slice), the Qwen stand-in tokenizer, and the
one-copy checkpoint save/load they rely on. Fast: TINY widths, the 8B only as a config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import random_rgb, tiny_model

from citrus_edge.cli.model_params import param_counts
from citrus_edge.config import CITRUS_V_8B, QWEN_TOKENS, TINY
from citrus_edge.modelling.slice import (
    SliceConfig,
    SliceError,
    hiera_global_blocks,
    write_random_checkpoint,
)


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run `citrus-edge ARGV` through the real entry point: (exit code, stderr)."""
    from citrus_edge.cli import entry

    try:
        entry(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


PROBE = SliceConfig(
    "citrus-v-8b", llm_layers=1, vision_blocks=2, full_attention=(1,), hiera_blocks=(1, 2, 3, 1)
)


def test_8b_probe_slice_config_has_the_8b_widths_and_1_45_b_parameters():
    cfg = PROBE.model_config()
    assert cfg.text.num_layers == 1 and cfg.vision.depth == 2
    assert cfg.vision.fullatt_block_indexes == (1,)
    assert cfg.sam2.blocks_per_stage == (1, 2, 3, 1)
    assert cfg.sam2.global_attention_blocks == (4, 5)  # stage 3 (blocks 3-5), never its first
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads"):
        assert getattr(cfg.text, field) == getattr(CITRUS_V_8B.text, field)
    assert cfg.vision.hidden_size == 1280 and cfg.sam2.embed_dim_per_stage[-1] == 1152
    assert cfg.tokens == QWEN_TOKENS and cfg.preprocess == CITRUS_V_8B.preprocess
    total = sum(c.total for c in param_counts(cfg).values())
    assert total == 1_452_694_945  # the probe: 1.45 B parameters
    assert cfg.name == "citrus-v-8b-slice-l1-v2f1-h1.2.3.1"


def test_hiera_global_blocks_keep_the_preset_at_its_own_depths():
    s = CITRUS_V_8B.sam2
    assert hiera_global_blocks(s, s.blocks_per_stage) == (23, 33, 43)
    assert hiera_global_blocks(s, (1, 1, 1, 1)) == ()  # a one-block stage has no room


def test_default_full_attention_is_the_presets_below_depth_else_the_last_block():
    assert SliceConfig(
        "citrus-v-8b", vision_blocks=16
    ).model_config().vision.fullatt_block_indexes == (7, 15)
    assert SliceConfig(
        "citrus-v-8b", vision_blocks=3
    ).model_config().vision.fullatt_block_indexes == (2,)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"preset": "citrus-v-9b"}, "unknown preset"),
        ({"vision_blocks": 2, "full_attention": (2,)}, r"full-attention blocks \[2\]"),
        ({"hiera_blocks": (1, 2, 3)}, "hiera_blocks must be 4"),
        ({"llm_layers": 0}, "llm_layers must be 1 or more"),
    ],
)
def test_bad_slices_are_refused(kw, match):
    with pytest.raises(SliceError, match=match):
        SliceConfig(**{"preset": "citrus-v-8b", **kw})


def test_qwen_standin_tokenizer_has_qwens_special_ids_and_the_8b_vocab():
    from citrus_edge.modelling.tokenizer_training import build_qwen_standin_tokenizer
    from citrus_edge.prompts import encode_user_text, prompt_ids
    from citrus_edge.tokenizer import QWEN_SPECIALS

    tok = build_qwen_standin_tokenizer()
    assert tok.get_vocab_size() == CITRUS_V_8B.text.vocab_size == 151_668
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|box_start|>": 151648,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
        "<|file_sep|>": 151664,
        "[SEG]": 151665,
    }
    assert {k: tok.token_to_id(k) for k in expected} == expected
    assert len(QWEN_SPECIALS) == 25  # ids 151643..151667
    t = QWEN_TOKENS
    assert (t.seg, t.image, t.vision_start, t.vision_end, t.eos, t.pad) == (
        151665,
        151655,
        151652,
        151653,
        151645,
        151643,
    )
    ids = prompt_ids(tok, "Please help segment the lesion in this scan.", 20)
    assert (ids == t.image).sum() == 20
    assert ids[0] == 151644 and ids.tolist().count(t.vision_start) == 1
    assert ids.tolist().count(t.vision_end) == 1 and ids.tolist().count(151645) == 2
    typed = encode_user_text(tok, "[SEG] <|im_end|> 12 mm")
    assert max(typed) < 151643  # typed control tokens stay plain text
    assert tok.decode(typed) == "[SEG] <|im_end|> 12 mm"


def test_cli_writes_a_tiny_slice_that_loads_with_its_depths(tmp_path, capsys):
    from citrus_edge.modelling.checkpoint import load_checkpoint
    from citrus_edge.tokenizer import load_tokenizer

    out = tmp_path / "slice"
    args = ["model", "slice", "--preset", "citrus-v-tiny", "--llm-layers", "1"]
    args += ["--vision-blocks", "3", "--full-attention", "0,2", "--hiera-blocks", "1,1,3,1"]
    code, err = cli(capsys, *args, "--out", str(out))
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "citrus-v-tiny-slice-l1-v3f0.2-h1.1.3.1"
    model = load_checkpoint(out)
    assert len(model.mllm.model.language_model.layers) == 1
    assert len(model.mllm.model.visual.blocks) == 3
    assert model.config.vision.fullatt_block_indexes == (0, 2)
    assert model.config.sam2.blocks_per_stage == (1, 1, 3, 1)
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(c.total for c in param_counts(model.config).values())
    tok = load_tokenizer(out)
    assert tok.token_to_id("[SEG]") == model.config.tokens.seg
    # Same seed, same weights: a second write over our own checkpoint is allowed and equal.
    before = (out / "model.safetensors").read_bytes()
    assert cli(capsys, *args, "--out", str(out))[0] == 0
    assert (out / "model.safetensors").read_bytes() == before


def test_cli_refuses_a_folder_it_did_not_write_before_making_weights(tmp_path, monkeypatch, capsys):
    from citrus_edge.modelling import slice as slice_mod

    (tmp_path / "notes.txt").write_text("a user's file")
    called = []
    monkeypatch.setattr(slice_mod, "write_slice", lambda *a: called.append(a))
    code, err = cli(capsys, "model", "slice", "--preset", "citrus-v-tiny", "--out", str(tmp_path))
    assert code == 1 and "error: CheckpointError: refusing to replace" in err
    assert called == [] and (tmp_path / "notes.txt").read_text() == "a user's file"
    code, err = cli(capsys, "model", "slice", "--hiera-blocks", "1,x", "--out", str(tmp_path / "n"))
    assert code == 2 and "'1,x': expected 4 block counts" in err
    code, err = cli(capsys, "model", "slice", "--hiera-blocks", "1,2", "--out", str(tmp_path / "n"))
    assert code == 1 and "hiera_blocks must be 4 numbers" in err and called == []


def test_tiny_with_the_qwen_vocabulary_runs_the_reference_and_the_fp32_runtime(tmp_path):
    """The stand-in tokenizer at the 8B's 151,668 ids, through export and the runtime."""
    from citrus_edge.bundle import write_manifest
    from citrus_edge.export import export_all
    from citrus_edge.modelling.reference import ReferencePipeline
    from citrus_edge.runtime.pipeline import Pipeline

    cfg = dataclasses.replace(
        TINY,
        name="tiny-qwen-vocab",
        tokens=QWEN_TOKENS,
        text=dataclasses.replace(TINY.text, vocab_size=151_668),
    )
    ckpt = write_random_checkpoint(cfg, tmp_path / "ckpt", seed=3)
    ref = ReferencePipeline.from_checkpoint(ckpt, max_new_tokens=6)
    export_all(
        ref.model,
        tmp_path / "bundle",
        source_hash="random:tiny-qwen-vocab",
        tokenizer_json=ckpt / "tokenizer.json",
    )
    write_manifest(tmp_path / "bundle", {})  # an export + manifest is a runnable fp32 bundle
    run = Pipeline.from_bundle(tmp_path / "bundle", max_new_tokens=6)
    prompt = "Please help segment the lesion in this scan."
    for seed in range(2):
        rgb = random_rgb(180 + 40 * seed, 240, seed=seed)
        a, b = ref(rgb, prompt), run(rgb, prompt)
        assert len(a.token_ids) == 6 and a.token_ids == b.token_ids


def test_state_dict_official_shares_the_models_tensors():
    from citrus_edge.modelling.checkpoint import MLLM, state_dict_official

    model = tiny_model()
    sd = state_dict_official(model)
    head = model.mllm.lm_head.weight
    assert sd[MLLM + "lm_head.weight"].data_ptr() == head.data_ptr()  # no second copy
    ptrs = [v.untyped_storage().data_ptr() for v in sd.values()]
    assert len(set(ptrs)) == len(ptrs)  # safetensors stores no shared tensors


def test_load_checkpoint_builds_no_random_weights(tmp_path, monkeypatch):
    from citrus_edge.modelling import checkpoint
    from citrus_edge.modelling.model import CitrusV

    checkpoint.save_checkpoint(tiny_model(), tmp_path / "ckpt")
    devices = []

    class Recording(CitrusV):
        def __init__(self, cfg):
            super().__init__(cfg)
            devices.extend({p.device.type for p in self.parameters()})

    monkeypatch.setattr(checkpoint, "CitrusV", Recording)
    model = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert devices == ["meta"]  # parameters were never allocated before the checkpoint's
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}
    ref = tiny_model()
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(ref.parameters(), model.parameters(), strict=True)
    )
    assert diff == 0.0
    assert np.isfinite(model.mllm.lm_head.weight.detach().numpy()).all()
    assert isinstance(model.mllm.lm_head.weight, torch.nn.Parameter)


def test_external_weights_are_streamed_into_one_aligned_data_file(tmp_path):
    """The >2 GiB path: the exporter's one-file-per-tensor raw folder becomes `<graph>.onnx.data`
    without loading the weights; the saved graph gives the same tensors and passes the checker."""
    import onnx
    from onnx import helper, numpy_helper

    from citrus_edge.export.graph import ALIGN, _save_graph

    rng = np.random.default_rng(0)
    w, nodes, x = {}, [], "x"
    for i in range(3):  # x [1, 33] @ w0 [33, 20] @ w1 [20, 21] @ w2 [21, 22]
        w[f"w{i}"] = rng.standard_normal((33 if i == 0 else 20 + i - 1, 20 + i)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 33])],
        [helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [1, 22])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    raw = tmp_path / "raw"
    raw.mkdir()
    onnx.save_model(
        model,
        str(raw / "g.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(raw.iterdir())) == 4  # the graph + one file per tensor, as torch writes them
    proto = onnx.load(str(raw / "g.onnx"), load_external_data=False)
    (tmp_path / "out").mkdir()
    files = _save_graph(proto, tmp_path / "out" / "g.onnx", external=True, raw_dir=raw)
    assert [f.name for f in files] == ["g.onnx", "g.onnx.data"]
    loaded = onnx.load(str(files[0]))
    for t in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), w[t.name])
    offsets = [
        int(e.value) for t in proto.graph.initializer for e in t.external_data if e.key == "offset"
    ]
    assert len(offsets) == 3 and all(o % ALIGN == 0 for o in offsets)
    size = (tmp_path / "out" / "g.onnx").stat().st_size
    assert size < 1000  # the graph file holds no weights


def test_export_with_released_weights_writes_the_same_graphs(tmp_path):
    """`release_weights`: the same graphs and table, validated as closely, and the exported
    parts of the model freed (what keeps a real-width export's peak memory down)."""
    from citrus_edge.export import export_all

    kept, freed = tiny_model(), tiny_model()
    a = export_all(kept, tmp_path / "a", source_hash="random:t")
    b = export_all(freed, tmp_path / "b", source_hash="random:t", release_weights=True)
    for name in ("llm.onnx", "vision.onnx", "sam_encoder.onnx", "mask_decoder.onnx"):
        assert a["files"][name] == b["files"][name]  # sha256: identical graphs
    assert a["files"]["embeddings.npy"] == b["files"]["embeddings.npy"]
    for name, g in a["graphs"].items():
        assert b["graphs"][name]["max_abs_error"] == g["max_abs_error"]
    lm = freed.mllm.model.language_model
    assert lm.embed_tokens.weight.numel() == 0 and freed.mllm.lm_head.weight.numel() == 0
    assert all(p.numel() == 0 for p in freed.mllm.model.visual.parameters())
    assert all(p.numel() == 0 for p in freed.sam2.vision_encoder.parameters())
    left = sum(p.numel() for p in freed.parameters())
    total = sum(p.numel() for p in kept.parameters())
    assert 0 < left < 0.2 * total  # only the mask decoder's side is still held


def _axis_values(spec, feeds) -> dict[str, int]:
    """Named-axis sizes of `feeds`, read through the graph spec's input shapes."""
    values: dict[str, int] = {}
    for t in spec.inputs:
        for dim, size in zip(t.shape, feeds[t.name].shape, strict=True):
            if isinstance(dim, str):
                assert values.setdefault(dim, size) == size, (t.name, dim)
            else:
                assert dim == size, (t.name, dim, size)
    return values


def _check_in(profile, values: dict[str, int], what) -> None:
    for axis, size in values.items():
        r = profile.range(axis)
        assert r.min <= size <= r.max, (what, axis, size, r)


def test_the_runtimes_feeds_fit_the_engine_profiles_of_the_8b_slice_on_orin():
    """Vision and LLM feeds, built by the runtime's own functions for a spread of image sizes,
    lie inside the TensorRT optimization profiles the engine plan builds (8B widths)."""
    from citrus_edge.engines.profiles import ProfileConfig, axis_profiles
    from citrus_edge.export.export_config import ExportConfig
    from citrus_edge.export.graph import get_component
    from citrus_edge.host_inputs import llm_prefill_inputs, vision_inputs
    from citrus_edge.modelling.tokenizer_training import build_qwen_standin_tokenizer
    from citrus_edge.preprocess import qwen_pixels
    from citrus_edge.prompts import ContextLimit, n_image_tokens, prompt_ids
    from citrus_edge.targets import get_target

    cfg, target, pc = PROBE.model_config(), get_target("orin-agx-64"), ProfileConfig()
    (vision_profile,) = axis_profiles("vision", target, cfg, pc)
    prefill, decode = axis_profiles("llm", target, cfg, pc)
    vspec = get_component("vision").spec(cfg, ExportConfig())
    lspec = get_component("llm").spec(cfg, ExportConfig())
    tok = build_qwen_standin_tokenizer()
    t = cfg.text
    table = np.broadcast_to(np.zeros(1, np.float32), (t.vocab_size, t.hidden_size))
    ctx, new = pc.context(cfg), 96
    rng = np.random.default_rng(0)
    sizes = [(28, 28), (28, 5600), (4000, 3000), (480, 640), (1080, 1920)]
    sizes += [tuple(int(v) for v in rng.integers(28, 2500, 2)) for _ in range(25)]
    checked, units = 0, set()
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        qp = qwen_pixels(np.zeros((h, w, 3), np.uint8), cfg.preprocess)
        max_h, max_w = target.resolution.max_hw
        if qp.resized_hw[0] > max_h or qp.resized_hw[1] > max_w:
            continue  # outside the target's image box: the planner refuses it
        feeds = vision_inputs(qp.pixel_values, qp.grid_thw, cfg.vision)
        _check_in(vision_profile, _axis_values(vspec, feeds), (h, w))
        n_img = n_image_tokens(qp.grid_thw, cfg.vision.spatial_merge_size)
        units.add(n_img)
        ids = prompt_ids(tok, "Please help segment the lesion in this scan.", n_img)
        ContextLimit(t.max_position_embeddings, ctx, new)  # the runtime's cap: prompt + new
        assert len(ids) + new <= ctx
        image = np.zeros((n_img, t.hidden_size), np.float32)
        llm, _ = llm_prefill_inputs(ids, table, cfg, image, [qp.grid_thw])
        _check_in(prefill, _axis_values(lspec, llm), (h, w))
        last_step = {"batch": 1, "seq": 1, "past": len(ids) + new - 2, "total": len(ids) + new - 1}
        _check_in(decode, last_step, (h, w))
        checked += 1
    assert checked >= 20 and max(units) <= 84  # 65535-pixel budget: at most 84 image tokens


def test_a_large_lm_head_is_exported_in_vocabulary_slices(tmp_path, monkeypatch):
    """No single graph weight over MAX_TENSOR_BYTES (the 8B's head is 2.2 GB, over protobuf's
    2 GiB), with the logits validated against the stock lm_head as before."""
    import onnx
    from onnx import numpy_helper

    from citrus_edge.export.graph import export_component
    from citrus_edge.modelling import export_wrappers as llm

    model = tiny_model()
    head = model.mllm.lm_head.weight  # [512, 64] fp32: 128 KiB
    monkeypatch.setattr(llm, "MAX_TENSOR_BYTES", 50_000)  # -> 3 slices of <= 171 rows
    r = export_component("llm", model, tmp_path, source_hash="random:t")
    assert r.max_abs < 1e-4
    proto = onnx.load(str(r.onnx_path))
    big = [t for t in proto.graph.initializer if numpy_helper.to_array(t).nbytes > 50_000]
    assert big == []
    # The slices, as the exporter stored them ([rows, 64], or [64, rows] once transposed).
    parts = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    parts = [p if p.shape[1] == 64 else p.T for p in parts if p.ndim == 2 and 64 in p.shape]
    parts = [p for p in parts if p.shape[0] in (170, 171)]
    assert [p.shape[0] for p in parts] == [171, 171, 170]
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(joined, head.detach().numpy())


def test_a_graph_over_the_external_threshold_is_exported_at_opset_20(tmp_path):
    """Graphs too large to version-convert in memory come out at the opset INT4 tools need to
    reach without conversion; the manifest states the opset the file declares."""
    from citrus_edge.export.export_config import ExportConfig
    from citrus_edge.export.graph import LARGE_GRAPH_OPSET, export_component, graph_opset

    assert graph_opset(17, external=False) == 17 and graph_opset(17, external=True) == 20
    cfg = ExportConfig(external_data_bytes=1)  # every graph "large"
    r = export_component("llm", tiny_model(), tmp_path, source_hash="random:t", export_cfg=cfg)
    manifest = json.loads(r.manifest_path.read_text())
    assert manifest["opset"] == LARGE_GRAPH_OPSET == 20
    assert manifest["external_data"]["file"] == "llm.onnx.data" and r.max_abs < 1e-4


def test_read_safetensors_matches_safetensors_and_refuses_a_truncated_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from citrus_edge.modelling.checkpoint import CheckpointError, read_safetensors

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.tensor([True, False, True]),
        "e": torch.randn(2, 2).half(),
        "s": torch.tensor(2.5),
    }
    f = tmp_path / "t.safetensors"
    save_file(tensors, str(f))
    got, want = read_safetensors(f), load_file(str(f))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="truncated at"):
        read_safetensors(f)


def test_build_frees_the_pytorch_reference_before_it_opens_the_bundle(
    tiny_checkpoint, small_phantom_set, tmp_path, monkeypatch
):
    """Accuracy at build time holds the torch weights or the bundle's, never both at once."""
    import gc
    import weakref

    from citrus_edge.cli.bundle_build import BuildConfig, build
    from citrus_edge.modelling.reference import ReferencePipeline
    from citrus_edge.runtime.pipeline import Pipeline

    models, alive = [], []
    from_checkpoint, from_bundle = ReferencePipeline.from_checkpoint, Pipeline.from_bundle

    def tracked(path, **kw):
        ref = from_checkpoint(path, **kw)
        models.append(weakref.ref(ref.model))
        return ref

    def opening(*a, **kw):
        gc.collect()
        alive.append([m() is not None for m in models])
        return from_bundle(*a, **kw)

    monkeypatch.setattr(ReferencePipeline, "from_checkpoint", staticmethod(tracked))
    monkeypatch.setattr(Pipeline, "from_bundle", staticmethod(opening))
    cfg = BuildConfig(
        target="cpu",
        model_dir=tiny_checkpoint,
        recipe="fp32",
        eval_data=small_phantom_set,
        eval_limit=2,
    )
    manifest = build(cfg, tmp_path / "bundle")
    assert alive == [[False]]  # one reference made, and gone when the bundle opened
    assert manifest["accuracy"]["vs_fp32"]["token_agreement"] == 1.0


def test_released_weights_are_freed_before_onnx_runtime_opens_the_graph(tmp_path, monkeypatch):
    """With `release_weights`, PyTorch's outputs are computed first and the component's torch
    weights freed before ONNX Runtime loads its graph: the weights and the session's copy are
    never held together (the 8B's LLM would need 2 x 28 GB in fp32)."""
    from citrus_edge.export import export_all
    from citrus_edge.export import validate as validate_mod

    model = tiny_model()
    lm = model.mllm.model.language_model
    parts = {
        "llm": [lm.layers, model.mllm.lm_head],
        "sam_encoder": [model.sam2.vision_encoder],
        "vision": [model.mllm.model.visual],
    }
    held_at_open: dict[str, int] = {}
    real = validate_mod.cpu_session

    def spy(path):
        name = Path(path).stem
        held_at_open[name] = sum(p.numel() for m in parts.get(name, []) for p in m.parameters())
        return real(path)

    monkeypatch.setattr(validate_mod, "cpu_session", spy)
    manifest = export_all(model, tmp_path / "x", source_hash="random:t", release_weights=True)
    assert held_at_open == {"llm": 0, "sam_encoder": 0, "mask_decoder": 0, "vision": 0}
    assert all(g["max_abs_error"] < 1e-4 for g in manifest["graphs"].values())
