"""NVFP4: the format and a plain-PyTorch reference quantizer (CPU and GPU, fp32 math).

Format (reference-systems.md §3.1-§3.3): FP4 E2M1 elements, one FP8 E4M3 scale per 16 consecutive
elements along the last dim K (or per 16x16 tile), one fp32 tensor amax. A value decodes as
`((q * s_block) * amax) / (Q * S)`; (Q, S) depend on the scale rule and are not stored.

Every step is written so an independent implementation of the spec gives the same bits:
divisions are real divisions by device tensors (CUDA turns `x / python_scalar` into a reciprocal
multiply), the E4M3 cast is torch's round-to-nearest-even, E2M1 rounding is `torch.round` (ties to
even) on 2|x|, |x| or |x|/2, and block error sums use a fixed adjacent-pairs tree.

Shape legend: K = last (contiguous) dim, a multiple of 16; NB = number of 16-element blocks
(or 256-element tiles); E = elements per block (16 or 256).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from core.config import SCALE_RULES as RULES
from core.errors import UserError

ROUNDINGS = ("nearest", "stochastic")
ADAPTIVE_RULES = ("mse", "mae", "abs_max")  # "four over six": pick the 6- or 4-candidate per block
BLOCK = 16  # elements per scale along K
E4M3_MAX = 448.0
E2M1_MAX = 6.0
FOUR_CANDIDATE_FACTOR = 1.5  # block max -> 4 instead of 6 means a 1.5x larger scale
# Rounding an fp32 y with 0 <= |y| < 2**22 to an integer, ties to even: (y + C) - C.
_RNE_MAGIC = 12582912.0  # 1.5 * 2**23

E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32
)
# Fixed signs of the wgrad "random" Hadamard transform (TransformerEngine's hard-coded vector).
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise UserError(f"unknown NVFP4 scale rule {rule!r} (choose one of {', '.join(RULES)})")
    return rule


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise UserError(f"unknown NVFP4 rounding {rounding!r} (choose one of {', '.join(ROUNDINGS)})")
    return rounding


def rule_limits(rule: str) -> tuple[float, float]:
    """(Q, S): the E2M1 value a block max maps to, and the E4M3 range the scales use."""
    check_rule(rule)
    if rule == "static_6":
        return 6.0, 448.0
    if rule == "static_4":
        return 4.0, 448.0
    return 6.0, 256.0  # adaptive rules: S = 256 keeps the 1.5x candidate (<= 384) inside E4M3


def rule_divisor(rule: str) -> float:
    """Q * S, the dequantisation divisor: 2688 static_6, 1792 static_4, 1536 mse/mae/abs_max."""
    q, s = rule_limits(rule)
    return q * s


@dataclass(frozen=True, eq=False)
class NVFP4Tensor:
    """A tensor in NVFP4 (reference-systems.md §3.1): E2M1 codes two per byte, one E4M3 scale per
    16 elements along the last dim, one fp32 amax for the whole tensor, and the scale `rule`
    whose divisor dequantization needs (the files record it: the tensors cannot).
    Value = code * scale * amax / divisor(rule)."""

    codes: torch.Tensor  # uint8 [..., K/2], low nibble = even element
    scales: torch.Tensor  # float8_e4m3fn [..., K/16], plain row-major (not swizzled)
    amax: torch.Tensor  # fp32 scalar tensor, shape []
    rule: str

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.codes.shape[:-1], self.codes.shape[-1] * 2))

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() + 4

    def to(self, device) -> NVFP4Tensor:
        return NVFP4Tensor(self.codes.to(device), self.scales.to(device), self.amax.to(device), self.rule)


# ---------------------------------------------------------------------------------------------
# E2M1 elements


def e2m1_round(scaled: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round fp32 values onto the signed E2M1 grid, ties to even, clamped to +-6.

    The step is 0.5 below 2, 1 in [2, 4) and 2 from 4 up (the range is chosen by |x| before any
    noise). `noise` (uniform [-0.5, 0.5), shaped like `scaled`) is added in units of the local step:
    stochastic rounding. Negative inputs that round to zero give -0.0 (code 8); -0.0 gives +0.0.
    """
    scaled = scaled.float()
    mag = scaled.abs()
    n = 0.0 if noise is None else noise.float()
    fine = torch.round(2 * mag + n) / 2  # step 0.5
    unit = torch.round(mag + n)  # step 1
    coarse = 2 * torch.round(mag / 2 + n)  # step 2
    rounded = torch.where(mag < 2, fine, torch.where(mag < 4, unit, coarse))
    rounded = torch.where(rounded > 0, rounded, torch.zeros_like(rounded)).clamp(max=E2M1_MAX)
    return torch.where(scaled < 0, -rounded, rounded)


def e2m1_encode(grid_values: torch.Tensor) -> torch.Tensor:
    """Values already on the E2M1 grid -> uint8 codes `sign<<3 | exp<<1 | mant` (signbit of -0.0 kept)."""
    mag = grid_values.abs()
    index = torch.zeros(mag.shape, dtype=torch.uint8, device=mag.device)
    for threshold in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0):  # magnitudes in code order
        index += (mag >= threshold).to(torch.uint8)
    return index | (torch.signbit(grid_values).to(torch.uint8) << 3)


@functools.cache
def decode_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 value of every E2M1 code [16] and of every E4M3 byte [256] on `device`, built once per
    device (table lookups also serve GPU kernels: the e2m1x2 conversion instruction is Blackwell-only)."""
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return E2M1_VALUES.to(device), e4m3.to(device)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return decode_tables(codes.device)[0][codes.long()]


def pack_codes(codes_u8: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> bytes [..., K/2]; the even element goes in the low nibble."""
    pairs = codes_u8.reshape(*codes_u8.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# Quantisation


def _e4m3(s_hp: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even E4M3 cast, saturating at 448. The clamp only matters for an amax override
    below the data's max; it makes the saturation explicit instead of relying on each cast's overflow rule."""
    return s_hp.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def _pair_tree_sum(e_NBE: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a power of two) adding adjacent pairs level by level: a fixed order
    that the Triton kernel and an independent implementation reproduce exactly."""
    while e_NBE.shape[-1] > 1:
        e_NBE = e_NBE[..., 0::2] + e_NBE[..., 1::2]
    return e_NBE[..., 0]


def _block_error(err_NBE: torch.Tensor, rule: str, tile_2d: bool) -> torch.Tensor:
    """Per-block error of one candidate: sum of squares (mse), sum of |err| (mae), max |err| (abs_max)."""
    if rule == "abs_max":
        return err_NBE.abs().amax(dim=-1)
    terms = err_NBE * err_NBE if rule == "mse" else err_NBE.abs()
    if tile_2d:
        # Sum the symmetric E + E^T so a tile and its transpose give the same sum bit for bit
        # (W and W^T must pick the same candidate and so share scales). The result is 2x the sum.
        tile = terms.reshape(-1, BLOCK, BLOCK)
        return _pair_tree_sum(_pair_tree_sum(tile + tile.transpose(1, 2)))
    return _pair_tree_sum(terms)


def _scale_blocks(
    blocks_NBE: torch.Tensor, s_NB: torch.Tensor, amax: torch.Tensor, divisor: torch.Tensor
) -> torch.Tensor:
    """x / (s * amax / (Q*S)), zero where the block scale is zero."""
    s_f = s_NB.float()[:, None]
    step = (s_f * amax) / divisor
    return torch.where(s_f != 0, blocks_NBE / step, torch.zeros_like(blocks_NBE))


def _dequant_blocks(grid_NBE: torch.Tensor, s_NB: torch.Tensor, amax: torch.Tensor, divisor: torch.Tensor):
    return ((grid_NBE * s_NB.float()[:, None]) * amax) / divisor


def _to_blocks(x: torch.Tensor, tile_2d: bool) -> torch.Tensor:
    """[..., M, K] -> [NB, 16] consecutive groups, or [NB, 256] row-major 16x16 tiles."""
    if not tile_2d:
        return x.reshape(-1, BLOCK)
    *lead, m, k = x.shape
    tiles = x.reshape(*lead, m // BLOCK, BLOCK, k // BLOCK, BLOCK).transpose(-3, -2)
    return tiles.reshape(-1, BLOCK * BLOCK)


def _from_blocks(blocks: torch.Tensor, shape: torch.Size, tile_2d: bool) -> torch.Tensor:
    if not tile_2d:
        return blocks.reshape(shape)
    *lead, m, k = shape
    tiles = blocks.reshape(*lead, m // BLOCK, k // BLOCK, BLOCK, BLOCK).transpose(-3, -2)
    return tiles.reshape(shape)


def check_input(x: torch.Tensor, block_2d: bool = False) -> None:
    if not x.is_floating_point():
        raise UserError(f"NVFP4 quantisation needs a float tensor, got {x.dtype} (convert it with .float())")
    if x.ndim == 0 or x.shape[-1] % BLOCK != 0:
        raise UserError(
            f"NVFP4 needs the last dim to be a multiple of {BLOCK}, got shape {tuple(x.shape)} "
            f"(pad the last dim to a multiple of {BLOCK})"
        )
    if block_2d and (x.ndim < 2 or x.shape[-2] % BLOCK != 0):
        raise UserError(
            f"NVFP4 2-D tiles need the last two dims to be multiples of {BLOCK}, got shape {tuple(x.shape)} "
            f"(pad them or use 1-D blocks)"
        )


def resolve_amax(x: torch.Tensor, amax) -> torch.Tensor:
    """The fp32 tensor amax (a 0-dim tensor on x's device): max|x|, or the given override."""
    if amax is None:
        return x.detach().abs().amax().float()
    return torch.as_tensor(amax, dtype=torch.float32).to(x.device).reshape(())


def make_noise(x: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """Stochastic-rounding noise: uniform [-0.5, 0.5) fp32 shaped like x (drawn when not given)."""
    if noise is None:
        return torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device) - 0.5
    if noise.shape != x.shape:
        raise UserError(f"noise shape {tuple(noise.shape)} differs from input {tuple(x.shape)} (pass noise like x)")
    return noise.float().to(x.device)


def quantize(
    x: torch.Tensor,
    rule: str = "static_6",
    rounding: str = "nearest",
    *,
    block_2d: bool = False,
    amax=None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> NVFP4Tensor:
    """Quantise x [..., K] to NVFP4 with the given scale rule (§3.1-§3.2)."""
    check_rule(rule)
    check_rounding(rounding)
    check_input(x, block_2d)
    xf = x.detach().float()
    amax_t = resolve_amax(xf, amax)
    dev = xf.device
    q, s = rule_limits(rule)
    q_t = torch.tensor(q, device=dev)
    qs_t = torch.tensor(q * s, device=dev)

    blocks = _to_blocks(xf, block_2d)
    noise_blocks = None
    if rounding == "stochastic":
        noise_blocks = _to_blocks(make_noise(xf, noise, generator), block_2d)

    bmax = blocks.abs().amax(dim=-1)
    s_hp = (bmax / q_t) * (qs_t / amax_t)
    s_hp = torch.where(amax_t == 0, torch.zeros_like(s_hp), s_hp)  # amax 0: every scale 0 (no host sync)

    scale = _e4m3(s_hp)
    grid = e2m1_round(_scale_blocks(blocks, scale, amax_t, qs_t), noise_blocks)
    if rule in ADAPTIVE_RULES:
        scale_4 = _e4m3(s_hp * FOUR_CANDIDATE_FACTOR)
        grid_4 = e2m1_round(_scale_blocks(blocks, scale_4, amax_t, qs_t), noise_blocks)
        err_6 = _block_error(_dequant_blocks(grid, scale, amax_t, qs_t) - blocks, rule, block_2d)
        err_4 = _block_error(_dequant_blocks(grid_4, scale_4, amax_t, qs_t) - blocks, rule, block_2d)
        pick_4 = err_4 < err_6  # ties keep the 6-candidate
        grid = torch.where(pick_4[:, None], grid_4, grid)
        scale = torch.where(pick_4, scale_4.float(), scale.float()).to(torch.float8_e4m3fn)

    codes = pack_codes(e2m1_encode(_from_blocks(grid, xf.shape, block_2d)))
    *lead, k = xf.shape
    if block_2d:
        m = lead[-1]
        scale = scale.reshape(*lead[:-1], m // BLOCK, 1, k // BLOCK).expand(*lead[:-1], m // BLOCK, BLOCK, k // BLOCK)
    scales = scale.reshape(*lead, k // BLOCK).contiguous()
    return NVFP4Tensor(codes=codes, scales=scales, amax=amax_t, rule=rule)


def dequantize_values(codes: torch.Tensor, scales: torch.Tensor, amax: torch.Tensor, rule: str) -> torch.Tensor:
    """fp32 `((q * s) * amax) / (Q*S)` of packed codes [..., K/2] with scales [..., K/16]; `amax` is the
    scalar tensor amax or any tensor broadcastable to the scales (e.g. one amax per row or slot)."""
    divisor = torch.tensor(rule_divisor(rule), device=codes.device)
    q_blocks = e2m1_decode(unpack_codes(codes)).unflatten(-1, (-1, BLOCK))
    values = ((q_blocks * scales.float()[..., None]) * amax.float()[..., None]) / divisor
    return values.flatten(-2)


def dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """((q * s) * amax) / (Q*S) in fp32, then cast to dtype."""
    return dequantize_values(t.codes, t.scales, t.amax, t.rule).to(dtype)


def fake_quantize(x: torch.Tensor, rule: str = "static_6", rounding: str = "nearest", **kw) -> torch.Tensor:
    return dequantize(quantize(x, rule, rounding, **kw), dtype=x.dtype)


# ---------------------------------------------------------------------------------------------
# Random Hadamard transform


def hadamard_16(device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """diag(signs) @ H16 / 4: orthogonal (entries +-1/4), Sylvester H16[i, j] = (-1)^popcount(i & j)."""
    idx = torch.arange(BLOCK)
    parity = torch.zeros(BLOCK, BLOCK, dtype=torch.int64)
    bits = idx[:, None] & idx[None, :]
    for b in range(4):
        parity ^= (bits >> b) & 1
    h16 = 1.0 - 2.0 * parity.to(torch.float32)
    signs = torch.tensor(RHT_SIGNS, dtype=torch.float32)
    return (signs[:, None] * h16 / 4).to(device=device, dtype=dtype)


def random_hadamard_transform(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Each consecutive group of 16 along `dim` (as a row vector g) becomes g @ hadamard_16(); fp32 math."""
    if x.shape[dim] % BLOCK != 0:
        raise UserError(f"the Hadamard transform needs dim {dim} to be a multiple of {BLOCK}, got {tuple(x.shape)}")
    moved = x.movedim(dim, -1)
    groups = moved.float().reshape(-1, BLOCK) @ hadamard_16(x.device)
    return groups.reshape(moved.shape).movedim(-1, dim).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Scale layout and views


def _padded(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // 128) * 128, -(-cols // 4) * 4


def to_blocked(scales_2d: torch.Tensor) -> torch.Tensor:
    """[R, C] scales -> flat cuBLAS/CUTLASS blocked layout: zero-padded to (R%128, C%4), 128x4 tiles
    row-tile-major, logical (32g + j, c) of a tile at 512*tile + 16j + 4g + c."""
    rows, cols = scales_2d.shape
    pr, pc = _padded(rows, cols)
    raw = scales_2d.view(torch.uint8) if scales_2d.dtype == torch.float8_e4m3fn else scales_2d
    padded = torch.zeros(pr, pc, dtype=raw.dtype, device=raw.device)
    padded[:rows, :cols] = raw
    # [rt, (g, j), ct, c] -> [rt, ct, j, g, c]
    tiles = padded.reshape(pr // 128, 4, 32, pc // 4, 4).permute(0, 3, 2, 1, 4)
    flat = tiles.reshape(-1)
    return flat.view(scales_2d.dtype) if scales_2d.dtype == torch.float8_e4m3fn else flat


def from_blocked(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of to_blocked: the logical [rows, cols] scales."""
    pr, pc = _padded(rows, cols)
    raw = flat.view(torch.uint8) if flat.dtype == torch.float8_e4m3fn else flat
    tiles = raw.reshape(pr // 128, pc // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)  # -> [rt, g, j, ct, c]
    logical = tiles.reshape(pr, pc)[:rows, :cols].contiguous()
    return logical.view(flat.dtype) if flat.dtype == torch.float8_e4m3fn else logical


def as_float4_x2(codes: torch.Tensor) -> torch.Tensor:
    """The packed uint8 codes viewed as torch.float4_e2m1fn_x2 (same bytes, same layout)."""
    return codes.view(torch.float4_e2m1fn_x2)


def from_float4_x2(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)
