"""Sequence parallelism on CPU gloo ranks == one process, for the tiny model in fp32.

One start of worker processes per world size (2 and 4 ranks) runs every distributed scenario (tests/sp_workers.py);
the tests compare the saved per-rank results with single-process references. Pure functions
(config checks, masks, layouts, halo plans) are tested directly.
"""

from __future__ import annotations

import pytest
import torch

from core.attention import BlockCausalMask, TeacherForcingMask, dense_mask
from core.config import VAEConfig
from core.errors import UserError
from core.vae import random_vae
from sp.balanced import BalancedLayout, NaiveLayout, NaturalTeacherForcingMask, natural_token_order
from sp.mesh import check_sp_config
from sp.ulysses import PaddedMask, padded_length
from sp.vae_halo import encode_rank_window, halo_windows, raw_window
from tests import sp_workers as w
from tests.conftest import spawn_ranks

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


# ----------------------------------------------------------------------------------------------
# Pure functions.


@pytest.mark.parametrize("args, fragment", [
    ((8, 3, 48, 8, 24, 1), "world size 8"),
    ((4, 4, 96, 8, 6, 1), "6 attention heads"),
    ((4, 4, 97, 8, 24, 1), "97 latent frames"),
    ((4, 4, 48, 8, 24, 1), "48 latent frames"),  # 48 % (4*8) != 0
    ((4, 4, 96, 8, 24, 2), "2 prompt chunks"),
    ((4, 0, 96, 8, 24, 1), "size 0"),
    ((4, 2, 16, 2, 4, 6), "6 equal prompt chunks"),
])
def test_check_sp_config_rejects(args, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        check_sp_config(*args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args", [(8, 4, 96, 8, 24, 1), (8, 4, 384, 8, 24, 8), (4, 2, 16, 2, 4, 4),
                                  (1, 1, 8, 8, 24, 4)])
def test_check_sp_config_accepts(args):
    check_sp_config(*args)


@pytest.mark.parametrize("sp, frames, fpb, tokens", [(2, 8, 2, 3), (2, 16, 4, 4), (4, 16, 2, 2), (4, 32, 8, 1),
                                                     (3, 12, 2, 2), (1, 8, 4, 2)])
def test_natural_mask_equals_single_process_mask(sp, frames, fpb, tokens):
    local = frames // sp
    natural = dense_mask(NaturalTeacherForcingMask(sp, local, tokens, fpb, 2 * frames * tokens))
    order = natural_token_order(sp, local, tokens)
    assert sorted(order.tolist()) == list(range(2 * frames * tokens))
    single = dense_mask(TeacherForcingMask(frames, tokens, fpb))
    assert torch.equal(natural, single[order][:, order])
    # The single-process mask in the natural order is not the same mask (pitfall 23), except for sp = 1.
    assert torch.equal(natural, single) == (sp == 1)


def test_padding_tokens_attend_only_to_themselves():
    real = 2 * 16 * 2
    padded = dense_mask(NaturalTeacherForcingMask(4, 4, 2, 2, padded_length(real, use_flex=True)))
    assert padded.shape == (128, 128)
    assert torch.equal(padded[:real, :real], dense_mask(NaturalTeacherForcingMask(4, 4, 2, 2, real)))
    assert torch.equal(padded[real:], torch.eye(128, dtype=torch.bool)[real:])
    assert torch.equal(padded[:, real:], torch.eye(128, dtype=torch.bool)[:, real:])
    generic = dense_mask(PaddedMask(TeacherForcingMask(16, 2, 2), 128))
    assert torch.equal(generic[:real, :real], dense_mask(TeacherForcingMask(16, 2, 2)))
    assert torch.equal(generic[real:], torch.eye(128, dtype=torch.bool)[real:])


@pytest.mark.parametrize("sp", [2, 4])
def test_balanced_layout_shards_and_prompts(sp):
    frames, chunks = 16, 4
    x = torch.arange(2 * 3 * frames).view(2, 3, frames)
    context = torch.arange(2 * chunks).view(2 * chunks, 1, 1)  # sample-major: value = b*K + k
    shards = [BalancedLayout(sp, r, frames, 2).shard(x, dim=2) for r in range(sp)]
    assert torch.equal(torch.cat(shards, dim=2), x)
    prompts = [BalancedLayout(sp, r, frames, 2).prompts(context, chunks).view(2, -1) for r in range(sp)]
    assert torch.equal(torch.cat(prompts, dim=1), context.view(2, chunks))
    assert BalancedLayout(sp, 1, frames, 2).prompts(context[:2], 1).shape[0] == 2
    with pytest.raises(ValueError, match="divisible"):
        BalancedLayout(sp, 0, 12, 4)


@pytest.mark.parametrize("sp", [2, 4, 8])
def test_naive_layout_pieces(sp):
    frames = 16
    layouts = [NaiveLayout(sp, r, frames, 2) for r in range(sp)]
    assert [lay.is_noisy for lay in layouts] == [False] * (sp // 2) + [True] * (sp // 2)
    covered = [f for lay in layouts if lay.is_noisy for f in lay.frame_range]
    assert covered == list(range(frames))
    with pytest.raises(ValueError, match="even"):
        NaiveLayout(3, 0, 12, 2)


def test_global_mask_rejects_a_changed_layout():
    layout = BalancedLayout(2, 0, 16, 2)
    assert isinstance(layout.global_mask(TeacherForcingMask(8, 4, 2), False), NaturalTeacherForcingMask)
    assert layout.global_mask(BlockCausalMask(8, 4, 2), False) == BlockCausalMask(16, 4, 2)
    with pytest.raises(ValueError, match="re-apply"):
        layout.global_mask(TeacherForcingMask(12, 4, 2), False)


# Worked examples of reference-systems.md §4.5: (keep, raw window, raw frames, drop) per rank.
HALO_96 = [((0, 24), (0, 93), 93, 0), ((24, 48), (0, 189), 189, 24), ((48, 72), (76, 285), 209, 29),
           ((72, 96), (172, 381), 209, 29)]
HALO_384 = [((0, 96), (0, 381), 381, 0), ((96, 192), (268, 765), 497, 29), ((192, 288), (652, 1149), 497, 29),
            ((288, 384), (1036, 1533), 497, 29)]


@pytest.mark.parametrize("latents, raw, expected", [(96, 381, HALO_96), (384, 1533, HALO_384)])
def test_halo_windows_worked_examples(latents, raw, expected):
    windows = halo_windows(latents, raw, sp=4, halo=28)
    got = [((x.keep_start, x.keep_end), (x.raw_start, x.raw_end), x.raw_frames, x.drop_latents) for x in windows]
    assert got == expected
    assert [x.pseudo_first for x in windows] == [x.raw_start > 0 for x in windows]


def test_halo_windows_reject_short_clips():
    with pytest.raises(UserError, match="too short"):
        halo_windows(96, 377, sp=4)


@pytest.fixture(scope="module")
def tiny_vae():
    return random_vae(VAEConfig.preset("tiny"))


@pytest.fixture(scope="module")
def clip(tiny_vae):
    """A 4-latent clip (13 raw frames) and its full-clip latents."""
    video = torch.rand(1, 3, 13, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return video, tiny_vae.encode(video)


@pytest.mark.parametrize("sp, halo", [(2, 1), (4, 0), (4, 1), (2, 28)])
def test_halo_encode(tiny_vae, clip, sp, halo):
    video, full = clip
    latents = full.shape[2]
    for window in halo_windows(latents, video.shape[2], sp, halo=halo):
        kept = encode_rank_window(tiny_vae, raw_window(video, window), window)
        assert kept.shape == (1, 48, latents // sp, 1, 1)
        if window.raw_start == 0:  # causal encoder: exact
            assert max_diff(kept, full[:, :, window.keep_start:window.keep_end]) <= TOL


# ----------------------------------------------------------------------------------------------
# Distributed scenarios: one spawn per world size.


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"sp{n}")
def ranks(request, tmp_path_factory):
    world = request.param
    return spawn_ranks(w.run, "tests.sp_workers", world, tmp_path_factory.mktemp(f"sp{world}"))


@pytest.fixture(scope="module")
def references():
    cases = {**{("balanced", k): c for k, c in w.BALANCED_CASES.items()},
             **{("naive", k): c for k, c in w.NAIVE_CASES.items()}}
    return {key: w.single_process_step(case) for key, case in cases.items()}


def assert_grads_match(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    diffs = {name: max_diff(got[name], expected[name]) for name in expected}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{worst}: {diffs[worst]:.3g}"
    assert sum(g.abs().sum().item() for g in got.values()) > 0


@pytest.mark.parametrize("name", list(w.BALANCED_CASES))
def test_balanced_step_equals_single_process(ranks, references, name):
    ref = references[("balanced", name)]
    results = [r["balanced"][name] for r in ranks]
    velocity = torch.cat([r["velocity"] for r in results], dim=2)  # rank r holds frames of rank r
    assert max_diff(velocity, ref["velocity"]) <= TOL
    for r in results:
        assert max_diff(r["loss"], ref["loss"]) <= TOL
        assert_grads_match(r["grads"], ref["grads"])


@pytest.mark.parametrize("name", list(w.NAIVE_CASES))
def test_naive_step_equals_single_process(ranks, references, name):
    ref = references[("naive", name)]
    results = [r["naive"][name] for r in ranks]
    assert [r["noisy"] for r in results] == [False] * (len(ranks) // 2) + [True] * (len(ranks) // 2)
    velocity = torch.cat([r["velocity"] for r in results], dim=2)  # clean ranks return 0 frames
    assert max_diff(velocity, ref["velocity"]) <= TOL
    for r in results:
        assert max_diff(r["loss"], ref["loss"]) <= TOL
        assert_grads_match(r["grads"], ref["grads"])


def test_block_causal_forward_under_plan(ranks):
    case = w.PLAIN_CASE
    x = w.make_inputs(case)
    with torch.no_grad():
        ref = w.tiny_model()(x.noisy, x.t, x.context, frames_per_block=case.frames_per_block)
    velocity = torch.cat([r["plain"]["velocity"] for r in ranks], dim=2)
    assert max_diff(velocity, ref) <= TOL
    # Without the plan each rank attends only to its own frames: rank 0 agrees, later ranks do not.
    unplanned = [r["plain"]["unplanned"] for r in ranks]
    local = case.frames // len(ranks)
    assert max_diff(unplanned[0], ref[:, :, :local]) <= TOL
    assert max_diff(unplanned[-1], ref[:, :, -local:]) > 1e-3


def test_padding_tokens_do_not_change_attention(ranks):
    for r in ranks:
        out = r["padded"]
        assert out["real"].shape == (2, 2 * 2 * 3, 4, 8)
        assert max_diff(out["padded"], out["real"]) <= TOL
        assert max_diff(out["generic"], out["real"]) <= TOL


def test_vae_windows_scatter_from_root(ranks, tiny_vae):
    video = w.vae_video()
    full = tiny_vae.encode(video)
    windows = halo_windows(w.VAE_LATENTS, video.shape[2], len(ranks), halo=w.VAE_HALO)
    for window, result in zip(windows, ranks, strict=True):
        assert torch.equal(result["vae_window"], raw_window(video, window))
        latents = encode_rank_window(tiny_vae, result["vae_window"], window)
        if window.raw_start == 0:
            assert max_diff(latents, full[:, :, window.keep_start:window.keep_end]) <= TOL


def test_mesh_groups_and_dp_average(ranks):
    if len(ranks) != 4:
        pytest.skip("the mesh scenario runs on 4 ranks (sp 2 x dp 2)")
    meshes = [r["mesh"] for r in ranks]
    assert [(m["dp_rank"], m["sp_rank"]) for m in meshes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [m["sp_ranks"] for m in meshes] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [m["dp_ranks"] for m in meshes] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [m["sp_root"] for m in meshes] == [0, 0, 2, 2]
    assert all((m["sp_size"], m["dp_size"]) == (2, 2) for m in meshes)
    replicas = [w.single_process_step(w.Case(**{**w.MESH_CASE.__dict__, "seed": w.MESH_CASE.seed + dp}))
                for dp in range(2)]
    expected = {name: (replicas[0]["grads"][name] + replicas[1]["grads"][name]) / 2 for name in replicas[0]["grads"]}
    for m in meshes:
        assert_grads_match(m["step"]["grads"], expected)
    for m in meshes:
        assert max_diff(m["step"]["loss"], replicas[m["dp_rank"]]["loss"]) <= TOL
