"""Where the shipped demo model and the default phantom set live (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def cache_dir() -> Path:
    """`$CITRUS_EDGE_CACHE`, else `~/.cache/citrus-edge`."""
    return Path(os.environ.get("CITRUS_EDGE_CACHE", Path.home() / ".cache" / "citrus-edge"))


def resolve_model(path: str | os.PathLike | None) -> Path:
    """A model directory given by the user, or the shipped demo model."""
    p = Path(path) if path is not None else DEMO_MODEL_DIR
    if not (p / "config.json").is_file():
        what = "the shipped demo model" if path is None else str(p)
        raise FileNotFoundError(f"{what}: no config.json in {p} (expected a Citrus-V checkpoint)")
    return p
