"""Per-task answer grammars and the token mask that keeps greedy decoding inside them (torch-free).

A product task's answer (`citrus_edge.tasks`) is generated under a grammar of its format, so an
input the model never saw (a real ultrasound screen) still yields an answer every consumer can
parse — the model chooses *within* the format, it cannot leave it:

- segment: "Sure, it is [SEG]." (`[SEG]` as its special token id, never as typed characters)
  or the no-lesion sentence;
- detect: the fenced JSON list of 1..`max_items` {"bbox_2d": [x1, y1, x2, y2], "label": "lesion"}
  objects, exactly as `tasks.detect_answer` writes it, every x in [0, resized width] and every y
  in [0, resized height] (the resized model input, whose pixels the boxes are in), or the
  no-lesion sentence;
- report: "N lesion(s). Lesion 1: ... Lesion N: ..." with N in 1..`max_items` and exactly N
  lesion descriptions of `tasks.report_answer`'s fields and vocabulary — so a report always
  states a count, and the count matches the lesions it describes — or the no-lesion sentence.

Every other prompt stays unconstrained (`answer_grammar` returns None).

Why llguidance (https://github.com/guidance-ai/llguidance): it works on token ids without torch
(the runtime is torch-free), builds its token trie from the `tokenizer.json` the bundle ships
(the `tokenizers` library's own format, so the demo tokenizer and Qwen2.5's 151k vocabulary
load the same way), takes the special `[SEG]` token by id, and computes a whole-vocabulary mask
in well under a millisecond even at 151k tokens (scripts/bench_grammar.py; the README has the
figures). A hand-written character DFA walked over a token trie would do for these three small
grammars, but it would re-implement llguidance's lexer, its handling of tokens that span
grammar boundaries and its per-step trie walk in Python — slower at 151k tokens and one more
thing to keep right. (outlines-core, the other candidate, was not needed: llguidance installed
and fit first, and its Lark grammars state the count-matches-lesions rule and the numeric ranges
directly.)

Log-probabilities stay those of the model's own (unmasked) distribution: a forced format on an
input the model does not understand keeps its low confidence, and `citrus_edge.quality` still
flags it.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from citrus_edge.quality import recognise_task
from citrus_edge.tasks import (
    NO_LESION,
    NOT_US_ANSWER,
    POSTERIOR_PHRASES,
    REPORT_VOCABULARY,
    SEGMENT_ANSWER,
    TASKS,
    detect_answer,
    report_answer,
)

# The demo phantoms hold 0..3 lesions (`calib_data.phantom.PhantomConfig.lesion_count_probs`). A
# third detection item is begun only if it fits the token budget (see `Constraint`).
MAX_ANSWER_ITEMS = 3
# Whole-answer sentences every task may give instead of its format.
ANSWER_SENTENCES = (NO_LESION, NOT_US_ANSWER)
# Lesion sizes a report may state, in mm.
REPORT_SIZE_MM = (1, 999)


class GrammarError(ValueError):
    """A grammar cannot be built as asked (unknown task, empty image, bad item count)."""


class GrammarUnavailableError(RuntimeError):
    """llguidance is not installed: install it, or turn constrained decoding off."""


class ConstraintError(RuntimeError):
    """The automaton left no token to choose, or refused the chosen one (a bug, never an
    input problem: tests/test_grammar.py drives every grammar with random tokens)."""


def int_range_regex(lo: int, hi: int) -> str:
    """A regex matching exactly the decimal integers lo..hi (no sign, no leading zeros)."""
    if not 0 <= lo <= hi:
        raise GrammarError(f"integer range needs 0 <= lo <= hi, got {lo}..{hi}")
    alternatives: list[str] = []
    for n_digits in range(len(str(lo)), len(str(hi)) + 1):
        first, last = (
            max(lo, 10 ** (n_digits - 1) if n_digits > 1 else 0),
            min(hi, 10**n_digits - 1),
        )
        if first <= last:
            alternatives += _same_length_ranges(str(first), str(last))
    return "(" + "|".join(alternatives) + ")"


def _same_length_ranges(lo: str, hi: str) -> list[str]:
    """Regexes covering lo..hi, two digit strings of one length (the classic digit split)."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo[0] == hi[0]:
        return [lo[0] + r for r in _same_length_ranges(lo[1:], hi[1:])]
    n = len(lo) - 1
    out = [lo[0] + r for r in _same_length_ranges(lo[1:], "9" * n)]
    if int(hi[0]) - int(lo[0]) > 1:
        out.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}][0-9]{{{n}}}")
    out += [hi[0] + r for r in _same_length_ranges("0" * n, hi[1:])]
    return out


def _lit(text: str) -> str:
    """A Lark string literal of `text` (JSON's escapes are Lark's for ASCII text)."""
    return json.dumps(text)


def _alternatives(words: Sequence[str]) -> str:
    return " | ".join(_lit(w) for w in words)


def task_grammar(
    task: str,
    resized_hw: tuple[int, int],
    seg_token: int,
    max_items: int = MAX_ANSWER_ITEMS,
    sentences: Sequence[str] = ANSWER_SENTENCES,
) -> str:
    """The Lark grammar (llguidance's dialect) of `task`'s answer for an input resized to
    `resized_hw` (height, width); `seg_token` is the `[SEG]` token id."""
    if task not in TASKS:
        raise GrammarError(f"unknown task {task!r}; expected one of {TASKS}")
    if max_items < 1:
        raise GrammarError(f"max_items must be >= 1, got {max_items}")
    h, w = resized_hw
    if h < 1 or w < 1:
        raise GrammarError(f"resized image size must be positive, got {h}x{w}")
    other = " | ".join(_lit(s) for s in sentences)
    if task == "segment":
        before, after = SEGMENT_ANSWER.split("[SEG]")
        return f"start: {_lit(before)} <[{seg_token}]> {_lit(after)} | {other}\n"
    if task == "detect":
        # tasks.detect_answer: f"```json\n{json.dumps(items)}\n```", items as below.
        open_, close = "```json\n[", "]\n```"
        item_open, item_close = '{"bbox_2d": [', '], "label": "lesion"}'
        sep = ", "
        return (
            f"start: {_lit(open_)} item ({_lit(sep)} item)~0..{max_items - 1} {_lit(close)}"
            f" | {other}\n"
            f"item: {_lit(item_open)} X {_lit(sep)} Y {_lit(sep)} X {_lit(sep)} Y {_lit(item_close)}\n"
            f"X: /{int_range_regex(0, w)}/\n"
            f"Y: /{int_range_regex(0, h)}/\n"
        )
    # tasks.report_answer: "N lesion(s). Lesion 1: e, l, m, S mm, p. Lesion 2: ..."
    counts = []
    for n in range(1, max_items + 1):
        head = f"{n} lesion{'s' if n > 1 else ''}. "
        lesions = " ".join(
            _lit(f"{' ' if i > 1 else ''}Lesion {i}: ") + " fields" for i in range(1, n + 1)
        )
        counts.append(f"{_lit(head)} {lesions}")
    sep, mm, end = ", ", " mm, ", "."
    return (
        f"start: {' | '.join(counts)} | {other}\n"
        f"fields: ECHO {_lit(sep)} LOC {_lit(sep)} MARGIN {_lit(sep)} SIZE {_lit(mm)} POSTERIOR"
        f" {_lit(end)}\n"
        f"ECHO: {_alternatives(REPORT_VOCABULARY['echogenicity'])}\n"
        f"LOC: {_alternatives(REPORT_VOCABULARY['location'])}\n"
        f"MARGIN: {_alternatives(REPORT_VOCABULARY['margin'])}\n"
        f"SIZE: /{int_range_regex(*REPORT_SIZE_MM)}/\n"
        f"POSTERIOR: {_alternatives(tuple(POSTERIOR_PHRASES.values()))}\n"
    )


def _llguidance():
    """llguidance, imported on first use (a runtime that never constrains never loads it)."""
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise GrammarUnavailableError(
            "constrained decoding needs llguidance (pip install 'llguidance>=1.9,<2'); or run "
            "with constrained decoding off (RuntimeConfig(constrained_decoding=False))"
        ) from exc
    return llguidance


_LL_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, int], object]] = (
    weakref.WeakKeyDictionary()
)


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos: int):
    """llguidance's view of `tokenizer` with `vocab_size` logits, cached (building its token
    trie takes about a second at 151k tokens)."""
    per = _LL_TOKENIZERS.setdefault(tokenizer, {})
    key = (vocab_size, eos)
    if key not in per:
        n_tok = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab_size < n_tok:
            raise GrammarError(f"vocab_size {vocab_size} is below the tokenizer's {n_tok} tokens")
        per[key] = _llguidance().LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos)
    return per[key]


class Constraint:
    """One answer's automaton: which tokens may come next, and the step after a chosen one.

    It holds one matcher per item bound k = 1..max_items (detection boxes, report lesions), all
    advanced on every token. With a token budget (`max_new_tokens`), each step masks with the
    largest k whose worst-case answer still fits: `used + worst[k] - worst[j] + overhead <=
    budget`, j the items begun so far, `worst[k]` the canonical token count of the longest
    k-item answer. So a third box is begun only when it can still be closed in time, and a cut
    answer (which would not parse) cannot happen for canonical tokens.
    """

    def __init__(
        self,
        matchers: Sequence,
        worst: Sequence[int],
        vocab_size: int,
        eos: int,
        task: str,
        budget: int | None = None,
        decode=None,
    ):
        for m in matchers:
            if m.is_error():
                raise GrammarError(f"{task} grammar does not compile: {m.get_error()}")
        self._matchers, self._worst = list(matchers), list(worst)  # index k - 1; worst[0]: 0 items
        self.vocab_size, self.eos, self.task, self.budget = vocab_size, eos, task, budget
        self._decode, self._tokens = decode, []
        # The model's own first choice (the unmasked argmax of the first step): where the
        # grammar overrode it, the caller can say what the model would have answered.
        self.first_choice: int | None = None
        self._overhead = max(0, 2 * worst[1] - worst[2]) if len(worst) > 2 else 0

    def _items_begun(self) -> int:
        if self._decode is None or not self._tokens:
            return 0
        text = self._decode(self._tokens)
        return text.count("bbox_2d") if self.task == "detect" else text.count("Lesion ")

    def _active(self):
        """The matcher of the largest item bound that fits the budget (among those the text so
        far still matches)."""
        live = [k for k, m in enumerate(self._matchers, 1) if not m.is_error()]
        if not live:
            raise ConstraintError(f"the {self.task} grammar refused the answer so far")
        if self.budget is None or len(self._matchers) == 1:
            return self._matchers[live[-1] - 1]
        used, j = len(self._tokens), self._items_begun()
        fits = [
            k
            for k in live
            if used + self._worst[k] - self._worst[min(j, k)] + self._overhead <= self.budget
        ]
        return self._matchers[(fits or live[:1])[-1] - 1]

    def allowed(self) -> np.ndarray:
        """Bool [vocab_size]: the tokens the grammar allows next (EOS only once it accepts)."""
        bits = np.frombuffer(self._active().compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.vocab_size].view(bool)

    def choose(self, logits: np.ndarray) -> int:
        """The argmax of `logits` [V] over the allowed tokens (ties: the lowest id, as
        np.argmax)."""
        logits = np.asarray(logits).reshape(-1)
        if self.first_choice is None:
            self.first_choice = int(np.argmax(logits))
        ids = np.flatnonzero(self.allowed())
        if ids.size == 0:
            raise ConstraintError(f"the {self.task} grammar allows no token: {self._error()}")
        return int(ids[np.argmax(logits[ids])])

    def advance(self, token: int) -> None:
        """Move past `token` (not EOS: decoding stops there)."""
        active = self._active()
        for m in self._matchers:
            if not m.is_error():
                m.consume_token(int(token))
        if active.is_error():
            raise ConstraintError(f"the {self.task} grammar refused token {token}: {self._error()}")
        self._tokens.append(int(token))

    @property
    def accepting(self) -> bool:
        """Whether the text so far is a whole answer (EOS is allowed)."""
        return bool(self._active().is_accepting())

    def _error(self) -> str:
        errors = [m.get_error() for m in self._matchers if m.get_error()]
        return errors[-1] if errors else "no error reported"


_TEMPLATES_KEPT = 64  # compiled matchers kept per AnswerGrammars (task x resized size x bound)


@dataclass(frozen=True)
class AnswerGrammars:
    """The task grammars of one tokenizer; `for_prompt` gives each answer its automaton.

    Compiling a grammar takes about 3 ms, copying a compiled matcher about 2 us: the compiled
    ones are kept (least recently used out past `_TEMPLATES_KEPT`) and each answer gets copies.
    """

    tokenizer: Tokenizer
    seg: int
    eos: int
    vocab_size: int  # logits per step (may exceed the tokenizer's tokens: those never allowed)
    max_items: int = MAX_ANSWER_ITEMS
    _templates: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _ll_tokenizer(self.tokenizer, self.vocab_size, self.eos)  # fail (and cache) at load

    @functools.cached_property
    def not_us_first_token(self) -> int:
        """The first token of the "not an ultrasound image" sentence (no other answer starts
        with it)."""
        return self.tokenizer.encode(NOT_US_ANSWER, add_special_tokens=False).ids[0]

    def _template(self, task: str, resized_hw: tuple[int, int], k: int, not_us: bool = True):
        key = (task, tuple(resized_hw), k, not_us)
        if key in self._templates:
            self._templates.move_to_end(key)
            return self._templates[key]
        ll = _llguidance()
        sentences = ANSWER_SENTENCES if not_us else (NO_LESION,)
        lark = task_grammar(task, resized_hw, self.seg, k, sentences)
        tok = _ll_tokenizer(self.tokenizer, self.vocab_size, self.eos)
        matcher = ll.LLMatcher(tok, ll.LLMatcher.grammar_from_lark(lark), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{task} grammar does not compile: {matcher.get_error()}")
        self._templates[key] = matcher
        while len(self._templates) > _TEMPLATES_KEPT:
            self._templates.popitem(last=False)
        return matcher

    def worst_tokens(self, task: str, resized_hw: tuple[int, int], k: int) -> int:
        """Canonical tokens of the longest `k`-item answer (0 items: 0); kept like templates."""
        if k == 0:
            return 0
        key = (task, tuple(resized_hw), k, "worst")
        if key not in self._templates:
            self._templates[key] = self._count_worst(task, resized_hw, k)
            while len(self._templates) > _TEMPLATES_KEPT:
                self._templates.popitem(last=False)
        return self._templates[key]

    def _count_worst(self, task: str, resized_hw: tuple[int, int], k: int) -> int:
        h, w = resized_hw
        if task == "detect":
            text = detect_answer([(w, h, w, h)] * k)
        else:
            longest = {f: max(words, key=len) for f, words in REPORT_VOCABULARY.items()}
            posterior = max(POSTERIOR_PHRASES, key=lambda p: len(POSTERIOR_PHRASES[p]))
            lesion = {**longest, "size_mm": REPORT_SIZE_MM[1], "posterior": posterior}
            text = report_answer([lesion] * k)
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def constraint(
        self,
        task: str,
        resized_hw: tuple[int, int],
        max_new_tokens: int | None = None,
        not_us: bool = True,
    ) -> Constraint:
        """A fresh automaton for one answer to `task` on an input resized to `resized_hw`,
        fitting its answer into `max_new_tokens` when given. `not_us=False` leaves out the "not
        an ultrasound image" sentence (for an input known to be ultrasound)."""
        bounds = range(1, self.max_items + 1) if task in ("detect", "report") else [1]
        matchers = [self._template(task, resized_hw, k, not_us).deep_copy() for k in bounds]
        worst = [0] * (len(matchers) + 1)
        if max_new_tokens is not None and len(matchers) > 1:
            worst = [self.worst_tokens(task, resized_hw, k) for k in range(len(matchers) + 1)]

        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

        return Constraint(matchers, worst, self.vocab_size, self.eos, task, max_new_tokens, decode)

    def for_prompt(
        self,
        prompt: str,
        resized_hw: tuple[int, int],
        max_new_tokens: int | None = None,
        not_us: bool = True,
    ) -> Constraint | None:
        """The automaton of the product task `prompt` asks for; None for a free-form prompt."""
        task = recognise_task(prompt)
        if task is None:
            return None
        return self.constraint(task, resized_hw, max_new_tokens, not_us)
