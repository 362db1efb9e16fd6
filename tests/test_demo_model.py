"""The shipped demo model: its answers depend on the image, and shuffling images breaks scores."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from citrus_edge.defaults import DEMO_MODEL_DIR

pytestmark = pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not trained yet"
)
N = 24  # eval-split images used here (the README reports the full split)


@functools.cache
def _setup():
    from citrus_edge.calib_data.manifest import read_manifest
    from citrus_edge.defaults import default_phantom_manifest
    from citrus_edge.reference import ReferencePipeline

    manifest = default_phantom_manifest()
    pipe = ReferencePipeline.from_checkpoint(DEMO_MODEL_DIR)
    return pipe, manifest.parent, read_manifest(manifest, split="eval")


def _records(task):
    _, _, recs = _setup()
    return [r for r in recs if r.task == task][:N]


def _run(records, images):
    from citrus_edge.calib_data.load import load_image
    from citrus_edge.evaluate import score

    pipe, root, _ = _setup()
    out = []
    for rec, img_rec in zip(records, images, strict=True):
        rgb = load_image(img_rec.abs_image(root)).pixels
        out.append(score(rec, pipe(rgb, rec.prompt), root))
    return out


def test_answers_depend_on_the_image():
    recs = _records("report")
    texts = {s.text for s in _run(recs, recs)}
    assert len(texts) >= N // 2, texts


def test_shuffled_images_collapse_the_scores():
    seg, rep = _records("segment"), _records("report")
    rng = np.random.default_rng(0)
    true_dice = np.mean([s.dice for s in _run(seg, seg)])
    shuffled_dice = np.mean([s.dice for s in _run(seg, [seg[i] for i in rng.permutation(N)])])
    true_count = np.mean([s.count_correct for s in _run(rep, rep)])
    shuffled_count = np.mean(
        [s.count_correct for s in _run(rep, [rep[i] for i in rng.permutation(N)])]
    )
    assert true_dice >= 0.65 and shuffled_dice < true_dice - 0.3, (true_dice, shuffled_dice)
    assert true_count >= 0.65 and shuffled_count < true_count - 0.25, (true_count, shuffled_count)


def test_real_ultrasound_dicoms_give_answer_and_mask_of_the_right_size():
    from pydicom import examples

    from citrus_edge.calib_data.load import load_image
    from citrus_edge.calib_data.tasks import SEGMENT_PROMPT

    pipe, _, _ = _setup()
    for path in (examples.get_path("palette_color"), examples.get_path("rgb_color")):
        img = load_image(path)
        res = pipe(img.pixels, SEGMENT_PROMPT)
        assert res.text and res.token_ids
        for m in res.masks:
            assert m.shape == img.pixels.shape[:2]


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    from citrus_edge.bundle import write_manifest
    from citrus_edge.checkpoint import load_checkpoint
    from citrus_edge.export.manifest import checkpoint_source_hash
    from citrus_edge.export.pipeline import export_all
    from citrus_edge.runtime.artifacts import bundle_components

    out = tmp_path_factory.mktemp("demo") / "bundle"
    export_all(
        load_checkpoint(DEMO_MODEL_DIR),
        out,
        source_hash=checkpoint_source_hash(DEMO_MODEL_DIR),
        tokenizer_json=DEMO_MODEL_DIR / "tokenizer.json",
    )
    write_manifest(out, {"components": bundle_components(out)})
    return out


def test_ort_runtime_matches_reference_on_eval_prompts(demo_bundle):
    from citrus_edge.calib_data.load import load_image
    from citrus_edge.metrics import mask_iou
    from citrus_edge.runtime.pipeline import Pipeline

    ref, root, recs = _setup()
    run = Pipeline.from_bundle(demo_bundle)
    ious = []
    for rec in recs[:N]:
        rgb = load_image(rec.abs_image(root)).pixels
        a, b = ref(rgb, rec.prompt), run(rgb, rec.prompt)
        assert a.token_ids == b.token_ids, rec.id
        assert len(a.masks) == len(b.masks)
        ious += [mask_iou(x, y) for x, y in zip(a.masks, b.masks, strict=True)]
    assert ious and min(ious) >= 0.99, min(ious)
