"""The few-step flow UniPC sampler of LongLive 2.0 (Wan's FlowUniPCMultistepScheduler).

Settings of the reference: bh2, order 2, predict-x0, lower order at the end, final sigma 0,
shift applied to `linspace(sigma_max, 0, steps + 1)[:-1]` where sigma_max = 0.999 (float32) is
the first sigma of the 1000-step training grid. The model sees `floor(1000 * sigma)` (999/937/
833/624 for 4 steps, 999/833 for 2) while the solver uses the unrounded sigmas.

diffusers' own `UniPCMultistepScheduler` reproduces this solver step for step, bit for bit in
fp32 and bf16, once it is handed those sigmas explicitly (its built-in flow schedule starts at
sigma 1 and gives 999/937/833/625); tests/test_sampler.py holds it to an independent closed-form
implementation of reference-model.md §6.3. A new sampler is made for every chunk: the multistep
history must not carry across chunks.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor


def training_sigma_max(num_train_timesteps: int = 1000) -> float:
    """First sigma of the training grid `1 - linspace(1, 1/T, T)` reversed, as float32."""
    return float(np.float32(1.0 - 1.0 / num_train_timesteps))


def shifted_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
    """float64 solver sigmas (without the final 0): shift * s / (1 + (shift - 1) * s)."""
    base = np.linspace(training_sigma_max(num_train_timesteps), 0.0, steps + 1)[:-1]
    return shift * base / (1 + (shift - 1) * base)


def model_timesteps(steps: int, shift: float, num_train_timesteps: int = 1000) -> list[int]:
    """Integer timesteps fed to the model (truncated, not rounded)."""
    return [int(t) for t in (shifted_sigmas(steps, shift, num_train_timesteps)
                             * num_train_timesteps).astype(np.int64)]


@functools.cache
def _scheduler_class():
    # Imported on first use: diffusers takes seconds to import.
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler


class FlowUniPCSampler:
    """One chunk's denoising schedule: `for t in sampler.timesteps: x = sampler.step(v(x, t), x)`.
    The result after the last step is the final x0 estimate."""

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000):
        scheduler = _scheduler_class()(
            num_train_timesteps=num_train_timesteps, solver_order=2,
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
            solver_type="bh2", lower_order_final=True, predict_x0=True,
            final_sigmas_type="zero")
        base = np.linspace(training_sigma_max(num_train_timesteps), 0.0, steps + 1)[:-1]
        scheduler.set_timesteps(sigmas=base.copy(), device="cpu")
        # Start at step 0 explicitly: looking the first timestep up would pick the second
        # match when a long schedule repeats 999.
        scheduler.set_begin_index(0)
        self._scheduler = scheduler
        self.timesteps: list[int] = [int(t) for t in scheduler.timesteps]
        self.sigmas: Tensor = scheduler.sigmas.clone()  # float32, steps + 1 values, last = 0
        self._index = 0

    def step(self, flow: Tensor, sample: Tensor) -> Tensor:
        """Advance `sample` by one step given the model's flow (velocity) prediction."""
        if self._index >= len(self.timesteps):
            raise RuntimeError("sampler already finished its steps; make a new one per chunk")
        t = self.timesteps[self._index]
        self._index += 1
        return self._scheduler.step(flow, t, sample, return_dict=False)[0]
