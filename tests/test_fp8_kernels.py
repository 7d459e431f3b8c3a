"""The Triton FP8 row quantizer, run by Triton's CPU interpreter in a subprocess (TRITON_INTERPRET=1
must be set before triton is imported), gives quantize_rows_reference's codes and scales bit for bit."""



from tests.test_nvfp4_kernels import run_python
from tests.triton_interpreter import interpreter_result

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


def test_triton_quantizer_equals_reference_under_interpreter(tmp_path_factory):
    result = interpreter_result(tmp_path_factory, "fp8_rows")
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


RESCALE_CHECKS = r"""
import json
import torch
from quant.fp8_kernels import rescale_heads_triton
from quant.fp8_kv import FLOOR_SCALE, rescale_stored, write_step

FP8 = torch.float8_e4m3fn
checked, failures = 0, []
def same(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))

# every finite E4M3 byte (both signs, subnormals, zeros) in every head, D not a power of two, a
# ragged last token block; ratios: 1 (untouched), one binade, into the subnormals, all to zero
finite = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
for D, ratios in ((48, [1.0, 0.5, 2.0**-4]), (128, [2.0**-12, 1.0, 2.0**-1])):
    B, N = 2, len(ratios)
    K = -(-finite.numel() // D) + 5  # room for every byte in one head, plus a ragged token block
    generator = torch.Generator().manual_seed(D)
    order = torch.randint(0, finite.numel(), (B, K, N, D), generator=generator)
    first_head = order[0, :, 0].reshape(-1)  # a copy
    first_head[:finite.numel()] = torch.arange(finite.numel())
    order[0, :, 0] = first_head.view(K, D)
    order[1, :, 2] = order[0, :, 0]  # every byte in a head of each ratio list
    codes = finite[order].view(FP8)
    ratio = torch.tensor(ratios, dtype=torch.float32).repeat(B, 1)
    ratio[1] = ratio[1].flip(0)
    expected, got = codes.clone(), codes.clone()
    rescale_stored(expected, ratio)
    rescale_heads_triton(got, ratio)
    checked += 1
    if not same(got, expected):
        failures.append(f"rescale D={D}")

# whole writes: the running scales grow in some heads and not others
generator = torch.Generator().manual_seed(7)
codes = torch.zeros(1, 64, 3, 32, dtype=FP8)
scale = torch.full((1, 3), FLOOR_SCALE)
ref_codes, ref_scale = codes.clone(), scale.clone()
for i, gains in enumerate([(1.0, 1.0, 1.0), (4.0, 0.5, 1.0), (0.25, 64.0, 1.0), (1.0, 1.0, 1e-3)]):
    x = (torch.randn(1, 16, 3, 32, generator=generator) * torch.tensor(gains)[:, None]).to(torch.bfloat16)
    write_step(codes, scale, x, 16 * i, rescale=rescale_heads_triton)
    write_step(ref_codes, ref_scale, x, 16 * i)
    checked += 1
    if not (same(codes, ref_codes) and torch.equal(scale, ref_scale)):
        failures.append(f"write {i}")
print(json.dumps({"checked": checked, "failures": failures}))
"""


def test_triton_rescale_of_grown_heads_equals_reference_under_interpreter(tmp_path_factory):
    result = interpreter_result(tmp_path_factory, "fp8_rescale")
    assert result["failures"] == []
    assert result["checked"] == 2 + 4
