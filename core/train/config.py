"""The AR training recipe: typed sections validated from YAML (`recipes/train_ar*.yaml`).

Defaults are the official `configs/train_ar.yaml` (reference-systems.md §5.4) except where a
comment says why."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.config import (
    ModelConfig,
    QuantSettings,
    RuntimeConfig,
    check_types,
    load_training_recipe,
    require,
)
from core.train.recycle import RecycleConfig


@dataclass
class ClipSource:
    """Where training videos come from (train-ar's `data`, distill's I2V `data`): `path` an
    official dataset folder (video/ + caption/) or a JSONL manifest; `synthetic` writes a generated
    shapes-world set into `<logdir>/synthetic-data` instead (`synthetic_samples` samples of
    `synthetic_shots` shots of `synthetic_shot_frames` frames each, 0: the frames of one item;
    core/train/synthetic.py)."""

    path: str = ""
    synthetic: bool = False
    latent_frames: int = 96
    height: int = 704
    width: int = 1280
    synthetic_samples: int = 8
    synthetic_shots: int = 2
    synthetic_shot_frames: int = 0

    def check_clip_source(self) -> None:
        require(self.latent_frames > 0 and self.height % 32 == 0 and self.width % 32 == 0,
                f"data: latent_frames > 0 and height/width multiples of 32 "
                f"(got {self.latent_frames}, {self.height}x{self.width})")
        require(self.synthetic_samples >= 1 and self.synthetic_shots >= 1 and self.synthetic_shot_frames >= 0,
                "data: synthetic_samples and synthetic_shots >= 1, synthetic_shot_frames >= 0")


@dataclass
class DataConfig(ClipSource):
    """train-ar's clips (`ClipSource`) and how they are batched and encoded."""

    max_chunks_per_shot: int = 0  # 0: no virtual cuts
    # render shapes-world items on the training device as they are needed (core/train/shapes_stream.py:
    # the items `synthetic` would write, never repeated, no video decoding) instead of reading videos
    synthetic_stream: bool = False
    # with synthetic_stream: the share of items whose chunks after the first are drawn from a random
    # later moment of the same shot (a gap of 1 to 60 s), as the rolling KV window shows them once a
    # video is longer than the window (the first chunk stays as the sink, the history jumps ahead of
    # it); 0: every item is one continuous stretch of time
    synthetic_sink_gap: float = 0.0
    # with synthetic_stream: each item's shots last one of these frame counts (drawn per item); long
    # shots teach a shot's continuation, short ones two cuts in one window, as a multi-shot video's
    # window holds them from its second cut on; empty: every item's shots last synthetic_shot_frames
    synthetic_shot_frames_choices: tuple[int, ...] = ()
    allow_padding: bool = True
    num_workers: int = 2
    batch_size: int = 1  # samples per micro-step (the official: 1); > 1 only without SP
    # probability that a sample's captions (all its chunks) become the empty prompt "": the model
    # then also learns the unconditional prediction that classifier-free guidance needs
    # (`stream.guidance_scale` with `stream.negative_prompt: ""`); 0: the official training
    caption_dropout: float = 0.0
    i2v: bool = False
    # umt5 (the real encoder from `model_dir`), tiny (offline byte encoder of the tiny preset),
    # random (fixed random contexts: throughput runs with no text encoder at all)
    text_encoder: Literal["umt5", "tiny", "random"] = "umt5"
    model_dir: str = ""  # `longlive download` folder (umt5, VAE); empty: the default folder
    vae: Literal["wan2.2", "tiny", "random-wan2.2", "shapes"] = "wan2.2"
    # shapes: the VAE file (a `longlive train-vae --export`); empty: the one shipped in core/assets/shapes
    vae_path: str = ""

    def __post_init__(self) -> None:
        check_types(self)
        self.check_clip_source()
        require(self.batch_size >= 1, f"data.batch_size must be >= 1 (got {self.batch_size})")
        require(0 <= self.caption_dropout < 1,
                f"data.caption_dropout must be in [0, 1) (got {self.caption_dropout})")
        require(0 <= self.synthetic_sink_gap <= 1,
                f"data.synthetic_sink_gap must be in [0, 1] (got {self.synthetic_sink_gap})")
        require(self.synthetic_sink_gap == 0 or self.synthetic_stream,
                "data.synthetic_sink_gap needs data.synthetic_stream=true (it shapes the rendered items): set both")
        require(all(f >= 1 for f in self.synthetic_shot_frames_choices),
                f"data.synthetic_shot_frames_choices must be positive frame counts (got "
                f"{list(self.synthetic_shot_frames_choices)})")
        require(not self.synthetic_shot_frames_choices or self.synthetic_stream,
                "data.synthetic_shot_frames_choices needs data.synthetic_stream=true (it shapes the rendered items): "
                "set both")
        require(not self.vae_path or self.vae == "shapes",
                f"data.vae_path is for data.vae=shapes (got data.vae={self.vae}): remove vae_path or set vae=shapes")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    grad_accum: int = 1
    ema_decay: float = 0.99
    ema_start_step: int = 100
    # the fp32 EMA shadow beside the weights (on the GPU) instead of on the CPU: for models whose
    # copy fits there (the shapes world); the 5B keeps it on the host
    ema_on_device: bool = False
    # linear lr warm-up over the first steps of the run (0: none, the official setting). For a run
    # that starts from trained weights (train.init) with a fresh optimizer: with beta1 = 0 Adam's
    # first step moves every weight by the full lr (sign-like), a loss spike the warm-up avoids
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        require(self.lr > 0 and self.grad_accum >= 1 and 0 <= self.ema_decay < 1 and self.warmup_steps >= 0,
                f"optim: lr > 0, grad_accum >= 1, ema_decay in [0, 1), warmup_steps >= 0 "
                f"(got {self.lr}, {self.grad_accum}, {self.ema_decay}, {self.warmup_steps})")


@dataclass
class LoopConfig:
    max_steps: int = 600
    frames_per_block: int = 8
    timestep_shift: float = 5.0
    # The official saves a full checkpoint every step (pitfall 29): 70 GB a time for the 5B.
    checkpoint_every: int = 50
    keep_checkpoints: int = 20
    log_every: int = 1
    init: str = ""  # generator weights to start from; empty: seeded random (tiny) / required (5B)
    activation_checkpointing: bool = True
    deterministic: bool = False  # same parameters after a kill + resume as in one run

    def __post_init__(self) -> None:
        check_types(self)
        require(self.max_steps >= 1 and self.checkpoint_every >= 1 and self.keep_checkpoints >= 1,
                "train: max_steps, checkpoint_every and keep_checkpoints must be >= 1")


@dataclass
class ParallelConfig:
    sp: int = 4  # sequence-parallel group size (official: 4)
    fsdp: bool = True
    max_restarts: int = 0  # torchrun elastic restarts
    vae_halo_latents: int = 28

    def __post_init__(self) -> None:
        check_types(self)
        require(self.sp >= 1 and self.max_restarts >= 0 and self.vae_halo_latents >= 0,
                "parallel: sp >= 1, max_restarts >= 0, vae_halo_latents >= 0")


@dataclass
class TrainRecipe:
    """`quant.precision: nvfp4` trains the 300 block linears with the official AR NVFP4 numerics
    (the other `quant` keys select inference kernels and do not apply). `runtime.compile: always`
    compiles the blocks and the (frozen) VAE encoder; `auto` does not compile training."""

    preset: str = "wan2.2-ti2v-5b"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    error_recycling: RecycleConfig = field(default_factory=RecycleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    quant: QuantSettings = field(default_factory=QuantSettings)

    def __post_init__(self) -> None:
        check_types(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_train_recipe(source: str | Path | None, overrides: typing.Sequence[str] = ()) -> TrainRecipe:
    """YAML recipe + `--set` overrides -> a validated TrainRecipe (one-line ValueError)."""
    return load_training_recipe(TrainRecipe, source, overrides)
