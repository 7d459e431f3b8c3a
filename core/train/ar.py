"""Autoregressive teacher-forcing training of the causal DiT (reference-systems.md §5).

One step: read a clip -> VAE latents x0 (this rank's frames) -> per-block timesteps and noise ->
error recycling corrupts the inputs -> `[clean | noisy]` forward -> weighted flow loss ->
backward, clip, AdamW, EMA -> the step's prediction errors go back into the buffers.

Everything that depends on how the step is spread over processes goes through a `TrainPlan`
(one process here; `sp/train_plan.py` provides the sequence-parallel one), and the model comes
ready from outside (built and parallelized by `longlive_cli/`), so this file stays the same on
1 or N GPUs.

Random draws are made per sample: the ranks of an SP group draw the whole clip's timesteps and
noise from one generator (seeded `seed + dp_rank`) and keep their own frames, so an SP step splits
exactly the step one process would take (the official code seeds `seed + global_rank`, which is
statistically the same but not comparable run to run).

Legend: B batch, C latent channels, F latent frames, H/W latent size, K prompts (chunks).
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from core.config import VAEConfig, raw_frames
from core.errors import UserError
from core.optimize import compile_vae_encoder
from core.runtime import resolve_dtype
from core.train.config import TrainRecipe
from core.train.metrics import Curve, MetricsLog, RunEvents
from core.train.objective import FlowMatchSchedule, ar_targets, flow_loss, prediction_errors
from core.train.recycle import ErrorRecycler
from core.train.state import (
    EMA,
    CheckpointManager,
    deadline_clock,
    rng_state,
    set_lr,
    set_rng_state,
    warmup_fraction,
)

log = logging.getLogger("longlive.train")

# What the progress lines print and loss.png draws.
LOSS_CURVES = (Curve("loss", "loss", "flow-matching loss\n(weighted MSE, latent units²)"),)
PROGRESS_FIELDS = (*LOSS_CURVES, Curve("grad_norm", "|g|", "gradient norm"))


# -- captions ----------------------------------------------------------------------------------------


def drop_captions(prompts: list[list[str]], probability: float, generator: torch.Generator) -> list[list[str]]:
    """Caption dropout for classifier-free guidance: each sample's per-chunk prompts all become the
    empty prompt with `probability` (one draw per sample from `generator`, none at 0, so runs
    without dropout keep their random stream). The ranks of an SP group share the generator's seed
    and so drop the same samples."""
    if probability == 0:
        return prompts
    drop = torch.rand(len(prompts), generator=generator, device=generator.device) < probability
    return [[""] * len(chunks) if dropped else chunks for chunks, dropped in zip(prompts, drop.tolist(), strict=True)]


# -- how a step is laid out over processes ----------------------------------------------------------


class TrainPlan:
    """One process holds every frame. `sp/train_plan.py` splits frames over an SP group and
    reduces over the world; how the model is parallelized is decided outside (`parallelize`)."""

    rank = 0
    world_size = 1
    sp_rank = 0
    sp_size = 1
    dp_rank = 0
    dp_size = 1
    uses_fsdp = False

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_frames(self, num_frames: int) -> range:
        return range(num_frames)

    def encode(self, vae: nn.Module, video_BCTHW: Tensor) -> Tensor:
        """This rank's normalized latents `[B, 48, F_local, h, w]`."""
        with torch.no_grad():
            return vae.encode(video_BCTHW)

    def local_context(self, context: Tensor, prompt_chunks: int) -> Tensor:
        return context

    def forward(self, model: nn.Module, noisy: Tensor, t: Tensor, context: Tensor, clean: Tensor,
                frames_per_block: int) -> Tensor:
        return model(noisy, t, context, frames_per_block=frames_per_block, clean_x=clean)

    def sp_sum(self, x: Tensor) -> Tensor:
        """Sum over the ranks that share one sample (the loss denominator, §4.6)."""
        return x

    def world_mean(self, x: Tensor) -> Tensor:
        return x

    @property
    def loss_scale(self) -> float:
        """Backward scale making the gradient reduction yield the exact global-loss gradient."""
        return 1.0

    def sync_gradients(self, model: nn.Module) -> None:
        """Called before clipping; FSDP reduces during backward, so the default does nothing."""

    def gather_errors(self) -> Callable[[Tensor], list[Tensor]] | None:
        return None

    def barrier(self) -> None:
        """No-op on one process."""

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank (a draw the reference makes on rank 0 and broadcasts)."""
        return value


# -- inputs -----------------------------------------------------------------------------------------


class PromptEncoder:
    """Prompts -> contexts `[n, T, text_dim]`. The text encoder caches its encodings per prompt, so a
    dataset's captions are encoded once; "random" gives a fixed context per prompt (throughput runs
    with no text encoder)."""

    def __init__(self, recipe: TrainRecipe, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.config = recipe.model
        self.encoder = None
        self._random: dict[str, Tensor] = {}
        kind = recipe.data.text_encoder
        if kind == "tiny":
            from core.text import TextEncoder

            self.encoder = TextEncoder.tiny(seed=recipe.runtime.seed, device=device)
        elif kind == "umt5":
            from core.hub import ModelFiles, resolve_model_dir
            from core.text import TextEncoder

            files = ModelFiles(resolve_model_dir(Path(recipe.data.model_dir) if recipe.data.model_dir else None))
            self.encoder = TextEncoder.from_model_dir(files.text_encoder_dir, device=device)

    def __call__(self, prompts: list[str]) -> Tensor:
        if self.encoder is not None:
            return self.encoder.encode(prompts).to(self.device, self.dtype)
        return torch.stack([self._random_context(p) for p in prompts])

    def _random_context(self, prompt: str) -> Tensor:
        if prompt not in self._random:
            seed = int.from_bytes(prompt.encode()[:7].ljust(7, b"\0"), "little") ^ len(prompt)
            g = torch.Generator().manual_seed(seed)
            context = torch.zeros(self.config.text_len, self.config.text_dim)
            context[:64] = torch.randn(64, self.config.text_dim, generator=g)
            self._random[prompt] = context.to(self.device, self.dtype)
        return self._random[prompt]


def build_vae(recipe: TrainRecipe, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from core.vae import load_vae, random_vae

    kind = recipe.data.vae
    if kind == "shapes":
        from core.assets import shapes_vae_path

        path = Path(recipe.data.vae_path) if recipe.data.vae_path else shapes_vae_path()
        if not path.is_file():
            raise UserError(f"data.vae_path {path} not found: give a `longlive train-vae --export` file "
                            f"(--set data.vae_path=FILE)")
        return load_vae(path, VAEConfig.preset("shapes"), device=device, dtype=dtype).eval()
    if kind == "tiny":
        return random_vae(VAEConfig.preset("tiny"), 0, device=device, dtype=dtype).eval()
    if kind == "random-wan2.2":
        return random_vae(VAEConfig.preset("wan2.2"), 0, device=device, dtype=dtype).eval()
    from core.hub import ModelFiles, resolve_model_dir

    files = ModelFiles(resolve_model_dir(Path(recipe.data.model_dir) if recipe.data.model_dir else None))
    files.require(files.vae)
    return load_vae(files.vae, VAEConfig.preset("wan2.2"), device=device, dtype=dtype).eval()


def dataset_root(recipe: TrainRecipe, logdir: Path, plan: TrainPlan, workers: int = 1) -> Path:
    """The data path, or the generated dataset (written once, by rank 0, with `workers` processes)."""
    if not recipe.data.synthetic:
        return Path(recipe.data.path)
    root = logdir / "synthetic-data"
    if plan.is_main and not (root / "video").is_dir():
        from core.train.synthetic import make_synthetic_dataset

        d = recipe.data
        frames = d.synthetic_shot_frames or raw_frames(d.latent_frames)
        partial = logdir / ".synthetic-data.tmp"  # renamed when complete: a killed run never trains on half of it
        shutil.rmtree(partial, ignore_errors=True)
        make_synthetic_dataset(partial, samples=d.synthetic_samples, clips_per_sample=d.synthetic_shots,
                               frames=frames, height=d.height, width=d.width, seed=recipe.runtime.seed,
                               workers=max(1, workers))
        shutil.rmtree(root, ignore_errors=True)  # a folder without video/ holds nothing usable
        os.replace(partial, root)
    plan.barrier()
    return root


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    logdir: Path
    max_steps: int | None = None  # overrides train.max_steps
    resume: bool = True
    export: Path | None = None  # generator file written at the end (EMA weights once EMA started)
    recipe_name: str = ""  # for the plot's title
    max_seconds: float | None = None  # wall-clock budget of the loop: stop (checkpoint, export) past it


@dataclass
class StepStats:
    step: int
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    tokens_per_second: float


@dataclass
class TrainResult:
    steps_run: int
    final_step: int
    history: list[StepStats] = field(default_factory=list)
    export: Path | None = None
    resumed_from: int | None = None


class Trainer:
    """The AR training loop. `build_model()` returns the generator ready to train (fp32 master
    weights, parallelized for `plan`: `longlive_cli/parallelize.py`)."""

    def __init__(self, recipe: TrainRecipe, options: RunOptions, plan: TrainPlan,
                 build_model: Callable[[], nn.Module], events: RunEvents | None = None):
        self.recipe, self.options, self.plan = recipe, options, plan
        self.build_model = build_model
        self.events = events or RunEvents()
        self.device = plan.device
        self.dtype = resolve_dtype(recipe.runtime.dtype, self.device)
        loop = recipe.train
        self.max_steps = options.max_steps if options.max_steps is not None else loop.max_steps
        self.fpb = loop.frames_per_block
        self.schedule = FlowMatchSchedule(shift=loop.timestep_shift, steps=recipe.error_recycling.num_train_timesteps)
        self.logdir = Path(options.logdir)

    # -- setup ------------------------------------------------------------------------------------

    def _seed(self) -> None:
        seed = self.recipe.runtime.seed + self.plan.dp_rank  # one stream per sample (module doc)
        random.seed(seed)
        torch.manual_seed(seed)
        if self.recipe.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def _data(self):
        from core.train.data import ShardedSampler, VideoClipDataset

        d = self.recipe.data
        if d.batch_size > 1 and self.plan.sp_size > 1:
            raise UserError(f"data.batch_size={d.batch_size} with sequence parallelism (parallel.sp="
                            f"{self.plan.sp_size}): use batch_size 1 (grad_accum for larger batches)")
        if d.synthetic_stream:  # rendered on the device: the stream is the dataset and the sampler
            from core.train.shapes_stream import ShapesStream

            shot_frames = d.synthetic_shot_frames_choices or d.synthetic_shot_frames or raw_frames(d.latent_frames)
            stream = ShapesStream(d.batch_size, d.latent_frames, self.fpb, d.height, d.width, d.synthetic_shots,
                                  shot_frames, self.recipe.runtime.seed, self.device, d.max_chunks_per_shot or None,
                                  self.plan.dp_rank, self.plan.dp_size, sink_gap=d.synthetic_sink_gap)
            return stream, stream  # shots too short for a chunk failed in its constructor
        root = dataset_root(self.recipe, self.logdir, self.plan, self.recipe.data.num_workers)
        dataset = VideoClipDataset(root, d.latent_frames, d.height, d.width, frames_per_block=self.fpb,
                                   max_chunks_per_shot=d.max_chunks_per_shot or None, allow_padding=d.allow_padding,
                                   seed=self.recipe.runtime.seed, deterministic=False)
        sampler = ShardedSampler(len(dataset), self.plan.dp_rank, self.plan.dp_size, self.recipe.runtime.seed)
        if len(sampler) == 0:
            raise UserError(f"the dataset at {root} has {len(dataset)} samples, fewer than the {self.plan.dp_size} "
                            f"data-parallel replicas: add videos or use fewer GPUs")
        return dataset, sampler

    def _batches(self, dataset, sampler) -> Iterator:
        from torch.utils.data import DataLoader

        from core.train.data import collate

        if self.recipe.data.synthetic_stream:
            yield from dataset.batches()  # endless
            return
        while True:
            dataset.set_epoch(sampler.epoch)
            loader = DataLoader(dataset, batch_size=self.recipe.data.batch_size, sampler=list(iter(sampler)),
                                collate_fn=collate,
                                num_workers=self.recipe.data.num_workers, pin_memory=self.device.type == "cuda")
            yield from loader
            sampler.set_epoch(sampler.epoch + 1)

    # -- one step ---------------------------------------------------------------------------------

    def _autocast(self):
        enabled = self.device.type == "cuda" and not self.plan.uses_fsdp and self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def micro_step(self, model: nn.Module, batch, step: int) -> tuple[Tensor, int]:
        """Forward + backward of one sample; returns (this rank's loss share, tokens)."""
        d, plan = self.recipe.data, self.plan
        video = batch.video.to(self.device, self.dtype, non_blocking=True)
        x0 = plan.encode(self.vae, video).to(torch.float32)  # [B, C, F_loc, h, w]
        frames = plan.local_frames(d.latent_frames)
        captions = drop_captions(batch.prompts, d.caption_dropout, self.generator)
        prompts = [p for sample in captions for p in sample]  # sample-major, one per chunk
        chunks = len(batch.prompts[0])
        context = plan.local_context(self.prompts(prompts), chunks)

        holds_first = frames.start == 0
        t, index, noise = self._draw(x0, d.latent_frames, frames)
        valid = batch.num_valid_latent_frames.to(self.device)
        frame_idx = torch.tensor(list(frames), device=self.device)
        frame_mask = (frame_idx[None, :] < valid[:, None]).float()
        noised_x0 = clean = x0
        if self.recycler is not None:  # corrupt the inputs with stored errors (§5.3)
            injected = self.recycler.inject(x0, noise, x0, index, self.fpb, step)
            noised_x0, noise, clean = injected.x0, injected.noise, injected.clean
        image = x0[:, :, :1] if d.i2v and holds_first else None
        ar = ar_targets(x0, noise, t, self.schedule, noised_x0=noised_x0, clean=clean, image_latent=image,
                        frame_mask=frame_mask)
        mask = ar.frame_mask
        denominator = plan.sp_sum(mask.sum())
        with self._autocast():
            pred = plan.forward(model, ar.noisy, ar.t, context, ar.clean, self.fpb)
        loss, _ = flow_loss(pred.float(), ar.target, ar.t, self.schedule, mask, denominator)
        (loss * plan.loss_scale / self.recipe.optim.grad_accum).backward()
        if self.recycler is not None:
            latent_error, noise_error = prediction_errors(pred.detach().float(), ar, x0, index, self.schedule)
            self.recycler.update(latent_error, noise_error, index, injected.ran_clean, frames_per_block=self.fpb,
                                 step=step, gather_fn=plan.gather_errors())
        pt, ph, pw = self.recipe.model.patch_size
        tokens = 2 * x0[:, 0].numel() // (pt * ph * pw)  # clean + noisy tokens of this rank
        return loss.detach(), tokens

    def _draw(self, x0: Tensor, num_frames: int, frames: range) -> tuple[Tensor, Tensor, Tensor]:
        """The whole clip's per-block timesteps and noise, then this rank's frames of them."""
        batch, channels, _, height, width = x0.shape
        t, index = self.schedule.sample_block_timesteps(batch, num_frames, self.fpb, self.generator,
                                                        i2v=self.recipe.data.i2v)
        noise = torch.randn((batch, channels, num_frames, height, width), generator=self.generator,
                            device=self.device, dtype=x0.dtype)
        local = slice(frames.start, frames.stop)
        return t[:, local], index[:, local], noise[:, :, local]

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to `max_steps` from the newest complete checkpoint (or from scratch): log every
        step, checkpoint every `checkpoint_every` steps and at the end, export if asked."""
        self._seed()
        self.vae = build_vae(self.recipe, self.device, self.dtype)  # a missing VAE file fails before the data is made
        if self.recipe.runtime.compile == "always":
            compile_vae_encoder(self.vae)
        dataset, sampler = self._data()
        self.prompts = PromptEncoder(self.recipe, self.device, self.dtype)
        model = self.build_model().train()
        o = self.recipe.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                      weight_decay=o.weight_decay)
        ema = EMA(model, decay=o.ema_decay, start_step=o.ema_start_step, on_device=o.ema_on_device)
        self.recycler = self._recycler()
        manager = CheckpointManager(self.logdir, keep=self.recipe.train.keep_checkpoints)
        resumed = self._restore(manager, model, optimizer, ema, sampler) if self.options.resume else None
        start_step = resumed or 0
        metrics = MetricsLog(self.logdir, self.recipe.train.log_every)
        if self.plan.is_main:
            metrics.start(start_step)
        history: list[StepStats] = []
        batches = self._batches(dataset, sampler)
        self.events.started(start_step, self.max_steps, self.recipe.train.log_every)
        out_of_time = deadline_clock(self.options.max_seconds, self.plan.world_mean, self.device)
        for step in range(start_step, self.max_steps):
            stats = self._step(step, model, optimizer, ema, batches, sampler)
            history.append(stats)
            if self.plan.is_main:
                self._log(metrics, stats)
            if not math.isfinite(stats.loss):
                raise UserError(f"the loss became {stats.loss} at step {step + 1}: lower optim.lr or check the data")
            stop = out_of_time()
            if (step + 1) % self.recipe.train.checkpoint_every == 0 or step + 1 == self.max_steps or stop:
                self._save(manager, step + 1, model, optimizer, ema, sampler)
            if stop:
                log.info("train-ar: --max-seconds %s reached after step %d", self.options.max_seconds, step + 1)
                break
        metrics.close()
        export = self._export(model, ema) if self.options.export is not None else None
        if self.plan.is_main and history:
            metrics.plot(LOSS_CURVES, f"train-ar {self.options.recipe_name}: {self.logdir.name}")
        return TrainResult(steps_run=len(history), final_step=start_step + len(history),
                           history=history, export=export, resumed_from=resumed)

    def _recycler(self) -> ErrorRecycler | None:
        config = self.recipe.error_recycling
        if not config.enabled:
            return None
        generator = torch.Generator().manual_seed(self.recipe.runtime.seed * 7919 + self.plan.rank)
        return ErrorRecycler(config, generator=generator, sp_rank=self.plan.sp_rank, sp_size=self.plan.sp_size)

    def _model_config(self) -> dict:
        return {"preset": self.recipe.preset, **self.recipe.model.__dict__}

    def _restore(self, manager: CheckpointManager, model, optimizer, ema: EMA, sampler) -> int | None:
        """Load the newest complete checkpoint, if any; returns its step."""
        latest = manager.latest()
        if latest is None:
            return None
        manager.check_compatible(self._model_config(), latest)
        extra = manager.load(latest, model, optimizer)
        ema.load_state_dict(extra["ema"])
        sampler.load_state_dict(extra["sampler"])
        if self.recycler is not None and "recycler" in extra:
            self.recycler.load_state_dict(extra["recycler"])
        set_rng_state(extra["rng"])
        self.generator.set_state(extra["generator"])
        step = int(extra["step"])
        if self.plan.is_main:
            self.events.resumed(step, latest)
        return step

    def _step(self, step: int, model, optimizer, ema: EMA, batches, sampler) -> StepStats:
        """One optimizer step (with gradient accumulation); its logged statistics."""
        plan, o = self.plan, self.recipe.optim
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses, tokens = [], 0
        for _ in range(o.grad_accum):
            batch = next(batches)
            loss, n = self.micro_step(model, batch, step)
            sampler.advance(len(batch.indices))
            losses.append(loss)
            tokens += n
        plan.sync_gradients(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        lr = o.lr * warmup_fraction(step, o.warmup_steps)
        set_lr(optimizer, lr)
        optimizer.step()
        ema.update(model, step)
        # The group's loss shares sum to the sample's loss; average over replicas for the log.
        loss_value = float(plan.world_mean(plan.sp_sum(torch.stack(losses).mean())))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        return StepStats(step + 1, loss_value, float(_full_value(grad_norm)), lr, seconds,
                         tokens * plan.world_size / seconds)

    def _save(self, manager: CheckpointManager, step: int, model, optimizer, ema: EMA, sampler) -> None:
        extra = {"step": step, "ema": ema.state_dict(), "sampler": sampler.state_dict(),
                 "rng": rng_state(), "generator": self.generator.get_state()}
        if self.recycler is not None:
            extra["recycler"] = self.recycler.state_dict()
        manager.save(step, model, optimizer, self._model_config(), extra)

    def _log(self, metrics: MetricsLog, stats: StepStats) -> None:
        record = {"step": stats.step, "loss": stats.loss, "grad_norm": stats.grad_norm, "lr": stats.lr,
                  "step_seconds": stats.seconds, "tokens_per_second": stats.tokens_per_second}
        metrics.append(record)
        self.events.stepped(record)

    def _export(self, model: nn.Module, ema: EMA) -> Path:
        """A generator file `generate --checkpoint` loads: the EMA weights once EMA has started,
        else the trained weights (bf16 safetensors, or the official .pt layout)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from core.checkpoint import save_generator

        used_ema = ema.shadow is not None
        if used_ema:  # training is over (last checkpoint written): the weights can be replaced
            ema.copy_to(model)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = Path(self.options.export)
        if self.plan.is_main:
            tensors = {name: value.detach().to(torch.bfloat16) for name, value in state.items()}
            save_generator(tensors, path, metadata={"source": "longlive train-ar", "ema": str(used_ema),
                                                    "preset": self.recipe.preset})
        self.plan.barrier()
        return path


def _full_value(x: Tensor) -> Tensor:
    """A DTensor's (e.g. FSDP's grad norm) full value, or the tensor itself."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
