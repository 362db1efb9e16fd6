"""ChatML prompts with the image placeholder, as Qwen2.5-VL's chat template writes them."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

SYSTEM = "You are a helpful assistant."


def chat_text(prompt: str, n_image_tokens: int) -> str:
    """The ChatML text of one user turn with one image, ready for the assistant's answer."""
    image = "<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>"
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{image}{prompt}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def prompt_ids(tokenizer: Tokenizer, prompt: str, n_image_tokens: int) -> np.ndarray:
    """Token ids [S] (int64) of the chat prompt."""
    return np.asarray(tokenizer.encode(chat_text(prompt, n_image_tokens)).ids, dtype=np.int64)


def n_image_tokens(grid_thw: tuple[int, int, int], merge_size: int) -> int:
    """Visual tokens the LLM sees for one image after the 2x2 patch merger."""
    t, h, w = grid_thw
    return t * h * w // (merge_size * merge_size)
