"""Shared fixtures: tiny configs with deterministic, non-trivial random weights."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

# Bytecode caches on, whatever the environment says (some images set PYTHONDONTWRITEBYTECODE): the
# suite starts ~100 Python processes (CLI runs, ranks, scripts), each of which would compile our
# modules again, and each xdist worker would re-rewrite every test module's asserts (~8 s a worker).
# Set before our modules are imported; the workers and every process they start inherit it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

from core.config import ModelConfig, StreamConfig  # noqa: E402 (after the bytecode switch)
from core.dit import CausalWanDiT, random_init_  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's command): the workers share the machine's cores, so each, and
    # every process it starts (the CLI runs inherit the variable), uses one thread; two threads
    # each would oversubscribe a 2-core machine and run slower than one worker.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The streaming configuration of the outside checks: 2 frames per block, a 6-frame window
# (3 chunks), a 2-frame sink, 4 steps.
SMALL_STREAM = dict(frames_per_block=2, local_window_frames=6, sink_frames=2, sampling_steps=4)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> CausalWanDiT:
    config = ModelConfig.preset("tiny")
    for key, value in overrides.items():
        setattr(config, key, value)
    model = CausalWanDiT(ModelConfig(**config.__dict__)).eval()
    return random_init_(model, seed).to(dtype)


def random_lora(rank: int, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A random LoRA (official keys) for every block linear of `tiny_model()`: A ~ N(0, 1),
    B ~ N(0, scale^2)."""
    from core.checkpoint import block_linear_names

    generator, model, lora = torch.Generator().manual_seed(seed), tiny_model(), {}
    for name in block_linear_names(len(model.blocks)):
        linear = model.get_submodule(name)
        lora[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator)
        lora[f"base_model.model.{name}.lora_B.weight"] = scale * torch.randn(linear.out_features, rank,
                                                                              generator=generator)
    return lora


@pytest.fixture
def model() -> CausalWanDiT:
    return tiny_model()


@pytest.fixture
def small_stream() -> StreamConfig:
    return StreamConfig(**SMALL_STREAM)


def text_context(batch: int, seed: int, length: int = 24, text_dim: int = 64) -> torch.Tensor:
    """A text-encoder-like context: `length` nonzero rows, zero-padded to 512 slots."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(batch, 512, text_dim)
    ctx[:, :length] = torch.randn(batch, length, text_dim, generator=g)
    return ctx


@pytest.fixture
def fast_decode(monkeypatch):
    """Grey frames of the right count and size instead of the VAE decode, for tests about what
    happens around decoding (writing, progress, interrupts): the tiny VAE is the slow part."""
    import numpy as np

    from core.config import VAE_SPATIAL_STRIDE, VAE_TEMPORAL_STRIDE
    from core.decode import SyncDecoder

    def submit(self, latents_BfCHW):
        first = not self.__dict__.get("_started", False)
        self._started = True
        frames = VAE_TEMPORAL_STRIDE * latents_BfCHW.shape[1] - (VAE_TEMPORAL_STRIDE - 1 if first else 0)
        height, width = (VAE_SPATIAL_STRIDE * n for n in latents_BfCHW.shape[-2:])
        self.sink(np.full((frames, height, width, 3), 128, np.uint8))

    monkeypatch.setattr(SyncDecoder, "submit", submit)


@contextlib.contextmanager
def torch_threads(count: int):
    """Tiny CPU kernels are latency bound: one thread is several times faster than a busy pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_cli_here(*argv: str) -> int:
    """`longlive ARGV` in this process, as a CLI run with OMP_NUM_THREADS=1 would compute it (one
    thread), for a reference run whose result a test compares with a run in another process: it
    saves that process's start-up (~8 s of imports for a training run). The global switches a run
    may turn (the thread count, deterministic algorithms, the RNGs) are put back after it."""
    import random

    from longlive_cli.app import main

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng, python_rng = torch.get_rng_state(), random.getstate()
    try:
        with torch_threads(1):
            return main(list(argv))
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_rng_state(rng)
        random.setstate(python_rng)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    with torch_threads(1):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A module fixture's files, made once per test run: under pytest-xdist every worker that runs
    one of the module's tests would set the fixture up again (worksteal splits modules), so the
    first makes `make(folder)` under a file lock in the run's shared temp folder and the others
    wait for it and read the same files."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' folders sit side by side in the run's folder
    folder = root / f"made-once-{name}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / "DONE").exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            (folder / "DONE").touch()
    return folder


def spawn_ranks(run, preload: str, world: int, out: Path) -> list[dict]:
    """`run(rank, world, port, out)` on `world` gloo processes; each saves `out/rank{r}.pt`.
    forkserver: the workers fork from one clean process that has imported `preload` (and torch)
    once (spawn would import it in every worker; fork would copy this process's threads)."""
    multiprocessing.set_forkserver_preload([preload])
    mp.start_processes(run, args=(world, free_port(), str(out)), nprocs=world, start_method="forkserver")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def hf_umt5(config, wan: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """transformers' own `UMT5EncoderModel` (eager attention) holding copies of the Wan-named
    `wan` (a `core.text.TextEncoderConfig`'s shapes), in eval mode and `dtype`: the reference the
    encoder of core/umt5.py is checked against, and the writer of HF folders in the tests."""
    from transformers import UMT5EncoderModel

    from core.text import wan_to_hf_keys

    model = UMT5EncoderModel(config.to_hf()).eval()
    model.load_state_dict(wan_to_hf_keys({k: v.clone() for k, v in wan.items()}), strict=True)
    return model.to(dtype)
