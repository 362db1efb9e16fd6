"""The ONNX Runtime pipeline against the PyTorch reference on tiny random models: identical
tokens, text, stop reason and boxes; masks with IoU >= 0.99; one SAM2 encoder run per image and
one decoder run for all `[SEG]`s; none without `[SEG]`; an altered bundle refused."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import random_rgb
from PIL import Image
from test_runtime_support import (
    CASES,
    MAX_NEW,
    bundle,
    case_image,
    copy_bundle,
    mask_iou,
    pipeline,
    reference,
    variant_model,
)

torch = pytest.importorskip("torch")

from citrus_edge.bundle import BundleError, write_manifest  # noqa: E402
from citrus_edge.runtime.pipeline import Pipeline  # noqa: E402

MASK_IOU_MIN = 0.99
SCORE_ATOL = 1e-4
SEG_STATE_ATOL = 1e-4


def _spy(runner, calls: list):
    """Wrap `runner.run` to record the feeds of each call."""
    run = runner.run

    def spy(feeds):
        calls.append({k: np.asarray(v).shape for k, v in feeds.items()})
        return run(feeds)

    runner.run = spy
    return run


@pytest.mark.parametrize("kind", ["plain", "seg", "eos"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_matches_reference(kind, case):
    rgb, prompt = case_image(case), case[3]
    ref = reference(kind)(rgb, prompt)
    got = pipeline(kind)(rgb, prompt)
    assert got.token_ids == ref.token_ids
    assert got.text == ref.text
    assert got.stopped_by == ref.stopped_by
    assert got.boxes == ref.boxes
    assert (
        len(got.masks)
        == len(ref.masks)
        == got.token_ids.count(pipeline(kind).model_config.tokens.seg)
    )
    for a, b in zip(got.masks, ref.masks, strict=True):
        assert a.shape == b.shape == rgb.shape[:2] and a.dtype == bool
        assert mask_iou(a, b) >= MASK_IOU_MIN
    np.testing.assert_allclose(got.mask_scores, ref.mask_scores, atol=SCORE_ATOL)
    assert got.image_hw == ref.image_hw


def test_variants_cover_every_path():
    """The cases above include multi-[SEG], no-[SEG], EOS and max-new-tokens answers."""
    seg = [pipeline("seg")(case_image(c), c[3]) for c in CASES]
    eos = [pipeline("eos")(case_image(c), c[3]) for c in CASES]
    assert max(r.n_seg for r in seg) >= 2 and min(r.n_seg for r in seg) >= 1
    assert all(r.n_seg == 0 for r in eos)
    assert {r.stopped_by for r in eos} == {"eos", "max_new_tokens"}
    assert all(len(r.token_ids) == MAX_NEW for r in seg if r.stopped_by == "max_new_tokens")


def test_seg_states_equal_reference():
    """The decoder is fed the states the reference feeds its own decoder (max abs diff)."""
    case = CASES[1]  # two [SEG]s
    rgb, prompt = case_image(case), case[3]
    ref_pipe = reference("seg")
    captured = {}
    original = ref_pipe.model.decode_masks

    def spy(feats, seg_hidden):
        captured["seg"] = seg_hidden.numpy().copy()
        return original(feats, seg_hidden)

    ref_pipe.model.decode_masks = spy
    try:
        ref_pipe(rgb, prompt)
    finally:
        del ref_pipe.model.decode_masks
    got = pipeline("seg").ground(rgb, prompt)
    assert got.seg_hidden.shape == captured["seg"].shape and len(got.seg_hidden) == 2
    assert np.abs(got.seg_hidden - captured["seg"]).max() <= SEG_STATE_ATOL


def test_multi_seg_runs_encoder_once_and_decoder_once_batched():
    pipe = pipeline("seg")
    enc_calls, dec_calls = [], []
    enc_run = _spy(pipe.segmenter.encoder, enc_calls)
    dec_run = _spy(pipe.segmenter.decoder, dec_calls)
    try:
        case = CASES[1]  # two [SEG]s (CASES[3]'s typed "[SEG]" is plain text since issue 15)
        result = pipe(case_image(case), case[3])
    finally:
        pipe.segmenter.encoder.run, pipe.segmenter.decoder.run = enc_run, dec_run
    assert result.n_seg >= 2
    assert len(enc_calls) == 1 and len(dec_calls) == 1
    assert dec_calls[0]["seg_hidden"][0] == result.n_seg
    assert len(result.masks) == len(result.mask_scores) == result.n_seg


def test_no_seg_runs_no_sam():
    pipe = pipeline("eos")
    enc_calls, dec_calls = [], []
    enc_run = _spy(pipe.segmenter.encoder, enc_calls)
    dec_run = _spy(pipe.segmenter.decoder, dec_calls)
    try:
        result = pipe(case_image(CASES[0]), CASES[0][3])
    finally:
        pipe.segmenter.encoder.run, pipe.segmenter.decoder.run = enc_run, dec_run
    assert result.stopped_by == "eos" and result.masks == [] and result.mask_scores == []
    assert enc_calls == [] and dec_calls == []
    assert "sam_encoder" not in result.timings_ms and "mask_decoder" not in result.timings_ms


@pytest.mark.parametrize("max_new", [1, 5])
def test_max_new_tokens_reached(max_new):
    rgb, prompt = case_image(CASES[2]), CASES[2][3]
    got = pipeline("plain", max_new).ground(rgb, prompt)
    ref = reference("plain", max_new)(rgb, prompt)
    assert got.result.token_ids == ref.token_ids and len(ref.token_ids) == max_new
    assert got.result.stopped_by == ref.stopped_by == "max_new_tokens"
    assert got.generation.steps == max_new - 1  # the last token needs no step after it


def test_kv_cache_stays_in_ort_values():
    """IOBinding: the cache between steps is OrtValues bound to the next step, not numpy."""
    import onnxruntime as ort

    pipe = pipeline("plain")
    result = pipe(case_image(CASES[0]), CASES[0][3])
    llm = pipe.llm
    assert set(llm.cache) == set(llm.present)
    assert all(isinstance(v, ort.OrtValue) for v in llm.cache.values())
    prompt_len = llm.cache_len - (len(result.token_ids) - 1)
    assert prompt_len > 64  # image tokens + chat text
    assert llm.cache[llm.present[0]].shape()[2] == llm.cache_len


def test_path_input_equals_array_input(tmp_path):
    rgb = random_rgb(180, 230, seed=7)
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    pipe = pipeline("seg")
    from_path, from_array = pipe(path, CASES[0][3]), pipe(rgb, CASES[0][3])
    assert from_path.token_ids == from_array.token_ids
    assert all(np.array_equal(a, b) for a, b in zip(from_path.masks, from_array.masks, strict=True))


def test_result_records_bundle_id_and_backend():
    pipe = pipeline("plain")
    result = pipe(case_image(CASES[0]), CASES[0][3])
    assert result.bundle_id == pipe.bundle_id == pipe.artifacts.bundle.manifest["bundle_id"]
    assert result.backend == "onnxruntime/CPUExecutionProvider"
    stages = {"preprocess", "vision_encoder", "prefill", "decode", "total"}
    assert stages <= set(result.timings_ms) and all(v >= 0 for v in result.timings_ms.values())


def test_altered_bundle_is_refused_naming_the_file(tmp_path):
    path = copy_bundle("plain", tmp_path / "bundle")
    graph = path / "llm.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="llm.onnx"):
        Pipeline.from_bundle(path)


def test_bundle_without_components_uses_export_manifest(tmp_path):
    path = copy_bundle("seg", tmp_path / "bundle")
    write_manifest(path, {})  # a bundle straight from export_all: no "components"
    pipe = Pipeline.from_bundle(path, max_new_tokens=MAX_NEW, constrained_decoding=False)
    assert "components" not in pipe.artifacts.bundle.manifest
    case = CASES[1]
    assert (
        pipe(case_image(case), case[3]).token_ids
        == pipeline("seg")(case_image(case), case[3]).token_ids
    )


def test_reference_and_bundle_share_weights():
    """Guard of the test setup: the bundle's embedding table is the variant model's."""
    table = np.load(bundle("seg") / "embeddings.npy")
    model = variant_model("seg")
    expected = model.mllm.model.language_model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(table, expected)


def test_decoder_runs_in_batches_when_an_engine_caps_them():
    """An engine profile allowing fewer [SEG]s than the answer has: same masks, several runs."""
    pipe = pipeline("seg")
    case = CASES[1]  # two [SEG]s
    whole = pipe(case_image(case), case[3])
    calls: list = []
    run = _spy(pipe.segmenter.decoder, calls)
    pipe.segmenter.decoder.max_leading_dim = lambda name: 1
    try:
        split = pipe(case_image(case), case[3])
    finally:
        pipe.segmenter.decoder.run = run
        del pipe.segmenter.decoder.max_leading_dim
    assert whole.n_seg >= 2 and len(calls) == whole.n_seg
    assert all(c["seg_hidden"][0] == 1 for c in calls)
    assert all(np.array_equal(a, b) for a, b in zip(split.masks, whole.masks, strict=True))
    np.testing.assert_allclose(split.mask_scores, whole.mask_scores, atol=1e-6)
