"""Speed transforms applied to a built model from outside (the model code stays eager)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from core.dit import CausalWanDiT
from core.eager import apply_eager_methods
from core.vae import AttentionBlock, CausalCache, CausalConv3d, Upsample

# Measured at 720p (docs/BENCHMARKS.md): compiling the DiT blocks takes ~12 s and saves ~0.29 s
# per chunk (H200); compiling the cell VAE decoder with rings takes 26-42 s (first chunk of a
# process, H100) and saves ~0.75 s per chunk against it eager (H100: 0.76-0.77 s compiled on
# 2026-12-07, 1.521 s eager on 2026-12-05): 42 / 0.75 -> 56 chunks.
DIT_BREAK_EVEN_CHUNKS = 40
VAE_BREAK_EVEN_CHUNKS = 56


def wants_compile(setting: str, device: torch.device, chunks: int | None = None,
                  break_even_chunks: int = 0) -> bool:
    """RuntimeConfig.compile ("auto" | "always" | "never") on a device. "auto" compiles on a GPU
    when the run is long enough to win back the compile time (`chunks` None: steady-state
    measurements, which exclude it)."""
    if setting != "auto":
        return setting == "always"
    return device.type == "cuda" and (chunks is None or chunks >= break_even_chunks)


def compile_blocks(model: CausalWanDiT, mode: str | None = None) -> CausalWanDiT:
    """torch.compile every transformer block: fuses the norms, adaLN modulation, RoPE and gates
    around the matmuls. Cache writes and attention stay eager (see core/kv_cache.py)."""
    apply_eager_methods()
    for block in model.blocks:
        block.compile(dynamic=False, mode=mode)
    return model


# Compiled units of the VAE decoder: conv1 + middle, each up stage, the head. Each unit sees a
# few input kinds (start of the video, a first-cell remainder slice, the steady slice), static.
VAE_RECOMPILE_LIMIT = 32


# Convolutions whose ring rotations `compile_vae_decoder` keeps (`CausalConv3d.freeze_ring_taps`,
# `context + 1` copies of the weights each): the 5B decoder's up to 512 output channels (3.4-27 MiB
# each, 0.42 GiB of rotations), which keep rings at 720p. Its 1024-wide ones (54 MiB) keep rings only
# from about 1080p on and gather their rotations per step there: keeping them would cost 2.4 GiB.
RING_TAPS_MAX_BYTES = 32 * 2**20


def compile_vae_decoder(vae, backend: str = "inductor", mode: str | None = None,
                        channels_last: bool | None = None, tap_products: bool | None = None,
                        matmul_attention: bool | None = None, ring_taps_max_bytes: int = RING_TAPS_MAX_BYTES) -> None:
    """torch.compile the VAE decoder's units (fuses each norm + SiLU with the causal padding, or with
    the in-place write of a one-frame step's ring (`DecodePlan.ring_past`), into one kernel, the
    sub-pixel interleave with its conv's bias add). The cell and slice loops, the
    feature cache and the first-frame rules stay eager Python; each unit compiles once per kind of
    slice (start of the video, steady state, and a first-cell remainder), with static shapes.
    `backend="eager"` traces without code generation (CPU tests of the capture). Derived weights
    are frozen: the sub-pixel phase kernels, and the ring rotations of the convolutions up to
    `ring_taps_max_bytes` (0: none, each ring step gathers its rotation). The one-frame steps that
    keep rings compile one graph per ring slot, identical but for which rotation they are given.

    `channels_last` (None: when the decoder is on a GPU) stores the conv weights channels-last
    first: inductor then writes every fused norm + SiLU straight into the layout cuDNN's 3-D
    kernels compute in. Left channels-first, cuDNN transposes each conv's input and output, 20 %
    of a compiled 720p chunk on an H100 (docs/BENCHMARKS.md). Eager decoders stay channels-first
    (their elementwise ops are slower channels-last).

    `tap_products` (None: with `channels_last`) runs the head as `TapProductsConv3d` where that
    pays (the 5B VAE's 256 -> 12 head: a GEMM per frame instead of cuDNN's slowest 3-D kernel).
    `matmul_attention` (None: with `channels_last`) runs the middle attention as
    `MatmulAttentionBlock` (SDPA's kernel for its 1024-wide head: 3.5 ms per 8 frames, the GEMMs
    0.8 ms compiled, H100)."""
    decoder = vae.decoder
    if channels_last is None:
        channels_last = next(decoder.parameters()).device.type == "cuda"
    if channels_last:
        channels_last_vae_decoder(vae)
    if channels_last if tap_products is None else tap_products:
        tap_products_vae_head(vae)
    if channels_last if matmul_attention is None else matmul_attention:
        matmul_attention_vae_decoder(vae)
    for module in decoder.modules():  # frozen from here on: derived weights once, not per call
        if isinstance(module, Upsample):
            module.freeze_subpixel()
        if type(module) is CausalConv3d and module.weight.nbytes <= ring_taps_max_bytes:
            module.freeze_ring_taps()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, VAE_RECOMPILE_LIMIT)
    compile_unit = functools.partial(torch.compile, backend=backend, mode=mode, dynamic=False)
    # instance attributes shadow the methods; the modules keep their parameters and names
    decoder.low_res = compile_unit(decoder.low_res)
    decoder.head_out = compile_unit(decoder.head_out)
    for stage in decoder.upsamples:
        stage.compile(backend=backend, mode=mode, dynamic=False)


def compile_vae_encoder(vae, backend: str = "inductor", mode: str | None = None) -> None:
    """torch.compile the VAE encoder's step (fuses each norm + SiLU + causal padding around the
    convolutions): one graph for the first frame and one for every 4-frame step after it, static
    shapes. For `train-ar`, where every batch is encoded (a frozen encoder, often the largest share
    of a small model's step). `backend="eager"` traces without code generation (CPU tests)."""
    vae.encoder.compile(backend=backend, mode=mode, dynamic=False)


def channels_last_vae_decoder(vae) -> None:
    """Store the decoder's convolution weights channels-last (C innermost). Convolutions then
    return channels-last activations, and the decoder's own reshapes keep that layout
    (`core.vae.empty_like_layout`), so cuDNN needs no layout transposes around each conv."""
    for module in vae.decoder.modules():
        if isinstance(module, torch.nn.Conv3d | torch.nn.Conv2d):
            layout = torch.channels_last_3d if module.weight.dim() == 5 else torch.channels_last
            module.weight.data = module.weight.data.contiguous(memory_format=layout)


def conv3d_by_frame_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         padding: tuple[int, int, int]) -> torch.Tensor:
    """A stride-1 3-D convolution with no temporal padding, as one 2-D convolution per temporal tap
    over the frames folded into the batch, summed: out[t] = sum_k conv2d(x[t + k], weight[:, :, k]).
    The same products, summed in another order. On channels-last-3d input (C innermost) every fold
    is a view and each conv2d reads NHWC in place; otherwise the frames are gathered once."""
    B, C, frames_in, H, W = x.shape
    taps = weight.shape[2]
    frames = frames_in - taps + 1
    by_frame = x.transpose(1, 2)  # [B, T, C, H, W]
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d)
    if not channels_last:
        by_frame = by_frame.contiguous()
    out = None
    for k in range(taps):
        window = by_frame[:, k:k + frames].reshape(B * frames, C, H, W)
        tap = weight[:, :, k]
        if channels_last:
            tap = tap.contiguous(memory_format=torch.channels_last)
        y = torch.nn.functional.conv2d(window, tap, bias if k == 0 else None, padding=padding[1:])
        out = y if out is None else out.add_(y)
    out = out.unflatten(0, (B, frames)).transpose(1, 2)  # [B, O, T, H', W']
    return out if channels_last else out.contiguous()


def conv3d_by_stacked_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           padding: tuple[int, int, int]) -> torch.Tensor:
    """The same convolution as one 2-D convolution whose input stacks the `taps` time-shifted frames
    along channels: out[t] = conv2d(cat_k x[t + k], weight as [O, taps * C, kh, kw]). One GEMM with
    the whole 3-D reduction (K = taps * C * kh * kw) for one copy of the input per tap; the frames
    are folded into the batch. Output in the input's layout."""
    B, C, frames_in, H, W = x.shape
    taps = weight.shape[2]
    frames = frames_in - taps + 1
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    by_frame = x.transpose(1, 2)  # [B, T, C, H, W]
    stacked = torch.cat([by_frame[:, k:k + frames] for k in range(taps)], dim=2)  # [B, T', taps * C, H, W]
    stacked = stacked.reshape(B * frames, taps * C, H, W).contiguous(memory_format=layout)
    flat = weight.transpose(1, 2).reshape(weight.shape[0], taps * C, *weight.shape[3:])  # channel = k * C + c
    y = torch.nn.functional.conv2d(stacked, flat.contiguous(memory_format=layout), bias, padding=padding[1:])
    out = y.unflatten(0, (B, frames)).transpose(1, 2)  # [B, O, T', H', W']
    return out if channels_last else out.contiguous()


class FrameTapsConv3d(CausalConv3d):
    """`CausalConv3d` whose convolution runs as per-tap 2-D convolutions (`conv3d_by_frame_taps`):
    2-D kernels are the most tuned in cuDNN. Swapped in by class, so names and weights stay."""

    def convolve(self, x_with_past: torch.Tensor, newest: int | None = None) -> torch.Tensor:
        assert newest is None  # no rings: `CausalConv3d._rings_pay`
        return conv3d_by_frame_taps(x_with_past, self.weight, self.bias, self.padding)


class StackedTapsConv3d(CausalConv3d):
    """`CausalConv3d` run as one 2-D convolution over the taps stacked into channels
    (`conv3d_by_stacked_taps`). Swapped in by class, so names and weights stay."""

    def convolve(self, x_with_past: torch.Tensor, newest: int | None = None) -> torch.Tensor:
        assert newest is None  # no rings: `CausalConv3d._rings_pay`
        return conv3d_by_stacked_taps(x_with_past, self.weight, self.bias, self.padding)


class TapProductsConv3d(CausalConv3d):
    """`CausalConv3d` for few output channels (the decoder's head: 256 -> 12 at 720p, where cuDNN's
    3-D kernel reaches under a tenth of its 256 -> 256 rate): each new frame meets all its kt x kh x kw taps in one
    GEMM (N = kt * kh * kw * out_channels), and each output frame is the sum of shifted slices of
    the products of its frame and the `context` frames before it. The cache keeps, instead of past
    input frames, the fp32 partial sums of the next `context` output frames ([context, B, H, W, O]):
    each frame's products are computed once, where the convolution recomputes them for every output
    frame that frame reaches. The same products as the convolution's, summed in fp32 in another
    order (bf16: the products are rounded once before that sum). Swapped in by class
    (`tap_products_vae_head`), so names and weights stay; for stride-1 "same" kernels."""

    @staticmethod
    def pays(conv: CausalConv3d) -> bool:
        """Where the products of a frame are at most twice the frame: few output channels."""
        return conv.out_channels * math.prod(conv.kernel_size) <= 2 * conv.in_channels

    def with_past(self, x: torch.Tensor, cache: CausalCache | None) -> tuple[torch.Tensor, CausalCache | None]:
        return x, cache  # the past is the partial sums in the cache, read and replaced by `convolve`

    def convolve(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        B, C, frames, H, W = x.shape
        kt, kh, kw = self.kernel_size
        ph, pw = self.padding[1:]
        # [B*T*H*W, C] @ [C, (k, dy, dx, o)]: a view of channels-last input, one GEMM for all frames
        rows = x.permute(0, 2, 3, 4, 1).reshape(-1, C)
        taps = self.weight.permute(1, 2, 3, 4, 0).reshape(C, -1).to(x.dtype)
        products = (rows @ taps).view(B, frames, H, W, kt, kh, kw, self.out_channels)
        products = F.pad(products, (0, 0, 0, 0, 0, 0, 0, 0, pw, pw, ph, ph))  # zeros around H and W
        total = torch.promote_types(x.dtype, torch.float32)  # the dtype of the sums
        partial = cache.get(self) if cache is not None else None
        sums = list(partial.unbind(0)) if partial is not None else \
            [x.new_zeros((B, H, W, self.out_channels), dtype=total) for _ in range(self.context)]
        bias = self.bias.to(total) if self.bias is not None else 0.0
        outputs = []
        for t in range(frames):
            # by_tap[k][b, h, w]: the sum over dy, dx of frame t's products at (h + dy - ph, w + dx - pw)
            by_tap = [sum(products[:, t, dy:dy + H, dx:dx + W, k, dy, dx].to(total)
                          for dy in range(kh) for dx in range(kw)) for k in range(kt)]
            outputs.append((sums[0] + by_tap[-1] if sums else by_tap[-1]) + bias)
            # the output `j + 1` frames ahead gains this frame's tap `kt - 2 - j`
            sums = [sums[j + 1] + by_tap[kt - 2 - j] for j in range(self.context - 1)] + ([by_tap[0]] if sums else [])
        if cache is not None and self.context:
            cache.put(self, torch.stack(sums))
        out = torch.stack(outputs, dim=1).to(x.dtype)  # [B, T, H, W, O]
        return out.permute(0, 4, 1, 2, 3)  # [B, O, T, H, W], channels-last in memory


def tap_products_vae_head(vae) -> bool:
    """The decoder's head convolution becomes a `TapProductsConv3d` where that pays (few output
    channels for its input width: the 5B VAE's 256 -> 12, not the tiny presets'). True if swapped."""
    conv = vae.decoder.head[-1]
    if type(conv) is not CausalConv3d or not TapProductsConv3d.pays(conv):
        return False
    conv.__class__ = TapProductsConv3d
    return True


def bmm_with_fp32_output(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched) accumulated and returned in fp32 (at least): on a GPU the bf16 / fp16 GEMM
    with an fp32 output (`out_dtype`), elsewhere in the promoted dtype."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    total = torch.promote_types(a.dtype, torch.float32)
    return torch.bmm(a.to(total), b.to(total))


class MatmulAttentionBlock(AttentionBlock):
    """`AttentionBlock` (one head as wide as the block: 1024 in the 5B VAE) as two batched GEMMs
    around an fp32 softmax: SDPA has no fused kernel for head dims over 256 on Hopper and falls
    back to a slow one. The scores are kept in fp32 (as fused kernels keep them), the
    probabilities are rounded to the value dtype for the second GEMM (as flash attention does).
    The scores are materialised: (H*W)^2 fp32 per frame, 50 MB at 720p (44 x 80 positions).
    Swapped in by class (`matmul_attention_vae_decoder`), so names and weights stay."""

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = bmm_with_fp32_output(q, k.transpose(1, 2)).mul_(q.shape[-1] ** -0.5)
        return torch.bmm(scores.softmax(dim=-1).to(v.dtype), v)


def matmul_attention_vae_decoder(vae) -> int:
    """The decoder's attention blocks become `MatmulAttentionBlock`s; returns how many."""
    blocks = [m for m in vae.decoder.modules() if type(m) is AttentionBlock]
    for block in blocks:
        block.__class__ = MatmulAttentionBlock
    return len(blocks)


def frame_taps_vae_decoder(vae, stacked: bool = False) -> None:
    """Every temporal convolution of the decoder (kernel_t > 1) becomes a `FrameTapsConv3d` (one
    2-D convolution per tap, summed) or, with `stacked`, a `StackedTapsConv3d` (one 2-D
    convolution over the taps stacked into channels)."""
    swapped = StackedTapsConv3d if stacked else FrameTapsConv3d
    for module in vae.decoder.modules():
        if type(module) is CausalConv3d and module.kernel_size[0] > 1 and module.stride == (1, 1, 1):
            module.__class__ = swapped


def warm_up_vae_decoder(vae, latent_height: int, latent_width: int, frames_per_block: int) -> None:
    """Run (and so compile) every kind of decoder slice ahead of a timed or latency-sensitive run:
    chunks of `frames_per_block` latents until the first cell and a later one are done."""
    param = next(vae.parameters())
    decoder = vae.streaming_decoder()
    chunks = max(2, -(-2 * decoder.plan.latents_per_cell // frames_per_block))
    generator = torch.Generator(device=param.device).manual_seed(0)
    latents = torch.randn(1, vae.config.z_dim, chunks * frames_per_block, latent_height, latent_width,
                          generator=generator, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        for chunk in latents.split(frames_per_block, dim=2):
            decoder.decode(chunk)
