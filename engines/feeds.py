"""Valid random feeds per component, to check an optimized graph against its source.

Index inputs (vision windows, LLM positions and mask) must hold meaningful values, so each
component has a feed builder (registry `FEEDS`) built on the runtime's own host code
(`citrus_edge.host_inputs`, numpy only). Sizes are small: the check is about equality
of two graphs, not about realistic inputs. Dtypes and fixed dims come from the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

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
    feeds = {}
    for inp in graph.inputs:
        if not inp.dtype.startswith("float"):
            raise ValueError(f"input {inp.name} is {inp.dtype}; pass feeds for non-float inputs")
        feeds[inp.name] = rng.standard_normal(_shape(inp, sizes)).astype(inp.dtype)
    return feeds


def vision_feeds(
    cfg: CitrusVConfig, graph: GraphInfo, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Feeds of one image of `VISION_UNITS` merge units, from `host_inputs.vision_inputs`."""
    from citrus_edge.host_inputs import vision_inputs

    v = cfg.vision
    m = v.spatial_merge_size
    grid = (1, VISION_UNITS[0] * m, VISION_UNITS[1] * m)
    patch_dim = graph.input("pixel_values").dims[1]
    pixels = rng.standard_normal((grid[1] * grid[2], patch_dim)).astype(np.float32)
    feeds = vision_inputs(pixels, grid, v)
    return {i.name: feeds[i.name].astype(i.dtype) for i in graph.inputs}


def llm_feeds(
    cfg: CitrusVConfig, graph: GraphInfo, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One step of `seq` new tokens after a cache of `past` (random embeddings and cache)."""
    b, s, p = AXIS_SIZES["batch"], AXIS_SIZES["seq"], AXIS_SIZES["past"]
    feeds = {}
    for inp in graph.inputs:
        if inp.name == "position_ids":  # [3, B, S] text positions after the cache
            feeds[inp.name] = np.broadcast_to(np.arange(p, p + s), (3, b, s)).astype(inp.dtype)
        elif inp.name == "attention_mask":  # [B, P+S], nothing padded
            feeds[inp.name] = np.ones((b, p + s), dtype=inp.dtype)
        else:
            feeds[inp.name] = rng.standard_normal(_shape(inp, AXIS_SIZES)).astype(inp.dtype)
    return feeds


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
