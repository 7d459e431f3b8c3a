"""Typed configs, presets, and recipe loading.

`ModelConfig` is the DiT architecture, `StreamConfig` the streaming-inference settings (cache and
sampler), `VideoConfig` what to generate, `RuntimeConfig` where and how to run it. A `Recipe`
holds all four. Recipes are YAML files loaded through OmegaConf and validated into these
dataclasses; every problem is a `ValueError` whose message names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

# Wan2.2 VAE: 16x spatial, 4x temporal compression; the DiT patchifies 2x2 on top.
VAE_SPATIAL_STRIDE = 16
VAE_TEMPORAL_STRIDE = 4
VIDEO_FPS = 24


def raw_frames(latent_frames: int) -> int:
    """Video frames of `latent_frames` latents: the first latent is one frame, each later one
    `VAE_TEMPORAL_STRIDE` (1 + 4(F - 1))."""
    return 1 + VAE_TEMPORAL_STRIDE * (latent_frames - 1)


def chunk_video_frames(frames_per_block: int) -> int:
    """Video frames that one chunk of `frames_per_block` latents adds (after the first chunk)."""
    return VAE_TEMPORAL_STRIDE * frames_per_block


def check_whole_blocks(frames: int, frames_per_block: int, what: str) -> int:
    """The number of blocks in `frames` latent frames; a ValueError naming `what` and the nearest
    valid lengths unless it is a positive whole number of blocks."""
    if frames <= 0 or frames % frames_per_block:
        lower = frames - frames % frames_per_block
        upper = lower + frames_per_block
        suggestion = f"{upper}" if lower <= 0 else f"{lower} or {upper}"
        raise ValueError(f"{what}: {frames} latent frames are not a multiple of "
                         f"frames_per_block={frames_per_block}; use {suggestion}")
    return frames // frames_per_block


def require(ok: bool, message: str) -> None:
    """Config validation: a ValueError naming the field and what is allowed."""
    if not ok:
        raise ValueError(message)


_require = require


class ConfigError(ValueError):
    """A value of the wrong type or outside a closed set; `key` is the dotted path to it."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"bad value for '{key}': {detail}")
        self.key, self.detail = key, detail


class Choice(str, enum.Enum):
    """A closed set of names. YAML strings and CLI values become members once, where they enter
    (`check_types`); afterwards code compares members, never re-validates strings."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Precision(Choice):
    """Storage and numerics of the DiT's 300 block linears: bf16 (the working dtype), nvfp4
    (packed 4-bit, see `QuantMode`), fp8 (e4m3 per-output-channel weights, per-token activations,
    FP8 tensor-core GEMMs on Hopper and newer; quant/fp8.py)."""

    bf16 = "bf16"
    nvfp4 = "nvfp4"
    fp8 = "fp8"


class KVPrecision(Choice):
    """KV cache storage: bf16 (the working dtype), nvfp4 (quant/kv.py), fp8 (E4M3 codes with one
    scale per head, quant/fp8_kv.py; with `--attention fp8` the kernel reads them directly)."""

    bf16 = "bf16"
    nvfp4 = "nvfp4"
    fp8 = "fp8"


class QuantMode(Choice):
    """How NVFP4 block linears run at inference: w4a16 = packed weights dequantized on the fly for
    a bf16 GEMM (memory; any GPU), w4a4 = NVFP4 weights and activations (emulated off
    Blackwell), native = Blackwell FP4 tensor cores."""

    w4a16 = "w4a16"
    w4a4 = "w4a4"
    native = "native"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as the field type `hint` (a YAML list becomes a tuple, a name a Choice member),
    or a ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(key, f"{value!r} (allowed: {', '.join(str(a) for a in allowed)})")
        return value
    if isinstance(hint, type) and issubclass(hint, Choice):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(key, f"{str(value)!r} (allowed: {', '.join(m.value for m in hint)})") from None
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"only `X | None` unions are supported in configs ({key})")
        return None if value is None else _coerce(value, args[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        args = typing.get_args(hint)
        item_hint = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(key, f"expected a section ({hint.__name__}), got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for '{key}'")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def check_types(instance: Any) -> None:
    """Coerce every field of a config dataclass to its declared type, in place (called first in
    `__post_init__`, so a value is checked once, whether it came from YAML, a flag or code)."""
    for name, hint in _field_types(type(instance)).items():
        object.__setattr__(instance, name, _coerce(getattr(instance, name), hint, name))


@dataclass
class ModelConfig:
    """Causal Wan DiT architecture. Defaults are the official Wan2.2-TI2V-5B numbers."""

    dim: int = 3072
    ffn_dim: int = 14336
    num_heads: int = 24
    num_layers: int = 30
    in_channels: int = 48
    out_channels: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        check_types(self)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_channels", "out_channels",
                     "text_dim", "text_len", "freq_dim"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0,
                     f"{name} must be a positive integer (got {value!r})")
        _require(len(self.patch_size) == 3 and all(p > 0 for p in self.patch_size),
                 f"patch_size must be three positive integers (t, h, w) (got {self.patch_size})")
        _require(self.dim % self.num_heads == 0,
                 f"dim must be divisible by num_heads={self.num_heads} (got dim={self.dim})")
        # RoPE rotates pairs; below 6 the height/width axes simply get no pairs (as upstream).
        _require(self.head_dim % 2 == 0,
                 f"dim / num_heads must be an even head size for RoPE pairs (got {self.head_dim})")
        _require(self.freq_dim % 2 == 0, f"freq_dim must be even (got {self.freq_dim})")
        _require(self.eps > 0, f"eps must be > 0 (got {self.eps})")
        _require(self.rope_theta > 0, f"rope_theta must be > 0 (got {self.rope_theta})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_channels(self) -> int:
        """Outputs of the head per token: prod(patch) * out_channels (192 for the 5B)."""
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.out_channels

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r} (allowed: {', '.join(MODEL_PRESETS)})")
        return dataclasses.replace(MODEL_PRESETS[name])


MODEL_PRESETS: dict[str, ModelConfig] = {
    "wan2.2-ti2v-5b": ModelConfig(),
    # Same structure as the 5B (every tensor kind, 512 text slots, 48 latent channels), small
    # widths: runs on a CPU in seconds. head_dim 32 gives an uneven 6/5/5 RoPE pair split.
    "tiny": ModelConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=64),
    # The trained shapes-world generator (docs/models/shapes.md, recipes/train_ar_shapes.yaml): the
    # tiny text width, wider and deeper; its weights are files (core/assets/shapes), never random.
    "shapes": ModelConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=64),
}
# Presets that run offline at 128x128 on a CPU; `shapes` reads its trained files (core.assets).
OFFLINE_PRESETS = ("tiny", "shapes")


# ----------------------------------------------------------------------------------------------
# The Wan2.2 VAE (core/vae.py).

# Per-channel statistics of the posterior mean (official wrapper): z = (mu - mean) / std.
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclass
class VAEConfig:
    """VAE architecture. Defaults are the official Wan2.2 (TI2V-5B) VAE."""

    base_dim: int = 160  # encoder widths base_dim * (1, *dim_mult)
    decoder_base_dim: int = 256  # decoder widths decoder_base_dim * (dim_mult[-1], *reversed(dim_mult))
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder stage; decoder stages have one more
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per resampling encoder stage

    def __post_init__(self) -> None:
        check_types(self)
        self.dim_mult = tuple(self.dim_mult)
        self.temporal_downsample = tuple(self.temporal_downsample)
        for name in ("base_dim", "decoder_base_dim", "num_res_blocks"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                     f"{name} must be a positive integer (got {value!r})")
        _require(self.z_dim == len(LATENT_MEAN),
                 f"z_dim must be {len(LATENT_MEAN)}, the channels of the latent normalisation "
                 f"constants (got {self.z_dim!r})")
        _require(len(self.dim_mult) >= 2 and all(isinstance(m, int) and m > 0 for m in self.dim_mult),
                 f"dim_mult must be at least two positive integers (got {self.dim_mult})")
        _require(len(self.temporal_downsample) == len(self.dim_mult) - 1
                 and all(isinstance(t, bool) for t in self.temporal_downsample),
                 f"temporal_downsample must be {len(self.dim_mult) - 1} booleans, one per resampling "
                 f"stage (got {self.temporal_downsample})")
        _require(sum(self.temporal_downsample) == 2,
                 f"temporal_downsample must hold exactly two True values (the 4x temporal stride) "
                 f"(got {self.temporal_downsample})")
        # The parameter-free stage shortcuts regroup channels: the widths must divide evenly.
        for stage, (c_in, c_out) in enumerate(zip(self.encoder_widths[:-1], self.encoder_widths[1:], strict=True)):
            _require((c_in * self._cells(stage, self.temporal_downsample)) % c_out == 0,
                     f"encoder stage {stage} widths {c_in} -> {c_out} (base_dim x dim_mult) cannot be "
                     f"regrouped by its shortcut: use dim_mult entries that divide each other")
        for stage, (c_in, c_out) in enumerate(zip(self.decoder_widths[:-2], self.decoder_widths[1:-1], strict=True)):
            _require((c_out * self._cells(stage, self.temporal_downsample[::-1])) % c_in == 0,
                     f"decoder stage {stage} widths {c_in} -> {c_out} (decoder_base_dim x dim_mult) "
                     f"cannot be regrouped by its shortcut: use dim_mult entries that divide each other")

    @staticmethod
    def _cells(stage: int, temporal: tuple[bool, ...]) -> int:
        """Voxels a resampling stage folds into one (t x 2 x 2); 1 for the last stage."""
        return (2 if temporal[stage] else 1) * 4 if stage < len(temporal) else 1

    @property
    def encoder_widths(self) -> list[int]:
        return [self.base_dim * m for m in (1, *self.dim_mult)]

    @property
    def decoder_widths(self) -> list[int]:
        return [self.decoder_base_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent along H and W: patchify times one 2x per resampling stage (16)."""
        return 2 * 2 ** len(self.temporal_downsample)  # 2x2 patchify

    @classmethod
    def preset(cls, name: str) -> VAEConfig:
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r} (allowed: {', '.join(VAE_PRESETS)})")
        return replace(VAE_PRESETS[name])


VAE_PRESETS: dict[str, VAEConfig] = {
    "wan2.2": VAEConfig(),
    # Same structure (every tensor kind, 48 latent channels for the tiny DiT), small widths.
    "tiny": VAEConfig(base_dim=16, decoder_base_dim=32),
    # The trained shapes-world VAE (`longlive train-vae train_vae_shapes`): narrow enough to decode
    # 4 s of 128x128 video in seconds on a CPU. The decoder is twice the encoder's width: at 8 it
    # stayed near 29.6 dB held out, at 16 it reached 31.65 dB for the same encoder and latents
    # (docs/models/shapes.md, 5n) and decodes the demo in ~1.8 s on one core.
    "shapes": VAEConfig(base_dim=8, decoder_base_dim=16, num_res_blocks=1),
}


# Wan's standard negative prompt: the unconditional branch of guidance for the official models.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走")


@dataclass
class StreamConfig:
    """Streaming inference. Defaults are the official inference config (configs/inference.yaml)."""

    frames_per_block: int = 8
    local_window_frames: int = 32
    sink_frames: int = 8
    multi_shot_sink: bool = True
    shot_rope_offset: float = 8.0
    sampling_steps: int = 4
    timestep_shift: float = 5.0
    guidance_scale: float = 1.0
    # The guidance's unconditional prompt (only read when guidance is on). "" is the empty prompt:
    # what a model trained with `data.caption_dropout` learnt as "no caption" (the offline presets).
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    # At a scene cut, drop the old shot's history before the cut chunk's recache (official
    # `shot_clean_recache`, off in every shipped config).
    shot_clean_recache: bool = False
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("frames_per_block", "local_window_frames", "sampling_steps",
                     "num_train_timesteps"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                     f"{name} must be a positive integer (got {value!r})")
        _require(isinstance(self.sink_frames, int) and self.sink_frames >= 0,
                 f"sink_frames must be an integer >= 0 (got {self.sink_frames!r})")
        _require(self.sampling_steps <= self.num_train_timesteps,
                 f"sampling_steps must be <= {self.num_train_timesteps} "
                 f"(got {self.sampling_steps})")
        _require(self.timestep_shift > 0, f"timestep_shift must be > 0 (got {self.timestep_shift})")
        _require(self.shot_rope_offset >= 0,
                 f"shot_rope_offset must be >= 0 (got {self.shot_rope_offset})")
        _require(self.guidance_scale >= 0,
                 f"guidance_scale must be >= 0, 1.0 disables guidance (got {self.guidance_scale})")
        # The cache must hold the protected prefix plus one new chunk, or rolling would have
        # nothing to keep; a pinned shot sink adds up to one more chunk to the prefix.
        needed = self.sink_frames + self.frames_per_block
        if self.pins_shot_sink:
            needed += min(self.sink_frames, self.frames_per_block)
        _require(self.local_window_frames >= needed,
                 f"local_window_frames must be >= {needed} (sink_frames + frames_per_block"
                 f"{' + shot sink' if self.pins_shot_sink else ''}) (got {self.local_window_frames})")

    @property
    def pins_shot_sink(self) -> bool:
        """Scene cuts pin the cut chunk as a shot sink (needs multi_shot_sink and a sink)."""
        return self.multi_shot_sink and self.sink_frames > 0

    @property
    def global_sink_frames(self) -> int:
        return self.sink_frames if self.multi_shot_sink else 0

    @property
    def uses_guidance(self) -> bool:
        # guidance_scale == 1 means no negative pass at all (not "CFG with weight 1").
        return self.guidance_scale != 1.0


@dataclass
class VideoConfig:
    """What to generate: pixel size and length in latent frames (24 fps output)."""

    height: int = 704
    width: int = 1280
    latent_frames: int = 128

    def __post_init__(self) -> None:
        check_types(self)
        multiple = VAE_SPATIAL_STRIDE * 2
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0 and value % multiple == 0,
                     f"{name} must be a positive multiple of {multiple} (VAE stride "
                     f"{VAE_SPATIAL_STRIDE} x patch 2) (got {value!r})")
        _require(isinstance(self.latent_frames, int) and self.latent_frames > 0,
                 f"latent_frames must be a positive integer (got {self.latent_frames!r})")

    @property
    def latent_height(self) -> int:
        return self.height // VAE_SPATIAL_STRIDE

    @property
    def latent_width(self) -> int:
        return self.width // VAE_SPATIAL_STRIDE

    @property
    def pixel_frames(self) -> int:
        return VAE_TEMPORAL_STRIDE * (self.latent_frames - 1) + 1


@dataclass
class RuntimeConfig:
    """Where and how to run: device, dtype, seed, attention kernel, compilation."""

    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    seed: int = 0
    # SDPA kernel family, or "fp8": self-attention over the KV window through FlashAttention-3's
    # FP8 kernel (per-head scales; Hopper; the fa3-fwd package, extra `fp8-attention`).
    attention: Literal["auto", "cudnn", "flash", "efficient", "math", "fp8"] = "auto"
    # torch.compile the DiT blocks and the VAE decoder: "auto" = on a GPU, when the video is long
    # enough to win back the compile time (core/optimize.py; bench measures steady state and
    # always compiles under "auto"); never on a CPU, where compiling costs more than it saves.
    compile: Literal["auto", "always", "never"] = "auto"

    def __post_init__(self) -> None:
        check_types(self)
        _require(self.device == "auto" or self.device == "cpu" or self.device == "cuda"
                 or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
                 f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")


SCALE_RULES = ("static_6", "static_4", "mse", "mae", "abs_max")


@dataclass
class QuantSettings:
    """Low-precision storage of the DiT's 300 block linears and of the KV cache (applied from
    outside `core` by the builder, `longlive_cli/build.py`).

    `precision` is the one flag for inference and training. `mode` and `rule` choose the NVFP4
    inference kernels (see `QuantMode`); training with `precision: nvfp4` always runs the official
    AR rules (emulated fprop/dgrad/wgrad, `quant.linear.ar_training_config`)."""

    precision: Precision = Precision.bf16
    mode: QuantMode = QuantMode.w4a16
    rule: str = "mse"
    kv_precision: KVPrecision = KVPrecision.bf16
    kv_rule: str = "mse"

    def __post_init__(self) -> None:
        check_types(self)
        for key in ("rule", "kv_rule"):
            _require(getattr(self, key) in SCALE_RULES,
                     f"{key} must be one of {', '.join(SCALE_RULES)} (got {getattr(self, key)!r})")

    @property
    def label(self) -> str:
        """What the summaries call the storage, e.g. "nvfp4 w4a16 (mse), kv nvfp4 (mse)"."""
        weights = {Precision.nvfp4: f"nvfp4 {self.mode} ({self.rule})", Precision.fp8: "fp8 w8a8"}.get(
            self.precision, "")
        kv = {KVPrecision.nvfp4: f"kv nvfp4 ({self.kv_rule})", KVPrecision.fp8: "kv fp8"}.get(self.kv_precision, "")
        return ", ".join(part for part in (weights, kv) if part)


@dataclass
class Recipe:
    """A complete run description. `preset` names the model preset the `model` section edits."""

    preset: str = "wan2.2-ti2v-5b"
    model: ModelConfig = field(default_factory=ModelConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    quant: QuantSettings = field(default_factory=QuantSettings)

    def __post_init__(self) -> None:
        check_types(self)

    @property
    def vae(self) -> VAEConfig:
        """The VAE that goes with the model preset (tiny -> tiny, shapes -> shapes, else Wan2.2)."""
        return VAEConfig.preset(self.preset if self.preset in OFFLINE_PRESETS else "wan2.2")

    @classmethod
    def preset_recipe(cls, name: str) -> Recipe:
        """The built-in recipe of a preset: `wan2.2-ti2v-5b` (official), `tiny` or `shapes` (CPU)."""
        model = ModelConfig.preset(name)
        if name in OFFLINE_PRESETS:
            # the shipped shapes generator is an AR model, not distilled: it draws the shape only with
            # guidance against its unconditional (empty-prompt) mode, and 16 steps are the fewest at
            # which its probe meets every goal on the prompts (docs/models/shapes.md 5h-5j); a
            # distilled LoRA runs with its own steps and guidance_scale=1. No RoPE shift at a scene
            # cut: AR teacher forcing never shifts (as the official AR stage; the official +8 per shot
            # is what its DMD rollouts teach), and with +8 a list's third shot fell back to the first
            # shot's attributes (the multishot probe, 5k)
            stream = StreamConfig(negative_prompt="", guidance_scale=3.0, sampling_steps=16, shot_rope_offset=0.0) \
                if name == "shapes" else StreamConfig(negative_prompt="")
            return cls(preset=name, model=model, stream=stream,
                       video=VideoConfig(height=128, width=128, latent_frames=24))
        return cls(preset=name, model=model)


# ----------------------------------------------------------------------------------------------
# Recipe loading: YAML (OmegaConf) -> plain dict -> checked overlay onto the preset's dataclasses.


def overlay(instance: Any, updates: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass `instance` with `updates` applied, checking keys and types."""
    if not isinstance(updates, dict):
        raise ValueError(f"'{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {updates!r}")
    names = [f.name for f in fields(instance)]
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown key '{full}' (allowed: {', '.join(names)})")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = overlay(current, value, f"{full}.")
        else:
            changes[key] = value
    try:
        return dataclasses.replace(instance, **changes)
    except ConfigError as err:  # __post_init__ names the field; add the section path
        raise ConfigError(f"{prefix}{err.key}", err.detail) from None
    except ValueError as err:  # the section path, unless the message already names it ("data.x ...", "dmd: ...")
        section, message = prefix.rstrip("."), str(err)
        named = not prefix or message.startswith((f"{section}.", f"{section}:"))
        raise ValueError(message if named else f"{prefix}{message}") from None


def find_recipe(name_or_path: str) -> Path:
    """A recipe file path, or the name of a bundled recipe (`recipes/NAME.yaml`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    bundled = Path(__file__).resolve().parent.parent / "recipes" / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml", ".yml") and path.parent == Path(".") and bundled.exists():
        return bundled
    raise FileNotFoundError(
        f"recipe {name_or_path!r} not found: give a .yaml path or a bundled recipe name "
        f"({', '.join(sorted(p.stem for p in bundled.parent.glob('*.yaml')))})")


def read_recipe_data(source: str | Path | None, overrides: typing.Sequence[str]) -> tuple[dict[str, Any], str]:
    """A recipe file (optional) merged with `--set key=value` overrides, as a plain dict, and
    where it came from. Raises ValueError/FileNotFoundError with one-line messages."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from core.errors import first_line

    data: dict[str, Any] = {}
    origin = "recipe"
    if source is not None:
        path = find_recipe(str(source))
        origin = str(path)
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except yaml.MarkedYAMLError as err:
            where = f" at line {err.problem_mark.line + 1}" if err.problem_mark else ""
            raise ValueError(f"cannot read recipe {path}: {err.problem or err.context}{where}: "
                             f"fix the YAML syntax") from None
        except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read recipe {path}: {first_line(err)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"recipe {path} must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        for item in overrides:
            if "=" not in item or not item.split("=", 1)[0].strip():
                raise ValueError(f"bad --set {item!r}: use key=value, e.g. stream.sampling_steps=2")
        try:
            extra = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
            data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(data),
                                                          OmegaConf.create(extra)), resolve=True)
        except OmegaConfBaseException as err:
            raise ValueError(f"bad --set override: {first_line(err)}") from None
    return data, origin


def pop_preset(data: dict[str, Any], preset: str | None, default: str) -> str:
    name = preset or data.pop("preset", None) or default
    if preset and "preset" in data:
        data.pop("preset")
    if not isinstance(name, str) or name not in MODEL_PRESETS:
        raise ValueError(f"bad value for 'preset': {name!r} (allowed: {', '.join(MODEL_PRESETS)})")
    return name


def load_training_recipe(recipe_type: type, source: str | Path | None, overrides: typing.Sequence[str] = ()):
    """YAML recipe + `--set` overrides -> a validated `recipe_type` (a training recipe dataclass
    with `preset` and `model` fields: the preset's model first, then the file, then the
    overrides). One-line ValueError naming the file."""
    data, origin = read_recipe_data(source, overrides)
    preset = pop_preset(data, None, recipe_type.preset)
    base = recipe_type(preset=preset, model=ModelConfig.preset(preset))
    try:
        return overlay(base, data)
    except ValueError as err:
        raise ValueError(f"{origin}: {err}") if source is not None else err from None


def load_recipe(source: str | Path | None = None, overrides: typing.Sequence[str] = (),
                preset: str | None = None) -> Recipe:
    """Load a recipe: `preset` (or the file's `preset:` key) first, then the file, then
    `--set key=value` overrides. Raises ValueError/FileNotFoundError with one-line messages."""
    data, origin = read_recipe_data(source, overrides)
    preset_name = pop_preset(data, preset, Recipe.preset)
    try:
        return overlay(Recipe.preset_recipe(preset_name), data)
    except ValueError as err:
        raise ValueError(f"{origin}: {err}") if source is not None else err from None
