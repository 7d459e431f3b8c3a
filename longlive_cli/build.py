"""The one place where `core` and `quant` meet to make a DiT: a typed spec in, a ready model out.

`build_dit(spec)` is used by every command that needs the generator (generate, multishot, bench,
train-ar, convert-nvfp4, distill). It builds the `CausalWanDiT` on `meta` (the only construction
outside `core/dit.py`), fills it from a checkpoint (bf16, official layouts, or a packed NVFP4
file) or with seeded random weights, merges a LoRA in fp32, casts, swaps the block linears for
the spec's precision, and returns the model with the KV-cache storage that goes with it.

`check_dit_spec(spec)` runs first, cheaply, before anything heavy: file existence, packed-file
rules and the Blackwell gate of `--quant-mode native` are checked once, here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.checkpoint import (
    check_lora,
    check_state_dict,
    load_generator,
    merge_lora,
    read_lora_sampling,
    read_lora_shapes,
    read_lora_state_dict,
    read_shapes,
)
from core.config import KVPrecision, ModelConfig, Precision, QuantMode, QuantSettings, Recipe, StreamConfig
from core.dit import CausalWanDiT, count_parameters, random_init_
from core.errors import UserError
from core.generate import GenerateRequest, Models, Placement
from core.kv_cache import StorageFactory
from core.pipeline import BuiltDiT


def meta_dit(config: ModelConfig) -> CausalWanDiT:
    """A `CausalWanDiT` with no storage (on `meta`): every model of the toolkit starts here."""
    with torch.device("meta"):
        return CausalWanDiT(config)


@dataclass(frozen=True)
class DiTSpec:
    """Everything that decides the DiT a run gets. `checkpoint` None: seeded random weights."""

    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    checkpoint: Path | None = None
    lora: Path | None = None
    quant: QuantSettings = field(default_factory=QuantSettings)
    seed: int = 0
    use_ema: bool = False
    compile: bool = False  # torch.compile the blocks (core/optimize.py)
    fp8_attention: bool = False  # the KV window attended by FA3's FP8 kernel (`runtime.attention: fp8`)

    @classmethod
    def from_recipe(cls, recipe: Recipe, device: torch.device, dtype: torch.dtype, *,
                    checkpoint: Path | None = None, lora: Path | None = None, compile: bool = False) -> DiTSpec:
        return cls(recipe.model, device, dtype, checkpoint=checkpoint, lora=lora, quant=recipe.quant,
                   seed=recipe.runtime.seed, compile=compile, fp8_attention=recipe.runtime.attention == "fp8")


def is_packed(path: Path | None) -> bool:
    """A packed NVFP4 file of ours (`longlive convert-nvfp4`)."""
    from quant.packed import is_nvfp4_file  # quant is imported only by runs that may need it

    return path is not None and is_nvfp4_file(path)


def lora_sampling_note(lora: Path | None, stream: StreamConfig) -> str | None:
    """One line when a distilled LoRA runs with other sampling than it was distilled for (its file
    records the steps and, since 2026-12-06, the timestep shift; a student always samples without
    guidance): not an error, a user may mean it."""
    recorded = read_lora_sampling(lora) if lora is not None else {}
    steps, shift = recorded.get("sampling_steps"), recorded.get("timestep_shift", stream.timestep_shift)
    if steps is None or (stream.sampling_steps == steps and stream.timestep_shift == shift
                         and not stream.uses_guidance):
        return None
    now, fix = f"{stream.sampling_steps} steps", []
    if stream.sampling_steps != steps:
        fix.append(f"--steps {steps}" if steps in (2, 4) else f"--set stream.sampling_steps={steps}")
    if stream.timestep_shift != shift:
        now += f" at timestep shift {stream.timestep_shift:g}"
        fix.append(f"--set stream.timestep_shift={shift:g}")
    if stream.uses_guidance:
        now += f" with guidance {stream.guidance_scale:g}"
        fix.append("--set stream.guidance_scale=1")
    at_shift = f" at timestep shift {shift:g}" if "timestep_shift" in recorded else ""
    return (f"note: the LoRA {lora} was distilled for {steps} steps{at_shift} without guidance; this run "
            f"samples {now} (for the distilled setting: {' '.join(fix)})")


def show_lora_sampling_note(lora: Path | None, stream: StreamConfig) -> None:
    """`lora_sampling_note` on stderr, before any model, when there is one."""
    if (note := lora_sampling_note(lora, stream)) is not None:
        from rich.console import Console

        Console(stderr=True).print(note, highlight=False, markup=False, soft_wrap=True)


def check_dit_spec(spec: DiTSpec) -> None:
    """Every check that needs no model, one line each (UserError)."""
    for path, flag in ((spec.checkpoint, "--checkpoint"), (spec.lora, "--lora")):
        if path is not None and not path.exists():
            raise UserError(f"{flag} {path} not found: check the path")
    if spec.checkpoint is not None and not is_packed(spec.checkpoint):
        # names and shapes from the header / memory-mapped pickle: a wrong file fails in a second
        check_state_dict(meta_dit(spec.config), read_shapes(spec.checkpoint, use_ema=spec.use_ema),
                         str(spec.checkpoint))
    if is_packed(spec.checkpoint):
        if spec.quant.precision != Precision.nvfp4:
            raise UserError(f"--checkpoint {spec.checkpoint} is a packed NVFP4 file: add --precision nvfp4")
        if spec.lora is not None:
            raise UserError(f"--lora cannot be merged into the packed NVFP4 file {spec.checkpoint}: convert the "
                            f"bf16 checkpoint with `longlive convert-nvfp4 --lora` instead")
    if spec.lora is not None:  # pairs and shapes against the meta model, from the header / mmapped pickle
        check_lora(meta_dit(spec.config), read_lora_shapes(spec.lora), str(spec.lora))
    if spec.quant.precision == Precision.nvfp4 and spec.quant.mode == QuantMode.native:
        from quant.linear import check_native_supported

        check_native_supported(spec.device)
    if spec.quant.precision == Precision.fp8:
        from quant.fp8 import check_fp8_supported

        check_fp8_supported(spec.device)
    if spec.fp8_attention:
        _fp8_attention(spec.device)  # loads the kernel package: a one-line error if it is missing


def build_dit(spec: DiTSpec) -> BuiltDiT:
    """The ready model (eval mode) and its KV-cache storage. Run `check_dit_spec` first."""
    model = meta_dit(spec.config)
    parameters = count_parameters(model)
    quantize = _block_quantizer(spec)
    if is_packed(spec.checkpoint):
        from quant.packed import load_packed

        model = load_packed(spec.checkpoint, model, spec.quant.mode).to(device=spec.device, dtype=spec.dtype)
    elif spec.checkpoint is not None or spec.lora is not None:
        model = _load(model, spec)
        if quantize is not None:
            quantize(model, "")
    else:  # random weights, block by block: a quantized 5B never exists whole in bf16
        _materialize_random(model, spec, quantize)
    if spec.device.type == "cuda":
        torch.cuda.empty_cache()
    if spec.compile:
        from core.optimize import compile_blocks

        compile_blocks(model)
    label = ", ".join(filter(None, (spec.quant.label, "attention fp8" if spec.fp8_attention else "")))
    return BuiltDiT(model.eval(), _kv_storage(spec), label, parameters, spec.compile)


def _load(model: CausalWanDiT, spec: DiTSpec) -> CausalWanDiT:
    if spec.checkpoint is not None:
        load_generator(model, spec.checkpoint, use_ema=spec.use_ema)
    else:
        model.to_empty(device=spec.device)
        random_init_(model, spec.seed)
    if spec.lora is not None:
        # Merge from fp32 weights like the official inference (it merges before the bf16 cast), so
        # W' is rounded to the working dtype once; on the target device, so the 5B's fp32 copy
        # lands in GPU memory rather than host memory.
        model = merge_lora(model.to(device=spec.device, dtype=torch.float32),
                           read_lora_state_dict(spec.lora), source=str(spec.lora))
    return model.to(device=spec.device, dtype=spec.dtype)


def _materialize_random(model: CausalWanDiT, spec: DiTSpec,
                        quantize: Callable[[CausalWanDiT, str], None] | None) -> None:
    """Seeded random weights (`random_init_`, by parameter index), one block at a time, each block
    quantized as soon as it exists."""
    index_of = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    model.to(spec.dtype)
    for name, child in model.named_children():
        if name != "blocks":
            child.to_empty(device=spec.device)
    random_init_(model, spec.seed, index_of=index_of)  # everything but the (still meta) blocks
    for index, block in enumerate(model.blocks):
        block.to_empty(device=spec.device)
        prefix = f"blocks.{index}."
        random_init_(model, spec.seed, prefix=prefix, index_of=index_of)
        if quantize is not None:
            quantize(model, prefix)


def _block_quantizer(spec: DiTSpec) -> Callable[[CausalWanDiT, str], None] | None:
    """`quantize(model, prefix)`: swap the selected linears under `prefix` for the spec's precision
    (weights quantized from their current values: any LoRA is merged by then)."""
    if spec.quant.precision == Precision.bf16:
        return None
    if spec.quant.precision == Precision.fp8:
        from quant.fp8 import FP8Config, quantize_fp8

        fp8 = FP8Config()
        return lambda model, prefix: quantize_fp8(model, fp8, filter=lambda name, _: name.startswith(prefix))
    from quant.linear import NVFP4Config, quantize_model

    nvfp4 = NVFP4Config(mode=spec.quant.mode, weight_rule=spec.quant.rule, activation_rule=spec.quant.rule)
    return lambda model, prefix: quantize_model(model, nvfp4, filter=lambda name, _: name.startswith(prefix))


def _kv_storage(spec: DiTSpec) -> StorageFactory | None:
    """The KV cache format: dense, NVFP4 slots or FP8 codes, attended by SDPA or the FP8 kernel
    (which reads an FP8 cache's codes as they are stored)."""
    if spec.quant.kv_precision == KVPrecision.fp8:
        from quant.fp8_kv import fp8_storage

        return fp8_storage(_fp8_attention(spec.device).attend_cached if spec.fp8_attention else None)
    attention = {"attention": _fp8_attention(spec.device)} if spec.fp8_attention else {}
    if spec.quant.kv_precision == KVPrecision.nvfp4:
        from quant.kv import nvfp4_storage

        return nvfp4_storage(spec.quant.kv_rule, **attention)  # one dequantized window for every cache
    if attention:
        from core.kv_cache import LayerKV

        return functools.partial(LayerKV, **attention)
    return None


def _fp8_attention(device: torch.device):
    """FlashAttention-3's FP8 forward (per-head scales); a one-line UserError off CUDA or when the
    fa3-fwd package is missing."""
    if device.type != "cuda":
        raise UserError("--attention fp8 runs FlashAttention-3's FP8 kernel on a Hopper GPU: use --device cuda, "
                        "or another --attention on a CPU")
    from quant.fp8_attention import fp8_attention

    return fp8_attention("fa3")


# ----------------------------------------------------------------------------------------------
# The models of a generate / multishot run.


def generation_spec(request: GenerateRequest, placement: Placement) -> DiTSpec:
    """The DiT a generation request asks for; blocks compiled on a GPU when the video is long
    enough to win the compile time back (`runtime.compile: auto`)."""
    from core.optimize import DIT_BREAK_EVEN_CHUNKS, wants_compile

    recipe = request.recipe
    compile_blocks = wants_compile(recipe.runtime.compile, placement.device, request.schedule.num_chunks,
                                   DIT_BREAK_EVEN_CHUNKS)
    return DiTSpec.from_recipe(recipe, placement.device, placement.dtype, checkpoint=placement.checkpoint,
                               lora=request.lora, compile=compile_blocks)


def build_models(request: GenerateRequest, placement: Placement, spec: DiTSpec) -> Models:
    """DiT (`build_dit`), VAE and text encoder: seeded random weights for the tiny preset
    (offline), the trained files for the shapes preset, the model folder's files for the 5B."""
    if placement.device.type == "cuda":
        torch.cuda.set_device(placement.device)
    text = _text_encoder(request, placement)
    vae = _vae(request, placement)
    return Models(build_dit(spec), vae, text)


def _text_encoder(request: GenerateRequest, placement: Placement):
    from core.text import TextEncoder

    if placement.shapes is not None:
        return _shapes_text_encoder(placement.shapes.text_encoder, placement.device)
    if placement.files is None:
        return TextEncoder.tiny(seed=request.recipe.runtime.seed, device=placement.device)
    return TextEncoder.from_model_dir(placement.files.text_encoder_dir, device=placement.device)


def _shapes_text_encoder(path: Path, device: torch.device):
    """The tiny umt5 the shapes generator was trained with, from its file (not from the seed)."""
    from core.text import ByteTokenizer, TextEncoder, TextEncoderConfig

    config = TextEncoderConfig.preset("tiny")
    return TextEncoder.from_wan_checkpoint(path, ByteTokenizer(config.text_len), config=config, device=device)


def _vae(request: GenerateRequest, placement: Placement):
    from core.optimize import VAE_BREAK_EVEN_CHUNKS, compile_vae_decoder, wants_compile
    from core.vae import load_vae, random_vae

    recipe = request.recipe
    if placement.shapes is not None:
        vae = load_vae(placement.shapes.vae, recipe.vae, device=placement.vae_device, dtype=placement.dtype)
    elif placement.files is None:
        vae = random_vae(recipe.vae, recipe.runtime.seed, device=placement.vae_device, dtype=placement.dtype)
    else:
        vae = load_vae(placement.files.vae, recipe.vae, device=placement.vae_device, dtype=placement.dtype)
    if wants_compile(recipe.runtime.compile, placement.vae_device, request.schedule.num_chunks,
                     VAE_BREAK_EVEN_CHUNKS):
        compile_vae_decoder(vae)
    return vae


def build_rank_models(request: GenerateRequest, placement: Placement, spec: DiTSpec, mesh) -> Models:
    """The models of one rank of a parallel run (`sp.mesh.InferenceMesh`): the DiT under the SP plan
    (`sp/inference.py`: this rank's frames, its heads of the cache, its guidance branch); the text
    encoder on the replica root only, its output broadcast; the VAE on the root (or, with
    `--decode split`, on every rank, each decoding a band: `sp/vae_split.py`)."""
    from sp.inference import apply_inference_sp
    from sp.replica import ReplicaTextEncoder, ReplicaVAE
    from sp.vae_split import GatheredBandDecoder

    if placement.device.type == "cuda":
        torch.cuda.set_device(placement.device)
    root, group = mesh.replica_root, mesh.replica_group
    split = request.decode.kind == "split"
    text = _text_encoder(request, placement) if mesh.is_replica_root else None
    vae = _vae(request, placement) if mesh.is_replica_root or split else None
    decoders = (lambda: GatheredBandDecoder(vae, group, root)) if split else None
    dit = apply_inference_sp(build_dit(spec), mesh.sp_group, mesh.cfg_group)
    return Models(dit, ReplicaVAE(vae, group, root, placement.device, placement.dtype, decoders),
                  ReplicaTextEncoder(text, group, root, placement.device))
