"""The training loop (the demo model's, reused by distillation): schedule, samples, losses,
exact resume, carried training-only heads, curricula."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from fixtures import tiny_model, tiny_tokenizer

from citrus_edge.calib_data.phantom import PhantomConfig, generate_phantom
from citrus_edge.config import TINY
from citrus_edge.modelling.train import (
    IGNORE,
    TRAIN_SEED_BASE,
    OccupancyHead,
    PhantomStream,
    TrainConfig,
    centre_heat,
    collate,
    compute_losses,
    fake_int4,
    focal_heat_loss,
    grow_vision,
    make_sample,
    train,
)


def test_learning_rate_warms_up_then_decays_to_min():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-5, warmup=10)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == cfg.lr_at(10) == pytest.approx(1e-3)
    assert cfg.lr_at(55) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half way down the cosine
    assert cfg.lr_at(100) == cfg.lr_at(150) == pytest.approx(1e-5)


@pytest.mark.parametrize("seed", [TRAIN_SEED_BASE + i for i in range(6)])
def test_sample_targets_only_the_answer(seed):
    s = make_sample(TINY, tiny_tokenizer(), seed, PhantomConfig())
    answer = s.labels != IGNORE
    start = int(answer.argmax())
    assert answer[start:].all() and not answer[:start].any()
    np.testing.assert_array_equal(s.labels[start:], s.ids[start:])
    assert s.labels[-1] == TINY.tokens.eos
    ph = generate_phantom(seed, PhantomConfig())
    assert s.n_lesions == len(ph.lesions)
    # One occupancy value per visual token; their mean is the lesions' share of the image.
    assert (s.ids == TINY.tokens.image).sum() == len(s.occupancy)
    union = np.zeros(ph.image.shape, bool)
    for les in ph.lesions:
        union |= les.mask
    assert abs(float(s.occupancy.mean()) - union.mean()) < 0.01
    assert abs(float(s.mask.mean()) - union.mean()) < 0.01  # the SAM-size target mask
    # One centre mark per lesion (unless two centroids share a token), inside that lesion.
    assert s.centres.shape == s.occupancy.shape and set(np.unique(s.centres)) <= {0.0, 1.0}
    assert 0 < s.centres.sum() <= len(ph.lesions) or len(ph.lesions) == 0 == s.centres.sum()
    assert (s.occupancy[s.centres == 1] > 0).all()


def test_centre_marks_the_token_holding_each_centroid():
    cfg, tok = PhantomConfig(), tiny_tokenizer()
    seed = next(  # a two-lesion phantom
        TRAIN_SEED_BASE + i
        for i in range(100)
        if len(generate_phantom(TRAIN_SEED_BASE + i).lesions) == 2
    )
    s, ph = make_sample(TINY, tok, seed, cfg), generate_phantom(seed, cfg)
    m = TINY.preprocess.factor  # pixels per visual token side
    grid = int(np.sqrt(len(s.centres)))  # a square phantom has a square token grid
    scale = grid * m / ph.image.shape[0]  # resized input / original
    rows, cols = np.nonzero(s.centres.reshape(grid, grid))
    marked = {(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}
    holding = set()
    for les in ph.lesions:
        ys, xs = np.nonzero(les.mask)
        # The centroid pixel, in resized-input pixels, and the token square that holds it.
        cy, cx = (ys.mean() + 0.5) * scale, (xs.mean() + 0.5) * scale
        holding.add((int(cy // m), int(cx // m)))
    assert marked == holding and len(marked) == 2


def test_heat_is_one_at_each_centre_token_and_spreads_with_lesion_size():
    s = next(  # a phantom with lesions
        x
        for i in range(20)
        if (
            x := make_sample(TINY, tiny_tokenizer(), TRAIN_SEED_BASE + i, PhantomConfig())
        ).n_lesions
    )
    # Peaks of exactly 1 (the centre tokens, checked against the centroids above), spreading
    # to the neighbouring tokens.
    assert s.heat.min() >= 0 and s.heat.max() == 1.0 and 1 <= s.centres.sum() <= s.n_lesions
    assert s.heat.sum() > s.centres.sum()
    # By hand, 256-px image at 336 px, 28-px tokens: a 96 x 128 box is 126 x 168 resized, its
    # diagonal 210 px = 7.5 tokens, sigma 1.25 -> one token off: exp(-1 / 3.125) = 0.7261.
    d_row, d_col = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 2.0])
    big = centre_heat(d_row, d_col, (0, 0, 96, 128), (256, 256), (336, 336), 28)
    np.testing.assert_allclose(big, [1.0, 0.72615, 0.27804], rtol=1e-4)  # exp(-4/3.125)
    # A 20-px lesion: sigma floors at half a token -> exp(-2) one token off.
    small = centre_heat(d_row, d_col, (0, 0, 20, 20), (256, 256), (336, 336), 28)
    np.testing.assert_allclose(small, [1.0, np.exp(-2), np.exp(-8)], rtol=1e-5)


def test_focal_heat_loss_by_hand():
    heat = torch.tensor([1.0, 0.5, 0.0])
    # p = 0.5 everywhere: peak (1-p)^2 log p; near (1-0.5)^4 p^2 log(1-p); far p^2 log(1-p).
    got = focal_heat_loss(torch.zeros(3), heat).item()
    ln = math.log(0.5)
    assert got == pytest.approx(-(0.25 * ln + 0.0625 * 0.25 * ln + 0.25 * ln), rel=1e-5)
    right = focal_heat_loss(torch.tensor([8.0, -8.0, -8.0]), heat).item()
    assert right < 1e-3 < focal_heat_loss(torch.tensor([-8.0, 8.0, -8.0]), heat).item()
    # Normalised by the number of peaks: two copies of the map give the same loss.
    twice = focal_heat_loss(torch.zeros(6), heat.repeat(2)).item()
    assert twice == pytest.approx(got, rel=1e-6)
    with pytest.raises(ValueError, match="centre_loss 'Focal'"):
        TrainConfig(centre_loss="Focal")


def test_grown_vision_tower_computes_the_same_function(tmp_path, tok):
    from citrus_edge.modelling.checkpoint import save_checkpoint

    model = tiny_model().eval()
    deeper = dataclasses.replace(
        TINY, vision=dataclasses.replace(TINY.vision, depth=4, fullatt_block_indexes=(1, 3))
    )
    grown = grow_vision(model, deeper).eval()
    assert len(grown.mllm.model.visual.blocks) == 4
    s = make_sample(TINY, tiny_tokenizer(), TRAIN_SEED_BASE, PhantomConfig())
    pv, grid = torch.from_numpy(s.pixel_values), torch.tensor([s.grid_thw])
    with torch.no_grad():
        a = model.mllm.model.get_image_features(pv, grid, return_dict=True).pooler_output[0]
        b = grown.mllm.model.get_image_features(pv, grid, return_dict=True).pooler_output[0]
    assert (a - b).abs().max().item() == 0.0
    old, new = model.state_dict(), grown.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)  # every old weight kept
    # A stage may start a deeper tower from a shallower checkpoint, and nothing else.
    save_checkpoint(model, tmp_path / "s1", tokenizer_json=tok)
    cont = TrainConfig(steps=1, batch_size=2, warmup=1, init_from=str(tmp_path / "s1"))
    assert len(train(deeper, cont, tmp_path / "s2", tok).mllm.model.visual.blocks) == 4
    moved = dataclasses.replace(
        deeper, vision=dataclasses.replace(deeper.vision, fullatt_block_indexes=(0, 3))
    )
    wider = dataclasses.replace(
        deeper, vision=dataclasses.replace(deeper.vision, intermediate_size=128)
    )
    for other in (moved, wider):
        with pytest.raises(ValueError, match="more than the depth differs"):
            grow_vision(model, other)


def test_losses_at_initialisation():
    tok = tiny_tokenizer()
    samples = [make_sample(TINY, tok, TRAIN_SEED_BASE + i, PhantomConfig()) for i in range(6)]
    batch = collate(samples, TINY.tokens.pad)
    assert batch["ids"].shape[0] == 6 and batch["attention_mask"].sum() == sum(
        len(s.ids) for s in samples
    )
    torch.manual_seed(0)
    model, aux = tiny_model(), OccupancyHead(TINY.text.hidden_size)
    losses = compute_losses(model, aux, batch)
    focal = compute_losses(model, aux, batch, centre_loss="focal")["centre"]
    assert math.isfinite(focal.item()) and focal.item() > 0
    assert {"lm", "aux", "centre", "first", "count", "mask", "mask_aux", "iou"} <= losses.keys()
    assert all(math.isfinite(v.item()) for v in losses.values())
    # Random weights: next-token CE near ln(vocab), count CE near ln(4 classes).
    assert losses["lm"].item() == pytest.approx(math.log(TINY.text.vocab_size), rel=0.15)
    assert losses["count"].item() == pytest.approx(math.log(4), rel=0.25)
    # Every term reaches the weights it should train.
    losses["first"].backward()
    grad = model.mllm.model.visual.patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the decision token looks at the image


@pytest.fixture
def tok(tmp_path):
    """The tiny tokenizer saved as a run's `tokenizer.json`."""
    path = tmp_path / "tokenizer.json"
    tiny_tokenizer().save(str(path))
    return path


class _Interrupt(Exception):
    pass


def _crash_at(step: int):
    """An `extra_loss` that interrupts the run at its `step`-th call (step `step`)."""
    calls = []

    def crash(model, batch):
        calls.append(1)
        if len(calls) == step:
            raise _Interrupt
        return {}

    return crash


def test_resume_after_interruption_is_exact(tmp_path, tok):
    cfg = TrainConfig(steps=4, batch_size=2, warmup=1, ckpt_every=2, log_every=2)
    straight = train(TINY, cfg, tmp_path / "a", tok)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(_Interrupt):
            train(TINY, cfg, tmp_path / "b", tok, extra_loss=_crash_at(3))
        assert torch.get_num_threads() == 2  # the caller's count is back (the run used 1)
    finally:
        torch.set_num_threads(threads)
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=False)["step"] == 2
    with pytest.raises(ValueError, match=r"train_config.json: resuming .* \(lr\)"):
        train(TINY, dataclasses.replace(cfg, lr=5e-4), tmp_path / "b", tok)
    resumed = train(TINY, cfg, tmp_path / "b", tok)
    a, b = straight.state_dict(), resumed.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert any((a[k] - tiny_model().state_dict()[k]).abs().max() > 0 for k in a)  # it trained
    curve = [json.loads(x) for x in (tmp_path / "b" / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [2, 4]


def test_fake_int4_is_the_int4_exports_grid_with_a_straight_through_gradient():
    from citrus_edge.compress.int4_awq import dequantize_blocks, quantize_blocks

    g = torch.Generator().manual_seed(0)
    for shape, block in (((64, 512), 128), ((24, 100), 32), ((8, 48), 16)):
        w = torch.randn(shape, generator=g)
        w[0, :block] = 0.0  # an all-zero block keeps scale 1, as the exporter's
        q, scale = quantize_blocks(w.numpy().T.copy(), block)
        exported = dequantize_blocks(q, scale, block).T
        w.requires_grad_(True)
        fq = fake_int4(w, block)
        assert np.abs(fq.detach().numpy() - exported).max() == 0.0, (shape, block)
        assert len(np.unique(q)) > 8 and np.abs(q).max() <= 8  # 4-bit, and the grid is used
        upstream = torch.randn(shape, generator=g)
        (fq * upstream).sum().backward()
        assert torch.equal(w.grad, upstream)  # straight through
        assert torch.equal(fake_int4(fq.detach(), block), fq.detach())  # on the grid: fixed point
    with pytest.raises(ValueError, match="fake_int4_block must be a power of two"):
        TrainConfig(fake_int4_block=48)


def test_quantization_aware_run_returns_int4_weights_and_resumes_exactly(tmp_path, tok):
    cfg = TrainConfig(
        steps=4, batch_size=2, warmup=1, ckpt_every=2, log_every=2, fake_int4_block=16
    )
    straight = train(TINY, cfg, tmp_path / "a", tok)
    linears = [
        (n, m)
        for n, m in straight.mllm.model.language_model.layers.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    assert len(linears) == 7 * TINY.text.num_layers
    for name, m in linears:  # plain parameters again, each exactly on its INT4 grid
        assert not hasattr(m, "parametrizations"), name
        assert torch.equal(fake_int4(m.weight.detach(), 16), m.weight.detach()), name
    assert any(
        (straight.state_dict()[k] - tiny_model().state_dict()[k]).abs().max() > 0
        for k in straight.state_dict()
    )
    with pytest.raises(_Interrupt):
        train(TINY, cfg, tmp_path / "b", tok, extra_loss=_crash_at(3))
    resumed = train(TINY, cfg, tmp_path / "b", tok)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() == tiny_model().state_dict().keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_continuing_run_starts_from_checkpoint_and_heads(tmp_path, tok):
    from citrus_edge.modelling.checkpoint import save_checkpoint

    first = train(TINY, TrainConfig(steps=2, batch_size=2, warmup=1), tmp_path / "s1", tok)
    save_checkpoint(first, tmp_path / "s1" / "model", tokenizer_json=tok)
    still = TrainConfig(steps=1, batch_size=2, lr=0.0, min_lr=0.0, warmup=1)  # no update
    cont = dataclasses.replace(
        still,
        init_from=str(tmp_path / "s1" / "model"),
        init_aux_from=str(tmp_path / "s1" / "state.pt"),
    )
    second = train(TINY, cont, tmp_path / "s2", tok)
    a, b = first.state_dict(), second.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    aux1 = torch.load(tmp_path / "s1" / "state.pt", weights_only=False)["aux"]
    aux2 = torch.load(tmp_path / "s2" / "state.pt", weights_only=False)["aux"]
    assert all(torch.equal(aux1[k], aux2[k]) for k in aux1)
    fresh = train(TINY, still, tmp_path / "s3", tok)  # without init_*: a new random model
    assert any((a[k] - fresh.state_dict()[k]).abs().max() > 0 for k in a)
    # A state saved before the centre head existed still carries; the centre head starts fresh.
    old = {k: v for k, v in aux1.items() if not k.startswith("centre.")}
    torch.save({"aux": old}, tmp_path / "old.pt")
    train(
        TINY,
        dataclasses.replace(cont, init_aux_from=str(tmp_path / "old.pt")),
        tmp_path / "s5",
        tok,
    )
    aux5 = torch.load(tmp_path / "s5" / "state.pt", weights_only=False)["aux"]
    assert all(torch.equal(aux1[k], aux5[k]) for k in old)
    torch.save({"aux": {}}, tmp_path / "empty.pt")
    with pytest.raises(RuntimeError, match="Missing key"):  # heads asked for must be there
        train(
            TINY,
            dataclasses.replace(cont, init_aux_from=str(tmp_path / "empty.pt")),
            tmp_path / "s4",
            tok,
        )


def test_curriculum_changes_training_phantoms_only(tmp_path, tok):
    many = PhantomConfig(lesion_count_probs=(0.0, 0.0, 0.0, 1.0))
    counts = [s.n_lesions for s in itertools.islice(PhantomStream(TINY, tok, 0, many), 8)]
    default = [s.n_lesions for s in itertools.islice(PhantomStream(TINY, tok, 0), 8)]
    assert np.mean(counts) > 2.5 > np.mean(default)
    seen = []

    def record(model, batch):
        seen.extend(batch["n_lesions"].tolist())
        return {}

    cfg = TrainConfig(steps=2, batch_size=3, warmup=1, phantom=many)
    train(TINY, cfg, tmp_path / "run", tok, extra_loss=record)
    assert len(seen) == 6 and np.mean(seen) > 2.5  # the run trained on the curriculum
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["phantom"]["lesion_count_probs"] == [0.0, 0.0, 0.0, 1.0]


def test_a_stage_may_change_the_image_size_and_keeps_the_weights(tmp_path, tok):
    from citrus_edge.modelling.checkpoint import load_checkpoint, save_checkpoint

    first = train(TINY, TrainConfig(steps=1, batch_size=2, warmup=1), tmp_path / "s1", tok)
    save_checkpoint(first, tmp_path / "s1" / "model", tokenizer_json=tok)
    side = 336  # 12 x 12 visual tokens instead of 8 x 8
    bigger = TrainConfig(
        steps=1, batch_size=2, lr=0.0, min_lr=0.0, warmup=1, pixels=(side * side, side * side)
    )
    cont = dataclasses.replace(bigger, init_from=str(tmp_path / "s1" / "model"))
    second = train(TINY, cont, tmp_path / "s2", tok)
    save_checkpoint(second, tmp_path / "s2" / "model", tokenizer_json=tok)
    saved = load_checkpoint(tmp_path / "s2" / "model").config.preprocess
    assert (saved.min_pixels, saved.max_pixels) == (side * side, side * side)
    a, b = first.state_dict(), second.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0  # lr 0: same weights
    s = make_sample(second.config, tiny_tokenizer(), TRAIN_SEED_BASE, PhantomConfig())
    assert len(s.occupancy) == 144 and s.grid_thw == (1, 24, 24)
    # Only the image size may differ from the checkpoint's config; other dimensions may not.
    wider = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, intermediate_size=256))
    with pytest.raises(ValueError, match="config differs"):
        train(wider, cont, tmp_path / "s3", tok)
