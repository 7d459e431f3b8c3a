"""The shapes probe on a VAE's reconstructions of the 48 evaluation clips: what a generator using
this VAE could score at best (a perfect generator's latents decoded by it).

    python docs/benchmarks/shapes_vae_probe.py VAE.safetensors [--frames 49]

Each evaluation prompt is rendered exactly (`core.train.synthetic.render_clip`), encoded and decoded
latent by latent as generation decodes (`core.train.autoencoder.autoencode`), and read by
`core.eval.shapes.probe_video`; the ground-truth clips are read too (they must score 100 %).
Prints one JSON line: per split, the percentage of prompts whose attribute reads right.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

from core.config import VAEConfig  # noqa: E402
from core.decode import to_uint8_frames  # noqa: E402
from core.eval.shapes import ATTRIBUTES, ProbeShot, balanced_prompts, probe_video  # noqa: E402
from core.train.autoencoder import autoencode, to_pixels  # noqa: E402
from core.train.synthetic import DEMO_SIZE, parse_caption, render_clip  # noqa: E402
from core.vae import load_vae  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae", help="a `longlive train-vae --export` file of the shapes VAE")
    parser.add_argument("--frames", type=int, default=49, help="frames per clip (1 + 4k)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    vae = load_vae(args.vae, VAEConfig.preset("shapes"), device="cpu", dtype=torch.float32).eval()
    hits: dict[str, dict[str, list[bool]]] = {}
    for prompt in balanced_prompts():
        clip = render_clip(parse_caption(prompt), args.frames, DEMO_SIZE, DEMO_SIZE)
        decoded, _, _ = autoencode(vae, to_pixels(clip)[None])
        frames = to_uint8_frames(decoded).numpy()  # as generation writes them
        shot = [ProbeShot(prompt=prompt, start=0, end=args.frames)]
        for source, video in (("ground_truth", clip), ("reconstructed", frames)):
            verdict = probe_video(video, shot)[0]
            split = hits.setdefault(f"{source}/{verdict['split']}", {a: [] for a in ATTRIBUTES})
            for name in ATTRIBUTES:
                split[name].append(verdict["correct"][name])
    print(json.dumps({key: {a: round(100 * float(np.mean(v)), 1) for a, v in split.items()}
                      for key, split in sorted(hits.items())}))


if __name__ == "__main__":
    main()
