"""Shapes-world batches rendered on the device (core/train/shapes_stream.py): the renderer equals
`render_clip` bit for bit, item i is sample i of the written dataset read at epoch 0 (up to its
H.264 round trip), positions resume and ranks split the items; `train-ar` trains on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.shots import SCENE_CUT_PREFIX
from core.train.data import VideoClipDataset
from core.train.shapes_stream import ShapesStream, render_frames
from core.train.synthetic import DIRECTIONS, SHAPES, ClipSpec, make_synthetic_dataset, render_clip
from longlive_cli.app import main
from tests.test_shapes_train_ar import SMALL, shapes_vae  # noqa: F401  (the fixture)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("height, width, phase", [(64, 64, 0.93), (48, 80, 0.125)])
def test_render_frames_equals_render_clip(shape, direction, height, width, phase):
    spec = ClipSpec(shape, "orange", "purple", direction)
    expected = render_clip(spec, 70, height, width, phase=phase)  # 70 frames: wraps around the edge
    frames = torch.tensor([0, 1, 5, 33, 63, 64, 69])
    actual = render_frames([spec] * len(frames), torch.full((len(frames),), phase, dtype=torch.float64),
                           frames, height, width)
    assert actual.dtype == torch.uint8 and np.array_equal(actual.numpy(), expected[frames.numpy()])


def test_items_are_the_written_samples_read_at_epoch_0(tmp_path):
    latent_frames, fpb, size, shot_frames, shots = 12, 4, 64, 24, 3
    root = make_synthetic_dataset(tmp_path / "data", samples=4, clips_per_sample=shots, frames=shot_frames,
                                  height=size, width=size, seed=3)
    dataset = VideoClipDataset(root, latent_frames, size, size, frames_per_block=fpb, seed=3)
    stream = ShapesStream(4, latent_frames, fpb, size, size, shots, shot_frames, seed=3, device=torch.device("cpu"))
    batch = stream.batch(0)
    assert batch.video.shape == (4, 3, 45, size, size) and batch.num_valid_latent_frames.tolist() == [12] * 4
    cuts = 0
    for i in range(4):
        written = dataset[i]
        assert batch.prompts[i] == written.prompts
        cuts += sum(p.startswith(SCENE_CUT_PREFIX) for p in written.prompts)
        # H.264 (crf 10, 4:2:0 chroma) against the exact frames: 1-2 % of the pixels, on colour edges,
        # are off by more than 0.1; the same item one frame off has ~6 %
        off = ((batch.video[i] - written.video).abs() > 0.1).float().mean()
        assert off < 0.035, off
    assert cuts > 0  # the items hold scene cuts, with the prefix where a new shot starts


def test_position_resumes_and_ranks_split_the_items():
    make = lambda rank=0, size=1: ShapesStream(2, 8, 4, 32, 32, 2, 40, seed=0, device=torch.device("cpu"),  # noqa: E731
                                               dp_rank=rank, dp_size=size)
    stream = make()
    batches = stream.batches()
    first = next(batches)
    stream.advance(2)
    resumed = make()
    resumed.load_state_dict(stream.state_dict())
    again = next(resumed.batches())
    assert again.indices == [2, 3] and first.indices == [0, 1]
    assert torch.equal(again.video, next(batches).video)  # the same items whether resumed or not
    assert make(0, 2).batch(0).indices == [0, 2] and make(1, 2).batch(0).indices == [1, 3]


def test_train_ar_on_the_stream(tmp_path, shapes_vae):  # noqa: F811
    logdir = tmp_path / "run"
    args = ["train-ar", "train_ar_shapes", "--logdir", str(logdir), "--set", f"data.vae_path={shapes_vae}",
            "--set", "data.batch_size=2", "--set", "data.synthetic_stream=true", *SMALL,
            "--set", "data.synthetic=false", "--set", f"data.path={tmp_path / 'absent'}"]  # neither is used
    assert main([*args, "--max-steps", "2"]) == 0
    assert main([*args, "--max-steps", "3"]) == 0  # resumed from step 2's checkpoint
    steps = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3] and all(s["loss"] > 0 for s in steps)
    assert not (logdir / "synthetic-data").exists()  # nothing written, nothing decoded


def test_too_short_shots_are_one_line_exit_2(tmp_path, capsys, shapes_vae):  # noqa: F811
    assert main(["train-ar", "train_ar_shapes", "--logdir", str(tmp_path / "run"),
                 "--set", f"data.vae_path={shapes_vae}",
                 "--set", "data.synthetic_stream=true", *SMALL, "--set", "data.synthetic_shot_frames=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.synthetic_shot_frames=8" in err, err


def test_sink_gap_moves_the_first_shots_later_chunks_ahead():
    make = lambda gap: ShapesStream(1, 16, 4, 32, 32, 2, 200, seed=5, device=torch.device("cpu"),  # noqa: E731
                                    sink_gap=gap)
    plain, gapped, half = make(0.0), make(1.0), make(0.5)
    moved = 0
    for index in range(40):
        (base, prompts), (jumped, gapped_prompts) = plain.plan(index), gapped.plan(index)
        assert prompts == gapped_prompts  # the captions do not change, only the moment shown
        assert jumped[0] == base[0]  # the sink chunk stays where the item starts
        first_shot = base[0][:2]
        shifts = {j[2][0] - b[2][0] for b, j in zip(base[1:], jumped[1:], strict=True) if b[:2] == first_shot}
        for b, j in zip(base[1:], jumped[1:], strict=True):
            assert j[:2] == b[:2]
            if b[:2] == first_shot:  # one constant jump for every later chunk of the first shot
                assert [f - b[2][0] for f in b[2]] == [f - j[2][0] for f in j[2]]
            else:
                assert j[2] == b[2]  # another shot's chunks are untouched
        assert len(shifts) <= 1 and all(1 <= s <= 60 * 24 for s in shifts)
        moved += bool(shifts)
        moved_half = half.plan(index)[0] != base
        assert not moved_half or bool(shifts)  # an item the half stream moves has a first shot to move
    assert moved >= 20  # most items continue their first shot after the sink chunk
    halves = sum(half.plan(i)[0] != plain.plan(i)[0] for i in range(200))
    assert 60 <= halves <= 140, halves
    # the rendered batch shows the jumped frames: the sink chunk is equal, the later ones are not
    index = next(i for i in range(40) if gapped.plan(i)[0][1][:2] == gapped.plan(i)[0][0][:2])
    a, b = plain.batch(index).video, gapped.batch(index).video
    assert torch.equal(a[:, :, :13], b[:, :, :13]) and not torch.equal(a[:, :, 13:29], b[:, :, 13:29])


def shots_per_item(stream: ShapesStream, index: int) -> int:
    chunks, _ = stream.plan(index)
    return len({(spec, phase) for spec, phase, _ in chunks})


def test_shot_frames_choices_mix_item_lengths():
    make = lambda frames: ShapesStream(1, 16, 4, 32, 32, 3, frames, seed=5, device=torch.device("cpu"))  # noqa: E731
    short, long, mixed = make(32), make(200), make((32, 200))
    assert make((32,)).plan(3) == short.plan(3)  # one length is that length: no extra draw
    picked = []
    for index in range(60):
        plan = mixed.plan(index)
        assert plan in (short.plan(index), long.plan(index))  # each item is the item of one length
        picked.append(plan == short.plan(index))
        # within a shot the frames stay continuous: each chunk follows its shot's previous one
        chunks = plan[0]
        for a, b in zip(chunks, chunks[1:], strict=False):
            if a[:2] == b[:2]:
                assert b[2][0] == a[2][-1] + 1
    assert 15 <= sum(picked) <= 45, sum(picked)  # both lengths drawn, about evenly
    # short shots put two cuts into one clip (three shots), long ones at most one
    assert max(shots_per_item(short, i) for i in range(60)) == 3
    assert max(shots_per_item(long, i) for i in range(60)) <= 2
    # the prompts follow: a scene-cut prefix exactly where the shot changes
    for index in range(20):
        chunks, prompts = mixed.plan(index)
        for k in range(1, len(chunks)):
            assert prompts[k].startswith(SCENE_CUT_PREFIX) == (chunks[k][:2] != chunks[k - 1][:2])


def test_train_ar_with_shot_frames_choices(tmp_path, shapes_vae):  # noqa: F811
    logdir = tmp_path / "run"
    assert main(["train-ar", "train_ar_shapes", "--logdir", str(logdir), "--set", f"data.vae_path={shapes_vae}",
                 "--set", "data.synthetic_stream=true", *SMALL,
                 "--set", "data.synthetic_shot_frames_choices=[20,40]", "--max-steps", "1"]) == 0
    assert (logdir / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("sets, needle", [
    (["data.synthetic_shot_frames_choices=[64,0]", "data.synthetic_stream=true"],
     "data.synthetic_shot_frames_choices must be positive"),
    (["data.synthetic_shot_frames_choices=[64,128]"], "data.synthetic_shot_frames_choices needs data.synthetic_stream"),
    (["data.synthetic_stream=true", "data.synthetic_sink_gap=1.5"], "data.synthetic_sink_gap must be in [0, 1]"),
    (["data.synthetic_sink_gap=0.5"], "data.synthetic_sink_gap needs data.synthetic_stream=true"),
])
def test_bad_sink_gap_is_one_line_exit_2(tmp_path, capsys, shapes_vae, sets, needle):  # noqa: F811
    args = ["train-ar", "train_ar_shapes", "--logdir", str(tmp_path / "run"), "--set", f"data.vae_path={shapes_vae}",
            *SMALL]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
