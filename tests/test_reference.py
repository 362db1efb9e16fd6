"""Reference pipeline: `[SEG]` states captured in one pass; one SAM2 encoder run per image."""

from __future__ import annotations

import torch
from fixtures import random_rgb, tiny_model, tiny_tokenizer

from citrus_edge.modelling.reference import ReferencePipeline, mrope_inputs
from citrus_edge.preprocess import qwen_pixels
from citrus_edge.prompts import n_image_tokens, prompt_ids


class ScriptedHead(torch.nn.Module):
    """Replaces lm_head: emits a fixed token script, whatever the hidden state."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        tok = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        out = torch.zeros(*h.shape[:-1], self.vocab)
        out[..., tok] = 1.0
        return out


def _plain_forward(model, rgb, prompt: str, generated: list[int]):
    """One full-sequence forward over prompt + generated tokens (all hidden states kept)."""
    cfg = model.config
    qp = qwen_pixels(rgb, cfg.preprocess)
    n_img = n_image_tokens(qp.grid_thw, cfg.vision.spatial_merge_size)
    p = torch.from_numpy(prompt_ids(tiny_tokenizer(), prompt, n_img))
    ids = torch.cat([p, torch.tensor(generated, dtype=torch.long)])[None]
    grid = torch.tensor([qp.grid_thw])
    with torch.no_grad():
        out = model.mllm.model(
            input_ids=ids,
            pixel_values=torch.from_numpy(qp.pixel_values),
            image_grid_thw=grid,
            position_ids=mrope_inputs(model, ids, grid),
            output_hidden_states=True,
        )
    return out, len(p)


def _pipeline(script):
    model = tiny_model()
    model.mllm.lm_head = ScriptedHead(script, model.config.text.vocab_size)
    return ReferencePipeline(
        model, tiny_tokenizer(), max_new_tokens=16, constrained_decoding=False
    ), model


def test_seg_state_equals_plain_forward_and_two_masks_one_encoder_run():
    tok = tiny_model().config.tokens
    script = [20, tok.seg, 21, 22, tok.seg, 23, tok.eos]
    pipe, model = _pipeline(script)
    calls = []
    model.sam2.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    rgb = random_rgb()
    captured = {}
    orig = model.decode_masks

    def spy(feats, seg_hidden):
        captured["seg"] = seg_hidden.clone()
        return orig(feats, seg_hidden)

    model.decode_masks = spy
    result = pipe(rgb, "Please help segment the lesion in this scan.")
    assert result.token_ids == script[:-1]
    assert result.stopped_by == "eos"
    assert len(result.masks) == 2 and len(calls) == 1
    assert all(m.shape == rgb.shape[:2] and m.dtype == bool for m in result.masks)

    # Plain forward over prompt + generated tokens: the [SEG] state is the final-norm hidden
    # state of the position whose logits produced [SEG].
    out, n_prompt = _plain_forward(
        model, rgb, "Please help segment the lesion in this scan.", result.token_ids
    )
    last = out.hidden_states[-1][0]
    assert (last - out.last_hidden_state[0]).abs().max() == 0
    seg_pos = [n_prompt + k - 1 for k, t in enumerate(result.token_ids) if t == tok.seg]
    diff = (captured["seg"] - last[seg_pos]).abs().max().item()
    assert diff < 1e-5, diff


def test_no_seg_no_mask_no_encoder_run():
    tok = tiny_model().config.tokens
    pipe, model = _pipeline([20, 21, tok.eos])
    calls = []
    model.sam2.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    result = pipe(random_rgb(), "Describe the findings in this scan.")
    assert result.masks == [] and calls == []


def test_max_new_tokens_stops():
    pipe, _ = _pipeline([20])
    pipe.max_new_tokens = 5
    result = pipe(random_rgb(), "Describe the findings in this scan.")
    assert len(result.token_ids) == 5 and result.stopped_by == "max_new_tokens"


def test_unscripted_greedy_matches_transformers_generate():
    """Our one-pass loop gives the tokens of a full-sequence argmax re-run (teacher forcing)."""
    model = tiny_model(seed=3)
    pipe = ReferencePipeline(model, tiny_tokenizer(), max_new_tokens=8, constrained_decoding=False)
    rgb = random_rgb(seed=5)
    result = pipe(rgb, "Describe the findings in this scan.")
    out, n_prompt = _plain_forward(
        model, rgb, "Describe the findings in this scan.", result.token_ids
    )
    with torch.no_grad():
        logits = model.mllm.lm_head(out.last_hidden_state[0, n_prompt - 1 : -1])
    assert logits.argmax(-1).tolist() == result.token_ids
