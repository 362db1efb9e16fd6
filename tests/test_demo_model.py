"""The shipped demo model: scores at the README's figures, answers that depend on the image,
degenerate answers flagged, masks in the input's frame, ORT parity with the reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from citrus_edge.defaults import DEMO_MODEL_DIR

pytestmark = pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not trained yet"
)
N = 24  # eval records (all tasks) of the ORT-vs-reference parity check
N_TASK = 60  # the whole eval split per task: the README's figures are measured on these
# Floors at the README's figures (the shipped model, stage 10, PyTorch reference, default
# phantom set's eval split, 60 segmentation and 60 report answers; this test measured the same
# 0.8261 and 53/60; stage 8 scored 0.8257 and 53/60, stage 7 0.857 and 54/60). The model is deterministic; the margins only absorb a platform flipping a
# borderline answer: Dice 0.826 - 0.020 (per-image SD about 0.2, standard error 0.025 at n = 60:
# the floor is 0.8 SE below), count 0.883 - 0.033 (two of 60 reports; standard error 0.041). A
# mask-threshold or resize fault costing 0.03 Dice, or three report answers, fails here.
README_DICE, DICE_MARGIN = 0.826, 0.020
README_COUNT, COUNT_MARGIN = 0.883, 2 / N_TASK


@functools.cache
def _setup():
    from citrus_edge.calib_data.data_manifest import read_manifest
    from citrus_edge.calib_data.phantom_set import default_phantom_manifest
    from citrus_edge.modelling.reference import ReferencePipeline

    manifest = default_phantom_manifest()
    pipe = ReferencePipeline.from_checkpoint(DEMO_MODEL_DIR)
    return pipe, manifest.parent, read_manifest(manifest, split="eval")


def _records(task):
    _, _, recs = _setup()
    out = [r for r in recs if r.task == task]
    assert len(out) == N_TASK, (task, len(out))  # the split the README's figures come from
    return out


def _run(records, images):
    from citrus_edge.calib_data.load import load_image
    from citrus_edge.cli.evaluate import score

    pipe, root, _ = _setup()
    out = []
    for rec, img_rec in zip(records, images, strict=True):
        rgb = load_image(img_rec.abs_image(root)).pixels
        out.append(score(rec, pipe(rgb, rec.prompt), root))
    return out


@functools.cache
def _true_scores(task):
    """Each record scored on its own image (cached: several tests read them)."""
    recs = _records(task)
    return _run(recs, recs)


def _shuffled_scores(task):
    """Each record scored on another record's image (a fixed permutation, seed 0)."""
    recs = _records(task)
    perm = np.random.default_rng(0).permutation(N_TASK)
    assert (perm != np.arange(N_TASK)).sum() == 57  # all but 3 images moved
    return _run(recs, [recs[i] for i in perm])


def test_eval_split_scores_are_the_readme_figures():
    dice = np.mean([s.dice for s in _true_scores("segment")])
    count = np.mean([s.count_correct for s in _true_scores("report")])
    print(f"Dice {dice:.4f}, count {count:.4f} on {N_TASK} + {N_TASK} eval answers")
    assert dice >= README_DICE - DICE_MARGIN, dice
    assert count >= README_COUNT - COUNT_MARGIN - 1e-9, count


def test_answers_depend_on_the_image():
    texts = {s.text for s in _true_scores("report")}
    assert len(texts) >= 36, texts  # measured: 41 distinct reports of 60


def test_shuffled_images_collapse_the_scores():
    """Measured on all 60 + 60 answers (stage 10): Dice 0.826 -> 0.173, count 0.883 -> 0.400 (24 of 60 a
    shuffled image happens to show the same number of lesions)."""
    true_dice = np.mean([s.dice for s in _true_scores("segment")])
    true_count = np.mean([s.count_correct for s in _true_scores("report")])
    shuffled_dice = np.mean([s.dice for s in _shuffled_scores("segment")])
    shuffled_count = np.mean([s.count_correct for s in _shuffled_scores("report")])
    print(
        f"Dice {true_dice:.3f} -> {shuffled_dice:.3f}, count {true_count:.3f} -> {shuffled_count:.3f}"
    )
    assert shuffled_dice <= 0.30 and shuffled_dice < true_dice - 0.5, (true_dice, shuffled_dice)
    assert shuffled_count <= 0.55 and shuffled_count < true_count - 0.3, (
        true_count,
        shuffled_count,
    )


def test_real_ultrasound_dicoms_get_their_uncertain_answers_flagged():
    """pydicom's two ultrasound examples: a phantom-trained model's answers there are not to be
    trusted, and the result must say so. Free-running, stage 7 answered garbage ('Sure {" {"
    {" {"`````'); under the task grammar (issue 22) every answer is one of the format's
    sentences, so it parses, and the flags come from the model's own signals: stage 10 (which
    has seen screen-like phantoms) answers the palette example at mean log-prob -0.687 (bound
    -0.08: low confidence; its mask's predicted IoU 0.082) and the RGB one confidently (-0.009)
    but with a mask whose predicted IoU is 0.179 (bound 0.39): every answer carries a flag."""
    from pydicom import examples

    from citrus_edge.calib_data.load import load_image
    from citrus_edge.grammar import ANSWER_SENTENCES
    from citrus_edge.quality import DEFAULT_THRESHOLDS
    from citrus_edge.tasks import SEGMENT_ANSWER, SEGMENT_PROMPT

    pipe, _, _ = _setup()
    flags = {}
    for path in (examples.get_path("palette_color"), examples.get_path("rgb_color")):
        img = load_image(path)
        res = pipe(img.pixels, SEGMENT_PROMPT)
        q = res.quality
        assert res.token_ids and q.task == "segment" and q.n_tokens == len(res.token_ids)
        assert res.text in (SEGMENT_ANSWER, *ANSWER_SENTENCES) and res.stopped_by == "eos"
        assert q.parses is True and q.mean_logprob == pytest.approx(np.mean(res.token_logprobs))
        assert len(res.masks) == res.token_ids.count(pipe.tokenizer.token_to_id("[SEG]"))
        low_iou = [s for s in res.mask_scores if s < DEFAULT_THRESHOLDS.mask_iou]
        flags[path.name] = (q.low_confidence, len(low_iou))
        assert q.low_confidence or low_iou, (path.name, res.text, q, res.mask_scores)
        assert any(w.startswith("low confidence") for w in res.warnings) == q.low_confidence
        assert sum("low predicted IoU" in w for w in res.warnings) == len(low_iou)
    assert flags["examples_palette.dcm"][0] is True  # measured mean -0.687 against -0.08


def test_masks_come_back_in_the_input_frame():
    """Phantoms stretched to 256 x 384 and 300 x 200 (the model sees every image resized):
    each mask has the stretched image's size and lies on the stretched lesion as well as the
    unstretched answer lies on its own. Measured on the first four lesion images of the segment
    split (stage 10): the stretched masks' Dice against the stretched ground truth is within
    0.011 of the unstretched answer's (drops -0.009 to 0.011); a mask mapped back without the
    aspect change would fall far lower. Stages 8 and 10 answer one of the eight "This is not an
    ultrasound image." (phantom_00010 at 300 x 200, a distortion no real screen shows): at most
    one such answer, and no mask."""
    from PIL import Image

    from citrus_edge.calib_data.load import load_image
    from citrus_edge.cli.evaluate import union_mask
    from citrus_edge.metrics import dice
    from citrus_edge.tasks import NOT_US_ANSWER

    pipe, root, _ = _setup()
    lesion_recs = [r for r in _records("segment") if r.lesions][:4]
    drops, not_us = [], []
    for rec in lesion_recs:
        rgb = load_image(rec.abs_image(root)).pixels
        gt = union_mask(rec, root, rgb.shape[:2])
        (own,) = pipe(rgb, rec.prompt).masks
        unstretched = dice(own, gt)
        for h, w in ((256, 384), (300, 200)):
            img = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
            res = pipe(img, rec.prompt)
            if res.text == NOT_US_ANSWER:
                assert not res.masks
                not_us.append((rec.id, h, w))
                continue
            assert len(res.masks) == 1 and res.masks[0].shape == (h, w), (rec.id, res.text)
            stretched = np.asarray(Image.fromarray(gt).resize((w, h), Image.NEAREST))
            drops.append(unstretched - dice(res.masks[0], stretched))
    print("stretched Dice drops", np.round(drops, 3), "not ultrasound:", not_us)
    assert len(not_us) <= 1 and len(drops) >= 7, not_us
    assert max(drops) <= 0.05, drops  # measured: at most 0.011 (stage 8: 0.021)


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    from citrus_edge.bundle import bundle_components, write_manifest
    from citrus_edge.export.export_manifest import checkpoint_source_hash
    from citrus_edge.export.export_run import export_all
    from citrus_edge.modelling.checkpoint import load_checkpoint

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
