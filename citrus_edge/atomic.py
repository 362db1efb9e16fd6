"""Atomic writes that follow the umask (torch-free; every stage writes through these).

A file is either absent, the old version, or complete: it is written to a temporary path beside
its destination and renamed into place (`atomic_path`, `write_*_atomic`). A folder is assembled
in a temporary sibling (`make_staging_dir`) and put in place by renames only
(`replace_directory`, or `staged_directory` for the whole cycle). `mkstemp`/`mkdtemp` create
owner-only entries (0600/0700) whatever the umask; what is renamed into place gets the mode
`open`/`mkdir` would have given (`umask_mode`), so a cart's service user can read what a build
user wrote. This module is the one place that renames outputs into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def write_bytes_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` (bytes or any buffer, e.g. TensorRT's `IHostMemory`, written without a copy)
    at `path` atomically; returns `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link of `src` at `dst`, or a copy where links fail (another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def replace_directory(staging: Path, out: Path) -> None:
    """Put a finished `staging` directory at `out`, replacing a previous `out` by renames only.

    Callers check beforehand that `out`, if present, is something they wrote themselves
    (`citrus_edge.bundle.check_replaceable`).
    """
    staging, out = Path(staging), Path(out)
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(staging, out)
    shutil.rmtree(old)


@contextmanager
def staged_directory(out: str | os.PathLike, check: Callable[[Path], Any]) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out`; on success it replaces `out` by renames only.

    `check(out)` refuses (raises) an `out` that is not ours to replace; it runs on entry and
    again just before the replacement (a file may have been put there meanwhile). On failure
    the temporary folder is removed and `out` is untouched.
    """
    out = Path(out)
    check(out)
    tmp = make_staging_dir(out, "building")
    try:
        yield tmp
        check(out)
        replace_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
