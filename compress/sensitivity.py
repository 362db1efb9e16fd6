"""Which layers to give back to float when a quantized export misses its accuracy budget.

Method (chosen for cost, documented here once):

1. **Layer groups.** A graph's quantized nodes are grouped by module scope and op type:
   `/…/blocks.0/attn/qkv/MatMul` -> `/…/blocks.0/attn/qkv:MatMul` (one linear layer),
   `/…/layers.0/Add_1` -> `/…/layers.0:Add` (a block's residual adds), `/…/layer_norm1:
   LayerNormalization`; nodes at the graph's root (wrappers that flatten their blocks, e.g. the
   vision encoder's `/Add_3`) form `/:Add`. A group is the unit returned to float, so the report
   names layers and op kinds ("the residual adds of layers.0"), not anonymous node lists.
2. **Which graph.** The end-to-end metrics (Dice, tokens) are attributed by quantizing one graph
   at a time (the others FP32) on the validation split; the graph whose solo quantization is
   furthest over budget is repaired first. An SQNR bound names its graph directly.
3. **Which group: drop-one-at-a-time, top down.** Leaving a set of nodes float (all else
   quantized as now) and measuring the graph's worst output SQNR on the recorded validation
   inputs gives that set's effect in the context of the others (quantize-one-at-a-time misses
   errors that only compound). Trying every layer group would cost one graph run per group per
   step (thousands on the 8B), so the search descends: first the op kind (all Adds, all
   MatMuls, ...), then the block within it (`layers.0`, `blocks.3`, ...), then the layer group;
   at each level the child whose removal gains the most dB is followed. Each trial reuses the
   calibration: on Q/DQ graphs the group's nodes are rewired to their float inputs in memory
   (`revert_to_float`), elsewhere the graph is re-written without them.
4. Return that group to float (the quantizer re-writes the graph), re-measure everything, and
   repeat until the budget holds; the caller raises `BudgetNotMetError` when steps or groups run
   out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .calibrate import Feeds
from .fidelity import graph_fidelity
from .registry import Candidate, GraphQuantizer

log = logging.getLogger(__name__)

LEVELS = ("op kind", "block", "layer group")
SURGERY_MAX_BYTES = 1_500_000_000
_INDEXED = re.compile(r"\.\d+$")  # a module list entry: layers.0, blocks.12, mlps.3


def layer_group(candidate: Candidate) -> str:
    """The layer group of a node: `<module scope>:<op type>` (`/:<op type>` at the root)."""
    scope = candidate.name.rpartition("/")[0]
    return f"{scope or '/'}:{candidate.op_type}"


def block_of(candidate: Candidate) -> str:
    """The node's block: its scope up to the first indexed module (`…/layers.0`), else scope."""
    parts = candidate.name.rpartition("/")[0].split("/")
    for i, part in enumerate(parts):
        if _INDEXED.search(part):
            return "/".join(parts[: i + 1])
    return "/".join(parts) or "/"


def _level_key(level: str, c: Candidate) -> str:
    if level == "op kind":
        return c.op_type
    if level == "block":
        return f"{block_of(c)}:{c.op_type}"
    return layer_group(c)


def layer_groups(candidates: Sequence[Candidate], excluded: set[str]) -> dict[str, list[str]]:
    """Group -> names of its nodes that are still quantized, in graph order."""
    groups: dict[str, list[str]] = {}
    for c in candidates:
        if c.name not in excluded:
            groups.setdefault(layer_group(c), []).append(c.name)
    return groups


@dataclass(frozen=True)
class GroupEffect:
    """What leaving one group float did to its graph's worst output SQNR (dB), and the path of
    choices that led to it (level, chosen key, gain in dB, number of alternatives)."""

    component: str
    group: str
    nodes: tuple[str, ...]
    sqnr_before_db: float
    sqnr_after_db: float
    path: tuple[tuple[str, str, float, int], ...] = field(default=())

    @property
    def gain_db(self) -> float:
        return _finite(self.sqnr_after_db) - _finite(self.sqnr_before_db)

    def to_dict(self) -> dict:
        return {
            "component": self.component,
            "group": self.group,
            "nodes": list(self.nodes),
            "sqnr_before_db": self.sqnr_before_db,
            "sqnr_after_db": self.sqnr_after_db,
            "gain_db": round(self.gain_db, 3),
            "path": [
                {"level": lv, "chosen": key, "gain_db": round(g, 3), "alternatives": n}
                for lv, key, g, n in self.path
            ],
        }


def _finite(db: float) -> float:
    return float(np.clip(db, -300.0, 300.0))


def revert_to_float(
    quantized: onnx.ModelProto, original: onnx.ModelProto, nodes: set[str]
) -> bytes:
    """`quantized` serialized with `nodes` reading the float inputs they have in `original`.

    Valid for Q/DQ graphs whose quantizer keeps node names (ORT static QDQ, ModelOpt): the
    Q/DQ pairs stay for the other consumers, exactly as leaving the nodes out would place them.
    The proto is restored before returning.
    """
    float_nodes = {n.name: n for n in original.graph.node if n.name in nodes}
    # Names the graph already defines; ORT's int32 bias DQ outputs keep the float bias's name
    # (an exact stand-in: bias scale = input scale x weight scale), so those stay as they are.
    have = {i.name for i in quantized.graph.initializer}
    have |= {o for n in quantized.graph.node for o in n.output}
    weights = {i.name: i for i in original.graph.initializer}
    saved, added = [], []
    for node in quantized.graph.node:
        source = float_nodes.get(node.name)
        if source is None or source.op_type != node.op_type:
            continue
        saved.append((node, list(node.input)))
        node.ClearField("input")
        node.input.extend(source.input)
        added += [weights[i] for i in source.input if i in weights and i not in have]
        have |= set(source.input)
    try:
        quantized.graph.initializer.extend(added)
        return quantized.SerializeToString()
    finally:
        for node, inputs in saved:
            node.ClearField("input")
            node.input.extend(inputs)
        for _ in added:
            quantized.graph.initializer.pop()


def _graph_bytes(path: Path) -> int:
    """A graph file's bytes and its external data's."""
    data = Path(f"{path}.data")
    return Path(path).stat().st_size + (data.stat().st_size if data.is_file() else 0)


class _Trials:
    """Measures the worst output SQNR of one graph with sets of nodes left float."""

    def __init__(self, quantizer, excluded, reference, feeds, mode, current: Path, workdir: Path):
        self.q, self.excluded, self.reference = quantizer, set(excluded), reference
        self.feeds, self.mode, self.workdir = feeds, mode, Path(workdir)
        # In-memory surgery serializes the graph with the float weights it returns: only when the
        # quantized graph and every float weight it could take back stay below protobuf's 2 GiB
        # (the 8B-width slice's INT4 LLM is 0.5 GB, but its float lm_head alone 2.2 GB).
        small = _graph_bytes(current) + _graph_bytes(quantizer.src) < SURGERY_MAX_BYTES
        self.surgery = getattr(quantizer, "qdq_graph", False) and small
        if self.surgery:
            self.quantized = onnx.load(str(current))
            self.original = onnx.load(str(quantizer.src))
        self.count = 0

    def worst_db(self, nodes: set[str]) -> float:
        self.count += 1
        if self.surgery:
            graph = revert_to_float(self.quantized, self.original, nodes)
        else:
            graph = self.workdir / f"{self.q.component}.trial.onnx"
            self.q.write(graph, frozenset(self.excluded | nodes))
        fid = graph_fidelity(self.q.component, self.reference, graph, self.feeds, self.mode)
        return fid.worst_db


def most_sensitive_group(
    quantizer: GraphQuantizer,
    excluded: set[str],
    reference_outputs: Sequence[Mapping[str, np.ndarray]],
    feeds: Sequence[Feeds],
    mode: str,
    current: Path,
    workdir: Path,
    progress: Callable[[int], None] | None = None,
) -> GroupEffect:
    """The still-quantized layer group whose return to float gains the most dB (see the module
    docstring: op kind -> block -> layer group). `current`: the graph as written now."""
    trials = _Trials(quantizer, excluded, reference_outputs, feeds, mode, current, workdir)
    pool = [c for c in quantizer.candidates() if c.name not in excluded]
    if not pool:
        raise ValueError(f"{quantizer.component}: no quantized node left to return to float")
    before = trials.worst_db(set())
    path, after = [], before
    for depth, level in enumerate(LEVELS):
        children: dict[str, list[Candidate]] = {}
        for c in pool:
            children.setdefault(_level_key(level, c), []).append(c)
        if depth and len(children) == 1:  # no choice at this level: same nodes, same score
            scores = {next(iter(children)): after}
        else:
            scores = {k: trials.worst_db({c.name for c in v}) for k, v in children.items()}
        key = max(scores, key=lambda k: _finite(scores[k]))
        pool, after = children[key], scores[key]
        path.append((level, key, _finite(after) - _finite(before), len(children)))
        if progress is not None:
            progress(trials.count)
    log.debug("%s: %d trials, path %s", quantizer.component, trials.count, path)
    return GroupEffect(
        quantizer.component,
        layer_group(pool[0]),
        tuple(c.name for c in pool),
        before,
        after,
        tuple(path),
    )


@dataclass(frozen=True)
class SearchStep:
    """One group returned to float by the search, why, and what it changed."""

    component: str
    group: str
    nodes: tuple[str, ...]
    reason: str  # the budget bounds broken before the step
    effect: GroupEffect
    measured_before: dict
    measured_after: dict

    def to_dict(self) -> dict:
        return {
            "component": self.component,
            "group": self.group,
            "nodes": list(self.nodes),
            "reason": self.reason,
            "sqnr_gain_db": round(self.effect.gain_db, 3),
            "sqnr_before_db": self.effect.sqnr_before_db,
            "sqnr_after_db": self.effect.sqnr_after_db,
            "path": self.effect.to_dict()["path"],
            "measured_before": self.measured_before,
            "measured_after": self.measured_after,
        }
