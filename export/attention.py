"""Plain softmax attention for the export wrappers.

Written out as MatMul / Add / Softmax instead of `scaled_dot_product_attention`, so the ONNX graph
is the same for every exporter and TensorRT version and padded keys take an additive bias.
"""

from __future__ import annotations

import torch


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v in float32; q [..., Sq, d], k/v [..., Sk, d] -> [..., Sq, d]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [..., Sq, Sk]
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(weights, v)


def masked_bias(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive bias from a boolean "may attend" mask: 0 where allowed, the dtype's min elsewhere."""
    zero = torch.zeros((), dtype=dtype)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, low)
