"""`loss.png`: the curves of a whole run (read back from metrics.jsonl, so across resumes).

One panel per loss, sharing the step axis: the raw values (thin, light) and a smoothed line (an
exponential moving average over ~1/15 of the run, bias-corrected so it starts at the first value),
the learning rate(s)
on a second axis of the top panel, a dotted line where the run was resumed. Matplotlib with the
Agg backend (no display needed); written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from core.checkpoint import atomic_write  # noqa: E402
from core.train.metrics import RESUMED, Curve  # noqa: E402

COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple")


def smoothing_weight(count: int) -> float:
    """EMA weight for `count` points: an effective span of ~1/15 of the run (>= 2 points)."""
    return 1.0 - 1.0 / max(2.0, count / 15)


def smoothed(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing); non-finite values are
    skipped (they stay NaN in the output)."""
    weight = smoothing_weight(len(values)) if weight is None else weight
    out, average, norm = [], 0.0, 0.0
    for value in values:
        if not math.isfinite(value):
            out.append(float("nan"))
            continue
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _draw_curve(axis, records, curve: Curve, colour: str) -> None:
    steps, values = _series(records, curve.key)
    if not steps:
        axis.text(0.5, 0.5, "no values yet", transform=axis.transAxes, ha="center", va="center")
    axis.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8, label=f"{curve.short} (raw)")
    axis.plot(steps, smoothed(values), color=colour, linewidth=1.8, label=f"{curve.short} (smoothed)")
    positive = [v for v in values if math.isfinite(v) and v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 30:
        axis.set_yscale("log")
    axis.set_ylabel(curve.label)
    axis.grid(True, alpha=0.3)


def _draw_learning_rates(axis, records, lr_keys: Sequence[str]) -> list:
    twin = axis.twinx()
    lines = []
    for index, key in enumerate(lr_keys):
        steps, values = _series(records, key)
        if steps:
            lines += twin.plot(steps, values, color=("grey", "black")[index % 2], linestyle=("--", ":")[index % 2],
                               linewidth=1.0, label=key.replace("_", " "))
    highest = max((v for line in lines for v in line.get_ydata()), default=0.0)
    twin.set_ylim(0.0, 1.25 * highest if highest > 0 else 1.0)  # from 0: a constant rate reads as one
    twin.set_ylabel("learning rate (per step)")
    return lines


def write_loss_plot(path: Path, records: Sequence[Mapping[str, Any]], curves: Sequence[Curve], title: str,
                    lr_keys: Sequence[str] = ("lr",)) -> Path:
    """Render the run's loss curves to a PNG at `path` (see the module doc)."""
    figure, axes = plt.subplots(len(curves), 1, sharex=True, squeeze=False,
                                figsize=(8, 2.2 + 2.3 * len(curves)), dpi=100)
    axes = axes[:, 0]
    for axis, curve, colour in zip(axes, curves, COLOURS, strict=False):
        _draw_curve(axis, records, curve, colour)
    lr_lines = _draw_learning_rates(axes[0], records, lr_keys)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].legend(handles + lr_lines, labels + [line.get_label() for line in lr_lines], loc="upper right",
                   fontsize=8)
    for axis in axes[1:]:
        axis.legend(loc="upper right", fontsize=8)
    resumes = [r["step"] for r in records if r.get(RESUMED)]
    for axis in axes:
        for step in resumes:
            axis.axvline(step - 0.5, color="black", linestyle=":", linewidth=1.0)
    steps = [r["step"] for r in records]
    span = f"steps {min(steps)}-{max(steps)}" if steps else "no steps yet"
    resumed = f", resumed {len(resumes)}x (dotted)" if resumes else ""
    axes[0].set_title(f"{title}\n{span}{resumed}", fontsize=10)
    axes[-1].set_xlabel("step (optimizer iterations)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    path = Path(path)
    atomic_write(path, lambda temp: Path(temp).write_bytes(buffer.getvalue()))
    return path
