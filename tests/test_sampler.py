"""FlowUniPCSampler against an independent closed-form UniPC (reference-model.md §6.2-§6.4).

`reference_sample` below is written from the closed form of §6.3 alone (predict-x0, bh2, order 2
with lower order at the first and last steps, a corrector of the previous predictor's order, the
model evaluated on the uncorrected sample, result = last x0 estimate); it does not use the sampler's code.
Its scalar coefficients are computed in float64 from the float32 solver sigmas and rounded to
float32; every tensor product, sum and quotient is evaluated in float32 (float64 for float64 data)
and rounded to the data dtype, in the order the doc writes the update.

bf16 arithmetic conventions (`rounded`: which float32 coefficients are first rounded to bf16):
- ("rho",): the official run on CUDA. Wan's fm_solvers_unipc.py casts the rho's to the sample
  dtype (`.to(x.dtype)`) and keeps every other coefficient a 0-d CPU float32 tensor, which CUDA
  kernels read at float32 precision. (The doc's "float32 scalar coefficients" holds except for rho.)
- ("sigma", "coef", "rho"): PyTorch on CPU. `coef_f32_0d * x_bf16` casts the coefficient to bf16
  before multiplying (`x_bf16 * coef` and `x_bf16 / r` do not), and both diffusers and Wan put the
  coefficient on the left. Our CPU sampler is bit-exact under this convention.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.sampler import FlowUniPCSampler, model_timesteps, shifted_sigmas, training_sigma_max

SHIFT = 5.0
SHAPE = (1, 8, 4, 6, 10)  # [B, F, C, H, W]-like; the solver is elementwise
STEPS = (1, 2, 3, 4, 8, 50, 300)  # 300: a long schedule whose first two timesteps are both 999

# reference-model.md §6.2 table and §6.3 coefficients
DOC_TIMESTEPS = {4: [999, 937, 833, 624], 2: [999, 833]}
DOC_SIGMAS = {4: [0.99979985, 0.93726546, 0.83305538, 0.62468737, 0.0],
              2: [0.99979985, 0.83305538, 0.0]}
DOC_LAMBDAS_4 = [-8.516232, -2.704054, -1.607438, -0.509492]
DOC_RHOS_4 = {2: (0.025939, 0.563665), 3: (0.081755, 0.507953)}


# --------------------------------------------------------------------------------------------
# Independent reference (reference-model.md §6.2-§6.3)
# --------------------------------------------------------------------------------------------


def _f32(value: float) -> float:
    return float(np.float32(value))


def _base_sigmas(steps: int) -> list[float]:
    sigma_max = _f32(0.999)  # first sigma of the 1000-step training grid, float32
    return [sigma_max * (1.0 - i / steps) for i in range(steps)]


def _shift(s: float, shift: float) -> float:
    return shift * s / (1.0 + (shift - 1.0) * s)


def reference_sigmas(steps: int, shift: float = SHIFT) -> list[float]:
    """Solver sigmas: shifted linspace(sigma_max, 0, steps + 1)[:-1] as float32, then a final 0."""
    return [_f32(_shift(s, shift)) for s in _base_sigmas(steps)] + [0.0]


def reference_timesteps(steps: int, shift: float = SHIFT) -> list[int]:
    """Model timesteps: floor(1000 * unrounded shifted sigma)."""
    return [math.floor(1000.0 * _shift(s, shift)) for s in _base_sigmas(steps)]


def _lambda(sigma: float) -> float:
    """lambda = ln(alpha) - ln(sigma) with alpha = 1 - sigma; +inf at sigma = 0."""
    return math.inf if sigma == 0.0 else math.log(1.0 - sigma) - math.log(sigma)


def corrector_rhos(lam_km2: float, lam_km1: float, lam_k: float) -> tuple[float, float, float]:
    """(r, rho_0, rho_1) of the order-2 corrector at step k: rows [1, 1], [r, 1] (Cramer)."""
    h = lam_k - lam_km1
    phi = math.expm1(-h)
    r = (lam_km2 - lam_km1) / h
    b1 = (phi / (-h) - 1.0) / phi
    b2 = 2.0 * ((phi / (-h) - 1.0) / (-h) - 0.5) / phi
    return r, (b1 - b2) / (1.0 - r), (b2 - r * b1) / (1.0 - r)


class _Arith:
    """Tensor ops of one dtype: each computed in `acc` and rounded to `dtype`. Coefficients are
    float32 values; a multiplier whose kind ("sigma": the sigma of m = x - sigma v; "coef": the
    sigma ratio and alpha * phi; "rho": the rho's and 0.5) or a divisor ("r") listed in `rounded`
    is rounded to `dtype` first."""

    def __init__(self, dtype: torch.dtype, rounded: tuple[str, ...] = ()):
        self.dtype = dtype
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.rounded = rounded

    def _coef(self, c: float, kind: str) -> float:
        c = _f32(c)
        if kind in self.rounded:
            c = torch.tensor(c, dtype=torch.float64).to(self.dtype).item()
        return c

    def mul(self, c: float, a: torch.Tensor, kind: str) -> torch.Tensor:
        return (a.to(self.acc) * self._coef(c, kind)).to(self.dtype)

    def div(self, a: torch.Tensor, r: float) -> torch.Tensor:
        return (a.to(self.acc) / self._coef(r, "r")).to(self.dtype)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.to(self.acc) + b.to(self.acc)).to(self.dtype)

    def sub(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.to(self.acc) - b.to(self.acc)).to(self.dtype)


def reference_sample(model, x: torch.Tensor, steps: int, shift: float = SHIFT,
                     rounded: tuple[str, ...] = (), trace: dict | None = None) -> torch.Tensor:
    """Closed-form UniPC of §6.3; `model(x, k, t)` is the flow at step k. `trace` (optional)
    receives the lambdas, the rho's, the predictor orders and every step's output."""
    ops = _Arith(x.dtype, rounded)
    sig = reference_sigmas(steps, shift)
    ts = reference_timesteps(steps, shift)
    alpha = [1.0 - s for s in sig]
    lam = [_lambda(s) for s in sig]
    trace = {} if trace is None else trace
    trace.update(lambda_=lam, rho={}, orders=[], x=[])
    m: list[torch.Tensor] = []  # x0 estimates m_0, m_1, ...
    orders: list[int] = trace["orders"]  # predictor order used at each step
    xc_prev = None  # the (corrected) sample the previous predictor started from
    for k in range(steps):
        v = model(x, k, ts[k])  # evaluated on the uncorrected x_k
        m.append(ops.sub(x, ops.mul(sig[k], v, "sigma")))
        xc = x
        if k >= 1:  # corrector of the previous predictor's order
            h = lam[k] - lam[k - 1]
            a_phi = alpha[k] * math.expm1(-h)
            base = ops.sub(ops.mul(sig[k] / sig[k - 1], xc_prev, "coef"),
                           ops.mul(a_phi, m[k - 1], "coef"))
            dm = ops.sub(m[k], m[k - 1])
            if orders[k - 1] == 1:
                trace["rho"][k] = (0.5,)
                inner = ops.mul(0.5, dm, "rho")
            else:
                r, rho_0, rho_1 = corrector_rhos(lam[k - 2], lam[k - 1], lam[k])
                trace["rho"][k] = (rho_0, rho_1)
                d = ops.div(ops.sub(m[k - 2], m[k - 1]), r)
                inner = ops.add(ops.mul(rho_0, d, "rho"), ops.mul(rho_1, dm, "rho"))
            xc = ops.sub(base, ops.mul(a_phi, inner, "coef"))
        orders.append(min(2, steps - k, k + 1))
        h = lam[k + 1] - lam[k]  # +inf at the last step: phi = -1, sigma ratio 0
        a_phi = alpha[k + 1] * math.expm1(-h)
        x_next = ops.sub(ops.mul(sig[k + 1] / sig[k], xc, "coef"),
                         ops.mul(a_phi, m[k], "coef"))
        if orders[k] == 2:
            d = ops.div(ops.sub(m[k - 1], m[k]), (lam[k - 1] - lam[k]) / h)
            x_next = ops.sub(x_next, ops.mul(a_phi, ops.mul(0.5, d, "rho"), "coef"))
        trace["x"].append(x_next)
        xc_prev, x = xc, x_next
    return x


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def run_sampler(model, x: torch.Tensor, steps: int, shift: float = SHIFT,
                trajectory: list | None = None, calls: list | None = None) -> torch.Tensor:
    sampler = FlowUniPCSampler(steps, shift)
    for k, t in enumerate(sampler.timesteps):
        v = model(x, k, t)
        if calls is not None:
            calls.append((x, v))
        x = sampler.step(v, x)
        if trajectory is not None:
            trajectory.append(x)
    return x


def random_latents(seed: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64).to(device, dtype)


def random_flows(steps: int, seed: int, dtype: torch.dtype, device: str = "cpu"):
    """A fresh seeded random (non-zero mean) flow per step, independent of x."""
    g = torch.Generator().manual_seed(seed)
    flows = [(1.0 + 0.5 * torch.randn(SHAPE, generator=g, dtype=torch.float64)).to(device, dtype)
             for _ in range(steps)]
    return lambda x, k, t: flows[k]


def nonlinear_model(x: torch.Tensor, k: int, t: int) -> torch.Tensor:
    """A deterministic flow that depends nonlinearly on the sample and the timestep."""
    return torch.tanh(x * 0.7 + t / 1000.0) * 1.5 - 0.25 * x


def bf16_ulp(scale: float) -> float:
    return 2.0 ** (math.floor(math.log2(scale)) - 7)


def _max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", sorted(DOC_TIMESTEPS))
def test_timesteps_match_doc_table(steps):
    assert FlowUniPCSampler(steps, SHIFT).timesteps == DOC_TIMESTEPS[steps]
    assert model_timesteps(steps, SHIFT) == DOC_TIMESTEPS[steps]


def test_50_step_timesteps_match_doc():
    timesteps = FlowUniPCSampler(50, SHIFT).timesteps
    assert len(timesteps) == 50
    assert timesteps[:5] == [999, 995, 991, 987, 982]
    assert timesteps[-3:] == [241, 172, 92]


@pytest.mark.parametrize("steps", STEPS)
def test_timesteps_match_reference(steps):
    expected = reference_timesteps(steps)
    assert FlowUniPCSampler(steps, SHIFT).timesteps == expected
    assert model_timesteps(steps, SHIFT) == expected
    assert all(isinstance(t, int) for t in FlowUniPCSampler(steps, SHIFT).timesteps)


@pytest.mark.parametrize("steps", sorted(DOC_SIGMAS))
def test_solver_sigmas_match_doc_table(steps):
    sigmas = FlowUniPCSampler(steps, SHIFT).sigmas
    assert sigmas.dtype == torch.float32
    expected = torch.tensor(DOC_SIGMAS[steps], dtype=torch.float32)
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-7)
    assert sigmas[-1].item() == 0.0


@pytest.mark.parametrize("steps", STEPS)
def test_solver_sigmas_match_reference(steps):
    expected = reference_sigmas(steps)
    assert FlowUniPCSampler(steps, SHIFT).sigmas.tolist() == expected  # bitwise float32
    np.testing.assert_allclose(shifted_sigmas(steps, SHIFT), expected[:-1], rtol=1e-7, atol=0)


def test_training_sigma_max_is_float32_0_999():
    assert training_sigma_max() == float(np.float32(0.999)) == 0.9990000128746033


def test_reference_reproduces_doc_coefficients():
    trace: dict = {}
    x = random_latents(0, torch.float64)
    reference_sample(random_flows(4, 1, torch.float64), x, 4, trace=trace)
    np.testing.assert_allclose(trace["lambda_"][:4], DOC_LAMBDAS_4, rtol=0, atol=1e-5)
    assert trace["lambda_"][4] == math.inf
    assert trace["orders"] == [1, 2, 2, 1]
    assert trace["rho"][1] == (0.5,)
    for k, rhos in DOC_RHOS_4.items():
        np.testing.assert_allclose(trace["rho"][k], rhos, rtol=0, atol=1e-5)
    # Cramer's rule agrees with solving the 2x2 system numerically.
    lam = trace["lambda_"]
    r, rho_0, rho_1 = corrector_rhos(lam[1], lam[2], lam[3])
    h = lam[3] - lam[2]
    phi = math.expm1(-h)
    b = [(phi / -h - 1) / phi, 2 * ((phi / -h - 1) / -h - 0.5) / phi]
    np.testing.assert_allclose(np.linalg.solve([[1.0, 1.0], [r, 1.0]], b), [rho_0, rho_1])


# --------------------------------------------------------------------------------------------
# Equivalence with the reference
# --------------------------------------------------------------------------------------------

# Max |ours - reference| / max |reference|. Both use float32 coefficients, computed in float32 by
# the sampler and in float64-then-rounded by the reference, so float64 data agree to float32
# coefficient precision; on the dense 300-step schedule h = lambda_{k+1} - lambda_k taken from
# float32 lambdas keeps only ~4 digits, hence the looser bound there (observed 4e-6).
def tolerance(steps: int, dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 or steps > 50 else 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("steps", STEPS)
def test_matches_reference_random_flows(steps, dtype):
    x = random_latents(10 + steps, dtype)
    model = random_flows(steps, 1000 + steps, dtype)
    ours: list = []
    trace: dict = {}
    out = run_sampler(model, x, steps, trajectory=ours)
    ref = reference_sample(model, x, steps, trace=trace)
    assert out.dtype == dtype and out.shape == SHAPE
    assert ref.abs().max() > 1.0  # a non-trivial data scale
    assert _max_rel(out, ref) <= tolerance(steps, dtype)
    for k, (a, b) in enumerate(zip(ours, trace["x"], strict=True)):  # every intermediate step
        assert _max_rel(a, b) <= tolerance(steps, dtype), f"step {k}"


@pytest.mark.parametrize("steps", [2, 3, 4, 8, 50])
def test_matches_reference_nonlinear_model(steps):
    """The model sees the sample path, so evaluating it on a corrected sample would show."""
    x = random_latents(20 + steps, torch.float32)
    out = run_sampler(nonlinear_model, x, steps)
    ref = reference_sample(nonlinear_model, x, steps)
    assert _max_rel(out, ref) <= 1e-5


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 50])
def test_bf16_bit_exact_with_cpu_arithmetic(steps):
    """bf16 on CPU: bit-exact with the reference when each coefficient multiplying a tensor is
    rounded to bf16 first (what PyTorch's CPU kernels do with `coef_f32_0d * x_bf16`). Not on
    the 300-step schedule: there the float32-vs-float64 coefficient computation (see
    `tolerance`) flips a rounding now and then."""
    x = random_latents(30 + steps, torch.bfloat16)
    model = random_flows(steps, 3000 + steps, torch.bfloat16)
    ours: list = []
    trace: dict = {}
    run_sampler(model, x, steps, trajectory=ours)
    reference_sample(model, x, steps, rounded=("sigma", "coef", "rho"), trace=trace)
    for k, (a, b) in enumerate(zip(ours, trace["x"], strict=True)):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, b), f"step {k}: max diff {(a.float() - b.float()).abs().max()}"


# Max |ours - reference| in bf16 ulps of the data scale (max |reference|), CPU sampler against
# float32-coefficient arithmetic. The reference's own bf16 error against the float64 answer is of
# the same size (about 1.5 ulp at 4 steps, 7 ulp at 50).
BF16_ULPS = {1: 1, 2: 2, 3: 3, 4: 3, 8: 4, 50: 10}


@pytest.mark.parametrize("rounded", [(), ("rho",)], ids=["doc_f32_coefficients", "official_cuda"])
@pytest.mark.parametrize("steps", sorted(BF16_ULPS))
def test_bf16_close_to_float32_coefficient_arithmetic(steps, rounded):
    x = random_latents(30 + steps, torch.bfloat16)
    model = random_flows(steps, 3000 + steps, torch.bfloat16)
    out = run_sampler(model, x, steps).double()
    ref = reference_sample(model, x, steps, rounded=rounded).double()
    ulp = bf16_ulp(ref.abs().max().item())
    diff = (out - ref).abs()
    assert diff.max().item() <= BF16_ULPS[steps] * ulp
    assert diff.pow(2).mean().sqrt().item() <= 0.5 * ulp * max(1.0, BF16_ULPS[steps] / 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_bf16_cuda_bit_exact_with_official_arithmetic(steps):
    """On CUDA the official scheduler's 0-d CPU float32 coefficients are read at float32 (only
    rho is cast to bf16); diffusers' UniPC, which moves them to the GPU, failed this."""
    x = random_latents(30 + steps, torch.bfloat16, "cuda")
    model = random_flows(steps, 3000 + steps, torch.bfloat16, "cuda")
    out = run_sampler(model, x, steps)
    ref = reference_sample(model, x, steps, rounded=("rho",))
    assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {out.numel()} differ"


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("steps, last_sigma", [(4, 0.62468737), (2, 0.83305538), (1, 0.99979985)])
def test_result_is_x0_estimate_of_final_model_call(steps, last_sigma, dtype):
    """§6.3: x_out = x_last - sigma_last * v_last, on the uncorrected input of the last call."""
    calls: list = []
    x = random_latents(40 + steps, dtype)
    out = run_sampler(nonlinear_model, x, steps, calls=calls)
    assert len(calls) == steps
    x_last, v_last = calls[-1]
    sigma = torch.tensor(np.float32(last_sigma).item(), dtype=dtype)
    assert torch.equal(out, x_last - sigma * v_last)
    assert not torch.equal(out, x_last - v_last)  # the sigma matters


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_recovers_clean_x0_on_a_straight_path(steps):
    """With the exact flow of x_t = (1 - s) x0 + s noise (v = noise - x0 = (x - x0) / s), every
    x0 estimate is x0 and the sampler stays on the path: the result is x0 to fp32 precision."""
    g = torch.Generator().manual_seed(50 + steps)
    x0 = torch.randn(SHAPE, generator=g) * 2.0 + 0.5
    noise = torch.randn(SHAPE, generator=g)
    sig = reference_sigmas(steps)
    x = ((1.0 - sig[0]) * x0.double() + sig[0] * noise.double()).float()
    trajectory: list = []
    out = run_sampler(lambda x, k, t: (x - x0) / sig[k], x, steps, trajectory=trajectory)
    scale = x0.abs().max().item()
    assert (out - x0).abs().max().item() <= 1e-6 * scale
    for k, xk in enumerate(trajectory[:-1], start=1):  # intermediate samples stay on the path
        on_path = (1.0 - sig[k]) * x0.double() + sig[k] * noise.double()
        assert (xk.double() - on_path).abs().max().item() <= 1e-5 * scale, f"step {k}"


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_step_past_the_end_raises(steps):
    sampler = FlowUniPCSampler(steps, SHIFT)
    x = random_latents(60, torch.float32)
    model = random_flows(steps, 61, torch.float32)
    for k, t in enumerate(sampler.timesteps):
        x = sampler.step(model(x, k, t), x)
    with pytest.raises(RuntimeError):
        sampler.step(model(x, 0, 0), x)


@pytest.mark.parametrize("steps", [2, 4])
def test_samplers_keep_no_shared_history(steps):
    x_a, x_b = random_latents(70, torch.float32), random_latents(71, torch.float32)
    model = nonlinear_model
    first = run_sampler(model, x_a, steps)
    # A sampler made after the first has run gives the same result on the same inputs.
    assert torch.equal(run_sampler(model, x_a, steps), first)
    # Two samplers stepped in lockstep on different inputs each give their solo result.
    solo_b = run_sampler(model, x_b, steps)
    sa, sb = FlowUniPCSampler(steps, SHIFT), FlowUniPCSampler(steps, SHIFT)
    ya, yb = x_a, x_b
    for k, t in enumerate(sa.timesteps):
        ya = sa.step(model(ya, k, t), ya)
        yb = sb.step(model(yb, k, t), yb)
    assert torch.equal(ya, first) and torch.equal(yb, solo_b)
    assert not torch.equal(first, solo_b)
