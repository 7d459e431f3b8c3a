"""Shipped shapes-world files: the tiny text encoder the generator is trained with is stored, with a
fixed hash, and loads to exactly the encoder of `TextEncoder.tiny(seed=0)`."""

from __future__ import annotations

import hashlib

import torch

from core.assets import shapes_text_encoder_path
from core.shots import SCENE_CUT_PREFIX
from core.text import ByteTokenizer, TextEncoder, TextEncoderConfig
from core.train.synthetic import evaluation_prompts

TEXT_ENCODER_SHA256 = "1073933667082af7217a674f1ef8c146d524cf94a14e9738ae53d81b517ea1a5"


def test_shipped_text_encoder_is_the_seed_0_tiny_encoder():
    path = shapes_text_encoder_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == TEXT_ENCODER_SHA256
    config = TextEncoderConfig.preset("tiny")
    shipped = TextEncoder.from_wan_checkpoint(path, ByteTokenizer(config.text_len), config=config)
    prompts = [p.caption for p in evaluation_prompts()[::12]]
    prompts.append(SCENE_CUT_PREFIX + prompts[0])
    assert torch.equal(shipped.encode(prompts), TextEncoder.tiny(seed=0).encode(prompts))


# The trained files, once shipped (docs/models/shapes.md): record each file's sha256 here in the same
# commit that adds it. A file without its hash here, or a hash without its file, fails.
TRAINED_SHA256: dict[str, str] = {
    "dit.safetensors": "9c9b909144a6d64bf0644322677909de1ee3c082fd2832ae1bbcffba835f880d",  # 5j
    "vae.safetensors": "1002879bb8953621985bb8bd2b6ed83aff8fc892b0af98bd945c397e3ce12416",  # 5n
}
SHIPPED_LIMIT_BYTES = 25 * 2**20  # DiT + VAE + text encoder (issue 11)


def test_shipped_trained_files_are_recorded_load_strictly_and_fit_the_size_limit():
    from core.assets import SHAPES, ShapesFiles
    from core.checkpoint import check_state_dict, read_shapes
    from core.config import ModelConfig, VAEConfig
    from core.vae import load_vae
    from longlive_cli.build import meta_dit

    files = ShapesFiles.in_folder(SHAPES)
    present = {p.name for p in (files.dit, files.vae) if p.is_file()}
    assert present == set(TRAINED_SHA256), f"record the sha256 of {present ^ set(TRAINED_SHA256)} in TRAINED_SHA256"
    for name, digest in TRAINED_SHA256.items():
        assert hashlib.sha256((SHAPES / name).read_bytes()).hexdigest() == digest, name
    if files.dit.is_file():
        check_state_dict(meta_dit(ModelConfig.preset("shapes")), read_shapes(files.dit), str(files.dit))
    if files.vae.is_file():
        load_vae(files.vae, VAEConfig.preset("shapes"))
    assert sum(p.stat().st_size for p in SHAPES.glob("*.safetensors")) <= SHIPPED_LIMIT_BYTES


def test_default_preset_obeys_two_prompts_when_the_trained_models_are_shipped(tmp_path):
    """The README's first command with the shipped models: the probe reads each prompt's attributes."""
    import pytest

    from core.assets import ShapesFiles
    from core.eval.shapes import probe_video, read_video
    from longlive_cli.app import main

    if not ShapesFiles.shipped().complete:
        pytest.skip("the trained shapes models are not shipped yet (docs/benchmarks/train_shapes_gpu.sh)")
    prompts = [p.caption for p in evaluation_prompts()[:: len(evaluation_prompts()) - 1]]  # one seen, one held out
    for index, prompt in enumerate(prompts):
        out = tmp_path / f"v{index}.mp4"
        assert main(["generate", prompt, "--preset", "tiny", "--device", "cpu", "-o", str(out)]) == 0
        (shot,) = probe_video(read_video(out), prompt)
        assert all(shot["correct"].values()), (prompt, shot["read"])


def test_default_preset_follows_a_three_shot_cut_list(tmp_path):
    """`multishot` with the shipped models, the probe's cut list 7 with its seed (the same video as
    the probe's, pixel for pixel): the third shot reads as its prompt (with the official RoPE shift
    of +8 per shot, which the AR model never saw in training, it fell back to the first shot: that
    shot's background, colour and shape), every shot has its background and colour, and each cut
    takes effect within a chunk."""
    import pytest

    from core.assets import ShapesFiles
    from core.eval.shapes import evaluation_schedules, probe_video, read_video
    from longlive_cli.app import main

    if not ShapesFiles.shipped().complete:
        pytest.skip("the trained shapes models are not shipped yet (docs/benchmarks/train_shapes_gpu.sh)")
    schedule = evaluation_schedules(8)[7]
    shots_file, out = tmp_path / "shots.txt", tmp_path / "story.mp4"
    shots_file.write_text("".join(shot.prompt + "\n" for shot in schedule.shots))
    assert main(["multishot", str(shots_file), "--preset", "tiny", "--device", "cpu", "--seed", "7",
                 "--seconds", str(schedule.num_video_frames / 24), "-o", str(out)]) == 0
    shots = probe_video(read_video(out), schedule)
    assert [s["transition"] for s in shots] == ["first", "cut", "cut"]
    assert all(shots[2]["correct"].values()), shots[2]["read"]
    for shot in shots:
        assert shot["correct"]["background"] and shot["correct"]["colour"], (shot["prompt"], shot["read"])
    assert all(s["frames_to_obey"] is not None and s["frames_to_obey"] < 32 for s in shots[1:])


# The distilled students committed beside the model card (docs/models/shapes.md 5k, 5l): LoRAs for
# `--lora` on the shipped generator, not the preset's default.
DISTILLED_LORAS: dict[str, tuple[str, int]] = {  # path: (sha256, the sampling steps it records)
    "docs/models/shapes/distill_2026-12-06g/lora4_shift1.safetensors":
        ("ba698efad027b85df00e97ff80c3382edc26850120837661d7b78baa0b8c134e", 4),
    "docs/models/shapes/distill_2026-12-06h/lora2_progressive.safetensors":
        ("f64f44045cb9e2024b14d3e7164e284c4ed107a207c0e589d125d7ba7bd7c810", 2),
    "docs/models/shapes/distill_2026-12-06h/lora2_shift2.safetensors":
        ("4ab4a18ccfc789d113725bda8f5887863cf7091888a9c438c6e1befb31fe86e2", 2),
    "docs/models/shapes/distill_2026-12-06i/lora2_shift15.safetensors":
        ("21e8239b80fb002ec8eeb88385c1a0edfce6417d03fb7f0bee5a190d13c36d18", 2),
}


def test_committed_students_are_recorded_and_fit_the_shapes_generator():
    from pathlib import Path

    from core.checkpoint import check_lora, read_lora_sampling, read_lora_shapes
    from core.config import ModelConfig
    from longlive_cli.build import meta_dit

    root = Path(__file__).resolve().parent.parent
    committed = {str(p.relative_to(root)) for p in root.glob("docs/models/shapes/distill_*/lora*.safetensors")}
    assert committed == set(DISTILLED_LORAS), f"record {committed ^ set(DISTILLED_LORAS)} in DISTILLED_LORAS"
    model = meta_dit(ModelConfig.preset("shapes"))
    for name, (digest, steps) in DISTILLED_LORAS.items():
        path = root / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
        assert check_lora(model, read_lora_shapes(path), name) in (32, 64)
        assert read_lora_sampling(path).get("sampling_steps") == steps, name


def test_the_two_step_student_draws_what_it_is_told(tmp_path):
    """`generate --lora` with the best committed 2-step student (it samples 2 steps without
    guidance at timestep shift 1.5, as recorded): the probe reads each prompt's background, colour,
    shape and direction (over the 48 probe prompts: 100 / 100 / 93.8 / 93.8 %, docs/models/shapes.md 5m)."""
    import pytest

    from core.assets import ShapesFiles
    from core.eval.shapes import probe_video, read_video
    from longlive_cli.app import main

    if not ShapesFiles.shipped().complete:
        pytest.skip("the trained shapes models are not shipped")
    from pathlib import Path

    models = Path(__file__).resolve().parent.parent / "docs/models/shapes"
    lora = str(models / "distill_2026-12-06i/lora2_shift15.safetensors")
    prompts = [p.caption for p in evaluation_prompts()[:: len(evaluation_prompts()) - 1]]  # one seen, one held out
    for index, prompt in enumerate(prompts):
        out = tmp_path / f"v{index}.mp4"
        assert main(["generate", prompt, "--preset", "tiny", "--device", "cpu", "--lora", lora, "-o", str(out)]) == 0
        (shot,) = probe_video(read_video(out), prompt)
        assert all(shot["correct"][a] for a in ("background", "colour", "shape", "direction")), (prompt, shot["read"])
