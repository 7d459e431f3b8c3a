"""`train-ar` on the shapes world with a trained-VAE file (`data.vae=shapes`, `data.vae_path`): a few
steps run on the CPU with batches of two multi-shot samples; a missing VAE file is one line,
exit 2, before any data is generated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.config import VAEConfig
from core.train.autoencoder import save_vae
from core.vae import WanVAE
from longlive_cli.app import main

SMALL = ["--set", "data.synthetic_samples=4", "--set", "data.num_workers=0", "--set", "data.latent_frames=8",
         "--set", "data.height=64", "--set", "data.width=64", "--set", "train.frames_per_block=4",
         "--set", "data.synthetic_shot_frames=20", "--set", "model.num_layers=1", "--set", "model.dim=64",
         "--set", "model.ffn_dim=128"]


@pytest.fixture(scope="module")
def shapes_vae(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_vae(WanVAE(VAEConfig.preset("shapes")), tmp_path_factory.mktemp("vae") / "vae.safetensors", {})


def test_shapes_recipe_trains_on_multi_shot_batches(tmp_path, shapes_vae):
    logdir = tmp_path / "run"
    assert main(["train-ar", "train_ar_shapes", "--logdir", str(logdir), "--max-steps", "2",
                 "--set", f"data.vae_path={shapes_vae}", "--set", "data.batch_size=2", *SMALL]) == 0
    steps = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] > 0 for s in steps)
    # 4 latent frames of 2x2 tokens (64x64 pixels), clean + noisy, two samples per step
    assert all(s["tokens_per_second"] * s["step_seconds"] == pytest.approx(2 * 2 * 8 * 4) for s in steps)
    captions = sorted((logdir / "synthetic-data" / "caption").rglob("*.json"))
    assert len(captions) == 4 * 3  # samples x shots


@pytest.mark.parametrize("args, needle", [
    (["--set", "data.vae_path=/nonexistent/vae.safetensors"], "data.vae_path /nonexistent/vae.safetensors not found"),
    (["--set", "data.vae=tiny", "--set", "data.vae_path=x.safetensors"], "data.vae_path is for data.vae=shapes"),
])
def test_bad_vae_selection_is_one_line_exit_2(tmp_path, capsys, args, needle):
    logdir = tmp_path / "run"
    assert main(["train-ar", "train_ar_shapes", "--logdir", str(logdir), *SMALL, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (logdir / "synthetic-data").exists()
