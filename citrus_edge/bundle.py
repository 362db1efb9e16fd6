"""Bundles: a directory of artifacts plus `manifest.json` describing and hashing every file.

Torch-free: the runtime verifies a bundle on load and refuses one that was altered. Bundles are
written into a temporary sibling directory and renamed at the end, so an interrupted build leaves
no half bundle and never damages the bundle that was there before. An existing output folder is
replaced only when its listing says that we wrote it and it holds nothing else
(`check_replaceable`, shared by bundles, exports and quantized exports): a user's files are
never deleted. Everything written follows the process umask (`umask_mode`).

`bundle_id` (schema 2) names what defines a bundle, so two builds of the same inputs get the same
id: the sha256 of every listed file except the *records* (`is_record`: `export_manifest.json`,
`quantize_report.json` and the `<component>.manifest.json` files, which hold timings, scratch
paths and measurements), together with the manifest's `target`, `recipe` and `components`. A
changed weight, graph, table, tokenizer, config, engine plan, target or recipe changes it;
timings never do. Every file, records included, is still verified by its sha256 on load. Schema-1
bundles (id over every file) still load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from citrus_edge import atomic
from citrus_edge.atomic import replace_directory as replace_directory  # importable from here
from citrus_edge.atomic import write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BUNDLE_SCHEMA = 2
READABLE_SCHEMAS = (1, 2)  # 1: bundle_id over every file
BUNDLE_KIND = "citrus-edge bundle"
# Files that record how a bundle was made (timings, scratch paths, measurements): hashed and
# verified like every file, but not part of the bundle_id.
RECORD_FILES = frozenset({"export_manifest.json", "quantize_report.json"})
RECORD_SUFFIX = ".manifest.json"
# Manifest fields that define the bundle besides its files (part of the bundle_id).
DEFINING_FIELDS = ("target", "recipe", "components")
SIGTERM_EXIT = 128 + signal.SIGTERM  # the shell's status for a process ended by SIGTERM
# An engines folder (`citrus_edge.engines` writes it, the runtime opens it): its listing.
ENGINES_MANIFEST = "engines.json"
ENGINES_KIND = "citrus-edge engines"


class BundleError(ValueError):
    """A bundle directory that is missing, malformed or altered."""


class OutputFolderError(FileExistsError):
    """An output folder that exists and is not ours to replace (it would lose a user's files)."""


class Terminated(SystemExit):
    """SIGTERM arrived while `sigterm_cleanup` was active: raised so every `finally` runs.

    A `SystemExit` with status 143: the process ends without a traceback, as SIGTERM asked,
    after its temporary folders are removed.
    """


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


def hash_listed_files(root: Path, exclude: str, recursive: bool = True) -> dict[str, dict]:
    """`{relative POSIX path: {"sha256", "bytes"}}` for every file under `root` (only its top
    level unless `recursive`), in sorted order, leaving out files named `exclude` (the listing).
    """
    root = Path(root)
    paths = sorted(root.rglob("*") if recursive else root.iterdir())
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in paths
        if p.is_file() and p.name != exclude
    }


def created_now() -> str:
    """The `"created"` stamp of a listing: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def verify_listed_files(
    folder: Path, files: dict[str, dict], label: str, error: type[Exception] = BundleError
) -> None:
    """Check that every file a listing names exists with its size and sha256, raising `error`
    naming the file and the listing (`label`, e.g. "the bundle manifest") otherwise."""
    for rel, info in files.items():
        p = Path(folder) / rel
        if not p.is_file():
            raise error(f"{p}: listed in {label} but missing")
        if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            raise error(f"{p}: sha256 differs from {label} (file altered)")


def is_record(rel: str) -> bool:
    """A file that records how the bundle was made (not part of the bundle_id)."""
    name = PurePosixPath(rel).name
    return name in RECORD_FILES or name.endswith(RECORD_SUFFIX)


def bundle_id_of(manifest: dict[str, Any]) -> str:
    """The id of a manifest's bundle: see the module docstring (schema 1: every file)."""
    files = manifest["files"]
    h = hashlib.sha256()
    if manifest.get("schema", BUNDLE_SCHEMA) == 1:
        for rel in sorted(files):
            h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
        return h.hexdigest()[:16]
    for rel in sorted(r for r in files if not is_record(r)):
        h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
    defining = {k: manifest.get(k) for k in DEFINING_FIELDS}
    h.update(json.dumps(defining, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def write_manifest(root: Path, info: dict) -> dict:
    """Hash every file under `root` and write `manifest.json` with `info` merged in."""
    manifest = {
        "schema": BUNDLE_SCHEMA,
        "kind": BUNDLE_KIND,
        "bundle_id": "",
        "created": created_now(),
        **info,
        "files": hash_listed_files(root, MANIFEST),
    }
    manifest["bundle_id"] = bundle_id_of(manifest)
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


# -- output folders: replace only our own ------------------------------------------------------


def foreign_entries(folder: Path, listed: Iterable[str]) -> list[str]:
    """Entries under `folder` (relative POSIX paths) that are neither a listed file nor a folder
    holding one: what replacing `folder` would delete that its writer did not write.

    Symbolic links are entries, never followed; a folder is reported with a trailing "/".
    """
    listed = set(listed)
    holders = {str(p) for rel in listed for p in PurePosixPath(rel).parents} - {"."}
    stray: list[str] = []

    def walk(path: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                if rel in holders:
                    walk(Path(entry.path), rel + "/")
                else:
                    stray.append(rel + "/")
            elif rel not in listed:
                stray.append(rel)

    walk(Path(folder), "")
    return stray


def _listing(path: Path, kind: str | None) -> set[str] | None:
    """The relative paths a folder's listing names, or None if it is not a listing of `kind`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or (kind is not None and data.get("kind") != kind):
        return None
    files = data.get("files")
    if not isinstance(files, (dict, list)) or not all(isinstance(f, str) for f in files):
        return None
    if any(PurePosixPath(f).is_absolute() or ".." in PurePosixPath(f).parts for f in files):
        return None
    return set(files)


def check_replaceable(
    out: Path, listing: str, kind: str | None, writer: str, hint: str
) -> set[str] | None:
    """Refuse to replace `out` unless it is absent, an empty folder, or a folder `writer` wrote.

    Ours means: `out/listing` is a JSON manifest (of `kind`, when given) whose `"files"` name
    everything else under `out`. Returns the listed paths (None: absent or empty). Raises
    `OutputFolderError` naming the files that are not ours; `hint` says what to do instead.
    Call it before any long work, and again just before the replacement.
    """
    out = Path(out)
    if not out.exists():
        return None
    if not out.is_dir():
        raise OutputFolderError(f"{out} exists and is not a folder; {hint}")
    if not any(out.iterdir()):
        return None
    listed = _listing(out / listing, kind)
    if listed is None:
        found = foreign_entries(out, ())
        shown = found[:10] + ([f"... {len(found) - 10} more"] if len(found) > 10 else [])
        what = f"{listing} of kind {kind!r}" if kind else listing
        raise OutputFolderError(
            f"refusing to replace {out}: it is not a folder {writer} wrote (no {what}) and "
            f"holds {shown}; {hint}"
        )
    stray = foreign_entries(out, listed | {listing})
    if stray:
        raise OutputFolderError(
            f"refusing to replace {out}: it holds files {writer} did not write: {stray}; {hint}"
        )
    return listed


def check_bundle_out(out: Path) -> None:
    """Refuse a bundle output `out` that exists and is not a bundle holding only its files.

    Cheap (no hashing, no imports): `build` calls it before any work, so a wrong `--out` is
    refused in well under a second instead of after the export and quantization.
    """
    check_replaceable(
        Path(out),
        MANIFEST,
        BUNDLE_KIND,
        "citrus-edge build",
        "move them away or choose another --out folder",
    )


def staged_directory(out: Path) -> AbstractContextManager[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out` in one rename.

    On failure the temporary directory is removed and `out` is untouched. An existing `out` is
    replaced only if it is a bundle holding nothing but the files its manifest lists
    (`check_bundle_out`, checked on entry and again before the rename), so a user's files are
    never deleted. (`citrus_edge.atomic.staged_directory` with the bundle's check.)
    """
    return atomic.staged_directory(out, check_bundle_out)


@contextmanager
def sigterm_cleanup() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` (as Ctrl-C raises KeyboardInterrupt),
    so `finally` blocks remove temporary folders before the process ends with status 143.

    Only replaces the default action (a process killed outright leaves its temporary folders):
    a handler someone else installed, an ignored SIGTERM, a nested use and threads other than
    the main one (where no handler can be set) are left alone. The previous handler is restored
    on exit; a second SIGTERM during the cleanup is ignored so the cleanup completes.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    received = False

    def terminate(signum: int, frame: Any) -> None:
        nonlocal received
        received = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(SIGTERM_EXIT)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except BaseException as e:
        if not received:
            raise
        log.warning("SIGTERM: stopped; temporary folders removed, earlier outputs untouched")
        if isinstance(e, Terminated):
            raise
        # Raised inside C code (e.g. during an extension module's import, which pybind11
        # reports as "ImportError: initialization failed"), `Terminated` comes back as
        # another exception: the process still ends as SIGTERM asked, without a traceback.
        raise Terminated(SIGTERM_EXIT) from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def load_bundle(path: Path, verify: bool = True) -> Bundle:
    """Read `manifest.json`; with `verify`, check every file's sha256 and the bundle_id."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{path}: not a citrus-edge bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf}: unreadable manifest: {e}") from e
    if manifest.get("kind") != BUNDLE_KIND or manifest.get("schema") not in READABLE_SCHEMAS:
        raise BundleError(
            f"{mf}: not a citrus-edge bundle manifest of schema {READABLE_SCHEMAS}; rebuild "
            "the bundle with this citrus-edge"
        )
    if verify:
        verify_listed_files(path, manifest["files"], "the bundle manifest")
        if bundle_id_of(manifest) != manifest["bundle_id"]:
            raise BundleError(f"{mf}: bundle_id does not match the listed files")
    return Bundle(path, manifest)


# -- the export folder a bundle is made from ---------------------------------------------------
EXPORT_MANIFEST = "export_manifest.json"  # the listing of an export folder (`export_all`)
EXPORT_KIND = "export_bundle"
EMBEDDINGS = "embeddings"


def bundle_components(export_dir: Path) -> dict[str, dict[str, Any]]:
    """The bundle manifest's `"components"` mapping for an `export_all` folder.

    `write_manifest(export_dir, {"components": bundle_components(export_dir)})` makes the folder
    a bundle. Reads `export_manifest.json` only.
    """
    export = json.loads((Path(export_dir) / EXPORT_MANIFEST).read_text())
    return components_of_export(export)


def components_of_export(export: dict[str, Any]) -> dict[str, dict[str, Any]]:
    precision = export.get("precision", "float32")
    components = {
        name: {"file": g["file"], "precision": precision} for name, g in export["graphs"].items()
    }
    components[EMBEDDINGS] = {"file": export["embeddings"]["file"], "precision": precision}
    return components
