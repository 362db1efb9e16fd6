"""Tokenizers: load a checkpoint's `tokenizer.json`; build the demo model's report vocabulary.

Only the `tokenizers` library is used, so the runtime on a cart loads the tokenizer exactly as
the build machine does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Special tokens of the demo tokenizer, in id order (ids match config.DEMO_TOKENS).
DEMO_SPECIALS = (
    "<|endoftext|>",  # 0 pad
    "<|im_end|>",  # 1 eos
    "<|im_start|>",  # 2
    "<|vision_start|>",  # 3
    "<|vision_end|>",  # 4
    "<|image_pad|>",  # 5
    "<|video_pad|>",  # 6
    "<|box_start|>",  # 7
    "<|box_end|>",  # 8
    "<|vision_pad|>",  # 9
    "[SEG]",  # 10
)


def load_tokenizer(path: Path) -> Tokenizer:
    """Load `tokenizer.json` (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    return Tokenizer.from_file(str(path))


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


# Qwen2.5's added tokens, in id order from QWEN_FIRST_SPECIAL (151643), then Citrus-V's `[SEG]`
# (151665) and two more ids the 8B's vocabulary holds (151666, 151667; names not known here).
QWEN_FIRST_SPECIAL = 151_643
QWEN_SPECIALS = (
    "<|endoftext|>",  # 151643 pad
    "<|im_start|>",  # 151644
    "<|im_end|>",  # 151645 eos
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",  # 151648
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",  # 151652
    "<|vision_end|>",  # 151653
    "<|vision_pad|>",
    "<|image_pad|>",  # 151655
    "<|video_pad|>",  # 151656
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",  # 151664
    "[SEG]",  # 151665
    "<|citrus_reserved_0|>",  # 151666 (stand-in name)
    "<|citrus_reserved_1|>",  # 151667 (stand-in name)
)
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
