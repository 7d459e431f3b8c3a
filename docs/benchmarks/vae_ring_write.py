"""One compiled one-frame causal step (RMS norm -> SiLU -> 3x3x3 conv, bf16, channels-last) four
ways, on a GPU: the padded input + clone of its tail (`cat`, the decoder before 2026-12-07), a ring
written at a static slot (`ring`, one graph per slot), a ring written by indexed assignment at a
tensor slot (`put`, what `CausalConv3d.ring_step` does) and by `index_copy_` (`icopy`, the twelfth
session's rings). Prints inductor's kernels and buffers for each, the rings' error against `cat`
and the milliseconds per step (CUDA events, medians of 40).

    PYTHONPATH=. python docs/benchmarks/vae_ring_write.py 256 352 640    # channels, height, width
"""
import sys

import torch
import torch.nn.functional as F
from cuda_timing import median_ms  # this folder is on sys.path when run
from torch._inductor.utils import run_and_get_code

C, H, W = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dev, dt, cl = "cuda", torch.bfloat16, torch.channels_last_3d
torch.manual_seed(0)
w = (torch.randn(C, C, 3, 3, 3, device=dev) / (27 * C) ** 0.5).to(dt).contiguous(memory_format=cl)
rot = [torch.roll(w, shifts=s, dims=2).contiguous(memory_format=cl) for s in range(3)]
gamma = (1 + 0.1 * torch.randn(C, 1, 1, 1, device=dev)).to(dt)
scale = C ** 0.5


def norm_silu(x):
    return F.silu(F.normalize(x, dim=1) * (scale * gamma))


def cat_step(past, x, weight):
    padded = torch.cat([past, norm_silu(x)], dim=2)
    new_past = padded[:, :, -2:].clone(memory_format=cl)
    return F.conv3d(padded, weight, None, 1, (0, 1, 1)), new_past


def ring_step(ring, x, slot: int, weight):
    ring[:, :, slot:slot + 1].copy_(norm_silu(x))
    return F.conv3d(ring, weight, None, 1, (0, 1, 1))


def put_step(ring, x, slot_t, weight_stack):
    ring[:, :, slot_t] = norm_silu(x)  # index_put_ with a tensor slot: one graph for every slot
    weight = weight_stack.index_select(0, (slot_t + 1) % 3).squeeze(0)
    return F.conv3d(ring, weight, None, 1, (0, 1, 1))


def icopy_step(ring, x, slot_t, weight_stack):
    ring.index_copy_(2, slot_t, norm_silu(x))  # the twelfth session's write
    weight = weight_stack.index_select(0, (slot_t + 1) % 3).squeeze(0)
    return F.conv3d(ring, weight, None, 1, (0, 1, 1))


cat_c = torch.compile(cat_step, dynamic=False)
put_c = torch.compile(put_step, dynamic=False)
icopy_c = torch.compile(icopy_step, dynamic=False)
stack = torch.stack(rot)
ring_c = torch.compile(ring_step, dynamic=False)
frames = [torch.randn(1, C, 1, H, W, device=dev, dtype=dt).contiguous(memory_format=cl) for _ in range(8)]

past = torch.zeros(1, C, 2, H, W, device=dev, dtype=dt).contiguous(memory_format=cl)
ring = torch.zeros(1, C, 3, H, W, device=dev, dtype=dt).contiguous(memory_format=cl)
ring_ptr = ring.data_ptr()
out_cat, codes_cat = run_and_get_code(cat_c, past, frames[0], w)
# ring: slot of the newest frame moves 2, 0, 1, ...; taps rotated so the oldest frame meets tap 0
out_ring, codes_ring = run_and_get_code(ring_c, ring, frames[0], 2, rot[0])
slot_t = torch.tensor([2], device=dev)
_, codes_put = run_and_get_code(put_c, ring, frames[0], slot_t, stack)
_, codes_icopy = run_and_get_code(icopy_c, ring, frames[0], slot_t, stack)
print("ring still in place:", ring.data_ptr() == ring_ptr, "ring contiguous cl:", ring.is_contiguous(memory_format=cl))
for name, codes in (("cat", codes_cat), ("ring", codes_ring), ("put", codes_put), ("icopy", codes_icopy)):
    code = "\n".join(codes)
    kernels = [line.split("=")[0].strip() for line in code.splitlines() if "async_compile.triton(" in line]
    print(f"{name}: {len(kernels)} triton kernels: {kernels}")
    for line in code.splitlines():
        if any(k in line for k in ("copy_", "empty_strided", "extern_kernels", ".run(")) and "def " not in line:
            print("   ", line.strip()[:160])

# exactness of the ring against cat over 8 steps (fp32 sums differ in order only inside cuDNN)
past = torch.zeros(1, C, 2, H, W, device=dev, dtype=dt).contiguous(memory_format=cl)
ring.zero_()
ring2 = torch.zeros_like(ring)
diffs = []
for i, x in enumerate(frames):
    slot = (2 + i) % 3  # newest; oldest is slot+1, so taps roll by (slot + 1) % 3
    a, past = cat_c(past, x, w)
    b = ring_c(ring, x, slot, rot[(slot + 1) % 3])
    c = put_c(ring2, x, torch.tensor([slot], device=dev), stack)
    diffs.append(max((a.float() - o.float()).abs().max().item() / a.float().abs().max().item() for o in (b, c)))
print("ring and put vs cat, max rel diff per step:", [f"{d:.2e}" for d in diffs])


def timed(fn):
    return median_ms(fn, reps=40, warmup=5)


state = {"past": past, "i": 0}


def do_cat():
    _, state["past"] = cat_c(state["past"], frames[state["i"] % 8], w)
    state["i"] += 1


def do_ring():
    slot = (2 + state["i"]) % 3
    ring_c(ring, frames[state["i"] % 8], slot, rot[(slot + 1) % 3])
    state["i"] += 1


slots_t = [torch.tensor([s], device=dev) for s in range(3)]


def do_put():
    slot = (2 + state["i"]) % 3
    put_c(ring2, frames[state["i"] % 8], slots_t[slot], stack)
    state["i"] += 1


def do_icopy():
    slot = (2 + state["i"]) % 3
    icopy_c(ring2, frames[state["i"] % 8], slots_t[slot], stack)
    state["i"] += 1


conv_only = lambda: F.conv3d(ring, w, None, 1, (0, 1, 1))  # noqa: E731
print(f"C={C} {H}x{W}: per one-frame step ms  cat+clone {timed(do_cat):.3f}  ring {timed(do_ring):.3f}  "
      f"put {timed(do_put):.3f}  icopy {timed(do_icopy):.3f}  conv alone {timed(conv_only):.3f}")
print("recompiles (ring, 3 slots):", torch._dynamo.utils.counters["stats"]["unique_graphs"])
