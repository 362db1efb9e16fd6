"""Which Jetson module this machine is, from the device tree and the memory size (stdlib only).

NVIDIA's Jetson modules name themselves in `/proc/device-tree/model` (a NUL-terminated string,
e.g. "NVIDIA Jetson AGX Orin Developer Kit", "NVIDIA Jetson Orin NX Engineering Reference
Developer Kit", "NVIDIA Jetson Orin Nano Developer Kit", "NVIDIA Jetson AGX Thor Developer
Kit"). The string names the family (AGX Orin, Orin NX, Orin Nano, Thor) but not always the
memory variant (AGX Orin 32 GB and 64 GB share a developer-kit carrier), so the module is told
apart by `MemTotal` in `/proc/meminfo`, which is a little below the nominal size (the kernel and
firmware carve-outs). `citrus_edge.targets.resolve_target` turns the result into a target name.

The file-system root is a parameter (tests feed fake device-tree files under a temporary
folder); `ROOT` is read at call time, so it can also be patched.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROOT = Path("/")
DEVICE_TREE_MODEL = "proc/device-tree/model"
MEMINFO = "proc/meminfo"
GB = 1e9  # data-sheet gigabyte, as in citrus_edge.targets

# Families in the device tree's model string: (pattern, family name as `targets.FAMILIES`).
# Order matters: "AGX Orin" before "Orin NX"/"Orin Nano" would not clash, but Thor is checked
# first so that a future "AGX Thor ... Orin-compatible" string cannot read as Orin.
_FAMILY_PATTERNS = (
    (re.compile(r"\bthor\b", re.I), "thor"),
    (re.compile(r"\bagx\s+orin\b|\borin\s+agx\b", re.I), "orin-agx"),
    (re.compile(r"\borin\s+nx\b", re.I), "orin-nx"),
    (re.compile(r"\borin\s+nano\b", re.I), "orin-nano"),
)


@dataclass(frozen=True)
class JetsonModule:
    """A Jetson read from the device tree: its model string, family and memory (GB, 1e9 B).

    `family` is None for a Jetson none of our families describes (Xavier, TX2, Nano).
    `memory_gb` is None when `/proc/meminfo` could not be read.
    """

    model: str
    family: str | None
    memory_gb: float | None

    def describe(self) -> str:
        memory = "memory unknown" if self.memory_gb is None else f"{self.memory_gb:.1f} GB"
        return f"{self.model} ({memory})"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "family": self.family, "memory_gb": self.memory_gb}


def _root(root: Path | str | None) -> Path:
    return Path(ROOT if root is None else root)


def read_model(root: Path | str | None = None) -> str | None:
    """The device tree's model string, or None where there is no device tree (x86, a VM)."""
    path = _root(root) / DEVICE_TREE_MODEL
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    text = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()
    return text or None


def read_memory_gb(root: Path | str | None = None) -> float | None:
    """`MemTotal` of `/proc/meminfo` in GB (1e9 bytes; the file counts KiB), None if unreadable."""
    path = _root(root) / MEMINFO
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.M)
    return None if match is None else int(match.group(1)) * 1024 / GB


def family_of(model: str) -> str | None:
    """The family a device-tree model string names ("orin-agx", ..., "thor"), or None."""
    for pattern, family in _FAMILY_PATTERNS:
        if pattern.search(model):
            return family
    return None


def detect_jetson(root: Path | str | None = None) -> JetsonModule | None:
    """The Jetson this machine is, or None when the device tree names no NVIDIA Jetson."""
    model = read_model(root)
    if model is None or "jetson" not in model.lower():
        return None
    module = JetsonModule(model=model, family=family_of(model), memory_gb=read_memory_gb(root))
    log.debug("Jetson detected: %s", module.describe())
    return module
