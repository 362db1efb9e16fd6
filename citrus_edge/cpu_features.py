"""The processor's instruction sets that decide ONNX Runtime's CPU kernels (stdlib only).

A CPU speed figure means little without them: ONNX Runtime picks its INT8 GEMM (MLAS) by what the
processor offers -- AVX2 alone, AVX-VNNI, AVX-512 VNNI or AMX -- so the same INT8 bundle can be
faster or slower than FP32 depending on the machine. Every speed figure the project prints
carries `describe(instruction_sets())` beside it (issue 19).

Linux only reads `/proc/cpuinfo`; elsewhere, or when it cannot be read, the sets are reported
as unknown. Nothing here raises: a missing description must never stop a measurement.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

CPUINFO = "/proc/cpuinfo"
UNKNOWN = "unknown"

# The /proc/cpuinfo flags that matter for ONNX Runtime's CPU kernels, with their display names,
# in the order they are shown.
FLAGS = {
    "fma": "FMA",
    "f16c": "F16C",
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512bw": "AVX-512BW",
    "avx_vnni": "VNNI(AVX)",
    "avx512_vnni": "VNNI(AVX-512)",
    "avx512_bf16": "BF16(AVX-512)",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
}


def _cpuinfo_text() -> str | None:
    """`/proc/cpuinfo` on Linux, else None (other OSes, or unreadable)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _first_block(text: str) -> dict[str, str]:
    """The `key : value` lines of the first processor block (all cores report the same flags)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _count_processors(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.partition(":")[0].strip() == "processor")


def instruction_sets(text: str | None = None) -> dict[str, Any]:
    """`{"model": str, "cores": int | None, "flags": {flag: bool}, "source": str}`.

    `text` is a cpuinfo text (tests pass a fake one); without it `/proc/cpuinfo` is read. When
    no cpuinfo is available the model is "unknown", flags is empty and `source` says why.
    `cores` is the number of logical processors cpuinfo lists (else `os.cpu_count()`).
    """
    if text is None:
        text = _cpuinfo_text()
        source = CPUINFO
    else:
        source = "given text"
    if not text:
        return {
            "model": UNKNOWN,
            "cores": os.cpu_count(),
            "flags": {},
            "source": f"{UNKNOWN} (no {CPUINFO} on {platform.system() or sys.platform})",
        }
    fields = _first_block(text)
    present = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name", UNKNOWN),
        "cores": _count_processors(text) or os.cpu_count(),
        "flags": {flag: flag in present for flag in FLAGS},
        "source": source,
    }


def describe(sets: dict[str, Any] | None = None) -> str:
    """One line: model, the instruction sets present (display names), and the core count, e.g.
    "Intel(R) Xeon(R) Processor: FMA F16C AVX2 AVX-512 ... AMX-INT8, 2 cores"."""
    sets = instruction_sets() if sets is None else sets
    flags = sets.get("flags") or {}
    cores = sets.get("cores")
    tail = f", {cores} cores" if cores else ""
    if not flags:
        return f"{sets.get('model', UNKNOWN)}: instruction sets unknown{tail}"
    names = [label for flag, label in FLAGS.items() if flags.get(flag)]
    shown = " ".join(names) if names else "none of " + " ".join(FLAGS.values())
    return f"{sets.get('model', UNKNOWN)}: {shown}{tail}"
