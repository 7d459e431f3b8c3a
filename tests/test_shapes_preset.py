"""The `shapes` preset and `--preset tiny` deferring to it: with trained files in the shipped folder
(written here: random weights at the right shapes), tiny loads exactly them; without them, or with
--random-weights, tiny is today's random model; the shapes preset's files load bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import core.assets
from core.config import ModelConfig, VAEConfig, load_recipe
from core.dit import random_init_
from core.train.config import load_train_recipe
from core.vae import random_vae
from longlive_cli.app import main
from longlive_cli.build import meta_dit
from longlive_cli.options import resolve_generation_recipe

PROMPT = "a red circle moves left to right on a blue background"
SMALL = ["--frames", "8", "--height", "64", "--width", "64", "--device", "cpu"]


def write_shapes_files(folder: Path, seed: int = 7) -> dict[str, dict[str, torch.Tensor]]:
    """dit.safetensors (bf16, as train-ar exports) and vae.safetensors (fp32) at the shapes widths."""
    folder.mkdir(parents=True, exist_ok=True)
    dit = meta_dit(ModelConfig.preset("shapes")).to_empty(device="cpu")
    random_init_(dit, seed)
    tensors = {"dit": {k: v.to(torch.bfloat16).contiguous() for k, v in dit.state_dict().items()},
               "vae": {k: v.contiguous() for k, v in random_vae(VAEConfig.preset("shapes"), seed).state_dict().items()}}
    save_file(tensors["dit"], str(folder / "dit.safetensors"))
    save_file(tensors["vae"], str(folder / "vae.safetensors"))
    return tensors


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> tuple[Path, dict]:
    """The package's shapes folder, pointed at a temporary copy holding trained-looking files."""
    folder = tmp_path / "assets-shapes"
    tensors = write_shapes_files(folder)
    monkeypatch.setattr(core.assets, "SHAPES", folder)
    return folder, tensors


@pytest.fixture
def not_shipped(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(core.assets, "SHAPES", tmp_path / "nothing-here")


def resolve(preset="tiny", **options):
    return resolve_generation_recipe(preset, None, [], {}, **options)


def test_shapes_preset_matches_the_training_recipe():
    assert load_train_recipe("train_ar_shapes").model == ModelConfig.preset("shapes")
    recipe = load_recipe(None, preset="shapes")
    assert recipe.vae == VAEConfig.preset("shapes") and (recipe.video.height, recipe.video.width) == (128, 128)


def test_tiny_defers_to_shapes_only_when_the_files_are_shipped(shipped):
    assert resolve().preset == "shapes" and resolve().model == ModelConfig.preset("shapes")
    assert resolve(random_weights=True).preset == "tiny"
    assert resolve(checkpoint="tiny_generator.safetensors").preset == "tiny"  # a file of tiny widths
    assert resolve_generation_recipe("tiny", None, ["model.num_layers=1"], {}).preset == "tiny"
    assert resolve("wan2.2-ti2v-5b").preset == "wan2.2-ti2v-5b"
    assert load_recipe(None, preset="tiny").preset == "tiny"  # the library's tiny stays the random config


def test_without_shipped_files_tiny_is_the_random_model(not_shipped):
    assert resolve().preset == "tiny" and resolve().model == ModelConfig.preset("tiny")


def test_shapes_models_load_the_files_bit_for_bit(shipped):
    from core.generate import GenerateRequest, prepare
    from core.shots import single_prompt_schedule
    from core.text import TextEncoder
    from longlive_cli.build import build_models, generation_spec

    folder, tensors = shipped
    recipe = resolve_generation_recipe("tiny", None, ["runtime.device=cpu", "runtime.dtype=float32"], {})
    request = GenerateRequest(recipe, single_prompt_schedule(PROMPT, 1, 8), folder / "v.mp4")
    placement = prepare(request)
    assert placement.checkpoint == folder / "dit.safetensors" and placement.shapes.vae == folder / "vae.safetensors"
    models = build_models(request, placement, generation_spec(request, placement))
    for name, value in models.dit.model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, tensors["dit"][name].float()), name
    for name, value in models.vae.state_dict().items():
        assert torch.equal(value, tensors["vae"][name]), name
    # the text encoder is the shipped file's: the seed-0 tiny encoder whatever --seed says
    prompts = [PROMPT, "The scene transitions. " + PROMPT]
    assert torch.equal(models.text.encode(prompts), TextEncoder.tiny(seed=0).encode(prompts))


def test_generate_preset_tiny_uses_the_shipped_files_and_random_weights_on_request(shipped, tmp_path):
    """Compared on the latents (--latents-out): x264's threaded encoding of noise-like frames is
    not bit-stable from run to run, the latents are."""
    from safetensors.torch import load_file

    folder, _ = shipped
    other = tmp_path / "other-folder"
    shutil.copytree(folder, other)
    runs = {"tiny": ["--preset", "tiny"], "shapes": ["--preset", "shapes", "--model-dir", str(other)],
            "random": ["--preset", "tiny", "--random-weights"]}
    latents = {}
    for name, args in runs.items():
        path = tmp_path / f"{name}.safetensors"
        assert main(["generate", PROMPT, *args, "--seed", "5", *SMALL, "-o", str(tmp_path / f"{name}.mp4"),
                     "--latents-out", str(path)]) == 0
        latents[name] = load_file(path)["latents"]
    assert _frames(tmp_path / "tiny.mp4").shape == (29, 64, 64, 3)
    assert torch.equal(latents["tiny"], latents["shapes"])
    assert not torch.allclose(latents["tiny"], latents["random"], atol=0.1)


def test_shapes_preset_without_files_is_one_line(not_shipped, tmp_path, capsys):
    assert main(["generate", PROMPT, "--preset", "shapes", *SMALL, "-o", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the shapes preset needs dit.safetensors, vae.safetensors" in err
    assert not (tmp_path / "v.mp4").exists()


def _frames(path: Path) -> torch.Tensor:
    from core.eval.shapes import read_video

    return torch.from_numpy(read_video(path))
