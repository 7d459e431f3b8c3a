"""Presets, validation messages and recipe loading."""

from __future__ import annotations

import dataclasses

import pytest

from core.config import ModelConfig, Recipe, StreamConfig, VideoConfig, find_recipe, load_recipe


def test_official_defaults():
    assert ModelConfig.preset("wan2.2-ti2v-5b") == ModelConfig(
        dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48, out_channels=48,
        patch_size=(1, 2, 2), text_dim=4096, text_len=512, freq_dim=256, eps=1e-6)
    s = StreamConfig()
    assert (s.frames_per_block, s.local_window_frames, s.sink_frames, s.multi_shot_sink,
            s.shot_rope_offset, s.sampling_steps, s.timestep_shift, s.guidance_scale) == \
        (8, 32, 8, True, 8, 4, 5.0, 1.0)
    v = VideoConfig()
    assert (v.latent_height, v.latent_width, v.pixel_frames) == (44, 80, 509)


def test_tiny_has_the_same_structure():
    tiny, full = ModelConfig.preset("tiny"), ModelConfig.preset("wan2.2-ti2v-5b")
    assert tiny.patch_size == full.patch_size and tiny.text_len == full.text_len
    assert tiny.in_channels == full.in_channels and tiny.head_dim % 2 == 0
    assert tiny.dim < full.dim and tiny.num_layers < full.num_layers


@pytest.mark.parametrize("cls,kwargs,needle", [
    (ModelConfig, dict(dim=120, num_heads=24), "dim / num_heads must be an even head size"),
    (ModelConfig, dict(num_heads=5), "divisible by num_heads"),
    (StreamConfig, dict(frames_per_block=0), "frames_per_block must be a positive integer"),
    (StreamConfig, dict(local_window_frames=16), "local_window_frames must be >= 24"),
    (StreamConfig, dict(local_window_frames=12, multi_shot_sink=False), ">= 16"),
    (StreamConfig, dict(timestep_shift=0.0), "timestep_shift must be > 0"),
    (StreamConfig, dict(sink_frames=-1), "sink_frames must be an integer >= 0"),
    (VideoConfig, dict(height=700), "multiple of 32"),
])
def test_bad_values_name_the_field(cls, kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        cls(**kwargs)


def test_recipe_overrides_and_precedence(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("preset: tiny\nstream:\n  sampling_steps: 2\nvideo:\n  height: 256\n")
    recipe = load_recipe(path, ["stream.sampling_steps=3", "runtime.seed=7"])
    assert recipe.preset == "tiny" and recipe.model == ModelConfig.preset("tiny")
    assert recipe.stream.sampling_steps == 3 and recipe.video.height == 256
    assert recipe.runtime.seed == 7
    assert load_recipe(None, preset="tiny") == Recipe.preset_recipe("tiny")
    model_edit = load_recipe(None, ["model.num_layers=3"], preset="tiny")
    assert model_edit.model == dataclasses.replace(ModelConfig.preset("tiny"), num_layers=3)


@pytest.mark.parametrize("text,overrides,needle", [
    ("stream:\n  frame_per_block: 8\n", [], "unknown key 'stream.frame_per_block' (allowed: frames_per_block"),
    ("stream:\n  sampling_steps: four\n", [], "bad value for 'stream.sampling_steps': expected an integer"),
    ("runtime:\n  dtype: fp64\n", [], "bad value for 'runtime.dtype': 'fp64' (allowed: auto, bfloat16"),
    ("preset: huge\n", [], "bad value for 'preset': 'huge' (allowed: wan2.2-ti2v-5b, tiny, shapes)"),
    ("stream:\n  frames_per_block: 0\n", [], "stream.frames_per_block must be a positive integer"),
    ("", ["stream.sampling_steps"], "bad --set 'stream.sampling_steps': use key=value"),
    ("", ["bogus=1"], "unknown key 'bogus'"),
    ("stream: [1, 2\n", [], "cannot read recipe"),
    ("- a\n- b\n", [], "must be a mapping"),
])
def test_recipe_errors_are_one_line(tmp_path, text, overrides, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_bundled_recipes_load():
    for name in ("inference", "inference_2step", "tiny"):
        assert find_recipe(name).exists()
    official = load_recipe("inference")
    assert official.model == ModelConfig.preset("wan2.2-ti2v-5b")
    assert official.stream == StreamConfig() and official.video == VideoConfig()
    assert official.runtime.dtype == "bfloat16"
    assert load_recipe("inference_2step").stream.sampling_steps == 2
    assert load_recipe("tiny").preset == "tiny"
    with pytest.raises(FileNotFoundError, match="not found"):
        load_recipe("no_such_recipe")


@pytest.mark.parametrize("setting,device,chunks,want", [
    ("auto", "cpu", None, False), ("auto", "cuda", None, True), ("auto", "cuda", 10, False),
    ("auto", "cuda", 40, True), ("always", "cpu", 1, True), ("never", "cuda", None, False)])
def test_compile_policy(setting, device, chunks, want):
    import torch

    from core.optimize import DIT_BREAK_EVEN_CHUNKS, wants_compile

    assert wants_compile(setting, torch.device(device), chunks, DIT_BREAK_EVEN_CHUNKS) is want


@pytest.mark.parametrize("load, override, message", [
    ("train", "data.caption_dropout=2", "data.caption_dropout must be in [0, 1) (got 2.0)"),
    ("distill", "dmd.real_guidance_scale=-1", "dmd: guidance scales must be >= 0 (got -1.0, 0.0)"),
    ("recipe", "stream.sink_frames=-1", "stream.sink_frames must be an integer >= 0 (got -1)"),
])
def test_a_section_is_named_once_in_an_error(load, override, message):
    """A nested config's message that already names its section keeps it as it is; one that does
    not gets the section path (never both: "data.data.caption_dropout")."""
    from core.train.config import load_train_recipe
    from core.train.distill_config import load_distill_recipe

    loader = {"train": lambda: load_train_recipe("train_ar_tiny", [override]),
              "distill": lambda: load_distill_recipe("distill_tiny", [override]),
              "recipe": lambda: load_recipe(None, [override], preset="tiny")}[load]
    with pytest.raises(ValueError) as caught:
        loader()
    section = override.split(".")[0]
    assert str(caught.value).endswith(message) and f"{section}.{section}" not in str(caught.value)
