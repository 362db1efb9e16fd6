"""The engines folder: written whole into a staging sibling, then renamed into place.

An interrupted build leaves no half folder and never damages the engines that were there. An
existing folder is replaced only if it is an engines folder (`engines.json`) holding nothing but
the files it lists, so no file a user put there is ever deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from citrus_edge.bundle import sha256_file

from .engine_errors import EnginePlanError

ENGINES_MANIFEST = "engines.json"
ENGINES_KIND = "citrus-edge engines"
ENGINES_SCHEMA = 1
AUTO = "auto"  # the timing cache lives beside the engines folder, named by the plan


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON via a temporary file and `os.replace`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_bytes(path: Path, data: Any) -> Path:
    """Write `data` (bytes or any buffer, e.g. TensorRT's `IHostMemory`, written without a copy)
    via a temporary file and `os.replace` (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


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


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out` in one rename."""
    out = Path(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it 0700; give it a folder's usual mode
    try:
        yield stage
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(stage, out)
            shutil.rmtree(old)
        else:
            os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def write_engines_manifest(stage: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write `engines.json` into `stage`: `info` plus the sha256 of every file there."""
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(Path(stage).iterdir())
        if p.is_file() and p.name != ENGINES_MANIFEST
    }
    manifest = {
        "schema": ENGINES_SCHEMA,
        "kind": ENGINES_KIND,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
        "files": files,
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
