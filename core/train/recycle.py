"""Error recycling (SVI-style) of LongLive 2.0 AR training, 1-D (timestep-bucketed) mode.

The model's own prediction errors are stored per 8-frame block in two CPU buffers and fed back
into later steps, so training sees inputs like the ones its rollouts produce at inference:

    latent error  e_x  = x0_hat - x0                 (added to x0 before noising, and to the
                                                      clean history)
    noise error   e_eps = (v_hat - v)(1 - sigma)     (added to eps: equals eps_hat - eps)

Buffers are keyed by timestep-index bucket `floor(index / (T / num_buckets))`. Under SP each rank
owns the buckets with `bucket mod sp_size == sp_rank`; adds to other buckets are dropped and
lookups go to the nearest owned bucket. Entries keep their source dtype. Every sampled error is
scaled by U(1 - modulate_factor, 1 + modulate_factor).

Per step: with prob `clean_prob` nothing is injected (the step "ran clean"); otherwise
independently, noise errors (prob `noise_inject_prob`) and latent errors (prob
`latent_inject_prob`) are added per block from the block's timestep bucket, and context errors
(prob `context_inject_prob`) per clean-history block from all owned buckets. After the step the
errors of every block are stored; after a clean step only with prob `clean_buffer_update_prob`.

Shapes: latents `[B, C, F, H, W]`; one buffer entry is a block `[C, frames_per_block, H, W]`;
`t_index [B, F]` holds integer grid indices. All random choices use the recycler's own CPU
generator (part of its state dict), so a resumed run continues the same sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from core.config import check_types, require
from core.errors import UserError

log = logging.getLogger(__name__)

REPLACEMENT_STRATEGIES = ("random", "fifo", "l2")
GatherFn = Callable[[Tensor], list[Tensor]]  # all-gather of one tensor: one entry per rank


@dataclass
class RecycleConfig:
    """`training.error_recycling` of the official AR configs (defaults = `configs/train_ar.yaml`)."""

    enabled: bool = True
    num_buckets: int = 50
    buffer_size_per_bucket: int = 500
    buffer_warmup_iter: int = 50
    context_inject_prob: float = 0.9
    latent_inject_prob: float = 0.9
    noise_inject_prob: float = 0.01
    clean_prob: float = 0.2
    clean_buffer_update_prob: float = 0.1
    modulate_factor: float = 0.3
    start_step: int = 0
    replacement_strategy: str = "random"
    num_train_timesteps: int = 1000

    def __post_init__(self):
        check_types(self)
        for name in ("context_inject_prob", "latent_inject_prob", "noise_inject_prob", "clean_prob",
                     "clean_buffer_update_prob"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0,
                    f"error_recycling.{name} = {value} is not a probability (use a value in [0, 1])")
        require(1 <= self.num_buckets <= self.num_train_timesteps,
                f"error_recycling.num_buckets = {self.num_buckets} must be in "
                f"[1, {self.num_train_timesteps}] (the official value is 50)")
        require(self.buffer_size_per_bucket >= 1, f"error_recycling.buffer_size_per_bucket = "
                f"{self.buffer_size_per_bucket} must be at least 1 (the official value is 500)")
        require(self.buffer_warmup_iter >= 0 and self.start_step >= 0,
                "error_recycling.buffer_warmup_iter and start_step must be >= 0 "
                f"(got {self.buffer_warmup_iter}, {self.start_step})")
        require(0.0 <= self.modulate_factor < 1.0, f"error_recycling.modulate_factor = {self.modulate_factor} "
                "must be in [0, 1) (the official value is 0.3)")
        require(self.replacement_strategy in REPLACEMENT_STRATEGIES,
                f"error_recycling.replacement_strategy = {self.replacement_strategy!r} is unknown "
                f"(use one of {', '.join(REPLACEMENT_STRATEGIES)})")


class ErrorBuckets:
    """One bucketed error buffer (the SP rank's owned timestep buckets only)."""

    def __init__(self, config: RecycleConfig, sp_rank: int, sp_size: int, generator: torch.Generator):
        self.config = config
        self.generator = generator
        self.bucket_width = config.num_train_timesteps / config.num_buckets
        self.owned = [b for b in range(config.num_buckets) if b % sp_size == sp_rank]
        self.entries: dict[int, list[Tensor]] = {b: [] for b in self.owned}
        # the owned bucket closest to each bucket (the higher one on a tie, as in the reference)
        self._nearest = [min(self.owned, key=lambda b, bucket=bucket: (abs(b - bucket), -b))
                         for bucket in range(config.num_buckets)]
        self.total_added = 0  # stored entries over the run (replacements included); 0 = never filled

    def bucket_of(self, t_index: int) -> int:
        return max(0, min(int(t_index / self.bucket_width), self.config.num_buckets - 1))

    def nearest_owned(self, bucket: int) -> int:
        """The owned bucket closest to `bucket` (the higher one on a tie, as in the reference)."""
        return self._nearest[bucket]

    def is_empty(self) -> bool:
        return self.total_added == 0

    def add(self, error: Tensor, t_index: int) -> None:
        bucket = self.bucket_of(t_index)
        if bucket not in self.entries:
            return  # another SP rank owns it
        entry = torch.empty(error.shape, dtype=error.dtype, device="cpu").copy_(error.detach())
        slots = self.entries[bucket]
        if len(slots) < self.config.buffer_size_per_bucket:
            slots.append(entry)
        elif self.config.replacement_strategy == "fifo":
            slots.pop(0)
            slots.append(entry)
        elif self.config.replacement_strategy == "l2":  # replace the most similar entry
            distances = (torch.stack(slots).float() - entry.float()).flatten(1).norm(dim=1)
            slots[int(distances.argmin())] = entry
        else:
            slots[self._randint(len(slots))] = entry
        self.total_added += 1

    def sample(self, t_index: int) -> Tensor | None:
        """A scaled entry of the (nearest owned) bucket of `t_index`; None when that bucket is empty."""
        return self._pick(self.entries[self.nearest_owned(self.bucket_of(t_index))])

    def all_entries(self) -> list[Tensor]:
        """Every stored entry of the owned buckets, bucket by bucket (the pool of `sample_any`)."""
        return [entry for bucket in self.owned for entry in self.entries[bucket]]

    def sample_any(self, pool: list[Tensor] | None = None) -> Tensor | None:
        """A scaled entry drawn uniformly over all owned buckets; None when all are empty.

        `pool` is `all_entries()` when the caller already has it (several draws between two adds)."""
        return self._pick(self.all_entries() if pool is None else pool)

    def _pick(self, candidates: list[Tensor]) -> Tensor | None:
        if not candidates:
            return None
        entry = candidates[self._randint(len(candidates))]
        if self.config.modulate_factor == 0:
            return entry
        low, high = 1.0 - self.config.modulate_factor, 1.0 + self.config.modulate_factor
        return entry * (low + (high - low) * self._uniform())

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (), generator=self.generator))

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def state_dict(self) -> dict:
        return {"entries": {b: list(self.entries[b]) for b in self.owned}, "total_added": self.total_added}

    def load_state_dict(self, state: dict) -> None:
        for bucket in self.owned:
            self.entries[bucket] = [entry.cpu() for entry in state["entries"].get(bucket, [])]
        self.total_added = int(state["total_added"])


class Injection(NamedTuple):
    """Inputs of one step after error injection, and what was done (for `update` and logs)."""

    x0: Tensor          # x0 to noise (latent errors added)
    noise: Tensor       # eps (noise errors added)
    clean: Tensor       # clean history (context errors added)
    ran_clean: bool     # the clean_prob switch fired: nothing injected
    latent_injected: bool
    noise_injected: bool
    context_injected: bool


class ErrorRecycler:
    """Latent and noise error buffers with the injection and update rules of LongLive 2.0."""

    def __init__(self, config: RecycleConfig, *, generator: torch.Generator, sp_rank: int = 0, sp_size: int = 1):
        assert 0 <= sp_rank < sp_size, (sp_rank, sp_size)
        if sp_size > config.num_buckets:
            raise ValueError(f"error_recycling.num_buckets = {config.num_buckets} is smaller than the SP size "
                             f"{sp_size} (use at least {sp_size} buckets)")
        self.config = config
        self.sp_rank = sp_rank
        self.sp_size = sp_size
        self.generator = generator
        self.latent = ErrorBuckets(config, sp_rank, sp_size, generator)
        self.noise = ErrorBuckets(config, sp_rank, sp_size, generator)

    def _chance(self, p: float) -> bool:
        return p > 0 and float(torch.rand((), generator=self.generator, dtype=torch.float64)) < p

    def inject(self, x0: Tensor, noise: Tensor, clean_history: Tensor, t_index: Tensor, frames_per_block: int,
               step: int | None = None) -> Injection:
        """Corrupt the step's inputs with stored errors (nothing before `start_step`)."""
        c = self.config
        unchanged = Injection(x0, noise, clean_history, False, False, False, False)
        if step is not None and step < c.start_step:
            return unchanged
        if self._chance(c.clean_prob):
            return unchanged._replace(ran_clean=True)
        block_index = t_index[:, ::frames_per_block].tolist()  # [B][F / frames_per_block]
        noise_injected = not self.noise.is_empty() and self._chance(c.noise_inject_prob)
        if noise_injected:
            noise = self._add_per_block(noise, frames_per_block, lambda b, k: self.noise.sample(int(block_index[b][k])))
        latent_injected = not self.latent.is_empty() and self._chance(c.latent_inject_prob)
        if latent_injected:
            x0 = self._add_per_block(x0, frames_per_block, lambda b, k: self.latent.sample(int(block_index[b][k])))
        context_injected = not self.latent.is_empty() and self._chance(c.context_inject_prob)
        if context_injected:
            pool = self.latent.all_entries()  # nothing is added while injecting: one pool for every block
            clean_history = self._add_per_block(clean_history, frames_per_block,
                                                lambda b, k: self.latent.sample_any(pool))
        return Injection(x0, noise, clean_history, False, latent_injected, noise_injected, context_injected)

    @staticmethod
    def _add_per_block(x: Tensor, frames_per_block: int, draw: Callable[[int, int], Tensor | None]) -> Tensor:
        out = x.clone()
        for b in range(x.shape[0]):
            for k in range(x.shape[2] // frames_per_block):
                error = draw(b, k)
                if error is not None:
                    block = out[b, :, k * frames_per_block:(k + 1) * frames_per_block]
                    block += error.to(device=x.device, dtype=x.dtype)
        return out

    def update(self, latent_error: Tensor, noise_error: Tensor, t_index: Tensor, ran_clean: bool, *,
               frames_per_block: int, step: int | None = None, gather_fn: GatherFn | None = None) -> None:
        """Store the step's per-block errors.

        During warm-up (`step <= buffer_warmup_iter`, as in the reference) and with a `gather_fn`
        (an all-gather over the world), every rank's errors are gathered first; the gather runs on
        every rank whatever the local random decision, so collectives stay in step. After a clean
        step the errors are kept only with prob `clean_buffer_update_prob`.
        """
        latent_errors, noise_errors, indices = [latent_error], [noise_error], [t_index]
        if gather_fn is not None and step is not None and step <= self.config.buffer_warmup_iter:
            latent_errors = gather_fn(latent_error.detach().contiguous())
            noise_errors = gather_fn(noise_error.detach().contiguous())
            indices = gather_fn(t_index.contiguous())
        if ran_clean and not self._chance(self.config.clean_buffer_update_prob):
            return
        block_indices = [index[:, ::frames_per_block].tolist() for index in indices]  # [B][F / frames_per_block]
        for buckets, errors in ((self.latent, latent_errors), (self.noise, noise_errors)):
            for error, block_index in zip(errors, block_indices, strict=True):
                error = error.detach().cpu()  # one copy to the host, not one per block
                for b in range(error.shape[0]):
                    for k in range(error.shape[2] // frames_per_block):
                        block = error[b, :, k * frames_per_block:(k + 1) * frames_per_block]
                        buckets.add(block, int(block_index[b][k]))

    def stats(self) -> dict[str, int]:
        return {"latent_entries": sum(len(v) for v in self.latent.entries.values()),
                "noise_entries": sum(len(v) for v in self.noise.entries.values()),
                "filled_buckets": sum(1 for v in self.latent.entries.values() if v),
                "total_added": self.latent.total_added}

    def state_dict(self) -> dict:
        """CPU tensors, ints, lists and dicts only (loadable with `torch.load(weights_only=True)`)."""
        return {"num_buckets": self.config.num_buckets, "sp_rank": self.sp_rank, "sp_size": self.sp_size,
                "latent": self.latent.state_dict(), "noise": self.noise.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_buckets"] != self.config.num_buckets:
            raise UserError(f"the saved error buffers use {state['num_buckets']} buckets, this run "
                            f"{self.config.num_buckets} (set error_recycling.num_buckets to "
                            f"{state['num_buckets']} or use --no-resume)")
        if (state["sp_rank"], state["sp_size"]) != (self.sp_rank, self.sp_size):
            log.warning("error buffers were saved by SP rank %d of %d, loaded on rank %d of %d: "
                        "only the buckets this rank owns are kept", state["sp_rank"], state["sp_size"],
                        self.sp_rank, self.sp_size)
        self.latent.load_state_dict(state["latent"])
        self.noise.load_state_dict(state["noise"])
        self.generator.set_state(state["generator"])
