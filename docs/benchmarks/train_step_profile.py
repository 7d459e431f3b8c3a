"""Where a `train-ar` step spends its time: runs `longlive train-ar` unchanged, with each stage of a
step labelled (torch.profiler `record_function`) and steps `--at` .. `--at + --steps - 1` profiled
(CPU and, on a GPU, CUDA activity). Prints one JSON line per stage (self-contained: calls, host ms
and device ms per profiled step) and the profiler's top operators by device (else host) time.

Stages (nested: the whole `step` holds the others; `micro_step` holds vae_encode, text,
recycle_inject and dit_forward, and its remainder is the targets, the loss and the backward): data
(the next batch: rendered on the device or from the loader), recycle_update, ema. The step's
remainder is gradient clipping, AdamW and the logging.

    PYTHONPATH=. python docs/benchmarks/train_step_profile.py --at 6 --steps 3 -- \\
        train_ar_shapes --logdir /tmp/prof --max-steps 8 --set runtime.device=cuda --set runtime.dtype=bfloat16 \\
        --set data.synthetic=false --set data.synthetic_stream=true --set data.batch_size=64
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import core.train.ar as ar  # noqa: E402
import core.train.recycle as recycle  # noqa: E402
import core.train.state as state  # noqa: E402

STAGES = ("step", "data", "vae_encode", "text", "recycle_inject", "dit_forward", "micro_step",
          "recycle_update", "ema")


def labelled(owner, name: str, label: str) -> None:
    """Wrap `owner.name` so that every call is one `record_function(label)` range."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def label_stages() -> None:
    labelled(ar.TrainPlan, "encode", "vae_encode")
    labelled(ar.TrainPlan, "forward", "dit_forward")
    labelled(ar.PromptEncoder, "__call__", "text")
    labelled(recycle.ErrorRecycler, "inject", "recycle_inject")
    labelled(recycle.ErrorRecycler, "update", "recycle_update")
    labelled(state.EMA, "update", "ema")
    labelled(ar.Trainer, "micro_step", "micro_step")

    original_batches = ar.Trainer._batches

    def batches(self, *args, **kwargs):  # each `next` on the trainer's batch iterator is "data"
        inner = original_batches(self, *args, **kwargs)
        while True:
            with record_function("data"):
                item = next(inner)
            yield item

    ar.Trainer._batches = batches


def profile_steps(first: int, count: int, report: dict) -> None:
    original = ar.Trainer._step
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    holder: dict = {}

    def step(self, index, *args, **kwargs):
        number = index + 1  # the step number train-ar logs
        if number == first:
            holder["prof"] = profile(activities=activities)
            holder["prof"].__enter__()
        with record_function("step") if first <= number < first + count else contextlib.nullcontext():
            result = original(self, index, *args, **kwargs)
        if number == first + count - 1 and "prof" in holder:
            if cuda:
                torch.cuda.synchronize()
            holder["prof"].__exit__(None, None, None)
            report["events"] = holder.pop("prof").key_averages()
        return result

    ar.Trainer._step = step


def device_us(event) -> float:
    return float(getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0) or 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", type=int, default=6,
                        help="first profiled step, as train-ar numbers them (after the warm-up ones)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    parser.add_argument("train_ar_args", nargs=argparse.REMAINDER, help="-- then the train-ar arguments")
    args = parser.parse_args(argv)
    train_args = [a for a in args.train_ar_args if a != "--"]
    label_stages()
    report: dict = {}
    profile_steps(args.at, args.steps, report)
    from longlive_cli.app import main as cli

    code = cli(["train-ar", *train_args])
    if code != 0 or "events" not in report:
        print(f"train-ar exited {code} before step {args.at + args.steps - 1} was profiled", file=sys.stderr)
        return code or 1
    events = {e.key: e for e in report["events"]}
    for stage in STAGES:
        e = events.get(stage)
        if e is not None:
            print(json.dumps({"stage": stage, "calls": e.count,
                              "host_ms_per_step": round(e.cpu_time_total / 1e3 / args.steps, 3),
                              "device_ms_per_step": round(device_us(e) / 1e3 / args.steps, 3)}))
    ops = [e for e in report["events"] if e.key not in STAGES]
    by_device = any(device_us(e) > 0 for e in ops)
    ops.sort(key=lambda e: device_us(e) if by_device else e.self_cpu_time_total, reverse=True)
    print(f"top operators by {'device' if by_device else 'host self'} time, ms per step:")
    for e in ops[: args.top]:
        ms = (device_us(e) if by_device else e.self_cpu_time_total) / 1e3 / args.steps
        print(f"  {ms:9.3f}  x{e.count // args.steps:<6d} {e.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
