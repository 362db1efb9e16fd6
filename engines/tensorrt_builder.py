"""Build the TensorRT engines of an `EnginePlan` on the device they will run on.

Uses the TensorRT 10 Python API directly: `trt.Builder`, `create_network` (STRONGLY_TYPED for
Q/DQ graphs, parsed from an fp16-carrier copy so that their unquantized layers run FP16:
`engines.float16`; needs `onnx` on the device), `trt.OnnxParser.parse_from_file`, `create_builder_config`, the workspace memory
pool, precision flags only on weakly typed networks, FP32 layer constraints, one optimisation
profile per plan profile, a timing cache shared by the components and saved after the build,
DLA with GPU fallback where planned, and `build_serialized_network`. Each engine gets a JSON
sidecar (TensorRT version, GPU name and SM, source ONNX sha256, profiles, flags) that
`compat.check_engine_compat` reads at run time.

`tensorrt` and cuda-python are imported inside `build_engines`; without them it raises
`TensorRTUnavailableError` telling the user to build on the target device.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from citrus_edge.bundle import sha256_file
from citrus_edge.targets import get_target

from .compat import (
    BUILD_COMMAND,
    ENGINE_SIDECAR_KIND,
    SIDECAR_SCHEMA,
    normalize_sm,
    rebuild_command,
)
from .compat import version_tuple as _version
from .device import CudaDevice, cuda_device, import_tensorrt, jetson_target
from .engine_errors import (
    DeviceMismatchError,
    EngineBuildError,
    EnginePlanError,
    OnnxParseError,
    TensorRTUnavailableError,
    TimingCacheError,
)
from .engine_plan import ComponentEngine, EnginePlan, verify_sources
from .engines_output import (
    AUTO,
    staged_output,
    timing_cache_path,
    write_bytes,
    write_engines_manifest,
    write_json,
)

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"  # vision.engine -> vision.engine.json


def sidecar_path(engine: Path) -> Path:
    """`dir/vision.engine` -> `dir/vision.engine.json`."""
    return Path(engine).with_name(Path(engine).name + SIDECAR_SUFFIX)


def check_device(
    plan: EnginePlan,
    device: CudaDevice,
    trt_version: str,
    bundle: str,
    module_target: str | None = None,
) -> None:
    """Refuse a GPU that is not the plan's target's, a Jetson module that is not the plan's
    target (`module_target`: the target this Jetson is; Orin AGX, NX and Nano are all sm_87),
    or a TensorRT older than the plan needs."""
    target = get_target(plan.target)
    if module_target is not None and module_target != plan.target:
        command = BUILD_COMMAND.format(bundle=bundle, target=module_target)
        raise DeviceMismatchError(
            f"the plan is for {plan.target} but this device is {device.module}, which is "
            f"{module_target}; engines must be built for the module they run on (profiles and "
            f"workspace follow its memory). For this device run:\n  {command}",
            command,
        )
    if normalize_sm(target.sm) != normalize_sm(device.sm):
        command, remark = rebuild_command(bundle, plan.target, device.sm)
        raise DeviceMismatchError(
            f"the plan is for {target.name} (sm {target.sm}) but this GPU, {device.name}, is "
            f"sm {device.sm}; engines must be built on the device they run on. For this "
            f"device run:\n  {command}{remark}",
            command,
        )
    need = plan.tensorrt
    assert need is not None  # a TensorRT plan always has it (EnginePlan validates)
    if _version(trt_version) < _version(need.minimum):
        raise TensorRTUnavailableError(
            f"TensorRT {trt_version} is older than the {need.minimum} these engines need; "
            "on Jetson Orin install JetPack 6.1 or later"
        )
    if need.expected and _version(trt_version)[:2] != _version(need.expected)[:2]:
        log.warning(
            "TensorRT %s differs from the %s that JetPack %s ships for %s; the engines will "
            "run only with TensorRT %s",
            trt_version,
            need.expected,
            need.jetpack,
            plan.target,
            trt_version,
        )


def fp16_carrier_copy(comp: ComponentEngine, path: Path, folder: Path) -> Path:
    """`path` rewritten with fp16 carriers (`engines.float16`) into `folder`: what a strongly
    typed Q/DQ component is parsed from, so that its unquantized layers run FP16. Streamed one
    weight at a time (the 8B's LLM graph is past protobuf's 2 GiB); a graph the build already
    wrote with fp16 carriers is copied as it is."""
    from .component import FP16_CARRIER_KEEP_FP32
    from .float16 import fp16_carrier_file

    keep = FP16_CARRIER_KEEP_FP32.get(comp.component, ())
    return fp16_carrier_file(path, folder / path.name, keep)


def _parse(trt: Any, builder: Any, logger: Any, comp: ComponentEngine, path: Path) -> tuple:
    """(network, parser): the parser owns the weights and must outlive the build."""
    flags = 0
    if comp.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = tuple(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise OnnxParseError(
            f"{comp.component}: TensorRT's ONNX parser rejected {path.name}:\n  "
            + "\n  ".join(errors or ("(no error reported)",)),
            errors,
        )
    return network, parser


def _parser_error(err: Any) -> str:
    node = getattr(err, "node_name", lambda: "")() or f"node {err.node()}"
    op = getattr(err, "node_operator", lambda: "")()
    return f"{node}{f' ({op})' if op else ''}: {err.desc()} [{err.code()}]"


def _force_fp32(trt: Any, network: Any, patterns: tuple[str, ...]) -> int:
    """Pin float layers whose names match `patterns` to FP32; returns how many were pinned."""
    regexes = [re.compile(p) for p in patterns]
    floats = (trt.float32, trt.float16, trt.bfloat16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not any(r.search(layer.name) for r in regexes):
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or any(o.dtype not in floats for o in outputs):
            continue  # shape / index arithmetic: no float math to protect
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    if pinned == 0:
        raise EngineBuildError(
            f"no TensorRT layer matches the FP32 patterns {patterns}; the norms would run in "
            "FP16. Update FP32_LAYER_PATTERNS in citrus_edge/engines/engine_plan.py to the layer names"
        )
    return pinned


def _add_profiles(trt: Any, builder: Any, config: Any, network: Any, comp: ComponentEngine) -> None:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    dynamic = {n for n, t in inputs.items() if any(d < 0 for d in t.shape)}
    for p in comp.profiles:
        named = {s.name for s in p.inputs}
        if named - set(inputs) or dynamic - named:
            raise EnginePlanError(
                f"{comp.component}: profile {p.name!r} sets {sorted(named)} but the network's "
                f"dynamic inputs are {sorted(dynamic)}; make the plan again from this graph"
            )
        if not p.inputs:
            continue
        profile = builder.create_optimization_profile()
        for s in p.inputs:
            profile.set_shape(s.name, s.min, s.opt, s.max)
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"{comp.component}: TensorRT refused profile {p.name!r}")


def _builder_config(trt: Any, builder: Any, network: Any, comp: ComponentEngine, plan: EnginePlan):
    """(config, number of layers pinned to FP32)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in comp.builder_flags:  # precision flags only on weakly typed networks (plan)
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in comp.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    pinned = _force_fp32(trt, network, comp.fp32_layers) if comp.fp32_layers else 0
    if comp.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = comp.dla_core
    _add_profiles(trt, builder, config, network, comp)
    return config, pinned


def _read_cache(path: Path | None) -> bytes:
    if path is None or not path.is_file():
        return b""
    return path.read_bytes()


def _attach_cache(config: Any, cache: Any, cache_bytes: bytes, path: Path | None) -> Any:
    """Attach the shared timing cache (made from `cache_bytes` on first use) to `config`."""
    if path is None:
        return None
    if cache is None:
        cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise TimingCacheError(
            f"TensorRT refused the timing cache {path} (made by another TensorRT version or "
            "GPU); move it away or pass another --timing-cache"
        )
    return cache


def _sidecar(
    plan: EnginePlan,
    comp: ComponentEngine,
    engine: Any,
    device: CudaDevice,
    trt_version: str,
    bundle: str,
    pinned: int,
    seconds: float,
) -> dict[str, Any]:
    return {
        "schema": SIDECAR_SCHEMA,
        "kind": ENGINE_SIDECAR_KIND,
        "component": comp.component,
        "engine": comp.engine,
        "engine_sha256": hashlib.sha256(engine).hexdigest(),
        "tensorrt_version": trt_version,
        "device": device.to_dict(),
        "target": plan.target,
        "bundle": bundle,
        "source_onnx": comp.onnx,
        "source_onnx_sha256": comp.onnx_sha256,
        "precision": comp.precision,
        "strongly_typed": comp.strongly_typed,
        "fp16_carrier": comp.fp16_carrier,
        "builder_flags": list(comp.builder_flags),
        "cleared_flags": list(comp.cleared_flags),
        "fp32_layers": list(comp.fp32_layers),
        "fp32_layers_pinned": pinned,
        "dla_core": comp.dla_core,
        "workspace_bytes": plan.workspace_bytes,
        "profiles": [{"index": i, **p.to_dict()} for i, p in enumerate(comp.profiles)],
        "timing_cache": plan.timing_cache,
        "build_seconds": round(seconds, 1),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def build_engines(
    plan: EnginePlan,
    bundle_dir: Path,
    out_dir: Path,
    timing_cache: Path | str | None = AUTO,
) -> dict[str, Path]:
    """Build every engine of `plan` from the graphs in `bundle_dir` into `out_dir`.

    out_dir: the engines folder (`<component>.engine` + `<component>.engine.json` sidecars +
        `engines.json`), written into a staging sibling and renamed into place when all engines
        are built; an existing engines folder is replaced.
    timing_cache: "auto" (default) for `out_dir.parent / plan.timing_cache`, a path, or None for
        no cache. It is read before and written back after the build.

    Returns {component: engine path}. Raises TensorRTUnavailableError (no TensorRT, cuda-python
    or GPU), DeviceMismatchError (this GPU is not the plan's target), EnginePlanError (the
    graphs changed since the plan), OnnxParseError, EngineBuildError, TimingCacheError.
    """
    if plan.backend != "tensorrt":
        raise EnginePlanError(f"plan for {plan.target} is an {plan.backend} plan, not TensorRT")
    bundle_dir, out_dir = Path(bundle_dir).resolve(), Path(out_dir)
    trt = import_tensorrt()
    device = cuda_device()
    check_device(plan, device, trt.__version__, str(bundle_dir), jetson_target())
    verify_sources(plan, bundle_dir)
    cache_path = timing_cache_path(timing_cache, out_dir, plan.timing_cache)
    logger = trt.Logger(trt.Logger.WARNING)
    build = _Build(trt, logger, plan, device, cache_path)
    with staged_output(out_dir) as stage:
        for comp in plan.components:
            engine, side = build.component(comp, bundle_dir)
            write_bytes(stage / comp.engine, engine)  # from TensorRT's buffer, not a copy
            write_json(sidecar_path(stage / comp.engine), side)
            del engine  # frees the builder's buffer before the next component is built
        write_engines_manifest(stage, _manifest_info(plan, bundle_dir, trt.__version__, device))
    build.save_cache()
    return {c.component: out_dir / c.engine for c in plan.components}


class _Build:
    """One TensorRT builder and one timing cache shared by the components of a plan."""

    def __init__(
        self, trt: Any, logger: Any, plan: EnginePlan, device: CudaDevice, cache_path: Path | None
    ):
        self.trt, self.builder, self.logger, self.plan = trt, trt.Builder(logger), logger, plan
        self.device, self.cache_path = device, cache_path
        self.cache_bytes = _read_cache(cache_path)
        self.cache: Any = None

    def component(self, comp: ComponentEngine, bundle_dir: Path) -> tuple[Any, dict[str, Any]]:
        """(serialized engine, sidecar) of one component.

        The engine is TensorRT's own `IHostMemory` (buffer protocol), written and hashed where it
        lies: a `bytes` copy would hold the plan twice (on Jetson, in the memory the GPU shares).
        """
        t0 = time.perf_counter()
        trt, builder = self.trt, self.builder
        with tempfile.TemporaryDirectory(prefix="citrus-fp16-") as tmp:
            source = bundle_dir / comp.onnx
            if comp.fp16_carrier:
                source = fp16_carrier_copy(comp, source, Path(tmp))
            network, parser = _parse(trt, builder, self.logger, comp, source)
            parsed = sha256_file(source) if comp.fp16_carrier else comp.onnx_sha256
        config, pinned = _builder_config(trt, builder, network, comp, self.plan)
        self.cache = _attach_cache(config, self.cache, self.cache_bytes, self.cache_path)
        log.info("%s: building %s engine on %s", comp.component, comp.precision, self.device.name)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(
                f"{comp.component}: TensorRT could not build the engine (see its log above); "
                f"workspace {self.plan.workspace_bytes} bytes, profiles "
                f"{[p.name for p in comp.profiles]}. Raise EngineOptions.workspace_fraction if "
                "the log reports too little memory"
            )
        engine = serialized
        del network, parser, config  # free the builder's network before the next component
        seconds = time.perf_counter() - t0
        log.info("%s: %d bytes in %.1f s", comp.component, memoryview(engine).nbytes, seconds)
        version = self.trt.__version__
        side = _sidecar(
            self.plan, comp, engine, self.device, version, str(bundle_dir), pinned, seconds
        )
        side["parsed_onnx_sha256"] = parsed  # the fp16-carrier copy's, where one was made
        return engine, side

    def save_cache(self) -> None:
        """Write the timing cache back (it grew by every tactic timed in this build)."""
        if self.cache is not None and self.cache_path is not None:
            write_bytes(self.cache_path, self.cache.serialize())  # IHostMemory, no copy
            log.info("timing cache saved to %s", self.cache_path)


def _manifest_info(plan: EnginePlan, bundle: Path, version: str, device: CudaDevice) -> dict:
    return {
        "backend": "tensorrt",
        "target": plan.target,
        "bundle": str(bundle),
        "tensorrt_version": version,
        "device": device.to_dict(),
        "engines": {c.component: c.engine for c in plan.components},
        "plan": plan.to_dict(),
    }
