"""Sequence-parallel (and CFG-parallel) streaming inference on CPU gloo ranks == one process.

The tiny model in fp32 at 8x8 latents; one start of worker processes per world size (2 and 4)
runs every scenario (tests/sp_inference_workers.py) under SP = world and under two branch groups
of SP = world / 2; each rank's latents must equal the one-process latents (max |delta| <= 1e-5).
On these shapes they are bit for bit equal, FP8 activations and NVFP4 codes included. The size
matters: at 4x4 latents a rank of sp 4 multiplies 4-row matrices, and MKL's small-M kernel rounds
differently from the whole chunk's (~2e-6), which a quantizer can turn into a flipped code (1.6e-5
with the NVFP4 cache, 3e-2 with FP8 weights); 16 rows per rank take the same kernel.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from core.errors import UserError
from sp.mesh import check_inference_layout
from tests import sp_inference_workers as w
from tests.conftest import made_once, spawn_ranks

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TOL = 1e-5


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def ranks(request, tmp_path_factory):
    world = request.param
    folder = made_once(tmp_path_factory, f"spinf{world}",
                       lambda out: spawn_ranks(w.run, "tests.sp_inference_workers", world, out))
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def references():
    return {key: w.single_process(scenario) for key, scenario in w.SCENARIOS.items()}


@pytest.mark.parametrize("scenario", list(w.SCENARIOS))
def test_sp_generation_equals_one_process(ranks, references, scenario):
    world = len(ranks)
    ref = references[scenario]
    assert ref.abs().max() > 0.5  # non-trivial latents
    for layout in w.layouts(world):
        key = (layout, scenario)
        if key not in ranks[0]:
            continue
        for rank, result in enumerate(ranks):
            delta = (result[key] - ref).abs().max().item()
            assert delta <= TOL, f"{layout}, rank {rank}: max |delta| {delta:.2e}"


def test_every_cfg_scenario_ran_on_two_branch_groups(ranks):
    layout = f"cfg2_sp{len(ranks) // 2}"
    assert all((layout, key) in ranks[0] for key in w.CFG_SCENARIOS)


@pytest.mark.parametrize("scenario, plain", [("nvfp4", w.Scenario(cuts=(3,), seed=5)),
                                             ("nvfp4_weights", w.Scenario(chunks=4, seed=7)),
                                             ("fp8_weights", w.Scenario(chunks=4, seed=8)),
                                             ("fp8_kv", w.Scenario(cuts=(3,), switch_at=4, seed=10))])
def test_quantized_runs_are_not_the_bf16_result(references, scenario, plain):
    """The quantized comparisons mean something: each format changes the latents."""
    assert (w.single_process(plain) - references[scenario]).abs().max().item() > 1e-3


def test_the_window_evicts_and_the_image_frame_is_clean(references):
    """The eviction and image-to-video comparisons mean something: a window holding every frame
    changes the latents, and so does dropping the image (frame 0 is on another timestep)."""
    whole_window = replace(w.SCENARIOS["eviction"], window_frames=w.SCENARIOS["eviction"].chunks * w.FPB)
    assert (w.single_process(whole_window) - references["eviction"]).abs().max().item() > 1e-3
    no_image = replace(w.SCENARIOS["image"], image=False)
    assert (w.single_process(no_image)[:, 1:] - references["image"][:, 1:]).abs().max().item() > 1e-3


def test_split_decode_gathers_the_whole_frames_on_the_root(ranks):
    from core.vae import random_vae

    vae = random_vae(w.SMALL_VAE, seed=3)
    x = w.decode_latents()
    decoder = vae.streaming_decoder()
    whole = torch.cat([decoder.decode(x[:, :, :1]), decoder.decode(x[:, :, 1:])], dim=2)
    assert torch.equal(ranks[0]["split_decode"], whole)
    assert all(r["split_decode"].shape == (1, 3, 0, 16, 256) for r in ranks[1:])  # the others write nothing


def test_bench_rank_under_sp(ranks):
    result = ranks[0]["bench"]
    assert all(r["bench"] is None for r in ranks[1:])  # the replica root reports
    assert result["chunks"] == 5 and result["steady_chunks"] == 2 and result["seconds_per_block"] > 0
    # per-rank cache: heads / sp of the 12-frame window, 4 tokens per frame, 2 layers, fp32 keys and values
    assert result["kv_cache_gib"] * 2**30 == 2 * 2 * 12 * 4 * (4 // len(ranks)) * 32 * 4


def test_text_prompts_and_image_latent_come_from_the_root(ranks):
    from core.generate import image_latent
    from core.vae import random_vae

    expected = image_latent(random_vae(w.SMALL_VAE, seed=3), w.start_image(), torch.device("cpu"), torch.float32)
    for r in ranks:
        assert torch.equal(r["replica"]["text"], w.FakeEncoder().encode(["ab", "abcd"]))
        assert r["replica"]["prompts"] == [None, ("a new prompt", [[[7.0, 7.0]] * 3])]
        assert torch.equal(r["replica"]["image_latent"], expected)


@pytest.mark.parametrize("args, fragment", [
    ((4, 3, 1, 24, 8), "not divisible by --sp 3"),
    ((4, 4, 2, 24, 8), "--sp 4 x 2 guidance branches = 8"),
    ((8, 8, 1, 12, 8), "12 attention heads"),
    ((6, 6, 1, 24, 8), "8 latent frames of a chunk"),
    ((2, 0, 1, 24, 8), "must be >= 1"),
])
def test_bad_layouts_are_one_line(args, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        check_inference_layout(*args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args", [(8, 8, 1, 24, 8), (8, 4, 2, 24, 8), (8, 2, 1, 24, 8), (1, 1, 1, 4, 8)])
def test_good_layouts(args):
    check_inference_layout(*args)
