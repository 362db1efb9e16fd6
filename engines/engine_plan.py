"""`EnginePlan`: how each exported graph becomes an engine on one target (pure Python).

A plan names, per component, the ONNX file (bundle-relative) and its sha256, the precision, whether
the network is strongly typed (explicit Q/DQ graphs: the graph's own types decide), the TensorRT
builder flags (precision flags only where the network is NOT strongly typed), the layers forced
to FP32, the optimisation profiles, the DLA core (if any) and the engine file name; and, for the
whole build, the TensorRT version the target's JetPack ships, the workspace limit and the timing
cache file. `make_engine_plan` derives it from the graphs and the target; the device builds it
with `tensorrt_builder.build_engines` (or, on the `cpu` target, `ort_sessions`).

Whole-build choices (the per-component ones are in `component.py`):
- Workspace: `WORKSPACE_FRACTION` (1/4) of the target's usable memory (memory_gb - os_reserve_gb).
  TensorRT's builder scratch competes with the weights of the network being built (on Jetson in
  the same LPDDR5); a quarter leaves the rest for weights and the OS on the 8 GB Orin Nano
  (1.375 GB workspace) and does not bind on larger targets.
- TensorRT: at least `TENSORRT_MINIMUM`; on Orin, JetPack 6.1/6.2's TensorRT 10.3 is expected
  (engines run only with the TensorRT that built them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from citrus_edge.bundle import MANIFEST, BundleError, load_bundle, sha256_file
from citrus_edge.recipes import COMPONENTS, Recipe, get_recipe
from citrus_edge.targets import TARGETS, Target, check_recipe, get_target

from . import fields as f
from .component import (
    DLA_PRECISIONS,
    ComponentEngine,
    DataFile,
    builder_flags_for,
    check_quantization,
    fp32_layers_for,
    quantized,
)
from .engine_errors import EnginePlanError
from .graph_info import read_graph
from .profiles import ProfileConfig, axis_profiles, resolve_profile

if TYPE_CHECKING:
    from citrus_edge.config import CitrusVConfig

log = logging.getLogger(__name__)

ENGINE_PLAN_VERSION = 1
PLAN_KIND = "citrus-edge engine plan"
PLAN_FILE = "engine_plan.json"  # in a bundle, beside manifest.json
EXPORT_MANIFEST = "export_manifest.json"  # written by citrus_edge.export.export_run
CONFIG_FILE = "config.json"  # the model config the export writes beside the graphs
GB = 1e9  # data-sheet gigabyte, as in citrus_edge.targets
WORKSPACE_FRACTION = 0.25
TENSORRT_MINIMUM = "10.3"  # the `tensorrt` extra's floor; the API used here is TensorRT 10's

BACKENDS = ("tensorrt", "onnxruntime")
ORT_LEVELS = ("disabled", "basic", "extended", "all")


@dataclass(frozen=True)
class TensorRTRequirement:
    """TensorRT the plan needs (`minimum`) and the one the target's JetPack ships (`expected`)."""

    minimum: str = TENSORRT_MINIMUM
    expected: str | None = None
    jetpack: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"minimum": self.minimum, "expected": self.expected, "jetpack": self.jetpack}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorRTRequirement:
        nullable = (str, type(None))
        return cls(
            minimum=f.field(d, "minimum", str, where),
            expected=f.field(d, "expected", nullable, where),
            jetpack=f.field(d, "jetpack", nullable, where),
        )


# JetPack 6.1/6.2 ship CUDA 12.6 and TensorRT 10.3 (ANCHORS.md, "Devices"). JetPack 6.0's
# TensorRT 8.6.2 is below the minimum. Thor's JetPack 7 TensorRT is not in ANCHORS.md: unknown.
_JETPACK_6 = TensorRTRequirement(expected="10.3", jetpack="6.1/6.2")
JETPACK_TENSORRT: dict[str, TensorRTRequirement] = {
    "orin-agx-64": _JETPACK_6,
    "orin-agx-32": _JETPACK_6,
    "orin-nx-16": _JETPACK_6,
    "orin-nano-8": _JETPACK_6,
}


def tensorrt_requirement(target: Target) -> TensorRTRequirement | None:
    """What TensorRT `target` builds with; None for targets without TensorRT (cpu)."""
    if not target.tensorrt:
        return None
    return JETPACK_TENSORRT.get(target.name, TensorRTRequirement())


def workspace_bytes(target: Target, fraction: float = WORKSPACE_FRACTION) -> int:
    """TensorRT workspace limit: `fraction` of (memory_gb - os_reserve_gb) GB, in bytes."""
    if not 0 < fraction <= 1:
        raise ValueError(f"workspace fraction must lie in (0, 1], got {fraction}")
    return int(target.usable_memory_gb * GB * fraction)


@dataclass(frozen=True)
class EngineOptions:
    """What the user may choose about the engines (the rest follows from target and graphs).

    profiles: token and batch budgets (`ProfileConfig`).
    workspace_fraction: share of the target's usable memory given to the TensorRT workspace.
    dla: (component, DLA core) pairs to place on DLA, e.g. (("sam_encoder", 0),).
    ort_level: ONNX Runtime graph optimisation level saved for the `cpu` target.
    """

    profiles: ProfileConfig = field(default_factory=ProfileConfig)
    workspace_fraction: float = WORKSPACE_FRACTION
    dla: tuple[tuple[str, int], ...] = ()
    ort_level: str = "extended"
    version: int = ENGINE_PLAN_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "dla", tuple((str(c), int(k)) for c, k in self.dla))
        if not 0 < self.workspace_fraction <= 1:
            raise ValueError(
                f"workspace_fraction must lie in (0, 1], got {self.workspace_fraction}"
            )
        if self.ort_level not in ORT_LEVELS:
            raise ValueError(f"ort_level {self.ort_level!r} is not one of {ORT_LEVELS}")
        if len({c for c, _ in self.dla}) != len(self.dla):
            raise ValueError(f"dla names a component twice: {self.dla}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "profiles": self.profiles.to_dict(),
            "workspace_fraction": self.workspace_fraction,
            "dla": [list(p) for p in self.dla],
            "ort_level": self.ort_level,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "options") -> EngineOptions:
        dla = []
        for i, pair in enumerate(f.field(d, "dla", list, where)):
            pair = f.check_type(pair, list, f"{where}.dla[{i}]")
            if len(pair) != 2:
                raise EnginePlanError(f"{where}.dla[{i}]: expected [component, core]")
            dla.append(
                (
                    f.check_type(pair[0], str, f"{where}.dla[{i}][0]"),
                    f.check_type(pair[1], int, f"{where}.dla[{i}][1]"),
                )
            )
        try:
            return cls(
                profiles=ProfileConfig.from_dict(
                    f.field(d, "profiles", dict, where), f"{where}.profiles"
                ),
                workspace_fraction=f.field(d, "workspace_fraction", float, where),
                dla=tuple(dla),
                ort_level=f.field(d, "ort_level", str, where),
                version=f.field(d, "version", int, where),
            )
        except ValueError as e:
            if isinstance(e, EnginePlanError):
                raise
            raise EnginePlanError(f"{where}: {e}") from e


@dataclass(frozen=True)
class EnginePlan:
    """Everything needed to build a bundle's engines for one target. Validates itself."""

    target: str
    backend: str
    recipe: Recipe
    model_config: str
    components: tuple[ComponentEngine, ...]
    options: EngineOptions = field(default_factory=EngineOptions)
    tensorrt: TensorRTRequirement | None = None
    workspace_bytes: int | None = None
    timing_cache: str | None = None  # file name of the TensorRT timing cache
    notes: tuple[str, ...] = ()
    version: int = ENGINE_PLAN_VERSION

    def __post_init__(self) -> None:
        if self.version != ENGINE_PLAN_VERSION:
            raise EnginePlanError(f"version: {self.version} is not {ENGINE_PLAN_VERSION}")
        if self.target not in TARGETS:
            raise EnginePlanError(f"target: unknown {self.target!r}; known: {', '.join(TARGETS)}")
        target = TARGETS[self.target]
        expected = "tensorrt" if target.tensorrt else "onnxruntime"
        if self.backend != expected:
            raise EnginePlanError(
                f"backend: {self.target} builds with {expected}, not {self.backend!r}"
            )
        check_recipe(target, self.recipe)  # UnsupportedPrecisionError (a ValueError)
        self._check_components(target)
        trt = self.backend == "tensorrt"
        if trt and not (isinstance(self.workspace_bytes, int) and self.workspace_bytes > 0):
            raise EnginePlanError("workspace_bytes: a TensorRT plan needs a positive byte count")
        if trt and (self.tensorrt is None or not self.timing_cache):
            raise EnginePlanError("tensorrt/timing_cache: a TensorRT plan needs both")
        if not trt and (self.workspace_bytes is not None or self.tensorrt is not None):
            raise EnginePlanError("workspace_bytes/tensorrt: only TensorRT plans have them")

    def _check_components(self, target: Target) -> None:
        names = [c.component for c in self.components]
        if sorted(names) != sorted(COMPONENTS):
            raise EnginePlanError(f"components: need each of {COMPONENTS} once, got {names}")
        for c in self.components:
            where = f"components[{c.component}]"
            if c.precision != self.recipe.precision(c.component):
                raise EnginePlanError(
                    f"{where}.precision: {c.precision} differs from recipe "
                    f"{self.recipe.name!r} ({self.recipe.precision(c.component)})"
                )
            if c.dla_core is not None and c.dla_core >= target.dla_cores:
                raise EnginePlanError(
                    f"{where}.dla_core: {self.target} has {target.dla_cores} DLA cores"
                )
            if self.backend == "onnxruntime" and (c.builder_flags or c.profiles or c.fp32_layers):
                raise EnginePlanError(f"{where}: ONNX Runtime plans take no builder flags/profiles")

    def component(self, name: str) -> ComponentEngine:
        for c in self.components:
            if c.component == name:
                return c
        raise KeyError(f"plan has no component {name!r}")

    # -- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": PLAN_KIND,
            "version": self.version,
            "target": self.target,
            "backend": self.backend,
            "recipe": self.recipe.to_dict(),
            "model_config": self.model_config,
            "tensorrt": self.tensorrt.to_dict() if self.tensorrt else None,
            "workspace_bytes": self.workspace_bytes,
            "timing_cache": self.timing_cache,
            "options": self.options.to_dict(),
            "components": [c.to_dict() for c in self.components],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> EnginePlan:
        """Inverse of `to_dict`; EnginePlanError naming the first bad field."""
        w = "plan"
        if f.field(d, "kind", str, w) != PLAN_KIND:
            raise EnginePlanError(f"plan.kind: expected {PLAN_KIND!r}, got {d['kind']!r}")
        trt = f.field(d, "tensorrt", (dict, type(None)), w)
        comps = f.field(d, "components", list, w)
        return cls(
            version=f.field(d, "version", int, w),
            target=f.field(d, "target", str, w),
            backend=f.field(d, "backend", str, w),
            recipe=_recipe_from(f.field(d, "recipe", dict, w)),
            model_config=f.field(d, "model_config", str, w),
            tensorrt=TensorRTRequirement.from_dict(trt, "plan.tensorrt") if trt else None,
            workspace_bytes=f.field(d, "workspace_bytes", (int, type(None)), w),
            timing_cache=f.field(d, "timing_cache", (str, type(None)), w),
            options=EngineOptions.from_dict(f.field(d, "options", dict, w), "plan.options"),
            components=tuple(
                ComponentEngine.from_dict(c, f"plan.components[{i}]") for i, c in enumerate(comps)
            ),
            notes=f.str_tuple(d, "notes", w),
        )

    @classmethod
    def from_json(cls, text: str) -> EnginePlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EnginePlanError(f"engine plan is not JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: Path) -> EnginePlan:
        try:
            return cls.from_json(Path(path).read_text())
        except EnginePlanError as e:
            raise EnginePlanError(f"{path}: {e}") from e


def _recipe_from(d: dict) -> Recipe:
    try:
        return Recipe.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise EnginePlanError(f"plan.recipe: {e}") from e


# -- making a plan -------------------------------------------------------------------------
def locate_graphs(root: Path) -> dict[str, str]:
    """Root-relative ONNX path of each component in a bundle or an export folder.

    Looks, in order, at a bundle `manifest.json` (`components[name]["onnx"]` or `["file"]`),
    at `export_manifest.json` (`graphs[name]["file"]`), then for `<name>.onnx`.
    """
    root = Path(root)
    found: dict[str, str] = {}
    if (root / MANIFEST).is_file():
        comps = json.loads((root / MANIFEST).read_text()).get("components") or {}
        for name, entry in comps.items():
            rel = entry.get("onnx") or entry.get("file") if isinstance(entry, dict) else None
            if name in COMPONENTS and isinstance(rel, str) and rel.endswith(".onnx"):
                found[name] = rel
    if (root / EXPORT_MANIFEST).is_file():
        graphs = json.loads((root / EXPORT_MANIFEST).read_text()).get("graphs", {})
        for name, entry in graphs.items():
            if name in COMPONENTS:
                found.setdefault(name, entry["file"])
    for name in COMPONENTS:
        if name not in found and (root / f"{name}.onnx").is_file():
            found[name] = f"{name}.onnx"
    missing = [c for c in COMPONENTS if c not in found]
    if missing:
        raise EnginePlanError(
            f"{root}: no ONNX graph for {missing} (found {sorted(found)}); pass a bundle or the "
            "folder `citrus-edge export` wrote"
        )
    return found


def _dla_core(component: str, precision: str, target: Target, options: EngineOptions) -> int | None:
    cores = dict(options.dla)
    if component not in cores:
        return None
    if target.dla_cores == 0:
        raise EnginePlanError(f"dla: {target.name} has no DLA cores; drop the DLA request")
    core = cores[component]
    if not 0 <= core < target.dla_cores:
        raise EnginePlanError(
            f"dla: core {core} for {component}; {target.name} has 0..{target.dla_cores - 1}"
        )
    if precision not in DLA_PRECISIONS:
        raise EnginePlanError(
            f"dla: {component} is {precision}; DLA builds here take {sorted(DLA_PRECISIONS)} only"
        )
    return core


def _plan_component(
    name: str,
    rel: str,
    root: Path,
    target: Target,
    recipe: Recipe,
    cfg: CitrusVConfig,
    options: EngineOptions,
) -> ComponentEngine:
    graph = read_graph(root / rel)
    precision = recipe.precision(name)
    check_quantization(name, precision, graph, "tensorrt" if target.tensorrt else "onnxruntime")
    data = tuple(
        DataFile(str(Path(rel).parent / x), sha256_file(root / Path(rel).parent / x))
        for x in graph.external_files
    )
    common = dict(
        component=name,
        onnx=rel,
        onnx_sha256=sha256_file(root / rel),
        precision=precision,
        quant_types=tuple(sorted(graph.quant_types)),
        external_data=data,
    )
    if not target.tensorrt:  # ONNX Runtime: a quantized graph carries its own types
        return ComponentEngine(
            **common,
            strongly_typed=quantized(graph),
            builder_flags=(),
            profiles=(),
            engine=f"{name}.ort.onnx",
        )
    strongly_typed = graph.has_qdq
    fp32, matched = (), 0
    if not strongly_typed:
        fp32, matched = fp32_layers_for(name, precision, graph)
    core = _dla_core(name, precision, target, options)
    if core is not None and strongly_typed:
        raise EnginePlanError(f"dla: {name}'s graph is Q/DQ; DLA takes the FP16 float graph")
    try:
        axes = axis_profiles(name, target, cfg, options.profiles)
    except ValueError as e:
        raise EnginePlanError(f"{name}: {e}") from e
    if core is not None:
        axes = tuple(a.pinned() for a in axes)
    flags, cleared = builder_flags_for(precision, strongly_typed, bool(fp32), core is not None)
    return ComponentEngine(
        **common,
        strongly_typed=strongly_typed,
        builder_flags=flags,
        cleared_flags=cleared,
        fp32_layers=fp32,
        fp32_nodes_matched=matched,
        dla_core=core,
        fp16_carrier=strongly_typed,  # its float parts in FP16, not FP32 (engines.float16)
        engine=f"{name}.engine",
        profiles=tuple(resolve_profile(a, graph.inputs, name) for a in axes),
    )


def _notes(target: Target, comps: tuple[ComponentEngine, ...]) -> tuple[str, ...]:
    notes = []
    if target.tensorrt and target.name not in JETPACK_TENSORRT:
        notes.append(f"{target.name}: the TensorRT version its platform ships is not recorded")
    for c in comps:
        if c.dla_core is not None:
            notes.append(
                f"{c.component}: DLA core {c.dla_core} with GPU fallback; layers DLA cannot run "
                "(attention) run on the GPU: check the layer placement and measure"
            )
    return tuple(notes)


def make_engine_plan(
    bundle_or_onnx_dir: Path,
    target: Target | str,
    recipe: Recipe | str,
    config: CitrusVConfig | None = None,
    options: EngineOptions | None = None,
) -> EnginePlan:
    """Plan the engines of the graphs in `bundle_or_onnx_dir` for `target` at `recipe`.

    `config` is the model config; None reads the folder's `config.json` (the export writes it).

    Reads each component's ONNX file (inputs, node names, Q/DQ types; no weights), checks the
    recipe against the target (`UnsupportedPrecisionError`) and against the graphs
    (EnginePlanError: a low-bit recipe needs Q/DQ graphs of that type, a float recipe float
    graphs), and derives flags, FP32 layers, profiles, DLA placement and workspace. A bundle
    with a `manifest.json` is verified (sha256 of every file) first.
    """
    root = Path(bundle_or_onnx_dir)
    target = get_target(target) if isinstance(target, str) else target
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    options = options or EngineOptions()
    check_recipe(target, recipe)
    if (root / MANIFEST).is_file():
        try:
            load_bundle(root, verify=True)
        except BundleError as e:
            raise EnginePlanError(f"{root}: {e}") from e
    graphs = locate_graphs(root)
    config = config if config is not None else load_config(root)
    comps = tuple(
        _plan_component(name, graphs[name], root, target, recipe, config, options)
        for name in COMPONENTS
    )
    trt = target.tensorrt
    plan = EnginePlan(
        target=target.name,
        backend="tensorrt" if trt else "onnxruntime",
        recipe=recipe,
        model_config=config.name,
        components=comps,
        options=options,
        tensorrt=tensorrt_requirement(target),
        workspace_bytes=workspace_bytes(target, options.workspace_fraction) if trt else None,
        timing_cache=f"{target.name}.timing.cache" if trt else None,
        notes=_notes(target, comps),
    )
    log.info(
        "engine plan for %s (%s, recipe %s): %s",
        target.name,
        plan.backend,
        recipe.name,
        ", ".join(f"{c.component}={c.precision}" for c in comps),
    )
    return plan


def load_config(root: Path) -> CitrusVConfig:
    """The model config a bundle or export folder carries (`config.json`)."""
    from citrus_edge.config import CitrusVConfig

    path = Path(root) / CONFIG_FILE
    if not path.is_file():
        raise EnginePlanError(f"{root}: no {CONFIG_FILE}; pass the model config explicitly")
    return CitrusVConfig.load(path)


def verify_sources(plan: EnginePlan, bundle_dir: Path) -> None:
    """Check every graph (and its external data) still has the sha256 the plan recorded."""
    for c in plan.components:
        files = [(c.onnx, c.onnx_sha256)] + [(x.file, x.sha256) for x in c.external_data]
        for rel, digest in files:
            path = Path(bundle_dir) / rel
            if not path.is_file():
                raise EnginePlanError(f"{c.component}: {path} is missing; the plan names it")
            if sha256_file(path) != digest:
                raise EnginePlanError(
                    f"{c.component}: {path} changed since the plan was made (sha256 differs); "
                    "make the plan again from this bundle"
                )


def plans_from(data: Mapping[str, Any] | None) -> dict[str, EnginePlan]:
    """Plans stored in a manifest's `engine_plan` or in `engine_plan.json`, by target.

    Accepts one plan object or an object of plans keyed by target name.
    """
    if not data:
        return {}
    if isinstance(data, Mapping) and data.get("kind") == PLAN_KIND:
        plan = EnginePlan.from_dict(dict(data))
        return {plan.target: plan}
    if not isinstance(data, Mapping):
        raise EnginePlanError("engine_plan: expected a plan object or plans keyed by target")
    plans = {}
    for key, value in data.items():
        plan = EnginePlan.from_dict(value)
        if plan.target != key:
            raise EnginePlanError(f"engine_plan.{key}: holds a plan for {plan.target}")
        plans[key] = plan
    return plans
