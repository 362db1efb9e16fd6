"""Greedy decoding (`runtime/decode.py`) on a scripted step runner: which token is kept, when it
stops, which hidden state a `[SEG]` captures, the feeds of each step and the log-probabilities,
all by hand. (The parity tests compare the runtime with the reference, which decodes with the
same rule, so a fault shared by both would pass them; these numbers are computed here.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from citrus_edge.config import TokenIds
from citrus_edge.runtime.backends import STEP_INPUTS
from citrus_edge.runtime.decode import greedy_generate, step_feeds, token_logprob
from citrus_edge.timing import StageTimer

V, H = 8, 4  # vocabulary and hidden size of the scripted model
EOS, SEG = 2, 6
TOKENS = TokenIds(
    seg=SEG, image=V, video=V + 1, vision_start=V + 2, vision_end=V + 3, eos=EOS, pad=0
)
ROPE_DELTA = np.array([[-3]], dtype=np.int64)  # [B, 1]
PROMPT_LEN = 5
EMBEDDINGS = np.arange(V * H, dtype=np.float32).reshape(V, H) / 10  # [V, H]: [t, j] = (4t + j) / 10


def _logits(winner: int, margin: float = 2.0) -> np.ndarray:
    """Logits [V] whose argmax is `winner` (by `margin`), the rest a fixed ramp below it."""
    x = np.linspace(-1.0, 0.0, V).astype(np.float32)
    x[winner] = 0.0 + margin
    return x


class ScriptedRunner:
    """A `KvStepRunner` that answers call i with `winners[i]`'s logits and the hidden state
    `[i, i, i, i]`, and records every feed and the cache length it saw."""

    def __init__(self, winners: list[int]):
        self.winners = winners
        self.calls: list[dict[str, np.ndarray]] = []
        self.cache_len = 99  # stale cache from an earlier answer: reset() must clear it
        self.resets = 0

    def reset(self) -> None:
        self.cache_len = 0
        self.resets += 1

    def __call__(self, feeds):
        i = len(self.calls)
        self.calls.append(dict(feeds))
        self.cache_len += feeds["inputs_embeds"].shape[1]
        return _logits(self.winners[i]), np.full(H, float(i), np.float32)


def _prefill() -> dict[str, np.ndarray]:
    return {
        "inputs_embeds": np.zeros((1, PROMPT_LEN, H), np.float32),
        "position_ids": np.zeros((3, 1, PROMPT_LEN), np.int64),
        "attention_mask": np.ones((1, PROMPT_LEN), np.int64),
        "past_key_0": np.zeros((1, 1, 0, 2), np.float32),  # the runner's business: not fed
    }


def _generate(winners, max_new_tokens=10, timer=None):
    runner = ScriptedRunner(winners)
    timer = timer or StageTimer()
    gen = greedy_generate(runner, _prefill(), ROPE_DELTA, EMBEDDINGS, TOKENS, max_new_tokens, timer)
    return gen, runner


def test_argmax_tokens_until_eos_which_is_not_kept():
    gen, runner = _generate([5, 7, 3, EOS, 4])
    assert gen.tokens == [5, 7, 3] and gen.stopped_by == "eos"
    assert gen.steps == 3 and len(runner.calls) == 4  # prefill + 3 steps; none after EOS
    assert runner.resets == 1


def test_max_new_tokens_caps_the_answer_without_an_extra_step():
    gen, runner = _generate([5, 7, 3, 4, 1], max_new_tokens=3)
    assert gen.tokens == [5, 7, 3] and gen.stopped_by == "max_new_tokens"
    assert gen.steps == 2 and len(runner.calls) == 3
    one, runner = _generate([4, 5], max_new_tokens=1)
    assert one.tokens == [4] and one.steps == 0 and len(runner.calls) == 1


def test_eos_first_gives_an_empty_answer():
    gen, runner = _generate([EOS])
    assert gen.tokens == [] and gen.logprobs == () and gen.stopped_by == "eos"
    assert gen.steps == 0 and gen.seg_hidden.shape == (0, H)


def test_seg_captures_the_hidden_state_of_the_call_whose_logits_chose_it():
    """Call i returns hidden [i]*H: [SEG]s chosen by the logits of calls 1 and 3."""
    gen, _ = _generate([5, SEG, 4, SEG, EOS])
    assert gen.tokens == [5, SEG, 4, SEG]
    assert gen.seg_hidden.dtype == np.float32
    np.testing.assert_array_equal(gen.seg_hidden, [[1.0] * H, [3.0] * H])
    none, _ = _generate([5, 4, EOS])
    assert none.seg_hidden.shape == (0, H) and none.seg_hidden.dtype == np.float32


def test_prefill_feeds_only_the_step_inputs_and_each_step_the_last_token():
    _, runner = _generate([5, 7, EOS])
    prefill, step1, step2 = runner.calls
    assert set(prefill) == set(STEP_INPUTS)  # past_* left to the runner
    assert prefill["inputs_embeds"].shape == (1, PROMPT_LEN, H)
    for feeds, token, cache in ((step1, 5, PROMPT_LEN), (step2, 7, PROMPT_LEN + 1)):
        assert set(feeds) == set(STEP_INPUTS)
        np.testing.assert_array_equal(feeds["inputs_embeds"], EMBEDDINGS[token][None, None])
        # text positions continue at attended tokens + rope delta, equal on the three axes
        np.testing.assert_array_equal(feeds["position_ids"], np.full((3, 1, 1), cache - 3))
        np.testing.assert_array_equal(feeds["attention_mask"], np.ones((1, cache + 1)))


def test_step_feeds_by_hand():
    feeds = step_feeds(3, EMBEDDINGS, np.array([[7]]), cache_len=12)
    assert feeds["inputs_embeds"].shape == (1, 1, H) and feeds["inputs_embeds"].dtype == np.float32
    np.testing.assert_allclose(feeds["inputs_embeds"][0, 0], [1.2, 1.3, 1.4, 1.5], rtol=1e-6)
    assert feeds["position_ids"].tolist() == [[[19]], [[19]], [[19]]]
    assert feeds["attention_mask"].shape == (1, 13) and feeds["attention_mask"].dtype == np.int64


def test_log_probabilities_of_the_kept_tokens():
    gen, _ = _generate([5, 7, EOS])
    x = _logits(5).astype(np.float64)
    expected = x[5] - math.log(np.exp(x).sum())  # log softmax by hand
    assert gen.logprobs[0] == pytest.approx(expected, abs=1e-6)
    assert len(gen.logprobs) == 2 and all(-1.0 < p < 0.0 for p in gen.logprobs)


def test_token_logprob_is_a_stable_log_softmax():
    assert token_logprob(np.array([1.0, 2.0, 3.0]), 1) == pytest.approx(
        2.0 - math.log(math.e + math.e**2 + math.e**3)
    )
    assert token_logprob(np.array([0.0, 0.0]), 0) == pytest.approx(math.log(0.5))
    huge = np.array([1000.0, 0.0, -1000.0], dtype=np.float32)  # exp(1000) overflows float64
    assert token_logprob(huge, 0) == pytest.approx(0.0, abs=1e-12)
    assert token_logprob(huge, 1) == pytest.approx(-1000.0)
    assert token_logprob(np.array([[0.5, 0.5, 0.5, 0.5]]), 3) == pytest.approx(-math.log(4))


def test_stages_are_timed_and_bad_limits_refused():
    timer = StageTimer()
    _generate([5, EOS], timer=timer)
    assert set(timer.ms) == {"prefill", "decode"}
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        _generate([5], max_new_tokens=0)
