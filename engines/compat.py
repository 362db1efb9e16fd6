"""Is an engine usable on this device? Pure Python: compares an engine's sidecar with the runtime.

TensorRT engines are not portable across TensorRT versions or GPUs (ANCHORS.md, "Known
pitfalls"): an engine is tuned for the GPU model it was built on, not only its SM. An engine
built for another TensorRT version, SM, GPU name or Jetson module is refused with an
`EngineMismatchError` that carries the exact command that rebuilds it on this device. Jetson
Orin AGX, NX and Nano are all sm_87 and CUDA names each GPU "Orin", so on a Jetson the module
(device tree model and memory, recorded in the sidecar's `device.module`) is compared too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from citrus_edge.targets import TARGETS

from .engine_errors import EngineMismatchError

SIDECAR_SCHEMA = 1
ENGINE_SIDECAR_KIND = "citrus-edge tensorrt engine"
BUILD_COMMAND = "citrus-edge engines build {bundle} --target {target}"


def normalize_sm(sm: Any) -> str:
    """Compute capability as "major.minor": accepts "8.7", "sm_87", "87", (8, 7), 8.7."""
    if isinstance(sm, (tuple, list)) and len(sm) == 2:
        return f"{int(sm[0])}.{int(sm[1])}"
    text = str(sm).strip().lower().removeprefix("sm_").removeprefix("sm")
    if re.fullmatch(r"\d+\.\d+", text):
        major, minor = text.split(".")
        return f"{int(major)}.{int(minor)}"
    if re.fullmatch(r"\d{2,3}", text):  # "87" -> 8.7, "110" -> 11.0
        return f"{int(text[:-1])}.{int(text[-1])}"
    raise ValueError(f"not a compute capability: {sm!r} (expected e.g. '8.7' or 'sm_87')")


def version_tuple(version: str) -> tuple[int, ...]:
    """ "10.3.0.30" -> (10, 3, 0, 30); a suffix such as "+cuda12.6" or "rc1" is ignored."""
    parts = re.match(r"\d+(\.\d+)*", str(version).strip())
    if not parts:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p) for p in parts.group(0).split("."))


def same_tensorrt(built: str, runtime: str) -> bool:
    """True when two TensorRT versions agree on every field both give (10.3.0 == 10.3.0.30)."""
    a, b = version_tuple(built), version_tuple(runtime)
    n = min(len(a), len(b))
    return (n >= 3 and a[:n] == b[:n]) or a == b


def targets_with_sm(sm: str) -> list[str]:
    """Names of the known targets whose GPU has compute capability `sm`."""
    return [t.name for t in TARGETS.values() if t.sm is not None and normalize_sm(t.sm) == sm]


def rebuild_command(bundle: str, built_target: str | None, device_sm: str) -> tuple[str, str]:
    """(command, remark): the rebuild command for this device, and what to note about it.

    The target is the engine's own when its SM is this device's, else the known target with
    this device's SM (the first, others named in the remark).
    """
    sm = normalize_sm(device_sm)
    if built_target in TARGETS and built_target in targets_with_sm(sm):
        return BUILD_COMMAND.format(bundle=bundle, target=built_target), ""
    able = targets_with_sm(sm)
    if not able:
        target = built_target or "TARGET"
        remark = f"no known target has sm {sm}; add one to citrus_edge/targets.py"
        return BUILD_COMMAND.format(bundle=bundle, target=target), remark
    remark = f" (targets with sm {sm}: {', '.join(able)})" if len(able) > 1 else ""
    return BUILD_COMMAND.format(bundle=bundle, target=able[0]), remark


def _sidecar_fields(sidecar: Mapping[str, Any]) -> tuple[str, str, str]:
    """(component, TensorRT version, SM) of a sidecar; EngineMismatchError if unreadable."""
    try:
        device = sidecar["device"]
        return str(sidecar["component"]), str(sidecar["tensorrt_version"]), str(device["sm"])
    except (KeyError, TypeError) as e:
        bundle = str(sidecar.get("bundle", "BUNDLE")) if isinstance(sidecar, Mapping) else "BUNDLE"
        target = sidecar.get("target") if isinstance(sidecar, Mapping) else None
        command = BUILD_COMMAND.format(bundle=bundle, target=target or "TARGET")
        raise EngineMismatchError(
            f"engine sidecar lacks {e}; it was not written by citrus-edge. Rebuild: {command}",
            command,
        ) from e


def check_engine_compat(
    sidecar: Mapping[str, Any],
    runtime_trt_version: str,
    device_sm: str,
    bundle: str | None = None,
    *,
    device_name: str | None = None,
    module: str | None = None,
    module_target: str | None = None,
) -> None:
    """Raise `EngineMismatchError` unless the engine was built with this TensorRT on this GPU.

    sidecar: the engine's JSON sidecar (`tensorrt_builder` writes it: `tensorrt_version`,
    `device.sm`, `device.name`, `device.module`, `target`, `bundle`). runtime_trt_version:
    `tensorrt.__version__` here. device_sm: this GPU's compute capability ("8.7", "sm_87").
    bundle: the bundle path to put in the command (default: the one the engine was built from).
    device_name: this GPU's name (compared when given). module: this Jetson's module
    (`CudaDevice.module`; None off a Jetson), compared with the sidecar's whenever either side
    has one. module_target: the target this Jetson is, for the rebuild command. The error's
    `command` attribute is the exact rebuild command.
    """
    component, built_version, built_sm = _sidecar_fields(sidecar)
    built_device = sidecar["device"]
    problems = []
    if not same_tensorrt(built_version, runtime_trt_version):
        problems.append(f"TensorRT {built_version} (this device runs {runtime_trt_version})")
    sm = normalize_sm(device_sm)
    if normalize_sm(built_sm) != sm:
        problems.append(f"sm {normalize_sm(built_sm)} (this GPU is sm {sm})")
    built_name = built_device.get("name")
    if device_name is not None and built_name is not None and built_name != device_name:
        problems.append(f"the GPU {built_name!r} (this GPU is {device_name!r})")
    built_module = built_device.get("module")
    if (module is not None or built_module is not None) and built_module != module:
        problems.append(
            f"the module {built_module or 'not recorded'} (this device is {module or 'no Jetson'})"
        )
    if not problems:
        return
    where = bundle or str(sidecar.get("bundle") or "BUNDLE")
    command, remark = rebuild_command(where, module_target or sidecar.get("target"), sm)
    raise EngineMismatchError(
        f"the {component} engine was built for {' and '.join(problems)}; TensorRT engines are "
        f"not portable across TensorRT versions or GPUs. Rebuild it on this device:\n"
        f"  {command}{remark}",
        command,
    )
