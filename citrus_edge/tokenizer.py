"""Tokenizers: load a checkpoint's `tokenizer.json`; build the demo model's report vocabulary.

Only the `tokenizers` library is used, so the runtime on a cart loads the tokenizer exactly as
the build machine does.
"""

from __future__ import annotations

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


def build_demo_tokenizer(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE over the report vocabulary, digits split one per token, Qwen specials."""
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
        special_tokens=list(DEMO_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    for i, s in enumerate(DEMO_SPECIALS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok
