"""Outputs beside results.json: a per-clip CSV, Markdown tables in the paper's Table 4 / Table 5
layout, plots (per-dimension bars; per-clip scores over time for long videos), and the
side-by-side comparison of several results files (`eval-vbench --compare`)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.checkpoint import atomic_write
from core.errors import UserError
from core.eval.vbench import DIMENSIONS, LONG_TABLE_DIMENSIONS

SHORT_NAMES = {
    "subject_consistency": "subj.", "background_consistency": "bg.", "temporal_flickering": "flicker",
    "motion_smoothness": "motion", "dynamic_degree": "dynamic", "aesthetic_quality": "aesth.",
    "imaging_quality": "imaging", "object_class": "object", "multiple_objects": "multi-obj.",
    "human_action": "action", "color": "color", "spatial_relationship": "spatial", "scene": "scene",
    "appearance_style": "app. style", "temporal_style": "temp. style", "overall_consistency": "overall",
}
CSV_COLUMNS = ("video", "dimension", "clip", "scene", "start", "end", "start_s", "end_s", "score")


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def clips_csv(results: dict) -> str:
    """One row per scored clip."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for video, entry in results["videos"].items():
        for dimension, scored in entry["dimensions"].items():
            for k, clip in enumerate(scored["clips"]):
                writer.writerow([video, dimension, k, clip["scene"], clip["start"], clip["end"],
                                 f"{clip['start_s']:.6f}", f"{clip['end_s']:.6f}", repr(clip["score"])])
    return out.getvalue()


def average_ranks(runs: Mapping[str, Mapping[str, float]], dimensions: Sequence[str]) -> dict[str, float]:
    """Table 5's Avg. Rank: per dimension rank the runs (1 = highest score, ties share the mean
    rank), then average each run's ranks."""
    ranks = {name: 0.0 for name in runs}
    for dimension in dimensions:
        values = sorted((scores[dimension] for scores in runs.values()), reverse=True)
        for name, scores in runs.items():
            first = values.index(scores[dimension]) + 1
            ties = values.count(scores[dimension])
            ranks[name] += first + (ties - 1) / 2
    return {name: total / len(dimensions) for name, total in ranks.items()}


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def markdown_tables(runs: Mapping[str, dict]) -> str:
    """Table 4 (Total / Quality / Semantic) when every run has all 16 dimensions, Table 5 (Avg. Rank and
    the six VBench-Long dimensions) when every run has those six, then every dimension present."""
    scores = {name: {d: v["score"] for d, v in r["dimensions"].items()} for name, r in runs.items()}
    parts = []
    if all(r["aggregate"] is not None for r in runs.values()):
        parts += ["VBench (Table 4 layout)", "", _row(["model", "Total", "Quality", "Semantic"]),
                  _row(["---"] * 4)]
        parts += [_row([name, *(_percent(r["aggregate"][k]) for k in ("total", "quality", "semantic"))])
                  for name, r in runs.items()]
        parts.append("")
    if all(set(LONG_TABLE_DIMENSIONS) <= set(s) for s in scores.values()):
        ranks = average_ranks(scores, LONG_TABLE_DIMENSIONS) if len(runs) > 1 else {n: None for n in runs}
        parts += ["VBench-Long (Table 5 layout)", "",
                  _row(["method", "rank", *(SHORT_NAMES[d] for d in LONG_TABLE_DIMENSIONS)]), _row(["---"] * 8)]
        parts += [_row([name, "–" if ranks[name] is None else f"{ranks[name]:.2f}",
                        *(_percent(scores[name][d]) for d in LONG_TABLE_DIMENSIONS)]) for name in runs]
        parts.append("")
    present = [d for d in DIMENSIONS if any(d in s for s in scores.values())]
    parts += ["All dimensions", "", _row(["run", *(SHORT_NAMES[d] for d in present)]),
              _row(["---"] * (1 + len(present)))]
    parts += [_row([name, *(_percent(s.get(d)) for d in present)]) for name, s in scores.items()]
    return "\n".join(parts) + "\n"


def comparison_rows(runs: Mapping[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for `--compare`: each dimension (and the aggregate), each run's score x100,
    and each later run's delta to the first."""
    names = list(runs)
    header = ["dimension", *names, *(f"Δ {n}" for n in names[1:])]
    keys = [d for d in DIMENSIONS if any(d in r["dimensions"] for r in runs.values())]
    rows = []
    for key in keys + ["quality", "semantic", "total"]:
        values = []
        for r in runs.values():
            if key in r["dimensions"]:
                values.append(r["dimensions"][key]["score"])
            elif key in ("quality", "semantic", "total") and r["aggregate"] is not None:
                values.append(r["aggregate"][key])
            else:
                values.append(None)
        if all(v is None for v in values):
            continue
        deltas = ["–" if v is None or values[0] is None else f"{100 * (v - values[0]):+.2f}" for v in values[1:]]
        rows.append([key, *(_percent(v) for v in values), *deltas])
    return header, rows


def load_results(paths: Sequence[str]) -> dict[str, dict]:
    """results.json files by a unique short name (the file stem, or its folder when stems repeat)."""
    runs = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"--compare {path}: file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"--compare {path}: not JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, dict) or not {"dimensions", "aggregate"} <= set(data):
            raise UserError(f"--compare {path}: not an eval-vbench results.json (no 'dimensions'/'aggregate')")
        name = path.stem if path.stem not in runs else f"{path.parent.name}/{path.stem}"
        runs[name] = data
    return runs


def write_plots(results: dict, stem: Path) -> list[Path]:
    """`<stem>_dimensions.png` (score x100 per dimension) and, in long mode, `<stem>_clips.png`
    (each clip's score against its start time, one line per video and panel per dimension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    dims = list(results["dimensions"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(dims) + 1), 3.2))
    ax.bar([SHORT_NAMES[d] for d in dims], [100 * results["dimensions"][d]["score"] for d in dims], color="#4a78b0")
    ax.set_ylabel("score (x100)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    written.append(_save(fig, stem.with_name(stem.name + "_dimensions.png")))
    if results["mode"] == "long":
        fig, axes = plt.subplots(len(dims), 1, figsize=(7, 2.2 * len(dims)), squeeze=False)
        for ax, dimension in zip(axes[:, 0], dims, strict=True):
            for video, entry in results["videos"].items():
                clips = entry["dimensions"][dimension]["clips"]
                ax.plot([c["start_s"] for c in clips], [c["score"] for c in clips], marker=".", label=video)
            ax.set_title(dimension, fontsize=9)
            ax.set_xlabel("clip start (s)")
        if len(results["videos"]) <= 8:
            axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, stem.with_name(stem.name + "_clips.png")))
    plt.close("all")
    return written


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=110))
    return path
