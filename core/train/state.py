"""Training state that outlives a step: the EMA of the weights, RNG states, and checkpoints.

Checkpoint layout (`logdir/checkpoints/`):

    step_00000120/            a finished checkpoint (the only names `latest()` considers)
        .metadata, *.distcp   model + optimizer, torch.distributed.checkpoint (any sharding)
        extra_rank{r}.pt      per-rank state: RNG, error buffers, data position, EMA shard
        (other files)         written by rank 0 on request, e.g. distill's official `model.pt`
        COMPLETE              JSON {step, model_config, world_size, time}, written last
    .tmp-step_00000121/       being written (or left by a crash): never loaded

A checkpoint is written into `.tmp-step_X`, then (after a barrier, by rank 0) marked COMPLETE and
renamed, so a crash leaves either the old set or the new one, never a half-written `step_X`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from core.checkpoint import WRAPPER_TOKENS, atomic_write
from core.errors import WRITE_ERRNOS, UserError, first_line, os_error_of, write_failed

log = logging.getLogger(__name__)

def warmup_fraction(step: int, warmup_steps: int) -> float:
    """The share of the full lr at optimizer step `step` (0-based) of a linear warm-up."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


CHECKPOINT_NAME = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"


def deadline_clock(max_seconds: float | None, world_mean: Callable[[Tensor], Tensor],
                   device: torch.device) -> Callable[[], bool]:
    """`out_of_time()`: True once `max_seconds` have passed since this call on any rank, the same
    answer on every rank (`world_mean` over the ranks: ranks stopping at different steps would
    leave collectives waiting). No budget: never."""
    if max_seconds is None:
        return lambda: False
    deadline = time.monotonic() + max_seconds

    def out_of_time() -> bool:
        passed = torch.tensor(float(time.monotonic() >= deadline), device=device)
        return bool(world_mean(passed) > 0)

    return out_of_time


def bare_name(name: str) -> str:
    """A parameter name without wrapper tokens (checkpointing, compile): the EMA's keys."""
    for token in WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def local_tensor(p: Tensor) -> Tensor:
    """This rank's shard of a (possibly FSDP2/DTensor) parameter."""
    return p.to_local() if isinstance(p, DTensor) else p


class EMA:
    """Exponential moving average of the parameters: an fp32 shadow, on the CPU by default.

    `update(model, step)` does nothing before `start_step`; at the first call from `start_step`
    on, the shadow starts as a copy of the weights (then `shadow = d shadow + (1 - d) p` every
    call). `on_device` keeps the shadow beside each parameter (on its GPU) instead: for a model
    whose fp32 copy fits there, it saves a host round trip and host arithmetic per step, which
    the trainer's data workers slow down. Under FSDP2 each rank keeps the shadow of its own
    parameter shards, so the per-rank state dict goes into that rank's extra file; the state dict
    always holds CPU tensors.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, start_step: int = 100, on_device: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1) (the official value is 0.99)")
        self.decay = decay
        self.start_step = start_step
        self.on_device = on_device
        self.shadow: dict[str, Tensor] | None = None
        self._names = [bare_name(n) for n, _ in model.named_parameters()]

    def _home(self, p: Tensor) -> torch.device:
        return p.device if self.on_device else torch.device("cpu")

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step < self.start_step:
            return
        params = {bare_name(n): local_tensor(p).detach() for n, p in model.named_parameters()}
        # to the shadow's device first, then to fp32: a bf16 parameter crosses the bus at half the size
        if self.shadow is None:
            self.shadow = {n: p.to(self._home(p)).float().clone() for n, p in params.items()}
            return
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        # a frozen weight is its own average (d x + (1 - d) x drifts by ulps)
        names = [bare_name(n) for n in trained]
        for n in names:  # a shadow restored from a checkpoint moves to its home once
            home = self._home(params[n])
            if self.shadow[n].device != home:
                self.shadow[n] = self.shadow[n].to(home)
        shadows = [self.shadow[n] for n in names]
        live = [params[n].to(self._home(params[n])).float() for n in names]
        torch._foreach_mul_(shadows, self.decay)
        torch._foreach_add_(shadows, live, alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow into the model's parameters (in their dtype and device)."""
        assert self.shadow is not None, "EMA has no shadow yet (step < start_step)"
        for name, p in model.named_parameters():
            local_tensor(p).copy_(self.shadow[bare_name(name)])

    def state_dict(self) -> dict[str, Any]:
        shadow = None if self.shadow is None else {k: v.cpu() for k, v in self.shadow.items()}
        return {"decay": self.decay, "start_step": self.start_step, "shadow": shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if shadow is not None and sorted(shadow) != sorted(self._names):
            missing = sorted(set(self._names) - set(shadow))
            raise UserError(f"the saved EMA does not match the model ({len(missing)} parameters missing, "
                            f"e.g. {missing[:1]}) (use --no-resume or another --logdir)")
        self.shadow = None if shadow is None else {k: v.float().cpu() for k, v in shadow.items()}


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU, CUDA), Python and NumPy as tensors/ints/lists (weights_only-safe)."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group; one process is an intended mode here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON stores it (tuples become lists), so stored and live configs compare equal."""
    return json.loads(json.dumps(config))


Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


def _refused_write(err: BaseException) -> OSError | None:
    """The operating system's refusal behind a failed checkpoint write (disk full, read-only), if
    that is what it was: DCP gathers each rank's error into a CheckpointException."""
    failures = getattr(err, "failures", None)
    errors = [failure[0] if isinstance(failure, tuple) else failure for failure in failures.values()] \
        if isinstance(failures, dict) else [err]
    for error in errors:
        cause = os_error_of(error) if isinstance(error, BaseException) else None
        if cause is not None and cause.errno in WRITE_ERRNOS:
            return cause
    return None


class CheckpointManager:
    """Writes, finds, loads and prunes checkpoints under `logdir/checkpoints` (see the module doc).

    Every rank calls `save` and `load` (they are collective when a process group exists).
    `trainable_only`: the model part holds the parameters that train (frozen ones come back from
    their own files, e.g. a LoRA run's base weights). Several optimizers of one model may be given.
    """

    def __init__(self, logdir: str | os.PathLike, keep: int = 20, *, trainable_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep = {keep} checkpoints: keep at least 1")
        self.root = Path(logdir) / "checkpoints"
        self.keep = keep
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save(self, step: int, model: nn.Module, optimizer: Optimizers,
             model_config: dict[str, Any], extra: dict[str, Any] | None = None,
             files: Mapping[str, Callable[[str], None]] | None = None) -> Path:
        """Write model + optimizer (DCP), this rank's `extra` state and, on rank 0, each of `files`
        (`name -> write(temp_path)`, e.g. an export in another layout); returns the final directory.
        A write the operating system refuses (disk full, read-only) is an `OutputError` naming the
        checkpoint; the partial folder is removed and the earlier checkpoints are kept."""
        final = self.path(step)
        tmp = self.root / f".tmp-{final.name}"
        try:
            self._write(tmp, final, step, model, optimizer, model_config, extra, files)
        except BaseException as err:  # DCP's CheckpointException is a BaseException
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # never masks the error being raised
            cause = _refused_write(err)
            if cause is not None:
                raise write_failed(final, cause) from None
            raise
        _barrier()
        return final

    def _write(self, tmp: Path, final: Path, step: int, model: nn.Module, optimizer: Optimizers,
               model_config: dict[str, Any], extra: dict[str, Any] | None,
               files: Mapping[str, Callable[[str], None]] | None) -> None:
        rank = _rank()
        if rank == 0:
            if tmp.exists():  # a crashed earlier attempt at this step
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        with _single_process_quiet():
            dcp.save(self._app_state(model, optimizer), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        atomic_write(tmp / f"extra_rank{rank}.pt", lambda temp: torch.save(extra or {}, temp))
        if rank == 0:
            for name, write in (files or {}).items():
                atomic_write(tmp / name, write)
        _barrier()
        if rank == 0:
            marker = {"step": step, "model_config": _jsonable(model_config), "world_size": _world_size(),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / COMPLETE).write_text(json.dumps(marker, indent=1))
            if final.exists():  # saving the same step again (a resumed run): the new one wins
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.prune()

    def latest(self) -> Path | None:
        """The newest `step_XXXXXXXX` directory with a COMPLETE marker, or None."""
        complete = self._complete()
        return complete[-1] if complete else None

    def prune(self) -> None:
        """Keep the `keep` newest complete checkpoints; remove older ones and stale `.tmp-*` dirs."""
        for old in self._complete()[:-self.keep]:
            shutil.rmtree(old)
        for stale in self.root.glob(".tmp-*"):
            try:
                shutil.rmtree(stale)
            except OSError as err:  # leftover of a crashed save: not worth stopping the run for
                log.warning("could not remove the stale checkpoint folder %s (%s)", stale, first_line(err))

    def info(self, path: Path) -> dict[str, Any]:
        """The COMPLETE marker of a checkpoint directory."""
        return json.loads((path / COMPLETE).read_text())

    def check_compatible(self, model_config: dict[str, Any], path: Path | None = None) -> None:
        """Raise UserError when the checkpoint (default: latest) was written for another model config."""
        path = path if path is not None else self.latest()
        if path is None:
            return
        stored, live = self.info(path)["model_config"], _jsonable(model_config)
        for key in sorted(set(stored) | set(live)):
            a, b = stored.get(key, "<missing>"), live.get(key, "<missing>")
            if a != b:
                raise UserError(f"checkpoint in {path} was written for a different model ({key}: {a} vs {b}); "
                                "use --no-resume or another --logdir")

    def load(self, path: Path, model: nn.Module, optimizer: Optimizers = None) -> dict[str, Any]:
        """Load model (+ optimizer) in place; returns this rank's extra state."""
        state = self._app_state(model, optimizer)
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer if optimizer is not None else [],
                       model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
                       options=self.options)
        extra_file = path / f"extra_rank{_rank()}.pt"
        if not extra_file.exists():
            raise UserError(f"checkpoint in {path} has no state for rank {_rank()} (it was written by "
                            f"{self.info(path)['world_size']} ranks; resume with as many, or use --no-resume)")
        return torch.load(extra_file, weights_only=True)

    def _app_state(self, model: nn.Module, optimizer: Optimizers) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [],
                                                  options=self.options)
        state: dict[str, Any] = {"model": model_state}
        if optimizer is not None:
            state["optim"] = optim_state
        return state

    def _complete(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and CHECKPOINT_NAME.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))
