"""FLOPs of one steady-state 8-latent (32-frame) chunk of the Wan2.2 VAE decoder at 704x1280, per
decode plan and per decoder stage, counted on the `meta` device (no memory, no GPU, seconds):

    PYTHONPATH=. python docs/benchmarks/vae_flops.py [--height 704 --width 1280]

Prints one JSON line per plan: total TFLOP and TFLOP per stage (`torch.utils.flop_counter`, which
counts a convolution's multiply-adds as 2 FLOPs; norms and activations are not counted). Divide a
measured seconds-per-chunk into the total for the achieved rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core.config import VAEConfig  # noqa: E402
from core.vae import PER_LATENT_PLAN, DecodePlan, StreamingDecoder, WanVAE  # noqa: E402

PLANS = {"old (per-latent)": PER_LATENT_PLAN, "new (cell, sub-pixel)": DecodePlan(),
         "new without sub-pixel": DecodePlan(subpixel_upsample=False)}


def chunk_flops(vae: WanVAE, plan: DecodePlan, latent_h: int, latent_w: int, latents: int = 8) -> dict:
    decoder = StreamingDecoder(vae, plan)
    z = torch.zeros(1, vae.config.z_dim, latents, latent_h, latent_w, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        decoder.decode(z)  # the first chunk (starts the video); the second is the steady state
        with FlopCounterMode(display=False, depth=3) as counter:
            frames = decoder.decode(z).shape[2]
    stages = {name.removeprefix("Decoder."): round(sum(c.values()) / 1e12, 2)
              for name, c in counter.get_flop_counts().items()
              if name.startswith("Decoder.") and name not in ("Decoder.middle", "Decoder.upsamples")
              and name.count(".") <= 2}
    total = counter.get_total_flops() / 1e12
    stages["rest (head)"] = round(total - sum(stages.values()), 2)
    return {"frames": frames, "tflop": round(total, 2), "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    with torch.device("meta"):
        vae = WanVAE(VAEConfig.preset("wan2.2")).to(torch.bfloat16).eval()
    for name, plan in PLANS.items():
        print(json.dumps({"plan": name, "height": args.height, "width": args.width,
                          **chunk_flops(vae, plan, args.height // 16, args.width // 16)}))


if __name__ == "__main__":
    main()
