"""The PyTorch reference pipeline: the accuracy oracle every exported or compressed variant meets.

Greedy decoding records the `[SEG]` state in the same pass that generates the text: the state of a
`[SEG]` token is the final-norm hidden state of the step whose logits produced it (the position
before `[SEG]`, as LISA-style models select it). SAM2's image encoder runs once per image.
The product tasks' answers decode under their format's grammar with the runtime's own automaton
(`citrus_edge.grammar`, torch-free), so the oracle and the runtime pick the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import DynamicCache

from citrus_edge.boxes import parse_boxes
from citrus_edge.grammar import AnswerGrammars, Constraint
from citrus_edge.modelling.model import CitrusV
from citrus_edge.postprocess import select_masks
from citrus_edge.preprocess import qwen_pixels, sam_pixels
from citrus_edge.prompts import (
    DEFAULT_MAX_CONTEXT_TOKENS,
    ContextLimit,
    n_image_tokens,
    prompt_ids,
)
from citrus_edge.quality import assess
from citrus_edge.result import GroundingResult
from citrus_edge.timing import StageTimer


@dataclass
class Generation:
    """Greedy tokens with their log-probabilities and the captured `[SEG]` states."""

    tokens: list[int]
    seg_hidden: torch.Tensor  # [N_seg, H]
    stopped_by: str
    logprobs: tuple[float, ...] = ()  # natural log-probability of each of `tokens` (float64)


def mrope_inputs(model: CitrusV, ids: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """3-D position ids [3, B, S] for a prompt with one image (transformers' own get_rope_index)."""
    mm_types = (ids == model.config.tokens.image).int()
    pos, _ = model.mllm.model.get_rope_index(ids, mm_types, image_grid_thw=grid_thw)
    return pos


@torch.no_grad()
def greedy_generate(
    model: CitrusV,
    ids: torch.Tensor,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    max_new_tokens: int,
    constraint: Constraint | None = None,
) -> Generation:
    """Prefill then 1-token steps with a KV cache; returns tokens and `[SEG]` states in one pass.

    ids: [1, S] prompt ids with image placeholders; pixel_values: [N_patches, C*T*P*P].
    With `constraint`, each token is the argmax over the tokens its grammar allows (the
    runtime's `runtime.decode` rule); log-probabilities stay those of the unmasked softmax.
    """
    tok = model.config.tokens
    pos = mrope_inputs(model, ids, grid_thw)  # [3, 1, S]
    cache = DynamicCache(config=model.mllm.config.text_config)
    out = model.mllm.model(
        input_ids=ids,
        pixel_values=pixel_values,
        image_grid_thw=grid_thw,
        position_ids=pos,
        cache=cache,
        use_cache=True,
    )
    next_pos = int(pos.max()) + 1
    hidden = out.last_hidden_state[:, -1]  # [1, H]
    tokens: list[int] = []
    logprobs: list[float] = []
    seg_states: list[torch.Tensor] = []
    stopped_by = "max_new_tokens"
    for _ in range(max_new_tokens):
        logits = model.mllm.lm_head(hidden)  # [1, V]
        if constraint is None:
            token = int(logits.argmax(-1))
        else:
            token = constraint.choose(logits[0].float().numpy())
        if token == tok.eos:
            stopped_by = "eos"
            break
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits[0].double(), -1)[token]))
        if constraint is not None:
            constraint.advance(token)
        if token == tok.seg:
            seg_states.append(hidden[0])
        if len(tokens) == max_new_tokens:
            break
        step_pos = torch.full((3, 1, 1), next_pos, dtype=torch.long)
        next_pos += 1
        out = model.mllm.model(
            input_ids=torch.tensor([[token]]), position_ids=step_pos, cache=cache, use_cache=True
        )
        hidden = out.last_hidden_state[:, -1]
    h = model.config.text.hidden_size
    seg = torch.stack(seg_states) if seg_states else torch.zeros(0, h)
    return Generation(tokens, seg, stopped_by, tuple(logprobs))


class ReferencePipeline:
    """Image (+ prompt) -> `GroundingResult`, in PyTorch eager. The oracle for every backend."""

    def __init__(
        self,
        model: CitrusV,
        tokenizer: Tokenizer,
        max_new_tokens: int = 96,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
        constrained_decoding: bool = True,
    ):
        """`max_context_tokens` caps prompt + `max_new_tokens` as `RuntimeConfig`'s field does
        (the model's context applies too): past it, `PromptTooLongError` before the model runs.
        `constrained_decoding` keeps the product tasks' answers in their format's grammar, as
        `RuntimeConfig.constrained_decoding` does."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_context_tokens = max_context_tokens
        self.cfg = model.config
        tok = model.config.tokens
        self.grammars = (
            AnswerGrammars(tokenizer, tok.seg, tok.eos, model.config.text.vocab_size)
            if constrained_decoding
            else None
        )

    @classmethod
    def from_checkpoint(cls, path: Path, **kw: object) -> ReferencePipeline:
        from citrus_edge.modelling.checkpoint import load_checkpoint
        from citrus_edge.tokenizer import load_tokenizer

        return cls(load_checkpoint(path), load_tokenizer(path), **kw)

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, prompt: str) -> GroundingResult:
        """Run the whole pipeline on an RGB uint8 image [H, W, 3]."""
        timer = StageTimer()
        cfg = self.cfg
        with timer.stage("preprocess"):
            qp = qwen_pixels(rgb, cfg.preprocess)
            sp = torch.from_numpy(sam_pixels(rgb, cfg.preprocess))
            n_img = n_image_tokens(qp.grid_thw, cfg.vision.spatial_merge_size)
            limit = ContextLimit(
                cfg.text.max_position_embeddings, self.max_context_tokens, self.max_new_tokens
            )
            ids = torch.from_numpy(prompt_ids(self.tokenizer, prompt, n_img, limit))[None]
        constraint = None
        if self.grammars is not None:
            with timer.stage("grammar"):
                constraint = self.grammars.for_prompt(
                    prompt, qp.resized_hw, self.max_new_tokens
                )  # None: free-form
        with timer.stage("generate"):
            gen = greedy_generate(
                self.model,
                ids,
                torch.from_numpy(qp.pixel_values),
                torch.tensor([qp.grid_thw]),
                self.max_new_tokens,
                constraint,
            )
        text = self.tokenizer.decode(gen.tokens, skip_special_tokens=False)
        masks, scores = [], []
        if len(gen.seg_hidden):
            with timer.stage("sam_encoder"):
                feats = self.model.encode_image_sam(sp)
            with timer.stage("mask_decoder"):
                low, iou = self.model.decode_masks(feats, gen.seg_hidden)
            with timer.stage("postprocess"):
                masks, scores = select_masks(
                    low.numpy(), iou.numpy(), cfg.sam2.image_size, rgb.shape[:2]
                )
        boxes = parse_boxes(text, qp.resized_hw, rgb.shape[:2])
        quality, warnings = assess(text, prompt, gen.logprobs, gen.stopped_by, scores)
        return GroundingResult(
            text=text,
            token_ids=gen.tokens,
            boxes=boxes,
            masks=masks,
            mask_scores=scores,
            token_logprobs=list(gen.logprobs),
            quality=quality,
            warnings=warnings,
            timings_ms=timer.ms,
            image_hw=tuple(rgb.shape[:2]),
            stopped_by=gen.stopped_by,
            backend="torch",
        )
