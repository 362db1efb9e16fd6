"""Constrained decoding (`citrus_edge.grammar`, issue 22): a model that emits random tokens still
answers in its task's format, parsed with the project's own parsers; detection boxes stay inside
the resized image; the automaton never runs out of tokens before it accepts; the model's own
(canonical) answers pass unchanged; the runtime and the reference decode the same tokens under
it; and its cost per token, printed at the demo's 512 logits and at a Qwen2.5-sized 151,668."""

from __future__ import annotations

import functools
import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import pytest

from citrus_edge import tasks
from citrus_edge.boxes import detection_list
from citrus_edge.config import TokenIds
from citrus_edge.grammar import (
    AnswerGrammars,
    GrammarError,
    int_range_regex,
    task_grammar,
)
from citrus_edge.quality import answer_parses
from citrus_edge.runtime.decode import greedy_generate
from citrus_edge.timing import StageTimer

pytest.importorskip("llguidance")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_grammar.py"
HW = (448, 336)  # resized input (height, width)
SEEDS = range(40)


@functools.cache
def bench_module():
    spec = importlib.util.spec_from_file_location("bench_grammar", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def grammars(kind: str) -> AnswerGrammars:
    """ "demo": the shipped demo tokenizer, 512 logits; "qwen": the synthetic 151,668-token
    byte-level vocabulary with Qwen2.5's special ids."""
    bench = bench_module()
    return bench.demo_grammars() if kind == "demo" else bench.qwen_grammars()


def _random_answer(g: AnswerGrammars, task: str, seed: int, hw=HW, max_steps=600):
    """Decode one answer with random logits under the grammar, checking every step: some token
    is allowed, EOS only once the text is a whole answer."""
    c = g.constraint(task, hw)
    rng = np.random.default_rng(seed)
    scale = 1.0 + seed % 4  # sharper and flatter random distributions
    out: list[int] = []
    for _ in range(max_steps):
        allowed = c.allowed()
        assert allowed.shape == (g.vocab_size,) and allowed.any()
        assert not allowed[g.tokenizer.get_vocab_size() :].any()  # logits past the tokenizer
        assert bool(allowed[g.eos]) == c.accepting
        token = c.choose(rng.normal(scale=scale, size=g.vocab_size).astype(np.float32))
        assert allowed[token]
        if token == g.eos:
            return out
        c.advance(token)
        out.append(token)
    raise AssertionError(f"{task} seed {seed}: no EOS after {max_steps} tokens")


def _check_answer(task: str, text: str, ids: list[int], seg: int, hw=HW) -> None:
    assert answer_parses(task, text), text
    if text in (tasks.NO_LESION, tasks.NOT_US_ANSWER):
        return
    if task == "segment":
        assert text == tasks.SEGMENT_ANSWER and ids.count(seg) == 1
    elif task == "detect":
        boxes = detection_list(text)
        assert boxes is not None and 1 <= len(boxes) <= 3
        h, w = hw
        for (x1, y1, x2, y2), label in boxes:
            assert label == "lesion"
            assert 0 <= x1 <= w and 0 <= x2 <= w and 0 <= y1 <= h and 0 <= y2 <= h
        assert tasks.parse_boxes(text) == [tuple(int(v) for v in b) for b, _ in boxes]
    else:
        report = tasks.parse_report(text)
        assert report is not None and report.count == len(report.lesions) in (1, 2, 3)
        assert tasks.parse_count(text) == report.count
    assert seg not in ids or task == "segment"


@pytest.mark.parametrize("kind", ["demo", "qwen"])
@pytest.mark.parametrize("task", tasks.TASKS)
def test_random_tokens_still_answer_in_the_task_format(kind, task):
    g = grammars(kind)
    shapes = set()
    for seed in SEEDS:
        ids = _random_answer(g, task, seed)
        text = g.tokenizer.decode(ids, skip_special_tokens=False)
        _check_answer(task, text, ids, g.seg)
        shapes.add(text == tasks.NO_LESION)
    assert shapes == {True, False}  # both branches of every grammar were walked


@pytest.mark.parametrize("hw", [(28, 28), (56, 1000), (1000, 9)])
def test_detection_boxes_stay_inside_small_and_odd_images(hw):
    g = grammars("demo")
    for seed in range(15):
        ids = _random_answer(g, "detect", seed, hw=hw)
        _check_answer("detect", g.tokenizer.decode(ids, skip_special_tokens=False), ids, g.seg, hw)


@pytest.mark.parametrize("kind", ["demo", "qwen"])
def test_the_models_own_answers_pass_unchanged(kind):
    """The canonical token ids of training answers are all allowed and end accepting, so on
    inputs the model understands, constrained decoding changes nothing."""
    g = grammars(kind)
    rng = np.random.default_rng(0)
    vocab = {
        "echogenicity": ("anechoic", "hypoechoic", "isoechoic", "hyperechoic"),
        "location": ("upper left", "upper right", "lower left", "lower right"),
        "margin": ("circumscribed", "irregular"),
        "posterior": ("shadowing", "enhancement", "none"),
    }
    answers = [("segment", tasks.SEGMENT_ANSWER)] + [(t, tasks.NO_LESION) for t in tasks.TASKS]
    for _ in range(30):
        n = int(rng.integers(1, 4))
        lesions = [{k: str(rng.choice(v)) for k, v in vocab.items()} for _ in range(n)]
        for les in lesions:
            les["size_mm"] = int(rng.integers(1, 120))
        h, w = HW
        boxes = []
        for _ in range(n):
            xs = sorted(rng.integers(0, w // 4 + 1, 2) * 4)
            ys = sorted(rng.integers(0, h // 4 + 1, 2) * 4)
            boxes.append((int(xs[0]), int(ys[0]), int(xs[1]), int(ys[1])))
        answers += [
            ("report", tasks.report_answer(lesions)),
            ("detect", tasks.detect_answer(boxes)),
        ]
    for task, text in answers:
        ids = g.tokenizer.encode(text, add_special_tokens=False).ids
        c = g.constraint(task, HW)
        for token in ids:
            assert c.allowed()[token], (task, text, token)
            c.advance(token)
        assert c.accepting and c.allowed()[g.eos], text


def test_grammar_text_and_ranges():
    for lo, hi in [(0, 0), (0, 9), (0, 448), (1, 999), (7, 1234), (99, 100), (5, 5)]:
        rx = re.compile(int_range_regex(lo, hi) + "$")
        assert [n for n in range(2000) if rx.match(str(n))] == list(range(lo, min(hi, 1999) + 1))
        assert not rx.match("0" + str(lo)) and not rx.match("-1")
    assert task_grammar("segment", HW, 10) == (
        'start: "Sure, it is " <[10]> "." | "No focal lesion is seen." | "This is not an ultrasound image."\n'
    )
    with pytest.raises(GrammarError, match="unknown task 'caption'"):
        task_grammar("caption", HW, 10)
    with pytest.raises(GrammarError, match="resized image size must be positive, got 0x5"):
        task_grammar("detect", (0, 5), 10)
    with pytest.raises(GrammarError, match="max_items must be >= 1, got 0"):
        task_grammar("report", HW, 10, max_items=0)
    with pytest.raises(GrammarError, match="vocab_size 100 is below the tokenizer's 467 tokens"):
        AnswerGrammars(grammars("demo").tokenizer, 10, 1, 100)


def test_free_form_prompts_stay_unconstrained_and_task_prompts_are_recognised():
    g = grammars("demo")
    assert g.for_prompt("What is the depth of this scan?", HW) is None
    assert g.for_prompt("  describe the FINDINGS in this scan. ", HW).task == "report"
    assert g.for_prompt(tasks.DETECT_PROMPT, HW).task == "detect"


class RandomRunner:
    """A `KvStepRunner` answering every step with seeded random logits [V] (a model that emits
    random tokens)."""

    def __init__(self, vocab: int, seed: int):
        self.vocab, self.rng, self.cache_len = vocab, np.random.default_rng(seed), 0

    def reset(self) -> None:
        self.cache_len = 0

    def __call__(self, feeds):
        self.cache_len += feeds["inputs_embeds"].shape[1]
        hidden = np.full(4, float(self.cache_len), np.float32)
        return self.rng.normal(size=self.vocab).astype(np.float32), hidden


@pytest.mark.parametrize("kind", ["demo", "qwen"])
def test_runtime_decode_of_a_random_model_parses(kind):
    g = grammars(kind)
    tokens = TokenIds(seg=g.seg, image=5, video=6, vision_start=3, vision_end=4, eos=g.eos, pad=0)
    emb = np.zeros((g.vocab_size, 4), np.float32)
    prefill = {
        "inputs_embeds": np.zeros((1, 3, 4), np.float32),
        "position_ids": np.zeros((3, 1, 3), np.int64),
        "attention_mask": np.ones((1, 3), np.int64),
    }
    for task in tasks.TASKS:
        for seed in range(8):
            timer = StageTimer()
            gen = greedy_generate(
                RandomRunner(g.vocab_size, seed), prefill, np.zeros((1, 1), np.int64), emb,
                tokens, 400, timer, g.constraint(task, HW),
            )  # fmt: skip
            assert gen.stopped_by == "eos"
            text = g.tokenizer.decode(gen.tokens, skip_special_tokens=False)
            _check_answer(task, text, gen.tokens, g.seg)
            assert len(gen.seg_hidden) == gen.tokens.count(g.seg)
            assert len(gen.logprobs) == len(gen.tokens) and max(gen.logprobs) < 0
            assert 0 < timer.ms["grammar"] < timer.ms["decode"]


@pytest.mark.parametrize("kind", ["demo", "qwen"])
def test_overhead_per_token_is_a_small_share_of_a_decode_step(kind):
    """ms per token of mask + argmax + advance on the canonical paths of long answers; printed.
    Bound: 10 % of the INT8 decode step at that width (demo 1.25 ms, 8B slice 34.8 ms)."""
    bench = bench_module()
    g = grammars(kind)
    t0 = time.perf_counter()
    rows = [bench.time_answers(g, task, 6) for task in tasks.TASKS]
    ms = sum(r["ms_per_token"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
    step = bench.DECODE_STEP_MS[g.vocab_size]
    print(
        f"\n{kind} ({g.vocab_size} logits): {ms:.3f} ms/token = {ms / step:.1%} of a {step} ms "
        f"decode step ({time.perf_counter() - t0:.1f} s)"
    )
    assert ms < 0.10 * step


def test_pipeline_and_reference_decode_the_same_constrained_tokens():
    """The tiny random model's bundle and its PyTorch reference, grammar on: same tokens, and
    every task answer parses; with it off the free model's answers come back."""
    support = pytest.importorskip("test_runtime_support")
    from fixtures import tiny_tokenizer

    from citrus_edge.modelling.reference import ReferencePipeline
    from citrus_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(support.bundle("plain"), max_new_tokens=120)
    free = Pipeline.from_bundle(
        support.bundle("plain"), max_new_tokens=120, constrained_decoding=False
    )
    ref = ReferencePipeline(support.variant_model("plain"), tiny_tokenizer(), max_new_tokens=120)
    for case in support.CASES:
        image, prompt = support.case_image(case), case[3]
        got, want, loose = pipe(image, prompt), ref(image, prompt), free(image, prompt)
        assert got.token_ids == want.token_ids
        task = got.quality.task
        if task is None:  # free-form: untouched
            assert got.token_ids == loose.token_ids
        else:
            assert got.quality.parses is True and loose.quality.parses is False
            assert got.stopped_by == "eos" and got.timings_ms["grammar"] > 0


def test_answers_fit_the_token_budget():
    """With `max_new_tokens`, a further box or lesion is begun only if the answer can still be
    closed in time (canonical demo tokens: a random model's answers end by EOS within it)."""
    g = grammars("demo")
    assert [g.worst_tokens("detect", HW, k) for k in range(4)] == [0, 37, 69, 101]
    for budget, most in ((96, 2), (128, 3)):
        lengths, boxes = [], []
        for seed in range(40):
            c = g.constraint("detect", HW, budget)
            rng, out = np.random.default_rng(seed), []
            while (token := c.choose(rng.normal(size=g.vocab_size))) != g.eos:
                c.advance(token)
                out.append(token)
            text = g.tokenizer.decode(out, skip_special_tokens=False)
            _check_answer("detect", text, out, g.seg)
            lengths.append(len(out))
            boxes.append(len(detection_list(text) or []))
        assert max(lengths) <= budget and max(boxes) >= most


@pytest.mark.parametrize("kind", ["demo", "qwen"])
def test_an_ultrasound_input_may_not_be_answered_not_ultrasound(kind):
    """`not_us=False` (a DICOM stating US) leaves the sentence out of every task's grammar,
    even for a model that wants nothing else; `first_choice` keeps what the model wanted."""
    g = grammars(kind)
    first = g.not_us_first_token
    assert tasks.NOT_US_ANSWER.startswith(g.tokenizer.decode([first]))
    for task in tasks.TASKS:
        allowed = g.constraint(task, HW).allowed()
        assert allowed[first], task  # by default the sentence may begin the answer
        c = g.constraint(task, HW, not_us=False)
        assert not c.allowed()[first], task
        logits = np.zeros(c.vocab_size, np.float32)
        logits[first] = 100.0
        token = c.choose(logits)
        assert token != first and c.first_choice == first
        assert not g.for_prompt(tasks.PROMPTS[task], HW, not_us=False).allowed()[first]
