"""The engines folder: written whole into a staging sibling, then renamed into place.

An interrupted build leaves no half folder and never damages the engines that were there. An
existing folder is replaced only if it is an engines folder (`engines.json`) holding nothing but
the files it lists, so no file a user put there is ever deleted.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from citrus_edge.atomic import staged_directory, write_bytes_atomic, write_json_atomic
from citrus_edge.bundle import ENGINES_KIND, ENGINES_MANIFEST, created_now, hash_listed_files

from .engine_errors import EnginePlanError

ENGINES_SCHEMA = 1
AUTO = "auto"  # the timing cache lives beside the engines folder, named by the plan


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON atomically (`citrus_edge.atomic.write_json_atomic`)."""
    return write_json_atomic(path, data)


def write_bytes(path: Path, data: Any) -> Path:
    """Write `data` (bytes or any buffer, e.g. TensorRT's `IHostMemory`, written without a copy)
    atomically: a reader never sees half a file (`citrus_edge.atomic.write_bytes_atomic`)."""
    return write_bytes_atomic(path, data)


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise EnginePlanError(f"{out} exists and is not a folder; choose another --out")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    listing = out / ENGINES_MANIFEST
    if not listing.is_file():
        raise EnginePlanError(f"{out} exists and is not an engines folder; choose another --out")
    known = set(json.loads(listing.read_text()).get("files", {})) | {ENGINES_MANIFEST}
    stray = sorted(entries - known)
    if stray:
        raise EnginePlanError(
            f"refusing to replace {out}: it holds files the engine build did not write: {stray}"
        )


def staged_output(out: Path) -> AbstractContextManager[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out` by renames.

    `out` is refused (`EnginePlanError`) on entry and again before the replacement unless it is
    absent, empty, or an engines folder holding only the files it lists.
    """
    return staged_directory(out, _check_replaceable)


def write_engines_manifest(stage: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write `engines.json` into `stage`: `info` plus the sha256 of every file there."""
    manifest = {
        "schema": ENGINES_SCHEMA,
        "kind": ENGINES_KIND,
        "created": created_now(),
        **info,
        "files": hash_listed_files(stage, ENGINES_MANIFEST, recursive=False),
    }
    write_json(Path(stage) / ENGINES_MANIFEST, manifest)
    return manifest


def timing_cache_path(
    timing_cache: Path | str | None, out_dir: Path, name: str | None
) -> Path | None:
    """Where the TensorRT timing cache is: None (no cache), "auto" (`out_dir/../name`), a path.

    The cache sits beside the engines folder, not in it, so it survives a rebuild of the folder.
    """
    if timing_cache is None:
        return None
    if timing_cache == AUTO:
        if not name:
            raise EnginePlanError("the plan names no timing cache file; pass a timing cache path")
        return Path(out_dir).parent / name
    return Path(timing_cache)
