"""DMD distillation of the AR generator into a LoRA (reference-systems.md §6), the loop around the
numerical pieces of `core/train/dmd.py`.

One iteration, step s (the official `trainer/distillation.py` order):
    generator step, when s % dfake_gen_update_ratio == 0 (step 0 included):
        rollout with grad -> score timestep and noise -> G from the teacher (CFG with the negative
        prompt) and the critic -> 0.5 mse(x, sg(x - G)) -> backward into the generator's LoRA
    critic step, every iteration, on a rollout of its own (no grad):
        score timestep and noise -> the critic's flow loss on the generated clip -> backward
    then each network's gradients clipped (10) and its AdamW step; a checkpoint every
    `checkpoint_every` steps and at the end.

Draws, per rollout: rollout noise and recache noise N(0, 1); the exit step U{0..steps-1} shared by
all chunks (drawn on rank 0 and broadcast, as the reference); per score evaluation: `raw_t`
U{0..999} (one per sample in T2V, one per block in I2V), then the score noise N(0, 1). Everything
but the exit step comes from this rank's generator, seeded `seed + rank` (the reference seeds
`seed + rank` too), so a resumed run repeats the uninterrupted one exactly (deterministic mode).

The networks come ready from outside (`longlive_cli/` builds them with `build_dit` and prepares
them with `parallelize_network`: NVFP4 swap, LoRA, checkpointing, FSDP2).

Legend: B batch, F latent frames, C latent channels, H/W latent size, K chunks (one prompt each).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.errors import UserError
from core.runtime import resolve_dtype
from core.train.ar import PromptEncoder, TrainPlan, build_vae, dataset_root
from core.train.distill_config import DistillRecipe
from core.train.dmd import add_noise, critic_loss, dmd_gradient, generator_loss, rollout, score_timesteps
from core.train.lora import lora_state_dict
from core.train.metrics import Curve, MetricsLog, RunEvents
from core.train.state import CheckpointManager, deadline_clock, rng_state, set_rng_state

log = logging.getLogger("longlive.train")

LOSS_CURVES = (
    Curve("critic_loss", "critic", "critic flow loss\n(MSE, latent units²)"),
    Curve("generator_loss", "dmd", "DMD generator loss\n(0.5 mean G², dimensionless)"),
)
PROGRESS_FIELDS = (LOSS_CURVES[0], Curve("critic_grad_norm", "|g_c|", "critic gradient norm"),
                   LOSS_CURVES[1], Curve("generator_grad_norm", "|g_g|", "generator gradient norm"))
LR_KEYS = ("lr", "critic_lr")
OFFICIAL_FILE = "model.pt"  # in every checkpoint: {"generator_lora", "critic_lora", "step"}


@dataclass
class Networks:
    """The three networks, built and parallelized (`longlive_cli/parallelize.py`)."""

    generator: nn.Module  # frozen base + LoRA
    real_score: nn.Module  # frozen teacher
    fake_score: nn.Module  # critic: frozen base + LoRA, or trained in full


class TrainedState(nn.Module):
    """What a checkpoint holds of the networks: their trainable parameters (under these names)."""

    def __init__(self, networks: Networks):
        super().__init__()
        self.generator = networks.generator
        self.fake_score = networks.fake_score


@dataclass
class DistillOptions:
    logdir: Path
    max_steps: int | None = None  # overrides train.max_steps
    resume: bool = True
    recipe_name: str = ""  # for the plot's title
    max_seconds: float | None = None  # wall-clock budget of the loop: stop (checkpoint, export) past it


@dataclass
class DistillResult:
    steps_run: int
    final_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    generator_lora: dict[str, Tensor] | None = None  # official keys, full, on rank 0
    resumed_from: int | None = None


@dataclass(frozen=True)
class Conditioning:
    """One batch as the networks see it."""

    chunk_contexts: list[Tensor]  # K x [B, T, D]
    negative: Tensor  # [B, T, D]
    scene_cuts: list[bool] | None  # per chunk, from sample 0's prompts (the reference's rule)
    image: Tensor | None = None  # I2V: the first latent [B, 1, C, H, W]

    @property
    def batch(self) -> int:
        return self.negative.shape[0]


class DistillTrainer:
    """The distillation loop (see the module doc)."""

    def __init__(self, recipe: DistillRecipe, options: DistillOptions, plan: TrainPlan,
                 build_networks: Callable[[], Networks], events: RunEvents | None = None):
        self.recipe, self.options, self.plan = recipe, options, plan
        self.build_networks = build_networks
        self.events = events or RunEvents()
        self.device = plan.device
        self.dtype = resolve_dtype(recipe.runtime.dtype, self.device)
        self.max_steps = options.max_steps if options.max_steps is not None else recipe.train.max_steps
        self.fpb = recipe.stream.frames_per_block
        self.logdir = Path(options.logdir)

    # -- setup ------------------------------------------------------------------------------------

    def _seed(self) -> None:
        seed = self.recipe.runtime.seed
        random.seed(seed + self.plan.rank)
        torch.manual_seed(seed + self.plan.rank)
        if self.recipe.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.generator = torch.Generator(device=self.device).manual_seed(seed + self.plan.rank)
        self.exit_generator = torch.Generator().manual_seed(seed)  # rank 0's draws count

    def _data(self):
        from core.train.data import ShardedSampler

        d = self.recipe.data
        if d.i2v:
            from core.train.data import VideoClipDataset

            root = dataset_root(self.recipe, self.logdir, self.plan)
            dataset = VideoClipDataset(root, d.latent_frames, d.height, d.width, frames_per_block=self.fpb,
                                       max_chunks_per_shot=d.chunks_per_shot or None, seed=self.recipe.runtime.seed)
        else:
            from core.train.prompts import PromptDataset

            dataset = PromptDataset(None if d.synthetic else d.path, self.recipe.num_chunks,
                                    chunks_per_shot=d.chunks_per_shot, scene_cut_prefix=d.scene_cut_prefix,
                                    seed=self.recipe.runtime.seed)
        if len(dataset) < self.plan.dp_size:
            raise UserError(f"the data has {len(dataset)} samples, fewer than the {self.plan.dp_size} processes: "
                            f"add prompts or use fewer GPUs")
        return dataset, ShardedSampler(len(dataset), self.plan.dp_rank, self.plan.dp_size, self.recipe.runtime.seed)

    def _batches(self, dataset, sampler) -> Iterator[list[Any]]:
        """Batches of `data.batch_size` items in the sampler's order, across epochs."""
        while True:
            items = []
            while len(items) < self.recipe.data.batch_size:
                dataset.set_epoch(sampler.epoch)
                index = next(iter(sampler))
                sampler.advance(1)
                items.append(dataset[index])
            yield items

    def optimizers(self, nets: Networks) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """AdamW over the generator's and over the critic's trainable parameters."""
        o = self.recipe.optim

        def adamw(model: nn.Module, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
            params = [p for p in model.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=o.weight_decay)

        return (adamw(nets.generator, o.lr, (o.beta1, o.beta2)),
                adamw(nets.fake_score, o.critic_lr, (o.critic_beta1, o.critic_beta2)))

    # -- inputs -----------------------------------------------------------------------------------

    def _conditioning(self, items: list[Any]) -> Conditioning:
        """Prompt contexts (sample-major, one per chunk), the negative context, the scene cuts and,
        for I2V, the first latent of each sample's video."""
        d, stream = self.recipe.data, self.recipe.stream
        prompts = [item.prompts if d.i2v else item for item in items]
        batch, chunks = len(prompts), self.recipe.num_chunks
        contexts = self.prompts([p for sample in prompts for p in sample])
        contexts = contexts.reshape(batch, chunks, *contexts.shape[1:])
        negative = self.negative.expand(batch, *self.negative.shape[1:])
        cuts = None
        if stream.multi_shot_sink or stream.shot_rope_offset != 0:
            cuts = [p.startswith(d.scene_cut_prefix) for p in prompts[0]]
        image = None
        if d.i2v:
            video = torch.stack([item.video[:, :1] for item in items]).to(self.device, self.dtype)
            with torch.no_grad():
                image = self.vae.encode(video).transpose(1, 2).to(self.dtype)  # [B, 1, C, H, W]
        return Conditioning([contexts[:, k] for k in range(chunks)], negative, cuts, image)

    def _randn(self, shape, dtype: torch.dtype) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=torch.float32).to(dtype)

    def _exit_step(self) -> int:
        fixed = self.recipe.dmd.exit_step
        if fixed is not None:
            return fixed
        drawn = int(torch.randint(0, self.recipe.stream.sampling_steps, (1,), generator=self.exit_generator))
        return self.plan.broadcast_int(drawn)

    def _rollout(self, generator: nn.Module, cond: Conditioning) -> tuple[Tensor, int]:
        """The generator's clip `[B, F, C, H, W]` (differentiable when grad is enabled)."""
        d, config = self.recipe.data, self.recipe.model
        shape = (cond.batch, d.latent_frames, config.in_channels, d.height // 16, d.width // 16)
        dtype = generator.dtype
        noise, recache = self._randn(shape, dtype), self._randn(shape, dtype)
        exit_step = self._exit_step()
        image = None if cond.image is None else cond.image.to(dtype)
        x = rollout(generator, noise, [c.to(dtype) for c in cond.chunk_contexts], self.recipe.stream, exit_step,
                    cond.scene_cuts, recache_noise=recache, image_latent=image)
        return x, exit_step

    def _score_inputs(self, x: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor, Tensor]:
        """Score timesteps `[B, F]`, noise and the noised clip (I2V: frame 0 stays the image, t 0)."""
        stream = self.recipe.stream
        batch, frames = x.shape[:2]
        per_block = cond.image is not None  # T2V: one timestep per sample; I2V: one per block
        draws = frames // self.fpb if per_block else 1
        raw_t = torch.randint(0, stream.num_train_timesteps, (batch, draws), generator=self.generator,
                              device=self.device)
        draw_shift = self.recipe.dmd.score_timestep_shift
        t = score_timesteps(raw_t.repeat_interleave(frames // draws, dim=1),
                            shift=stream.timestep_shift if draw_shift is None else draw_shift,
                            num_train_timesteps=stream.num_train_timesteps)
        noise = self._randn(x.shape, x.dtype)
        if cond.image is not None:
            t[:, 0] = 0.0
            noise[:, 0] = 0.0
        noisy = add_noise(x, noise, t, shift=stream.timestep_shift)
        if cond.image is not None:
            noisy = torch.cat([cond.image.to(noisy.dtype), noisy[:, 1:]], dim=1)
        return t, noise, noisy

    @staticmethod
    def _loss_mask(x: Tensor, cond: Conditioning) -> Tensor | None:
        if cond.image is None:
            return None
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[:, 0] = False  # the image frame is given, not generated
        return mask

    # -- one iteration ------------------------------------------------------------------------------

    def _autocast(self):
        enabled = self.device.type == "cuda" and not self.plan.uses_fsdp and self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def generator_step(self, nets: Networks, cond: Conditioning) -> dict[str, Tensor]:
        """Rollout with grad, the DMD gradient, backward into the generator; returns detached logs."""
        r, dmd = self.recipe, self.recipe.dmd
        with self._autocast():
            x, exit_step = self._rollout(nets.generator, cond)
            t, _, noisy = self._score_inputs(x.detach(), cond)
            contexts = [c.to(x.dtype) for c in cond.chunk_contexts]
            G = dmd_gradient(x.detach(), noisy, t, nets.real_score, nets.fake_score, contexts,
                             cond.negative.to(x.dtype), frames_per_block=self.fpb,
                             real_guidance_scale=dmd.real_guidance_scale, fake_guidance_scale=dmd.fake_guidance_scale,
                             shift=r.stream.timestep_shift)
        loss = generator_loss(x, G, mask=self._loss_mask(x, cond))
        loss.backward()
        return {"generator_loss": loss.detach(), "dmd_gradient_norm": G.abs().float().mean(),
                "generator_exit_step": torch.tensor(float(exit_step))}

    def critic_step(self, nets: Networks, cond: Conditioning) -> dict[str, Tensor]:
        """A fresh rollout without grad, the critic's flow loss on it, backward into the critic."""
        with self._autocast():
            with torch.no_grad():
                x, exit_step = self._rollout(nets.generator, cond)
            t, noise, noisy = self._score_inputs(x, cond)
            loss = critic_loss(nets.fake_score, x, noisy, t, noise, [c.to(x.dtype) for c in cond.chunk_contexts],
                               frames_per_block=self.fpb, shift=self.recipe.stream.timestep_shift,
                               mask=self._loss_mask(x, cond))
        loss.backward()
        return {"critic_loss": loss.detach(), "critic_exit_step": torch.tensor(float(exit_step))}

    def _update(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip: float) -> float:
        self.plan.sync_gradients(model)
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def iteration(self, step: int, nets: Networks, optimizers, items: list[Any]) -> dict[str, Any]:
        """Iteration `step` (0-based) on one batch of data items: its metrics.jsonl record."""
        o = self.recipe.optim
        gen_optimizer, critic_optimizer = optimizers
        started = time.perf_counter()
        train_generator = step % o.dfake_gen_update_ratio == 0
        if train_generator:
            gen_optimizer.zero_grad(set_to_none=True)
        critic_optimizer.zero_grad(set_to_none=True)
        cond = self._conditioning(items)
        logs = self.generator_step(nets, cond) if train_generator else {}
        logs |= self.critic_step(nets, cond)
        record: dict[str, Any] = {"step": step + 1}
        if train_generator:
            record["generator_grad_norm"] = self._update(nets.generator, gen_optimizer, o.grad_clip)
        record["critic_grad_norm"] = self._update(nets.fake_score, critic_optimizer, o.critic_grad_clip)
        for key, value in logs.items():  # losses averaged over the ranks; exit steps are shared
            record[key] = float(self.plan.world_mean(value.float()))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        record |= {"lr": o.lr, "critic_lr": o.critic_lr, "step_seconds": time.perf_counter() - started}
        return record

    # -- the loop -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Seeds, the text encoder with the negative prompt's context, the VAE (I2V): all an
        `iteration` needs besides the networks."""
        self._seed()
        self.prompts = PromptEncoder(self.recipe, self.device, self.dtype)
        self.negative = self.prompts([self.recipe.data.negative_prompt or ""])
        self.vae = build_vae(self.recipe, self.device, self.dtype) if self.recipe.data.i2v else None

    def run(self) -> DistillResult:
        """Distill to `max_steps` from the newest complete checkpoint (or from the start)."""
        self.start()
        dataset, sampler = self._data()
        nets = self.build_networks()
        optimizers = self.optimizers(nets)
        manager = CheckpointManager(self.logdir, keep=self.recipe.train.keep_checkpoints, trainable_only=True)
        state = TrainedState(nets)
        resumed = self._restore(manager, state, optimizers, sampler) if self.options.resume else None
        start = resumed or 0
        metrics = MetricsLog(self.logdir, self.recipe.train.log_every)
        if self.plan.is_main:
            metrics.start(start)
        self.events.started(start, self.max_steps, self.recipe.train.log_every)
        history, batches = [], self._batches(dataset, sampler)
        out_of_time = deadline_clock(self.options.max_seconds, self.plan.world_mean, self.device)
        for step in range(start, self.max_steps):
            record = self.iteration(step, nets, optimizers, next(batches))
            history.append(record)
            if self.plan.is_main:
                metrics.append(record)
                self.events.stepped(record)
            self._check_finite(record)
            stop = out_of_time()
            if (step + 1) % self.recipe.train.checkpoint_every == 0 or step + 1 == self.max_steps or stop:
                self._save(manager, step + 1, state, optimizers, sampler)
            if stop:
                log.info("distill: --max-seconds %s reached after step %d", self.options.max_seconds, step + 1)
                break
        metrics.close()
        if self.plan.is_main and history:
            metrics.plot(LOSS_CURVES, f"distill {self.options.recipe_name}: {self.logdir.name}", LR_KEYS)
        lora = lora_state_dict(nets.generator)
        return DistillResult(len(history), start + len(history) if history else max(start, self.max_steps), history,
                             lora if self.plan.is_main else None, resumed)

    @staticmethod
    def _check_finite(record: dict[str, Any]) -> None:
        for key in ("critic_loss", "generator_loss"):
            if key in record and not math.isfinite(record[key]):
                raise UserError(f"the {key.replace('_', ' ')} became {record[key]} at step {record['step']}: "
                                f"lower optim.lr / optim.critic_lr or check the initial weights")

    def _restore(self, manager: CheckpointManager, state: TrainedState, optimizers, sampler) -> int | None:
        """Load the newest complete checkpoint, if any; returns its step."""
        latest = manager.latest()
        if latest is None:
            return None
        manager.check_compatible(self.recipe.model_config(), latest)
        extra = manager.load(latest, state, list(optimizers))
        sampler.load_state_dict(extra["sampler"])
        set_rng_state(extra["rng"])
        self.generator.set_state(extra["generator"])
        self.exit_generator.set_state(extra["exit_generator"])
        step = int(extra["step"])
        if self.plan.is_main:
            self.events.resumed(step, latest)
        return step

    def _save(self, manager: CheckpointManager, step: int, state: TrainedState, optimizers, sampler) -> None:
        """DCP checkpoint (trainable parameters, both optimizers, this rank's RNG and data position)
        plus the official LoRA file, gathered full on rank 0."""
        generator_lora = lora_state_dict(state.generator)
        critic_lora = lora_state_dict(state.fake_score) if self.recipe.adapter.apply_to_critic else {}
        payload = {"generator_lora": generator_lora, "critic_lora": critic_lora, "step": step}
        extra = {"step": step, "sampler": sampler.state_dict(), "rng": rng_state(),
                 "generator": self.generator.get_state(), "exit_generator": self.exit_generator.get_state()}
        manager.save(step, state, list(optimizers), self.recipe.model_config(), extra,
                     files={OFFICIAL_FILE: lambda temp: torch.save(payload, temp)})
