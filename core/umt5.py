"""The umt5 encoder of Wan2.2 / LongLive 2.0 in plain PyTorch, under the official parameter names.

reference-systems.md §2.1, per block (N prompts, L text slots, H heads, D width):

    x = x + o(softmax(q(norm1 x) k(norm1 x)^T + bias_i + pad) v(norm1 x))   no 1/sqrt(d) (T5)
    x = x + fc2(fc1(norm2 x) * gelu_tanh(gate(norm2 x)))
    out = norm(x)

`bias_i` is block i's own relative-position table (umt5 does not share it across blocks), `pad`
the dtype minimum on padding keys. Norms compute their variance in fp32 and softmax runs in fp32,
as the official code does, so bf16 weights give the official bf16 numbers; in fp32 the output is
the transformers `UMT5EncoderModel` (eager) bit for bit (tests/test_umt5.py). Written here rather
than imported: transformers' model import alone costs ~4 s of every start-up.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from core.text import TextEncoderConfig


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets of `relative` = key position - query position: half the buckets
    per direction (the later keys in the upper half), the first quarter exact, the rest
    log-spaced up to `max_distance`."""
    half = num_buckets // 2
    exact = half // 2
    forward = (relative > 0).long() * half
    distance = relative.abs()
    log_spaced = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    return forward + torch.where(distance < exact, distance, log_spaced.clamp(max=half - 1))


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation, written out: the official formula (F.gelu's kernel rounds differently)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Embedding(nn.Module):
    """A lookup table without `nn.Embedding`'s random init: the weights always come from a file or
    a seeded state dict, and that init on `meta` imports torch._dynamo (~1.5 s of start-up)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))

    def forward(self, index: Tensor) -> Tensor:
        return F.embedding(index, self.weight)


class RMSNorm(nn.Module):
    """T5 norm: scale only, no mean; the variance in fp32, the result back in a half weight's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class RelativePositionBias(nn.Module):
    """One block's table: bucket -> per-head additive attention bias."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = Embedding(num_buckets, num_heads)

    def forward(self, buckets: Tensor) -> Tensor:
        """`buckets` `[L, L]` (query, key) -> `[1, H, L, L]`."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=False)
        self.k = nn.Linear(dim, inner, bias=False)
        self.v = nn.Linear(dim, inner, bias=False)
        self.o = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """`x` `[N, L, D]`; `bias` `[N or 1, H, L, L]` added to the scores (position + padding)."""
        n, length, _ = x.shape
        q, k, v = (proj(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(2, 3)) + bias
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(n, length, -1)
        return self.o(out)


class GELUTanh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return gelu_tanh(x)


class GatedFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, hidden, bias=False), GELUTanh())  # `gate.0.weight`
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _clamp_fp16(x: Tensor) -> Tensor:
    # The official keeps fp16 activations finite after each residual add.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        return x.clamp(-limit, limit)
    return x


class Block(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        c = config
        self.norm1 = RMSNorm(c.d_model, c.eps)
        self.attn = Attention(c.d_model, c.num_heads, c.d_kv)
        self.norm2 = RMSNorm(c.d_model, c.eps)
        self.ffn = GatedFFN(c.d_model, c.d_ff)
        self.pos_embedding = RelativePositionBias(c.relative_attention_num_buckets, c.num_heads)

    def forward(self, x: Tensor, buckets: Tensor, padding: Tensor) -> Tensor:
        """`buckets` `[L, L]`: relative-position buckets; `padding` `[N, 1, 1, L]`: True on padding keys."""
        bias = self.pos_embedding(buckets).masked_fill(padding, torch.finfo(x.dtype).min)
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """Token ids `[N, L]` and attention mask `[N, L]` (1 on tokens, 0 on padding) -> hidden states
    `[N, L, D]` (rows on padding are not zeroed here: `TextEncoder` cuts them). State-dict names are
    the official `models_t5_umt5-xxl-enc-bf16.pth` names (242 tensors for umt5-xxl)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.eps)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.token_embedding(ids)
        position = torch.arange(ids.shape[1], device=ids.device)
        # One bucket map for every block (each looks it up in its own table).
        buckets = relative_position_bucket(position[None, :] - position[:, None],
                                           self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        padding = (mask == 0)[:, None, None, :]
        for block in self.blocks:
            x = block(x, buckets, padding)
        return self.norm(x)
