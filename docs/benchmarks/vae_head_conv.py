"""The decoder head's conv (256 -> 12 channels, 3x3x3, one frame + 2 past at 352 x 640): cuDNN's time
with the output channels zero-padded to 16 / 32 / 64, and as 3 per-tap 2-D convs; a 256 -> 256 and
a 512 -> 256 conv of the same stage beside them. CUDA events, medians of 30. Last: one compiled
one-frame step of `core.optimize.TapProductsConv3d` (the head since 2026-12-07: one GEMM over the
new frame's 27 taps, N = 324, and one fused sum with the cached partial sums), with its error
against an fp32 conv beside cuDNN's bf16 one.

    PYTHONPATH=. python docs/benchmarks/vae_head_conv.py
"""

import torch
import torch.nn.functional as F
from cuda_timing import median_ms  # this folder is on sys.path when run

from core.optimize import TapProductsConv3d
from core.vae import CausalCache, CausalConv3d

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
head = CausalConv3d(256, 12, 3).to(dev, dt).requires_grad_(False)
head.weight.data = head.weight.data.contiguous(memory_format=cl)
head.__class__ = TapProductsConv3d
step = torch.compile(head, dynamic=False)
cache = CausalCache()
outputs = [step(x[:, :, t:t + 1], cache) for t in range(3)]  # the last is the output for x's 3 frames
reference = F.conv3d(F.pad(x.float(), (1, 1, 1, 1, 2, 0)), head.weight.float(), head.bias.float())[:, :, 2:]
scale = reference.abs().max().item()
error = (outputs[-1].float() - reference).abs().max().item() / scale
cudnn = F.conv3d(x, head.weight, head.bias, 1, (0, 1, 1))
cudnn_error = (cudnn.float() - reference).abs().max().item() / scale
frame = x[:, :, 2:]
print(f"TapProductsConv3d one-frame step (12 out): {timed(lambda: step(frame, cache)):.3f} ms, "
      f"max error / max {error:.2e} (cuDNN bf16: {cudnn_error:.2e})")
