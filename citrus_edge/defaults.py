"""Where the shipped demo model and the default phantom set live (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
# Models shipped inside the package, by the name `--model` accepts: the demo model and its
# distilled students (issue 18; README "Distillation"): `demo-lite` (3.04x fewer parameters)
# and `demo-lite-s`, demo-lite with its SAM2 Hiera pruned to half width and distilled on (3.72x).
SHIPPED_MODELS = {
    "demo": DEMO_MODEL_DIR,
    "demo-lite": Path(__file__).resolve().parent / "demo_lite",
    "demo-lite-s": Path(__file__).resolve().parent / "demo_lite_s",
}


def cache_dir() -> Path:
    """`$CITRUS_EDGE_CACHE`, else `~/.cache/citrus-edge`."""
    return Path(os.environ.get("CITRUS_EDGE_CACHE", Path.home() / ".cache" / "citrus-edge"))


def resolve_model(path: str | os.PathLike | None) -> Path:
    """A model directory given by the user, a shipped model by name (`SHIPPED_MODELS`, when no
    path of that name exists), or the shipped demo model."""
    p = Path(path) if path is not None else DEMO_MODEL_DIR
    if path is not None and str(path) in SHIPPED_MODELS and not p.exists():
        p = SHIPPED_MODELS[str(path)]
    if not (p / "config.json").is_file():
        what = "the shipped demo model" if path is None else str(p)
        raise FileNotFoundError(f"{what}: no config.json in {p} (expected a Citrus-V checkpoint)")
    return p
