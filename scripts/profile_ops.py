"""Per-operator time of each bundle graph, bundles side by side (issue 19: account for the time).

    python scripts/profile_ops.py BUNDLE [BUNDLE2 ...] [--runs N] [--threads T] [--json OUT]
        [--component NAME ...]

Each component graph of each bundle runs in ONNX Runtime on the CPU with its profiler on, with
the session settings the runtime uses (`runtime/ort_backend.py`: CPU execution provider, default
graph optimisation level, `intra_op_num_threads` = T, 0 = ONNX Runtime's choice). Feeds are the
graph spec's validation samples (`citrus_edge.component_specs`), so every graph sees the sizes it
was validated at; the LLM also gets a decode step of batch 1 after ~200 cached tokens (what a
generated token costs, which the small validation caches do not show) and a ~200-token prefill,
each profiled as a unit of its own. Each unit is warmed up once per case, then run N times; from
the profiler's "Node" events after the warm-up each node's median time per case is taken and
summed per operator type into ms per pass over the cases, share of the unit's node time, and
node count (medians: a busy 2-core machine preempts single kernels). The first line printed is the processor's instruction
sets (`citrus_edge.cpu_features`): an INT8 speed figure depends on them.

The profiler's JSON files are written in a temporary folder and deleted once parsed.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from citrus_edge.atomic import write_text_atomic
from citrus_edge.bundle import EXPORT_MANIFEST, components_of_export, load_bundle
from citrus_edge.component_specs import llm_spec, mask_decoder_spec, sam_encoder_spec, vision_spec
from citrus_edge.config import CitrusVConfig
from citrus_edge.cpu_features import describe, instruction_sets
from citrus_edge.graph_specs import Case, ExportConfig, GraphSpec

SPECS: dict[str, Callable[[CitrusVConfig, ExportConfig], GraphSpec]] = {
    "vision": vision_spec,
    "llm": llm_spec,
    "sam_encoder": sam_encoder_spec,
    "mask_decoder": mask_decoder_spec,
}
# The LLM step as the cart runs it most: one token after a cache of ~200 (image + prompt), and
# the prefill of that many tokens. The validation cases cache at most a few tokens.
DECODE_CASE = {"batch": 1, "seq": 1, "past": 200, "pad": 0}
PREFILL_CASE = {"batch": 1, "seq": 200, "past": 0, "pad": 0}
DECODE_MIN_PAST = 128  # a batch-1, seq-1 validation case with this much cache would do instead
NUMPY_DTYPE = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
FENCES = ("_fence_before", "_fence_after")


class ProfileInputError(ValueError):
    """A bundle or profile this script cannot read."""


@dataclass(frozen=True)
class Unit:
    """What one table shows: a component graph run over some cases (their sum is one run)."""

    name: str
    component: str
    cases: tuple[Case, ...]


@dataclass
class OpTimes:
    """Per operator type: ms per run, share of the unit's node time (%), distinct nodes."""

    ms: dict[str, float] = field(default_factory=dict)
    share: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    total_ms: float = 0.0  # node time per run
    run_ms: float = 0.0  # the profiler's model_run time per run (node time plus overhead)

    def to_dict(self) -> dict[str, Any]:
        ops = {op: {"ms": self.ms[op], "share": self.share[op], "nodes": self.nodes[op]}
               for op in self.ms}  # fmt: skip
        return {"ops": ops, "total_ms": self.total_ms, "run_ms": self.run_ms}


# -- profile parsing ---------------------------------------------------------------------------


def aggregate(
    events: Iterable[Mapping[str, Any]], runs: int, skip_runs: int = 0, cases: int = 1
) -> OpTimes:
    """Per operator type, the time of one pass over a unit's cases: for each node and case
    the median over `runs` repetitions, summed over nodes and cases.

    `events` is the profiler's JSON list, whose `model_run`s after the first `skip_runs` (the
    warm-up) go through the `cases` in turn, `runs` times. The median per node keeps one
    preempted kernel on a busy machine from showing up as an operator's cost (a mean did: a
    Reshape at 1.7 ms in one bundle and 0.08 ms in the other). Fence events
    (`*_fence_before/after`) are markers, not kernel time, and are left out.
    """
    if runs < 1 or cases < 1:
        raise ProfileInputError(f"runs and cases must be at least 1, got {runs} and {cases}")
    events = list(events)
    model_runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    if len(model_runs) < skip_runs + runs * cases:
        raise ProfileInputError(
            f"the profile holds {len(model_runs)} model runs, expected {skip_runs} warm-up "
            f"plus {runs} x {cases} case(s)"
        )
    kept = model_runs[skip_runs : skip_runs + runs * cases]
    starts = [e["ts"] for e in kept]
    # per (node, case): one duration per repetition
    per_node: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0] * runs)
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or e["name"].endswith(FENCES) or e["ts"] < starts[0]:
            continue
        k = bisect.bisect_right(starts, e["ts"]) - 1
        if e["ts"] > kept[k]["ts"] + kept[k]["dur"]:
            continue  # between runs, or after the last counted one
        op_of[e["name"]] = e.get("args", {}).get("op_name", "?")
        per_node[e["name"], k % cases][k // cases] += e["dur"]
    dur: dict[str, float] = defaultdict(float)
    for (name, _case), times in per_node.items():
        dur[op_of[name]] += float(np.median(times))
    total = sum(dur.values())
    run_us = sum(
        float(np.median([kept[r * cases + c]["dur"] for r in range(runs)])) for c in range(cases)
    )
    names: dict[str, set[str]] = defaultdict(set)
    for name, op in op_of.items():
        names[op].add(name)
    return OpTimes(
        ms={op: us / 1000 for op, us in dur.items()},
        share={op: 100 * us / total if total else 0.0 for op, us in dur.items()},
        nodes={op: len(n) for op, n in names.items()},
        total_ms=total / 1000,
        run_ms=run_us / 1000,
    )


# -- bundles, feeds, sessions --------------------------------------------------------------------


def bundle_graphs(path: Path) -> tuple[CitrusVConfig, dict[str, Path], str]:
    """The model config, `{component: graph file}` and recipe name of a bundle, read as the
    runtime reads them (`runtime/artifacts.py`: the manifest's components, else the export's)."""
    bundle = load_bundle(Path(path))
    if "components" in bundle.manifest:
        components = bundle.manifest["components"]
    else:
        components = components_of_export(json.loads(bundle.file(EXPORT_MANIFEST).read_text()))
    missing = [c for c in SPECS if c not in components]
    if missing:
        raise ProfileInputError(f"{path}: the bundle names no {missing} component(s)")
    config = CitrusVConfig.load(bundle.file("config.json"))
    graphs = {c: bundle.file(components[c]["file"]) for c in SPECS}
    recipe = (bundle.manifest.get("recipe") or {}).get("name", "?")
    return config, graphs, recipe


def _covers_decode(cases: Sequence[Case]) -> bool:
    return any(c["batch"] == 1 and c["seq"] == 1 and c["past"] >= DECODE_MIN_PAST for c in cases)


def units_of(spec_cases: Mapping[str, Sequence[Case]]) -> list[Unit]:
    """One unit per component over its validation cases; the LLM's long decode step and
    prefill as units of their own (the decode one only where no validation case is one)."""
    units = [Unit(c, c, tuple(cases)) for c, cases in spec_cases.items()]
    llm = tuple(spec_cases.get("llm", ()))
    if llm and not _covers_decode(llm):
        units.append(Unit(f"llm decode (seq 1, past {DECODE_CASE['past']})", "llm", (DECODE_CASE,)))
    if llm:
        units.append(Unit(f"llm prefill (seq {PREFILL_CASE['seq']})", "llm", (PREFILL_CASE,)))
    return units


def _session(graph: Path, threads: int, profile_prefix: Path):
    """A CPU session with the runtime's options (`OnnxRuntimeBackend.session`), profiling on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(
        str(graph), sess_options=options, providers=["CPUExecutionProvider"]
    )


def _cast(session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds in the graph's input dtypes, as `OrtGraph.run` casts them."""
    out = {}
    for arg in session.get_inputs():
        dtype = NUMPY_DTYPE.get(arg.type)
        if dtype is None:
            raise ProfileInputError(f"graph input {arg.name} has type {arg.type}, not fed here")
        out[arg.name] = np.ascontiguousarray(feeds[arg.name], dtype=dtype)
    return out


def profile_unit(graph: Path, spec: GraphSpec, unit: Unit, runs: int, threads: int) -> OpTimes:
    """Warm up once per case, run every case `runs` times, and aggregate the profile."""
    with tempfile.TemporaryDirectory(prefix="citrus-profile-") as tmp:
        session = _session(graph, threads, Path(tmp) / unit.component)
        feeds = [
            _cast(session, spec.make_sample(c, seed).feeds) for seed, c in enumerate(unit.cases)
        ]
        for f in feeds:
            session.run(None, f)
        for _ in range(runs):
            for f in feeds:
                session.run(None, f)
        profile = Path(session.end_profiling())
        events = json.loads(profile.read_text())
    return aggregate(events, runs, skip_runs=len(feeds), cases=len(feeds))


def profile_bundle(
    path: Path, runs: int, threads: int, components: Sequence[str] = ()
) -> tuple[str, dict[str, OpTimes]]:
    """`(recipe, {unit name: OpTimes})` for every unit of one bundle (of `components` only,
    when given)."""
    config, graphs, recipe = bundle_graphs(path)
    specs = {c: make(config, ExportConfig()) for c, make in SPECS.items()}
    units = units_of({c: s.validation_cases for c, s in specs.items()})
    results = {}
    for unit in units:
        if components and unit.component not in components:
            continue
        results[unit.name] = profile_unit(graphs[unit.component], specs[unit.component], unit,
                                          runs, threads)  # fmt: skip
        print(f"  {path}: {unit.name} {results[unit.name].total_ms:.2f} ms/run", file=sys.stderr)
    return recipe, results


# -- the table -------------------------------------------------------------------------------------


def format_unit(name: str, labels: Sequence[str], times: Sequence[OpTimes | None]) -> str:
    """One component's table: op type, then ms/run, % and nodes per bundle; totals; ratio."""
    ops = sorted(
        {op for t in times if t for op in t.ms},
        key=lambda op: -max((t.ms.get(op, 0.0) for t in times if t), default=0.0),
    )
    width = max([len("op type"), len("model_run (incl. overhead)"), *map(len, ops)])
    head = f"{'op type':<{width}}" + "".join(f" | {lab[:26]:>26}" for lab in labels)
    sub = f"{'':<{width}}" + " | {:>10} {:>7} {:>7}".format("ms/run", "%", "nodes") * len(labels)
    lines = [f"== {name}", head, sub, "-" * len(sub)]

    def cells(values: Callable[[OpTimes], tuple[str, str, str]]) -> str:
        return "".join(
            " | {:>10} {:>7} {:>7}".format(*(values(t) if t else ("-", "-", "-"))) for t in times
        )

    for op in ops:
        lines.append(f"{op:<{width}}" + cells(
            lambda t, op=op: (f"{t.ms[op]:.3f}", f"{t.share[op]:.1f}", str(t.nodes[op]))
            if op in t.ms else ("-", "-", "-")
        ))  # fmt: skip
    lines.append("-" * len(sub))
    lines.append(f"{'total (nodes)':<{width}}" + cells(
        lambda t: (f"{t.total_ms:.3f}", "100.0", str(sum(t.nodes.values())))
    ))  # fmt: skip
    lines.append(f"{'model_run (incl. overhead)':<{width}}" + cells(
        lambda t: (f"{t.run_ms:.3f}", "", "")
    ))  # fmt: skip
    if len(times) >= 2 and times[0] and times[1] and times[1].total_ms:
        lines.append(
            f"ratio {labels[0]} / {labels[1]} node time: {times[0].total_ms / times[1].total_ms:.2f}"
            + (f"  (model_run: {times[0].run_ms / times[1].run_ms:.2f})" if times[1].run_ms else "")
        )
    return "\n".join(lines)


def bundle_labels(paths: Sequence[Path], recipes: Sequence[str]) -> list[str]:
    """`<folder> (<recipe>)`, prefixed by its position where two folders share a name."""
    names = [Path(p).name for p in paths]
    clash = len(set(names)) < len(names)
    return [f"{i + 1}:{n} ({r})" if clash else f"{n} ({r})"
            for i, (n, r) in enumerate(zip(names, recipes, strict=True))]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path, help="bundle folders (manifest.json inside)")
    p.add_argument("--runs", type=int, default=5, help="profiled runs after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the tables as JSON here")
    p.add_argument("--component", action="append", choices=list(SPECS), default=[],
                   help="profile only this component's units (repeatable; default: all)")  # fmt: skip
    args = p.parse_args(argv)
    if args.runs < 1 or args.threads < 0:
        p.error("--runs must be >= 1 and --threads >= 0")
    sets = instruction_sets()
    print(describe(sets))
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, threads {args.threads or 'ORT default'}, "
          f"{args.runs} runs after 1 warm-up")  # fmt: skip
    recipes, results = [], []
    for path in args.bundles:
        try:
            recipe, times = profile_bundle(path, args.runs, args.threads, args.component)
        except ValueError as e:  # BundleError, ProfileInputError, a config that does not load
            print(f"profile_ops: {e}", file=sys.stderr)
            return 2
        recipes.append(recipe)
        results.append(times)
    labels = bundle_labels(args.bundles, recipes)
    names = list(dict.fromkeys(n for r in results for n in r))
    for name in names:
        print()
        print(format_unit(name, labels, [r.get(name) for r in results]))
    if args.json:
        doc = {
            "cpu": {**sets, "line": describe(sets)},
            "onnxruntime": ort.__version__,
            "runs": args.runs,
            "threads": args.threads,
            "bundles": [{"path": str(b), "label": lab} for b, lab in zip(args.bundles, labels, strict=True)],
            "units": {n: {lab: r[n].to_dict() for lab, r in zip(labels, results, strict=True) if n in r}
                      for n in names},
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
