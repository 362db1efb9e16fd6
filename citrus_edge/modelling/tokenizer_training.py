"""Train the demo model's report-vocabulary tokenizer and the Qwen2.5 stand-in tokenizer.

Build-time only (the demo training and `model slice`); the runtime only loads a trained
`tokenizer.json` (`citrus_edge.tokenizer.load_tokenizer`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from citrus_edge.tokenizer import DEMO_SPECIALS, QWEN_FIRST_SPECIAL, QWEN_SPECIALS


def _train_byte_bpe(corpus: Iterable[str], vocab_size: int, specials: Iterable[str]) -> Tokenizer:
    """Byte-level BPE trained on `corpus`, digits split one per token (as in Qwen2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return tok


def build_demo_tokenizer(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE over the report vocabulary, digits split one per token, Qwen specials."""
    tok = _train_byte_bpe(corpus, vocab_size, DEMO_SPECIALS)
    for i, s in enumerate(DEMO_SPECIALS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


STANDIN_CORPUS = (
    "You are a helpful assistant.",
    "system user assistant",
    "Please help segment the lesion in this scan.",
    "Sure, it is [SEG]. No focal lesion is seen.",
    "Locate the lesion, output its bbox coordinates using JSON format.",
    '```json\n[{"bbox_2d": [12, 40, 80, 96], "label": "lesion"}]\n```',
    "Describe the findings in this scan.",
    "1 lesion. Lesion 1: hypoechoic, upper left, circumscribed, 12 mm, posterior shadowing.",
)


def build_qwen_standin_tokenizer(
    corpus: Iterable[str] = STANDIN_CORPUS, bpe_size: int = 1024
) -> Tokenizer:
    """A stand-in for Qwen2.5's tokenizer with its exact special-token ids (151643-151667).

    Byte-level BPE trained on `corpus` (`bpe_size` tokens, digits one per token as in Qwen2),
    its vocabulary padded with tokens no merge produces up to id 151642, then the Qwen2.5
    specials, `[SEG]` at 151665 and two reserved tokens: 151,668 ids, the 8B's `vocab_size`.
    For random-weights checkpoints of real width (`citrus_edge.modelling.slice`); it is not Qwen's BPE.
    """
    tok = _train_byte_bpe(corpus, bpe_size, ())
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    # Fillers: "~" then digits; digits are split one per pre-token, so no merge reaches them.
    filler = (f"~{i}" for i in range(QWEN_FIRST_SPECIAL))
    while len(vocab) < QWEN_FIRST_SPECIAL:
        vocab.setdefault(next(filler), len(vocab))
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(list(QWEN_SPECIALS))
    for i, s in enumerate(QWEN_SPECIALS, QWEN_FIRST_SPECIAL):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok
