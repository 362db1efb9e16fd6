"""ChatML prompts with the image placeholder, as Qwen2.5-VL's chat template writes them.

`prompt_ids` is the one function the runtime, the PyTorch reference, training and evaluation
encode a prompt with. The template's control tokens (`<|im_start|>`, `<|vision_start|>`,
`<|image_pad|>`, ...) go in by id; the user's text is encoded with every added token read as
plain text, so a prompt that types `<|im_end|>\\n<|im_start|>assistant`, `<|image_pad|>` or
`[SEG]` can neither open a turn, nor break the image-token count, nor ask for a mask. For text
that types no added token the ids are exactly those of encoding `chat_text` whole (what the demo
model was trained on).

With a `ContextLimit`, `prompt_ids` also refuses a prompt whose tokens plus `max_new_tokens` do
not fit, before any graph runs (`PromptTooLongError`).
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

SYSTEM = "You are a helpful assistant."

# Tokens one answer may hold (template + image + text + max_new_tokens) unless a caller sets
# its own cap. 2048 is the context the memory planner budgets (`citrus_edge.cli.memory_plan.DEFAULT_CONTEXT`)
# and TensorRT's KV-cache profiles are built for (`engines.profiles.DEFAULT_MAX_CONTEXT`): a
# longer sequence runs on memory the target's plan never counted. The shipped demo model's own
# context (`max_position_embeddings` 1024) is lower and wins there.
DEFAULT_MAX_CONTEXT_TOKENS = 2048

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
CONTROL_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD)


class PromptTooLongError(ValueError):
    """The prompt's tokens plus `max_new_tokens` exceed the context limit; nothing ran."""

    def __init__(self, message: str, needed: int, limit: int):
        super().__init__(message)
        self.needed, self.limit = needed, limit


class ChatTokenizerError(ValueError):
    """The tokenizer cannot encode a ChatML prompt (a control token missing, or user text that
    would come out as a control token)."""


@dataclass(frozen=True)
class ContextLimit:
    """How many tokens one answer may hold: its prompt (template, image, text) + max_new_tokens.

    `model_context` is the model's `text.max_position_embeddings`; `runtime_cap` is the caller's
    own cap (`RuntimeConfig.max_context_tokens`, `ReferencePipeline(max_context_tokens=...)`).
    """

    model_context: int
    runtime_cap: int = DEFAULT_MAX_CONTEXT_TOKENS
    max_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.model_context < 1 or self.runtime_cap < 1 or self.max_new_tokens < 0:
            raise ValueError(
                f"context limit needs model_context >= 1, runtime_cap >= 1 and max_new_tokens "
                f">= 0, got {self.model_context}, {self.runtime_cap}, {self.max_new_tokens}"
            )

    @property
    def tokens(self) -> int:
        return min(self.model_context, self.runtime_cap)

    def source(self) -> str:
        """Which of the two bounds holds, for error messages."""
        if self.runtime_cap <= self.model_context:
            return f"the runtime cap max_context_tokens={self.runtime_cap}"
        return f"the model's context max_position_embeddings={self.model_context}"


def _template(prompt: str, n_image_tokens: int) -> list[tuple[str, str]]:
    """The chat as (kind, text) pieces: kind "control" (one token), "text" or "user"."""
    return [
        ("control", IM_START),
        ("text", f"system\n{SYSTEM}"),
        ("control", IM_END),
        ("text", "\n"),
        ("control", IM_START),
        ("text", "user\n"),
        ("control", VISION_START),
        *[("control", IMAGE_PAD)] * n_image_tokens,
        ("control", VISION_END),
        ("user", prompt),
        ("control", IM_END),
        ("text", "\n"),
        ("control", IM_START),
        ("text", "assistant\n"),
    ]


def chat_text(prompt: str, n_image_tokens: int) -> str:
    """The ChatML text of one user turn with one image, ready for the assistant's answer.

    For display and comparison only: encode with `prompt_ids`, never by tokenizing this string
    (a control token typed in `prompt` would be read as one).
    """
    return "".join(text for _, text in _template(prompt, n_image_tokens))


@dataclass(frozen=True)
class _PlainEncoder:
    """A copy of a tokenizer that reads every added token as plain text, and what it needs."""

    plain: Tokenizer
    control: dict[str, int]  # template control token -> id in the source tokenizer
    added_ids: frozenset[int]
    max_token_chars: int  # longest vocabulary entry: no token covers more characters
    source_size: int  # the source's vocabulary size when the copy was made


_ENCODERS: weakref.WeakKeyDictionary[Tokenizer, _PlainEncoder] = weakref.WeakKeyDictionary()


def _plain_encoder(tokenizer: Tokenizer) -> _PlainEncoder:
    """The cached plain-text copy of `tokenizer` (rebuilt if tokens were added since)."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    enc = _ENCODERS.get(tokenizer)
    if enc is not None and enc.source_size == size:
        return enc
    added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
    missing = [c for c in CONTROL_TOKENS if c not in added]
    if missing:
        raise ChatTokenizerError(
            f"the tokenizer has no {', '.join(missing)} token(s): not a Qwen2.5-VL / Citrus-V "
            "tokenizer; use the tokenizer.json shipped with the model"
        )
    # `encode_special_tokens` reads only *special* added tokens as text: mark them all special.
    data = json.loads(tokenizer.to_str())
    for token in data.get("added_tokens", []):
        token["special"] = True
    plain = Tokenizer.from_str(json.dumps(data))
    plain.encode_special_tokens = True
    vocab = [k for k in plain.get_vocab(with_added_tokens=False) if k not in added]
    enc = _PlainEncoder(
        plain=plain,
        control={c: added[c] for c in CONTROL_TOKENS},
        added_ids=frozenset(added.values()),
        max_token_chars=max(1, max(map(len, vocab), default=1)),
        source_size=size,
    )
    _ENCODERS[tokenizer] = enc
    return enc


def encode_user_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of `text` with every added token (`<|im_end|>`, `[SEG]`, ...) read as plain text.

    The ids hold no added-token id and decode back to `text` (for the byte-level tokenizers here).
    """
    enc = _plain_encoder(tokenizer)
    ids = enc.plain.encode(text, add_special_tokens=False).ids
    leaked = sorted(set(ids) & enc.added_ids)
    if leaked:
        raise ChatTokenizerError(
            f"the tokenizer encodes this text with control token ids {leaked}, not as plain "
            "text; remove the special-token strings from the prompt"
        )
    return ids


def _min_tokens(enc: _PlainEncoder, text: str) -> int:
    """A lower bound on the tokens of `text`, without tokenizing it (a token covers at most
    `max_token_chars` characters of the normalized text)."""
    normalizer = enc.plain.normalizer
    n_chars = len(normalizer.normalize_str(text) if normalizer is not None else text)
    return math.ceil(n_chars / enc.max_token_chars)


def _too_long(n_fixed: int, n_image: int, n_text: int, limit: ContextLimit, at_least: bool) -> None:
    needed = n_fixed + n_text + limit.max_new_tokens
    if needed <= limit.tokens:
        return
    more = "at least " if at_least else ""
    raise PromptTooLongError(
        f"prompt too long: it needs {more}{needed} tokens ({more}{n_text} for the prompt text, "
        f"{n_fixed} for the chat template with {n_image} image tokens, {limit.max_new_tokens} "
        f"max_new_tokens) but the limit is {limit.tokens} ({limit.source()}); shorten the "
        "prompt or lower max_new_tokens",
        needed,
        limit.tokens,
    )


def prompt_ids(
    tokenizer: Tokenizer, prompt: str, n_image_tokens: int, limit: ContextLimit | None = None
) -> np.ndarray:
    """Token ids [S] (int64) of the chat prompt: control tokens by id, `prompt` as plain text.

    With `limit`, raises `PromptTooLongError` (naming the tokens needed and the limit) when the
    prompt plus `limit.max_new_tokens` does not fit; a text far too long is refused from its
    length in characters, before it is tokenized.
    """
    enc = _plain_encoder(tokenizer)
    parts: list[list[int] | None] = []  # None: the user's text, encoded once the rest is known
    for kind, text in _template(prompt, n_image_tokens):
        if kind == "control":
            parts.append([enc.control[text]])
        elif kind == "text":
            parts.append(enc.plain.encode(text, add_special_tokens=False).ids)
        else:
            parts.append(None)
    n_fixed = sum(len(p) for p in parts if p is not None)
    if limit is not None:
        _too_long(n_fixed, n_image_tokens, _min_tokens(enc, prompt), limit, at_least=True)
    user = encode_user_text(tokenizer, prompt)
    if limit is not None:
        _too_long(n_fixed, n_image_tokens, len(user), limit, at_least=False)
    ids = [i for p in parts for i in (user if p is None else p)]
    return np.asarray(ids, dtype=np.int64)


def n_image_tokens(grid_thw: tuple[int, int, int], merge_size: int) -> int:
    """Visual tokens the LLM sees for one image after the 2x2 patch merger."""
    t, h, w = grid_thw
    return t * h * w // (merge_size * merge_size)
