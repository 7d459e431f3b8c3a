"""The causal Wan2.2 DiT (LongLive 2.0 generator).

Parameter names and shapes are those of the official bare model (reference-model.md §2), so the
official files load with `strict=True`. One block, with per-frame adaLN vectors m0..m5:

    h = LN(x) (1 + m1) + m0;        x += SelfAttn(h) m2          (RoPE q/k, RMSNorm over D)
    x += CrossAttn(LN3(x), text)                                   (all text slots, no gate)
    h = LN(x) (1 + m4) + m3;        x += FFN(h) m5                 (GELU-tanh)

Forward modes:
  * `forward`: the whole sequence under the block-causal mask (reference, training); with
    `clean_x`, teacher forcing over `[clean | noisy]` with the official mask.
  * `forward_chunk`: one streamed chunk against a `KVCache`.

Legend: B batch, C latent channels, F latent frames, H/W latent size, S tokens per frame,
L tokens, D model width, T text slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.attention import (
    AttentionMask,
    BlockCausalMask,
    TeacherForcingMask,
    masked_attention,
    sdpa,
)
from core.config import ModelConfig
from core.rope import Rope3D, RotaryTable, frame_positions

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """float64 `[cos(t w_j) | sin(t w_j)]`, w_j = 10000^(-j/(dim/2)): cosine half first."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.flatten(), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).unflatten(0, t.shape)


class RMSNorm(nn.Module):
    """Normalise in fp32, round to the input dtype, then scale (the official rounding order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def per_frame(x_BLD: Tensor, num_frames: int) -> Tensor:
    return x_BLD.unflatten(1, (num_frames, -1))  # [B, F, S, D]


class Projections(nn.Module):
    """q/k/v/o projections with q/k RMSNorm over the full width (official names and order)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class SelfAttention(Projections):
    def forward(self, x_BLD: Tensor, rope: RotaryTable, attend: Attend) -> Tensor:
        heads = (self.num_heads, -1)
        q = rope.rotate(self.norm_q(self.q(x_BLD)).unflatten(-1, heads))
        k = rope.rotate(self.norm_k(self.k(x_BLD)).unflatten(-1, heads))
        v = self.v(x_BLD).unflatten(-1, heads)
        return self.o(attend(q, k, v).flatten(2))


class TextKV(NamedTuple):
    """One layer's cross-attention keys/values of a text context `[B*K, T, N, d]` (a tuple, so
    wrappers that walk a module's outputs, such as FSDP's backward hooks, see the tensors)."""

    k: Tensor
    v: Tensor


class CrossAttention(Projections):
    def text_kv(self, text_BTD: Tensor) -> TextKV:
        heads = (self.num_heads, -1)
        return TextKV(self.norm_k(self.k(text_BTD)).unflatten(-1, heads),
                      self.v(text_BTD).unflatten(-1, heads))

    def forward(self, x_BLD: Tensor, text: TextKV, segments: int = 1) -> Tensor:
        """With K prompts per sample (text batch B*K, sample-major), each of the `segments`
        parts of the sequence (clean, noisy) is cut into K equal groups; group k sees prompt k."""
        batch, length, dim = x_BLD.shape
        prompts = text.k.shape[0] // batch
        q = self.norm_q(self.q(x_BLD))
        if prompts > 1:  # [B, seg, K, L', D] -> [B*K, seg*L', D]
            q = q.view(batch, segments, prompts, -1, dim).transpose(1, 2).reshape(
                batch * prompts, -1, dim)
        out = sdpa(q.unflatten(-1, (self.num_heads, -1)), text.k, text.v).flatten(2)
        if prompts > 1:
            out = out.view(batch, prompts, segments, -1, dim).transpose(1, 2).reshape(
                batch, length, dim)
        return self.o(out)


def _modulation(rows: int, dim: int) -> nn.Parameter:
    values = torch.empty(1, rows, dim)
    # Every model built to load a file is built on `meta`, where even randn goes through torch's
    # Python references, whose first use imports sympy and torch._dynamo (~1.5 s of start-up).
    return nn.Parameter(values if values.is_meta else torch.randn(1, rows, dim) / dim**0.5)


class DiTBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        # Parameter order matches the official state dict: modulation, then submodules.
        self.modulation = _modulation(6, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, config.num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))

    def text_kv(self, text_BTD: Tensor) -> TextKV:
        """This block's cross-attention keys/values of an embedded text (computed once per prompt)."""
        return self.cross_attn.text_kv(text_BTD)

    def forward(self, x_BLD: Tensor, e0_BF6D: Tensor, text: TextKV, rope: RotaryTable,
                attend: Attend, segments: int = 1) -> Tensor:
        frames = e0_BF6D.shape[1]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = \
            (self.modulation.unsqueeze(1) + e0_BF6D).chunk(6, dim=2)  # each [B, F, 1, D]
        h = (per_frame(self.norm1(x_BLD), frames) * (1 + scale_sa) + shift_sa).flatten(1, 2)
        y = self.self_attn(h, rope, attend)
        x_BLD = x_BLD + (per_frame(y, frames) * gate_sa).flatten(1, 2)
        x_BLD = x_BLD + self.cross_attn(self.norm3(x_BLD), text, segments)
        h = (per_frame(self.norm2(x_BLD), frames) * (1 + scale_ff) + shift_ff).flatten(1, 2)
        return x_BLD + (per_frame(self.ffn(h), frames) * gate_ff).flatten(1, 2)


class Head(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.dim
        self.modulation = _modulation(2, dim)
        self.norm = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, config.patch_channels)

    def forward(self, x_BLD: Tensor, e_BFD: Tensor) -> Tensor:
        """Uses the time embedding `e` (before time_projection), not e0."""
        shift, scale = (self.modulation.unsqueeze(1) + e_BFD.unsqueeze(2)).chunk(2, dim=2)
        return self.head(per_frame(self.norm(x_BLD), e_BFD.shape[1]) * (1 + scale) + shift)


class ChunkFrames(Protocol):
    """Which frames of a streamed chunk this process computes, and how their head outputs become
    the whole chunk's. Self-attention reaches the other frames through the cache storage; every
    other stage is per frame. A sequence-parallel plan (`sp/inference.py`) swaps it per instance."""

    def local(self, num_frames: int) -> slice: ...

    def gather(self, y_BfSP: Tensor) -> Tensor: ...


class AllFrames:
    """The one-process default: every frame of the chunk, nothing to gather."""

    def local(self, num_frames: int) -> slice:
        return slice(0, num_frames)

    def gather(self, y_BfSP: Tensor) -> Tensor:
        return y_BfSP


@dataclass(frozen=True)
class TextConditioning:
    """A text context prepared for every layer: compute once per prompt, reuse every step."""

    layers: tuple[TextKV, ...]


class CausalWanDiT(nn.Module):
    """Wan2.2-TI2V causal DiT with the official parameter names (bare, no `model.` prefix).

    Two seams a parallel plan replaces on the instance: `sequence_attention(q, k, v, mask)`, the
    attention of the full-sequence forwards (`sp/plan.py`), and `chunk_frames`, the frames of a
    streamed chunk this process computes (`sp/inference.py`)."""

    sequence_attention: Callable[[Tensor, Tensor, Tensor, AttentionMask], Tensor] = \
        staticmethod(masked_attention)
    chunk_frames: ChunkFrames = AllFrames()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim),
                                            nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(),
                                            nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self.rope = Rope3D(config.head_dim, config.rope_theta)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # -- initialisation -----------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation (Xavier linears, N(0, .02) embeddings, zero head)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for module in (*self.text_embedding, *self.time_embedding):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        dim = self.config.dim
        for block in self.blocks:
            block.modulation.copy_(torch.randn_like(block.modulation) / dim**0.5)
            for norm in (block.self_attn.norm_q, block.self_attn.norm_k,
                         block.cross_attn.norm_q, block.cross_attn.norm_k):
                nn.init.ones_(norm.weight)
            nn.init.ones_(block.norm3.weight)
            nn.init.zeros_(block.norm3.bias)
        self.head.modulation.copy_(torch.randn_like(self.head.modulation) / dim**0.5)

    # -- shared stages --------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def patchify(self, x_BCFHW: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """Latents -> tokens `[B, F*S, D]` in (f, h, w) order, and the token grid (F, h, w)."""
        if x_BCFHW.dim() != 5 or x_BCFHW.shape[1] != self.config.in_channels:
            raise ValueError(f"latents must be [B, {self.config.in_channels}, F, H, W] "
                             f"(got {tuple(x_BCFHW.shape)})")
        pt, ph, pw = self.config.patch_size
        _, _, frames, height, width = x_BCFHW.shape
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent size F={frames}, H={height}, W={width} must be divisible by "
                             f"the patch size {self.config.patch_size}")
        tokens = self.patch_embedding(x_BCFHW.to(self.dtype))
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2), grid

    def unpatchify(self, y_BFSP: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Head outputs `[B, F, S, prod(patch)*C]` -> latents `[B, C, F*pt, h*ph, w*pw]`; the
        outputs of a token are ordered (pt, ph, pw, c)."""
        frames, height, width = grid
        pt, ph, pw = self.config.patch_size
        channels = self.config.out_channels
        y = y_BFSP.reshape(y_BFSP.shape[0], frames, height, width, pt, ph, pw, channels)
        y = y.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b c f pt h ph w pw
        return y.reshape(y.shape[0], channels, frames * pt, height * ph, width * pw)

    def time_embed(self, t_BF: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frame timesteps (0..1000) -> (e [B, F, D], e0 [B, F, 6, D])."""
        if t_BF.dim() != 2:
            raise ValueError(f"timesteps must be per frame, [B, F] (got shape {tuple(t_BF.shape)})")
        e = self.time_embedding(sinusoidal_embedding(t_BF, self.config.freq_dim).to(self.dtype))
        e0 = self.time_projection(e).unflatten(2, (6, self.config.dim))
        return e, e0

    def prepare_text(self, context_BTC: Tensor) -> TextConditioning:
        """Text-encoder output `[B*K, <=T, text_dim]` -> per-layer cross-attention keys/values.
        Shorter contexts are zero-padded to `text_len`; every slot is attended (no mask)."""
        cfg = self.config
        if context_BTC.dim() != 3 or context_BTC.shape[-1] != cfg.text_dim or \
                context_BTC.shape[1] > cfg.text_len:
            raise ValueError(f"text context must be [B, <={cfg.text_len}, {cfg.text_dim}] "
                             f"(got {tuple(context_BTC.shape)})")
        if context_BTC.shape[1] < cfg.text_len:
            context_BTC = F.pad(context_BTC, (0, 0, 0, cfg.text_len - context_BTC.shape[1]))
        text = self.text_embedding(context_BTC.to(self.dtype))
        return TextConditioning(tuple(block.text_kv(text) for block in self.blocks))

    def rope_table(self, grid: tuple[int, int, int], positions: Tensor) -> RotaryTable:
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        return self.rope.table(positions, grid[1], grid[2], dtype)

    def run_blocks(self, x_BLD: Tensor, e0: Tensor, text: TextConditioning, rope: RotaryTable,
                   attends: Sequence[Attend], segments: int = 1) -> Tensor:
        for block, layer_text, attend in zip(self.blocks, text.layers, attends, strict=True):
            x_BLD = block(x_BLD, e0, layer_text, rope, attend, segments)
        return x_BLD

    def _text(self, context: Tensor | TextConditioning) -> TextConditioning:
        return context if isinstance(context, TextConditioning) else self.prepare_text(context)

    # -- forward modes --------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, context: Tensor | TextConditioning, *,
                frames_per_block: int, clean_x: Tensor | None = None,
                clean_t: Tensor | None = None, rope_offset: float | Tensor = 0.0) -> Tensor:
        """Whole-sequence velocity `[B, C, F, H, W]` under the block-causal mask.

        With `clean_x` this is teacher forcing: the sequence is `[clean | noisy]`, both halves at
        temporal positions 0..F-1 (+ `rope_offset`), clean frames embedded with `clean_t`
        (default zeros); returns the noisy half's velocity.
        """
        tokens, grid = self.patchify(x)
        frames = grid[0]
        if t.shape != (x.shape[0], frames):
            raise ValueError(f"timesteps must be [B, F] = [{x.shape[0]}, {frames}] "
                             f"(got {tuple(t.shape)})")
        positions = frame_positions(frames, 0, rope_offset, device=x.device)
        rope = self.rope_table(grid, positions)
        e, e0 = self.time_embed(t)
        tokens_per_frame = grid[1] * grid[2]
        mask: AttentionMask
        if clean_x is None:
            segments = 1
            mask = BlockCausalMask(frames, tokens_per_frame, frames_per_block)
        else:
            if clean_x.shape != x.shape:
                raise ValueError(f"clean_x must match x {tuple(x.shape)} "
                                 f"(got {tuple(clean_x.shape)})")
            segments = 2
            clean_tokens, _ = self.patchify(clean_x)
            clean_t = torch.zeros_like(t) if clean_t is None else clean_t
            _, e0_clean = self.time_embed(clean_t)
            tokens = torch.cat([clean_tokens, tokens], dim=1)
            e0 = torch.cat([e0_clean, e0], dim=1)
            rope = rope.concat(rope)
            mask = TeacherForcingMask(frames, tokens_per_frame, frames_per_block)

        def attend(q, k, v):
            return self.sequence_attention(q, k, v, mask)

        out = self.run_blocks(tokens, e0, self._text(context), rope,
                              [attend] * len(self.blocks), segments)
        if segments == 2:
            out = out[:, out.shape[1] // 2:]
        return self.unpatchify(self.head(out, e), grid)

    def forward_chunk(self, x: Tensor, t: Tensor, context: Tensor | TextConditioning, *,
                      cache, start_frame: int, rope_offset: float | Tensor = 0.0,
                      rewrite_at: int | None = None, keep_kv: bool = True) -> Tensor:
        """Velocity of one streamed chunk `[B, C, f, H, W]` starting at absolute latent frame
        `start_frame`; reads and writes `cache` (a `core.kv_cache.KVCache`, or any object with its
        `layout` / `begin` / `commit`). `rewrite_at` re-encodes frames the cache already holds at
        that buffer frame (window recache).
        `keep_kv=False`: later chunks will not read this call's keys/values (they are rewritten
        first), so the cache need not store them."""
        tokens, grid = self.patchify(x)
        frames = grid[0]
        tokens_per_frame = grid[1] * grid[2]
        if cache.layout.tokens_per_frame != tokens_per_frame:
            raise ValueError(f"cache was sized for {cache.layout.tokens_per_frame} tokens per frame, "
                             f"chunk has {tokens_per_frame}")
        # The cache plans the whole chunk; this process computes `local` of its frames.
        local = self.chunk_frames.local(frames)
        positions = frame_positions(frames, start_frame, rope_offset, device=x.device)[..., local]
        rope = self.rope_table(grid, positions)
        e, e0 = (emb[:, local] for emb in self.time_embed(t))  # all frames: the same rows as one process
        tokens = per_frame(tokens, frames)[:, local].flatten(1, 2)
        attends = cache.begin(start_frame, frames, rewrite_at, keep_kv=keep_kv)
        out = self.run_blocks(tokens, e0, self._text(context), rope, attends)
        cache.commit()
        return self.unpatchify(self.chunk_frames.gather(self.head(out, e)), grid)


@torch.no_grad()
def random_init_(model: nn.Module, seed: int = 0, *, prefix: str = "",
                 index_of: Mapping[str, int] | None = None) -> nn.Module:
    """Deterministic, non-degenerate random weights for tests and benchmarks: N(0, 1/fan_in)
    for weights and biases, norm scales 1 + N(0, 0.1^2). Works on any device (also on a model
    materialised from `meta` with `to_empty`). Each parameter's values depend only on its index
    in the full model (`index_of`, default: the model's own order), so a model can be
    materialised and initialised part by part (`prefix`; parameters on `meta` are skipped)."""
    if index_of is None:
        index_of = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    for name, param in model.named_parameters():
        if param.is_meta or not name.startswith(prefix):
            continue
        generator = torch.Generator(device=param.device).manual_seed(seed * 100003 + index_of[name])
        values = torch.randn(param.shape, generator=generator, device=param.device,
                             dtype=torch.float32)
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            values = 1 + 0.1 * values
        else:
            fan_in = param[0].numel() if param.dim() > 1 else param.shape[-1]
            values = values / fan_in**0.5
        param.copy_(values)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (each tensor once): what a format really
    costs, whatever its layout."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
