"""Valid random feeds per component, to check an optimized graph against its source.

Index inputs (vision windows, LLM positions and mask) must hold meaningful values, so each
component has a feed builder (registry `FEEDS`) built on the feed makers the export stage
validates its graphs with (`citrus_edge.component_specs`: `vision_feeds`, `llm_step_feeds`,
`normal_feeds`, on the runtime's own host code in `citrus_edge.host_inputs`; numpy only). Sizes
are small: the check is about equality of two graphs, not about realistic inputs. Dtypes and
fixed dims come from the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from citrus_edge import component_specs
from citrus_edge.component_specs import llm_step_feeds, normal_feeds

from .graph_info import GraphInfo, GraphInput

if TYPE_CHECKING:
    from citrus_edge.config import CitrusVConfig

# Sizes of the named dynamic axes in the check: two LLM steps' worth of cache, two [SEG] states.
AXIS_SIZES = {"batch": 1, "seq": 3, "past": 2, "total": 5, "n": 2}
VISION_UNITS = (2, 5)  # merge units (h, w) of the checked image: two attention windows


def _shape(inp: GraphInput, sizes: dict[str, int]) -> list[int]:
    out = []
    for d in inp.dims:
        if not isinstance(d, int) and d not in sizes:
            raise ValueError(f"input {inp.name}: no size for dynamic axis {d!r} in {sizes}")
        out.append(d if isinstance(d, int) else sizes[d])
    return out


def float_feeds(
    graph: GraphInfo, rng: np.random.Generator, sizes: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Standard-normal feeds for graphs with float inputs only (SAM2 encoder, mask decoder)."""
    sizes = sizes or AXIS_SIZES
    for inp in graph.inputs:
        if not inp.dtype.startswith("float"):
            raise ValueError(f"input {inp.name} is {inp.dtype}; pass feeds for non-float inputs")
    shapes = {inp.name: _shape(inp, sizes) for inp in graph.inputs}
    return normal_feeds(shapes, rng, {inp.name: inp.dtype for inp in graph.inputs})


def vision_feeds(
    cfg: CitrusVConfig, graph: GraphInfo, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Feeds of one image of `VISION_UNITS` merge units (`component_specs.vision_feeds`)."""
    m = cfg.vision.spatial_merge_size
    grid = (1, VISION_UNITS[0] * m, VISION_UNITS[1] * m)
    patch_dim = graph.input("pixel_values").dims[1]
    return _cast(component_specs.vision_feeds(cfg.vision, grid, patch_dim, rng), graph)


def llm_feeds(
    cfg: CitrusVConfig, graph: GraphInfo, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One step of `seq` new tokens after a cache of `past`, nothing padded
    (`component_specs.llm_step_feeds`: random embeddings, cache and position offsets)."""
    b, s, p = AXIS_SIZES["batch"], AXIS_SIZES["seq"], AXIS_SIZES["past"]
    return _cast(llm_step_feeds(cfg.text, b, s, p, 0, rng), graph)


def _cast(feeds: dict[str, np.ndarray], graph: GraphInfo) -> dict[str, np.ndarray]:
    """`feeds` in the graph's input order and dtypes."""
    return {i.name: feeds[i.name].astype(i.dtype) for i in graph.inputs}


def _float_only(
    cfg: CitrusVConfig, graph: GraphInfo, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    return float_feeds(graph, rng)


FeedBuilder = Callable[["CitrusVConfig", GraphInfo, np.random.Generator], dict[str, np.ndarray]]
FEEDS: dict[str, FeedBuilder] = {
    "vision": vision_feeds,
    "llm": llm_feeds,
    "sam_encoder": _float_only,
    "mask_decoder": _float_only,
}


def component_feeds(
    component: str, cfg: CitrusVConfig, graph: GraphInfo, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random valid feeds of `component`'s graph (registry `FEEDS`)."""
    if component not in FEEDS:
        raise ValueError(f"no feed builder for {component!r}; known: {sorted(FEEDS)}")
    return FEEDS[component](cfg, graph, np.random.default_rng(seed))
