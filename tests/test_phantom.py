"""Phantom generator, DICOM writer, phantom sets and the manifest."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from PIL import Image

from citrus_edge.calib_data import phantom_set as phantom_set_module
from citrus_edge.calib_data.data_errors import ManifestError
from citrus_edge.calib_data.data_manifest import Record, read_manifest, split_of, write_manifest
from citrus_edge.calib_data.dicom_writer import US_IMAGE_STORAGE, write_us_dicom
from citrus_edge.calib_data.load import load_image
from citrus_edge.calib_data.phantom import (
    ECHOGENICITIES,
    LOCATIONS,
    POSTERIORS,
    SHAPES,
    PhantomConfig,
    generate_phantom,
)
from citrus_edge.calib_data.phantom_set import (
    DEFAULT_SET,
    PhantomSetSpec,
    default_resized_hw,
    phantom_seed,
    resolved,
    write_phantom_set,
    written_spec,
)
from citrus_edge.config import DEMO
from citrus_edge.preprocess import smart_resize
from citrus_edge.tasks import parse_boxes, parse_report, resize_box

N_SEEDS = 60


@pytest.fixture(scope="module")
def phantoms():
    return [generate_phantom(seed) for seed in range(N_SEEDS)]


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour dilation repeated `steps` times."""
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


def diameter_by_hand(mask: np.ndarray) -> float:
    """Longest pixel-centre distance in the mask, from the row and column extremes (which
    contain every convex hull vertex), by brute force."""
    ys, xs = np.nonzero(mask)
    pts = set()
    for y in np.unique(ys):
        row = xs[ys == y]
        pts |= {(y, row.min()), (y, row.max())}
    for x in np.unique(xs):
        col = ys[xs == x]
        pts |= {(col.min(), x), (col.max(), x)}
    p = np.array(sorted(pts), dtype=float)
    return float(np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1)).max())


def first_with(phantoms, echogenicity: str):
    for phantom in phantoms:
        for lesion in phantom.lesions:
            if lesion.echogenicity == echogenicity:
                return phantom, lesion
    raise AssertionError(f"no {echogenicity} lesion in {len(phantoms)} phantoms")


# --- config ----------------------------------------------------------------------------------


def test_config_serialises_and_validates():
    config = PhantomConfig()
    data = json.loads(json.dumps(config.to_dict()))
    assert PhantomConfig.from_dict(data) == config
    assert data["lesion_count_probs"] == [0.2, 0.5, 0.2, 0.1] and data["spacing_mm"] == 0.2
    with pytest.raises(ValueError, match="sum to 1"):
        replace(config, lesion_count_probs=(0.5, 0.6))
    with pytest.raises(ValueError, match="diameter_mm"):
        replace(config, diameter_mm=(18.0, 6.0))
    assert DEFAULT_SET.n == 600 and DEFAULT_SET.seed == 0


# --- the image and its lesions ---------------------------------------------------------------


def test_lesion_invariants(phantoms):
    counts = np.bincount([len(p.lesions) for p in phantoms], minlength=4)
    assert counts.sum() == N_SEEDS and len(counts) == 4 and counts.min() > 0
    for phantom in phantoms:
        assert phantom.image.shape == (256, 256) and phantom.image.dtype == np.uint8
        assert not phantom.image[~phantom.fov].any()  # black outside the fan
        assert [les.box[0] for les in phantom.lesions] == sorted(
            les.box[0] for les in phantom.lesions
        )
        for i, lesion in enumerate(phantom.lesions):
            mask = lesion.mask
            assert mask.shape == (256, 256) and mask.dtype == bool and mask.any()
            assert not (mask & ~phantom.fov).any(), f"seed {phantom.seed}: lesion leaves the fan"
            ys, xs = np.nonzero(mask)
            assert lesion.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert lesion.size_mm == int(np.floor(diameter_by_hand(mask) * 0.2 + 0.5))
            assert 4 <= lesion.size_mm <= 24
            vertical = "upper" if ys.mean() < 127.5 else "lower"
            assert lesion.location == f"{vertical} {'left' if xs.mean() < 127.5 else 'right'}"
            assert lesion.shape in SHAPES and lesion.echogenicity in ECHOGENICITIES
            assert lesion.posterior in POSTERIORS and lesion.location in LOCATIONS
            assert lesion.margin == (
                "irregular" if lesion.shape == "irregular" else "circumscribed"
            )
            for other in phantom.lesions[i + 1 :]:  # apart by at least the configured gap
                assert not (dilate(mask, 4) & other.mask).any()


def test_masks_line_up_with_the_image(phantoms):
    """Mean grey inside each lesion against a ring 4..10 px around it."""
    ratios = {}
    for phantom in phantoms:
        img = phantom.image.astype(float)
        near_others = np.zeros_like(phantom.fov)
        for lesion in phantom.lesions:
            near_others |= dilate(lesion.mask, 4)
        for lesion in phantom.lesions:
            own = dilate(lesion.mask, 4)
            ring = dilate(lesion.mask, 10) & ~own & phantom.fov & ~(near_others & ~own)
            inside = img[lesion.mask].mean()
            ratios.setdefault(lesion.echogenicity, []).append(inside / img[ring].mean())
            if lesion.echogenicity == "isoechoic":
                halo = dilate(lesion.mask, 3) & ~lesion.mask
                assert img[halo].mean() < 0.8 * inside  # the halo makes it visible
    assert max(ratios["anechoic"]) < 0.3
    assert max(ratios["hypoechoic"]) < 0.9
    assert 0.75 < min(ratios["isoechoic"]) and max(ratios["isoechoic"]) < 1.3
    assert min(ratios["hyperechoic"]) > 1.1


def test_posterior_features_change_the_tissue_below():
    """Same seed with every lesion forced to shadowing / enhancement / none."""
    force = {
        kind: replace(PhantomConfig(), posterior_probs=(row,) * 4)
        for kind, row in (("shadowing", (1, 0, 0)), ("enhancement", (0, 1, 0)), ("none", (0, 0, 1)))
    }
    checked = 0
    for seed in range(40):
        made = {kind: generate_phantom(seed, config) for kind, config in force.items()}
        if len(made["none"].lesions) != 1:
            continue
        lesion = made["none"].lesions[0]
        assert all(p.lesions[0].box == lesion.box for p in made.values())
        x1, _, x2, y2 = lesion.box
        cx, half = (x1 + x2) // 2, max(2, (x2 - x1) // 4)
        below = (slice(y2 + 2, y2 + 30), slice(cx - half, cx + half))
        if not made["none"].fov[below].all():
            continue
        mean = {kind: p.image[below].astype(float).mean() for kind, p in made.items()}
        assert made["shadowing"].lesions[0].posterior == "shadowing"
        assert mean["shadowing"] < 0.88 * mean["none"]
        assert mean["enhancement"] > 1.08 * mean["none"]
        checked += 1
    assert checked >= 5


# --- DICOM -----------------------------------------------------------------------------------


def test_phantom_dicom_round_trip(phantoms, tmp_path):
    phantom = next(p for p in phantoms if p.lesions)
    path = write_us_dicom(tmp_path / "p.dcm", phantom.image, phantom.spacing_mm, seed=phantom.seed)
    loaded = load_image(path)
    np.testing.assert_array_equal(loaded.pixels, np.repeat(phantom.image[..., None], 3, axis=-1))
    assert (loaded.modality, loaded.n_frames, loaded.spacing.source) == (
        "US",
        1,
        "SequenceOfUltrasoundRegions",
    )
    assert loaded.spacing.row_mm == pytest.approx(0.2) and loaded.spacing.col_mm == pytest.approx(
        0.2
    )
    ds = pydicom.dcmread(path)
    assert (
        ds.SOPClassUID == US_IMAGE_STORAGE
        and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    )
    assert str(ds.PatientName) == "PHANTOM^SYNTHETIC" and ds.PatientID == f"PHANTOM-{phantom.seed}"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
    region = ds.SequenceOfUltrasoundRegions[0]
    assert (region.RegionSpatialFormat, region.RegionDataType) == (1, 1)
    assert (region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection) == (3, 3)
    assert region.PhysicalDeltaX == pytest.approx(0.02)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was moved into place


def test_rgb_dicom_round_trip(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    loaded = load_image(write_us_dicom(tmp_path / "rgb.dcm", rgb, 0.3, seed=5))
    np.testing.assert_array_equal(loaded.pixels, rgb)
    assert loaded.spacing.row_mm == pytest.approx(0.3)


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a, b, c = generate_phantom(7), generate_phantom(7), generate_phantom(8)
    assert a.image.tobytes() == b.image.tobytes()
    assert [les.mask.tobytes() for les in a.lesions] == [les.mask.tobytes() for les in b.lesions]
    assert a.image.tobytes() != c.image.tobytes()
    files = []
    for name, p in (("a", a), ("b", b), ("c", c)):
        (tmp_path / name).mkdir()
        files.append(
            write_us_dicom(tmp_path / name / "x.dcm", p.image, 0.2, seed=p.seed).read_bytes()
        )
    assert files[0] == files[1] and files[0] != files[2]
    uids = [pydicom.dcmread(tmp_path / n / "x.dcm").StudyInstanceUID for n in "abc"]
    assert uids[0] == uids[1] != uids[2]


# --- phantom sets and the manifest -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sets") / "set20"
    manifest = write_phantom_set(out, 20, seed=3)
    return out, manifest


def test_phantom_set_layout_and_records(small_set):
    out, manifest = small_set
    assert manifest == out / "manifest.jsonl"
    records = read_manifest(manifest)
    assert len(records) == 60
    by_split = {s: len(read_manifest(manifest, split=s)) for s in ("train", "calib", "eval")}
    assert by_split == {"train": 48, "calib": 6, "eval": 6}  # images 0, 10 eval; 1, 11 calib
    assert [split_of(i) for i in range(12)] == ["eval", "calib"] + ["train"] * 8 + ["eval", "calib"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left
    resized_hw = default_resized_hw(256, 256)
    pp = DEMO.preprocess  # the shipped model's input size: whole merged patches, pixel budget
    assert resized_hw[0] % pp.factor == 0 and resized_hw == smart_resize(
        256, 256, pp.factor, pp.min_pixels, pp.max_pixels
    )
    # The set states the input size its detection answers are in, so a stale set is found.
    assert written_spec(out)["resized_hw"] == list(resized_hw)
    assert written_spec(out) == resolved(PhantomSetSpec(20, seed=3)).to_dict()
    assert written_spec(out) != resolved(PhantomSetSpec(20, 3, resized_hw=(112, 112))).to_dict()
    assert written_spec(out / "images") is None  # not a phantom set
    for index in range(20):
        segment, detect, report = records[3 * index : 3 * index + 3]
        assert (segment.task, detect.task, report.task) == ("segment", "detect", "report")
        assert segment.image == f"images/phantom_{index:05d}.dcm" and segment.split == split_of(
            index
        )
        phantom = generate_phantom(phantom_seed(3, index))
        assert segment.boxes == tuple(les.box for les in phantom.lesions)
        np.testing.assert_array_equal(
            load_image(segment.abs_image(out)).pixels[..., 0], phantom.image
        )
        for path, lesion in zip(segment.abs_masks(out), phantom.lesions, strict=True):
            np.testing.assert_array_equal(np.asarray(Image.open(path)) == 255, lesion.mask)
        expected = [resize_box(les.box, (256, 256), resized_hw) for les in phantom.lesions]
        assert parse_boxes(detect.answer) == expected
        parsed = parse_report(report.answer)
        assert parsed.count == len(phantom.lesions)
        assert [d["size_mm"] for d in parsed.lesions] == [les.size_mm for les in phantom.lesions]
        label = json.loads((out / "labels" / f"phantom_{index:05d}.json").read_text())
        assert label["seed"] == phantom_seed(3, index) and label["boxes_resized"] == [
            list(b) for b in expected
        ]


def test_phantom_set_refuses_and_overwrites_only_its_own(small_set, tmp_path):
    out, _ = small_set
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_phantom_set(out, 2)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not create"):
        write_phantom_set(foreign, 2, overwrite=True)
    target = tmp_path / "again"
    write_phantom_set(target, 4)
    (target / "images" / "notes.txt").write_text("keep me too")
    write_phantom_set(target, 2, seed=1, overwrite=True)
    assert (target / "images" / "notes.txt").read_text() == "keep me too"
    assert sorted(p.name for p in (target / "images").glob("*.dcm")) == [
        "phantom_00000.dcm",
        "phantom_00001.dcm",
    ]
    assert len(read_manifest(target / "manifest.jsonl")) == 6


def test_failed_set_leaves_nothing(tmp_path, monkeypatch):
    real = phantom_set_module.generate_phantom

    def failing(seed, config):
        if seed == 2:
            raise RuntimeError("boom")
        return real(seed, config)

    monkeypatch.setattr(phantom_set_module, "generate_phantom", failing)
    with pytest.raises(RuntimeError, match="boom"):
        write_phantom_set(tmp_path / "half", 5)
    assert list(tmp_path.iterdir()) == []


def test_manifest_round_trip_and_errors(tmp_path):
    record = Record(
        id="x_report",
        image="images/x.dcm",
        frame=2,
        task="report",
        prompt="p",
        answer="a",
        masks=["masks/x_1.png"],
        boxes=[[1, 2, 3, 4]],
        lesions=[{"size_mm": 5}],
        split="calib",
        spacing_mm=None,
    )
    path = write_manifest(tmp_path / "m.jsonl", [record, replace(record, id="y", split="eval")])
    assert read_manifest(path) == [record, replace(record, id="y", split="eval")]
    assert read_manifest(path, split="eval")[0].id == "y"
    assert json.loads(path.read_text().splitlines()[0])["schema"] == 1
    assert record.abs_image(tmp_path) == (tmp_path / "images/x.dcm").resolve()
    lines = path.read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2: not valid JSON"):
        read_manifest(tmp_path / "bad.jsonl")
    data = json.loads(lines[0])
    del data["answer"]
    (tmp_path / "missing.jsonl").write_text(json.dumps(data) + "\n")
    with pytest.raises(ManifestError, match=r"missing\.jsonl:1: missing field 'answer'"):
        read_manifest(tmp_path / "missing.jsonl")
