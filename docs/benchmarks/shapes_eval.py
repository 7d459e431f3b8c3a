"""Probe a trained shapes-world generator (issue 11 "must show"), with no `generate` wiring needed:
the DiT (train_ar_shapes widths), the shapes VAE and the shipped tiny text encoder are loaded
directly, videos are generated in batches with `core.pipeline.generate_latents`, decoded, and read by
`core.eval.shapes`. Run from the repo root (GPU or CPU):
    python docs/benchmarks/shapes_eval.py --generator G.safetensors --vae V.safetensors --out DIR \
        [--steps 4,16] [--device cuda] [--long-seconds 60] [--workers 8]
Suites (stream of recipes/tiny.yaml: 8 latent frames per chunk, window 32, sink 8):
  prompts      the 48 evaluation prompts (24 seen, 24 held out), 3 chunks (93 frames, ~4 s) each
  multishot    8 fixed 3-shot lists with scene cuts, 2 chunks per shot
  interactive  the same lists with prompt switches (no cut)
  long         4 single-prompt videos of --long-seconds; first and last 10 s probed as two shots
Writes DIR/steps_S/{report.json, report.md} per suite and a few mp4s; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.assets import shapes_text_encoder_path  # noqa: E402
from core.checkpoint import build_generator  # noqa: E402
from core.config import VAEConfig, load_recipe  # noqa: E402
from core.decode import VideoWriter  # noqa: E402
from core.eval.shapes import (  # noqa: E402
    ProbeShot,
    evaluate_videos,
    evaluation_schedules,
    markdown_table,
    write_report,
)
from core.pipeline import generate_latents  # noqa: E402
from core.shots import PromptSchedule, chunk_start_frame, single_prompt_schedule  # noqa: E402
from core.text import ByteTokenizer, TextEncoder, TextEncoderConfig  # noqa: E402
from core.train.config import load_train_recipe  # noqa: E402
from core.train.synthetic import evaluation_prompts  # noqa: E402
from core.vae import load_vae  # noqa: E402

LATENT_SIZE = 8  # 128 / 16


class Models:
    def __init__(self, args):
        self.device, self.dtype = torch.device(args.device), getattr(torch, args.dtype)
        config = load_train_recipe("train_ar_shapes").model
        self.dit = build_generator(config, args.generator, device=self.device, dtype=self.dtype).eval()
        self.vae = load_vae(args.vae, VAEConfig.preset("shapes"), device=self.device, dtype=torch.float32)
        text_config = TextEncoderConfig.preset("tiny")
        self.text = TextEncoder.from_wan_checkpoint(shapes_text_encoder_path(), ByteTokenizer(text_config.text_len),
                                                    config=text_config, device=self.device)

    @torch.no_grad()
    def videos(self, schedules: list[PromptSchedule], stream, seed: int) -> list[np.ndarray]:
        """Generate one batch of schedules with identical chunk structure; uint8 [T, 128, 128, 3] each."""
        chunks = schedules[0].num_chunks
        contexts = [self.text.encode([s.chunk_prompts[c] for s in schedules]).to(self.dtype) for c in range(chunks)]
        g = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn(len(schedules), chunks * stream.frames_per_block, 48, LATENT_SIZE, LATENT_SIZE,
                            generator=g, device=self.device, dtype=self.dtype)
        latents = generate_latents(self.dit, noise, contexts, stream, schedules[0].scene_cuts)
        pixels = self.vae.decode(latents.permute(0, 2, 1, 3, 4).float())  # [B, 3, T, H, W]
        frames = ((pixels.clamp(-1, 1) * 0.5 + 0.5) * 255).to(torch.uint8).permute(0, 2, 3, 4, 1)
        return list(frames.cpu().numpy())


def suites(long_seconds: float) -> dict[str, tuple[list[PromptSchedule], list]]:
    """suite -> (schedules to generate, what to probe each video against)."""
    prompts = [p.caption for p in evaluation_prompts()]
    out = {"prompts": ([single_prompt_schedule(p, 3) for p in prompts], None)}
    out["multishot"] = (evaluation_schedules(8, transition="cut"), None)
    out["interactive"] = (evaluation_schedules(8, transition="continue"), None)
    long_chunks = max(3, round(long_seconds * 24 / 32))
    long_prompts = prompts[:2] + prompts[24:26]  # two seen, two held out
    total = chunk_start_frame(long_chunks, 8)
    window = min(240, total // 2)  # 10 s at 24 fps
    probes = [[ProbeShot(p, 0, window), ProbeShot(p, total - window, total)] for p in long_prompts]
    out["long"] = ([single_prompt_schedule(p, long_chunks) for p in long_prompts], probes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generator", required=True)
    parser.add_argument("--vae", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", default="4,16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--long-seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    models = Models(args)
    base = load_recipe("tiny").stream
    for steps in (int(s) for s in args.steps.split(",")):
        stream = type(base)(**{**base.__dict__, "sampling_steps": steps})
        out = Path(args.out) / f"steps_{steps}"
        out.mkdir(parents=True, exist_ok=True)
        for suite, (schedules, probes) in suites(args.long_seconds).items():
            started = time.perf_counter()
            videos = []
            for first in range(0, len(schedules), args.batch):
                videos += models.videos(schedules[first:first + args.batch], stream, seed=first)
            generated = time.perf_counter() - started
            report = evaluate_videos(videos, probes or schedules, workers=args.workers)
            report["setting"] = {"suite": suite, "steps": steps, "videos": len(videos),
                                 "frames": int(videos[0].shape[0]), "generate_seconds": generated}
            write_report(report, out / f"{suite}.json", out / f"{suite}.md")
            for i in range(min(3, len(videos))):
                with VideoWriter(out / f"{suite}_{i}.mp4", 128, 128, fps=24) as writer:
                    writer.write(videos[i])
            print(f"== steps {steps}, {suite}: {len(videos)} videos of {videos[0].shape[0]} frames, "
                  f"generated in {generated:.1f} s\n{markdown_table(report)}", flush=True)
        (out / "settings.json").write_text(json.dumps({"stream": stream.__dict__, **vars(args)}, indent=1))


if __name__ == "__main__":
    main()
