"""Attention kernels and the training masks of the causal DiT.

Tensors are `[B, L, N, d]` (tokens before heads, as the projections produce them). Unmasked
attention (streaming chunks against the cache window, cross-attention) goes straight to PyTorch
SDPA, which picks cuDNN / flash on a GPU. The masked full-sequence forms (block-causal,
teacher forcing) are written once as `mask_mod` predicates over token indices: FlexAttention
compiles them to a block-sparse kernel on CUDA, and the same predicate evaluated on an index grid
gives the dense boolean mask used everywhere else.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def sdpa(q_BLND: Tensor, k_BLND: Tensor, v_BLND: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax(q k^T / sqrt(d)) v over `[B, L, N, d]` tensors; returns `[B, Lq, N, d]`."""
    out = F.scaled_dot_product_attention(q_BLND.transpose(1, 2), k_BLND.transpose(1, 2),
                                         v_BLND.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


@contextlib.contextmanager
def sdpa_backend(name: str = "auto"):
    """Run SDPA with one kernel family ("cudnn", "flash", "efficient", "math"), or PyTorch's own
    choice ("auto"). On a GPU "auto" prefers cuDNN, then flash (measured fastest at the 5B shapes,
    docs/BENCHMARKS.md)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name in ("auto", "fp8"):  # fp8 is the KV window's own kernel; every other SDPA call: auto
        if not torch.cuda.is_available():
            yield
            return
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(order, set_priority=True):
            yield
        return
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} "
                         f"(allowed: auto, {', '.join(_BACKENDS)})")
    with sdpa_kernel([getattr(SDPBackend, _BACKENDS[name])]):
        yield


# ----------------------------------------------------------------------------------------------
# Training masks. Padding never matters: every token of these layouts is real.


@dataclass(frozen=True)
class BlockCausalMask:
    """Token q may see every token before the end of its own block of `frames_per_block` frames."""

    num_frames: int
    tokens_per_frame: int
    frames_per_block: int

    @property
    def length(self) -> int:
        return self.num_frames * self.tokens_per_frame

    def mask_mod(self, b, h, q_idx, kv_idx):
        block = self.frames_per_block * self.tokens_per_frame
        return kv_idx < (q_idx // block + 1) * block


@dataclass(frozen=True)
class TeacherForcingMask:
    """`[clean frames | noisy frames]`, each `num_frames` long. A clean query sees clean keys of
    its own and earlier blocks; a noisy query of block b sees clean keys of blocks < b and the
    noisy keys of block b only."""

    num_frames: int
    tokens_per_frame: int
    frames_per_block: int

    @property
    def length(self) -> int:
        return 2 * self.num_frames * self.tokens_per_frame

    def mask_mod(self, b, h, q_idx, kv_idx):
        half = self.num_frames * self.tokens_per_frame
        block = self.frames_per_block * self.tokens_per_frame
        q_noisy = q_idx >= half
        k_noisy = kv_idx >= half
        q_block = torch.where(q_noisy, q_idx - half, q_idx) // block
        k_block = torch.where(k_noisy, kv_idx - half, kv_idx) // block
        clean_to_clean = ~q_noisy & ~k_noisy & (k_block <= q_block)
        noisy_to_clean = q_noisy & ~k_noisy & (k_block < q_block)
        noisy_to_noisy = q_noisy & k_noisy & (k_block == q_block)
        return clean_to_clean | noisy_to_clean | noisy_to_noisy


AttentionMask = BlockCausalMask | TeacherForcingMask


def dense_mask(mask: AttentionMask, device: torch.device | str = "cpu") -> Tensor:
    """The boolean `[L, L]` matrix of a mask (True = may attend)."""
    idx = torch.arange(mask.length, device=device)
    return mask.mask_mod(None, None, idx[:, None], idx[None, :])


@functools.lru_cache(maxsize=8)
def _cached_dense_mask(mask: AttentionMask, device: str) -> Tensor:
    return dense_mask(mask, device)  # built once per layout, not once per layer call


@functools.lru_cache(maxsize=8)
def _flex_block_mask(mask: AttentionMask, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):  # create_block_mask wants a plain function
        return mask.mask_mod(b, h, q_idx, kv_idx)

    # Compiled construction never materialises the dense [L, L] mask (26.6 GiB at 96 frames of 720p
    # teacher forcing under SP); the eager one does.
    return create_block_mask(mask_mod, None, None, mask.length, mask.length, device=device,
                             _compile=device.startswith("cuda"))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def masked_attention(q_BLND: Tensor, k_BLND: Tensor, v_BLND: Tensor, mask: AttentionMask,
                     use_flex: bool | None = None) -> Tensor:
    """Attention under a training mask: compiled FlexAttention on CUDA, dense SDPA elsewhere."""
    if q_BLND.shape[1] != mask.length:
        raise ValueError(f"sequence of {q_BLND.shape[1]} tokens does not match the mask "
                         f"({mask.length} tokens)")
    if use_flex is None:
        use_flex = q_BLND.is_cuda
    if not use_flex:
        return sdpa(q_BLND, k_BLND, v_BLND, _cached_dense_mask(mask, str(q_BLND.device)))
    block_mask = _flex_block_mask(mask, str(q_BLND.device))
    out = _compiled_flex()(q_BLND.transpose(1, 2), k_BLND.transpose(1, 2), v_BLND.transpose(1, 2),
                           block_mask=block_mask)
    return out.transpose(1, 2)
