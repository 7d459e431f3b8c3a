"""`--precision nvfp4` / `--kv-precision nvfp4`: the recipe's `quant` section -> `ModelHooks`
that load the DiT with NVFP4 block linears and store the KV cache in NVFP4 (the CLI is where
`core` and `quant` meet; design.md §2)."""

from __future__ import annotations

from pathlib import Path

import torch

from core.config import Recipe
from core.dit import CausalWanDiT, random_init_
from core.hooks import ModelHooks


def model_hooks(recipe: Recipe) -> ModelHooks:
    quant = recipe.quant
    if quant.precision == "bf16" and quant.kv_precision == "bf16":
        return ModelHooks()
    load_dit = cache_transform = None
    if quant.precision == "nvfp4":
        from quant.linear import QuantConfig, check_mode_supported

        qconfig = QuantConfig(mode=quant.mode, weight_rule=quant.rule, activation_rule=quant.rule)
        check_mode_supported(qconfig.mode, recipe.runtime.device)

        def load_dit(config, checkpoint, lora, device, dtype, seed):
            return nvfp4_dit(config, qconfig, checkpoint, lora, device, dtype, seed)
    if quant.kv_precision == "nvfp4":
        from quant.kv import WindowBuffer, quantize_kv_cache

        window = WindowBuffer()  # one dequantized window shared by every layer and cache

        def cache_transform(cache, device):
            return quantize_kv_cache(cache, rule=quant.kv_rule, window=window, device=device)
    return ModelHooks(label=quant.label, load_dit=load_dit, cache_transform=cache_transform)


def nvfp4_dit(config, qconfig, checkpoint: Path | None, lora: Path | None, device: torch.device,
              dtype: torch.dtype, seed: int) -> CausalWanDiT:
    """An NVFP4 file loads packed; a bf16 file (+ LoRA, merged first) is quantized after loading;
    no checkpoint gives the seeded random weights, quantized one block at a time so the bf16
    model never exists whole on the device."""
    from quant.linear import is_nvfp4_file, load_quantized, quantize_model

    if checkpoint is not None and is_nvfp4_file(checkpoint):
        return load_quantized(checkpoint, config, qconfig.mode, device, dtype).eval()
    if checkpoint is not None or lora is not None:
        from core.checkpoint import build_generator

        model = build_generator(config, checkpoint, lora, device=device, dtype=dtype, seed=seed)
        model = quantize_model(model, qconfig)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return model.eval()
    with torch.device("meta"):
        model = CausalWanDiT(config).to(dtype)
    index_of = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    for name, child in model.named_children():
        if name != "blocks":
            child.to_empty(device=device)
    random_init_(model, seed, index_of=index_of)  # everything but the (still meta) blocks
    for index, block in enumerate(model.blocks):
        block.to_empty(device=device)
        prefix = f"blocks.{index}."
        random_init_(model, seed, prefix=prefix, index_of=index_of)
        quantize_model(model, qconfig, filter=lambda name, module, prefix=prefix: name.startswith(prefix))
    return model.eval()
