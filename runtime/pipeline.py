"""The grounding pipeline on the cart: image + prompt -> text, boxes, masks, measurements.

Torch-free. Every step is the reference's own host code (`preprocess`, `prompts`, `positions`
through `citrus_edge.host_inputs`, `postprocess`, `boxes`) around the bundle's four graphs:

    image ─ qwen_pixels ─ vision ─┐
    prompt ─ prompt_ids ─ embed ──┴ llm prefill ─ greedy steps (KV cache on the device)
    prompt's task ─ grammar ─────────────────────────┘ (token mask: answers parse in its format)
                                        │ tokens ─ text ─ boxes (original pixels)
                                        └ [SEG] states ─ mask_decoder (all at once) ─ masks
    image ─ sam_pixels ─ sam_encoder (once, only if any [SEG]) ─┘          └ measurements (mm)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from citrus_edge.boxes import parse_boxes
from citrus_edge.calib_data.load import LoadedImage
from citrus_edge.calib_data.spacing import PixelSpacing
from citrus_edge.grammar import AnswerGrammars
from citrus_edge.host_inputs import llm_prefill_inputs, vision_inputs
from citrus_edge.preprocess import check_image_size, qwen_pixels
from citrus_edge.prompts import (
    DEFAULT_MAX_CONTEXT_TOKENS,
    ContextLimit,
    n_image_tokens,
    prompt_ids,
)
from citrus_edge.quality import answer_warnings, assess, image_warnings, mask_warnings
from citrus_edge.result import GroundingResult
from citrus_edge.timing import StageTimer

from .artifacts import GRAPHS, BundleArtifacts, open_bundle
from .backends import Backend, create_backend
from .decode import Generation, greedy_generate
from .engine_folder import EngineFolder, default_engine_folder, open_engine_folder
from .inputs import ImageInput, input_record, load_input
from .measure import measure_image
from .observe import RunObserver, observe_graph, observe_kv_step
from .segment import Segmenter

log = logging.getLogger(__name__)

RUNTIME_CONFIG_VERSION = 1


@dataclass(frozen=True)
class RuntimeConfig:
    """How a bundle is run. `providers` apply to the onnxruntime backend only."""

    backend: str = "onnxruntime"
    providers: tuple[str, ...] | None = None
    max_new_tokens: int = 96
    # Tokens one answer may hold: prompt (template + image + text) + max_new_tokens; the model's
    # own context (max_position_embeddings) applies too. Default 2048: see prompts.
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS
    engines: str | None = None  # engines folder (`citrus-edge engines build`); see from_bundle
    verify_bundle: bool = True  # sha256 of every file on load; refuse an altered bundle
    # The product tasks' answers decode under their format's grammar (citrus_edge.grammar), so
    # they always parse; False decodes every prompt freely (to measure what the model alone says).
    constrained_decoding: bool = True
    version: int = RUNTIME_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_context_tokens <= self.max_new_tokens:
            raise ValueError(
                f"max_context_tokens {self.max_context_tokens} leaves no room for a prompt "
                f"beside max_new_tokens {self.max_new_tokens}; raise it or lower max_new_tokens"
            )
        if self.version != RUNTIME_CONFIG_VERSION:
            raise ValueError(
                f"runtime config version {self.version} is not {RUNTIME_CONFIG_VERSION}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _engines(
    artifacts: BundleArtifacts, backend: Backend, config: RuntimeConfig
) -> EngineFolder | None:
    """The engines folder to run, checked against the bundle and this machine, or None."""
    folder = config.engines
    if folder is None and not backend.requires_engines:
        return None
    if folder is None:
        folder = default_engine_folder(artifacts.bundle.path, backend.engine_backend)
    engines = open_engine_folder(
        Path(folder), artifacts, backend.engine_backend, verify=config.verify_bundle
    )
    for component, sidecar in engines.sidecars.items():
        backend.check_engine(sidecar, engines.files[component])
    return engines


@dataclass
class Grounding:
    """A result plus what video mode and benchmarks reuse: the `[SEG]` states and the image."""

    result: GroundingResult
    seg_hidden: np.ndarray  # [N_seg, H] float32
    image: LoadedImage
    generation: Generation
    judged_not_us: bool = False  # the grammar overrode a "not ultrasound" first choice


class Pipeline:
    """A bundle opened on one backend; call it with an image and a prompt."""

    def __init__(
        self,
        artifacts: BundleArtifacts,
        backend: Backend,
        config: RuntimeConfig,
        engines: EngineFolder | None = None,
        observer: RunObserver | None = None,
    ):
        """`observer` (`observe.RunObserver`) is told about every graph run; without one the
        backend's runners run unwrapped."""
        self.artifacts, self.backend, self.config = artifacts, backend, config
        self.engines = engines
        self.model_config = artifacts.config
        self.tokenizer = artifacts.tokenizer
        files = engines.files if engines else {g: artifacts.graph_file(g) for g in GRAPHS}

        def graph(component: str):
            return observe_graph(
                backend.open_graph(files[component], component), component, observer
            )

        self.vision = graph("vision")
        self.llm = observe_kv_step(backend.open_kv_step(files["llm"], "llm"), observer)
        self.segmenter = Segmenter(graph("sam_encoder"), graph("mask_decoder"), artifacts.config)
        cfg = artifacts.config
        self.grammars = (
            AnswerGrammars(self.tokenizer, cfg.tokens.seg, cfg.tokens.eos, cfg.text.vocab_size)
            if config.constrained_decoding
            else None
        )
        self.load_ms: dict[str, float] = {}

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        backend: str = "onnxruntime",
        providers: list[str] | tuple[str, ...] | None = None,
        max_new_tokens: int = 96,
        engines: str | Path | None = None,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
        observer: RunObserver | None = None,
        constrained_decoding: bool = True,
    ) -> Pipeline:
        """Verify the bundle at `path` and open its graphs on `backend`.

        `engines` is a folder from `citrus-edge engines build`: required by `tensorrt` (default:
        the one `<bundle>-engines/<target>/` holding TensorRT engines), optional for
        `onnxruntime` (the `cpu` target's optimized graphs; default: the bundle's ONNX graphs).
        `max_context_tokens` caps prompt (template + image + text) + `max_new_tokens`, as does
        the model's context; a call past either raises `PromptTooLongError` before any graph runs.
        `observer` (`RunObserver`) is told about every graph run (see `observe`).
        `constrained_decoding` keeps the product tasks' answers inside their format's grammar.

        Raises `BundleError` naming an altered or missing file (bundle or engines folder),
        `UnknownBackendError`, `OnnxRuntimeSetupError` / `TensorRTSetupError` when the backend
        cannot run as asked (a requested provider is never silently replaced by another), and
        `EngineMismatchError` for an engine built for another GPU or TensorRT.
        """
        cfg = RuntimeConfig(
            backend=backend,
            providers=providers,
            max_new_tokens=max_new_tokens,
            engines=None if engines is None else str(engines),
            max_context_tokens=max_context_tokens,
            constrained_decoding=constrained_decoding,
        )
        return cls.from_config(path, cfg, observer=observer)

    @classmethod
    def from_config(
        cls, path: str | Path, config: RuntimeConfig, observer: RunObserver | None = None
    ) -> Pipeline:
        """`from_bundle` with a `RuntimeConfig`; `load_ms` records the load stages."""
        timer = StageTimer()
        with timer.stage("open_bundle"):
            artifacts = open_bundle(Path(path), verify=config.verify_bundle)
        with timer.stage("create_backend"):
            backend = create_backend(config.backend, config.providers)
        with timer.stage("open_engines"):
            engines = _engines(artifacts, backend, config)
        with timer.stage("open_graphs"):
            pipeline = cls(artifacts, backend, config, engines, observer)
        pipeline.load_ms = timer.ms
        log.info(
            "bundle %s (%s) on %s loaded in %.0f ms",
            artifacts.bundle_id,
            artifacts.config.name,
            backend.label,
            sum(timer.ms.values()),
        )
        return pipeline

    @property
    def bundle_id(self) -> str:
        return self.artifacts.bundle_id

    def __call__(
        self,
        image: ImageInput,
        prompt: str,
        frame: int = 0,
        spacing: PixelSpacing | None = None,
    ) -> GroundingResult:
        """Ground `prompt` in `image`: an RGB uint8 [H, W, 3] array (with `spacing`, the pixel
        size the caller states for it), a DICOM/PNG/JPEG path (frame `frame`; a DICOM's
        calibrated regions give measurements in mm) or a `LoadedImage`. The result carries
        quality signals (`quality`, `mask_scores`) and `warnings`."""
        return self.ground(image, prompt, frame, spacing).result

    def ground(
        self,
        image: ImageInput,
        prompt: str,
        frame: int = 0,
        spacing: PixelSpacing | None = None,
    ) -> Grounding:
        """`__call__` keeping the `[SEG]` states and the loaded image (for video mode)."""
        t0 = time.perf_counter()
        timer = StageTimer()
        with timer.stage("load"):
            loaded = load_input(image, frame, spacing)
            check_image_size(
                *loaded.pixels.shape[:2], self.model_config.preprocess.factor, loaded.path
            )
        # A DICOM that states Modality US is ultrasound: the answer grammar leaves out "This is
        # not an ultrasound image." there, and a model that would have begun it is reported.
        stated_us = loaded.dicom and loaded.modality == "US"
        gen, resized_hw, judged_not_us = self._generate(loaded.pixels, prompt, timer, stated_us)
        with timer.stage("detokenize"):
            text = self.tokenizer.decode(gen.tokens, skip_special_tokens=False)
            boxes = parse_boxes(text, resized_hw, loaded.pixels.shape[:2])
        masks, scores = self.segmenter.segment(loaded.pixels, gen.seg_hidden, timer)
        with timer.stage("measure"):
            measured = measure_image(masks, loaded)
        quality, warnings = assess(text, prompt, gen.logprobs, gen.stopped_by, scores)
        timer.ms["total"] = (time.perf_counter() - t0) * 1e3
        result = GroundingResult(
            text=text,
            token_ids=gen.tokens,
            boxes=boxes,
            masks=masks,
            mask_scores=scores,
            measurements=measured.measurements,
            token_logprobs=list(gen.logprobs),
            quality=quality,
            warnings=[
                *image_warnings(loaded.modality, loaded.dicom, text, judged_not_us),
                *warnings,
                *measured.warnings,
            ],
            timings_ms=timer.ms,
            image_hw=tuple(loaded.pixels.shape[:2]),
            stopped_by=gen.stopped_by,
            backend=self.backend.label,
            bundle_id=self.bundle_id,
            prompt=prompt,
            input=input_record(loaded),
            runtime=self.config.to_dict(),
        )
        return Grounding(result, gen.seg_hidden, loaded, gen, judged_not_us)

    def _generate(
        self, rgb: np.ndarray, prompt: str, timer: StageTimer, stated_us: bool = False
    ) -> tuple[Generation, tuple[int, int], bool]:
        """Greedy answer, the resized size, and whether the grammar overrode the model's first
        choice of "This is not an ultrasound image." (`stated_us`: the input is known to be
        ultrasound, so that sentence is not an allowed answer)."""
        cfg = self.model_config
        with timer.stage("preprocess"):
            qp = qwen_pixels(rgb, cfg.preprocess)
            n_img = n_image_tokens(qp.grid_thw, cfg.vision.spatial_merge_size)
            limit = ContextLimit(
                cfg.text.max_position_embeddings,
                self.config.max_context_tokens,
                self.config.max_new_tokens,
            )
            ids = prompt_ids(self.tokenizer, prompt, n_img, limit)  # [S]; PromptTooLongError
            feeds = vision_inputs(qp.pixel_values, qp.grid_thw, cfg.vision)
        with timer.stage("vision_encoder"):
            features = self.vision.run(feeds)["image_features"]  # [n_img, H]
        with timer.stage("llm_inputs"):
            prefill, rope_deltas = llm_prefill_inputs(
                ids[None], self.artifacts.embeddings, cfg, features, [qp.grid_thw]
            )
        constraint = None
        if self.grammars is not None:
            with timer.stage("grammar"):
                constraint = self.grammars.for_prompt(
                    prompt, qp.resized_hw, self.config.max_new_tokens, not_us=not stated_us
                )  # None: free-form
        gen = greedy_generate(
            self.llm,
            prefill,
            rope_deltas,
            self.artifacts.embeddings,
            cfg.tokens,
            self.config.max_new_tokens,
            timer,
            constraint,
        )
        judged_not_us = (
            stated_us
            and constraint is not None
            and constraint.first_choice == self.grammars.not_us_first_token
        )
        return gen, qp.resized_hw, judged_not_us

    def track(
        self,
        image: ImageInput,
        key: Grounding,
        frame: int = 0,
        spacing: PixelSpacing | None = None,
    ) -> GroundingResult:
        """Masks of `key`'s `[SEG]` states on a new image, running only SAM2 (encoder + decoder).

        The text, tokens and answer quality are the key frame's; boxes are not carried over
        (they were read from the key frame's text and are not re-located), so `boxes` is empty.
        """
        t0 = time.perf_counter()
        timer = StageTimer()
        with timer.stage("load"):
            loaded = load_input(image, frame, spacing)
            check_image_size(
                *loaded.pixels.shape[:2], self.model_config.preprocess.factor, loaded.path
            )
        masks, scores = self.segmenter.segment(loaded.pixels, key.seg_hidden, timer)
        with timer.stage("measure"):
            measured = measure_image(masks, loaded)
        quality = key.result.quality
        answer = answer_warnings(quality, key.result.stopped_by) if quality else []
        timer.ms["total"] = (time.perf_counter() - t0) * 1e3
        return GroundingResult(
            text=key.result.text,
            token_ids=list(key.result.token_ids),
            masks=masks,
            mask_scores=scores,
            measurements=measured.measurements,
            token_logprobs=list(key.result.token_logprobs),
            quality=quality,
            warnings=[
                *image_warnings(loaded.modality, loaded.dicom, key.result.text, key.judged_not_us),
                *answer,
                *mask_warnings(scores),
                *measured.warnings,
            ],
            timings_ms=timer.ms,
            image_hw=tuple(loaded.pixels.shape[:2]),
            stopped_by=key.result.stopped_by,
            backend=self.backend.label,
            bundle_id=self.bundle_id,
            prompt=key.result.prompt,
            input=input_record(loaded),
            runtime=self.config.to_dict(),
        )
