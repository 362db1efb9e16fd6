"""The runtime's `RunObserver` hook (runtime/observe.py) and calibration's recorder on top of it.

A spying backend wraps the ONNX Runtime backend so the tests see exactly what each runner
receives, under the observer's wrappers. Asserted: the observer is told about every run with
the very feeds the runner got (same names, same order, equal arrays), the LLM steps with the
cache length before each step and the hidden state the step returned, and a `Pipeline` opened
without an observer runs the backend's own runner objects. Calibration's `_Recorder` keeps
copies: every encoder/decoder run and the LLM prefills only (cache length 0), with the empty
cache `empty_past` implies.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from test_runtime_support import CASES, bundle, case_image

from citrus_edge.host_inputs import empty_past, past_names
from citrus_edge.runtime import Pipeline, RunObserver
from citrus_edge.runtime.artifacts import open_bundle
from citrus_edge.runtime.backends import STEP_INPUTS, create_backend
from citrus_edge.runtime.observe import _ObservedGraph, _ObservedKvStep
from citrus_edge.runtime.pipeline import RuntimeConfig
from citrus_edge.timing import StageTimer

MAX_NEW = 24  # as test_runtime_support: CASES[1] then holds two [SEG]s
ENCODERS = ("vision", "sam_encoder", "mask_decoder")


# ------------------------------------------------------------------------------------ spies


class _SpyGraph:
    """The backend's graph runner, keeping a copy of each feeds dict it really receives."""

    def __init__(self, inner, calls: list, raw: list):
        self.inner, self.calls, self.raw = inner, calls, raw
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, feeds):
        self.calls.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        self.raw.append(feeds)
        return self.inner.run(feeds)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _SpyKvStep:
    """The backend's LLM runner, keeping (feeds copy, cache length before, hidden returned)."""

    def __init__(self, inner, calls: list, raw: list):
        self.inner, self.calls, self.raw = inner, calls, raw

    @property
    def cache_len(self):
        return self.inner.cache_len

    def reset(self):
        self.inner.reset()

    def __call__(self, feeds):
        before = self.inner.cache_len
        copy = {k: np.array(v, copy=True) for k, v in feeds.items()}
        logits, hidden = self.inner(feeds)
        self.calls.append((copy, before, hidden))
        self.raw.append(feeds)
        return logits, hidden

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _SpyBackend:
    """The ONNX Runtime backend whose runners are spied on; `opened` holds what it returned."""

    def __init__(self):
        self.inner = create_backend("onnxruntime")
        self.calls: dict[str, list] = {g: [] for g in (*ENCODERS, "llm")}  # copies
        self.raw: dict[str, list] = {g: [] for g in (*ENCODERS, "llm")}  # the feeds themselves
        self.opened: dict[str, object] = {}

    def open_graph(self, path, component):
        inner = self.inner.open_graph(path, component)
        runner = _SpyGraph(inner, self.calls[component], self.raw[component])
        self.opened[component] = runner
        return runner

    def open_kv_step(self, path, component):
        inner = self.inner.open_kv_step(path, component)
        runner = _SpyKvStep(inner, self.calls[component], self.raw[component])
        self.opened[component] = runner
        return runner

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _Seen(RunObserver):
    """Keeps what the observer is shown: the feeds (copied), cache lengths and hidden states."""

    def __init__(self):
        self.graphs: dict[str, list] = {g: [] for g in ENCODERS}
        self.steps: list[tuple[dict, int, np.ndarray]] = []
        self.order: list[str] = []

    def graph_run(self, component, feeds):
        self.order.append(component)
        self.graphs[component].append(
            (list(feeds), {k: np.array(v, copy=True) for k, v in feeds.items()})
        )

    def llm_step(self, feeds, cache_len, hidden):
        self.order.append("llm")
        self.steps.append(
            ({k: np.array(v, copy=True) for k, v in feeds.items()}, cache_len, hidden)
        )


def _pipeline(observer=None, kind="seg"):
    backend = _SpyBackend()
    config = RuntimeConfig(max_new_tokens=MAX_NEW, constrained_decoding=False)
    pipe = Pipeline(open_bundle(bundle(kind)), backend, config, None, observer)
    return pipe, backend


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


# ------------------------------------------------------------------------------------ tests


def test_runtime_exports_run_observer_lazily():
    import citrus_edge.runtime as runtime

    assert runtime.__all__ == ["Pipeline", "RunObserver"]
    assert runtime.RunObserver is RunObserver and isinstance(_Seen(), RunObserver)
    code = (
        "import sys; from citrus_edge.runtime import RunObserver; "
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_without_an_observer_the_runners_are_the_backends_own():
    pipe, backend = _pipeline()
    assert pipe.vision is backend.opened["vision"]
    assert pipe.llm is backend.opened["llm"]
    assert pipe.segmenter.encoder is backend.opened["sam_encoder"]
    assert pipe.segmenter.decoder is backend.opened["mask_decoder"]
    plain = Pipeline.from_bundle(bundle("seg"), max_new_tokens=MAX_NEW, constrained_decoding=False)
    for runner in (plain.vision, plain.llm, plain.segmenter.encoder, plain.segmenter.decoder):
        assert not isinstance(runner, (_ObservedGraph, _ObservedKvStep))
        assert type(runner).__module__ == "citrus_edge.runtime.ort_backend"


def test_observer_sees_exactly_the_feeds_each_runner_receives():
    seen = _Seen()
    pipe, backend = _pipeline(seen)
    assert isinstance(pipe.vision, _ObservedGraph) and isinstance(pipe.llm, _ObservedKvStep)
    assert pipe.vision.inner is backend.opened["vision"]
    assert pipe.llm.inner is backend.opened["llm"]
    # the rest of the runner interface passes through
    assert pipe.segmenter.decoder.max_leading_dim("seg_hidden") is None
    assert pipe.segmenter.encoder.input_names == backend.opened["sam_encoder"].input_names

    case = CASES[1]  # two [SEG]s on the "seg" variant
    got = pipe.ground(case_image(case), case[3])
    assert got.result.n_seg >= 2

    for g in ENCODERS:
        calls, observed = backend.calls[g], seen.graphs[g]
        assert len(calls) == len(observed) == 1, g
        names, feeds = observed[0]
        assert tuple(names) == backend.opened[g].input_names  # the graph's inputs, its order
        assert _same(feeds, {n: calls[0][n] for n in names}), g
    assert seen.graphs["mask_decoder"][0][1]["seg_hidden"].shape[0] == got.result.n_seg

    steps = backend.calls["llm"]
    assert len(steps) == len(seen.steps) == 1 + got.generation.steps  # prefill + decode steps
    for (feeds, before, hidden), (o_feeds, o_before, o_hidden) in zip(
        steps, seen.steps, strict=True
    ):
        assert _same(feeds, o_feeds) and list(o_feeds) == list(STEP_INPUTS)
        assert o_before == before and o_hidden is hidden
    lens = [s[1] for s in seen.steps]  # cache length before each step: 0, then P, P + 1, ...
    assert lens[0] == 0 and lens[1:] == list(range(lens[1], lens[1] + len(lens) - 1))
    assert lens[1] == steps[0][0]["inputs_embeds"].shape[1] > 64  # the prompt's image + text
    # order of the runs: vision, the LLM steps, then SAM2 (encoder, decoder)
    assert seen.order == ["vision", *["llm"] * len(steps), "sam_encoder", "mask_decoder"]


def test_observing_changes_no_answer():
    seen = _Seen()
    watched, _ = _pipeline(seen)
    plain, _ = _pipeline()
    for case in CASES:
        a, b = watched(case_image(case), case[3]), plain(case_image(case), case[3])
        assert a.token_ids == b.token_ids and a.text == b.text
        assert len(a.masks) == len(b.masks)
        assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
        assert a.mask_scores == b.mask_scores
    assert seen.order.count("llm") == len(seen.steps) > len(CASES)


def test_track_with_a_probe_state_is_the_segmenter_on_the_same_image():
    """calibrate's probe: `Pipeline.track` with the last hidden state as the one `[SEG]` gives
    the segmenter's own masks, and the observer sees one encoder and one decoder run."""
    seen = _Seen()
    pipe, backend = _pipeline(seen, kind="plain")
    case = CASES[0]
    got = pipe.ground(case_image(case), case[3])
    assert got.result.masks == [] and seen.graphs["sam_encoder"] == []  # no [SEG]: no SAM2
    hidden = seen.steps[-1][2]
    probe = dataclasses.replace(got, seg_hidden=hidden[None].astype(np.float32))
    masks = pipe.track(got.image, probe).masks
    direct, _ = pipe.segmenter.segment(got.image.pixels, probe.seg_hidden, StageTimer())
    assert len(masks) == len(direct) == 1 and np.array_equal(masks[0], direct[0])
    assert len(seen.graphs["sam_encoder"]) == len(seen.graphs["mask_decoder"]) == 2
    for (_, a), (_, b) in zip(
        seen.graphs["mask_decoder"][:-1], seen.graphs["mask_decoder"][1:], strict=True
    ):
        assert _same(a, b)  # the same state on the same image: the same decoder feeds
    assert np.array_equal(seen.graphs["mask_decoder"][0][1]["seg_hidden"], probe.seg_hidden)
    assert len(backend.calls["mask_decoder"]) == 2


def test_calibration_recorder_keeps_copies_and_only_prefills():
    from citrus_edge.compress.calibrate import GRAPHS, _Recorder

    sinks = {g: [] for g in GRAPHS}
    recorder = _Recorder(sinks)
    pipe, backend = _pipeline(recorder)
    recorder.text = pipe.model_config.text
    n = 3
    for case in CASES[:n]:
        pipe.ground(case_image(case), case[3])

    for g in ENCODERS:
        assert len(sinks[g]) == len(backend.calls[g]), g
        for rec, fed in zip(sinks[g], backend.calls[g], strict=True):
            assert _same(rec, {k: fed[k] for k in backend.opened[g].input_names}), g
    assert len(sinks["vision"]) == n

    prefills = [(f, c) for f, c, _ in backend.calls["llm"] if c == 0]
    assert len(prefills) == n and len(backend.calls["llm"]) > n  # decode steps ran, unrecorded
    past = past_names(pipe.model_config.text.num_layers)
    for rec, (fed, _) in zip(sinks["llm"], prefills, strict=True):
        assert list(rec) == [*STEP_INPUTS, *past]
        assert _same({k: rec[k] for k in STEP_INPUTS}, fed)
        assert _same({k: rec[k] for k in past}, empty_past(1, pipe.model_config.text))
        assert rec["inputs_embeds"].shape[1] == rec["attention_mask"].shape[1] > 64
    assert recorder.last_hidden is backend.calls["llm"][-1][2]

    # copies: no recorded array shares memory with an array the runtime fed its runners
    raw_prefills = [
        f for f, (_, c, _) in zip(backend.raw["llm"], backend.calls["llm"], strict=True) if c == 0
    ]
    pairs = [(r, f) for r, f in zip(sinks["llm"], raw_prefills, strict=True)]
    pairs += [(r, f) for g in ENCODERS for r, f in zip(sinks[g], backend.raw[g], strict=True)]
    assert len(pairs) == n + sum(len(sinks[g]) for g in ENCODERS)
    for rec, fed in pairs:
        assert not any(np.shares_memory(rec[k], np.asarray(fed[k])) for k in fed)
        assert all(rec[k] is not fed[k] for k in fed)


@pytest.mark.parametrize("kind", ["seg"])
def test_from_bundle_and_from_config_pass_the_observer(kind):
    seen = _Seen()
    pipe = Pipeline.from_bundle(bundle(kind), max_new_tokens=2, observer=seen)
    assert isinstance(pipe.vision, _ObservedGraph) and pipe.vision.observer is seen
    assert pipe.llm.observer is seen and pipe.segmenter.decoder.observer is seen
    pipe(case_image(CASES[2]), CASES[2][3])
    assert len(seen.graphs["vision"]) == 1 and [s[1] for s in seen.steps][0] == 0
    cfg_pipe = Pipeline.from_config(bundle(kind), RuntimeConfig(max_new_tokens=2), observer=seen)
    assert cfg_pipe.segmenter.encoder.observer is seen
