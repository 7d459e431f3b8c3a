"""NVFP4 reference quantizer: hand-derived bit-exact tables, layouts, and an independent numpy
implementation of reference-systems.md §3.1-§3.2 that must agree bit for bit."""

import numpy as np
import pytest
import torch

from core.errors import UserError
from quant import nvfp4

F8 = torch.float8_e4m3fn


def scale_bytes(t: nvfp4.NVFP4Tensor) -> list[int]:
    return t.scales.view(torch.uint8).flatten().tolist()


def codes_of(t: nvfp4.NVFP4Tensor) -> list[int]:
    return nvfp4.unpack_codes(t.codes).flatten().tolist()


def e4m3_byte(value: float) -> int:
    return torch.tensor([value]).to(F8).view(torch.uint8).item()


# ------------------------------------------------------------------------------------------------
# E2M1 elements

# code -> value, written out from sign<<3 | exp<<1 | mant: exp 0 is subnormal (mant * 0.5),
# otherwise 2**(exp-1) * (1 + mant/2).
E2M1_TABLE = {
    0b0000: 0.0, 0b0001: 0.5, 0b0010: 1.0, 0b0011: 1.5, 0b0100: 2.0, 0b0101: 3.0, 0b0110: 4.0, 0b0111: 6.0,
    0b1000: -0.0, 0b1001: -0.5, 0b1010: -1.0, 0b1011: -1.5, 0b1100: -2.0, 0b1101: -3.0, 0b1110: -4.0, 0b1111: -6.0,
}  # fmt: skip


def test_every_e2m1_code_decodes_and_encodes():
    codes = torch.arange(16, dtype=torch.uint8)
    decoded = nvfp4.e2m1_decode(codes)
    for code, value in E2M1_TABLE.items():
        assert decoded[code].item() == value
        assert torch.signbit(decoded[code]).item() == (code >= 8)  # code 8 is -0.0
    assert nvfp4.e2m1_encode(decoded).tolist() == list(range(16))
    assert torch.equal(nvfp4.E2M1_VALUES, decoded)


# scaled value -> grid value: ties to the even code, step 0.5 / 1 / 2, clamp at 6
ROUNDING_TABLE = [
    (0.0, 0.0), (0.1, 0.0), (0.25, 0.0), (0.26, 0.5), (0.5, 0.5), (0.74, 0.5), (0.75, 1.0), (1.0, 1.0),
    (1.25, 1.0), (1.26, 1.5), (1.5, 1.5), (1.75, 2.0), (1.99, 2.0), (2.0, 2.0), (2.49, 2.0), (2.5, 2.0),
    (2.51, 3.0), (3.0, 3.0), (3.49, 3.0), (3.5, 4.0), (3.99, 4.0), (4.0, 4.0), (4.99, 4.0), (5.0, 4.0),
    (5.01, 6.0), (5.5, 6.0), (6.0, 6.0), (6.9, 6.0), (7.0, 6.0), (1e6, 6.0), (float("inf"), 6.0),
]  # fmt: skip


@pytest.mark.parametrize("scaled, expected", ROUNDING_TABLE)
def test_e2m1_round_to_nearest_even(scaled, expected):
    for sign in (1.0, -1.0):
        got = nvfp4.e2m1_round(torch.tensor([sign * scaled]))
        assert got.item() == sign * expected


def test_e2m1_round_signed_zeros():
    got = nvfp4.e2m1_round(torch.tensor([-0.0, -0.1, -0.25, 0.1]))
    assert nvfp4.e2m1_encode(got).tolist() == [0, 8, 8, 0]  # -0.0 in -> +0; small negative -> -0 (code 8)


def test_pack_low_nibble_is_even_element():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = nvfp4.pack_codes(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(nvfp4.unpack_codes(packed), codes)


# ------------------------------------------------------------------------------------------------
# E4M3 block scales: amax = 2688 makes (Q*S)/amax == 1 for static_6, so s_hp = bmax / 6 exactly
# for bmax = 6 * v with v of few bits. E4M3 has 3 mantissa bits; subnormals are multiples of 2**-9.
SCALE_TABLE = [
    (1.0, 1.0),  # exact
    (1.0625, 1.0),  # midway 1.0 / 1.125 -> even mantissa 000
    (1.1875, 1.25),  # midway 1.125 / 1.25 -> even mantissa 010
    (1.07, 1.125),  # rounds up
    (1.05, 1.0),  # rounds down
    (300.0, 288.0),  # step 32 between 256 and 512
    (304.0, 320.0),  # midway 288 / 320 -> 320 (mantissa 010)
    (448.0, 448.0),  # the E4M3 maximum
    (2.0**-9, 2.0**-9),  # smallest subnormal
    (2.0**-10, 0.0),  # midway 0 / 2**-9 -> 0: the block's scale and codes are all zero
    (0.0011, 2.0**-9),
    (3 * 2.0**-10, 2 * 2.0**-9),  # midway 1 / 2 subnormal steps -> 2
    (0.003, 2 * 2.0**-9),
    (15 * 2.0**-10, 8 * 2.0**-9),  # midway 7 / 8 subnormal steps -> 8 = 2**-6, the smallest normal
]


@pytest.mark.parametrize("s_hp, expected", SCALE_TABLE)
def test_e4m3_block_scale_rounding(s_hp, expected):
    x = torch.zeros(2, 16)
    x[0, 0] = 2688.0  # fixes amax
    x[1, 3] = 6.0 * s_hp
    t = nvfp4.quantize(x, "static_6")
    assert t.amax.item() == 2688.0
    assert t.scales[0, 0].float().item() == 448.0
    assert t.scales[1, 0].float().item() == expected
    if expected == 0.0:
        assert codes_of(t)[16:] == [0] * 16
    else:
        # the element is 6 * s_hp / s_block on the grid: 6 if the scale rounded down or stayed, less if up
        expected_grid = nvfp4.e2m1_round(torch.tensor([6.0 * s_hp / expected])).item()
        assert nvfp4.e2m1_decode(torch.tensor(codes_of(t)[19])).item() == expected_grid


def test_zero_tensor_and_zero_blocks():
    for rule in nvfp4.RULES:
        t = nvfp4.quantize(torch.zeros(3, 32), rule)
        assert t.amax.item() == 0.0 and scale_bytes(t) == [0] * 6 and t.codes.eq(0).all()
        assert nvfp4.dequantize(t).eq(0).all()
        x = torch.randn(4, 48)
        x[1, 16:32] = 0.0
        t = nvfp4.quantize(x, rule)
        assert t.scales[1, 1].float().item() == 0.0 and nvfp4.unpack_codes(t.codes)[1, 16:32].eq(0).all()


def test_rule_divisors_and_limits():
    assert [nvfp4.rule_divisor(r) for r in nvfp4.RULES] == [2688.0, 1792.0, 1536.0, 1536.0, 1536.0]
    assert nvfp4.rule_limits("static_4") == (4.0, 448.0)
    # code 7 (6.0) with scale 1 and amax 2688 decodes to 6 * 2688 / (Q*S)
    for rule, expected in [("static_6", 6.0), ("static_4", 9.0), ("mse", 10.5), ("mae", 10.5), ("abs_max", 10.5)]:
        t = nvfp4.NVFP4Tensor(
            codes=torch.full((1, 8), 0x77, dtype=torch.uint8),
            scales=torch.ones(1, 1).to(F8),
            amax=torch.tensor(2688.0),
            rule=rule,
        )
        assert nvfp4.dequantize(t).eq(expected).all()


def test_hand_worked_static_6_block():
    # amax 12: s_hp = (12/6) * (2688/12) = 448, step = 448 * 12 / 2688 = 2, scaled = x / 2.
    scaled = [6, -3, 1.5, 0.75, 0.25, 1.25, 1.75, 2.5, 3.5, 5, 5.5, -0.1, 0, 4.4, -2.6, 0.6]
    x = torch.tensor([[2.0 * v for v in scaled]])
    t = nvfp4.quantize(x, "static_6")
    # grid:  6, -3, 1.5, 1, 0, 1, 2, 2, 4, 4, 6, -0, 0, 4, -3, 0.5
    assert codes_of(t) == [7, 13, 3, 2, 0, 2, 4, 4, 6, 6, 7, 8, 0, 6, 13, 1]
    assert scale_bytes(t) == [0x7E]  # 448 = 1.75 * 2**8: exponent 8 + 7 = 15, mantissa 110
    expected = [12, -6, 3, 2, 0, 2, 4, 4, 8, 8, 12, -0.0, 0, 8, -6, 1]
    assert nvfp4.dequantize(t)[0].tolist() == expected


def test_hand_worked_mse_blocks():
    # amax 6, Q*S = 1536: candidate 6 has s = (6/6) * (1536/6) = 256 and step 1 (scaled = x); candidate 4
    # has s = 384 and step 384 * 6 / 1536 = 1.5 (scaled = x / 1.5, dequantised grid * 1.5).
    block_a = [6, 4.5, 4.5, 4.5, 4.5, 4.5, 4.5, 4.5, 1.5, 0.75, 3, -3, -4.5, 0, 0.3, 2.25]
    # candidate 6 errors: 4.5->4 (x7, and -4.5), 0.75->1, 0.3->0.5, 2.25->2: sum of squares 2.43
    # candidate 4 errors: only 0.3 -> 0.2 -> 0 (0.09): candidate 4 wins
    block_b = [6.0] * 16  # both exact: a tie keeps candidate 6
    block_c = [6.0] + [1.0] * 15  # candidate 6 exact, candidate 4: 1 -> 0.667 -> 0.5 -> 0.75: 6 wins
    t = nvfp4.quantize(torch.tensor([block_a + block_b + block_c]), "mse")
    assert scale_bytes(t) == [0x7C, 0x78, 0x78]  # 384 = 1.5 * 2**8 (mantissa 100); 256 (mantissa 000)
    grid_a = [4, 3, 3, 3, 3, 3, 3, 3, 1, 0.5, 2, -2, -3, 0, 0, 1.5]
    assert codes_of(t)[:16] == [6, 5, 5, 5, 5, 5, 5, 5, 2, 1, 4, 12, 13, 0, 0, 3]
    assert codes_of(t)[16:] == [7] * 16 + [7] + [2] * 15
    deq = nvfp4.dequantize(t)[0].tolist()
    assert deq[:16] == [1.5 * g for g in grid_a]
    assert deq[16:] == block_b + block_c


def test_static_4_maps_block_max_to_4():
    x = torch.tensor([[8.0, 6.0, 2.0, 1.0] + [0.0] * 12])  # amax 8: s = (8/4) * (1792/8) = 448, step 2
    t = nvfp4.quantize(x, "static_4")
    assert codes_of(t)[:4] == [6, 5, 2, 1]  # 4, 3, 1, 0.5
    assert nvfp4.dequantize(t)[0, :4].tolist() == [8.0, 6.0, 2.0, 1.0]


def test_errors_are_one_line_user_errors():
    with pytest.raises(UserError, match=r"multiple of 16, got shape \(4, 20\)"):
        nvfp4.quantize(torch.randn(4, 20))
    with pytest.raises(UserError, match="static_6, static_4, mse, mae, abs_max"):
        nvfp4.quantize(torch.randn(4, 16), "minmax")
    with pytest.raises(UserError, match="2-D tiles"):
        nvfp4.quantize(torch.randn(8, 16), block_2d=True)
    with pytest.raises(UserError, match="rounding"):
        nvfp4.quantize(torch.randn(4, 16), rounding="up")
    with pytest.raises(UserError, match="float"):
        nvfp4.quantize(torch.ones(4, 16, dtype=torch.int32))


def test_tensor_fields_shape_and_views():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    t = nvfp4.quantize(x, "mse", amax=10.0)
    assert t.codes.dtype == torch.uint8 and t.codes.shape == (2, 3, 32)
    assert t.scales.dtype == F8 and t.scales.shape == (2, 3, 4)
    assert t.amax.shape == () and t.amax.item() == 10.0 and t.shape == x.shape
    assert t.nbytes == 2 * 3 * 32 + 2 * 3 * 4 + 4
    assert nvfp4.fake_quantize(x, "mse").dtype == torch.bfloat16
    f4 = nvfp4.as_float4_x2(t.codes)
    assert f4.dtype == torch.float4_e2m1fn_x2 and f4.shape == t.codes.shape
    assert torch.equal(nvfp4.from_float4_x2(f4), t.codes)


# ------------------------------------------------------------------------------------------------
# Blocked scale layout


def blocked_by_loop(scales: torch.Tensor) -> torch.Tensor:
    rows, cols = scales.shape
    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    flat = torch.zeros(padded_rows * padded_cols, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * (padded_cols // 4) + c // 4
            g, j = (r % 128) // 32, r % 32
            flat[512 * tile + 16 * j + 4 * g + c % 4] = scales[r, c]
    return flat


@pytest.mark.parametrize("rows, cols", [(128, 4), (130, 5), (3, 1), (256, 12)])
def test_blocked_layout_matches_formula(rows, cols):
    scales = torch.randint(1, 255, (rows, cols), dtype=torch.uint8)
    scales[scales == 0x7F] = 1  # keep clear of the NaN byte
    blocked = nvfp4.to_blocked(scales.view(F8))
    assert blocked.dtype == F8
    assert torch.equal(blocked.view(torch.uint8), blocked_by_loop(scales))
    assert torch.equal(nvfp4.from_blocked(blocked, rows, cols).view(torch.uint8), scales)


# ------------------------------------------------------------------------------------------------
# Random Hadamard transform


def test_hadamard_matrix():
    h = torch.ones(1, 1)
    for _ in range(4):  # Sylvester: [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.tensor([1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1], dtype=torch.float32)
    m = nvfp4.hadamard_16()
    assert torch.equal(m, signs[:, None] * h / 4)
    assert torch.equal(m @ m.T, torch.eye(16)) and torch.equal(m.T @ m, torch.eye(16))


def test_hadamard_cancels_in_products():
    a, b = torch.randn(8, 64), torch.randn(6, 64)
    product = a @ b.T
    rotated = nvfp4.random_hadamard_transform(a) @ nvfp4.random_hadamard_transform(b).T
    torch.testing.assert_close(rotated, product, rtol=1e-5, atol=1e-5)
    # along the token dim (dim 0): dY^T X for dY [T, N], X [T, K]
    dy, x = torch.randn(32, 5), torch.randn(32, 7)
    rotated = nvfp4.random_hadamard_transform(dy, dim=0).T @ nvfp4.random_hadamard_transform(x, dim=0)
    torch.testing.assert_close(rotated, dy.T @ x, rtol=1e-5, atol=1e-5)
    assert torch.equal(nvfp4.random_hadamard_transform(x, dim=0), nvfp4.random_hadamard_transform(x.T).T)
    assert not torch.allclose(nvfp4.random_hadamard_transform(x, dim=0), x)


# ------------------------------------------------------------------------------------------------
# Stochastic rounding


def test_stochastic_rounding_unbiased_and_bounded():
    values = torch.linspace(0, 6, 97)
    draws = 4000
    noise = torch.rand(draws, 97, generator=torch.Generator().manual_seed(0)) - 0.5
    rounded = nvfp4.e2m1_round(values.expand(draws, 97), noise)
    assert rounded.abs().max() <= 6.0 and torch.isin(rounded, nvfp4.E2M1_VALUES).all()
    # per draw the error is at most one step (2 at the top), so 5 sigma over 4000 draws is < 0.08
    assert (rounded.mean(0) - values).abs().max() < 0.08
    assert (nvfp4.e2m1_round(-values.expand(draws, 97), noise).mean(0) + values).abs().max() < 0.08


def test_stochastic_quantize_unbiased_with_generator():
    # amax 6 with static_6: s = 448 and step 1, so dequantised values are the grid values themselves
    x = torch.linspace(-6, 6, 64).reshape(1, 64)
    gen = torch.Generator().manual_seed(1)
    samples = nvfp4.fake_quantize(x.expand(2000, 64), "static_6", "stochastic", generator=gen)  # 2000 draws
    assert samples.abs().max() <= 6.0
    assert (samples.mean(0) - x).abs().max() < 0.12
    again = nvfp4.quantize(x, "mse", "stochastic", generator=torch.Generator().manual_seed(3))
    same = nvfp4.quantize(x, "mse", "stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.codes, same.codes)
    noise = torch.zeros_like(x)  # zero noise is round-to-nearest
    assert torch.equal(nvfp4.quantize(x, "mse", "stochastic", noise=noise).codes, nvfp4.quantize(x, "mse").codes)


# ------------------------------------------------------------------------------------------------
# 2-D tiles


@pytest.mark.parametrize("rule", nvfp4.RULES)
def test_2d_tiles_shared_between_w_and_wt(rule):
    w = torch.randn(64, 48) * torch.exp(torch.randn(64, 1))
    w[5, 7] = 40.0
    t, tt = nvfp4.quantize(w, rule, block_2d=True), nvfp4.quantize(w.T.contiguous(), rule, block_2d=True)
    tiles = t.scales.view(torch.uint8).reshape(4, 16, 3)
    tiles_t = tt.scales.view(torch.uint8).reshape(3, 16, 4)
    assert (tiles == tiles[:, :1]).all() and (tiles_t == tiles_t[:, :1]).all()  # one scale per tile
    assert torch.equal(tiles[:, 0], tiles_t[:, 0].T)
    assert torch.equal(nvfp4.unpack_codes(t.codes), nvfp4.unpack_codes(tt.codes).T)
    if rule == "static_6":  # scale from the tile max
        tile_max = w.abs().reshape(4, 16, 3, 16).amax(dim=(1, 3))
        expected = ((tile_max / 6) * (2688 / w.abs().max())).to(F8)
        assert torch.equal(tiles[:, 0], expected.view(torch.uint8))


def test_2d_tiles_batched_last_two_dims():
    w = torch.randn(2, 32, 32)
    t = nvfp4.quantize(w, "mse", block_2d=True)
    assert t.scales.shape == (2, 32, 2)
    one = nvfp4.quantize(w[1], "mse", block_2d=True, amax=t.amax)
    assert torch.equal(t.codes[1], one.codes) and torch.equal(
        t.scales[1].view(torch.uint8), one.scales.view(torch.uint8)
    )


# ------------------------------------------------------------------------------------------------
# An independent implementation of §3.1-§3.2 in numpy float32: E4M3 and E2M1 by nearest-value search
# over explicit tables with an explicit ties-to-even rule, block errors with the same adjacent-pairs
# summation order. Nearest rounding, 1-D blocks.

E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # index = code & 7
E4M3_VALUES = np.array(
    [m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7) for e in range(16) for m in range(8)][:127]
)  # index = byte; byte 0x7F is NaN and left out


def nearest_index(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest table entry; on a tie the even index (= even mantissa / even code)."""
    dist = np.abs(values.astype(np.float64)[..., None] - table)  # exact: both sides have few bits
    best = dist.min(axis=-1, keepdims=True)
    candidates = dist == best
    is_even = (np.arange(len(table)) % 2 == 0)[None]
    tie = candidates.sum(axis=-1) > 1
    return np.where(tie, np.argmax(candidates & is_even, axis=-1), np.argmax(candidates, axis=-1))


def pairwise_sum(e: np.ndarray) -> np.ndarray:
    while e.shape[-1] > 1:
        e = (e[..., 0::2] + e[..., 1::2]).astype(np.float32)
    return e[..., 0]


def independent_quantize(x: np.ndarray, rule: str, amax: np.float32):
    q, s = {"static_6": (6, 448), "static_4": (4, 448)}.get(rule, (6, 256))
    f32 = np.float32
    qs = f32(q * s)
    blocks = x.reshape(-1, 16).astype(np.float32)

    def candidate(s_hp):
        byte = nearest_index(np.minimum(s_hp, f32(448.0)), E4M3_VALUES)
        scale = E4M3_VALUES[byte].astype(np.float32)
        step = (scale * amax / qs).astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(scale[:, None] != 0, blocks / step, f32(0)).astype(np.float32)
        code = nearest_index(np.abs(scaled), E2M1_MAGNITUDES) | np.where(scaled < 0, 8, 0)
        grid = np.where(code >= 8, -1, 1) * E2M1_MAGNITUDES[code & 7]
        deq = ((grid.astype(np.float32) * scale[:, None]) * amax / qs).astype(np.float32)
        return byte, code, deq

    bmax = np.abs(blocks).max(axis=1)
    s_hp = (bmax / f32(q)) * (qs / amax) if amax != 0 else np.zeros_like(bmax)
    byte, code, deq = candidate(s_hp.astype(np.float32))
    if rule in ("mse", "mae", "abs_max"):
        byte4, code4, deq4 = candidate((s_hp * f32(1.5)).astype(np.float32))

        def error(d):
            err = (d - blocks).astype(np.float32)
            if rule == "abs_max":
                return np.abs(err).max(axis=1)
            return pairwise_sum((err * err).astype(np.float32) if rule == "mse" else np.abs(err))

        pick4 = error(deq4) < error(deq)
        byte, code, deq = (np.where(pick4[:, None] if a.ndim == 2 else pick4, b, a) for a, b in [
            (byte, byte4), (code, code4), (deq, deq4)])  # fmt: skip
    return byte, code, deq


def test_independent_implementation_tables():
    assert E4M3_VALUES[-1] == 448.0 and len(E4M3_VALUES) == 127
    assert torch.equal(
        torch.tensor(E4M3_VALUES, dtype=torch.float32).to(F8).view(torch.uint8), torch.arange(127).byte()
    )


def spread_input(shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    flat[::37] *= 60.0  # outliers
    flat[: flat.numel() // 4] *= 1e-4  # quiet blocks: small and subnormal E4M3 scales
    return x


@pytest.mark.parametrize("rule", nvfp4.RULES)
@pytest.mark.parametrize("shape", [(3, 32), (2, 5, 64), (128, 256)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_matches_independent_implementation(rule, shape, scale):
    x = spread_input(shape, scale, seed=len(shape) * 7 + int(np.log10(scale)) + 3)
    t = nvfp4.quantize(x, rule)
    byte, code, deq = independent_quantize(x.numpy(), rule, np.float32(t.amax.item()))
    assert t.amax.item() == np.float32(np.abs(x.numpy()).max())
    assert scale_bytes(t) == byte.reshape(-1).tolist()
    assert codes_of(t) == code.reshape(-1).tolist()
    assert np.array_equal(nvfp4.dequantize(t).numpy().reshape(-1).view(np.int32), deq.reshape(-1).view(np.int32))


def test_matches_independent_implementation_with_amax_override():
    x = spread_input((16, 64), 1.0, seed=11)
    for rule in nvfp4.RULES:
        t = nvfp4.quantize(x, rule, amax=x.abs().max() * 0.3)  # scales saturate at 448, values clamp at 6
        byte, code, _ = independent_quantize(x.numpy(), rule, np.float32(t.amax.item()))
        assert scale_bytes(t) == byte.reshape(-1).tolist() and codes_of(t) == code.reshape(-1).tolist()


# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule", nvfp4.RULES)
def test_cpu_and_cuda_identical(rule):
    x = spread_input((64, 128), 1.0, seed=5)
    noise = torch.rand(x.shape) - 0.5
    for rounding in nvfp4.ROUNDINGS:
        cpu = nvfp4.quantize(x, rule, rounding, noise=noise)
        gpu = nvfp4.quantize(x.cuda(), rule, rounding, noise=noise.cuda()).to("cpu")
        assert torch.equal(cpu.codes, gpu.codes) and torch.equal(
            cpu.scales.view(torch.uint8), gpu.scales.view(torch.uint8)
        )
