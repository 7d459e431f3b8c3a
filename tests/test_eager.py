"""Cache storages stay eager inside compiled blocks (core/eager.py), marked without importing
torch._dynamo at import time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from core.config import StreamConfig
from core.eager import apply_eager_methods, eager_method
from core.kv_cache import LayerKV
from core.pipeline import generate_latents
from tests.conftest import SMALL_STREAM, text_context, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_the_cli_starts_without_importing_dynamo():
    code = "import sys, longlive_cli.app; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_marked_methods_are_wrapped_once_applied_also_for_later_classes():
    class Early:
        @eager_method
        def f(self):
            return 1

    apply_eager_methods()
    apply_eager_methods()  # idempotent

    class Late:
        @eager_method
        def f(self):
            return 2

    for cls, value in ((Early, 1), (Late, 2)):
        assert getattr(cls.__dict__["f"], "__eager_method__", False) and cls().f() == value
    assert getattr(LayerKV.__dict__["update_and_attend"], "__eager_method__", False)


def test_compiled_blocks_stream_like_eager_and_do_not_retrace_per_chunk():
    """Blocks compiled (dynamo, no code generation) with the cache outside the graphs: the same
    latents as eager, and a longer video (more cache positions, eviction) compiles no more graphs."""
    from torch._dynamo.utils import counters

    stream = StreamConfig(**SMALL_STREAM)
    noise = torch.randn(1, 12, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    contexts = [text_context(1, i) for i in range(6)]
    model = tiny_model()
    expected = generate_latents(model, noise, contexts, stream)
    apply_eager_methods()
    torch._dynamo.reset()
    for block in model.blocks:
        block.compile(backend="eager", dynamic=False)
    short = generate_latents(model, noise[:, :6], contexts[:3], stream)
    graphs_short = counters["stats"]["unique_graphs"]
    compiled = generate_latents(model, noise, contexts, stream)
    assert torch.equal(short, expected[:, :6]) or torch.allclose(short, expected[:, :6], atol=1e-6)
    assert torch.allclose(compiled, expected, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs_short


def test_building_the_cpu_models_imports_nothing_heavy():
    """What every generation builds (the text encoder and its first prompt, a DiT on meta for the
    checkpoint check, a LoRA merge, the VAE) and what distillation adds (adapters attached) pull in
    neither transformers, PEFT nor torch's compiler stack: those imports cost seconds of each
    start-up (the README demo's included)."""
    code = """
import sys, torch
from core.checkpoint import merge_lora
from core.config import ModelConfig, VAEConfig
from core.text import TextEncoder
from core.train.lora import attach_lora
from core.vae import WanVAE
from longlive_cli.build import meta_dit
from tests.conftest import random_lora, tiny_model
TextEncoder.tiny().encode(["a red circle moves left to right on a blue background"])
meta_dit(ModelConfig.preset("shapes"))
merge_lora(tiny_model(), random_lora(4, 0))
attach_lora(tiny_model(), rank=4, alpha=4, dropout=0.0, seed=0)
with torch.device("meta"):
    WanVAE(VAEConfig.preset("shapes"))
heavy = ("transformers", "peft", "torch._dynamo", "sympy", "torch.distributed.checkpoint")
print([name for name in heavy if name in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
