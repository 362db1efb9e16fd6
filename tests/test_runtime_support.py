"""Shared helpers of the runtime tests (no tests here): tiny model variants, their bundles and
reference pipelines, built once per test process.

Variants steer the random TINY model's greedy answers by editing lm_head rows before export, so
the reference and the exported bundle see the same weights:
- "plain": the random model as built (answers run to max-new-tokens, no `[SEG]`);
- "seg": the `[SEG]` row is 1.05 x the row of token 71, which the model emits early and often,
  so answers hold one or several `[SEG]`s wherever 71 would have won;
- "eos": the EOS row is 1.05 x the row of token 84 (answers stop after two tokens on some
  images) and the `[SEG]` row is zero (never the argmax), so no mask is ever asked for;
- "video": the `[SEG]` row is 1.05 x the row of token 159, which the model emits on the frames
  of pydicom's ultrasound cine `examples_ybr_color.dcm`, so its answers there hold `[SEG]`s.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fixtures import CORPUS, random_rgb, tiny_model, tiny_tokenizer

torch = pytest.importorskip("torch")

MAX_NEW = 24
SEG_SOURCE_TOKEN = 71  # emitted early and often by the plain TINY model (seed 0)
VIDEO_SEG_SOURCE_TOKEN = 159  # emitted on the ultrasound cine frames
EOS_SOURCE_TOKEN = 84
EXPORT_SIZES = ((224, 224),)  # one validation grid keeps the export under ten seconds
CASES = [  # (image h, w, seed, prompt)
    (200, 260, 0, CORPUS[0]),
    (240, 180, 1, CORPUS[5]),
    (150, 150, 2, CORPUS[3]),
    (300, 200, 3, CORPUS[1]),
]


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="citrus-runtime-tests-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def variant_model(kind: str):
    """A fresh TINY model with the lm_head edit of `kind` (deterministic: seed 0)."""
    model = tiny_model()
    tok = model.config.tokens
    with torch.no_grad():
        weight = model.mllm.lm_head.weight  # [V, H]
        if kind == "seg":
            weight[tok.seg] = 1.05 * weight[SEG_SOURCE_TOKEN]
        elif kind == "video":
            weight[tok.seg] = 1.05 * weight[VIDEO_SEG_SOURCE_TOKEN]
        elif kind == "eos":
            weight[tok.eos] = 1.05 * weight[EOS_SOURCE_TOKEN]
            weight[tok.seg] = 0.0
        elif kind != "plain":
            raise ValueError(f"unknown variant {kind!r}")
    return model.eval()


@functools.cache
def tokenizer_file() -> Path:
    path = _workdir() / "tokenizer.json"
    tiny_tokenizer().save(str(path))
    return path


@functools.cache
def bundle(kind: str) -> Path:
    """Export variant `kind` with `export_all` and make it a bundle (manifest with components)."""
    from citrus_edge.bundle import bundle_components, write_manifest
    from citrus_edge.export import export_all

    out = _workdir() / f"bundle-{kind}"
    export_all(
        variant_model(kind),
        out,
        EXPORT_SIZES,
        source_hash=f"random:citrus-v-tiny:{kind}",
        tokenizer_json=tokenizer_file(),
    )
    write_manifest(out, {"components": bundle_components(out), "variant": kind})
    return out


def copy_bundle(kind: str, dest: Path) -> Path:
    """A private copy of a bundle that a test may alter."""
    return Path(shutil.copytree(bundle(kind), dest))


@functools.cache
def reference(kind: str, max_new_tokens: int = MAX_NEW):
    from citrus_edge.modelling.reference import ReferencePipeline

    return ReferencePipeline(
        variant_model(kind),
        tiny_tokenizer(),
        max_new_tokens=max_new_tokens,
        constrained_decoding=False,
    )


@functools.cache
def pipeline(kind: str, max_new_tokens: int = MAX_NEW):
    from citrus_edge.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(
        bundle(kind), max_new_tokens=max_new_tokens, constrained_decoding=False
    )


def case_image(case: tuple) -> np.ndarray:
    h, w, seed, _ = case
    return random_rgb(h, w, seed=seed)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; two empty masks agree perfectly."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def boundary_diameter_bruteforce(mask: np.ndarray, row_mm: float, col_mm: float) -> float:
    """Longest distance between boundary pixel centres, all pairs (the test's hand computation).

    A boundary pixel is a mask pixel with a 4-neighbour outside the mask or the image.
    """
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    neighbours = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    pts = np.argwhere(inner & ~neighbours).astype(np.float64) * [row_mm, col_mm]  # [K, 2]
    if len(pts) == 0:
        return 0.0
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    return float(d.max())
