"""Greedy decoding over the LLM step graph, capturing `[SEG]` states in the same pass.

Same loop as the PyTorch reference (`citrus_edge.modelling.reference.greedy_generate`): one prefill with
the prompt's 3-D mRoPE positions, then one-token steps at position `max + 1`, `max + 2`, ... on
all three axes; the token is the argmax of the last logits; EOS stops (and is not kept);
`max_new_tokens` caps the answer. The `[SEG]` state is the final-norm hidden state of the step
whose logits produced `[SEG]`. The KV cache stays inside the backend's runner between steps.
Each kept token also records its log-probability under the step's softmax (`token_logprob`), the
answer-confidence signal of `citrus_edge.quality`.

With a `citrus_edge.grammar.Constraint` (the product tasks' answers), the argmax runs over the
tokens the task's grammar allows next (EOS only once the answer is whole), so the text always
parses in the task's format; the log-probability stays the model's unmasked one, so a forced
format keeps the low confidence of an answer the model was unsure of.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from citrus_edge import positions
from citrus_edge.config import TokenIds
from citrus_edge.grammar import Constraint
from citrus_edge.host_inputs import embed
from citrus_edge.timing import StageTimer

from .backends import STEP_INPUTS, KvStepRunner


@dataclass(frozen=True)
class Generation:
    """Greedy tokens with their log-probabilities, the captured `[SEG]` states and how decoding
    ended."""

    tokens: list[int]
    seg_hidden: np.ndarray  # [N_seg, H] float32
    stopped_by: str  # "eos" or "max_new_tokens"
    steps: int  # one-token steps run after the prefill
    logprobs: tuple[float, ...] = ()  # natural log-probability of each of `tokens`


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token] in float64, stable for any logit range (max subtracted)."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)  # [V]
    top = x.max()
    return float(x[token] - top - np.log(np.exp(x - top).sum()))


def step_feeds(
    token: int, embeddings: np.ndarray, rope_deltas: np.ndarray, cache_len: int
) -> dict[str, np.ndarray]:
    """Feeds of one decode step for batch 1 without padding (`host_inputs.llm_decode_inputs`
    without the cache, which the runner holds)."""
    ids = np.array([[token]], dtype=np.int64)  # [1, 1]
    return {
        "inputs_embeds": embed(ids, embeddings),  # [1, 1, H]
        "position_ids": positions.decode_position_ids(rope_deltas, cache_len),  # [3, 1, 1]
        "attention_mask": np.ones((1, cache_len + 1), dtype=np.int64),  # [1, P+1]
    }


def greedy_generate(
    runner: KvStepRunner,
    prefill: dict[str, np.ndarray],
    rope_deltas: np.ndarray,
    embeddings: np.ndarray,
    tokens: TokenIds,
    max_new_tokens: int,
    timer: StageTimer,
    constraint: Constraint | None = None,
) -> Generation:
    """Prefill with `prefill` (the `host_inputs.llm_prefill_inputs` feeds; its empty `past_*`
    are the runner's business and ignored) and decode greedily, inside `constraint`'s grammar
    when one is given (a fresh one per answer: it holds the answer's state)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    runner.reset()
    with timer.stage("prefill"):
        logits, hidden = runner({k: prefill[k] for k in STEP_INPUTS})  # [V], [H]
    out: list[int] = []
    logprobs: list[float] = []
    seg: list[np.ndarray] = []
    stopped_by, steps = "max_new_tokens", 0
    grammar_s = 0.0  # the mask's share of "decode", timed as "grammar"
    with timer.stage("decode"):
        while True:
            if constraint is None:
                token = int(np.argmax(logits))
            else:
                t0 = time.perf_counter()
                token = constraint.choose(logits)
                grammar_s += time.perf_counter() - t0
            if token == tokens.eos:
                stopped_by = "eos"
                break
            out.append(token)
            logprobs.append(token_logprob(logits, token))
            if constraint is not None:
                t0 = time.perf_counter()
                constraint.advance(token)
                grammar_s += time.perf_counter() - t0
            if token == tokens.seg:
                seg.append(hidden.copy())
            if len(out) == max_new_tokens:
                break
            feeds = step_feeds(token, embeddings, rope_deltas, runner.cache_len)
            logits, hidden = runner(feeds)
            steps += 1
    if constraint is not None:
        timer.add("grammar", grammar_s * 1e3)
    seg_hidden = np.stack(seg) if seg else np.zeros((0, len(hidden)), np.float32)
    return Generation(out, seg_hidden.astype(np.float32), stopped_by, steps, tuple(logprobs))
