"""`longlive generate` / `multishot` end to end on the tiny preset (CPU, offline)."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import core.generate as gen
from core.config import load_recipe
from core.shots import load_schedule, single_prompt_schedule
from longlive_cli.app import main
from longlive_cli.build import build_models, generation_spec

SMALL = ["--preset", "tiny", "--random-weights", "--height", "64", "--width", "64"]


def read_video(path: Path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, dict(container.metadata)


def no_leftovers(folder: Path, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep) == []


@pytest.mark.parametrize("latent_frames", [8, 16])
def test_generate_writes_4n_minus_3_frames_at_24_fps(tmp_path, capsys, latent_frames):
    out = tmp_path / "x.mp4"
    assert main(["generate", "a red ball bounces", *SMALL, "--frames", str(latent_frames), "-o", str(out),
                 "--latents-out", str(tmp_path / "z.safetensors")]) == 0
    frames, fps, metadata = read_video(out)
    assert len(frames) == 4 * (latent_frames - 1) + 1 and fps == 24 and frames[0].shape == (64, 64, 3)
    assert json.loads(metadata["comment"])["shot_start_frames"] == [0]
    latents = load_file(tmp_path / "z.safetensors")["latents"]
    assert latents.shape == (1, latent_frames, 48, 4, 4)
    summary = capsys.readouterr().out
    for needle in ("denoise fps", "end-to-end fps", "peak GPU memory", "64x64", "4 / float32", out.name):
        assert needle in summary


def test_multishot_cuts_fall_on_the_scheduled_chunk_boundaries(tmp_path, monkeypatch):
    shots = tmp_path / "shots.yaml"
    shots.write_text("- prompt: a red ball on grass\n  seconds: 1.5\n"
                     "- prompt: the ball rolls into a pond\n  seconds: 2\n  transition: cut\n"
                     "- prompt: ripples spread on the water\n  frames: 40\n  transition: continue\n")
    seen = {}
    real = gen.stream_latents

    def spy(model, noise, contexts, stream, scene_cuts, **kw):
        seen["cuts"], seen["contexts"] = list(scene_cuts), contexts
        yield from real(model, noise, contexts, stream, scene_cuts, **kw)

    monkeypatch.setattr(gen, "stream_latents", spy)
    out = tmp_path / "multi.mp4"
    assert main(["multishot", str(shots), *SMALL, "--set", "stream.frames_per_block=2",
                 "--set", "stream.local_window_frames=6", "--set", "stream.sink_frames=2", "-o", str(out)]) == 0
    schedule = load_schedule(shots, 2)
    frames, _, metadata = read_video(out)
    assert len(frames) == schedule.num_video_frames
    assert seen["cuts"] == schedule.scene_cuts and sum(schedule.scene_cuts) == 1  # cut, then continue
    cut_chunk = schedule.scene_cuts.index(True)
    assert json.loads(metadata["comment"])["shot_start_frames"] == schedule.shot_start_frames
    assert schedule.shot_start_frames[1] == 4 * cut_chunk * 2 - 3  # a chunk boundary
    # each chunk got its own prompt's embedding (the cut chunk carries the scene-cut prefix)
    prompts = schedule.chunk_prompts
    assert prompts[cut_chunk].startswith("The scene transitions. ")
    for i, a in enumerate(seen["contexts"]):
        for j, b in enumerate(seen["contexts"]):
            assert torch.equal(a, b) == (prompts[i] == prompts[j])


def test_txt_shot_list_uses_the_length_option(tmp_path):
    shots = tmp_path / "shots.txt"
    shots.write_text("a cat sleeps\n\na cat wakes up\n")
    out = tmp_path / "t.mp4"
    assert main(["multishot", str(shots), *SMALL, "--frames", "16", "-o", str(out)]) == 0
    assert len(read_video(out)[0]) == 61


def test_image_to_video(tmp_path):
    image = tmp_path / "start.png"
    with av.open(str(image), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 40, 30, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8), "rgb24")
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    out = tmp_path / "i2v.mp4"
    assert main(["generate", "it starts to move", *SMALL, "--frames", "8", "--image", str(image), "-o", str(out)]) == 0
    assert len(read_video(out)[0]) == 29


def _interactive_run(tmp_path, encoder_blocks: bool):
    """A 4-chunk run where "a storm begins" is typed when chunk 2 (of 0..3) is about to start.
    With `encoder_blocks` the text encoder does not return that prompt's context until the last
    chunk is done (or 30 s pass: then it records that the video waited for it); without, the
    test waits until the context is ready, so the switch lands at chunk 2."""
    from core.interactive import BackgroundPrompts

    recipe = load_recipe(None, ["stream.frames_per_block=2", "stream.local_window_frames=6", "stream.sink_frames=2",
                                "video.height=64", "video.width=64"], preset="tiny")
    typed, release, logged, stalled = queue.Queue(), threading.Event(), [], []
    request = gen.GenerateRequest(recipe, single_prompt_schedule("calm sea", 4, 2), tmp_path / "i.mp4")
    placement = gen.prepare(request)
    models = build_models(request, placement, generation_spec(request, placement))

    def encode(prompt):
        if prompt == "a storm begins" and encoder_blocks and not release.wait(30):
            stalled.append(True)
        return models.text.encode([prompt])

    feed = BackgroundPrompts(lambda: None if typed.empty() else typed.get(), encode, placement.device)

    def on_chunk(done, total):
        if done == 2:
            typed.put("a storm begins")
            if not encoder_blocks:
                assert feed.wait_ready(10)
        if done == total:
            release.set()

    report = gen.generate_video(request, placement, models, on_chunk, prompt_source=feed, log=logged.append)
    return report, logged, stalled


def test_interactive_prompt_switch_is_logged_with_its_frame(tmp_path):
    report, logged, _ = _interactive_run(tmp_path, encoder_blocks=False)
    assert report.switches == [(2, 4 * 2 * 2 - 3, "a storm begins")]
    assert "switch at chunk 2 (frame 13" in logged[0]
    assert [t.chunk for t in report.prompt_timings] == [2]
    assert len(read_video(tmp_path / "i.mp4")[0]) == 29


def test_a_busy_text_encoder_does_not_stall_the_video(tmp_path):
    """Chunks 2 and 3 are denoised while the encoder still works on the typed prompt: the video
    reaches its end without waiting, and the late prompt is recorded as typed, never applied."""
    report, _, stalled = _interactive_run(tmp_path, encoder_blocks=True)
    assert stalled == []
    assert report.switches == []
    assert [(t.prompt, t.chunk) for t in report.prompt_timings] == [("a storm begins", None)]
    assert len(read_video(tmp_path / "i.mp4")[0]) == 29


@pytest.mark.parametrize("case,needle", [
    ("model_dir", "model folder"),
    ("bad_yaml", "shots.yaml"),
    ("empty_prompt", "shot 2"),
    ("negative", "shot 1"),
    ("unknown_key", "unknown shot key 'duration'"),
    ("image", "cannot read image"),
    ("missing_image", "not found"),
    ("resolution", "video.height must be a positive multiple of 32"),
    ("frames", "--frames 12: the video is made of blocks of 8"),
    ("steps", "--steps 3"),
    ("device_decode", "needs a CUDA GPU"),
    ("output", "must be an .mp4"),
    ("latents_out", "--latents-out"),
    ("attention", "bad value for 'runtime.attention': 'bogus' (allowed: auto, cudnn, flash, efficient, math, fp8)"),
    ("attention_fp8", "--attention fp8 runs FlashAttention-3's FP8 kernel on a Hopper GPU"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, capsys, case, needle):
    if case in ("device_decode", "attention_fp8") and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "out.mp4"
    shots = tmp_path / "shots.yaml"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    args = {
        "model_dir": ["generate", "x", "--model-dir", str(tmp_path / "none"), "--device", "cpu"],
        "bad_yaml": ["multishot", str(shots), *SMALL],
        "empty_prompt": ["multishot", str(shots), *SMALL],
        "negative": ["multishot", str(shots), *SMALL],
        "unknown_key": ["multishot", str(shots), *SMALL],
        "image": ["generate", "x", *SMALL, "--frames", "8", "--image", str(bad)],
        "missing_image": ["generate", "x", *SMALL, "--frames", "8", "--image", str(tmp_path / "no.png")],
        "resolution": ["generate", "x", "--preset", "tiny", "--height", "100"],
        "frames": ["generate", "x", *SMALL, "--frames", "12"],
        "steps": ["generate", "x", *SMALL, "--steps", "3"],
        "device_decode": ["generate", "x", *SMALL, "--frames", "8", "--decode", "device:1"],
        "output": ["generate", "x", *SMALL, "--frames", "8", "-o", str(tmp_path / "x.avi")],
        "latents_out": ["generate", "x", *SMALL, "--frames", "8", "--latents-out", str(tmp_path / "no" / "z.st")],
        "attention": ["generate", "x", *SMALL, "--frames", "8", "--attention", "bogus"],
        "attention_fp8": ["generate", "x", *SMALL, "--frames", "8", "--attention", "fp8"],
    }[case]
    shots.write_text({
        "bad_yaml": "- prompt: [unclosed\n",
        "empty_prompt": "- prompt: a\n  seconds: 1\n- prompt: '  '\n  seconds: 1\n",
        "negative": "- prompt: a\n  seconds: -2\n",
        "unknown_key": "- prompt: a\n  duration: 2\n",
    }.get(case, "- prompt: a\n  seconds: 1\n"))
    if "-o" not in args:
        args += ["-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert no_leftovers(tmp_path, keep=("shots.yaml", "broken.png"))


@pytest.mark.parametrize("failure,code", [(KeyboardInterrupt, 130), (RuntimeError, None)])
def test_interrupt_or_crash_leaves_no_video(tmp_path, monkeypatch, failure, code):
    import core.decode

    calls = []

    def explode(self, latents):
        calls.append(1)
        if len(calls) == 2:
            raise failure("stop")
        return original(self, latents)

    original = core.decode.SyncDecoder.submit
    monkeypatch.setattr(core.decode.SyncDecoder, "submit", explode)
    args = ["generate", "x", *SMALL, "--frames", "24", "-o", str(tmp_path / "v.mp4")]
    if code is None:
        with pytest.raises(failure):
            main(args)
    else:
        assert main(args) == code
    assert list(tmp_path.iterdir()) == []


def test_interactive_cli_switches_on_a_typed_prompt(tmp_path):
    import subprocess
    import sys

    shots = tmp_path / "shots.txt"
    shots.write_text("a calm sea\n")
    out = tmp_path / "live.mp4"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "longlive_cli", "multishot", str(shots), "--interactive", *SMALL,
         "--frames", "32", "-o", str(out)], input="a storm begins\n", capture_output=True, text=True,
        cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "switch at chunk 1 (frame 29, 1.21 s): 'a storm begins'" in done.stderr
    assert "prompt switches   │ 1" in done.stdout
    assert len(read_video(out)[0]) == 125


@pytest.mark.parametrize("attention", ["math", "efficient"])
def test_attention_flag_selects_the_sdpa_kernel_of_the_denoising(tmp_path, monkeypatch, attention):
    """`--attention` reaches runtime.attention and the chunks are denoised under that SDPA kernel
    family (as `bench` measures them), not PyTorch's default order."""
    import contextlib

    used = []

    @contextlib.contextmanager
    def recording(name):
        used.append(name)
        yield

    monkeypatch.setattr(gen, "sdpa_backend", recording)
    out = tmp_path / "a.mp4"
    assert main(["generate", "x", *SMALL, "--frames", "8", "--attention", attention, "-o", str(out)]) == 0
    assert used == [attention] and out.is_file()

