"""Engines folders written by `citrus-edge engines build` (`citrus_edge.engines`), opened for a
bundle: TensorRT engines, or ONNX Runtime-optimized graphs for the `cpu` target.

A folder holds `engines.json` (kind, backend, target, `engines`: component -> file, `files`: the
sha256 and size of every file) and one JSON sidecar per engine naming the ONNX graph it was
built from and its sha256. Opening a folder checks every file's hash, that it was built for the
backend asked for, and that each engine's source graph is this bundle's graph, so an engine of
another model or an altered file is refused, naming the file. By default engines live beside the
bundle in `<bundle>-engines/<target>/`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citrus_edge.bundle import ENGINES_KIND, ENGINES_MANIFEST, BundleError, verify_listed_files

from .artifacts import GRAPHS, BundleArtifacts

log = logging.getLogger(__name__)


class EngineFolderError(BundleError):
    """An engines folder that is missing, altered, or not built from this bundle."""


@dataclass(frozen=True)
class SidecarRule:
    """Where an engine's sidecar is, and which of its fields holds the source graph's sha256."""

    path: Callable[[Path], Path]
    source_file: str
    source_sha256: str


# One rule per engines backend, as `citrus_edge.engines` writes them.
SIDECARS = {
    "tensorrt": SidecarRule(  # vision.engine -> vision.engine.json
        lambda p: p.with_name(p.name + ".json"), "source_onnx", "source_onnx_sha256"
    ),
    "onnxruntime": SidecarRule(  # vision.ort.onnx -> vision.ort.json
        lambda p: p.with_name(p.name.removesuffix(".onnx") + ".json"), "source", "source_sha256"
    ),
}


@dataclass(frozen=True)
class EngineFolder:
    """A verified engines folder: its manifest, one file and one sidecar per graph."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, Path]
    sidecars: dict[str, dict[str, Any]]

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def target(self) -> str:
        return self.manifest.get("target", "")


def default_engine_folder(bundle_path: Path, backend: str) -> Path:
    """The one `<bundle>-engines/<target>/` folder beside the bundle built for `backend`."""
    bundle_path = Path(bundle_path).resolve()
    root = bundle_path.parent / f"{bundle_path.name}-engines"
    found = []
    for manifest in sorted(root.glob(f"*/{ENGINES_MANIFEST}")):
        if json.loads(manifest.read_text()).get("backend") == backend:
            found.append(manifest.parent)
    if len(found) != 1:
        listed = ", ".join(str(p) for p in found) or "none"
        raise EngineFolderError(
            f"{root}: {len(found)} {backend} engines folders ({listed}); build one with "
            f"`citrus-edge engines build {bundle_path} --target TARGET`, or pass engines=FOLDER"
        )
    return found[0]


def _read_manifest(folder: Path, backend: str) -> dict[str, Any]:
    path = folder / ENGINES_MANIFEST
    if not path.is_file():
        raise EngineFolderError(f"{folder}: not an engines folder (no {ENGINES_MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != ENGINES_KIND:
        raise EngineFolderError(f"{path}: kind {manifest.get('kind')!r} is not {ENGINES_KIND!r}")
    if manifest.get("backend") != backend:
        raise EngineFolderError(
            f"{folder}: engines built for {manifest.get('backend')!r}, not {backend!r}; use "
            f"backend={manifest.get('backend')!r} or build {backend} engines"
        )
    return manifest


def _sidecar(folder: Path, engine: Path, rule: SidecarRule, artifacts: BundleArtifacts) -> dict:
    path = rule.path(engine)
    if not path.is_file():
        raise EngineFolderError(f"{engine}: no sidecar {path.name}; rebuild the engines")
    sidecar = json.loads(path.read_text())
    source = sidecar.get(rule.source_file)
    listed = artifacts.bundle.manifest["files"].get(source, {}).get("sha256")
    if listed is None or listed != sidecar.get(rule.source_sha256):
        raise EngineFolderError(
            f"{engine}: built from a graph {source!r} that is not this bundle's "
            f"({artifacts.bundle.path}); rebuild with `citrus-edge engines build "
            f"{artifacts.bundle.path}`"
        )
    return sidecar


def open_engine_folder(
    folder: Path, artifacts: BundleArtifacts, backend: str, verify: bool = True
) -> EngineFolder:
    """Open and check the engines folder of `artifacts`' bundle built for `backend`."""
    folder = Path(folder)
    manifest = _read_manifest(folder, backend)
    if verify:
        verify_listed_files(folder, manifest["files"], ENGINES_MANIFEST, EngineFolderError)
    engines = manifest.get("engines", {})
    missing = [g for g in GRAPHS if g not in engines]
    unhashed = [engines[g] for g in GRAPHS if g in engines and engines[g] not in manifest["files"]]
    if missing or unhashed:
        raise EngineFolderError(
            f"{folder}: {ENGINES_MANIFEST} lists no engine for {missing} / no sha256 for {unhashed}"
        )
    files = {g: folder / manifest["engines"][g] for g in GRAPHS}
    sidecars = {g: _sidecar(folder, files[g], SIDECARS[backend], artifacts) for g in GRAPHS}
    log.info("%s engines for %s from %s", backend, manifest.get("target"), folder)
    return EngineFolder(folder, manifest, files, sidecars)
