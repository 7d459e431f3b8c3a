"""Training data: synthetic videos -> clips with per-chunk prompts, compared to a plain full decode.

The reference for every item is the whole video decoded frame by frame with PyAV and sliced at
hand-derived frame indices (29-frame first chunk, 32-frame chunks for 8 latent frames per block).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from core.shots import SCENE_CUT_PREFIX
from core.train.data import (
    ShardedSampler,
    Span,
    VideoClipDataset,
    collate,
    plan_segments,
    read_frames,
    to_model_pixels,
)
from core.train.synthetic import ClipSpec, make_synthetic_dataset, render_clip, write_video

P = SCENE_CUT_PREFIX
FIRST, NEXT = 29, 32  # raw frames of the first chunk and of each later chunk (8 latent frames per block)


def decode_all(path: Path) -> np.ndarray:
    """Every frame of a video, in order (the slow obvious reference)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def pixels(frames_NHWC: np.ndarray) -> torch.Tensor:
    """uint8 frames at the dataset's size -> `[C, N, H, W]` in [-1, 1], no resizing."""
    return torch.from_numpy(frames_NHWC).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def clip_videos_and_captions(root: Path, sample: int) -> tuple[list[np.ndarray], list[str]]:
    """The decoded clips and captions of one sample of either synthetic layout."""
    name = f"sample_{sample:03d}"
    if root.is_file():  # manifest: one video, shots back to back
        entry = json.loads(root.read_text().splitlines()[sample])
        video = decode_all(root.parent / entry["video"])
        clips, captions = [], []
        for shot in entry["shots"]:
            begin, end = round(shot["start"] * 24), round(shot["end"] * 24)
            clips.append(video[begin:end])
            captions.append(shot["caption"])
        return clips, captions
    paths = sorted((root / "video" / name).glob("*.mp4"), key=lambda p: int(p.stem))
    captions = [json.loads((root / "caption" / name / f"{p.stem}.json").read_text())["caption"] for p in paths]
    return [decode_all(p) for p in paths], captions


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """Synthetic datasets by (layout, frames per clip), 32x48 pixels, 2 clips per sample."""
    root = tmp_path_factory.mktemp("synthetic")
    made = {}
    for layout in ("official", "manifest"):
        for frames in (48, 120):
            made[layout, frames] = make_synthetic_dataset(root / f"{layout}_{frames}", samples=2, clips_per_sample=2,
                                                          frames=frames, height=32, width=48, layout=layout)
    return made


# ----------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("layout", ["official", "manifest"])
def test_two_clips_make_two_chunks_with_a_scene_cut(datasets, layout):
    root = datasets[layout, 48]
    dataset = VideoClipDataset(root, latent_frames=16, height=32, width=48, deterministic=True)
    assert len(dataset) == 2
    for index in range(2):
        item = dataset[index]
        (a, b), (caption_a, caption_b) = clip_videos_and_captions(root, index)
        assert item.video.shape == (3, 61, 32, 48) and item.video.dtype == torch.float32
        assert item.video.min() >= -1 and item.video.max() <= 1
        assert item.video.max() - item.video.min() > 0.5  # real content, not a constant
        # Clip A's 48 frames hold the 29-frame first chunk but not a 32-frame second one (29 + 31 >= 48).
        expected = torch.cat([pixels(a[:FIRST]), pixels(b[:NEXT])], dim=1)
        torch.testing.assert_close(item.video, expected, rtol=0, atol=1e-6)
        assert item.prompts == [caption_a, P + caption_b]
        assert item.scene_cuts == [False, True]
        assert item.num_valid_latent_frames == 16 and item.index == index


@pytest.mark.parametrize("layout", ["official", "manifest"])
@pytest.mark.parametrize("max_chunks, expected", [
    # (clip, first frame, scene cut) per chunk; a virtual cut skips 24 frames (1 s).
    (None, [(0, 0, False), (0, 29, False), (0, 61, False)]),
    (2, [(0, 0, False), (0, 29, False), (0, 61 + 24, True)]),
    (1, [(0, 0, False), (0, 29 + 24, True), (1, 0, True)]),  # 85 + 24 + 31 >= 120: on to clip B
])
def test_max_chunks_per_shot_makes_virtual_cuts(datasets, layout, max_chunks, expected):
    root = datasets[layout, 120]
    dataset = VideoClipDataset(root, latent_frames=24, height=32, width=48, max_chunks_per_shot=max_chunks,
                               deterministic=True)
    item = dataset[0]
    clips, captions = clip_videos_and_captions(root, 0)
    lengths = [FIRST, NEXT, NEXT]
    reference = torch.cat([pixels(clips[c][s:s + n]) for (c, s, _), n in zip(expected, lengths, strict=True)], 1)
    torch.testing.assert_close(item.video, reference, rtol=0, atol=1e-6)
    assert item.prompts == [(P if cut else "") + captions[c] for c, _, cut in expected]


@pytest.mark.parametrize("layout", ["official", "manifest"])
def test_short_samples_are_padded_with_last_frame_and_caption(datasets, layout):
    root = datasets[layout, 48]
    # 4 chunks need 125 frames; A gives one chunk, B one (B's 32..63 > 48), the rest is padding.
    item = VideoClipDataset(root, latent_frames=32, height=32, width=48, deterministic=True)[0]
    (a, b), (caption_a, caption_b) = clip_videos_and_captions(root, 0)
    assert item.num_valid_latent_frames == 16
    assert item.prompts == [caption_a, P + caption_b, caption_b, caption_b]  # padding is not a cut
    expected = torch.cat([pixels(a[:FIRST]), pixels(b[:NEXT]), pixels(b[NEXT - 1:NEXT]).expand(-1, 64, -1, -1)], 1)
    assert item.video.shape[1] == 125
    torch.testing.assert_close(item.video, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("options", [dict(allow_padding=False), dict(min_latent_frames=24)])
def test_samples_too_short_without_padding_are_skipped(datasets, options, caplog):
    dataset = VideoClipDataset(datasets["official", 48], latent_frames=32, height=32, width=48, deterministic=True,
                               **options)
    with caplog.at_level(logging.WARNING, logger="core.train.data"), pytest.raises(UserError, match="no usable"):
        dataset[0]
    assert "sample_000: too short" in caplog.text and "sample_001: too short" in caplog.text
    assert "sample_000/0.mp4" in caplog.text


def test_unreadable_and_too_short_videos_are_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "data"
    spec = ClipSpec("circle", "red", "blue", "left to right")

    def add(sample: str, stem: str, frames: int | None) -> None:
        path = root / "video" / sample / f"{stem}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        if frames is None:
            path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        else:
            write_video(path, render_clip(spec, frames, 16, 16))
        (root / "caption" / sample).mkdir(parents=True, exist_ok=True)
        (root / "caption" / sample / f"{stem}.json").write_text(json.dumps({"caption": f"{sample} {stem}"}))

    add("a_garbage", "0", None)
    add("b_short", "0", 10)
    add("c_good", "0", 40)
    add("c_good", "1", None)  # a garbage clip inside a usable sample: only that clip is dropped
    dataset = VideoClipDataset(root, latent_frames=8, height=16, width=16, deterministic=True)
    with caplog.at_level(logging.WARNING, logger="core.train.data"):
        item = dataset[0]
    assert item.source == "c_good" and item.index == 2 and item.prompts == ["c_good 0"]
    assert item.video.shape == (3, FIRST, 16, 16)
    assert "unreadable video" in caplog.text
    assert str(root / "video/a_garbage/0.mp4") in caplog.text
    assert str(root / "video/c_good/1.mp4") in caplog.text
    assert "b_short: too short" in caplog.text and str(root / "video/b_short/0.mp4") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.train.data"):
        assert dataset[1].source == "c_good"  # skipped samples are remembered: no repeated warnings
    assert caplog.text == ""


# ----------------------------------------------------------------------------------------------
# Frame rate, resizing, randomness.


def test_48_fps_video_keeps_every_second_frame(tmp_path):
    spec = ClipSpec("square", "yellow", "black", "left to right")
    path = write_video(tmp_path / "d/video/s/0.mp4", render_clip(spec, 120, 32, 48), fps=48)
    (tmp_path / "d/caption/s").mkdir(parents=True)
    (tmp_path / "d/caption/s/0.json").write_text(json.dumps({"caption": spec.caption}))
    item = VideoClipDataset(tmp_path / "d", latent_frames=8, height=32, width=48, deterministic=True)[0]
    frames = decode_all(path)
    torch.testing.assert_close(item.video, pixels(frames[0:2 * FIRST:2]), rtol=0, atol=1e-6)
    assert not torch.equal(pixels(frames[0:FIRST]), item.video)  # the stepping matters for this clip


@pytest.mark.parametrize("fps, expected", [
    (48.0, [0, 2, 4, 6, 8]),
    (30.0, [0, 1, 2, 4, 5]),  # 1.25 frames per step, each index rounded half to even (as np.round)
    (12.0, [0, 0, 1, 2, 2]),  # slower videos repeat frames, keeping the duration
    (24.0, [0, 1, 2, 3, 4]),
])
def test_resampling_indices(fps, expected):
    span = Span(clip=None, begin=0, end=100, fps=fps)
    (segment,) = plan_segments([span], 0, 0, [5])
    assert list(segment.frame_indices) == expected


def test_seeking_reads_the_same_frames_as_decoding_from_the_start(datasets):
    path = datasets["official", 120] / "video/sample_000/0.mp4"
    indices = [100, 101, 103, 103, 110]
    seeked = read_frames(path, indices, seek_min_frames=0)
    counted = read_frames(path, indices, seek_min_frames=10_000)
    np.testing.assert_array_equal(seeked, counted)
    np.testing.assert_array_equal(counted, decode_all(path)[indices])


@pytest.mark.parametrize("size, crop", [
    ((16, 16), (slice(0, 20), slice(5, 25))),  # 20x30 -> square: keep the middle 20 columns
    ((10, 30), (slice(5, 15), slice(0, 30))),  # -> 1:3: keep the middle 10 rows
    ((10, 15), (slice(0, 20), slice(0, 30))),  # same aspect ratio: no crop
    ((20, 30), (slice(0, 20), slice(0, 30))),  # same size: only the scaling to [-1, 1]
])
def test_resize_crops_to_the_aspect_ratio_then_resizes_like_pil(size, crop):
    frames = np.random.default_rng(1).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    out = to_model_pixels(frames, *size)
    assert out.shape == (3, 2, *size)
    height, width = size
    # PIL's bilinear filter widens its support when shrinking (antialiasing), like torch's antialias=True.
    reference = np.stack([np.asarray(Image.fromarray(f[crop]).resize((width, height), Image.BILINEAR))
                          for f in frames])
    torch.testing.assert_close(out, pixels(reference), rtol=0, atol=2.5 / 127.5)


@pytest.mark.parametrize("layout", ["official", "manifest"])
def test_random_starts_depend_only_on_seed_epoch_and_index(datasets, layout):
    root = datasets[layout, 120]

    def first_frames(seed: int, epoch: int) -> list[torch.Tensor]:
        dataset = VideoClipDataset(root, latent_frames=8, height=32, width=48, seed=seed)
        dataset.set_epoch(epoch)
        return [dataset[i].video for i in range(len(dataset))]

    run = first_frames(0, 0)
    for a, b in zip(run, first_frames(0, 0), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    others = first_frames(0, 1) + first_frames(1, 0)
    assert not all(torch.equal(a, b) for a, b in zip(run * 2, others, strict=True))
    # Every random item is a real 24 fps run of one clip (29 frames never straddle a clip here).
    clips, _ = clip_videos_and_captions(root, 0)
    starts = [(c, s) for c, clip in enumerate(clips) for s in range(len(clip) - FIRST + 1)
              if torch.allclose(run[0][:, 0], pixels(clip[s:s + 1])[:, 0], rtol=0, atol=1e-6)]
    assert any(torch.allclose(run[0], pixels(clips[c][s:s + FIRST]), rtol=0, atol=1e-6) for c, s in starts)


def test_a_folder_without_captioned_videos_is_a_user_error(tmp_path):
    folder = tmp_path / "data"
    write_video(folder / "video/s/0.mp4", render_clip(ClipSpec("circle", "red", "blue", "left to right"), 8, 16, 16))
    write_video(folder / "video/s/1.mp4", render_clip(ClipSpec("circle", "red", "blue", "left to right"), 8, 16, 16))
    (folder / "caption/s").mkdir(parents=True)
    (folder / "caption/s/0.json").write_text(json.dumps({"caption": ""}))  # empty; 1.mp4 has no caption file
    with pytest.raises(UserError, match="no captioned video") as err:
        VideoClipDataset(folder, latent_frames=8, height=16, width=16)
    assert str(folder) in str(err.value) and "caption" in str(err.value) and "\n" not in str(err.value)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"video": "data/video/s/0.mp4", "caption": ""}) + "\n")
    with pytest.raises(UserError, match="no captioned video in manifest"):
        VideoClipDataset(manifest, latent_frames=8, height=16, width=16)
    manifest.write_text('{"video": "a.mp4", "caption": "x"}\n{not json\n')
    with pytest.raises(UserError, match=r"m.jsonl:2: not JSON"):
        VideoClipDataset(manifest, latent_frames=8, height=16, width=16)
    with pytest.raises(UserError, match="not found"):
        VideoClipDataset(tmp_path / "missing", latent_frames=8, height=16, width=16)


def test_synthetic_dataset_is_deterministic_for_a_seed(tmp_path):
    roots = [make_synthetic_dataset(tmp_path / name, samples=2, frames=8, height=16, width=16, seed=seed)
             for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    captions = [[clip_videos_and_captions(r, i)[1] for i in range(2)] for r in roots]
    frames = [np.concatenate(clip_videos_and_captions(r, 0)[0]) for r in roots]
    assert captions[0] == captions[1] != captions[2]
    np.testing.assert_array_equal(frames[0], frames[1])
    assert frames[0].shape == (16, 16, 16, 3) and not np.array_equal(frames[0], frames[2])
    assert not list(tmp_path.rglob("*.part"))  # atomic writes leave no temp files


# ----------------------------------------------------------------------------------------------
# Batching and sharding.


def test_collate_and_dataloader(datasets):
    dataset = VideoClipDataset(datasets["official", 48], latent_frames=16, height=16, width=16)
    sampler = ShardedSampler(len(dataset), dp_rank=0, dp_size=1, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate)
    (batch,) = list(loader)
    assert batch.video.shape == (2, 3, 61, 16, 16)
    assert [len(p) for p in batch.prompts] == [2, 2]
    assert batch.num_valid_latent_frames.tolist() == [16, 16]
    assert sorted(batch.indices) == [0, 1] and sorted(batch.sources) == ["sample_000", "sample_001"]
    for b, index in enumerate(batch.indices):
        dataset.set_epoch(0)
        torch.testing.assert_close(batch.video[b], dataset[index].video, rtol=0, atol=0)


@pytest.mark.parametrize("dataset_len, dp_size, drop_last", [(10, 3, True), (10, 3, False), (8, 4, True), (5, 1, True)])
def test_sampler_shards_are_disjoint_and_cover_the_epoch(dataset_len, dp_size, drop_last):
    for epoch in range(2):
        shards = []
        for rank in range(dp_size):
            sampler = ShardedSampler(dataset_len, rank, dp_size, seed=7, drop_last=drop_last)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler)
        flat = [i for shard in shards for i in shard]
        if drop_last:
            assert len(flat) == len(set(flat)) == dataset_len // dp_size * dp_size
        else:
            assert set(flat) == set(range(dataset_len))
            assert all(len(s) == -(-dataset_len // dp_size) for s in shards)
    # Ranks of one SP group share the dp rank and so read the same samples.
    group = [ShardedSampler(dataset_len, dp_rank=0, dp_size=dp_size, seed=7) for _sp_rank in range(2)]
    assert list(group[0]) == list(group[1])


def test_sampler_epochs_differ_and_state_restore_resumes_the_sequence():
    sampler = ShardedSampler(20, dp_rank=1, dp_size=2, seed=3)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert epoch0 != sorted(epoch0) and list(sampler) != epoch0  # shuffled, and re-shuffled per epoch
    sampler.set_epoch(0)

    # Consume 7 samples (in batches), save, and continue on a fresh sampler: the same sequence.
    expected = epoch0 + ShardedSampler(20, 1, 2, seed=3).epoch_indices(1)
    consumed = []
    for _ in range(7):
        consumed.append(next(iter(sampler)))
        sampler.advance(1)
    state = sampler.state_dict()
    assert state == {"epoch": 0, "position": 7} and sampler.data_position.position == 7
    resumed = ShardedSampler(20, dp_rank=1, dp_size=2, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    resumed.advance(len(rest))  # end of epoch: on to the next one
    assert resumed.state_dict() == {"epoch": 1, "position": 0}
    assert consumed + rest + list(resumed) == expected
    with pytest.raises(ValueError):
        resumed.load_state_dict({"epoch": 0, "position": 11})
