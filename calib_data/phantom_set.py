"""Write a folder of phantoms as DICOM + masks + labels + a three-task manifest.

Layout of a set (all paths in the manifest are relative to the folder):

    images/phantom_00000.dcm       US DICOM, spacing in SequenceOfUltrasoundRegions
    masks/phantom_00000_1.png      one 0/255 PNG per lesion, original resolution
    labels/phantom_00000.json      seed, split, lesion attributes, boxes (original and resized)
    phantom_set.json               the spec and the list of files this set consists of
    manifest.jsonl                 3 records per image: segment, detect, report

Phantom i uses seed `seed * 1_000_003 + i`. A set may mix in screen-like phantoms (`screen`,
the fraction of its ultrasound images drawn by `phantom_screen`: RGB DICOMs of a scanner's
display, with their own size and `resized_hw`) and images that are not ultrasound (`non_us`:
`images/nonus_00000.png`, every task answered `NOT_US_ANSWER`, no masks); which image is which
is `phantom_screen.image_kind` of its seed, and its label file states `kind`. With both
fractions 0 (the default) the set is exactly what it was before mixes existed. The set is built in a temporary folder next to
`out_dir` and moved in only when complete. An existing non-empty `out_dir` is refused unless
`overwrite=True` and it is itself a phantom set (its `phantom_set.json` lists the files it
made, and only those are replaced); files this code did not create are never deleted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from citrus_edge.atomic import make_staging_dir, replace_directory
from citrus_edge.defaults import cache_dir
from citrus_edge.preprocess import smart_resize
from citrus_edge.tasks import (
    NOT_US_ANSWER,
    PROMPTS,
    TASKS,
    detect_answer,
    report_answer,
    resize_box,
    segment_answer,
)

from .data_manifest import MANIFEST_NAME, Record, split_of, write_manifest
from .dicom_writer import write_us_dicom
from .not_ultrasound import non_us_image
from .phantom import DEFAULT_CONFIG, Phantom, PhantomConfig, generate_phantom
from .phantom_screen import DEFAULT_SCREEN, ScreenConfig, generate_screen_phantom, image_kind

log = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003
SET_INFO_NAME = "phantom_set.json"
SET_KIND = "citrus-edge phantom set"
_SUBDIRS = ("images", "masks", "labels")


@dataclass(frozen=True)
class PhantomSetSpec:
    """What a phantom set is made of; `to_dict` is stored in the set's phantom_set.json."""

    n: int
    seed: int = 0
    config: PhantomConfig = DEFAULT_CONFIG
    resized_hw: tuple[int, int] | None = None  # None: the demo model's input size
    version: int = 1
    screen: float = 0.0  # fraction of the ultrasound images that are screen-like
    non_us: float = 0.0  # fraction of all images that are not ultrasound
    screen_config: ScreenConfig = DEFAULT_SCREEN

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        image_kind(0, self.screen, self.non_us)  # validates both fractions

    def to_dict(self) -> dict:
        """The stored spec; the mix keys appear only in a mixed set, so a clean set's spec
        (and the default set's cache check) is what it was before mixes existed."""
        resized = None if self.resized_hw is None else list(self.resized_hw)
        data = {
            "version": self.version,
            "n": self.n,
            "seed": self.seed,
            "config": self.config.to_dict(),
            "resized_hw": resized,
        }
        if self.screen > 0:
            data.update(screen=self.screen, screen_config=self.screen_config.to_dict())
        if self.non_us > 0:
            data["non_us"] = self.non_us
        return data


DEFAULT_SET = PhantomSetSpec(n=600, seed=0)


def phantom_seed(seed: int, index: int) -> int:
    """Seed of phantom `index` in a set with base `seed`."""
    return seed * SEED_STRIDE + index


def default_resized_hw(height: int, width: int) -> tuple[int, int]:
    """The demo model's Qwen2.5-VL input size for an image of height x width."""
    from citrus_edge.config import DEMO

    pp = DEMO.preprocess
    return smart_resize(height, width, pp.factor, pp.min_pixels, pp.max_pixels)


def resolved(spec: PhantomSetSpec) -> PhantomSetSpec:
    """`spec` with its detection boxes' input size stated (the default filled in)."""
    if spec.resized_hw is not None:
        return spec
    hw = default_resized_hw(spec.config.height, spec.config.width)
    return dataclasses.replace(spec, resized_hw=hw)


def _set_info(out: Path) -> dict | None:
    """The `phantom_set.json` of a set at `out`, or None when there is none (or not ours)."""
    try:
        data = json.loads((out / SET_INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == SET_KIND else None


def written_spec(out_dir: str | os.PathLike) -> dict | None:
    """The spec a phantom set at `out_dir` was written with, or None when there is none."""
    info = _set_info(Path(out_dir))
    return None if info is None else info.get("spec")


def write_phantom_set(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    config: PhantomConfig = DEFAULT_CONFIG,
    resized_hw: tuple[int, int] | None = None,
    overwrite: bool = False,
    screen: float = 0.0,
    non_us: float = 0.0,
    screen_config: ScreenConfig = DEFAULT_SCREEN,
) -> Path:
    """Generate `n` phantoms into `out_dir` (layout in the module docstring).

    `resized_hw` is the model input size the detection boxes are scaled to; None means
    `default_resized_hw(config.height, config.width)` (an image of another size, a screen or
    a non-US picture, always gets its own `default_resized_hw`). `screen` and `non_us` are the
    mix fractions (0: a clean set). Returns the manifest path.
    """
    spec = PhantomSetSpec(n, seed, config, resized_hw, 1, screen, non_us, screen_config)
    spec = resolved(spec)
    out = Path(out_dir)
    old_files = _check_target(out, overwrite)
    hw = spec.resized_hw
    staging = make_staging_dir(out, "tmp")
    try:
        start = time.perf_counter()
        files = _build(staging, spec, tuple(hw))
        log.info("%d phantoms built in %.1f s", n, time.perf_counter() - start)
        _commit(staging, out, old_files, files)
    finally:
        if staging.exists():
            shutil.rmtree(staging)  # only ever our own staging folder
    return out / MANIFEST_NAME


def _check_target(out: Path, overwrite: bool) -> list[str]:
    """Files of a previous set to replace ([] for a new or empty folder), or refuse."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another out_dir")
    if not any(out.iterdir()):
        return []
    if not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True or choose another out_dir")
    refusal = (
        f"{out} is not empty and has no valid {SET_INFO_NAME}, so it was not made by "
        "write_phantom_set; refusing to overwrite files it did not create"
    )
    info = _set_info(out)
    listed = info.get("files") if info is not None else None
    if not isinstance(listed, list):
        raise FileExistsError(refusal)
    files = [str(f) for f in listed]
    if any(Path(f).is_absolute() or ".." in Path(f).parts for f in files):
        raise FileExistsError(refusal)
    return files


def _build(staging: Path, spec: PhantomSetSpec, resized_hw: tuple[int, int]) -> list[str]:
    """Write every phantom into `staging`; return the relative paths written."""
    for sub in _SUBDIRS:
        (staging / sub).mkdir()
    files, records = [], []
    clean_hw = (spec.config.height, spec.config.width)
    for index in range(spec.n):
        seed = phantom_seed(spec.seed, index)
        kind = image_kind(seed, spec.screen, spec.non_us)
        if kind == "non_us":
            written, new_records = _write_non_us(staging, index, seed)
        elif kind == "screen":
            phantom = generate_screen_phantom(seed, spec.config, spec.screen_config)
            hw = phantom.image.shape[:2]
            own_hw = resized_hw if hw == clean_hw else default_resized_hw(*hw)
            extra = {"kind": "screen", "screen": phantom.screen}
            written, new_records = _write_one(staging, index, phantom, own_hw, extra)
        else:
            phantom = generate_phantom(seed, spec.config)
            written, new_records = _write_one(staging, index, phantom, resized_hw)
        files += written
        records += new_records
    info = {
        "schema": 1,
        "kind": SET_KIND,
        "spec": spec.to_dict(),
        "resized_hw": list(resized_hw),
        "files": files + [SET_INFO_NAME, MANIFEST_NAME],
    }
    (staging / SET_INFO_NAME).write_text(json.dumps(info, indent=1), encoding="utf-8")
    write_manifest(staging / MANIFEST_NAME, records)
    return files + [SET_INFO_NAME, MANIFEST_NAME]


def _write_one(
    root: Path,
    index: int,
    phantom: Phantom,
    resized_hw: tuple[int, int],
    extra_label: dict | None = None,
) -> tuple[list[str], list[Record]]:
    """DICOM, masks, label file and the three records of one phantom (`extra_label`: keys a
    screen phantom adds to its label file)."""
    name = f"phantom_{index:05d}"
    image = f"images/{name}.dcm"
    write_us_dicom(root / image, phantom.image, phantom.spacing_mm, seed=phantom.seed)
    masks = [f"masks/{name}_{k}.png" for k in range(1, len(phantom.lesions) + 1)]
    for rel, lesion in zip(masks, phantom.lesions, strict=True):
        Image.fromarray(lesion.mask.astype(np.uint8) * 255).save(root / rel)
    boxes = [lesion.box for lesion in phantom.lesions]
    resized = [resize_box(b, phantom.image.shape[:2], resized_hw) for b in boxes]
    lesions = [lesion.to_dict() for lesion in phantom.lesions]
    answers = {
        "segment": segment_answer(len(lesions)),
        "detect": detect_answer(resized),
        "report": report_answer(phantom.lesions),
    }
    common = {
        "image": image,
        "frame": 0,
        "masks": masks,
        "boxes": boxes,
        "lesions": lesions,
        "split": split_of(index),
        "spacing_mm": phantom.spacing_mm,
    }
    records = [
        Record(id=f"{name}_{task}", task=task, prompt=PROMPTS[task], answer=answers[task], **common)
        for task in TASKS
    ]
    label = {
        "schema": 1,
        "id": name,
        "index": index,
        "seed": phantom.seed,
        **common,
        "boxes": [list(b) for b in boxes],
        "resized_hw": list(resized_hw),
        "boxes_resized": [list(b) for b in resized],
        **(extra_label or {}),
    }
    label_path = f"labels/{name}.json"
    (root / label_path).write_text(json.dumps(label) + "\n", encoding="utf-8")
    return [image, *masks, label_path], records


def _write_non_us(root: Path, index: int, seed: int) -> tuple[list[str], list[Record]]:
    """PNG, label file and three records of a non-ultrasound image: every task's answer is
    NOT_US_ANSWER, with no masks, boxes, lesions or spacing."""
    name = f"nonus_{index:05d}"
    image = f"images/{name}.png"
    rgb, source = non_us_image(seed)
    Image.fromarray(rgb).save(root / image)
    common = {
        "image": image,
        "frame": 0,
        "masks": [],
        "boxes": [],
        "lesions": [],
        "split": split_of(index),
        "spacing_mm": None,
    }
    records = [
        Record(id=f"{name}_{task}", task=task, prompt=PROMPTS[task], answer=NOT_US_ANSWER, **common)
        for task in TASKS
    ]
    label = {
        "schema": 1,
        "id": name,
        "index": index,
        "seed": seed,
        **common,
        "kind": "non_us",
        "source": source,
        "resized_hw": list(default_resized_hw(*rgb.shape[:2])),
        "boxes_resized": [],
    }
    label_path = f"labels/{name}.json"
    (root / label_path).write_text(json.dumps(label) + "\n", encoding="utf-8")
    return [image, label_path], records


def _commit(staging: Path, out: Path, old_files: list[str], files: list[str]) -> None:
    """Move the complete staging folder into place; the manifest arrives last."""
    if not out.exists():
        replace_directory(staging, out)
        return
    # A previous set made these (its manifest goes first); nothing else is touched.
    for rel in sorted(old_files, key=lambda r: r != MANIFEST_NAME):
        (out / rel).unlink(missing_ok=True)
    for sub in _SUBDIRS:
        (out / sub).mkdir(exist_ok=True)
    for rel in files:
        if rel != MANIFEST_NAME:
            os.replace(staging / rel, out / rel)
    os.replace(staging / MANIFEST_NAME, out / MANIFEST_NAME)


def default_phantom_manifest() -> Path:
    """The default phantom set (generated on first use into the cache, then reused)."""
    out = cache_dir() / f"phantoms-n{DEFAULT_SET.n}-seed{DEFAULT_SET.seed}"
    manifest = out / MANIFEST_NAME
    # Written again when missing or made for another demo input size (its detection answers
    # are in the model's input pixels).
    if not manifest.is_file() or written_spec(out) != resolved(DEFAULT_SET).to_dict():
        write_phantom_set(out, DEFAULT_SET.n, DEFAULT_SET.seed, overwrite=out.exists())
    return manifest
