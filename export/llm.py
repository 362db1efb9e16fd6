"""The Qwen2.5 language model as one step graph with an explicit KV cache (prefill and decode).

Inputs: `inputs_embeds` [B, S, H], `position_ids` [3, B, S] (mRoPE t/h/w, from the host),
`attention_mask` [B, P+S] (1 = attend, 0 = padding), `past_key_i` / `past_value_i`
[B, kvH, P, d]. Outputs: `logits` [B, S, V], `last_hidden_state` [B, S, H] (after the final
norm: the `[SEG]` state), `present_key_i` / `present_value_i` [B, kvH, P+S, d]. P = 0 is the
prefill. Token embedding lookup and image splicing stay on the host (`host_inputs`), reading the
table this module writes as `embeddings.npy`; the runtime then needs no torch.

The wrapper runs the stock layers' weights with its own KV concat and builds the causal +
padding mask from `attention_mask` itself, instead of transformers' cache objects and mask
helpers, which do not trace to a graph with dynamic cache length.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv

from citrus_edge.config import CitrusVConfig
from citrus_edge.host_inputs import past_names, present_names
from citrus_edge.modelling.model import CitrusV

from .attention import attend, masked_bias
from .export_config import ExportConfig
from .export_manifest import (
    MANIFEST_SCHEMA,
    library_versions,
    manifest_path,
    sha256_file,
    write_json_atomic,
)
from .spec import Case, Component, GraphSpec, Sample, TensorSpec, register

log = logging.getLogger(__name__)

NAME = "llm"
EMBEDDINGS_FILE = "embeddings.npy"
MAX_TENSOR_BYTES = 1 << 30  # largest single weight in the graph (protobuf's limit is 2 GiB)
# Traced sample: batch 2, 3 new tokens after 4 cached ones, row 1 left-padded by 2.
EXPORT_CASE = {"batch": 2, "seq": 3, "past": 4, "pad": 2}
VALIDATION_CASES = (
    {"batch": 1, "seq": 7, "past": 0, "pad": 0},  # prefill
    {"batch": 3, "seq": 1, "past": 9, "pad": 3},  # decode, left-padded rows
    {"batch": 1, "seq": 1, "past": 5, "pad": 0},  # decode, batch 1
)


def causal_padding_bias(attention_mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """Additive attention bias [B, 1, S, P+S] from a [B, P+S] padding mask.

    Query i (cache slot P+i) sees key j when j <= P+i and `attention_mask[b, j] == 1`.
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total)  # [P+S]
    query_pos = torch.arange(n_new) + (total - n_new)  # [S]
    causal = key_pos[None, :] <= query_pos[:, None]  # [S, P+S]
    allowed = causal[None] & attention_mask[:, None, :].bool()  # [B, S, P+S]
    return masked_bias(allowed)[:, None]  # [B, 1, S, P+S]


class LlmStepExport(nn.Module):
    """Export-only forward of the stock language model + lm_head with an explicit KV cache."""

    def __init__(self, model: CitrusV):
        super().__init__()
        self.lm = model.mllm.model.language_model
        self.lm_head = model.mllm.lm_head
        # A head over MAX_TENSOR_BYTES goes in as vocabulary slices (views, no copy): the 8B's
        # is 2.2 GB fp32, and graph tools that hold a graph in one protobuf (ModelOpt's ONNX
        # quantizer) cannot serialize a single tensor over 2 GiB.
        rows = head_rows_per_slice(self.lm_head.weight)
        self.head_slices = nn.ParameterList(
            [nn.Parameter(w, requires_grad=False) for w in self.lm_head.weight.split(rows)]
            if rows < self.lm_head.weight.shape[0]
            else []
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [B, S, H]
        position_ids: torch.Tensor,  # [3, B, S]
        attention_mask: torch.Tensor,  # [B, P+S]
        *past: torch.Tensor,  # past_key_0, past_value_0, ... [B, kvH, P, d]
    ) -> tuple[torch.Tensor, ...]:
        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids)  # [B, S, d] each
        bias = causal_padding_bias(attention_mask, inputs_embeds.shape[1])
        h = inputs_embeds
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.lm.layers):
            h, k, v = self._layer(layer, h, cos, sin, bias, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        hidden = self.lm.norm(h)  # [B, S, H]
        if len(self.head_slices):
            logits = torch.cat([hidden @ w.t() for w in self.head_slices], dim=-1)  # [B, S, V]
        else:
            logits = self.lm_head(hidden)  # [B, S, V]
        return (logits, hidden, *presents)

    @staticmethod
    def _layer(
        layer: nn.Module,
        h: torch.Tensor,  # [B, S, H]
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,  # [B, 1, S, P+S]
        past_k: torch.Tensor,  # [B, kvH, P, d]
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        heads = (*x.shape[:2], -1, attn.head_dim)
        q = attn.q_proj(x).view(heads).transpose(1, 2)  # [B, nH, S, d]
        k = attn.k_proj(x).view(heads).transpose(1, 2)  # [B, kvH, S, d]
        v = attn.v_proj(x).view(heads).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = torch.cat([past_k, k], dim=2)  # [B, kvH, P+S, d]
        v = torch.cat([past_v, v], dim=2)
        groups = attn.num_key_value_groups
        out = attend(q, repeat_kv(k, groups), repeat_kv(v, groups), attn.scaling, bias)
        out = out.transpose(1, 2).reshape(*h.shape[:2], -1)  # [B, S, nH*d]
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k, v


def head_rows_per_slice(weight: torch.Tensor) -> int:
    """Vocabulary rows per `lm_head` slice so that no slice exceeds `MAX_TENSOR_BYTES`."""
    vocab = weight.shape[0]
    n = -(-weight.numel() * weight.element_size() // MAX_TENSOR_BYTES)  # ceil
    return -(-vocab // max(1, n))


def llm_spec(cfg: CitrusVConfig, export_cfg: ExportConfig) -> GraphSpec:
    """Spec of the LLM step graph for `cfg.text.num_layers` layers."""
    t = cfg.text
    kv = ("batch", t.num_kv_heads, "past", t.head_dim)
    kv_out = ("batch", t.num_kv_heads, "total", t.head_dim)
    inputs = (
        TensorSpec("inputs_embeds", ("batch", "seq", t.hidden_size)),
        TensorSpec("position_ids", (3, "batch", "seq"), "int64"),
        TensorSpec("attention_mask", ("batch", "total"), "int64"),
        *(TensorSpec(n, kv) for n in past_names(t.num_layers)),
    )
    outputs = (
        TensorSpec("logits", ("batch", "seq", t.vocab_size)),
        TensorSpec("last_hidden_state", ("batch", "seq", t.hidden_size)),
        *(TensorSpec(n, kv_out) for n in present_names(t.num_layers)),
    )

    def make_sample(case: Case, seed: int) -> Sample:
        return _sample(cfg, case, seed)

    return GraphSpec(
        component=NAME,
        inputs=inputs,
        outputs=outputs,
        make_sample=make_sample,
        export_case=EXPORT_CASE,
        validation_cases=VALIDATION_CASES,
        atol=export_cfg.atol,
    )


def _sample(cfg: CitrusVConfig, case: Case, seed: int) -> Sample:
    """Random step inputs: left padding of `pad` tokens in the cache of rows 1.., mRoPE-like
    positions (text positions plus a different offset per axis, 0 on padding)."""
    t, rng = cfg.text, np.random.default_rng(seed)
    b, s, p, pad = case["batch"], case["seq"], case["past"], case["pad"]
    if pad > p:
        raise ValueError("padding must lie in the cache so every query sees a key")
    mask = np.ones((b, p + s), dtype=np.int64)
    mask[1:, :pad] = 0  # [B, P+S]
    attended = np.cumsum(mask, axis=1) - 1  # [B, P+S]
    offsets = rng.integers(0, 6, size=(3, 1, 1))
    pos = np.where(mask[None] == 1, attended[None] + offsets, 0)[:, :, p:]  # [3, B, S]
    feeds = {
        "inputs_embeds": rng.standard_normal((b, s, t.hidden_size)).astype(np.float32),
        "position_ids": pos.astype(np.int64),
        "attention_mask": mask,
    }
    kv_shape = (b, t.num_kv_heads, p, t.head_dim)
    for name in past_names(t.num_layers):
        feeds[name] = rng.standard_normal(kv_shape).astype(np.float32)
    label = f"batch {b}, seq {s}, past {p}, pad {pad}"
    return Sample(label=label, feeds=feeds)


@torch.no_grad()
def llm_reference(model: CitrusV, sample: Sample) -> dict[str, np.ndarray]:
    """The stock language model with a `DynamicCache` filled from the past, then `lm_head`."""
    f = {k: torch.from_numpy(v) for k, v in sample.feeds.items()}
    lm = model.mllm.model.language_model
    n = len(lm.layers)
    cache = DynamicCache(config=model.mllm.config.text_config)
    if f["past_key_0"].shape[2]:
        for i in range(n):
            cache.update(f[f"past_key_{i}"], f[f"past_value_{i}"], i)
    out = lm(
        inputs_embeds=f["inputs_embeds"],
        attention_mask=f["attention_mask"],
        position_ids=f["position_ids"],
        cache=cache,
        use_cache=True,
    )
    hidden = out.last_hidden_state
    result = {"logits": model.mllm.lm_head(hidden).numpy(), "last_hidden_state": hidden.numpy()}
    for i in range(n):
        result[f"present_key_{i}"] = cache.layers[i].keys.numpy()
        result[f"present_value_{i}"] = cache.layers[i].values.numpy()
    return result


def write_embeddings(model: CitrusV, out_dir: Path, source_hash: str) -> dict[str, Any]:
    """Write the token embedding table as `embeddings.npy` (float32 [V, H]) with its manifest.

    The runtime looks tokens up in numpy (`host_inputs.embed`) and splices image features
    before calling the LLM graph. Returns the manifest.
    """
    table = model.mllm.model.language_model.embed_tokens.weight.detach().float().numpy()
    path = Path(out_dir) / EMBEDDINGS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(table, dtype=np.float32))
    tmp.replace(path)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "kind": "embeddings",
        "component": "embeddings",
        "file": path.name,
        "sha256": sha256_file(path),
        "shape": list(table.shape),
        "dtype": "float32",
        "precision": "float32",
        "model_config": model.config.name,
        "source": source_hash,
        "versions": library_versions(),
    }
    write_json_atomic(manifest_path(path), manifest)
    log.info("embeddings: wrote %s %s", path.name, table.shape)
    return manifest


COMPONENT = register(
    Component(name=NAME, spec=llm_spec, wrapper=LlmStepExport, reference=llm_reference)
)
