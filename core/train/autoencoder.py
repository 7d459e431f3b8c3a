"""Autoencoder training of a small Wan2.2-structure VAE on the shapes world (`longlive train-vae`).

One step: render a batch of world clips (`core.train.synthetic.render_training_clip`, seeded by the
step, so no data state is saved) -> encode to normalised latents -> add noise -> decode, latent by
latent (`autoencode`), the first W latents without gradients (truncated back-propagation through
the causal caches: the trained frames see a long history, as in a long video) -> loss:

    loss = mean (decoded - video)^2 + moment_weight * mean_c [mean_c(z)^2 + log(std_c(z))^2]

`z` are the latents after the fixed Wan2.2 normalisation (`WanVAE.encode`); the moment term pulls
every channel to mean 0 and std 1 over the batch, so the trained VAE's latents need no statistics of
their own and the Wan2.2 constants stay the one normalisation. The noise (`latent_noise` std, in
normalised units) makes the decoder tolerate the small errors of a generator's latents.

Checkpoints, resume, metrics.jsonl, loss.png and the export follow `train-ar` (core/train/ar.py):
atomic checkpoints in `logdir/checkpoints` (core/train/state.py), the LR schedule is a function of
the step, and each step's data and noise are drawn from `(seed, step)`, so a resumed run continues
bit for bit. Held-out PSNR (`evaluate`) is measured on a fixed set of clips of combinations that
training never sees, at the demo size, with scene cuts.

Legend: B batch, T frames, H W pixels, z latent channels (48), F latent frames, h w latent size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.checkpoint import check_shapes, read_state_dict
from core.config import VAE_TEMPORAL_STRIDE, RuntimeConfig, VAEConfig, overlay, read_recipe_data, require
from core.errors import UserError
from core.runtime import resolve_device
from core.train.state import EMA, CheckpointManager, set_lr, warmup_fraction
from core.train.synthetic import DEMO_SIZE, render_training_clip
from core.vae import CausalCache, DecodePlan, WanVAE, load_vae, patchify, unpatchify

# Training decodes latent by latent (gradients can stop before any latent), whole frames, with the
# plain upsample convolutions: `WanVAE.decode(z, PER_LATENT)` is the same computation bit for bit.
PER_LATENT = DecodePlan(latents_per_cell=1, slice_bytes=None, subpixel_upsample=False, ring_past=False)

log = logging.getLogger("longlive.train_vae")

EXPORT_FORMAT = "longlive-vae-1"


ENCODER_SIDE = ("encoder.", "conv1.")  # what makes the latents; "decoder.", "conv2." decode them


def load_encoder_side(vae: WanVAE, path: str | Path) -> None:
    """Copy an exported VAE's encoder side into `vae` (names and shapes exactly those of vae's),
    whatever its decoder side is."""
    expected = {name: tuple(t.shape) for name, t in vae.state_dict().items() if name.startswith(ENCODER_SIDE)}
    found = {name: t for name, t in read_state_dict(path).items() if name.startswith(ENCODER_SIDE)}
    check_shapes(expected, found, f"train.init_from={path}", "the recipe's encoder",
                 "the encoder widths (vae.base_dim, vae.dim_mult, vae.num_res_blocks) must be the file's")
    vae.load_state_dict(found, strict=False)


# ----------------------------------------------------------------------------------------------
# The recipe.


@dataclass
class VAEDataConfig:
    """Training clips of the world at `world_size`, cropped to `crop` pixels: `frames` (1 + 4k) whose
    reconstruction is trained, after up to `warmup_latents` latent frames (drawn per step) that only
    fill the causal caches, without gradients, so that the trained frames see the history of a long
    video as they do at generation time (a VAE trained on short clips alone drifts on long ones)."""

    frames: int = 9
    warmup_latents: int = 6
    # Smaller crops are cheaper but change what the middle attention blocks see (h x w tokens): a
    # VAE trained on 32x32 crops of the 128x128 world reconstructed whole frames at ~10 dB.
    crop: int = DEMO_SIZE
    world_size: int = DEMO_SIZE
    batch_size: int = 4
    cut_probability: float = 0.25
    eval_clips: int = 8  # held-out clips of eval_frames at world_size, half of them with a cut
    eval_frames: int = 97  # 4 s, the demo's length
    # Processes rendering the next steps' clips ahead of the loop (0: in the loop). The clips are a
    # function of (seed, step), so the run is the same with any count; on a GPU rendering is the
    # bottleneck (16 clips of 49 frames take ~0.5 s of one core).
    workers: int = 0

    def __post_init__(self) -> None:
        for name in ("frames", "eval_frames"):
            value = getattr(self, name)
            require(value >= 5 and value % 4 == 1, f"data.{name} must be 1 + 4k with k >= 1 (got {value})")
        require(self.world_size % 16 == 0 and self.crop % 16 == 0 and 0 < self.crop <= self.world_size,
                f"data.crop and data.world_size must be multiples of 16 with crop <= world_size "
                f"(got {self.crop}, {self.world_size})")
        require(self.batch_size >= 1 and self.eval_clips >= 1 and self.warmup_latents >= 0,
                "data.batch_size and data.eval_clips must be >= 1, data.warmup_latents >= 0")
        require(0 <= self.cut_probability <= 1, f"data.cut_probability must be in [0, 1] (got {self.cut_probability})")
        require(self.workers >= 0, f"data.workers must be >= 0 (got {self.workers})")


@dataclass
class VAEObjective:
    latent_noise: float = 0.1  # std of the noise added to the normalised latents before decoding
    moment_weight: float = 0.01

    def __post_init__(self) -> None:
        require(self.latent_noise >= 0 and self.moment_weight >= 0,
                "objective.latent_noise and objective.moment_weight must be >= 0")


@dataclass
class VAEOptim:
    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 100
    final_lr_fraction: float = 0.05  # cosine decay to lr * this at train.max_steps
    ema_decay: float = 0.999
    ema_start_step: int = 500
    ema_on_device: bool = False  # the fp32 EMA shadow on the GPU beside the weights (core.train.state.EMA)

    def __post_init__(self) -> None:
        require(self.lr > 0 and self.grad_clip > 0 and self.warmup_steps >= 0 and 0 <= self.final_lr_fraction <= 1
                and 0 <= self.ema_decay < 1,
                "optim: lr > 0, grad_clip > 0, warmup_steps >= 0, final_lr_fraction in [0, 1], ema_decay in [0, 1)")

    def lr_at(self, step: int, max_steps: int) -> float:
        """Linear warm-up, then cosine decay to `lr * final_lr_fraction` at `max_steps`."""
        if step < self.warmup_steps:
            return self.lr * warmup_fraction(step, self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / max(1, max_steps - self.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.final_lr_fraction + (1 - self.final_lr_fraction) * cosine)


@dataclass
class VAELoop:
    max_steps: int = 4000  # also sets the LR schedule; --max-steps only stops earlier
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    eval_every: int = 250
    init_from: str = ""  # an exported VAE (.safetensors) to start from, with a fresh optimiser
    # False: the encoder (and its conv1) stays as initialised, so the latents do too: a generator
    # trained on the init VAE's latents stays valid while the decoder is fine-tuned.
    train_encoder: bool = True
    # False: only the encoder side (encoder, conv1) comes from init_from, the decoder side starts
    # from the seed's random weights, e.g. at other decoder widths (vae.decoder_base_dim): a new
    # decoder for the same latents.
    init_decoder: bool = True

    def __post_init__(self) -> None:
        require(self.max_steps >= 1 and self.checkpoint_every >= 1 and self.keep_checkpoints >= 1
                and self.eval_every >= 1,
                "train: max_steps, checkpoint_every, keep_checkpoints and eval_every must be >= 1")
        require(self.train_encoder or self.init_from,
                "train.train_encoder=false keeps the encoder as initialised: set train.init_from=VAE.safetensors")
        require(self.init_decoder or self.init_from,
                "train.init_decoder=false takes the encoder from a VAE: set train.init_from=VAE.safetensors")


@dataclass
class VAETrainRecipe:
    preset: str = "shapes"  # the VAEConfig preset the `vae` section edits
    vae: VAEConfig = field(default_factory=VAEConfig)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    objective: VAEObjective = field(default_factory=VAEObjective)
    optim: VAEOptim = field(default_factory=VAEOptim)
    train: VAELoop = field(default_factory=VAELoop)
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(device="cpu", dtype="float32"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_vae_recipe(source: str | Path | None, overrides: typing.Sequence[str] = ()) -> VAETrainRecipe:
    """YAML recipe + `--set` overrides -> a validated VAETrainRecipe (one-line ValueError)."""
    data, origin = read_recipe_data(source, overrides)
    preset = data.pop("preset", VAETrainRecipe.preset)
    if not isinstance(preset, str):
        raise ValueError(f"{origin}: bad value for 'preset': {preset!r}")
    try:
        base = VAETrainRecipe(preset=preset, vae=VAEConfig.preset(preset))
        recipe = overlay(base, data)
    except ValueError as err:
        raise ValueError(f"{origin}: {err}") from None
    if recipe.runtime.dtype not in ("auto", "float32"):
        raise ValueError(f"{origin}: runtime.dtype={recipe.runtime.dtype}: train-vae trains in float32 (set float32)")
    return recipe


# ----------------------------------------------------------------------------------------------
# Data and metrics.


def to_pixels(frames_THWC: np.ndarray) -> Tensor:
    """uint8 `[T, H, W, 3]` -> float `[3, T, H, W]` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames_THWC)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def training_batch(data: VAEDataConfig, seed: int, step: int) -> tuple[Tensor, int]:
    """The clips of step `step` and their warm-up latents W, a function of (seed, step):
    `[B, 3, frames + 4W, crop, crop]` in [-1, 1]."""
    rng = np.random.default_rng([seed, step])
    warmup = int(rng.integers(data.warmup_latents + 1))
    frames = data.frames + VAE_TEMPORAL_STRIDE * warmup
    clips = [render_training_clip(rng, frames, data.world_size, data.crop, split="train",
                                  cut_probability=data.cut_probability)[0] for _ in range(data.batch_size)]
    return torch.stack([to_pixels(c) for c in clips]), warmup


class StepBatches(torch.utils.data.Dataset):
    """`training_batch` of steps `start, start + 1, ...` as a dataset, for DataLoader workers."""

    def __init__(self, data: VAEDataConfig, seed: int, start: int, stop: int):
        self.data, self.seed, self.start, self.stop = data, seed, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return training_batch(self.data, self.seed, self.start + index)


def step_batches(data: VAEDataConfig, seed: int, start: int, stop: int) -> Iterator[tuple[Tensor, int]]:
    """The batches of steps `[start, stop)` in order, rendered ahead by `data.workers` processes."""
    dataset = StepBatches(data, seed, start, stop)
    if data.workers == 0:
        return (dataset[i] for i in range(len(dataset)))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=data.workers,
                                            prefetch_factor=4))


def autoencode(vae: WanVAE, video: Tensor, warmup_latents: int = 0, latent_noise: float = 0.0,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Encode and decode `video [B, 3, 1 + 4k, H, W]` latent by latent, as `WanVAE.encode` then
    `WanVAE.decode(z, PER_LATENT)` do (the same steps and caches, equal bit for bit without noise), the first
    `warmup_latents` steps without gradients; `latent_noise` times N(0, 1) is added to the
    normalised latents before decoding. Returns, from latent `warmup_latents` on: the decoded pixels,
    the input pixels they reconstruct, and the normalised latents."""
    x = patchify(video.to(vae.dtype))
    encoder_cache, decoder_cache = CausalCache(), CausalCache()
    decoded, latents = [], []
    for index, start in enumerate((0, *range(1, x.shape[2], VAE_TEMPORAL_STRIDE))):
        stop = 1 if start == 0 else start + VAE_TEMPORAL_STRIDE
        with torch.set_grad_enabled(torch.is_grad_enabled() and index >= warmup_latents):
            z = vae.normalize(vae.conv1(vae.encoder(x[:, :, start:stop], encoder_cache))[:, :vae.config.z_dim])
            if latent_noise:
                z_in = z + latent_noise * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            else:
                z_in = z
            pixels = vae.decode_cell(vae.denormalize(z_in).to(vae.dtype), decoder_cache, index == 0, PER_LATENT)
        if index >= warmup_latents:
            decoded.append(pixels)
            latents.append(z)
    first = 0 if warmup_latents == 0 else 1 + VAE_TEMPORAL_STRIDE * (warmup_latents - 1)
    return unpatchify(torch.cat(decoded, dim=2)), video[:, :, first:], torch.cat(latents, dim=2)


def held_out_clips(data: VAEDataConfig, seed: int = 12345) -> Tensor:
    """The fixed evaluation set: `[N, 3, eval_frames, world, world]` of held-out combinations, every
    second clip with a scene cut."""
    rng = np.random.default_rng(seed)
    clips = [render_training_clip(rng, data.eval_frames, data.world_size, None, split="held_out",
                                  cut_probability=float(i % 2))[0] for i in range(data.eval_clips)]
    return torch.stack([to_pixels(c) for c in clips])


def psnr(decoded: Tensor, video: Tensor) -> float:
    """PSNR in dB of pixels in [-1, 1] (decoded clamped), on the [0, 1] scale."""
    mse = ((decoded.clamp(-1, 1) - video) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def moment_penalty(z: Tensor) -> Tensor:
    """mean over channels of mean_c^2 + log(std_c)^2, statistics over batch, frames and positions."""
    flat = z.transpose(0, 1).reshape(z.shape[1], -1)
    return (flat.mean(dim=1).pow(2) + flat.std(dim=1).clamp_min(1e-6).log().pow(2)).mean()


@torch.no_grad()
def evaluate(vae: WanVAE, clips: Tensor, batch_size: int = 4) -> dict[str, float]:
    """Held-out PSNR (encode -> decode, no noise) and the normalised latents' channel statistics."""
    was_training = vae.training
    vae.eval()
    squared, latents = 0.0, []
    for start in range(0, len(clips), batch_size):
        video = clips[start:start + batch_size]
        z = vae.encode(video)
        latents.append(z.transpose(0, 1).reshape(z.shape[1], -1))
        squared += ((vae.decode(z).clamp(-1, 1) - video) / 2).pow(2).sum().item()
    vae.train(was_training)
    flat = torch.cat(latents, dim=1)
    mse = squared / clips.numel()
    return {"eval_psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
            "latent_mean_abs": flat.mean(dim=1).abs().mean().item(), "latent_std_mean": flat.std(dim=1).mean().item()}


# ----------------------------------------------------------------------------------------------
# The run.


@dataclass
class VAERunOptions:
    logdir: Path
    max_steps: int | None = None  # stop here (the LR schedule still follows train.max_steps)
    resume: bool = True
    export: Path | None = None  # safetensors written at the end (EMA weights once EMA started)


@dataclass
class VAEStepStats:
    step: int
    loss: float
    mse: float
    moment: float
    grad_norm: float
    lr: float
    seconds: float


@dataclass
class VAETrainResult:
    steps_run: int
    final_step: int
    history: list[VAEStepStats] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    export: Path | None = None
    export_psnr: float | None = None
    resumed_from: int | None = None


@contextlib.contextmanager
def _cpu_numerics(device: torch.device) -> Iterator[None]:
    """Flush denormals on the CPU while training: tiny gradients otherwise slow convolutions by 10x."""
    if device.type != "cpu":
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class VAETrainer:
    def __init__(self, recipe: VAETrainRecipe, options: VAERunOptions,
                 on_step: Callable[[VAEStepStats, int], None] | None = None):
        self.recipe, self.options, self.on_step = recipe, options, on_step
        self.device = resolve_device(recipe.runtime.device)
        self.logdir = Path(options.logdir)
        self.stop_step = options.max_steps or recipe.train.max_steps
        self.model_config = {"preset": recipe.preset, **asdict(recipe.vae)}

    def check(self) -> CheckpointManager:
        """Cheap start-up checks (log dir, resume compatibility), one UserError line each."""
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"log dir {self.logdir} cannot be created ({err.strerror or err}): "
                            f"pass a writable --logdir") from None
        if self.options.max_steps is not None and self.options.max_steps > self.recipe.train.max_steps:
            raise UserError(f"--max-steps {self.options.max_steps} is beyond train.max_steps "
                            f"{self.recipe.train.max_steps} (the end of the LR schedule): --set train.max_steps=N")
        init = self.recipe.train.init_from
        if init and not Path(init).is_file():
            raise UserError(f"train.init_from={init}: no such file (pass a VAE exported by train-vae --export)")
        if self.options.export is not None and Path(self.options.export).suffix != ".safetensors":
            raise UserError(f"--export {self.options.export}: the VAE is exported as .safetensors (use that suffix)")
        manager = CheckpointManager(self.logdir, keep=self.recipe.train.keep_checkpoints)
        if self.options.resume:
            manager.check_compatible(self.model_config)
        return manager

    def run(self) -> VAETrainResult:
        manager = self.check()
        with _cpu_numerics(self.device):
            return self._run(manager)

    def _build(self) -> tuple[WanVAE, torch.optim.Optimizer, EMA]:
        torch.manual_seed(self.recipe.runtime.seed)  # the initial weights
        loop = self.recipe.train
        if loop.init_from and loop.init_decoder:
            vae = load_vae(loop.init_from, self.recipe.vae, device=self.device).requires_grad_(True)
        else:
            vae = WanVAE(self.recipe.vae).to(self.device)
            if loop.init_from:
                load_encoder_side(vae, loop.init_from)
        vae.train()
        if not loop.train_encoder:
            for name, param in vae.named_parameters():
                if name.startswith(ENCODER_SIDE):
                    param.requires_grad_(False)
        o = self.recipe.optim
        optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=o.lr,
                                      betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        return vae, optimizer, EMA(vae, decay=o.ema_decay, start_step=o.ema_start_step, on_device=o.ema_on_device)

    def step(self, vae: WanVAE, optimizer: torch.optim.Optimizer, step: int,
             batch: tuple[Tensor, int]) -> VAEStepStats:
        """One optimisation step on the clips of `step` (`batch` = `training_batch(data, seed, step)`)."""
        recipe, started = self.recipe, time.perf_counter()
        lr = recipe.optim.lr_at(step, recipe.train.max_steps)
        set_lr(optimizer, lr)
        video, warmup = batch
        noise_gen = torch.Generator(device=self.device).manual_seed(recipe.runtime.seed * 1_000_003 + step)
        decoded, target, z = autoencode(vae, video.to(self.device), warmup, recipe.objective.latent_noise, noise_gen)
        mse = (decoded - target).pow(2).mean()
        moment = moment_penalty(z)
        loss = mse + recipe.objective.moment_weight * moment
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trained = optimizer.param_groups[0]["params"]  # without a frozen encoder
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, recipe.optim.grad_clip)
        optimizer.step()
        return VAEStepStats(step + 1, loss.item(), mse.item(), moment.item(), float(grad_norm), lr,
                            time.perf_counter() - started)

    def _run(self, manager: CheckpointManager) -> VAETrainResult:
        vae, optimizer, ema = self._build()
        start_step = resumed = 0
        latest = manager.latest() if self.options.resume else None
        if latest is not None:
            extra = manager.load(latest, vae, optimizer)
            start_step = resumed = int(extra["step"])
            ema.load_state_dict(extra["ema"])
            log.info("resumed from %s (step %d)", latest, start_step)
        clips = held_out_clips(self.recipe.data).to(self.device)
        result = VAETrainResult(0, max(start_step, self.stop_step), resumed_from=resumed if latest else None)
        loop = self.recipe.train
        batches = step_batches(self.recipe.data, self.recipe.runtime.seed, start_step, self.stop_step)
        for step, batch in zip(range(start_step, self.stop_step), batches, strict=True):
            stats = self.step(vae, optimizer, step, batch)
            ema.update(vae, step)
            if not math.isfinite(stats.loss):
                raise UserError(f"the loss became {stats.loss} at step {stats.step}: lower optim.lr")
            result.history.append(stats)
            record: dict[str, Any] = asdict(stats)
            if stats.step % loop.eval_every == 0 or stats.step == self.stop_step:
                metrics = evaluate(vae, clips)
                record.update(metrics)
                result.evals.append({"step": stats.step, **metrics})
            self._log(record)
            if self.on_step is not None:
                self.on_step(stats, self.stop_step)
            if stats.step % loop.checkpoint_every == 0 or stats.step == self.stop_step:
                extra = {"step": stats.step, "ema": ema.state_dict()}
                manager.save(stats.step, vae, optimizer, self.model_config, extra)
        self._plots()
        if self.options.export is not None:
            result.export, result.export_psnr = self._export(vae, ema, clips)
        result.steps_run = len(result.history)
        return result

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.logdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _plots(self) -> None:
        """loss.png (and eval_psnr.png) from the whole metrics.jsonl, across resumes."""
        from core.train.metrics import Curve
        from core.train.plots import write_loss_plot

        path = self.logdir / "metrics.jsonl"
        if not path.exists():
            return
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        last = {r["step"]: r for r in records}  # a resumed run may repeat steps: keep the newest
        records = [last[step] for step in sorted(last)]
        title = f"train-vae {self.logdir.name}"
        write_loss_plot(self.logdir / "loss.png", records,
                        [Curve("loss", "loss", "autoencoder loss\n(MSE + latent prior, [-1, 1] units²)")], title)
        evals = [r for r in records if "eval_psnr" in r]
        if len(evals) > 1:
            write_loss_plot(self.logdir / "eval_psnr.png", evals,
                            [Curve("eval_psnr", "PSNR", "held-out PSNR (dB)")], title, lr_keys=())

    def _export(self, vae: WanVAE, ema: EMA, clips: Tensor) -> tuple[Path, float]:
        """The EMA weights once EMA started (else the trained ones) as fp32 safetensors, with the
        held-out PSNR of exactly those weights in the metadata."""
        used_ema = ema.shadow is not None
        if used_ema:  # the last checkpoint is written: the live weights can be replaced
            ema.copy_to(vae)
        metrics = evaluate(vae, clips)
        path = save_vae(vae, Path(self.options.export), metadata={
            "source": "longlive train-vae", "preset": self.recipe.preset, "vae_config": asdict(self.recipe.vae),
            "ema": used_ema, "steps": self.stop_step, **metrics})
        return path, metrics["eval_psnr"]


def save_vae(vae: WanVAE, path: Path, metadata: dict[str, Any]) -> Path:
    """Write the VAE's state dict (the `Wan2.2_VAE.pth` names, fp32) as safetensors, atomically;
    `core.vae.load_vae(path, config)` loads it strictly."""
    import safetensors.torch

    from core.checkpoint import atomic_write

    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in vae.state_dict().items()}
    text = {"format": EXPORT_FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, temp, text))
    return path
