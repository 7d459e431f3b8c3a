"""Worker side of tests/test_sp_inference.py: streaming generation scenarios of the tiny model,
run in one process (the reference) or on gloo ranks under an inference mesh (`sp.mesh.InferenceMesh`).

Each worker builds every mesh of its world size, runs every scenario under it and saves its
latents to `<out_dir>/rank<r>.pt`; the test compares them with the one-process latents.

Legend: B batch, F latent frames, C latent channels, H/W latent size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.config import QuantMode, StreamConfig, VAEConfig
from core.generate import image_latent
from core.interactive import Switch
from core.pipeline import BuiltDiT, stream_latents
from core.vae import random_vae
from quant.fp8 import quantize_fp8
from quant.fp8_kv import fp8_storage
from quant.kv import nvfp4_storage
from quant.linear import NVFP4Config, quantize_model
from sp.inference import apply_inference_sp
from sp.mesh import InferenceMesh
from sp.replica import BroadcastFeed, ReplicaTextEncoder, ReplicaVAE
from sp.vae_split import GatheredBandDecoder
from tests.conftest import text_context, tiny_model

SIZE = 8  # latent height = width: 16 tokens per frame
FPB = 4  # frames per block: divisible by sp 2 and 4


@dataclass(frozen=True)
class Scenario:
    """One streamed video: 4-frame chunks, a 3-chunk window with a 1-chunk sink (chunks 3.. evict)."""

    chunks: int = 5
    cuts: tuple[int, ...] = ()  # chunks that start a new shot (new prompt, pinned shot sink)
    switch_at: int | None = None  # an interactive prompt switch before this chunk
    guidance: float = 1.0
    nvfp4_kv: bool = False
    fp8_kv: bool = False  # per-head running scales: each rank's heads scale alone, as in one process
    weights: str = "bf16"  # or "nvfp4" (w4a16 block linears) or "fp8"
    image: bool = False  # image-to-video: frame 0 clean (t = 0), the chunk's frames on different timesteps
    window_frames: int = 3 * FPB
    seed: int = 0

    @property
    def stream(self) -> StreamConfig:
        return StreamConfig(frames_per_block=FPB, local_window_frames=self.window_frames, sink_frames=FPB,
                            sampling_steps=2, guidance_scale=self.guidance)


SCENARIOS = {
    "eviction": Scenario(seed=1),
    "cuts": Scenario(cuts=(2, 4), seed=2),
    "switch": Scenario(switch_at=3, seed=3),
    "guidance": Scenario(guidance=3.0, cuts=(3,), seed=4),
    "nvfp4": Scenario(nvfp4_kv=True, cuts=(3,), seed=5),
    "nvfp4_guidance_switch": Scenario(nvfp4_kv=True, guidance=2.0, switch_at=4, seed=6),
    "nvfp4_weights": Scenario(weights="nvfp4", chunks=4, seed=7),
    "fp8_weights": Scenario(weights="fp8", chunks=4, seed=8),
    "fp8_kv": Scenario(fp8_kv=True, cuts=(3,), switch_at=4, seed=10),
    "image": Scenario(image=True, chunks=4, seed=9),
}
CFG_SCENARIOS = ("guidance", "nvfp4_guidance_switch")  # the ones with two branches


def layouts(world: int) -> dict[str, tuple[int, int]]:
    """(sp, cfg) layouts of a world: all ranks in one SP group, and two branch groups."""
    return {f"sp{world}": (world, 1), f"cfg2_sp{world // 2}": (world // 2, 2)}


@torch.no_grad()
def generate(scenario: Scenario, built: BuiltDiT) -> torch.Tensor:
    """The scenario's latents `[B, F, C, H, W]` from `built` (any plan applied)."""
    g = torch.Generator().manual_seed(scenario.seed)
    noise = torch.randn(1, scenario.chunks * FPB, 48, SIZE, SIZE, generator=g)
    prompts = [text_context(1, 100 + scenario.seed * 10 + sum(c >= cut for cut in scenario.cuts))
               for c in range(scenario.chunks)]
    cuts = [c in scenario.cuts for c in range(scenario.chunks)]
    negative = text_context(1, 99) if scenario.guidance != 1.0 else None
    switched = text_context(1, 98)
    image = torch.randn(1, 1, 48, SIZE, SIZE, generator=g) if scenario.image else None
    chunks = stream_latents(built.model, noise, prompts, scenario.stream, cuts, image_latent=image,
                            negative_context=negative,
                            prompt_switch=lambda c: switched if c == scenario.switch_at else None,
                            kv_storage=built.kv_storage, branch_placement=built.branches)
    return torch.cat([chunk.latents for chunk in chunks], dim=1)


def plain_dit(scenario: Scenario) -> BuiltDiT:
    model = tiny_model(scenario.seed)
    if scenario.weights == "nvfp4":
        quantize_model(model, NVFP4Config(mode=QuantMode.w4a16))
    elif scenario.weights == "fp8":
        quantize_fp8(model)
    storage = nvfp4_storage() if scenario.nvfp4_kv else fp8_storage() if scenario.fp8_kv else None
    return BuiltDiT(model, kv_storage=storage)


def single_process(scenario: Scenario) -> torch.Tensor:
    return generate(scenario, plain_dit(scenario))


SMALL_VAE = VAEConfig(base_dim=8, decoder_base_dim=8)


def decode_latents() -> torch.Tensor:
    return torch.randn(1, 48, 3, 1, 16, generator=torch.Generator().manual_seed(12))


def split_decode(group) -> torch.Tensor:
    """Bands of a two-chunk stream decoded on every rank, gathered on rank 0."""
    decoder = GatheredBandDecoder(random_vae(SMALL_VAE, seed=3), group, root=0)
    x = decode_latents()
    return torch.cat([decoder.decode(x[:, :, :1]), decoder.decode(x[:, :, 1:])], dim=2)


class FakeFeed:
    """The root's typed prompts: nothing ready at chunk 1, "a new prompt" at chunk 2."""

    switches: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def take(self, chunk):
        return (Switch("a new prompt", typed_at=0.0), torch.full((1, 3, 2), 7.0)) if chunk == 2 else None


class FakeEncoder:
    def encode(self, prompts):
        return torch.stack([torch.full((3, 2), float(len(p))) for p in prompts])


def replica_inputs(group, rank: int) -> dict:
    """The text encoder, the typed prompts and the VAE exist on rank 0 only; every rank gets their results."""
    text = ReplicaTextEncoder(FakeEncoder() if rank == 0 else None, group, 0, torch.device("cpu"))
    with BroadcastFeed(FakeFeed() if rank == 0 else None, group, 0, torch.device("cpu")) as feed:
        taken = [feed.take(1), feed.take(2)]
    prompts = [None if t is None else (t[0].prompt, t[1].tolist()) for t in taken]
    vae = ReplicaVAE(random_vae(SMALL_VAE, seed=3) if rank == 0 else None, group, 0, torch.device("cpu"),
                     torch.float32)
    first_frame = image_latent(vae, start_image(), torch.device("cpu"), torch.float32)  # core.generate's call
    return {"text": text.encode(["ab", "abcd"]), "prompts": prompts, "image_latent": first_frame}


def start_image() -> torch.Tensor:
    return torch.rand(1, 3, 1, 16, 32, generator=torch.Generator().manual_seed(13)) * 2 - 1


def bench_rank(mesh: InferenceMesh) -> dict | None:
    """`longlive bench`'s rank code under the mesh (the CLI's re-execution is tested elsewhere)."""
    from core.config import Recipe, overlay
    from longlive_cli.build import DiTSpec
    from longlive_cli.parallel_inference import _bench_rank

    recipe = overlay(Recipe.preset_recipe("tiny"), {
        "video": {"height": 64, "width": 64}, "runtime": {"device": "cpu"},
        "stream": {"frames_per_block": 4, "local_window_frames": 12, "sink_frames": 4, "sampling_steps": 2}})
    spec = DiTSpec.from_recipe(recipe, torch.device("cpu"), torch.float32)
    result = _bench_rank(recipe, spec, 20, None, mesh)
    return None if result is None else json.loads(json.dumps(result.to_dict()))  # plain types for torch.load


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results, meshes = {}, {}
        for name, (sp, cfg) in layouts(world).items():
            mesh = meshes[name] = InferenceMesh.build(sp, cfg)
            for key, scenario in SCENARIOS.items():
                if cfg == 2 and key not in CFG_SCENARIOS:
                    continue
                built = apply_inference_sp(plain_dit(scenario), mesh.sp_group, mesh.cfg_group)
                results[(name, key)] = generate(scenario, built)
        results["bench"] = bench_rank(meshes[f"sp{world}"])
        results["split_decode"] = split_decode(dist.group.WORLD)
        results["replica"] = replica_inputs(dist.group.WORLD, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
