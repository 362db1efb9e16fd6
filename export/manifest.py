"""JSON manifests beside exported artifacts, and the hashes they record (torch-free).

Every `<name>.onnx` gets `<name>.manifest.json`: component, inputs/outputs with symbolic shapes,
opset, library versions, sha256 of the graph (and of its external data), the source checkpoint
hash and the validation errors measured. Files are written to a temporary name and moved into
place with `os.replace`, so a reader never sees half a manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from citrus_edge.bundle import sha256_file, tool_versions

__all__ = [
    "MANIFEST_SCHEMA",
    "checkpoint_source_hash",
    "library_versions",
    "manifest_path",
    "random_source_hash",
    "read_manifest",
    "sha256_file",
    "umask_mode",
    "write_json_atomic",
]

MANIFEST_SCHEMA = 1
MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(artifact: Path) -> Path:
    """`dir/vision.onnx` -> `dir/vision.manifest.json`."""
    return artifact.with_name(artifact.name.split(".")[0] + MANIFEST_SUFFIX)


def checkpoint_source_hash(checkpoint_dir: Path) -> str:
    """`sha256:<hex>` of a checkpoint's safetensors (one file: its hash; shards: hash of hashes)."""
    shards = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{checkpoint_dir}: no *.safetensors files to hash")
    if len(shards) == 1:
        return "sha256:" + sha256_file(shards[0])
    listing = "".join(f"{p.name}:{sha256_file(p)}\n" for p in shards)
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def random_source_hash(config_name: str) -> str:
    """Source tag of a model with random weights built from a named config."""
    return f"random:{config_name}"


def library_versions() -> dict[str, str]:
    """Versions of the tools an export depends on, as bundles record them (package names)."""
    return tool_versions(("transformers",))


def umask_mode(mode: int) -> int:
    """`mode` less the process umask: what `open` or `mkdir` would have given (mkstemp gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON to a temporary file beside `path`, then `os.replace` it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, umask_mode(0o666))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: Path) -> dict[str, Any]:
    """Read a manifest and check its schema."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != MANIFEST_SCHEMA:
        raise ValueError(f"{path}: manifest schema {data.get('schema')!r} is not {MANIFEST_SCHEMA}")
    return data
