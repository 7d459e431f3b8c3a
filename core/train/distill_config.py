"""The DMD distillation recipe: typed sections validated from YAML (`recipes/distill*.yaml`).

Defaults are the official `configs/train_dmd.yaml` (reference-systems.md §6) unless a comment says
why. Where the official config spreads one setting over several names, there is one field here:
the sampler (steps, shift) and the cache (window, sinks, shot RoPE offset) of the rollout are the
`stream` section, which the score timesteps share (`stream.timestep_shift`), as the official does.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.config import (
    WAN_NEGATIVE_PROMPT,  # the official default (utils/config.py) too
    ModelConfig,
    Precision,
    QuantSettings,
    RuntimeConfig,
    StreamConfig,
    check_types,
    check_whole_blocks,
    load_training_recipe,
    require,
)
from core.shots import SCENE_CUT_PREFIX
from core.train.config import ClipSource


@dataclass
class PromptDataConfig(ClipSource):
    """What the rollouts are conditioned on.

    T2V (`i2v: false`): prompts only. `path` is a `.txt` file (one caption per line, one shot per
    sample) or a caption folder (`caption/<sample>/<n>.json` with a "caption", or the sample
    folders directly; several captions are consecutive shots, `shot_durations.txt` in a sample
    folder gives chunks per shot, else `chunks_per_shot`, else an even split); each shot after
    the first starts with `scene_cut_prefix`. `synthetic: true` makes captions of moving shapes.
    I2V (`i2v: true`): videos (the `train-ar` data layouts) give the prompts and, through the
    VAE, the first latent; `synthetic: true` writes a small video set into the log dir."""

    latent_frames: int = 32  # rollout length (official image_or_video_shape[1]; 4 chunks of 8)
    batch_size: int = 1  # per process (official 1; 2 in the NVFP4 config)
    chunks_per_shot: int = 0
    scene_cut_prefix: str = SCENE_CUT_PREFIX
    # the teacher's unconditional prompt under guidance; "" is the empty prompt (the right one for a
    # generator trained with caption dropout); null: none, only without guidance
    negative_prompt: str | None = WAN_NEGATIVE_PROMPT
    i2v: bool = False
    # umt5 (the real encoder from `model_dir`), tiny (offline encoder of the tiny preset), random
    # (fixed random contexts: throughput runs without a text encoder)
    text_encoder: Literal["umt5", "tiny", "random"] = "umt5"
    model_dir: str = ""  # `longlive download` folder (umt5, VAE); empty: the default folder
    vae: Literal["wan2.2", "tiny", "random-wan2.2"] = "wan2.2"  # I2V only

    def __post_init__(self) -> None:
        check_types(self)
        self.check_clip_source()
        require(self.batch_size >= 1 and self.chunks_per_shot >= 0,
                f"data: batch_size >= 1 and chunks_per_shot >= 0 (got {self.batch_size}, {self.chunks_per_shot})")


@dataclass
class InitConfig:
    """Initial weights of the three networks (files `generate --checkpoint` reads). An empty role
    falls back to `base`; an empty `base` means seeded random weights (the tiny preset, or
    `random_init: true` for throughput runs). "Standalone LoRA" (the shipped default): only `base`
    = the Wan2.2-TI2V-5B weights. "Direct DMD": all three = the stage-1 AR checkpoint."""

    base: str = ""
    generator: str = ""
    real_score: str = ""
    fake_score: str = ""
    random_init: bool = False

    def __post_init__(self) -> None:
        check_types(self)

    def path(self, role: str) -> Path | None:
        """The file a role starts from, or None for seeded random weights."""
        chosen = getattr(self, role) or self.base
        return Path(chosen) if chosen else None


@dataclass
class AdapterConfig:
    """PEFT LoRA on the 300 block linears (reference-model.md §7.4)."""

    rank: int = 128
    alpha: float = 128.0
    dropout: float = 0.0
    apply_to_critic: bool = True  # false: the critic is trained in full (fp32 master weights)

    def __post_init__(self) -> None:
        check_types(self)
        require(self.rank >= 1 and self.alpha > 0 and 0 <= self.dropout < 1,
                f"adapter: rank >= 1, alpha > 0, dropout in [0, 1) (got {self.rank}, {self.alpha}, {self.dropout})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class DistillOptimConfig:
    """AdamW of the generator (LoRA) and of the critic; each clipped on its own."""

    lr: float = 1e-5
    critic_lr: float = 2e-6
    beta1: float = 0.0
    beta2: float = 0.999
    critic_beta1: float = 0.0
    critic_beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    critic_grad_clip: float = 10.0
    dfake_gen_update_ratio: int = 5  # a generator step when step % ratio == 0 (step 0 included)

    def __post_init__(self) -> None:
        check_types(self)
        require(self.lr > 0 and self.critic_lr > 0 and self.grad_clip > 0 and self.critic_grad_clip > 0,
                "optim: lr, critic_lr, grad_clip and critic_grad_clip must be > 0")
        require(self.dfake_gen_update_ratio >= 1,
                f"optim.dfake_gen_update_ratio must be >= 1 (got {self.dfake_gen_update_ratio})")


@dataclass
class DMDConfig:
    """The distribution-matching objective. `exit_step`: null draws one U{0..steps-1} per
    rollout (shared by its chunks, drawn on rank 0), an integer fixes it (the official
    `last_step_only` is `stream.sampling_steps - 1`)."""

    real_guidance_scale: float = 3.0
    fake_guidance_scale: float = 0.0
    exit_step: int | None = None
    # the shift of the score models' timestep draws, sigma = s u / (1 + (s - 1) u) for u ~ U[0, 1);
    # null: stream.timestep_shift (the official, 5: ~8 % of the draws below sigma 0.3, where a small
    # world's fine detail is decided); 1: uniform sigma
    score_timestep_shift: float | None = None

    def __post_init__(self) -> None:
        check_types(self)
        require(self.real_guidance_scale >= 0 and self.fake_guidance_scale >= 0,
                f"dmd: guidance scales must be >= 0 (got {self.real_guidance_scale}, {self.fake_guidance_scale})")
        require(self.score_timestep_shift is None or self.score_timestep_shift > 0,
                f"dmd.score_timestep_shift must be > 0 or null (got {self.score_timestep_shift})")

    @property
    def uses_negative_prompt(self) -> bool:
        return self.real_guidance_scale != 0 or self.fake_guidance_scale != 0


def dmd_stream() -> StreamConfig:
    """The rollout of `configs/train_dmd.yaml`: chunks of 8, window 32, no sink, shot RoPE offset 8."""
    return StreamConfig(sink_frames=0, multi_shot_sink=False, shot_rope_offset=8.0)


@dataclass
class DistillLoopConfig:
    max_steps: int = 5000
    checkpoint_every: int = 50  # official log_iters
    keep_checkpoints: int = 50  # official max_checkpoints
    log_every: int = 1  # plain progress lines (log files) and TensorBoard
    activation_checkpointing: bool = True
    deterministic: bool = False  # same LoRA after a kill + resume as in one run

    def __post_init__(self) -> None:
        check_types(self)
        require(self.max_steps >= 1 and self.checkpoint_every >= 1 and self.keep_checkpoints >= 1
                and self.log_every >= 1,
                "train: max_steps, checkpoint_every, keep_checkpoints and log_every must be >= 1")


@dataclass
class DistillParallelConfig:
    fsdp: bool = True  # FSDP2 over the three networks when there is more than one process
    max_restarts: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        require(self.max_restarts >= 0, "parallel.max_restarts must be >= 0")


@dataclass
class DistillRecipe:
    """`quant.precision: nvfp4` = the official NVFP4 DMD config: the student's frozen base runs
    its block linears with NVFP4 numerics (all rules mse, 2-D weight tiles, stochastic gradients)
    under a bf16 LoRA, the teacher runs W4A4 (mse), the critic stays bf16."""

    preset: str = "wan2.2-ti2v-5b"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    checkpoints: InitConfig = field(default_factory=InitConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: DistillOptimConfig = field(default_factory=DistillOptimConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    stream: StreamConfig = field(default_factory=dmd_stream)
    train: DistillLoopConfig = field(default_factory=DistillLoopConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    parallel: DistillParallelConfig = field(default_factory=DistillParallelConfig)
    quant: QuantSettings = field(default_factory=QuantSettings)

    def __post_init__(self) -> None:
        check_types(self)
        steps = self.stream.sampling_steps
        exit_step = self.dmd.exit_step
        require(exit_step is None or 0 <= exit_step < steps,
                f"dmd.exit_step {exit_step} is out of range: use null (drawn per rollout) or 0..{steps - 1} "
                f"(stream.sampling_steps={steps})")
        require(not self.dmd.uses_negative_prompt or self.data.negative_prompt is not None,
                f"dmd.real_guidance_scale={self.dmd.real_guidance_scale} needs a negative prompt: set "
                f"data.negative_prompt (\"\" for the empty prompt), or the guidance scales to 0")
        require(self.stream.guidance_scale == 1.0,
                f"stream.guidance_scale must be 1.0: the rollout runs without guidance (the teacher's is "
                f"dmd.real_guidance_scale) (got {self.stream.guidance_scale})")
        require(not self.stream.shot_clean_recache, "stream.shot_clean_recache is an inference option: set it to false")
        check_whole_blocks(self.data.latent_frames, self.stream.frames_per_block, "data.latent_frames")
        require(self.quant.precision != Precision.fp8,
                "quant.precision fp8 is an inference format (FP8Linear has no backward): distill with bf16 or nvfp4")

    @property
    def num_chunks(self) -> int:
        return self.data.latent_frames // self.stream.frames_per_block

    def model_config(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the architecture and the trained shapes."""
        a = self.adapter
        return {"preset": self.preset, **self.model.__dict__, "lora_rank": a.rank,
                "critic_lora": a.apply_to_critic}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_distill_recipe(source: str | Path | None, overrides: typing.Sequence[str] = ()) -> DistillRecipe:
    """YAML recipe + `--set` overrides -> a validated DistillRecipe (one-line ValueError)."""
    return load_training_recipe(DistillRecipe, source, overrides)
