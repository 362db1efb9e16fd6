"""Watching a pipeline's graphs run: the `RunObserver` hook.

A `Pipeline` opened with `observer=` (`from_bundle`, `from_config` or the constructor) tells the
observer about every graph run, with the feeds the graph receives; build-time stages use it
(calibration records each graph's real inputs) instead of replacing the pipeline's runners.
Without an observer nothing is wrapped: the pipeline runs the backend's runners directly.

The observer sees the runtime's own arrays, not copies: copy what you keep, and change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from .backends import GraphRunner, KvStepRunner


@runtime_checkable
class RunObserver(Protocol):
    """Told about every graph run of a `Pipeline` (see the module docstring)."""

    def graph_run(self, component: str, feeds: Mapping[str, np.ndarray]) -> None:
        """Before each run of `component` ("vision", "sam_encoder" or "mask_decoder"): its
        feeds, restricted to the graph's own input names, in the graph's input order."""
        ...

    def llm_step(self, feeds: Mapping[str, np.ndarray], cache_len: int, hidden: np.ndarray) -> None:
        """After each step of the LLM: its feeds (`STEP_INPUTS`, no `past_*`: the runner holds
        the cache), the cache length before the step (0: a prefill) and the step's final-norm
        hidden state [H]."""
        ...


class _ObservedGraph:
    """A `GraphRunner` that shows each feeds dict to the observer before running the real one."""

    def __init__(self, inner: GraphRunner, component: str, observer: RunObserver):
        self.inner, self.component, self.observer = inner, component, observer
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.observer.graph_run(self.component, {n: feeds[n] for n in self.input_names})
        return self.inner.run(feeds)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # the rest of the runner's interface, unchanged


class _ObservedKvStep:
    """A `KvStepRunner` that shows each step (feeds, cache length before it, hidden state) to the
    observer."""

    def __init__(self, inner: KvStepRunner, observer: RunObserver):
        self.inner, self.observer = inner, observer

    @property
    def cache_len(self) -> int:
        return self.inner.cache_len

    def reset(self) -> None:
        self.inner.reset()

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        cache_len = self.inner.cache_len
        logits, hidden = self.inner(feeds)
        self.observer.llm_step(feeds, cache_len, hidden)
        return logits, hidden

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # the rest of the runner's interface, unchanged


def observe_graph(runner: GraphRunner, component: str, observer: RunObserver | None) -> GraphRunner:
    """`runner` itself without an observer, else `runner` shown to `observer`."""
    return runner if observer is None else _ObservedGraph(runner, component, observer)


def observe_kv_step(runner: KvStepRunner, observer: RunObserver | None) -> KvStepRunner:
    """`runner` itself without an observer, else `runner` shown to `observer`."""
    return runner if observer is None else _ObservedKvStep(runner, observer)
