"""`longlive train-vae`: a tiny run trains, logs, checkpoints and exports a VAE that `load_vae` loads
strictly; a run stopped and resumed ends with the same weights bit for bit; the objective's
pieces against slow references; bad input is one line, exit 2, before any work."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core.config import VAEConfig
from core.train.autoencoder import (
    PER_LATENT,
    VAEOptim,
    autoencode,
    evaluate,
    held_out_clips,
    load_vae_recipe,
    moment_penalty,
    step_batches,
    training_batch,
)
from core.vae import WanVAE, load_vae
from longlive_cli.app import main

# A VAE of the same structure at the smallest widths, on a 32x32 world: seconds per run.
TINY = ["--set", "vae.base_dim=4", "--set", "vae.decoder_base_dim=4", "--set", "data.world_size=32",
        "--set", "data.crop=32", "--set", "data.frames=5", "--set", "data.warmup_latents=1",
        "--set", "data.batch_size=1", "--set", "data.eval_clips=2",
        "--set", "data.eval_frames=5", "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2",
        "--set", "train.eval_every=2", "--set", "optim.warmup_steps=2", "--set", "optim.ema_start_step=1"]
TINY_CONFIG = VAEConfig(base_dim=4, decoder_base_dim=4, num_res_blocks=1)


def records(logdir) -> list[dict]:
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_logs_checkpoints_and_exports_a_strictly_loadable_vae(tmp_path):
    logdir, export = tmp_path / "run", tmp_path / "vae.safetensors"
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(logdir), "--export", str(export), *TINY]) == 0
    steps = records(logdir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["mse"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 for r in steps)
    assert [("eval_psnr" in r) for r in steps] == [False, True, False, True]
    for name in ("loss.png", "eval_psnr.png"):
        assert (logdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    # The export: Wan2.2 names, fp32, loaded strictly with the recipe's VAEConfig; its metadata
    # holds the held-out PSNR of exactly these (EMA) weights.
    vae = load_vae(export, TINY_CONFIG)
    with safe_open(str(export), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "longlive-vae-1" and meta["ema"] == "true" and json.loads(meta["steps"]) == 4
    recipe = load_vae_recipe("train_vae_shapes", TINY[1::2])
    assert json.loads(meta["vae_config"]) == json.loads(json.dumps(recipe.vae.__dict__))
    metrics = evaluate(vae, held_out_clips(recipe.data))
    assert float(meta["eval_psnr"]) == pytest.approx(metrics["eval_psnr"], abs=1e-6)
    assert set(load_file(str(export))) == set(vae.state_dict())


def test_stop_and_resume_ends_with_the_same_weights(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(whole), "--export", str(whole / "v.safetensors"),
                 *TINY]) == 0
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(parts), "--max-steps", "2", *TINY]) == 0
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(parts), "--export", str(parts / "v.safetensors"),
                 *TINY]) == 0
    assert [r["step"] for r in records(parts)] == [1, 2, 3, 4]
    a, b = load_file(str(whole / "v.safetensors")), load_file(str(parts / "v.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [r["loss"] for r in records(parts)] == [r["loss"] for r in records(whole)]


def test_render_workers_change_nothing_but_the_speed(tmp_path):
    """Clips rendered ahead by worker processes are the clips of the same steps: same losses, same weights."""
    runs = {}
    for workers in (0, 2):
        logdir = tmp_path / f"w{workers}"
        export = str(logdir / "v.safetensors")
        assert main(["train-vae", "train_vae_shapes", "--logdir", str(logdir), "--export", export,
                     *TINY, "--set", f"data.workers={workers}"]) == 0
        runs[workers] = records(logdir), load_file(str(logdir / "v.safetensors"))
    assert [r["loss"] for r in runs[0][0]] == [r["loss"] for r in runs[2][0]]
    assert all(torch.equal(runs[0][1][name], runs[2][1][name]) for name in runs[0][1])
    batches = step_batches(load_vae_recipe("train_vae_shapes", [*TINY[1::2], "data.workers=2"]).data, 0, 3, 7)
    assert [w for _, w in batches] == [training_batch(load_vae_recipe("train_vae_shapes", TINY[1::2]).data, 0, s)[1]
                                       for s in range(3, 7)]


def test_batches_are_a_function_of_the_step():
    data = load_vae_recipe("train_vae_shapes", [*TINY[1::2], "data.warmup_latents=3"]).data
    batches = [training_batch(data, 0, step) for step in range(12)]
    assert all(torch.equal(a, b) and wa == wb for (a, wa), (b, wb) in zip(batches, [training_batch(data, 0, s)
                                                                                 for s in range(12)], strict=True))
    assert {w for _, w in batches} == {0, 1, 2, 3}
    for video, warmup in batches:
        assert video.shape == (1, 3, 5 + 4 * warmup, 32, 32) and video.min() >= -1 and video.max() <= 1
    assert not torch.equal(batches[0][0][:, :, :5], batches[1][0][:, :, :5])


@pytest.mark.parametrize("warmup", [0, 2])
def test_autoencode_steps_equal_encode_then_decode(warmup):
    """The trainer's latent-by-latent pass against the inference path (slow obvious reference)."""
    torch.manual_seed(0)
    vae = WanVAE(TINY_CONFIG)
    video = torch.rand(2, 3, 17, 32, 32) * 2 - 1
    with torch.no_grad():
        z_full = vae.encode(video)
        full = vae.decode(z_full, PER_LATENT)
        cells = vae.decode(z_full)  # the inference default: 4-latent cells, sub-pixel upsampling
    assert (cells - full).abs().max() < 1e-4  # the same function, another rounding
    decoded, target, z = autoencode(vae, video, warmup)  # with gradients from latent `warmup` on
    first = 0 if warmup == 0 else 1 + 4 * (warmup - 1)
    assert torch.equal(z.detach(), z_full[:, :, warmup:]) and torch.equal(target, video[:, :, first:])
    assert torch.equal(decoded.detach(), full[:, :, first:])
    decoded.pow(2).mean().backward()
    assert all(p.grad is not None for p in vae.parameters() if p.requires_grad and p.dim() > 1)
    noisy, _, _ = autoencode(vae, video, warmup, 0.5, torch.Generator().manual_seed(0))
    assert not torch.equal(noisy, decoded)  # the noise reaches the decoder


def test_moment_penalty_matches_a_per_channel_loop():
    z = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64) * torch.linspace(0.5, 2, 6).view(1, 6, 1, 1, 1) + 0.3
    expected = 0.0
    for c in range(6):
        values = z[:, c].flatten()
        expected += values.mean().item() ** 2 + math.log(values.std().item()) ** 2
    assert moment_penalty(z).item() == pytest.approx(expected / 6, rel=1e-12)
    assert moment_penalty(torch.randn(4, 48, 8, 16, 16)).item() < 1e-3  # N(0, 1) latents cost nothing


def test_lr_schedule_warms_up_then_decays_to_the_final_fraction():
    optim = VAEOptim(lr=1.0, warmup_steps=10, final_lr_fraction=0.1)
    lrs = [optim.lr_at(step, 100) for step in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[100] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.55)


@pytest.mark.parametrize("args, needle", [
    (["--set", "data.frames=8"], "data.frames must be 1 + 4k"),
    (["--set", "data.workers=-1"], "data.workers must be >= 0"),
    (["--set", "data.bogus=1"], "unknown key 'data.bogus'"),
    (["--set", "vae.dim_mult=[1,2,4,8]"], "cannot be regrouped"),
    (["--set", "runtime.dtype=bfloat16"], "trains in float32"),
    (["--export", "vae.pt"], "exported as .safetensors"),
    (["--max-steps", "0"], "--max-steps 0"),
    (["--max-steps", "5000"], "beyond train.max_steps 4000"),
    (["--set", "train.init_from=missing.safetensors"], "no such file"),
    (["--set", "train.train_encoder=false"], "set train.init_from"),
    (["--set", "train.init_decoder=false"], "set train.init_from"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resuming_with_other_widths_is_refused(tmp_path, capsys):
    logdir = tmp_path / "run"
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(logdir), "--max-steps", "2", *TINY]) == 0
    wider = [*TINY, "--set", "vae.decoder_base_dim=8"]
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(logdir), *wider]) == 2
    assert "different model" in capsys.readouterr().err


def test_decoder_fine_tuning_keeps_the_encoder_and_so_the_latents(tmp_path):
    """train.train_encoder=false from an export: the encoder's weights (so every latent a generator
    was trained on) stay bit for bit, the decoder's change; the run starts from the export's weights."""
    first, tuned = tmp_path / "first.safetensors", tmp_path / "tuned.safetensors"
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(tmp_path / "a"), "--export", str(first), *TINY]) == 0
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(tmp_path / "b"), "--export", str(tuned), *TINY,
                 "--set", f"train.init_from={first}", "--set", "train.train_encoder=false"]) == 0
    a, b = load_file(str(first)), load_file(str(tuned))
    encoder = [n for n in a if n.startswith(("encoder.", "conv1."))]
    decoder = [n for n in a if n.startswith(("decoder.", "conv2."))]
    assert encoder and decoder and len(encoder) + len(decoder) == len(a)
    assert all(torch.equal(a[n], b[n]) for n in encoder)
    assert sum(not torch.equal(a[n], b[n]) for n in decoder) > len(decoder) // 2
    video = held_out_clips(load_vae_recipe("train_vae_shapes", TINY[1::2]).data)[:1]
    assert torch.equal(load_vae(first, TINY_CONFIG).encode(video), load_vae(tuned, TINY_CONFIG).encode(video))
    # the fine-tuning's first step starts from the export, not from the seed's random weights
    fresh = records(tmp_path / "a")[0]["mse"]
    assert records(tmp_path / "b")[0]["mse"] < fresh


def test_a_new_decoder_of_other_widths_for_the_same_latents(tmp_path, capsys):
    """train.init_decoder=false: the encoder side comes from the export bit for bit (so the latents
    do), the decoder side at the recipe's own widths starts from the seed's random weights."""
    first, wide = tmp_path / "first.safetensors", tmp_path / "wide.safetensors"
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(tmp_path / "a"), "--export", str(first), *TINY]) == 0
    wider = [*TINY, "--set", f"vae.decoder_base_dim={2 * TINY_CONFIG.decoder_base_dim}"]
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(tmp_path / "b"), "--export", str(wide), *wider,
                 "--set", f"train.init_from={first}", "--set", "train.train_encoder=false",
                 "--set", "train.init_decoder=false"]) == 0
    a, b = load_file(str(first)), load_file(str(wide))
    encoder = [n for n in a if n.startswith(("encoder.", "conv1."))]
    assert encoder and all(torch.equal(a[n], b[n]) for n in encoder)
    widths = {n: (a[n].shape, b[n].shape) for n in a if n.startswith("decoder.") and a[n].shape != b[n].shape}
    assert widths and set(b) == set(a)
    wide_config = replace(TINY_CONFIG, decoder_base_dim=2 * TINY_CONFIG.decoder_base_dim)
    video = held_out_clips(load_vae_recipe("train_vae_shapes", TINY[1::2]).data)[:1]
    assert torch.equal(load_vae(first, TINY_CONFIG).encode(video), load_vae(wide, wide_config).encode(video))
    # the encoder's widths must be the file's: one line, exit 2, before any step
    other = [*TINY, "--set", f"vae.base_dim={2 * TINY_CONFIG.base_dim}"]
    assert main(["train-vae", "train_vae_shapes", "--logdir", str(tmp_path / "c"), *other,
                 "--set", f"train.init_from={first}", "--set", "train.init_decoder=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the encoder widths" in err, err
    assert not (tmp_path / "c" / "metrics.jsonl").exists()
