"""A frame strip of a shapes probe run: for each chosen prompt, the ground truth (the clip its caption
describes, `render_clip`) above the generated video, a few frames evenly spaced over the first shot.

    PYTHONPATH=. python docs/benchmarks/shapes_frame_strip.py R.json --out frames.png [--videos 6] [--frames 8]
    PYTHONPATH=. python docs/benchmarks/shapes_frame_strip.py --video demo.mp4 --prompt "a red ..." --out demo.png

R.json is `longlive eval-vbench --suite shapes ... --out R.json` (its videos lie in R_videos/).
The second form draws one video made by `longlive generate` (the README's demo) against its prompt.
Videos are chosen evenly over the prompt list, so seen and held-out prompts both appear; each row is
labelled with the prompt and what the probe read (shape / direction). Ground truth starts at the
renderer's default phase, so its position need not match the generated one: compare colour,
shape, size and motion, not the place.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def chosen(videos: dict, count: int) -> list[str]:
    """`count` names spread evenly from the first to the last (all of them if there are fewer)."""
    names = sorted(videos)
    if count >= len(names) or count == 1:
        return names[:count]
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


def strip_rows(result_path: Path, count: int, frames: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from core.eval.shapes import read_video

    result = json.loads(result_path.read_text())
    videos = result["parts"]["prompts"]["videos"]
    folder = result_path.with_name(result_path.stem + "_videos")
    rows = []
    for name in chosen(videos, count):
        shot = videos[name]["shots"][0]
        generated = read_video(folder / f"{name}.mp4")[shot["start"]:shot["end"]]
        rows.append(row(shot["prompt"], generated, shot["read"], shot["split"], frames))
    return rows


def row(prompt: str, generated: np.ndarray, read: dict, split: str, frames: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(label, truth frames side by side, generated frames side by side) for one shot."""
    from core.train.synthetic import parse_caption, render_clip

    truth = render_clip(parse_caption(prompt), len(generated), *generated.shape[1:3])
    picks = np.linspace(0, len(generated) - 1, frames).round().astype(int)
    label = f"{prompt}  [{split}; read: {read['shape']}, {read['direction']}]"
    return label, np.concatenate(list(truth[picks]), axis=1), np.concatenate(list(generated[picks]), axis=1)


def video_rows(video: Path, prompt: str, frames: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The row of one generated video, read by the probe against its prompt."""
    from core.eval.shapes import probe_video, read_video
    from core.train.synthetic import is_held_out, parse_caption

    generated = read_video(video)
    (shot,) = probe_video(generated, prompt)
    split = "held_out" if is_held_out(parse_caption(prompt)) else "seen"
    return [row(prompt, generated, shot["read"], split, frames)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, nargs="?", help="the probe's JSON (its videos in <stem>_videos/)")
    parser.add_argument("--video", type=Path, help="instead of a probe run: one generated video ...")
    parser.add_argument("--prompt", help="... and the prompt it was made from")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()
    if (args.result is None) == (args.video is None) or (args.video is None) != (args.prompt is None):
        print("error: give a probe's R.json, or --video and --prompt", file=sys.stderr)
        return 2
    if args.video is not None:
        from core.train.synthetic import parse_caption

        if not args.video.is_file():
            print(f"error: video {args.video} is missing: make it with `longlive generate PROMPT -o FILE`",
                  file=sys.stderr)
            return 2
        try:
            parse_caption(args.prompt)
        except ValueError as err:
            print(f"error: --prompt: {err}", file=sys.stderr)
            return 2
    else:
        videos = args.result.with_name(args.result.stem + "_videos")
        if not args.result.is_file() or not videos.is_dir():
            print(f"error: {args.result} or its videos folder {videos} is missing: give the --out JSON of "
                  f"`longlive eval-vbench --suite shapes`", file=sys.stderr)
            return 2

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.checkpoint import atomic_write

    rows = (video_rows(args.video, args.prompt, args.frames) if args.video is not None
            else strip_rows(args.result, args.videos, args.frames))
    height, width = rows[0][1].shape[:2]
    figure, axes = plt.subplots(2 * len(rows), 1, figsize=(width / 100, 2 * len(rows) * (height / 100 + 0.25)),
                                dpi=100, squeeze=False)
    for i, (label, truth, generated) in enumerate(rows):
        for j, (image, title) in enumerate(((truth, f"truth: {label}"), (generated, "generated"))):
            axis = axes[2 * i + j, 0]
            axis.imshow(image)
            axis.set_title(title, fontsize=7, loc="left")
            axis.axis("off")
    figure.tight_layout(pad=0.2)
    atomic_write(args.out, lambda temp: figure.savefig(temp, format="png"))
    print(f"wrote {args.out}: {len(rows)} prompt{'s' if len(rows) > 1 else ''} x {args.frames} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
