"""The Triton NVFP4 kernels, run by Triton's CPU interpreter in a subprocess (TRITON_INTERPRET=1 must
be set before triton is imported), give the torch reference's codes, scales and values bit for bit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.triton_interpreter import interpreter_result

ROOT = Path(__file__).resolve().parents[1]

# Runs in the subprocess; prints one JSON line {"checked": n, "failures": [...]}.
INTERPRETER_CHECKS = r"""
import json
import torch
from quant import nvfp4
from quant.kernels import dequantize_triton, quantize_triton

def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])

def spread(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=g))
    flat = x.view(-1)
    flat[::29] *= 50.0
    flat[: flat.numel() // 5] *= 1e-5  # E4M3 subnormal and zero scales
    flat[16:32] = 0.0
    return x

checked, failures = 0, []
def check(name, x, rule, rounding="nearest", noise=None, amax=None, out_dtypes=(torch.float32, torch.bfloat16)):
    global checked
    checked += 1
    ref = nvfp4.quantize(x, rule, rounding, noise=noise, amax=amax)
    got = quantize_triton(x, rule, rounding, noise=noise, amax=amax)
    same = torch.equal(ref.codes, got.codes) and torch.equal(ref.scales.view(torch.uint8), got.scales.view(torch.uint8))
    same = same and torch.equal(ref.amax, got.amax) and got.codes.shape == ref.codes.shape
    for dtype in out_dtypes:
        same = same and torch.equal(bits(dequantize_triton(got, dtype)), bits(nvfp4.dequantize(ref, dtype)))
    if not same:
        failures.append(name)

# (40, 64): 160 blocks, so several programs and a masked tail
for shape, dtype in [((3, 32), torch.float32), ((40, 64), torch.bfloat16), ((2, 3, 48), torch.float32)]:
    x = spread(shape, seed=shape[0]).to(dtype)
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(9)) - 0.5
    for rule in nvfp4.RULES:
        check(f"{shape} {dtype} {rule} nearest", x, rule)
        check(f"{shape} {dtype} {rule} stochastic", x, rule, "stochastic", noise=noise)
check("fp16 output", x, "mse", out_dtypes=(torch.float16,))

x = spread((8, 32), seed=4)
for rule in nvfp4.RULES:
    check(f"amax override {rule}", x, rule, amax=x.abs().max() * 0.3)  # saturated scales, clamped values
    check(f"zeros {rule}", torch.zeros(4, 32), rule)
# ties on the E2M1 grid: amax 12 with static_6 makes the step exactly 2
ties = torch.tensor([[12.0, 0.5, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0, -0.5, -1.5, -2.5, -3.5, -5.0, -7.0, -10.0, -0.0]])
for rule in nvfp4.RULES:
    check(f"ties {rule}", ties, rule)

t = nvfp4.quantize(x, "mse")
window = torch.full((3, 8, 32), float("nan"), dtype=torch.bfloat16)
dequantize_triton(t, torch.bfloat16, out=window[1])
checked += 1
if not (torch.equal(bits(window[1]), bits(nvfp4.dequantize(t, torch.bfloat16))) and window[0].isnan().all()):
    failures.append("out buffer")

# one launch for 3 slots, each with its own amax, written into given buffers == 3 separate calls
slots = spread((3, 8, 32), seed=6) * torch.tensor([1.0, 1e-3, 40.0])[:, None, None]
for rule in ("static_6", "mse"):
    slot_amax = slots.abs().amax(dim=(1, 2))
    codes = torch.empty(3, 8, 16, dtype=torch.uint8)
    scales = torch.empty(3, 8, 2, dtype=torch.float8_e4m3fn)
    quantize_triton(slots, rule, slot_amax=slot_amax, out=nvfp4.NVFP4Tensor(codes, scales, slot_amax, rule))
    checked += 1
    for i in range(3):
        ref = nvfp4.quantize(slots[i], rule, amax=slot_amax[i])
        same_scales = torch.equal(ref.scales.view(torch.uint8), scales[i].view(torch.uint8))
        if not (torch.equal(ref.codes, codes[i]) and same_scales):
            failures.append(f"slot amax {rule} slot {i}")
print(json.dumps({"checked": checked, "failures": failures}))
"""
EXPECTED_CHECKS = 3 * 5 * 2 + 1 + 5 * 3 + 1 + 2


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    full_env.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600
    )


def test_kernels_equal_reference_under_interpreter(tmp_path_factory):
    result = interpreter_result(tmp_path_factory, "nvfp4")
    assert result["failures"] == []
    assert result["checked"] == EXPECTED_CHECKS


def test_module_imports_without_triton_and_errors_clearly():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "import quant.kernels as k\n"
        "from core.errors import UserError\n"
        "assert not k.triton_available()\n"
        "try:\n"
        "    k.quantize_triton(torch.randn(2, 16))\n"
        "except UserError as err:\n"
        "    print(err)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "need the `triton` package" in proc.stdout and len(proc.stdout.strip().splitlines()) == 1


def test_bad_input_is_a_user_error_before_any_kernel():
    import torch

    from core.errors import UserError
    from quant.kernels import quantize_triton

    with pytest.raises(UserError, match="multiple of 16"):
        quantize_triton(torch.randn(2, 24))
    with pytest.raises(UserError, match="choose one of"):
        quantize_triton(torch.randn(2, 16), "nope")
