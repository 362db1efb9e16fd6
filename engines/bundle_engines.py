"""`citrus-edge engines build BUNDLE [--target X] [--out DIR]`: compile a bundle on the device.

Finds the engine plan the bundle carries (`manifest.json`'s `engine_plan`, and/or an
`engine_plan.json` file beside it; one plan or plans keyed by target), or plans the bundle's
graphs for `--target` when it carries none for that target, then hands the plan to the backend
its target uses (registry `BACKENDS`: TensorRT engines, or ONNX Runtime-optimized graphs for the
`cpu` target). Engines go to `<bundle>-engines/<target>/` unless `--out` says otherwise, so the
bundle itself, whose files its manifest hashes, is never modified.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citrus_edge.bundle import MANIFEST, BundleError, load_bundle
from citrus_edge.recipes import Recipe, get_recipe
from citrus_edge.targets import resolve_target

from .device import jetson_target
from .engine_errors import EnginePlanError
from .engine_plan import PLAN_FILE, EnginePlan, load_config, make_engine_plan, plans_from
from .engines_output import AUTO, ENGINES_MANIFEST, timing_cache_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltEngines:
    """What `build_bundle_engines` wrote."""

    target: str
    backend: str
    out_dir: Path
    engines: dict[str, Path]  # component -> engine (or optimized graph)
    manifest: Path  # out_dir / engines.json
    plan: EnginePlan
    timing_cache: Path | None = None


def default_out_dir(bundle_dir: Path, target: str) -> Path:
    """`<bundle>-engines/<target>` beside the bundle."""
    bundle_dir = Path(bundle_dir).resolve()
    return bundle_dir.parent / f"{bundle_dir.name}-engines" / target


def _manifest(bundle_dir: Path) -> dict[str, Any]:
    if not (bundle_dir / MANIFEST).is_file():
        return {}
    try:
        return load_bundle(bundle_dir, verify=True).manifest
    except BundleError as e:
        raise EnginePlanError(f"{bundle_dir}: {e}") from e


def stored_plans(bundle_dir: Path, manifest: dict[str, Any] | None = None) -> dict[str, EnginePlan]:
    """Plans a bundle carries, by target: `manifest["engine_plan"]` and `engine_plan.json`.

    `manifest`: the bundle manifest if already read (else it is read and verified here).
    """
    bundle_dir = Path(bundle_dir)
    manifest = _manifest(bundle_dir) if manifest is None else manifest
    plans = plans_from(manifest.get("engine_plan"))
    plan_file = bundle_dir / PLAN_FILE
    if plan_file.is_file():
        try:
            data = json.loads(plan_file.read_text())
        except json.JSONDecodeError as e:
            raise EnginePlanError(f"{plan_file}: not JSON: {e}") from e
        for target, plan in plans_from(data).items():
            if target in plans and plans[target] != plan:
                raise EnginePlanError(
                    f"{bundle_dir}: {MANIFEST} and {PLAN_FILE} hold different plans for {target}"
                )
            plans[target] = plan
    return plans


def _bundle_recipe(bundle_dir: Path, manifest: dict, plans: dict[str, EnginePlan]) -> Recipe:
    """The one recipe the bundle's plans and manifest name; EnginePlanError if not one."""
    recipes = {p.recipe for p in plans.values()}
    stored = manifest.get("recipe")
    if stored is not None:
        recipes.add(Recipe.from_dict(stored) if isinstance(stored, dict) else get_recipe(stored))
    if len(recipes) != 1:
        raise EnginePlanError(
            f"{bundle_dir}: cannot tell which recipe its graphs were made for "
            f"({len(recipes)} candidates); pass --recipe"
        )
    return recipes.pop()


def select_plan(
    bundle_dir: Path, target: str | None = None, recipe: str | Recipe | None = None
) -> EnginePlan:
    """The plan to build: the stored plan for `target` (or the only one), else a new one.

    `target`: an exact name or a family (`targets.resolve_target`); None takes, on a Jetson, the
    module this machine is (a bundle built off the device for `orin` is planned for
    orin-agx-64: on a Nano it is re-planned for orin-nano-8), elsewhere the only stored plan.
    A new plan is made from the bundle's graphs and `config.json` when the bundle carries no
    plan for `target` (with the recipe its plans or manifest name), or when `recipe` differs
    from the stored plan's.
    """
    bundle_dir = Path(bundle_dir)
    manifest = _manifest(bundle_dir)
    plans = stored_plans(bundle_dir, manifest)
    if target is not None:
        target = resolve_target(target).target.name  # a family ("orin") -> this module
    elif (here := jetson_target()) is not None:
        target = here  # on a Jetson: its own module, whatever module the bundle was planned for
    elif len(plans) != 1:
        known = ", ".join(sorted(plans)) or "none"
        raise EnginePlanError(f"{bundle_dir}: pass --target (stored plans: {known})")
    else:
        target = next(iter(plans))
    plan = plans.get(target)
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if plan is not None and recipe in (None, plan.recipe):
        return plan
    wanted = recipe or _bundle_recipe(bundle_dir, manifest, plans)
    log.info("no stored %s plan for %s; planning from %s", wanted.name, target, bundle_dir)
    return make_engine_plan(bundle_dir, target, wanted)


def _build_tensorrt(
    plan: EnginePlan, bundle_dir: Path, out: Path, timing_cache: Path | str | None
) -> dict[str, Path]:
    from .tensorrt_builder import build_engines

    return build_engines(plan, bundle_dir, out, timing_cache=timing_cache)


def _build_onnxruntime(
    plan: EnginePlan, bundle_dir: Path, out: Path, timing_cache: Path | str | None
) -> dict[str, Path]:
    from .ort_sessions import build_cpu_sessions

    return build_cpu_sessions(plan, bundle_dir, out, load_config(bundle_dir))


Backend = Callable[[EnginePlan, Path, Path, "Path | str | None"], dict[str, Path]]
BACKENDS: dict[str, Backend] = {"tensorrt": _build_tensorrt, "onnxruntime": _build_onnxruntime}


def build_bundle_engines(
    bundle_dir: Path,
    target: str | None = None,
    out: Path | None = None,
    *,
    recipe: str | None = None,
    timing_cache: Path | str | None = AUTO,
) -> BuiltEngines:
    """Compile a bundle's graphs for `target` on this machine: `citrus-edge engines build`.

    bundle_dir: the bundle (or export folder) holding the ONNX graphs and `config.json`.
    target: a target name; None takes the bundle's only stored plan.
    out: the engines folder; default `<bundle>-engines/<target>`.
    recipe: overrides the recipe of the stored plan (the graphs must be quantized for it).
    timing_cache: TensorRT only: "auto" (`<out>/../<target>.timing.cache`), a path, or None.
    """
    bundle_dir = Path(bundle_dir)
    plan = select_plan(bundle_dir, target, recipe)
    out_dir = Path(out) if out is not None else default_out_dir(bundle_dir, plan.target)
    engines = BACKENDS[plan.backend](plan, bundle_dir, out_dir, timing_cache)
    cache = None
    if plan.backend == "tensorrt":
        cache = timing_cache_path(timing_cache, out_dir, plan.timing_cache)
    log.info("built %d %s engines for %s in %s", len(engines), plan.backend, plan.target, out_dir)
    return BuiltEngines(
        plan.target, plan.backend, out_dir, engines, out_dir / ENGINES_MANIFEST, plan, cache
    )
