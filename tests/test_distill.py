"""`longlive distill` end to end on the tiny recipe (losses fall, the LoRA exports and changes 2-step
generation, the official checkpoint layout), resume after SIGKILL (the same LoRA as one run), two
gloo processes with FSDP2, and the start-up errors (one line, exit 2, before any model is built);
plus the pieces against slow obvious references: prompt plans, the LoRA adapter against a merged
weight, the materialised NVFP4 base against per-call quantization, activation checkpointing of
the rollout, I2V score inputs, and the trainable-only checkpoint with two optimizers."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.train.distill_config import load_distill_recipe
from longlive_cli.app import main
from tests.conftest import SMALL_STREAM, run_cli_here, text_context, tiny_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
FAST = ["--set", "train.checkpoint_every=2", "--set", "train.deterministic=true"]


@pytest.fixture
def one_thread():
    """The tiny runs are latency bound: one thread is faster than two on a busy 2-core machine.
    Also restores the deterministic-algorithms switch a run may turn on."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny teacher distinct from the student's and critic's seeded base (seed 7)."""
    from core.checkpoint import save_generator

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    return save_generator(tiny_model(seed=7), path)


def records(logdir: Path) -> list[dict]:
    path = logdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longlive_cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


# -- end to end --------------------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_tiny_recipe_lowers_both_losses_and_its_lora_changes_2_step_generation(tmp_path, teacher, one_thread):
    """Recorded (docs/distill.md): 60 steps with this teacher, critic 3.865 -> 3.154 (means of the
    first / last 10 steps) and DMD 0.523 -> 0.400 (first / last 5 generator steps). Here 30 steps,
    the same seeds."""
    logdir, lora = tmp_path / "run", tmp_path / "lora.safetensors"
    merged = tmp_path / "merged.safetensors"
    assert main(["distill", "distill_tiny", "--logdir", str(logdir), "--max-steps", "30", "--set",
                 f"checkpoints.real_score={teacher}", "--set", "train.checkpoint_every=15",
                 "--export-lora", str(lora), "--merge-into", str(merged)]) == 0
    steps = records(logdir)
    assert [r["step"] for r in steps] == list(range(1, 31))
    critic = [r["critic_loss"] for r in steps]
    dmd = [r["generator_loss"] for r in steps if "generator_loss" in r]
    assert len(dmd) == 15  # dfake_gen_update_ratio 2, step 0 included
    assert mean(critic[-10:]) < 0.95 * mean(critic[:10]), critic
    assert mean(dmd[-5:]) < 0.95 * mean(dmd[:5]), dmd
    assert all(r["generator_exit_step"] in (0.0, 1.0) for r in steps if "generator_loss" in r)
    assert any((logdir / "tensorboard").iterdir())  # the train-ar logs: TensorBoard beside metrics.jsonl

    # Every checkpoint holds the official LoRA file (reference-model.md §7.4): PEFT keys without
    # adapter name, full tensors.
    for step in (15, 30):
        official = torch.load(logdir / "checkpoints" / f"step_{step:08d}" / "model.pt", weights_only=True)
        assert set(official) == {"generator_lora", "critic_lora", "step"} and official["step"] == step
    layers = [f"blocks.{i}.{attn}.{x}" for i in range(2) for attn in ("self_attn", "cross_attn") for x in "qkvo"]
    layers += [f"blocks.{i}.ffn.{x}" for i in range(2) for x in (0, 2)]
    official_keys = {f"base_model.model.{layer}.lora_{ab}.weight" for layer in layers for ab in "AB"}
    for part in ("generator_lora", "critic_lora"):
        assert set(official[part]) == official_keys
        assert official[part]["base_model.model.blocks.1.ffn.0.lora_A.weight"].shape == (8, 128)
        assert official[part]["base_model.model.blocks.1.ffn.0.lora_B.weight"].shape == (256, 8)
    exported = load_file(lora)
    from core.checkpoint import read_lora_sampling

    # distill_tiny's stream.sampling_steps and timestep_shift: how generate --lora samples it by default
    assert read_lora_sampling(lora) == {"sampling_steps": 2, "timestep_shift": 5.0}
    assert exported.keys() == official["generator_lora"].keys()
    assert all(torch.equal(exported[k], official["generator_lora"][k]) for k in exported)

    # 2-step generation: the LoRA changes the video; the merged generator is the same model.
    def generate(name: str, *extra: str) -> torch.Tensor:
        out = tmp_path / f"{name}.mp4"
        assert main(["generate", "a red circle moves left to right", "--preset", "tiny", "--random-weights",
                     "--frames", "8", "--height", "64", "--width", "64", "--steps", "2", "-o", str(out),
                     "--latents-out", str(tmp_path / f"{name}.safetensors"), *extra]) == 0
        return load_file(tmp_path / f"{name}.safetensors")["latents"]

    plain, with_lora = generate("plain"), generate("lora", "--lora", str(lora))
    from_merged = generate("merged", "--checkpoint", str(merged))
    assert (with_lora - plain).abs().max() > 1e-2
    assert (with_lora - from_merged).abs().max() < 0.05 * (with_lora - plain).abs().max()  # bf16 storage


def test_a_generator_step_moves_its_rollout_towards_the_dmd_target(tmp_path, teacher, one_thread, monkeypatch):
    """The logged DMD loss of the tiny run falls mostly because the critic learns (with the
    generator's lr at 1e-12 it falls nearly as much: docs/distill.md), so the generator's share is
    checked here: after one update of the LoRA (the trainer's clip + AdamW step), the same rollout
    (the same draws) lands closer to its target sg(x - G); the opposite update lands farther."""
    import core.train.distill as distill
    from core.train.ar import TrainPlan
    from core.train.dmd import generator_loss as dmd_generator_loss
    from core.train.lora import lora_parameters
    from longlive_cli.build import build_dit
    from longlive_cli.distill import network_specs
    from longlive_cli.parallelize import parallelize_network

    recipe = load_distill_recipe("distill_tiny", [f"checkpoints.real_score={teacher}"])
    plan = TrainPlan(torch.device("cpu"))
    nets = distill.Networks(**{role.value: parallelize_network(build_dit(spec).model.eval(), role, recipe, plan)
                               for role, spec in network_specs(recipe, plan.device).items()})
    trainer = distill.DistillTrainer(recipe, distill.DistillOptions(tmp_path), plan, lambda: nets)
    trainer.start()
    cond = trainer._conditioning(next(trainer._batches(*trainer._data())))
    seen = {}

    def generator_loss(x, G, mask=None):
        seen.update(x=x.detach(), target=(x - G).detach())
        return dmd_generator_loss(x, G, mask=mask)

    monkeypatch.setattr(distill, "generator_loss", generator_loss)
    draws = trainer.generator.get_state(), trainer.exit_generator.get_state()
    trainer.generator_step(nets, cond)
    lora = lora_parameters(nets.generator)
    start = {n: (p.detach().clone(), p.grad.clone()) for n, p in lora.items()}

    def distance_after_update(sign: float) -> float:
        with torch.no_grad():
            for name, p in lora.items():
                p.copy_(start[name][0])
                p.grad = sign * start[name][1]
        trainer._update(nets.generator, trainer.optimizers(nets)[0], recipe.optim.grad_clip)
        trainer.generator.set_state(draws[0])
        trainer.exit_generator.set_state(draws[1])
        with torch.no_grad():
            x, _ = trainer._rollout(nets.generator, cond)
        return float((x - seen["target"]).pow(2).mean())

    before = float((seen["x"] - seen["target"]).pow(2).mean())  # mean G^2
    assert distance_after_update(1.0) < before < distance_after_update(-1.0)


def test_sigkill_then_resume_gives_the_uninterrupted_lora(tmp_path, capsys):
    steps = 6
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["distill", "distill_tiny", "--max-steps", str(steps), *FAST]
    # the uninterrupted run and the resumed one here (one thread), the killed one as a CLI process (ENV: one thread)
    assert run_cli_here(*args, "--logdir", str(straight), "--export-lora", str(straight / "lora.safetensors")) == 0

    kill_after = random.Random(os.getpid()).choice([3, 4, 5])
    proc = subprocess.Popen([sys.executable, "-m", "longlive_cli", *args, "--logdir", str(resumed)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(records(resumed)) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(records(resumed))
    assert killed_at < steps, "the run finished before it could be killed"
    # Leftovers of a crash mid-save, newer than any finished checkpoint: neither may ever be picked.
    # Copies of the newest complete checkpoint, one without its COMPLETE marker, both with a cut shard.
    newest = max((resumed / "checkpoints").glob("step_*/COMPLETE")).parent
    for name in (".tmp-step_00000099", "step_00000098"):
        half = shutil.copytree(newest, resumed / "checkpoints" / name)
        (half / "COMPLETE").unlink()
        shard = next(half.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    capsys.readouterr()
    assert run_cli_here(*args, "--logdir", str(resumed), "--export-lora", str(resumed / "lora.safetensors")) == 0
    again = capsys.readouterr()
    # The newest finished one (a kill right after an even step may cut that step's save short).
    assert f"resumed from the checkpoint of step {int(newest.name[5:])} (" in again.out
    assert killed_at - 2 <= int(newest.name[5:]) <= killed_at
    assert [r["step"] for r in records(resumed)] == list(range(1, steps + 1))  # each step once
    expected, got = load_file(straight / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_two_gloo_processes_with_fsdp(tmp_path):
    logdir = tmp_path / "two"
    out = cli("distill", "distill_tiny", "--nproc-per-node", "2", "--logdir", str(logdir), "--max-steps", "1",
              "--export-lora", str(logdir / "lora.pt"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in records(logdir)] == [1]  # rank 0 alone writes the log
    checkpoint = logdir / "checkpoints" / "step_00000001"
    assert (checkpoint / "extra_rank1.pt").exists()
    exported = torch.load(logdir / "lora.pt", weights_only=True)
    official = torch.load(checkpoint / "model.pt", weights_only=True)
    assert exported["step"] == 1 and len(exported["generator_lora"]) == 40
    assert all(torch.equal(v, official["generator_lora"][k]) for k, v in exported["generator_lora"].items())
    assert any(v.abs().max() > 0 for k, v in exported["generator_lora"].items() if "lora_B" in k)  # it trained


# -- start-up errors ---------------------------------------------------------------------------------


def _wrong_teacher(tmp_path: Path) -> str:
    from core.checkpoint import save_generator

    return str(save_generator(tiny_model(dim=64, num_heads=2), tmp_path / "small.safetensors"))


def _run_with_rank_8(tmp_path: Path) -> Path:
    from core.train.state import CheckpointManager

    logdir = tmp_path / "old"
    config = load_distill_recipe("distill_tiny").model_config()
    CheckpointManager(logdir).save(2, torch.nn.Linear(2, 2), None, config)
    return logdir


@pytest.mark.parametrize("make_args, needle", [
    (lambda p: ["--set", f"checkpoints.real_score={_wrong_teacher(p)}"],
     ("checkpoints.real_score: checkpoint", "wrong shape", "give a tiny generator file")),
    (lambda p: ["--logdir", str(_run_with_rank_8(p)), "--set", "adapter.rank=4"], "(lora_rank: 8 vs 4)"),
    (lambda p: ["--set", "data.negative_prompt="], "needs a negative prompt"),
    (lambda p: ["--set", "dmd.exit_step=2"], "dmd.exit_step 2 is out of range: use null (drawn per rollout) or 0..1"),
    (lambda p: ["--set", "dmd.guidance=3"], "unknown key 'dmd.guidance'"),
    (lambda p: ["--set", "data.synthetic=false", "--set", f"data.path={p / 'none.txt'}"], "does not exist"),
    (lambda p: ["--set", "quant.precision=fp8"], "inference format"),
    (lambda p: ["--export-lora", str(p / "missing" / "lora.pt")], "does not exist"),
], ids=["teacher", "lora-rank", "negative", "exit-step", "key", "prompts", "fp8", "export"])
def test_bad_input_is_one_line_exit_2_before_any_model(tmp_path, capsys, monkeypatch, make_args, needle):
    import longlive_cli.build

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(longlive_cli.build, "build_dit", no_models)
    args = make_args(tmp_path)
    if "--logdir" not in args:
        args += ["--logdir", str(tmp_path / "run")]
    assert main(["distill", "distill_tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(part in err for part in _parts(needle)), err


def _parts(needle: str | tuple[str, ...]) -> tuple[str, ...]:
    return needle if isinstance(needle, tuple) else (needle,)


# -- the pieces ----------------------------------------------------------------------------------------


def test_prompt_plans_follow_the_official_shot_rules(tmp_path):
    from core.train.prompts import PromptDataset

    P = "CUT "
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    txt = PromptDataset(tmp_path / "p.txt", 4, scene_cut_prefix=P)
    assert len(txt) == 2 and txt[1] == ["a dog"] * 4
    root = tmp_path / "captions" / "caption"
    for sample, captions in {"s0": ["one", "two", "three"], "s1": ["x", "y"]}.items():
        (root / sample).mkdir(parents=True)
        for n, caption in enumerate(captions):
            (root / sample / f"{n}.json").write_text(json.dumps({"caption": caption}))
    (root / "s1" / "shot_durations.txt").write_text("3, 9")
    even = PromptDataset(root.parent, 5, scene_cut_prefix=P)
    assert even[0] == ["one", "one", "CUT two", "two", "CUT three"]  # 5 = 2 + 2 + 1
    assert even[1] == ["x", "x", "x", "CUT y", "y"]  # durations file, clamped to 5
    fixed = PromptDataset(root.parent, 7, chunks_per_shot=2, scene_cut_prefix=P)
    assert fixed[0] == ["one", "one", "CUT two", "two", "CUT three", "three", "three"]  # last shot fills
    synthetic = PromptDataset(None, 4, chunks_per_shot=2, scene_cut_prefix=P)
    assert [p.startswith(P) for p in synthetic[0]] == [False, False, True, False]


def test_lora_adapter_equals_the_merged_weight_and_uses_the_official_keys():
    from core.train.lora import attach_lora, lora_parameters, lora_state_dict, scaled_for_merge

    model = attach_lora(tiny_model(), rank=4, alpha=8, dropout=0.0, seed=3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_parameters(model))
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.05)
    lora = lora_state_dict(model)
    assert len(lora) == 40 and all(k.startswith("base_model.model.blocks.") and ".default" not in k for k in lora)
    reference = tiny_model()  # W + (alpha / rank) B A by hand, on the plain model
    with torch.no_grad():
        for key, a in lora.items():
            if ".lora_A." in key:
                target = key[len("base_model.model."):-len(".lora_A.weight")]
                b = lora[key.replace("lora_A", "lora_B")]
                reference.get_submodule(target).weight += 2.0 * b @ a
    x, t = torch.randn(1, 48, 2, 8, 8), torch.full((1, 2), 700.0)
    expected = reference(x, t, text_context(1, 0), frames_per_block=2)
    torch.testing.assert_close(model(x, t, text_context(1, 0), frames_per_block=2), expected, rtol=1e-4, atol=1e-5)
    from core.checkpoint import merge_lora  # the reader `generate --lora` uses, which assumes scale 1

    merged = merge_lora(tiny_model(), scaled_for_merge(lora, 2.0))
    torch.testing.assert_close(merged(x, t, text_context(1, 0), frames_per_block=2), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ranks", [(2, 3), (4, 4, 1)])
def test_stacked_loras_equal_merging_them_one_after_another(ranks):
    """A progressive student (a LoRA distilled on a base with another LoRA merged) as one LoRA."""
    from core.checkpoint import merge_lora
    from core.train.lora import stack_loras
    from tests.conftest import random_lora

    loras = [random_lora(rank, seed=sum(ranks) + i, scale=0.05) for i, rank in enumerate(ranks)]
    one_after_another = tiny_model()
    for lora in loras:
        one_after_another = merge_lora(one_after_another, lora)
    stacked = stack_loras(*loras)
    assert {v.shape[0] for k, v in stacked.items() if ".lora_A." in k} == {sum(ranks)}
    at_once = merge_lora(tiny_model(), stacked)
    for (name, a), b in zip(one_after_another.state_dict().items(), at_once.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="different layers"):
        stack_loras(loras[0], {k: v for k, v in loras[1].items() if ".blocks.0." not in k})


def test_materialised_nvfp4_base_equals_per_call_quantization():
    from quant.nvfp4_train import NVFP4TrainingConfig, NVFP4TrainLinear

    rules = NVFP4TrainingConfig(weight_rule="mse", activation_rule="mse", gradient_rule="mse")
    layers = []
    for materialise in (False, True):
        torch.manual_seed(0)
        layer = NVFP4TrainLinear(torch.nn.Linear(64, 48), rules, seed=5).requires_grad_(False)
        if materialise:
            layer.materialize()
        layers.append(layer)
    x = torch.randn(3, 5, 64)
    outputs, grads = [], []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        outputs.append(y.detach())
        grads.append(xi.grad)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])


def test_activation_checkpointing_keeps_the_rollout_gradients():
    from core.config import StreamConfig
    from core.train.dmd import rollout
    from core.train.lora import attach_lora, lora_parameters
    from longlive_cli.parallelize import checkpoint_blocks

    stream = StreamConfig(**SMALL_STREAM)
    g = torch.Generator().manual_seed(0)
    noise, recache = torch.randn(1, 6, 48, 8, 8, generator=g), torch.randn(1, 6, 48, 8, 8, generator=g)
    contexts = [text_context(1, k) for k in range(3)]
    grads = []
    for checkpointed in (False, True):
        model = attach_lora(tiny_model(), rank=4, alpha=4, dropout=0.0, seed=1)
        draws = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in lora_parameters(model).values():
                p.normal_(0, 0.05, generator=draws)
        if checkpointed:
            checkpoint_blocks(model)
        x = rollout(model, noise, contexts, stream, 1, [False, True, False], recache_noise=recache)
        (x * torch.linspace(-1, 1, x.numel()).reshape(x.shape)).sum().backward()
        grads.append({n: p.grad for n, p in lora_parameters(model).items()})
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])
    assert any(grads[0][n].abs().max() > 0 for n in grads[0])


def test_i2v_score_inputs_keep_the_image_frame():
    from core.train.ar import TrainPlan
    from core.train.distill import Conditioning, DistillOptions, DistillTrainer
    from core.train.dmd import score_timesteps

    recipe = load_distill_recipe("distill_tiny", ["data.i2v=true", "data.vae=tiny"])
    trainer = DistillTrainer(recipe, DistillOptions(Path("unused")), TrainPlan(torch.device("cpu")), lambda: None)
    trainer._seed()
    image = torch.randn(2, 1, 48, 4, 4)
    cond = Conditioning([text_context(2, k) for k in range(4)], text_context(2, 9), None, image)
    x = torch.randn(2, 8, 48, 4, 4)
    t, noise, noisy = trainer._score_inputs(x, cond)
    replay = torch.Generator().manual_seed(recipe.runtime.seed)
    raw = torch.randint(0, 1000, (2, 4), generator=replay)  # one draw per block, then the noise
    expected_t = score_timesteps(raw.repeat_interleave(2, dim=1))
    expected_t[:, 0] = 0
    assert torch.equal(t, expected_t)
    assert torch.equal(noisy[:, :1], image) and torch.equal(noise[:, 0], torch.zeros_like(noise[:, 0]))
    mask = trainer._loss_mask(x, cond)
    assert not mask[:, 0].any() and mask[:, 1:].all()


@pytest.mark.parametrize("draw_shift", [None, 1.0, 2.5])
def test_score_timestep_shift_sets_the_draws_noise_follows_the_grid(draw_shift):
    """dmd.score_timestep_shift shifts the score timesteps' draws (null: the stream's shift, the
    official); the noised clip is x at the drawn sigma either way."""
    from core.train.ar import TrainPlan
    from core.train.distill import Conditioning, DistillOptions, DistillTrainer
    from core.train.dmd import score_timesteps, sigma_grid

    value = "null" if draw_shift is None else draw_shift
    recipe = load_distill_recipe("distill_tiny", [f"dmd.score_timestep_shift={value}"])
    trainer = DistillTrainer(recipe, DistillOptions(Path("unused")), TrainPlan(torch.device("cpu")), lambda: None)
    trainer._seed()
    cond = Conditioning([text_context(64, k) for k in range(4)], text_context(64, 9), None, None)
    x = torch.randn(64, 8, 48, 2, 2)
    t, noise, noisy = trainer._score_inputs(x, cond)
    raw = torch.randint(0, 1000, (64, 1), generator=torch.Generator().manual_seed(recipe.runtime.seed))
    shift = recipe.stream.timestep_shift if draw_shift is None else draw_shift
    assert torch.equal(t, score_timesteps(raw.repeat_interleave(8, dim=1), shift=shift))
    sigma = sigma_grid(t, shift=recipe.stream.timestep_shift)[:, :, None, None, None]
    torch.testing.assert_close(noisy, (1 - sigma) * x + sigma * noise)
    # the share of draws below sigma 0.3 (where fine detail is decided): u < 0.3 / (s - 0.3 (s - 1))
    low = float((sigma[:, 0].flatten() < 0.3).float().mean())
    assert abs(low - 0.3 / (shift - 0.3 * (shift - 1))) < 0.15, (low, shift)


def test_score_timestep_shift_must_be_positive():
    with pytest.raises(ValueError, match="dmd.score_timestep_shift must be > 0"):
        load_distill_recipe("distill_tiny", ["dmd.score_timestep_shift=0"])


def test_trainable_only_checkpoint_with_two_optimizers_round_trips(tmp_path):
    from core.train.lora import attach_lora
    from core.train.state import CheckpointManager

    def build():
        state = torch.nn.Module()
        state.generator = attach_lora(tiny_model(), rank=2, alpha=2, dropout=0.0, seed=0)
        state.fake_score = tiny_model(seed=1)  # a critic trained in full
        optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                      for m in (state.generator, state.fake_score)]
        return state, optimizers

    state, optimizers = build()
    for _ in range(2):
        loss = sum((p ** 2).sum() for p in state.parameters() if p.requires_grad)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    manager = CheckpointManager(tmp_path, trainable_only=True)
    path = manager.save(2, state, optimizers, {"preset": "tiny"}, {"step": 2},
                        files={"model.pt": lambda temp: torch.save({"step": 2}, temp)})
    assert torch.load(path / "model.pt", weights_only=True) == {"step": 2}
    restored, restored_optimizers = build()
    assert manager.load(path, restored, restored_optimizers) == {"step": 2}
    trained = {n: p for n, p in state.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, trained[n]) for n, p in restored.named_parameters() if p.requires_grad)
    for before, after in zip(optimizers, restored_optimizers, strict=True):
        exp_avg = [s["exp_avg"] for s in before.state.values()]
        assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(exp_avg, after.state.values(), strict=True))


def test_recipes_hold_the_official_settings():
    official = load_distill_recipe("distill")
    assert (official.adapter.rank, official.adapter.alpha, official.adapter.apply_to_critic) == (128, 128.0, True)
    o = official.optim
    assert (o.lr, o.critic_lr, o.beta1, o.beta2, o.grad_clip, o.dfake_gen_update_ratio) == (1e-5, 2e-6, 0, 0.999, 10, 5)
    assert (official.dmd.real_guidance_scale, official.dmd.fake_guidance_scale, official.dmd.exit_step) == (3, 0, None)
    s = official.stream
    assert (s.frames_per_block, s.local_window_frames, s.sink_frames, s.shot_rope_offset, s.sampling_steps,
            s.timestep_shift) == (8, 32, 0, 8, 4, 5)
    assert official.num_chunks == 4 and (official.data.height, official.data.width) == (704, 1280)
    nvfp4 = load_distill_recipe("distill_nvfp4")
    assert str(nvfp4.quant.precision) == "nvfp4" and nvfp4.data.batch_size == 2 and nvfp4.data.chunks_per_shot == 2
    assert nvfp4.stream.sink_frames == 8 and nvfp4.stream.pins_shot_sink


def test_shapes_recipe_distills_the_shipped_generator():
    """distill_shapes must build the network the shapes preset loads, on the AR recipe's blocks."""
    from core.config import ModelConfig, Recipe
    from core.train.config import load_train_recipe

    recipe, ar = load_distill_recipe("distill_shapes"), load_train_recipe("train_ar_shapes")
    assert recipe.model == ModelConfig.preset("shapes") == ar.model
    assert recipe.checkpoints.path("real_score") == Path("core/assets/shapes/dit.safetensors")
    assert (recipe.data.height, recipe.data.width, recipe.data.latent_frames) == (ar.data.height, ar.data.width,
                                                                                  ar.data.latent_frames)
    assert recipe.stream.frames_per_block == ar.train.frames_per_block
    # the student's rollouts stream as the shapes preset samples (sink, window, no RoPE shift at a cut)
    preset = Recipe.preset_recipe("shapes").stream
    assert [getattr(recipe.stream, k) for k in ("sink_frames", "local_window_frames", "multi_shot_sink",
                                                 "shot_rope_offset")] == \
        [getattr(preset, k) for k in ("sink_frames", "local_window_frames", "multi_shot_sink", "shot_rope_offset")]
    # the teacher's guidance against the empty prompt: the shapes generator's unconditional mode
    assert recipe.dmd.real_guidance_scale > 1 and recipe.data.negative_prompt == ""


@pytest.mark.parametrize("negative, scale, accepted", [
    ('""', 3.0, True), ("null", 3.0, False), ("null", 0.0, True), ("a blurry video", 3.0, True)])
def test_negative_prompt_empty_is_a_prompt_null_is_none(negative, scale, accepted):
    overrides = [f"data.negative_prompt={negative}", f"dmd.real_guidance_scale={scale}"]
    if accepted:
        recipe = load_distill_recipe("distill_tiny", overrides)
        assert recipe.data.negative_prompt == {"\"\"": "", "null": None}.get(negative, negative)
    else:
        with pytest.raises(ValueError, match="needs a negative prompt"):
            load_distill_recipe("distill_tiny", overrides)


def test_nvfp4_networks_follow_the_official_dmd_config():
    from core.train.ar import TrainPlan
    from longlive_cli.parallelize import Role, parallelize_network
    from quant.nvfp4_linear import NVFP4Linear
    from quant.nvfp4_train import NVFP4TrainLinear

    recipe = load_distill_recipe("distill_tiny", ["quant.precision=nvfp4"])
    plan = TrainPlan(torch.device("cpu"))
    nets = {role: parallelize_network(tiny_model(), role, recipe, plan) for role in Role}
    student = [m for m in nets[Role.generator].modules() if isinstance(m, NVFP4TrainLinear)]
    assert len(student) == 20 and all(m._frozen is not None and not m.weight.requires_grad for m in student)
    assert {(m.rules.weight_rule, m.rules.activation_rule, m.rules.gradient_rule, m.rules.weight_2d)
            for m in student} == {("mse", "mse", "mse", True)}
    assert all(type(nets[Role.generator].get_submodule(f"blocks.{i}.ffn.0").base_layer) is NVFP4TrainLinear
               for i in range(2))  # PEFT wraps the swapped layer
    teacher = [m for m in nets[Role.real_score].modules() if isinstance(m, NVFP4Linear)]
    assert len(teacher) == 20
    assert {(str(m.mode), m.rule, m.activation_rule) for m in teacher} == {("w4a4", "mse", "mse")}
    assert not any(p.requires_grad for p in nets[Role.real_score].parameters())
    critic = nets[Role.fake_score]
    assert not any(isinstance(m, (NVFP4Linear, NVFP4TrainLinear)) for m in critic.modules())
    assert all(".lora_" in n for n, p in critic.named_parameters() if p.requires_grad)


def test_max_seconds_stops_with_a_checkpoint_and_the_lora_then_resumes(tmp_path, one_thread):
    """--max-seconds ends the run at the first step past the budget, saved and exported as at the
    end; the same command with more time continues from that step."""
    logdir, lora = tmp_path / "run", tmp_path / "lora.safetensors"
    args = ["distill", "distill_tiny", "--logdir", str(logdir), "--max-steps", "3", "--export-lora", str(lora),
            *FAST, "--set", "train.checkpoint_every=100"]
    assert main([*args, "--max-seconds", "1e-6"]) == 0
    assert [r["step"] for r in records(logdir)] == [1]
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == ["step_00000001"]
    first = load_file(lora)
    assert main([*args, "--max-seconds", "3600"]) == 0
    assert [r["step"] for r in records(logdir)] == [1, 2, 3]
    assert any(not torch.equal(first[k], v) for k, v in load_file(lora).items())


@pytest.mark.parametrize("extra", [["--precision", "nvfp4"], ["--set", "data.i2v=true", "--set", "data.vae=tiny"]],
                         ids=["nvfp4", "i2v"])
def test_one_step_of_the_variants(tmp_path, one_thread, extra):
    logdir = tmp_path / "run"
    assert main(["distill", "distill_tiny", "--logdir", str(logdir), "--max-steps", "1", *extra]) == 0
    (record,) = records(logdir)
    assert record["step"] == 1 and record["critic_loss"] > 0 and record["generator_loss"] > 0


def test_the_gpu_benchmark_script_runs_its_cpu_smoke_line(one_thread, monkeypatch, capsys):
    """docs/benchmarks/distill_5b.py (the one-H200 measurement) on the tiny preset: both precisions
    print their JSON line with the time of an iteration."""
    import runpy

    script = ROOT / "docs" / "benchmarks" / "distill_5b.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--device", "cpu", "--set", "preset=tiny", "--height", "64",
                                      "--width", "64", "--frames", "16"])
    runpy.run_path(str(script), run_name="__main__")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["precision"] for r in lines] == ["bf16", "nvfp4"]
    assert all(r["s_per_iteration"] > 0 and r["tokens"] == 16 * 2 * 2 and r["generator_loss"] > 0 for r in lines)
