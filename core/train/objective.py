"""The flow-matching objective of AR teacher-forcing training (LongLive 2.0 `CausalDiffusion`).

    x_t = (1 - sigma) x0 + sigma eps        v = eps - x0        x0_hat = x_t - sigma v_hat

Training grid (FlowMatchScheduler, shift s, sigma_min 0, "extra one step", T = 1000 steps):
sigma_i = shift(1 - i/T) for i = 0..T-1 with shift(u) = s u / (1 + (s - 1) u), t_i = T sigma_i
(t_0 = 1000, t_999 ~ 4.98). Any t maps back to the grid by its nearest entry (first on ties).
The tables are float32, built in the reference's operation order, so lookups agree with it.

Timesteps are drawn per frame as integer indices, then the first frame of every block is copied
over the block; their values go through the training dtype (bf16), which collapses grid values
near 1000 to a few representable numbers (pitfall 17). Loss weight "bsmntw":
w(t) = (y(t) - min y) T / sum_grid(y - min y), y(t) = exp(-2 ((t - T/2) / T)^2): 0 at t = 1000,
mean 1 over the grid, max ~2.08 near t = 500.

Shapes: latents are channels-first `[B, C, F, H, W]`; per-frame quantities (t, sigma, index,
weights, masks, per-frame losses) are `[B, F]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.config import check_whole_blocks


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """Timestep shift of flow matching: s u / (1 + (s - 1) u)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def per_frame(values_BF: Tensor) -> Tensor:
    """`[B, F]` -> `[B, 1, F, 1, 1]`, broadcastable over channels-first latents."""
    return values_BF[:, None, :, None, None]


class FlowMatchSchedule:
    """The 1000-step training grid: `sigmas`, `timesteps`, `loss_weights` (all float32 `[steps]`)."""

    def __init__(self, shift: float = 5.0, steps: int = 1000):
        if shift <= 0:
            raise ValueError(f"timestep shift must be positive, got {shift} (the official value is 5.0)")
        if steps < 2:
            raise ValueError(f"the training grid needs at least 2 steps, got {steps} (use 1000)")
        self.shift = shift
        self.steps = steps
        # linspace(1, 0, steps + 1) without its last entry: sigma_min 0 with "extra one step"
        self.sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1)[:-1], shift)
        self.timesteps = self.sigmas * steps
        y = torch.exp(-2 * ((self.timesteps - steps / 2) / steps) ** 2)
        y_above_min = y - y.min()
        self.loss_weights = y_above_min * (steps / y_above_min.sum())
        self._on_device: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """`(sigmas, timesteps, loss_weights)` on `device`, copied there once (not on every step)."""
        if device not in self._on_device:
            self._on_device[device] = (self.sigmas.to(device), self.timesteps.to(device), self.loss_weights.to(device))
        return self._on_device[device]

    def index_to_t(self, index: Tensor) -> Tensor:
        """Grid timesteps (float32) of integer indices."""
        return self.tables(index.device)[1][index]

    def index_to_sigma(self, index: Tensor) -> Tensor:
        """Grid sigmas (float32) of integer indices."""
        return self.tables(index.device)[0][index]

    def t_to_index(self, t: Tensor) -> Tensor:
        """Index of the nearest grid timestep for every entry of `t` (any float dtype)."""
        grid = self.tables(t.device)[1]
        return (t.float().reshape(-1, 1) - grid).abs().argmin(dim=1).reshape(t.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """sigma (float32) of the nearest grid entry, as the reference's add_noise does."""
        return self.index_to_sigma(self.t_to_index(t))

    def loss_weight(self, t: Tensor) -> Tensor:
        """bsmntw weight (float32) of the nearest grid entry."""
        return self.tables(t.device)[2][self.t_to_index(t)]

    def sample_block_timesteps(self, batch: int, frames: int, frames_per_block: int,
                               generator: torch.Generator, dtype: torch.dtype = torch.bfloat16,
                               i2v: bool = False) -> tuple[Tensor, Tensor]:
        """Per-block training timesteps: `(t [B, F] float32 holding dtype-rounded values, index [B, F])`.

        Indices are uniform over the grid, one per frame, then the first frame of each block is
        copied over its block (independent across blocks and samples). With `i2v`, frame 0 is the
        image frame: t = 0 there (its index keeps the block's value, as in the reference). Under SP
        pass `i2v` only on the rank that holds global frame 0. Tensors live on the generator's device.
        """
        check_whole_blocks(frames, frames_per_block, "the training clip")
        index = torch.randint(0, self.steps, (batch, frames), generator=generator, device=generator.device)
        blocks = index.view(batch, frames // frames_per_block, frames_per_block)
        index = blocks[:, :, :1].expand_as(blocks).reshape(batch, frames)
        t = self.index_to_t(index).to(dtype).float()
        if i2v:
            t[:, 0] = 0.0
        return t, index


def sample_block_timesteps(batch: int, frames: int, frames_per_block: int, generator: torch.Generator,
                           dtype: torch.dtype = torch.bfloat16, i2v: bool = False, *,
                           schedule: FlowMatchSchedule | None = None) -> tuple[Tensor, Tensor]:
    """`FlowMatchSchedule.sample_block_timesteps` on `schedule` (default: shift 5, 1000 steps)."""
    schedule = schedule if schedule is not None else FlowMatchSchedule()
    return schedule.sample_block_timesteps(batch, frames, frames_per_block, generator, dtype, i2v)


def noisy_input(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_t = (1 - sigma) x0 + sigma eps with float32 `sigma [B, F]`, in the dtype of `noise`."""
    s = per_frame(sigma)
    return ((1 - s) * x0 + s * noise).type_as(noise)


def x0_estimate(x_t: Tensor, pred_v: Tensor, sigma: Tensor) -> Tensor:
    """x0_hat = x_t - sigma v_hat, computed in float64 (as the reference), returned in `pred_v`'s dtype."""
    return (x_t.double() - per_frame(sigma).double() * pred_v.double()).to(pred_v.dtype)


def flow_loss(pred_v: Tensor, target_v: Tensor, t: Tensor, schedule: FlowMatchSchedule,
              frame_mask: Tensor | None = None, denominator: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weighted flow-matching loss: `(loss, per_frame_loss [B, F])`.

    per_frame_loss = w(t) mean_{C,H,W} (v_hat - v)^2 in float32 (before masking). With a mask the
    loss is sum(mask per_frame_loss) / denominator, the denominator defaulting to the local valid
    count (under SP pass the mask sum all-reduced over the SP group); without a mask, the mean.
    """
    assert pred_v.shape == target_v.shape and (pred_v.shape[0], pred_v.shape[2]) == t.shape, (pred_v.shape, t.shape)
    squared = F.mse_loss(pred_v.float(), target_v.float(), reduction="none")
    per_frame_loss = squared.mean(dim=(1, 3, 4)) * schedule.loss_weight(t)
    if frame_mask is None:
        return per_frame_loss.mean(), per_frame_loss
    if denominator is None:
        denominator = frame_mask.sum()
    denominator = torch.as_tensor(denominator, dtype=torch.float32, device=per_frame_loss.device)
    loss = (per_frame_loss * frame_mask).sum() / denominator.clamp(min=1.0)
    return loss, per_frame_loss


@dataclass
class ARStep:
    """Inputs and target of one teacher-forcing step (see `ar_targets`)."""

    clean: Tensor               # [B, C, F, H, W] clean history (timestep 0)
    noisy: Tensor               # [B, C, F, H, W] x_t
    t: Tensor                   # [B, F] noisy-half timesteps (0 at an I2V image frame)
    sigma: Tensor               # [B, F] float32 sigma of t (nearest grid entry)
    target: Tensor              # [B, C, F, H, W] velocity target (0 at an I2V image frame)
    frame_mask: Tensor | None   # [B, F] float32 loss mask, None when every frame counts


def ar_targets(x0: Tensor, noise: Tensor, t: Tensor, schedule: FlowMatchSchedule, *,
               noised_x0: Tensor | None = None, clean: Tensor | None = None,
               image_latent: Tensor | None = None, frame_mask: Tensor | None = None) -> ARStep:
    """Build `[clean | noisy]` inputs and the velocity target of one step.

    `noised_x0` (default `x0`) is what gets noised and `clean` (default `x0`) the clean history;
    error recycling passes corrupted copies of both, and `noise` may be corrupted too. The target
    is `noise - x0` with the *original* x0. With `image_latent [B, C, 1, H, W]` (I2V) the image
    replaces frame 0 of the clean and noisy halves; the target there is 0, and the frame is
    masked out of the loss (t must already be 0 there: `sample_block_timesteps(..., i2v=True)`).
    `frame_mask [B, F]` (padding) is combined with the I2V mask.
    """
    noised_x0 = x0 if noised_x0 is None else noised_x0
    clean = x0 if clean is None else clean
    sigma = schedule.t_to_sigma(t)
    noisy = noisy_input(noised_x0, noise, sigma)
    target = noise - x0
    if image_latent is not None:
        assert image_latent.shape[2] == 1 and bool((t[:, 0] == 0).all()), "I2V frame 0 needs t = 0"
        image = image_latent.to(device=noisy.device, dtype=noisy.dtype)
        noisy = torch.cat([image, noisy[:, :, 1:]], dim=2)
        clean = torch.cat([image.to(clean.dtype), clean[:, :, 1:]], dim=2)
        target = torch.cat([torch.zeros_like(target[:, :, :1]), target[:, :, 1:]], dim=2)
        frame_mask = (torch.ones(t.shape, dtype=torch.float32, device=t.device) if frame_mask is None
                      else frame_mask.float().clone())
        frame_mask[:, 0] = 0.0
    return ARStep(clean=clean, noisy=noisy, t=t, sigma=sigma, target=target,
                  frame_mask=None if frame_mask is None else frame_mask.float())


def prediction_errors(pred_v: Tensor, step: ARStep, x0: Tensor, index: Tensor,
                      schedule: FlowMatchSchedule) -> tuple[Tensor, Tensor]:
    """Errors for error recycling: `(latent_error, noise_error)`, both `[B, C, F, H, W]`.

    latent_error = x0_hat - x0 (x0_hat in float64, then the model dtype); noise_error =
    (v_hat - v)(1 - sigma_index): added to eps it equals eps_hat - eps. As in the reference, the
    noise error uses the sigma of the sampled index, the x0 estimate the sigma of the (bf16) t.
    """
    with torch.no_grad():
        latent_error = x0_estimate(step.noisy, pred_v, step.sigma) - x0
        sigma_index = schedule.index_to_sigma(index).to(pred_v.dtype)
        noise_error = (pred_v - step.target.to(pred_v.dtype)) * (1.0 - per_frame(sigma_index))
    return latent_error, noise_error
