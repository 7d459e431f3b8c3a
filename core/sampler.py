"""The few-step flow UniPC sampler of LongLive 2.0 (Wan's FlowUniPCMultistepScheduler).

Settings of the reference: bh2, order 2, predict-x0, lower order at the first and last steps,
final sigma 0, shift applied to `linspace(sigma_max, 0, steps + 1)[:-1]` with sigma_max = 0.999
(float32), the first sigma of the 1000-step training grid. The model sees `floor(1000 * sigma)`
(999/937/833/624 for 4 steps, 999/833 for 2) while the solver uses the unrounded sigmas.

With alpha = 1 - sigma, lambda = ln alpha - ln sigma, m_k = x_k - sigma_k v_k (the x0 estimate
of the model call on the *uncorrected* x_k), h = lambda_target - lambda_source, phi = expm1(-h):

    predictor  x_{k+1} = (s_{k+1}/s_k) x_k^c - a_{k+1} phi m_k  - a_{k+1} phi 0.5 D_k     (order 2)
    corrector  x_k^c   = (s_k/s_{k-1}) x_{k-1}^c - a_k phi m_{k-1}
                         - a_k phi (rho_0 D_{k-1} + rho_1 (m_k - m_{k-1}))                (order 2)

with D = (m_older - m_newer) / r, r = (lambda_older - lambda_newer) / h, and (rho_0, rho_1)
solving [[1, 1], [r, 1]] rho = (b_1, b_2). Order 1 drops the D terms (rho_1 = 0.5). At the last
step sigma = 0, so the result is exactly the final x0 estimate.

The coefficients depend only on the schedule: they are computed once, in float32 on the CPU, and
applied as 0-d CPU tensors in the official operand order, so a bf16 run rounds exactly as the
official one on the same device and the denoising loop never waits on the GPU. (diffusers' own
UniPC matches on a CPU when handed these sigmas, but on CUDA it moves the sigmas to the GPU,
where a bf16 op rounds them to bf16 first: up to 2 bf16 ulps off the official after 4 steps.)
A new sampler is made for every chunk: the multistep history must not carry across chunks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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


@dataclass(frozen=True)
class StepCoefficients:
    """Scalars of one step, 0-d float32 CPU tensors (rho: float32 too, cast per data dtype)."""

    sigma: Tensor  # sigma_k: x0 estimate m_k = x_k - sigma_k v_k
    # corrector (k >= 1), order = the previous predictor's order
    corrector_order: int
    c_ratio: Tensor | None  # sigma_k / sigma_{k-1}
    c_phi: Tensor | None  # alpha_k * phi
    c_bh: Tensor | None  # alpha_k * B(h) (= alpha_k * phi for bh2)
    c_r: Tensor | None  # r of the D term (order 2)
    c_rho: tuple[float, float] | None  # (rho_0, rho_1); order 1: (0, 0.5)
    # predictor
    predictor_order: int
    p_ratio: Tensor  # sigma_{k+1} / sigma_k
    p_phi: Tensor  # alpha_{k+1} * phi
    p_bh: Tensor  # alpha_{k+1} * B(h)
    p_r: Tensor | None  # r of the D term (order 2)


def _log_snr(sigma: Tensor) -> Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


@functools.lru_cache(maxsize=32)
def _schedule(steps: int, shift: float, num_train_timesteps: int,
              ) -> tuple[tuple[int, ...], Tensor, tuple[StepCoefficients, ...]]:
    sigmas = torch.from_numpy(np.concatenate([shifted_sigmas(steps, shift, num_train_timesteps),
                                              [0.0]]).astype(np.float32))
    lam = [_log_snr(s) for s in sigmas]  # +inf at the final sigma 0
    alpha = [1 - s for s in sigmas]

    def h_terms(target: int, source: int) -> tuple[Tensor, Tensor]:
        h = lam[target] - lam[source]
        return h, torch.expm1(-h)

    coefficients = []
    predictor_order = 0
    for k in range(steps):
        # Corrector of step k re-solves step k-1 -> k with the order its predictor used.
        c_ratio = c_phi = c_r = c_rho = None
        corrector_order = predictor_order if k > 0 else 0
        if k > 0:
            h, phi = h_terms(k, k - 1)
            c_ratio, c_phi = sigmas[k] / sigmas[k - 1], alpha[k] * phi
            if corrector_order == 2:
                c_r = (lam[k - 2] - lam[k - 1]) / h
                hh = -h
                b1 = (phi / hh - 1) * 1 / phi
                b2 = ((phi / hh - 1) / hh - 0.5) * 2 / phi
                system = torch.stack([torch.ones(2), torch.stack([c_r, torch.tensor(1.0)])])
                rho = torch.linalg.solve(system, torch.stack([b1, b2]))
                c_rho = (float(rho[0]), float(rho[1]))
            else:
                c_rho = (0.0, 0.5)
        # Predictor: order 2 once there is history, lower order at the last step.
        predictor_order = min(2, steps - k, k + 1)
        h, phi = h_terms(k + 1, k)
        p_r = (lam[k - 1] - lam[k]) / h if predictor_order == 2 else None
        coefficients.append(StepCoefficients(
            sigma=sigmas[k], corrector_order=corrector_order, c_ratio=c_ratio, c_phi=c_phi,
            c_bh=c_phi, c_r=c_r, c_rho=c_rho, predictor_order=predictor_order,
            p_ratio=sigmas[k + 1] / sigmas[k], p_phi=alpha[k + 1] * phi,
            p_bh=alpha[k + 1] * phi, p_r=p_r))
    timesteps = tuple(model_timesteps(steps, shift, num_train_timesteps))
    return timesteps, sigmas, tuple(coefficients)


class FlowUniPCSampler:
    """One chunk's denoising schedule: `for t in sampler.timesteps: x = sampler.step(v(x, t), x)`.
    The result after the last step is the final x0 estimate."""

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000):
        timesteps, sigmas, coefficients = _schedule(steps, float(shift), num_train_timesteps)
        self.timesteps: list[int] = list(timesteps)
        self.sigmas: Tensor = sigmas  # float32, steps + 1 values, last = 0
        self._coefficients = coefficients
        self._index = 0
        self._x0_estimates: list[Tensor] = []  # m_{k-1}, m_k
        self._last_sample: Tensor | None = None  # x_{k-1}^c, start of the last predictor

    def step(self, flow: Tensor, sample: Tensor) -> Tensor:
        """Advance `sample` by one step given the model's flow (velocity) prediction."""
        if self._index >= len(self._coefficients):
            raise RuntimeError("sampler already finished its steps; make a new one per chunk")
        c = self._coefficients[self._index]
        x0 = sample - c.sigma * flow
        if c.corrector_order:
            sample = self._correct(c, x0)
        self._x0_estimates = (self._x0_estimates + [x0])[-2:]
        self._last_sample = sample
        self._index += 1
        return self._predict(c, sample)

    def _rho(self, value: float, dtype: torch.dtype) -> Tensor:
        return torch.tensor(value, dtype=dtype)  # the reference casts rho to the data dtype

    def _correct(self, c: StepCoefficients, x0: Tensor) -> Tensor:
        previous = self._x0_estimates[-1]
        corrected = c.c_ratio * self._last_sample - c.c_phi * previous
        rho_0, rho_1 = c.c_rho
        update = self._rho(rho_1, x0.dtype) * (x0 - previous)
        if c.corrector_order == 2:
            slope = (self._x0_estimates[-2] - previous) / c.c_r
            update = self._rho(rho_0, x0.dtype) * slope + update
        return corrected - c.c_bh * update

    def _predict(self, c: StepCoefficients, sample: Tensor) -> Tensor:
        current = self._x0_estimates[-1]
        result = c.p_ratio * sample - c.p_phi * current
        if c.predictor_order == 2:
            slope = (self._x0_estimates[-2] - current) / c.p_r
            result = result - c.p_bh * (self._rho(0.5, sample.dtype) * slope)
        return result
