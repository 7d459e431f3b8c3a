"""Does a shapes-world generator continue its history? (docs/models/shapes.md, section 5f)

For a few captions, two ground-truth clips that differ only in where the shape starts are encoded;
the generator (teacher forcing, as in training) estimates x0 of chunk 1 at high noise with the
true clean history and with the other clip's history. Prints one JSON line per sigma:

- `mse_true_history` / `mse_moved_history`: chunk 1's x0 estimate against the truth;
- `history_sensitivity` = |x0_hat(true) - x0_hat(moved)|^2 / |true - moved|^2 over chunk 1: near 1
  for a model that carries the shape on from its history, 0 for one that ignores the history.

    PYTHONPATH=. python docs/benchmarks/shapes_history_probe.py DIT.safetensors [--vae VAE.safetensors]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

CAPTIONS = ("a red circle moves left to right on a blue background",
            "a yellow square moves top to bottom on a purple background",
            "a white triangle moves right to left on a green background",
            "a green circle moves bottom to top on an orange background")


def history_response(predict_x0: Callable[[Tensor], Tensor], truth: Tensor, moved: Tensor,
                     frames: slice) -> dict[str, float]:
    """`predict_x0(history)`: the x0 estimate `[B, C, F, H, W]` given a clean history of the same
    shape; `truth` / `moved`: two histories (the first is also the target), compared on `frames`."""
    with_truth, with_moved = predict_x0(truth), predict_x0(moved)
    change = (truth - moved)[:, :, frames].pow(2).mean()
    return {"mse_true_history": float((with_truth - truth)[:, :, frames].pow(2).mean()),
            "mse_moved_history": float((with_moved - truth)[:, :, frames].pow(2).mean()),
            "history_sensitivity": float((with_truth - with_moved)[:, :, frames].pow(2).mean() / change)}


def x0_estimate(dit, noisy: Tensor, t: Tensor, context: Tensor, sigma: float, frames_per_block: int,
                history: Tensor) -> Tensor:
    """x0 = x_sigma - sigma * v of the teacher-forced forward with `history` as the clean half."""
    return noisy - sigma * dit(noisy, t, context, frames_per_block=frames_per_block, clean_x=history)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dit", help="the generator (a shapes-preset export)")
    parser.add_argument("--vae", default="core/assets/shapes/vae.safetensors")
    parser.add_argument("--sigmas", default="0.5,0.95,0.99")
    args = parser.parse_args(argv)

    from core.config import ModelConfig, raw_frames
    from core.train.ar import PromptEncoder, build_vae
    from core.train.config import load_train_recipe
    from core.train.synthetic import parse_caption, render_clip
    from longlive_cli.build import DiTSpec, build_dit

    device = torch.device("cpu")
    recipe = load_train_recipe("train_ar_shapes", [f"data.vae_path={args.vae}"])
    d = recipe.data
    vae = build_vae(recipe, device, torch.float32)
    dit = build_dit(DiTSpec(ModelConfig.preset("shapes"), device, torch.float32, checkpoint=args.dit)).model
    text = PromptEncoder(recipe, device, torch.float32)
    fpb = recipe.train.frames_per_block
    frames = raw_frames(d.latent_frames)

    def clip(caption: str, offset: float) -> Tensor:
        pixels = render_clip(parse_caption(caption), frames, d.height, d.width, offset=offset)
        return vae.encode(torch.from_numpy(pixels).permute(3, 0, 1, 2).float()[None] / 127.5 - 1)

    for sigma in (float(s) for s in args.sigmas.split(",")):
        rows = []
        with torch.no_grad():
            for caption in CAPTIONS:
                truth, moved = clip(caption, 0.3), clip(caption, 0.8)
                noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
                noisy = (1 - sigma) * truth + sigma * noise
                t = torch.full(truth.shape[:1] + truth.shape[2:3], sigma * 1000.0)
                context = text([caption])

                predict_x0 = functools.partial(x0_estimate, dit, noisy, t, context, sigma, fpb)
                rows.append(history_response(predict_x0, truth, moved, slice(fpb, 2 * fpb)))
        print(json.dumps({"sigma": sigma, **{k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
