"""Atomic writes that follow the umask (torch-free; every stage writes through these).

A file is either absent, the old version, or complete: it is written to a temporary path beside
its destination and renamed into place. A folder is assembled in a temporary sibling
(`make_staging_dir`) and renamed by its owner. `mkstemp`/`mkdtemp` create owner-only entries
(0600/0700) whatever the umask; what is renamed into place gets the mode `open`/`mkdir` would
have given (`umask_mode`), so a cart's service user can read what a build user wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def process_umask() -> int:
    """The process umask, read without changing it where Linux reports it (`/proc`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # elsewhere: set and restore; private meanwhile, never wider
    os.umask(umask)
    return umask


def umask_mode(mode: int) -> int:
    """`mode` less the process umask: what `open` (0o666) or `mkdir` (0o777) would have given."""
    return mode & ~process_umask()


def make_staging_dir(out: Path, tag: str) -> Path:
    """An empty folder beside `out` (`.<name>.<tag>-XXXX`) with a folder's usual mode."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    os.chmod(tmp, umask_mode(0o777))
    return tmp


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it replaces `path`, else it goes.

    Usage: `with atomic_path(p) as tmp: write(tmp)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) at `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write `data` as JSON (plus a final newline) at `path` atomically; returns `path`."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")
