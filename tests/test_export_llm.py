"""The LLM step graph: prefill and decode in ONNX Runtime, and a torch-free greedy loop that gives
exactly the reference pipeline's tokens and `[SEG]` states."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures import CORPUS, random_rgb, tiny_model, tiny_tokenizer

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from citrus_edge import host_inputs as H  # noqa: E402
from citrus_edge.component_specs import llm_spec  # noqa: E402
from citrus_edge.export.embedding_table import write_embeddings  # noqa: E402
from citrus_edge.export.export_config import ExportConfig  # noqa: E402
from citrus_edge.export.export_manifest import sha256_file  # noqa: E402
from citrus_edge.export.graph import export_component  # noqa: E402
from citrus_edge.modelling.export_references import llm_reference  # noqa: E402
from citrus_edge.modelling.reference import ReferencePipeline  # noqa: E402
from citrus_edge.preprocess import qwen_pixels  # noqa: E402
from citrus_edge.prompts import n_image_tokens, prompt_ids  # noqa: E402

ATOL = 1e-4
MAX_NEW = 12
CASES = [  # (image h, w, seed, prompt)
    (200, 260, 0, CORPUS[0]),
    (240, 180, 1, CORPUS[5]),
    (150, 150, 2, CORPUS[3]),
]


def seg_model():
    """TINY whose `[SEG]` row of lm_head is the row of a token it emits, scaled by 1.05.

    Wherever that token wins with a positive logit, `[SEG]` now wins instead, so a random model
    emits `[SEG]` (and its state is tested) while decoding stays deterministic.
    """
    model = tiny_model()
    pipe = ReferencePipeline(
        model, tiny_tokenizer(), max_new_tokens=MAX_NEW, constrained_decoding=False
    )
    h, w, seed, prompt = CASES[0]
    first = pipe(random_rgb(h, w, seed=seed), prompt).token_ids
    with torch.no_grad():
        weight = model.mllm.lm_head.weight  # [V, H]
        weight[model.config.tokens.seg] = 1.05 * weight[first[1]]
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = seg_model()
    out = tmp_path_factory.mktemp("llm")
    llm = export_component("llm", model, out, source_hash="random:citrus-v-tiny")
    vision = export_component("vision", model, out, source_hash="random:citrus-v-tiny")
    write_embeddings(model, out, "random:citrus-v-tiny")
    cpu = ["CPUExecutionProvider"]
    sessions = {
        "llm": ort.InferenceSession(str(llm.onnx_path), providers=cpu),
        "vision": ort.InferenceSession(str(vision.onnx_path), providers=cpu),
    }
    return model, llm, sessions, np.load(out / "embeddings.npy")


def test_export_validates_prefill_and_decode(exported):
    _, result, _, _ = exported
    samples = {e.sample for e in result.errors}
    assert any("past 0" in s for s in samples)  # prefill (P = 0) ran in ONNX Runtime
    assert any("seq 1" in s and "pad 3" in s for s in samples)  # padded batched decode
    print(f"llm max abs {result.max_abs:.2e}, max rel {result.max_rel:.2e}")
    assert result.max_abs <= ATOL


def test_graph_io_names(exported):
    import onnx

    model, result, _, _ = exported
    n = model.config.text.num_layers
    graph = onnx.load(str(result.onnx_path)).graph
    assert [i.name for i in graph.input] == [
        "inputs_embeds",
        "position_ids",
        "attention_mask",
        *H.past_names(n),
    ]
    assert [o.name for o in graph.output] == ["logits", "last_hidden_state", *H.present_names(n)]


def test_embeddings_table(exported, tmp_path):
    model, _, _, table = exported
    manifest = write_embeddings(model, tmp_path, "random:citrus-v-tiny")
    weight = model.mllm.model.language_model.embed_tokens.weight.detach().numpy()
    assert table.dtype == np.float32 and np.array_equal(table, weight)
    assert manifest["sha256"] == sha256_file(tmp_path / "embeddings.npy")
    on_disk = json.loads((tmp_path / "embeddings.manifest.json").read_text())
    assert on_disk["shape"] == list(weight.shape)


def ort_greedy(model, sessions, table, rgb, prompt):
    """Reference-equivalent greedy decoding with ONNX Runtime and numpy only."""
    cfg = model.config
    qp = qwen_pixels(rgb, cfg.preprocess)
    (features,) = sessions["vision"].run(
        None, H.vision_inputs(qp.pixel_values, qp.grid_thw, cfg.vision)
    )
    n_img = n_image_tokens(qp.grid_thw, cfg.vision.spatial_merge_size)
    ids = prompt_ids(tiny_tokenizer(), prompt, n_img)[None]  # [1, S]
    feeds, deltas = H.llm_prefill_inputs(ids, table, cfg, features, [qp.grid_thw])
    llm = sessions["llm"]
    names = [o.name for o in llm.get_outputs()]
    tokens, hidden_states = [], []
    for _ in range(MAX_NEW):
        out = dict(zip(names, llm.run(names, feeds), strict=True))
        token = int(out["logits"][0, -1].argmax())
        if token == cfg.tokens.eos:
            break
        tokens.append(token)
        hidden_states.append(out["last_hidden_state"][0, -1])
        if len(tokens) == MAX_NEW:
            break
        past = H.next_past(out)
        feeds = H.llm_decode_inputs([token], table, deltas, feeds["attention_mask"], past)
    return tokens, np.stack(hidden_states)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_ort_greedy_matches_reference_pipeline(exported, case):
    model, _, sessions, table = exported
    h, w, seed, prompt = CASES[case]
    rgb = random_rgb(h, w, seed=seed)
    seen = []  # the hidden state of every step, as the reference feeds lm_head
    hook = model.mllm.lm_head.register_forward_hook(lambda _m, args, _o: seen.append(args[0][0]))
    try:
        ref = ReferencePipeline(
            model, tiny_tokenizer(), max_new_tokens=MAX_NEW, constrained_decoding=False
        )(rgb, prompt)
    finally:
        hook.remove()
    tokens, hidden = ort_greedy(model, sessions, table, rgb, prompt)
    assert tokens == ref.token_ids
    want = torch.stack(seen[: len(tokens)]).numpy()  # [steps, H]
    err = float(np.abs(hidden - want).max())
    seg = [i for i, t in enumerate(tokens) if t == model.config.tokens.seg]
    seg_err = float(np.abs(hidden[seg] - want[seg]).max()) if seg else 0.0
    print(
        f"case {case}: {len(tokens)} tokens, {len(seg)} [SEG], hidden {err:.2e}, seg {seg_err:.2e}"
    )
    assert err <= ATOL
    if case == 0:
        assert seg, "the boosted model must emit [SEG] on the first case"
        assert len(ref.masks) == len(seg)


def test_prefill_with_padding_and_decode_positions(exported):
    """A left-padded batch through the graph equals the stock model on the same feeds."""
    model, _, sessions, table = exported
    cfg = model.config
    ids = np.array([[0, 0, 20, 21, 22, 23], [30, 31, 32, 33, 34, 35]])
    mask = (np.arange(6)[None] >= np.array([[2], [0]])).astype(np.int64)
    feeds, deltas = H.llm_prefill_inputs(ids, table, cfg, attention_mask=mask)
    assert np.array_equal(deltas, [[0], [0]])
    llm = sessions["llm"]
    names = [o.name for o in llm.get_outputs()]
    out = dict(zip(names, llm.run(names, feeds), strict=True))
    step = H.llm_decode_inputs([40, 41], table, deltas, feeds["attention_mask"], H.next_past(out))
    assert step["position_ids"][:, :, 0].tolist() == [[4, 6]] * 3  # attended tokens + delta
    assert step["attention_mask"].shape == (2, 7)
    got = dict(zip(names, llm.run(names, step), strict=True))
    from citrus_edge.graph_specs import Sample

    want = llm_reference(model, Sample("decode", step))
    for name in ("logits", "last_hidden_state", "present_key_1"):
        assert np.abs(got[name] - want[name]).max() <= ATOL, name


def test_external_data_path(tmp_path):
    """Graphs over the size limit keep their weights in one `<name>.onnx.data` file."""
    model = tiny_model()
    cfg = ExportConfig(external_data_bytes=1)
    result = export_component("llm", model, tmp_path, source_hash="random:x", export_cfg=cfg)
    data = tmp_path / "llm.onnx.data"
    assert data.is_file() and data.stat().st_size > result.onnx_path.stat().st_size
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["external_data"] == {"file": data.name, "sha256": sha256_file(data)}
    assert result.max_abs <= ATOL
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "llm.manifest.json",
        "llm.onnx",
        "llm.onnx.data",
    ]


def test_decode_inputs_check_cache_length():
    cfg = tiny_model().config
    past = H.empty_past(1, cfg.text)
    table = np.zeros((cfg.text.vocab_size, cfg.text.hidden_size), np.float32)
    with pytest.raises(ValueError, match="cache"):
        H.llm_decode_inputs([3], table, np.zeros((1, 1)), np.ones((1, 4)), past)
    assert llm_spec(cfg, ExportConfig()).check_feeds(
        H.llm_decode_inputs([3], table, np.zeros((1, 1)), np.ones((1, 0)), past)
    ) == {"batch": 1, "seq": 1, "total": 1, "past": 0}
