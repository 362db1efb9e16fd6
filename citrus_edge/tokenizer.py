"""Tokenizers: load a checkpoint's `tokenizer.json`, and the special tokens of the two layouts.

Only the `tokenizers` library is used, so the runtime on a cart loads the tokenizer exactly as
the build machine does. Training the demo and stand-in tokenizers is build-time only:
`citrus_edge.modelling.tokenizer_training`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

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
