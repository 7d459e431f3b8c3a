"""The Triton FP8 row quantizer, run by Triton's CPU interpreter in a subprocess (TRITON_INTERPRET=1
must be set before triton is imported), gives quantize_rows_reference's codes and scales bit for bit."""

import json

import pytest

from tests.test_nvfp4_kernels import run_python

INTERPRETER_CHECKS = r"""
import json
import torch
from quant.fp8 import AMAX_FLOOR, quantize_rows_reference
from quant.fp8_kernels import quantize_rows_triton
from tests.test_fp8 import spread_rows

checked, failures = 0, []
def check(name, x):
    global checked
    checked += 1
    ref_codes, ref_scales = quantize_rows_reference(x)
    codes, scales = quantize_rows_triton(x, AMAX_FLOOR)
    same = codes.shape == ref_codes.shape and torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    if not (same and torch.equal(scales, ref_scales)):
        failures.append(name)

# widths: a power of two, a masked tail, the tiny model's 128
for width in (48, 200, 128):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check(f"{width} {dtype}", spread_rows((7, width), seed=width, dtype=dtype))
check("3-d input", spread_rows((6, 64), seed=1, dtype=torch.bfloat16).reshape(2, 3, 64))
check("strided rows", spread_rows((6, 128), seed=2, dtype=torch.float32)[:, :64])
check("all zeros", torch.zeros(3, 32))
check("no rows", torch.zeros(0, 32))
print(json.dumps({"checked": checked, "failures": failures}))
"""
EXPECTED_CHECKS = 3 * 3 + 4


def test_triton_quantizer_equals_reference_under_interpreter():
    pytest.importorskip("triton")
    proc = run_python(INTERPRETER_CHECKS, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == []
    assert result["checked"] == EXPECTED_CHECKS


def test_quantizer_module_imports_without_triton_and_errors_clearly():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from quant.fp8_kernels import quantize_rows_triton\n"
        "from core.errors import UserError\n"
        "try:\n"
        "    quantize_rows_triton(torch.randn(2, 16), 2.0**-40)\n"
        "except UserError as err:\n"
        "    print(err)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "needs the `triton` package" in proc.stdout and len(proc.stdout.strip().splitlines()) == 1
