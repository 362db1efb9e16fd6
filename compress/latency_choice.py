"""Per-component precision chosen by latency measured on the building machine (issues 19, 20).

Whether INT8 pays on a CPU depends on the processor (VNNI/AMX integer kernels or not) and on the
graph (a graph dominated by Softmax, LayerNorm and float attention MatMuls gains little and pays
for its Quantize/Dequantize nodes): machines of one cloud instance type differ. So a CPU build
that optimises for latency times each quantized component against its FP32 graph here, and keeps
the low-bit graph only where it is faster by `MARGIN`; elsewhere the component ships FP32.

How it is timed: the runtime's own `Pipeline` (the public API; what the cart runs) opens the FP32
export and the quantized export side by side and runs them in turn over a few eval images,
rounds alternating which goes first, so a busy neighbour slows both alike. Each stage is read
from the result's `timings_ms`:
- vision: `vision_encoder`;
- llm: `prefill` + `decode` per generated token x the FP32 answer's length (a quantized LLM
  may answer in a different number of tokens; the cost per token is what the precision
  changes);
- sam_encoder, mask_decoder: from `Pipeline.track` with one `[SEG]` state (an untrained or
  "no lesion" answer has none, and the decoder must still be timed).
A component's speed-up is the median, over records x rounds, of the ratio of the two runs made
back to back (a neighbour slowing the machine for a while slows both runs of a pair alike); it
is kept only when that speed-up is at least 1 / (1 - MARGIN) and its median time is below
FP32's. The spread (interquartile range over median) of the FP32 end-to-end sum between its own
runs is recorded as the measurement's noise.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from citrus_edge.calib_data.data_manifest import Record
from citrus_edge.calib_data.load import load_image
from citrus_edge.recipes import COMPONENTS, Recipe

# The low-bit graph must be at least this much faster than FP32 (median) to be kept: below it,
# the difference is inside what two runs of the same bundle differ by on a shared machine.
MARGIN = 0.05
DEFAULT_IMAGES = 3
DEFAULT_ROUNDS = 5
MAX_NEW_TOKENS = 32
FLOAT = "fp32"


@dataclass(frozen=True)
class ComponentTiming:
    """Median ms of one component in FP32 and in the recipe's precision, and the choice."""

    component: str
    precision: str  # the recipe's
    fp32_ms: float
    quantized_ms: float
    kept: str  # the precision shipped: `precision` or "fp32"
    speedup: float  # median over the paired runs of fp32 ms / quantized ms

    def why(self) -> str:
        if self.kept == self.precision:
            return f"{self.precision} is {self.speedup:.2f}x faster than fp32 here"
        return (
            f"{self.precision} is {self.speedup:.2f}x fp32's speed here (needs "
            f">= {1 / (1 - MARGIN):.2f}x to pay)"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**d, "why": self.why()}


def paired_speedup(fp32_ms: Sequence[float], quantized_ms: Sequence[float]) -> float:
    """Median of fp32 / quantized over runs made back to back (same image, same round): a
    neighbour that slows the machine for a while slows both runs of a pair alike."""
    return statistics.median(
        f / q if q > 0 else float("inf") for f, q in zip(fp32_ms, quantized_ms, strict=True)
    )


@dataclass(frozen=True)
class LatencyChoice:
    """What was measured and the recipe it chose (`recipe`: the requested one with each
    component that did not pay set back to FP32)."""

    requested: Recipe
    recipe: Recipe
    timings: tuple[ComponentTiming, ...]
    cpu: str
    images: int
    rounds: int
    noise: float  # interquartile range / median of the end-to-end FP32 sum over runs
    end_to_end_ms: dict[str, float] = field(default_factory=dict)  # fp32, requested, chosen

    @property
    def reverted(self) -> tuple[str, ...]:
        return tuple(t.component for t in self.timings if t.kept != t.precision)

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimize": "latency",
            "margin": MARGIN,
            "requested_recipe": self.requested.to_dict(),
            "chosen_recipe": self.recipe.to_dict(),
            "components": {t.component: t.to_dict() for t in self.timings},
            "end_to_end_ms": {k: round(v, 3) for k, v in self.end_to_end_ms.items()},
            "noise": round(self.noise, 4),
            "cpu": self.cpu,
            "images": self.images,
            "rounds": self.rounds,
            "engine": "onnxruntime CPU, the runtime Pipeline",
        }


def choose(requested: Recipe, timings: Sequence[ComponentTiming], **facts: Any) -> LatencyChoice:
    """The recipe with every component whose low-bit graph did not pay set back to FP32."""
    recipe = requested
    for t in timings:
        if t.kept != t.precision:
            recipe = recipe.with_component(t.component, t.kept)
    return LatencyChoice(requested, recipe, tuple(timings), **facts)


def decide(
    component: str,
    precision: str,
    fp32_ms: float,
    quantized_ms: float,
    speedup: float | None = None,
) -> ComponentTiming:
    """Keep `precision` when it is at least `MARGIN` faster: the paired `speedup` (default:
    the ratio of the medians) at least 1 / (1 - MARGIN), and its median below FP32's."""
    if speedup is None:
        speedup = fp32_ms / quantized_ms if quantized_ms > 0 else float("inf")
    pays = speedup * (1 - MARGIN) >= 1 - 1e-9 and quantized_ms < fp32_ms
    return ComponentTiming(
        component, precision, fp32_ms, quantized_ms, precision if pays else FLOAT, speedup
    )


def component_ms(
    ground_ms: dict[str, float], track_ms: dict[str, float], steps: int, ref_steps: int
) -> dict[str, float]:
    """One record's ms per component from a `ground` and a `track` result's `timings_ms`;
    the LLM's decode time scaled to `ref_steps` tokens (the FP32 answer's length)."""
    per_token = ground_ms.get("decode", 0.0) / steps if steps else 0.0
    return {
        "vision": ground_ms["vision_encoder"],
        "llm": ground_ms["prefill"] + per_token * ref_steps,
        "sam_encoder": track_ms["sam_encoder"],
        "mask_decoder": track_ms["mask_decoder"],
    }


def measure_latency(
    fp32_bundle: Path,
    quantized_bundle: Path,
    requested: Recipe,
    records: Sequence[Record],
    data_dir: Path,
    rounds: int = DEFAULT_ROUNDS,
    progress: Callable[[int, int], None] | None = None,
) -> LatencyChoice:
    """Time `quantized_bundle` (built per `requested`) against `fp32_bundle`, component by
    component (see the module doc), and choose. `records`: distinct eval images with prompts."""
    from citrus_edge.cpu_features import describe
    from citrus_edge.runtime import Pipeline

    if not records:
        raise ValueError("latency choice needs at least one eval record to time on")
    quantized = [c for c, p in requested.items() if p != FLOAT]
    pipes = {
        v: Pipeline.from_bundle(b, max_new_tokens=MAX_NEW_TOKENS)
        for v, b in (("fp32", fp32_bundle), ("quantized", quantized_bundle))
    }
    images = [load_image(r.abs_image(data_dir), frame=r.frame) for r in records]
    hidden = pipes["fp32"].model_config.text.hidden_size
    probe = np.ones((1, hidden), np.float32)
    ref_steps: dict[int, int] = {}
    samples: dict[str, dict[str, list[float]]] = {v: {c: [] for c in COMPONENTS} for v in pipes}

    def one(variant: str, i: int) -> dict[str, float]:
        pipe = pipes[variant]
        g = pipe.ground(images[i], records[i].prompt)
        steps = len(g.result.token_ids)
        if variant == "fp32":
            ref_steps.setdefault(i, steps)
        t = pipe.track(g.image, dataclasses.replace(g, seg_hidden=probe))
        return component_ms(g.result.timings_ms, t.timings_ms, steps, ref_steps.get(i, steps))

    for i in range(len(images)):  # warm-up, and the FP32 answer lengths
        one("fp32", i), one("quantized", i)
    total = rounds * len(images)
    for r in range(rounds):
        order = ("fp32", "quantized") if r % 2 == 0 else ("quantized", "fp32")
        for i in range(len(images)):
            for v in order:
                ms = one(v, i)
                for c, x in ms.items():
                    samples[v][c].append(x)
            if progress is not None:
                progress(r * len(images) + i + 1, total)
    med = {v: {c: statistics.median(xs) for c, xs in s.items()} for v, s in samples.items()}
    timings = [
        decide(
            c,
            requested.precision(c),
            med["fp32"][c],
            med["quantized"][c],
            paired_speedup(samples["fp32"][c], samples["quantized"][c]),
        )
        for c in quantized
    ]
    # Noise: the spread of the FP32 end-to-end sum between its own runs (IQR / median).
    sums = [sum(run) for run in zip(*samples["fp32"].values(), strict=True)]
    q1, _, q3 = statistics.quantiles(sums, n=4) if len(sums) > 1 else (0.0, 0.0, 0.0)
    chosen = {t.component: t.kept for t in timings}
    e2e = {
        "fp32": sum(med["fp32"].values()),
        "requested": sum(
            med["quantized"][c] if c in chosen else med["fp32"][c] for c in COMPONENTS
        ),
        "chosen": sum(
            med["quantized"][c] if chosen.get(c, FLOAT) != FLOAT else med["fp32"][c]
            for c in COMPONENTS
        ),
    }
    return choose(
        requested,
        timings,
        cpu=describe(),
        images=len(images),
        rounds=rounds,
        noise=(q3 - q1) / statistics.median(sums) if sums else 0.0,
        end_to_end_ms=e2e,
    )


def distinct_images(records: Sequence[Record], n: int = DEFAULT_IMAGES) -> list[Record]:
    """The first record of each of the first `n` distinct images (one prompt per image)."""
    seen, out = set(), []
    for r in records:
        key = (r.image, r.frame)
        if key not in seen:
            seen.add(key)
            out.append(r)
        if len(out) == n:
            break
    return out
