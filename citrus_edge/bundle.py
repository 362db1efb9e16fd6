"""Bundles: a directory of artifacts plus `manifest.json` describing and hashing every file.

Torch-free: the runtime verifies a bundle on load and refuses one that was altered. Bundles are
written into a temporary sibling directory and renamed at the end, so an interrupted build leaves
no half bundle and never damages the bundle that was there before.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"
BUNDLE_SCHEMA = 1
BUNDLE_KIND = "citrus-edge bundle"


class BundleError(ValueError):
    """A bundle directory that is missing, malformed or altered."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tool_versions(names: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of the tools that made an artifact (those installed)."""
    base = ("citrus-edge", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch")
    out = {"python": platform.python_version()}
    for name in base + names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory and parsed manifest."""

    path: Path
    manifest: dict

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    def file(self, rel: str) -> Path:
        if rel not in self.manifest["files"]:
            raise BundleError(f"{self.path}: manifest lists no file {rel!r}")
        return self.path / rel

    def component(self, name: str) -> dict:
        try:
            return self.manifest["components"][name]
        except KeyError as e:
            raise BundleError(f"{self.path}: bundle has no component {name!r}") from e


def _files_of(root: Path) -> dict[str, dict]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def bundle_id_of(files: dict[str, dict]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()[:16]


def write_manifest(root: Path, info: dict) -> dict:
    """Hash every file under `root` and write `manifest.json` with `info` merged in."""
    files = _files_of(root)
    manifest = {
        "schema": BUNDLE_SCHEMA,
        "kind": BUNDLE_KIND,
        "bundle_id": bundle_id_of(files),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
        "files": files,
    }
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)
    return manifest


def replace_directory(staging: Path, out: Path) -> None:
    """Put a finished `staging` directory at `out`, replacing a previous `out` by renames only.

    Callers check beforehand that `out`, if present, is something they wrote themselves.
    """
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(staging, out)
    shutil.rmtree(old)


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out` in one rename.

    On failure the temporary directory is removed and `out` is untouched. An existing `out` is
    replaced only if it is a bundle (has a manifest), so user directories are never deleted.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BundleError(f"{out} exists and is not a bundle; choose a new --out directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        yield tmp
        replace_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_bundle(path: Path, verify: bool = True) -> Bundle:
    """Read `manifest.json`; with `verify`, check every file's sha256 and refuse extra files."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{path}: not a citrus-edge bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf}: unreadable manifest: {e}") from e
    if manifest.get("kind") != BUNDLE_KIND or manifest.get("schema") != BUNDLE_SCHEMA:
        raise BundleError(f"{mf}: not a schema-{BUNDLE_SCHEMA} citrus-edge bundle manifest")
    if verify:
        for rel, info in manifest["files"].items():
            p = path / rel
            if not p.is_file():
                raise BundleError(f"{p}: listed in the bundle manifest but missing")
            if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
                raise BundleError(f"{p}: sha256 differs from the bundle manifest (file altered)")
        if bundle_id_of(manifest["files"]) != manifest["bundle_id"]:
            raise BundleError(f"{mf}: bundle_id does not match the listed files")
    return Bundle(path, manifest)
