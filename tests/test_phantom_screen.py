"""Screen-like phantoms and non-ultrasound images (issue 22): exact masks and boxes under a
scanner's display, every layout and probe geometry drawn, the clean default unchanged, the
non-US records' fixed answer, the mix in sets and training samples, and the runtime's
not-ultrasound warning on pydicom's CT and MR examples."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
from PIL import Image
from pydicom import examples

from citrus_edge.calib_data.data_manifest import read_manifest
from citrus_edge.calib_data.load import load_image
from citrus_edge.calib_data.not_ultrasound import (
    PYDICOM_NON_US,
    SYNTHETIC_KINDS,
    non_us_image,
    pydicom_non_us,
)
from citrus_edge.calib_data.phantom import (
    box_of,
    generate_phantom,
    location_of,
    longest_diameter_px,
)
from citrus_edge.calib_data.phantom_bmode import GEOMETRIES
from citrus_edge.calib_data.phantom_screen import (
    LAYOUTS,
    ScreenConfig,
    ScreenConfigError,
    draw_layout,
    flat_lesion_pixels,
    generate_screen_phantom,
    image_kind,
)
from citrus_edge.calib_data.phantom_set import default_resized_hw, write_phantom_set
from citrus_edge.cli.data_commands import MixOptionError, Screen, screen_fraction
from citrus_edge.tasks import NOT_US_ANSWER, PROMPTS, TASKS, parse_boxes, resize_box

# sha256 of default phantoms (image, masks, lesion attributes, fan), computed before the
# screen option existed: the clean default must stay bit-identical.
DEFAULT_HASHES = {
    0: "952b1e0408aea44e0f7933b5ba38f07c1127ca125c8ed4fdd965ed3251a49890",
    1: "58c1b5574b256c0c58e34ba2e4383ba70a1f9d5f53f99013f9b75869201e91b3",
    2: "25b4587584f3be339745fb43c13b921cd4311ba91556ed9306e59348ccf75d2f",
    7: "14e67f35621e70595994465f48dea9ea69df8d249a26f3ce56a36e576c12e685",
    1000003: "23c9e8e8537622c75380055958af54de6d6e0a7a0d364c9163d5166ac30a53ac",
}
# First 16 hex digits of the sha256 of every file of write_phantom_set(out, 4, seed=5), before.
DEFAULT_SET_HASHES = {
    "images/phantom_00000.dcm": "67e9142c997bfd0b",
    "images/phantom_00001.dcm": "e9314f5952f64961",
    "images/phantom_00002.dcm": "74b0c8fd2f5d6c95",
    "images/phantom_00003.dcm": "e81c20bb90864b83",
    "labels/phantom_00000.json": "bea069fdfdbea3fb",
    "labels/phantom_00001.json": "b823f203013d4302",
    "labels/phantom_00002.json": "150c836a07ce032e",
    "labels/phantom_00003.json": "baaa26c75b08449d",
    "manifest.jsonl": "e036dc0528687ed2",
    "masks/phantom_00000_1.png": "52a6530786983267",
    "masks/phantom_00001_1.png": "81c908a54100c87f",
    "masks/phantom_00001_2.png": "31658ed4509612ae",
    "phantom_set.json": "f21c0bacc3851c4c",
}


def _phantom_hash(p) -> str:
    h = hashlib.sha256()
    h.update(p.image.tobytes())
    for les in p.lesions:
        h.update(les.mask.tobytes())
        h.update(json.dumps(les.to_dict(), sort_keys=True).encode())
    h.update(p.fov.tobytes())
    return h.hexdigest()


def test_default_phantoms_are_bit_identical_to_before():
    for seed, expected in DEFAULT_HASHES.items():
        p = generate_phantom(seed)
        assert (p.screen, p.overlay) == (None, None)
        assert _phantom_hash(p) == expected, seed


def test_default_set_files_are_bit_identical_to_before(tmp_path):
    out = tmp_path / "set"
    write_phantom_set(out, 4, seed=5)
    got = {
        str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        for f in sorted(out.rglob("*"))
        if f.is_file()
    }
    assert got == DEFAULT_SET_HASHES


def _seeds_by_layout(n: int = 120) -> dict[tuple[str, str], int]:
    """The first seed of each (layout, geometry) among seeds 0..n-1."""
    found: dict[tuple[str, str], int] = {}
    for seed in range(n):
        layout = draw_layout(seed)
        found.setdefault((layout.kind, layout.geometry), seed)
    return found


def test_every_layout_geometry_and_display_element_is_drawn():
    layouts = [draw_layout(seed) for seed in range(120)]
    assert set(_seeds_by_layout()) == {(k, g) for k in LAYOUTS for g in GEOMETRIES}
    assert {la.doppler_pane >= 0 for la in layouts} == {True, False}
    assert {la.calipers for la in layouts} == {True, False}
    assert {la.jpeg_quality > 0 for la in layouts} == {True, False}
    assert len({(la.height, la.width) for la in layouts}) >= 5
    for la in layouts:
        assert all(p.x0 + p.width <= la.width and p.y0 + p.height <= la.height for p in la.panes)
        assert len(la.panes) == (2 if la.kind == "dual" else 1)
        assert la.spacing_mm == pytest.approx(la.depth_cm * 10 / la.panes[0].height)
        assert la.depth_cm * 2 == int(la.depth_cm * 2)  # a round half-centimetre


@pytest.mark.parametrize("key", sorted(_seeds_by_layout()))
def test_screen_masks_and_boxes_are_exact(key):
    seed = _seeds_by_layout()[key]
    flat = generate_screen_phantom(seed, flat=True)
    real = generate_screen_phantom(seed)
    assert flat.image.shape == real.image.shape == (*flat.fov.shape, 3)
    assert (flat.screen["kind"], flat.screen["geometry"]) == key
    assert len(real.lesions) == len(flat.lesions) <= 3
    union = np.zeros(flat.fov.shape, dtype=bool)
    for les_flat, les in zip(flat.lesions, real.lesions, strict=True):
        assert np.array_equal(les_flat.mask, les.mask)
        assert les.box == box_of(les.mask)
        assert les.location == location_of(les.mask)
        assert les.size_mm == int(np.floor(longest_diameter_px(les.mask) * real.spacing_mm + 0.5))
        assert not (les.mask & ~real.fov).any()  # inside the field of view
        assert not (union & les.mask).any()  # lesions never overlap
        union |= les.mask
    # Every lesion pixel the display did not draw over shows the lesion, and nothing else does.
    free = ~flat.overlay
    assert np.array_equal(flat_lesion_pixels(flat) & free, union & free)
    assert np.array_equal(flat.overlay, real.overlay)
    if union.any():
        assert (union & flat.overlay).sum() / union.sum() < 0.15
    # The display exists: text and scales were drawn, mostly outside the fan(s) (Doppler
    # flow and calipers are the exceptions).
    assert flat.overlay.sum() > 1000
    assert (flat.overlay & ~flat.fov).sum() > 0.85 * flat.overlay.sum()


def test_dual_panes_are_two_scans_side_by_side():
    seed = _seeds_by_layout()[("dual", "curvilinear")]
    p = generate_screen_phantom(seed)
    (x0, y0, w0, h0), (x1, y1, w1, h1) = p.screen["panes"]
    assert (w0, h0, y0) == (w1, h1, y1) and x1 > x0 + w0
    left, right = p.fov[:, x0 : x0 + w0], p.fov[:, x1 : x1 + w1]
    assert left.any() and right.any()
    assert not p.fov[:, x0 + w0 : x1].any()  # the gap shows no tissue


def test_fields_of_view_follow_the_probe():
    seeds = _seeds_by_layout()
    for geometry in GEOMETRIES:
        p = generate_screen_phantom(seeds[("single", geometry)], flat=True)
        rows = np.nonzero(p.fov.any(axis=1))[0]
        widths = p.fov[rows].sum(axis=1)
        top, bottom = widths[2], widths[-3]
        if geometry == "linear":
            assert abs(int(top) - int(bottom)) <= 2  # a rectangle
        elif geometry == "phased":
            assert top < 0.1 * bottom  # a pie slice from a point
        else:
            assert 0.25 * bottom < top < 0.9 * bottom  # a fan from a wide probe face


def test_screen_phantom_is_a_pure_function_of_its_seed():
    a, b = generate_screen_phantom(11), generate_screen_phantom(11)
    assert np.array_equal(a.image, b.image) and a.screen == b.screen
    assert not np.array_equal(a.image[:20], generate_screen_phantom(12).image[:20])
    with pytest.raises(ScreenConfigError, match=">= 0"):
        generate_screen_phantom(-1)
    with pytest.raises(ScreenConfigError, match="geometry_probs"):
        ScreenConfig(geometry_probs=(0.5, 0.5))


def test_image_kind_draws_the_asked_fractions():
    kinds = [image_kind(seed, screen=0.5, non_us=0.2) for seed in range(3000)]
    non_us = kinds.count("non_us") / len(kinds)
    screen = kinds.count("screen") / (len(kinds) - kinds.count("non_us"))
    assert 0.17 < non_us < 0.23 and 0.46 < screen < 0.54
    assert {image_kind(seed) for seed in range(100)} == {"clean"}
    assert {image_kind(seed, screen=1.0) for seed in range(100)} == {"screen"}
    with pytest.raises(ScreenConfigError, match="non_us"):
        image_kind(0, non_us=1.5)


def test_non_us_sources_are_offline_and_varied():
    names = [name for name, _ in pydicom_non_us()]
    assert names == list(PYDICOM_NON_US)  # all ten read with the project's loader
    sources = {non_us_image(seed)[1] for seed in range(80)}
    assert {f"synthetic:{k}" for k in SYNTHETIC_KINDS} <= sources
    assert len({s for s in sources if s.startswith("pydicom:")}) >= 6
    a, b = non_us_image(5), non_us_image(5)
    assert np.array_equal(a[0], b[0]) and a[0].dtype == np.uint8 and a[0].shape[2] == 3


def test_mixed_set_records(tmp_path):
    out = tmp_path / "mix"
    manifest = write_phantom_set(out, 16, seed=2, screen=0.6, non_us=0.25)
    records = read_manifest(manifest)
    labels = {p.stem: json.loads(p.read_text()) for p in (out / "labels").glob("*.json")}
    kinds = [label.get("kind", "clean") for label in labels.values()]
    assert {"clean", "screen", "non_us"} <= set(kinds)
    spec = json.loads((out / "phantom_set.json").read_text())["spec"]
    assert (spec["screen"], spec["non_us"]) == (0.6, 0.25)
    by_image: dict[str, list] = {}
    for r in records:
        by_image.setdefault(r.id.rsplit("_", 1)[0], []).append(r)
    for name, recs in by_image.items():
        label = labels[name]
        assert [r.task for r in recs] == list(TASKS)
        assert [r.prompt for r in recs] == [PROMPTS[t] for t in TASKS]
        if label.get("kind") == "non_us":
            assert [r.answer for r in recs] == [NOT_US_ANSWER] * 3
            assert all(r.masks == () and r.boxes == () and r.lesions == () for r in recs)
            assert all(r.spacing_mm is None for r in recs)
            assert load_image(out / recs[0].image).pixels.shape[2] == 3
            continue
        rgb = load_image(out / recs[0].image).pixels
        masks = [np.asarray(Image.open(out / m)) > 0 for m in recs[0].masks]
        assert [box_of(m) for m in masks] == [tuple(b) for b in recs[0].boxes]
        if label.get("kind") == "screen":
            hw = rgb.shape[:2]
            assert label["resized_hw"] == list(default_resized_hw(*hw))
            phantom = generate_screen_phantom(label["seed"])
            assert np.array_equal(rgb, phantom.image)  # the DICOM holds the screen as drawn
            resized = [resize_box(b, hw, tuple(label["resized_hw"])) for b in recs[0].boxes]
            assert [list(b) for b in resized] == label["boxes_resized"]
            assert parse_boxes(recs[1].answer) == resized


def test_cli_screen_options():
    assert screen_fraction(Screen.clean, None) == 0.0
    assert screen_fraction(Screen.real, None) == 1.0
    assert screen_fraction(Screen.mix, None) == 0.5
    assert screen_fraction(Screen.mix, 0.3) == 0.3
    with pytest.raises(MixOptionError, match="--screen mix"):
        screen_fraction(Screen.real, 0.3)
    with pytest.raises(MixOptionError, match=r"\[0, 1\]"):
        screen_fraction(Screen.mix, 1.2)


def test_mixed_training_samples():
    from fixtures import tiny_tokenizer

    from citrus_edge.calib_data.phantom import PhantomConfig
    from citrus_edge.config import TINY
    from citrus_edge.modelling.train import IGNORE, make_mixed_sample

    tok = tiny_tokenizer()
    seeds = {image_kind(s, 0.5, 0.3): s for s in range(50_000_000, 50_000_040)}
    non_us = make_mixed_sample(TINY, tok, seeds["non_us"], PhantomConfig(), 0.5, 0.3)
    answer = non_us.labels[non_us.labels != IGNORE][:-1]  # without the EOS
    assert tok.decode(answer.tolist()) == NOT_US_ANSWER
    assert (non_us.n_lesions, non_us.mask.sum(), non_us.heat.sum()) == (0, 0, 0)
    screen = make_mixed_sample(TINY, tok, seeds["screen"], PhantomConfig(), 0.5, 0.3)
    phantom = generate_screen_phantom(seeds["screen"])
    assert screen.n_lesions == len(phantom.lesions)
    assert (screen.mask.sum() > 0) == (len(phantom.lesions) > 0)


def test_pydicom_ct_and_mr_examples_are_warned_every_time():
    from test_runtime_support import pipeline

    from citrus_edge.quality import image_warnings

    run = pipeline("seg")
    for name, modality in (("ct", "CT"), ("mr", "MR")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = str(examples.get_path(name))
        loaded = load_image(path)
        expected = (
            f"not an ultrasound image: the DICOM states Modality {modality}; "
            "the model reads US only"
        )
        assert image_warnings(loaded.modality, loaded.dicom) == [expected]
        for prompt in PROMPTS.values():
            assert expected in run(path, prompt).warnings
    us = load_image(str(examples.get_path("ybr_color")))
    assert image_warnings(us.modality, us.dicom) == []
    assert image_warnings(us.modality, us.dicom, "Sure, it is [SEG].") == []
    # a US DICOM answered "not ultrasound": the two disagree, and the cart is told so
    (contradiction,) = image_warnings(us.modality, us.dicom, NOT_US_ANSWER)
    assert "states Modality US" in contradiction and "no finding" in contradiction
    assert image_warnings("", False, NOT_US_ANSWER) == []  # a PNG states no modality


def test_the_runtime_judges_the_image_with_its_answer(monkeypatch):
    """The pipeline hands image_warnings the answer it gave (what the US-vs-"not ultrasound"
    contradiction is read from)."""
    from test_runtime_support import pipeline

    import citrus_edge.runtime.pipeline as pipeline_module

    seen = []

    def record(modality, dicom, answer="", judged_not_us=False):
        seen.append((modality, dicom, answer, judged_not_us))
        return [f"seen {answer}"]

    monkeypatch.setattr(pipeline_module, "image_warnings", record)
    result = pipeline("seg")(str(examples.get_path("rgb_color")), PROMPTS["segment"])
    assert seen == [("US", True, result.text, False)]
    assert result.warnings[0] == f"seen {result.text}"


def test_a_us_dicom_is_never_answered_not_ultrasound_and_the_models_doubt_is_said(monkeypatch):
    """A DICOM that states Modality US is ultrasound: its answer grammar leaves out "This is not
    an ultrasound image." (the report then states a count), and where the model's own first
    choice was that sentence the result says so. A model made to want that sentence above all
    (its first token's logit raised at every step) still answers each task in format on pydicom's
    US example; a PNG (no modality) or the CT example may get the sentence."""
    from test_runtime_support import MAX_NEW, bundle

    import citrus_edge.runtime.pipeline as pipeline_module
    from citrus_edge.quality import NOT_US_OVERRIDDEN, answer_parses
    from citrus_edge.tasks import parse_count

    run = pipeline_module.Pipeline.from_bundle(bundle("seg"), max_new_tokens=MAX_NEW)
    not_us_first = run.grammars.not_us_first_token
    real = pipeline_module.greedy_generate
    firsts = []

    def wanting_not_us(*args):
        constraint = args[-1]
        choose = constraint.choose

        def biased(logits):
            logits = np.array(logits, dtype=np.float32)
            logits[not_us_first] = logits.max() + 100.0
            return choose(logits)

        constraint.choose = biased
        gen = real(*args)
        firsts.append(constraint.first_choice)
        return gen

    monkeypatch.setattr(pipeline_module, "greedy_generate", wanting_not_us)
    us_path = str(examples.get_path("palette_color"))
    for task, prompt in PROMPTS.items():
        result = run(us_path, prompt)
        assert result.text.strip() != NOT_US_ANSWER and answer_parses(task, result.text), task
        assert firsts[-1] == not_us_first
        doubt = [w for w in result.warnings if w.startswith(NOT_US_OVERRIDDEN)]
        assert len(doubt) == 1 and "states Modality US" in doubt[0], result.warnings
        if task == "report":
            assert parse_count(result.text) is not None, result.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct = str(examples.get_path("ct"))
    png = load_image(us_path).pixels  # the same pixels as an array: no modality stated
    for image in (ct, png):
        result = run(image, PROMPTS["report"])
        assert result.text.strip() == NOT_US_ANSWER
        assert not any(w.startswith(NOT_US_OVERRIDDEN) for w in result.warnings)


def test_stages_8_to_10_mix_and_can_start_from_a_checkpoint(tmp_path):
    from citrus_edge.modelling.demo_training import (
        DEMO_STAGES,
        SHIPPED_STAGE,
        StageStartError,
        train_demo_model,
    )

    assert SHIPPED_STAGE == len(DEMO_STAGES) == 10
    stage7, stage8, stage9, stage10 = DEMO_STAGES[6:10]
    assert (stage8.screen, stage8.non_us, stage8.lr, stage8.steps) == (0.5, 0.15, 1e-4, 2000)
    assert stage8.data_start == stage7.data_start + stage7.steps * stage7.batch_size
    assert stage8.centre_prior == pytest.approx(-2.1972, abs=1e-4)
    assert all(s.screen is None and s.non_us is None for s in DEMO_STAGES[:7])
    # Stage 9: the same mix on fresh phantoms, quantization-aware on the fp16-w4 INT4 grid.
    assert (stage9.screen, stage9.non_us, stage9.lr, stage9.steps) == (0.5, 0.15, 5e-5, 600)
    assert stage9.data_start == stage8.data_start + stage8.steps * stage8.batch_size
    assert stage9.carry_aux and stage9.fake_int4_block == 128
    assert all(s.fake_int4_block is None for s in DEMO_STAGES[:8])
    # Stage 10: stage 9 continued, twice as long, still on the INT4 grid.
    assert (stage10.steps, stage10.lr, stage10.fake_int4_block) == (1200, 5e-5, 128)
    assert stage10.data_start == stage9.data_start + stage9.steps * stage9.batch_size
    # TrainConfig records the screen fraction, not the screens: stages 8-10 drew ScreenConfig()
    # as it is here. Changing its defaults would change what `make demo-model` retrains; give
    # TrainConfig the screen settings first.
    assert ScreenConfig() == ScreenConfig(
        version=1,
        geometry_probs=(0.45, 0.35, 0.2),
        dual_prob=0.25,
        doppler_prob=0.3,
        caliper_prob=0.4,
        jpeg_prob=0.6,
        dark_prob=0.5,
        jpeg_quality=(30, 90),
        heights=(240, 256, 288),
        aspects=(1.0, 4 / 3, 1.5),
    )
    with pytest.raises(StageStartError, match="needs init_from"):
        train_demo_model(tmp_path, start_stage=8)
    with pytest.raises(StageStartError, match="within 1..10"):
        train_demo_model(tmp_path, start_stage=11, init_from=tmp_path)
    with pytest.raises(StageStartError, match="no config.json"):
        train_demo_model(tmp_path, start_stage=8, init_from=tmp_path)
