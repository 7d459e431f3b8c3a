"""Classifier-free guidance for models trained here: `data.caption_dropout` in `train-ar` teaches the
unconditional prediction (the empty prompt), and `stream.negative_prompt` ("" for the offline
presets, Wan's standard one for the 5B) is what guidance subtracts at sampling."""

from __future__ import annotations

import pytest
import torch

import core.generate as gen
import core.train.ar as ar
from core.config import WAN_NEGATIVE_PROMPT, Recipe
from core.train.ar import drop_captions
from longlive_cli.app import main


def samples(n: int, chunks: int = 3) -> list[list[str]]:
    return [[f"caption {i} chunk {c}" for c in range(chunks)] for i in range(n)]


@pytest.mark.parametrize("probability", [0.1, 0.5, 0.9])
def test_drop_captions_drops_whole_samples_at_the_rate(probability):
    prompts = samples(4000)
    out = drop_captions(prompts, probability, torch.Generator().manual_seed(0))
    dropped = [chunks == [""] * 3 for chunks in out]
    assert all(d or chunks == original for d, chunks, original in zip(dropped, out, prompts, strict=True))
    assert abs(sum(dropped) / len(out) - probability) < 0.03
    again = drop_captions(prompts, probability, torch.Generator().manual_seed(0))
    assert again == out  # the trainer's seeded generator decides, so a resumed run drops the same


def test_no_dropout_leaves_the_random_stream_alone():
    generator = torch.Generator().manual_seed(3)
    prompts = samples(5)
    assert drop_captions(prompts, 0.0, generator) is prompts
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())


@pytest.mark.parametrize("probability,expect_empty", [(0.0, False), (0.999, True)])
def test_train_ar_encodes_the_empty_prompt_for_dropped_samples(tmp_path, monkeypatch, probability, expect_empty):
    seen: list[str] = []
    original = ar.PromptEncoder.__call__

    def recording(self, prompts):
        seen.extend(prompts)
        return original(self, prompts)

    monkeypatch.setattr(ar.PromptEncoder, "__call__", recording)
    assert main(["train-ar", "train_ar_tiny", "--logdir", str(tmp_path / "run"), "--max-steps", "2",
                 "--set", f"data.caption_dropout={probability}", "--set", "train.checkpoint_every=100"]) == 0
    assert seen and all((p == "") == expect_empty for p in seen), seen


@pytest.mark.parametrize("extra,expected", [
    ([], None),  # no guidance: no negative pass at all
    (["--set", "stream.guidance_scale=3"], ""),  # the offline presets' unconditional: the empty prompt
    (["--set", "stream.guidance_scale=3", "--set", "stream.negative_prompt=blurry"], "blurry"),
])
def test_guidance_encodes_the_recipes_negative_prompt(tmp_path, monkeypatch, extra, expected):
    negatives = []
    original = gen.encode_schedule

    def recording(text, schedule, negative_prompt, dtype, device):
        negatives.append(negative_prompt)
        contexts, negative_context = original(text, schedule, negative_prompt, dtype, device)
        assert (negative_context is None) == (negative_prompt is None)
        return contexts, negative_context

    monkeypatch.setattr(gen, "encode_schedule", recording)
    assert main(["generate", "a red circle moves left on a blue background", "--preset", "tiny",
                 "--random-weights", "--height", "64", "--width", "64", "--frames", "8",
                 "-o", str(tmp_path / "x.mp4"), *extra]) == 0
    assert negatives == [expected]


def test_the_5b_keeps_wans_negative_prompt():
    assert Recipe.preset_recipe("wan2.2-ti2v-5b").stream.negative_prompt == WAN_NEGATIVE_PROMPT
    assert Recipe.preset_recipe("shapes").stream.negative_prompt == ""


def test_guidance_changes_the_tiny_video(tmp_path):
    """The negative branch really runs: guidance 3 with the empty prompt moves the latents."""
    from safetensors.torch import load_file

    latents = {}
    for scale in ("1", "3"):
        out = tmp_path / f"z{scale}.safetensors"
        assert main(["generate", "a red circle moves left on a blue background", "--preset", "tiny",
                     "--random-weights", "--height", "64", "--width", "64", "--frames", "8",
                     "-o", str(tmp_path / f"x{scale}.mp4"), "--latents-out", str(out),
                     "--set", f"stream.guidance_scale={scale}"]) == 0
        latents[scale] = load_file(out)["latents"]
    assert not torch.allclose(latents["1"], latents["3"])
