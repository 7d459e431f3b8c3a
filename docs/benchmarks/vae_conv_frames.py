"""Time per output frame of the 5B decoder's causal 3x3x3 convolutions (bf16, channels-last, cuDNN)
when a step computes 1, 2 or 4 output frames. At 720p the compiled decoder steps every up stage one
frame at a time (`DecodePlan.slice_bytes`); at the low resolutions a one-frame step is a GEMM of
few rows (44 x 80 = 3,520 at stage 0), which may leave the GPU partly idle in its last wave of
tiles. This says whether wider steps would pay there, before any decoder change.

    PYTHONPATH=. python docs/benchmarks/vae_conv_frames.py          # one GPU, ~20 s

CUDA events (`cuda_timing.median_ms`), 5 warm-up calls, median of 30; random data (times do not depend on the values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from cuda_timing import median_ms  # this folder is on sys.path when run

# (in, out, height, width): one conv of each width and resolution the 720p decoder steps through
SHAPES = [(1024, 1024, 44, 80), (1024, 1024, 88, 160), (1024, 512, 176, 320), (512, 512, 176, 320),
          (512, 256, 352, 640), (256, 256, 352, 640)]


def main() -> None:
    device, dtype, layout = "cuda", torch.bfloat16, torch.channels_last_3d
    print(f"# {torch.cuda.get_device_name()}: ms per output frame (TFLOP/s) by output frames per step")
    for c_in, c_out, height, width in SHAPES:
        weight = (torch.randn(c_out, c_in, 3, 3, 3, device=device) * 0.02).to(dtype).contiguous(memory_format=layout)
        cells = []
        for frames in (1, 2, 4):
            x = torch.randn(1, c_in, frames + 2, height, width, device=device, dtype=dtype)
            x = x.contiguous(memory_format=layout)
            ms = median_ms(lambda x=x, weight=weight: F.conv3d(x, weight, None, 1, (0, 1, 1)), reps=30, warmup=5)
            tflops = 2 * c_in * c_out * 27 * height * width * frames / ms / 1e9
            cells.append(f"{frames}: {ms / frames:.3f} ({tflops:.0f})")
        print(f"{c_in:>4} -> {c_out:<4} {height:>3} x {width:<3}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
