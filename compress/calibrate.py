"""Record the real inputs of every graph by running the FP32 runtime pipeline over a split.

Calibration is a forward loop fed from `calib_data/` (STYLE.md, habit 7): the runtime's own
`Pipeline` (the real preprocessing, prompt building, mRoPE positions and greedy decoding) runs
the FP32 export over the records, and a `RunObserver` (the runtime's public hook, passed as
`observer=`) keeps a copy of the feeds each of its four graphs received.

What is recorded, per split:
- vision: the feeds of each distinct image (the three task records of an image share them);
- llm: the prefill feeds of each record (prompt embeddings with the image features spliced in,
  3-D positions, mask, empty cache);
- sam_encoder: the SAM2 pixels of each distinct image;
- mask_decoder: the `[SEG]` states with the image features. Where an answer has no `[SEG]`
  (an untrained model, or a "no lesion" answer), a segmentation record is probed with the
  final hidden state of the last decoding step instead, so the decoder is calibrated and
  checked on what the encoder and the LLM really produce; `Outcome.probe` says so.

`FeedsReader` serves recorded feeds to ONNX Runtime / ModelOpt calibration.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from citrus_edge.atomic import link_or_copy
from citrus_edge.calib_data.data_manifest import Record
from citrus_edge.calib_data.load import load_image
from citrus_edge.host_inputs import empty_past
from citrus_edge.runtime import RunObserver

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
GRAPHS = ("vision", "llm", "sam_encoder", "mask_decoder")
EXPORT_MANIFEST = "export_manifest.json"


@dataclass
class Outcome:
    """What the pipeline answered for one record: greedy tokens and the first mask."""

    id: str
    task: str
    tokens: list[int]
    first_mask: np.ndarray | None  # [H, W] bool; None for records that are not segmentation
    probe: bool = False  # the mask came from the final hidden state, not from a [SEG]


@dataclass
class PipelineRun:
    """Outcomes of every record, and the recorded feeds of every graph."""

    outcomes: list[Outcome]
    feeds: dict[str, list[Feeds]] = field(default_factory=lambda: {g: [] for g in GRAPHS})

    @property
    def n_probes(self) -> int:
        return sum(o.probe for o in self.outcomes)


class FeedsReader:
    """An ONNX Runtime `CalibrationDataReader` over recorded feeds (also what ModelOpt takes).

    `get_next()` returns the next feeds dict, then None; `rewind()` starts over; `get_first()`
    peeks (ModelOpt). Only the graph's own input names are served.
    """

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str]):
        if not feeds:
            raise ValueError("FeedsReader needs at least one recorded sample")
        self.samples = [{n: f[n] for n in input_names} for f in feeds]
        self._it: Iterator[Feeds] = iter(self.samples)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def get_first(self) -> Feeds:
        """The first sample without advancing (ModelOpt's test run)."""
        return self.samples[0]

    def rewind(self) -> None:
        self._it = iter(self.samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.samples[start_index:end_index])

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Feeds]:
        return iter(self.samples)


def as_calibration_reader(feeds: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str]):
    """`FeedsReader` as a subclass of ORT's `CalibrationDataReader` (ModelOpt checks the type)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(FeedsReader, CalibrationDataReader):
        pass

    return _Reader(feeds, input_names)


# ---------------------------------------------------------------------------- recording


class _Recorder(RunObserver):
    """Keeps a copy of every graph's feeds: all runs of the vision encoder, the SAM2 encoder and
    the mask decoder; the LLM's prefills only (with the empty cache they imply, which the runner
    holds and does not take as feeds). Keeps the hidden state of the last LLM step for the
    mask-decoder probe."""

    def __init__(self, sinks: dict[str, list[Feeds]]):
        self.sinks = sinks
        self.text = None  # the model's TextDims, set once the pipeline is open
        self.last_hidden: np.ndarray | None = None

    def graph_run(self, component: str, feeds: Mapping[str, np.ndarray]) -> None:
        self.sinks[component].append({n: np.array(v, copy=True) for n, v in feeds.items()})

    def llm_step(self, feeds: Mapping[str, np.ndarray], cache_len: int, hidden: np.ndarray) -> None:
        if cache_len == 0:
            batch = int(np.asarray(feeds["inputs_embeds"]).shape[0])
            recorded = {n: np.array(v, copy=True) for n, v in feeds.items()}
            self.sinks["llm"].append({**recorded, **empty_past(batch, self.text)})
        self.last_hidden = hidden


@contextmanager
def bundle_view(
    export_dir: Path, scratch: Path, name: str, replace: Mapping[str, Path] | None = None
) -> Iterator[Path]:
    """A runtime bundle of an export folder: its files linked into `scratch/name`, the files
    named in `replace` (file name -> path) taken from elsewhere, plus the bundle `manifest.json`.
    The export folder itself is never written to."""
    from citrus_edge.bundle import bundle_components, write_manifest

    replace = dict(replace or {})
    view = Path(scratch) / name
    view.mkdir(parents=True)
    try:
        stale = set(replace) | {f"{n}.data" for n in replace}  # a replaced graph's old weights
        for p in Path(export_dir).iterdir():
            if p.is_file() and p.name not in stale:
                link_or_copy(p, view / p.name)
        for file_name, path in replace.items():
            link_or_copy(Path(path), view / file_name)
            if Path(f"{path}.data").is_file():
                link_or_copy(Path(f"{path}.data"), view / f"{file_name}.data")
        write_manifest(view, {"components": bundle_components(view)})
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def run_pipeline(
    bundle: Path,
    records: Sequence[Record],
    manifest_dir: Path,
    max_new_tokens: int,
    record: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PipelineRun:
    """Run the runtime pipeline (ONNX Runtime, CPU) of `bundle` over `records`.

    With `record`, the feeds of every graph are kept (`PipelineRun.feeds`, one entry per distinct
    image for the vision and SAM2 encoders). `progress(done, total)` is called after each record.
    """
    from citrus_edge.runtime import Pipeline

    run = PipelineRun(outcomes=[])
    recorder = _Recorder(run.feeds)
    pipe = Pipeline.from_bundle(bundle, max_new_tokens=max_new_tokens, observer=recorder)
    recorder.text = pipe.model_config.text
    seen: set[tuple[str, int]] = set()
    for i, rec in enumerate(records):
        sizes = {g: len(v) for g, v in run.feeds.items()}
        image = load_image(rec.abs_image(manifest_dir), frame=rec.frame)
        grounding = pipe.ground(image, rec.prompt)
        result = grounding.result
        first, probe = (result.masks[0] if result.masks else None), False
        if first is None and rec.task == "segment":
            first, probe = _probe_mask(pipe, grounding, recorder.last_hidden), True
        run.outcomes.append(Outcome(rec.id, rec.task, list(result.token_ids), first, probe))
        key = (str(rec.abs_image(manifest_dir)), rec.frame)
        if key in seen:  # same image as an earlier record: its encoder feeds are duplicates
            for g in ("vision", "sam_encoder"):
                del run.feeds[g][sizes[g] :]
        seen.add(key)
        if progress is not None:
            progress(i + 1, len(records))
    if not record:
        run.feeds = {g: [] for g in GRAPHS}
    return run


def _probe_mask(pipe, grounding, hidden: np.ndarray | None) -> np.ndarray:
    """First mask of the final hidden state (the answer had no `[SEG]`), see the module doc: the
    pipeline's SAM2 (`Pipeline.track`) on the same image, with that state as the one `[SEG]`."""
    if hidden is None:
        raise RuntimeError("the LLM ran no step, so there is no hidden state to probe with")
    probe = dataclasses.replace(grounding, seg_hidden=hidden[None].astype(np.float32))
    return pipe.track(grounding.image, probe).masks[0]
