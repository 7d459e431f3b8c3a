"""The VAE decoder's middle attention at 720p (one head of 1024 channels over the 44 x 80 latent
positions of each of 8 frames, bf16): SDPA as the eager model calls it (`AttentionBlock.attend`;
PyTorch picks the backend, no flash or cuDNN kernel takes head dim 1024), SDPA forced to each
backend that accepts it, and `core.optimize.MatmulAttentionBlock.attend` (bf16 GEMM with fp32
scores, fp32 softmax, bf16 GEMM) eager and compiled. CUDA events, medians of 20 after 5; error
against float64 beside each.

    PYTHONPATH=. python docs/benchmarks/vae_attention.py
"""

import torch
import torch.nn.functional as F
from cuda_timing import median_ms  # this folder is on sys.path when run
from torch.nn.attention import SDPBackend, sdpa_kernel

from core.optimize import MatmulAttentionBlock

frames, tokens, width = 8, 44 * 80, 1024
q, k, v = (torch.randn(frames, tokens, width, device="cuda", dtype=torch.bfloat16) for _ in range(3))
exact = F.scaled_dot_product_attention(*(t.double().cpu()[:, None] for t in (q, k, v)))[:, 0]


def report(name, fn):
    try:
        out = fn()
        ms = median_ms(fn, reps=20, warmup=5)
    except RuntimeError as error:
        print(f"{name}: not available ({str(error).splitlines()[0][:120]})")
        return
    error = ((out.double().cpu() - exact).abs().max() / exact.abs().max()).item()
    print(f"{name}: {ms:.3f} ms, max error / max {error:.2e}")


report("SDPA (default choice)", lambda: F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])
for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.FLASH_ATTENTION):
    def forced(backend=backend):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    report(f"SDPA {backend.name}", forced)
report("MatmulAttentionBlock math, eager", lambda: MatmulAttentionBlock.attend(q, k, v))
compiled = torch.compile(MatmulAttentionBlock.attend, dynamic=False)
report("MatmulAttentionBlock math, compiled", lambda: compiled(q, k, v))
