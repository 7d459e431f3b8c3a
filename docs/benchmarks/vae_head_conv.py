"""The decoder head's conv (256 -> 12 channels, 3x3x3, one frame + 2 past at 352 x 640): cuDNN's time
with the output channels zero-padded to 16 / 32 / 64, and as 3 per-tap 2-D convs; a 256 -> 256 and
a 512 -> 256 conv of the same stage beside them. CUDA events, medians of 30. Last (added after the
seventeenth session's call 4, not measured yet): the head as one batched GEMM over each frame's 9
spatial taps (N = 108, a shape cuBLAS runs well) and a compiled sum of 27 shifted fp32 slices
(`head_by_gemm`), with its error against cuDNN's conv.

    PYTHONPATH=. python docs/benchmarks/vae_head_conv.py
"""

import torch
import torch.nn.functional as F
from cuda_timing import median_ms  # this folder is on sys.path when run


def head_by_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 3x3x3 conv with few output channels over exactly 3 frames ([1, C, 3, H, W], channels-last)
    -> one frame [1, O, 1, H, W]: per input frame one GEMM over all its 9 spatial taps, then the sum
    of the 27 shifted products in fp32 (checked against F.conv3d in float64 on the CPU)."""
    _, C, _, H, W = x.shape
    O = w.shape[0]
    frames = x[0].permute(1, 2, 3, 0).reshape(3, H * W, C)  # a view when x is channels-last
    taps = w.permute(2, 1, 3, 4, 0).reshape(3, C, 9 * O)  # [k, C, (dy, dx, o)]
    y = torch.bmm(frames, taps.to(x.dtype)).float().view(3, H, W, 3, 3, O)
    y = F.pad(y, (0, 0, 0, 0, 0, 0, 1, 1, 1, 1))  # H and W padded by 1
    out = sum(y[k, dy:dy + H, dx:dx + W, dy, dx] for k in range(3) for dy in range(3) for dx in range(3))
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).permute(2, 0, 1).reshape(1, O, 1, H, W)


dev, dt, cl = "cuda", torch.bfloat16, torch.channels_last_3d
x = torch.randn(1, 256, 3, 352, 640, device=dev, dtype=dt).contiguous(memory_format=cl)


def timed(fn):
    return median_ms(fn, reps=30, warmup=5)


for cin, cout, hw in ((256, 12, (352, 640)), (256, 256, (352, 640)), (512, 256, (352, 640))):
    xi = torch.randn(1, cin, 3, *hw, device=dev, dtype=dt).contiguous(memory_format=cl)
    for pad in sorted({cout, 16, 32, 64} if cout == 12 else {cout}):
        w = torch.randn(pad, cin, 3, 3, 3, device=dev, dtype=dt).contiguous(memory_format=cl)
        b = torch.randn(pad, device=dev, dtype=dt)
        t = timed(lambda xi=xi, w=w, b=b: F.conv3d(xi, w, b, 1, (0, 1, 1)))
        print(f"conv {cin}->{pad} (of {cout}) at {hw}: {t:.3f} ms")
w = torch.randn(12, 256, 3, 3, 3, device=dev, dtype=dt)
w2 = [w[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]
xf = x.permute(0, 2, 1, 3, 4)[0]  # [3, 256, H, W] channels-last 2-D views
per_tap = timed(lambda: sum(F.conv2d(xf[k:k + 1], w2[k], None, 1, 1) for k in range(3)))
print("per-tap 2-D (12 out):", f"{per_tap:.3f} ms")
torch.backends.cudnn.benchmark = True
w16 = torch.randn(12, 256, 3, 3, 3, device=dev, dtype=dt).contiguous(memory_format=cl)
print("cudnn.benchmark 12 out:", f"{timed(lambda: F.conv3d(x, w16, None, 1, (0, 1, 1))):.3f} ms")
torch.backends.cudnn.benchmark = False
gemm = torch.compile(head_by_gemm, dynamic=False)
b12 = torch.randn(12, device=dev, dtype=dt)
reference = F.conv3d(x.float(), w16.float(), b12.float(), 1, (0, 1, 1))
scale = reference.abs().max().item()
error = (gemm(x, w16, b12).float() - reference).abs().max().item() / scale
cudnn_error = (F.conv3d(x, w16, b12, 1, (0, 1, 1)).float() - reference).abs().max().item() / scale
print(f"GEMM + shift-sum (12 out): {timed(lambda: gemm(x, w16, b12)):.3f} ms, max error / max {error:.2e} "
      f"(cuDNN bf16: {cudnn_error:.2e})")
