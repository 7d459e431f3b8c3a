"""AR objective (core/train/objective.py) and error recycling (core/train/recycle.py) against slow references."""

from __future__ import annotations

import io
import math

import pytest
import torch

from core.errors import UserError
from core.train.objective import (
    FlowMatchSchedule,
    ar_targets,
    flow_loss,
    noisy_input,
    prediction_errors,
    sample_block_timesteps,
    x0_estimate,
)
from core.train.recycle import ErrorRecycler, RecycleConfig

SCHEDULE = FlowMatchSchedule()


def slow_grid(shift: float = 5.0, steps: int = 1000) -> list[float]:
    out = []
    for i in range(steps):
        u = 1.0 - i / steps
        out.append(steps * shift * u / (1 + (shift - 1) * u))
    return out


def slow_weights(timesteps: list[float], steps: int = 1000) -> list[float]:
    y = [math.exp(-2 * ((t - steps / 2) / steps) ** 2) for t in timesteps]
    low = min(y)
    total = sum(v - low for v in y)
    return [(v - low) * steps / total for v in y]


def slow_nearest(t: float, grid: list[float]) -> int:
    best = 0
    for i, g in enumerate(grid):
        if abs(g - t) < abs(grid[best] - t):
            best = i
    return best


# ---------------------------------------------------------------------------------- schedule


def test_grid_matches_formula():
    grid = torch.tensor(slow_grid(), dtype=torch.float64)
    assert SCHEDULE.timesteps.dtype == torch.float32
    torch.testing.assert_close(SCHEDULE.timesteps.double(), grid, rtol=1e-6, atol=0)  # float32 rounding
    assert SCHEDULE.timesteps[0] == 1000.0
    assert SCHEDULE.timesteps[-1] == pytest.approx(4.98, abs=0.01)
    torch.testing.assert_close(SCHEDULE.sigmas * 1000, SCHEDULE.timesteps)
    assert torch.equal(SCHEDULE.t_to_index(SCHEDULE.timesteps), torch.arange(1000))


def test_loss_weight_table():
    w = SCHEDULE.loss_weights
    reference = torch.tensor(slow_weights(slow_grid()), dtype=torch.float64)
    torch.testing.assert_close(w.double(), reference, rtol=0, atol=1e-5)
    assert w[0] == 0.0  # t = 1000
    assert w.double().mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w.max().item() == pytest.approx(2.08, abs=0.01)
    assert 490 < SCHEDULE.timesteps[w.argmax()].item() < 510
    # bf16 t = 1000 still gets weight exactly 0
    assert SCHEDULE.loss_weight(torch.tensor([1000.0], dtype=torch.bfloat16)).item() == 0.0


@pytest.mark.parametrize("t", [1000.0, 999.0, 997.5, 600.2, 4.9, 0.0, 250.0])
def test_t_to_sigma_nearest(t):
    grid = slow_grid()
    i = slow_nearest(t, grid)
    assert SCHEDULE.t_to_index(torch.tensor([t])).item() == i
    assert SCHEDULE.t_to_sigma(torch.tensor([t])).item() == SCHEDULE.sigmas[i].item()


@pytest.mark.parametrize("frames_per_block", [1, 4, 8])
@pytest.mark.parametrize("i2v", [False, True])
def test_timesteps_constant_per_block(frames_per_block, i2v):
    g = torch.Generator().manual_seed(3)
    t, index = SCHEDULE.sample_block_timesteps(5, 16, frames_per_block, g, i2v=i2v)
    assert t.shape == index.shape == (5, 16) and t.dtype == torch.float32
    for b in range(5):
        for f in range(16):
            first = f - f % frames_per_block
            assert index[b, f] == index[b, first]
            expected = 0.0 if (i2v and f == 0) else SCHEDULE.timesteps[index[b, f]].to(torch.bfloat16).item()
            assert t[b, f].item() == expected
    assert torch.equal(t.to(torch.bfloat16).float(), t)  # values are bf16-representable


def test_timestep_distribution():
    g = torch.Generator().manual_seed(0)
    t, index = sample_block_timesteps(4000, 16, 8, g)
    blocks = index[:, ::8].double()  # [4000, 2], independent uniform draws on {0..999}
    counts = torch.histc(blocks.flatten(), bins=10, min=0, max=1000)
    expected = blocks.numel() / 10
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)
    assert blocks.mean().item() == pytest.approx(499.5, abs=5 * 288.7 / math.sqrt(blocks.numel()))
    correlation = torch.corrcoef(blocks.T)[0, 1].item()
    assert abs(correlation) < 5 / math.sqrt(4000)
    # bf16 collapses the grid near 1000 (spacing 4): far fewer distinct values than indices
    assert len(torch.unique(t[index < 20])) < 10
    with pytest.raises(ValueError, match="12 latent frames are not a multiple of frames_per_block=8; use 8 or 16"):
        sample_block_timesteps(1, 12, 8, g)


# ---------------------------------------------------------------------------------- loss


def slow_flow_loss(pred, target, t, mask, denominator):
    grid = slow_grid()
    weights = slow_weights(grid)
    batch, channels, frames, height, width = pred.shape
    per_frame = [[0.0] * frames for _ in range(batch)]
    total = 0.0
    for b in range(batch):
        for f in range(frames):
            squared = 0.0
            for c in range(channels):
                for y in range(height):
                    for x in range(width):
                        squared += (float(pred[b, c, f, y, x]) - float(target[b, c, f, y, x])) ** 2
            per_frame[b][f] = squared / (channels * height * width) * weights[slow_nearest(float(t[b, f]), grid)]
            total += per_frame[b][f] * (1.0 if mask is None else float(mask[b, f]))
    if mask is None:
        count = batch * frames
    elif denominator is None:
        count = max(float(mask.sum()), 1.0)
    else:
        count = denominator
    return total / count, per_frame


@pytest.mark.parametrize("case", ["no_mask", "mask", "mask_global_count", "all_masked"])
def test_flow_loss_matches_loop(case):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 3, 4, 2, 3, generator=g).to(torch.bfloat16)
    target = torch.randn(2, 3, 4, 2, 3, generator=g).to(torch.bfloat16)
    t, _ = SCHEDULE.sample_block_timesteps(2, 4, 2, g)
    mask = {"no_mask": None, "mask": torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]]),
            "mask_global_count": torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]]),
            "all_masked": torch.zeros(2, 4)}[case]
    denominator = torch.tensor(11.0) if case == "mask_global_count" else None
    loss, per_frame = flow_loss(pred, target, t, SCHEDULE, mask, denominator)
    ref_loss, ref_per_frame = slow_flow_loss(pred, target, t, mask, None if denominator is None else 11.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(per_frame, torch.tensor(ref_per_frame), rtol=1e-5, atol=1e-7)


def test_noisy_input_and_x0_estimate():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 4, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 3, 4, 2, 2, generator=g, dtype=torch.float64)
    sigma = torch.rand(2, 4, generator=g)
    x_t = noisy_input(x0, noise, sigma)
    for b in range(2):
        for f in range(4):
            s = float(sigma[b, f])
            torch.testing.assert_close(x_t[b, :, f], (1 - s) * x0[b, :, f] + s * noise[b, :, f])
    torch.testing.assert_close(x0_estimate(x_t, noise - x0, sigma), x0)


@pytest.mark.parametrize("i2v", [False, True])
def test_ar_targets(i2v):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 3, 8, 2, 2, generator=g)
    noise = torch.randn(2, 3, 8, 2, 2, generator=g)
    noised_x0 = x0 + 0.1
    clean = x0 - 0.2
    image = torch.randn(2, 3, 1, 2, 2, generator=g)
    pad_mask = torch.tensor([[1.0] * 8, [1.0] * 6 + [0.0] * 2])
    t, index = SCHEDULE.sample_block_timesteps(2, 8, 4, g, i2v=i2v)
    step = ar_targets(x0, noise, t, SCHEDULE, noised_x0=noised_x0, clean=clean,
                      image_latent=image if i2v else None, frame_mask=pad_mask)
    sigma = SCHEDULE.t_to_sigma(t)
    first = 1 if i2v else 0
    expected_noisy = noisy_input(noised_x0, noise, sigma)
    torch.testing.assert_close(step.noisy[:, :, first:], expected_noisy[:, :, first:])
    torch.testing.assert_close(step.target[:, :, first:], (noise - x0)[:, :, first:])
    torch.testing.assert_close(step.clean[:, :, first:], clean[:, :, first:])
    expected_mask = pad_mask.clone()
    if i2v:
        assert torch.equal(step.noisy[:, :, :1], image) and torch.equal(step.clean[:, :, :1], image)
        assert not step.target[:, :, 0].any()
        assert (step.t[:, 0] == 0).all()
        expected_mask[:, 0] = 0
    assert torch.equal(step.frame_mask, expected_mask)
    # the loss ignores the I2V frame and the padding: no gradient reaches them
    pred = torch.randn(x0.shape, generator=g, requires_grad=True)
    loss, _ = flow_loss(pred, step.target, step.t, SCHEDULE, step.frame_mask)
    loss.backward()
    grad_per_frame = pred.grad.abs().sum(dim=(1, 3, 4))
    assert torch.equal(grad_per_frame > 0, expected_mask > 0)


def test_prediction_errors():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 3, 8, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 3, 8, 2, 2, generator=g, dtype=torch.float64)
    t, index = SCHEDULE.sample_block_timesteps(1, 8, 4, g, dtype=torch.float32)
    step = ar_targets(x0, noise, t, SCHEDULE)
    pred = step.target + 0.05 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    latent_error, noise_error = prediction_errors(pred, step, x0, index, SCHEDULE)
    sigma = step.sigma.double()[:, None, :, None, None]
    torch.testing.assert_close(latent_error, -sigma * (pred - step.target))
    sigma_index = SCHEDULE.sigmas[index].double()[:, None, :, None, None]
    torch.testing.assert_close(noise_error, (pred - step.target) * (1 - sigma_index))


# ---------------------------------------------------------------------------------- error recycling

BLOCK = 2  # frames per block in the recycling tests


def recycler(sp_rank=0, sp_size=1, seed=0, **overrides) -> ErrorRecycler:
    return ErrorRecycler(RecycleConfig(**overrides), generator=torch.Generator().manual_seed(seed),
                         sp_rank=sp_rank, sp_size=sp_size)


def block_errors(values: list[float]) -> torch.Tensor:
    """[1, 1, BLOCK * len(values), 1, 1] with each block filled with its value."""
    return torch.tensor(values).repeat_interleave(BLOCK)[None, None, :, None, None]


def entry_value(entry: torch.Tensor) -> float:
    """The value a stored block was filled with."""
    assert (entry == entry.flatten()[0]).all()
    return entry.flatten()[0].item()


def indices(values: list[int]) -> torch.Tensor:
    return torch.tensor(values).repeat_interleave(BLOCK)[None]


def test_config_defaults_and_validation():
    c = RecycleConfig()
    assert (c.num_buckets, c.buffer_size_per_bucket, c.buffer_warmup_iter, c.context_inject_prob,
            c.latent_inject_prob, c.noise_inject_prob, c.clean_prob, c.clean_buffer_update_prob,
            c.modulate_factor, c.start_step, c.replacement_strategy) == (
        50, 500, 50, 0.9, 0.9, 0.01, 0.2, 0.1, 0.3, 0, "random")
    for bad, match in [({"clean_prob": 1.5}, "probability"), ({"num_buckets": 0}, "num_buckets"),
                       ({"replacement_strategy": "lru"}, "random, fifo, l2"), ({"modulate_factor": 1.0}, r"\[0, 1\)"),
                       ({"buffer_size_per_bucket": 0}, "at least 1"), ({"start_step": -1}, ">= 0")]:
        with pytest.raises(ValueError, match=match):
            RecycleConfig(**bad)


def reference_nearest_owned(bucket: int, rank: int, size: int, num_buckets: int) -> int:
    """The reference's forward/backward search."""
    if bucket % size == rank:
        return bucket
    fwd = (rank - bucket % size) % size
    bwd = size - fwd
    up, down = bucket + fwd, bucket - bwd
    up_ok, down_ok = 0 <= up < num_buckets, 0 <= down < num_buckets
    if up_ok and down_ok:
        return up if fwd <= bwd else down
    return up if up_ok else down


@pytest.mark.parametrize("sp_size", [1, 2, 3, 4])
def test_bucket_sharding_and_remap(sp_size):
    owned = []
    for rank in range(sp_size):
        r = recycler(rank, sp_size, num_buckets=10)
        assert all(b % sp_size == rank for b in r.latent.owned)
        owned += r.latent.owned
        for bucket in range(10):
            assert r.latent.nearest_owned(bucket) == reference_nearest_owned(bucket, rank, sp_size, 10)
    assert sorted(owned) == list(range(10))
    # adds to buckets of other ranks are dropped; lookups land in the nearest owned bucket
    r = recycler(1 % sp_size, sp_size, num_buckets=10, modulate_factor=0.0, clean_buffer_update_prob=1.0)
    bucket_values = [float(b) for b in range(10)]
    r.update(block_errors(bucket_values), block_errors(bucket_values), indices([100 * b + 7 for b in range(10)]),
             False, frames_per_block=BLOCK)
    assert {b: len(v) for b, v in r.latent.entries.items()} == {b: 1 for b in r.latent.owned}
    for bucket in range(10):
        assert entry_value(r.latent.sample(100 * bucket)) == r.latent.nearest_owned(bucket)


def test_bucket_width():
    r = recycler(num_buckets=50)
    assert [r.latent.bucket_of(i) for i in (0, 19, 20, 999, 1200)] == [0, 0, 1, 49, 49]


def filled(**overrides) -> ErrorRecycler:
    r = recycler(**overrides)
    values = [float(b + 1) for b in range(r.config.num_buckets)]
    t_index = indices([int(b * r.latent.bucket_width) for b in range(r.config.num_buckets)])
    r.update(block_errors(values), block_errors([-v for v in values]), t_index, False, frames_per_block=BLOCK)
    return r


def test_injection_probabilities():
    r = filled(num_buckets=4, seed=11)
    x = torch.zeros(1, 1, 2 * BLOCK, 1, 1)
    t_index = indices([0, 500])
    trials = 4000
    counts = dict(ran_clean=0, latent_injected=0, noise_injected=0, context_injected=0)
    for _ in range(trials):
        injection = r.inject(x, x, x, t_index, BLOCK)
        for key in counts:
            counts[key] += getattr(injection, key)
    c = r.config
    expected = {"ran_clean": c.clean_prob, "latent_injected": (1 - c.clean_prob) * c.latent_inject_prob,
                "noise_injected": (1 - c.clean_prob) * c.noise_inject_prob,
                "context_injected": (1 - c.clean_prob) * c.context_inject_prob}
    for key, p in expected.items():
        assert abs(counts[key] - trials * p) < 5 * math.sqrt(trials * p * (1 - p)), (key, counts[key])


def test_injection_values_and_modulation():
    r = filled(num_buckets=4, clean_prob=0.0, latent_inject_prob=1.0, noise_inject_prob=1.0,
               context_inject_prob=1.0, modulate_factor=0.0)
    x = torch.zeros(2, 1, 2 * BLOCK, 1, 1)
    t_index = torch.cat([indices([0, 999]), indices([260, 740])])
    injection = r.inject(x, x, x, t_index, BLOCK)
    assert injection.latent_injected and injection.noise_injected and injection.context_injected
    expected = torch.tensor([[1.0, 4.0], [2.0, 3.0]]).repeat_interleave(BLOCK, dim=1)  # bucket + 1
    torch.testing.assert_close(injection.x0[:, 0, :, 0, 0], expected)
    torch.testing.assert_close(injection.noise[:, 0, :, 0, 0], -expected)
    context = injection.clean[:, 0, :, 0, 0]
    assert set(context.unique().tolist()) <= {1.0, 2.0, 3.0, 4.0}  # any bucket
    assert torch.equal(context[:, 0::BLOCK], context[:, 1::BLOCK])  # one entry per block
    assert not x.any()  # inputs are not modified in place
    # scaling: U(0.7, 1.3) around the stored entry
    r = filled(num_buckets=1, seed=3)
    scales = torch.tensor([entry_value(r.latent.sample(0)) for _ in range(3000)])
    assert 0.7 <= scales.min() and scales.max() <= 1.3
    assert scales.mean().item() == pytest.approx(1.0, abs=0.02)
    assert scales.var().item() == pytest.approx(0.6 ** 2 / 12, rel=0.1)


def test_no_injection_before_start_step_or_when_empty():
    r = filled(start_step=10, clean_prob=0.0, latent_inject_prob=1.0, context_inject_prob=1.0)
    x = torch.zeros(1, 1, 2 * BLOCK, 1, 1)
    assert r.inject(x, x, x, indices([0, 0]), BLOCK, step=9) == (x, x, x, False, False, False, False)
    assert r.inject(x, x, x, indices([0, 0]), BLOCK, step=10).latent_injected
    empty = recycler(clean_prob=0.0, latent_inject_prob=1.0, noise_inject_prob=1.0, context_inject_prob=1.0)
    injection = empty.inject(x, x, x, indices([0, 0]), BLOCK)
    assert not (injection.latent_injected or injection.noise_injected or injection.context_injected)


@pytest.mark.parametrize("strategy", ["fifo", "random", "l2"])
def test_replacement(strategy):
    r = recycler(num_buckets=1, buffer_size_per_bucket=3, replacement_strategy=strategy)
    for value in range(6):
        r.update(block_errors([float(value)]), block_errors([0.0]), indices([0]), False, frames_per_block=BLOCK)
    stored = sorted(entry_value(e) for e in r.latent.entries[0])
    assert len(stored) == 3 and r.latent.total_added == 6
    if strategy == "fifo":
        assert stored == [3.0, 4.0, 5.0]
    elif strategy == "l2":  # each new value replaces its nearest (the previous newest)
        assert stored == [0.0, 1.0, 5.0]
    else:
        assert 5.0 in stored


@pytest.mark.parametrize("update_prob, expect_update", [(0.0, False), (1.0, True)])
def test_clean_step_update_probability(update_prob, expect_update):
    r = recycler(clean_buffer_update_prob=update_prob)
    r.update(block_errors([1.0]), block_errors([1.0]), indices([0]), True, frames_per_block=BLOCK)
    assert (not r.latent.is_empty()) == expect_update and (not r.noise.is_empty()) == expect_update
    r.update(block_errors([1.0]), block_errors([1.0]), indices([0]), False, frames_per_block=BLOCK)
    assert not r.latent.is_empty()


def test_warmup_gather():
    calls = []

    def gather(x):  # a fake 2-rank world: the other rank's tensor is ours + 100 (index: + 500)
        calls.append(x.shape)
        return [x, x + (500 if x.dtype == torch.long else 100)]

    r = recycler(num_buckets=2, buffer_warmup_iter=3)
    for step in range(6):
        r.update(block_errors([1.0]), block_errors([2.0]), indices([0]), False, frames_per_block=BLOCK,
                 step=step, gather_fn=gather)
    assert len(calls) == 3 * 4  # steps 0..3 inclusive, three tensors each
    assert len(r.latent.entries[0]) == 6 and len(r.latent.entries[1]) == 4
    assert {entry_value(e) for e in r.latent.entries[1]} == {101.0}


def test_state_round_trip():
    r = filled(num_buckets=4, seed=5)
    buffer = io.BytesIO()
    torch.save(r.state_dict(), buffer)
    buffer.seek(0)
    restored = recycler(num_buckets=4, seed=99)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name in ("latent", "noise"):
        for bucket, entries in getattr(r, name).entries.items():
            assert all(torch.equal(a, b) for a, b in zip(entries, getattr(restored, name).entries[bucket],
                                                             strict=True))
    x = torch.zeros(1, 1, 2 * BLOCK, 1, 1)
    for _ in range(20):  # the generator state travels too: the same draws follow
        a, b = r.inject(x, x, x, indices([0, 900]), BLOCK), restored.inject(x, x, x, indices([0, 900]), BLOCK)
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3], strict=True)) and a[3:] == b[3:]
    with pytest.raises(UserError, match="num_buckets"):
        recycler(num_buckets=5).load_state_dict(r.state_dict())


@pytest.mark.parametrize("i2v", [False, True])
def test_teacher_forcing_step_with_tiny_model(i2v):
    """One full step: timesteps -> injection -> targets -> model -> loss -> errors back into the buffers."""
    from tests.conftest import text_context, tiny_model

    model = tiny_model()
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(1, 48, 4, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    image = torch.randn(1, 48, 1, 4, 4, generator=g) if i2v else None
    recycle = recycler(num_buckets=4, clean_prob=0.0, latent_inject_prob=1.0, context_inject_prob=1.0,
                       modulate_factor=0.0)
    losses = []
    for step in range(2):
        t, index = SCHEDULE.sample_block_timesteps(1, 4, BLOCK, g, i2v=i2v)
        injection = recycle.inject(x0, noise, x0, index, BLOCK, step=step)
        batch = ar_targets(x0, injection.noise, t, SCHEDULE, noised_x0=injection.x0, clean=injection.clean,
                           image_latent=image)
        pred = model(batch.noisy, batch.t, text_context(1, 0), frames_per_block=BLOCK, clean_x=batch.clean)
        loss, _ = flow_loss(pred, batch.target, batch.t, SCHEDULE, batch.frame_mask)
        loss.backward()
        losses.append(loss.item())
        latent_error, noise_error = prediction_errors(pred.detach(), batch, x0, index, SCHEDULE)
        recycle.update(latent_error, noise_error, index, injection.ran_clean, frames_per_block=BLOCK, step=step)
        assert injection.latent_injected == (step > 0)  # the buffers fill after the first step
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert recycle.stats()["latent_entries"] == 4  # 2 blocks per step
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
