"""EMA, RNG state and checkpoints (core/train/state.py)."""

from __future__ import annotations

import json
import multiprocessing
import random
import socket

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import UserError
from core.train.state import EMA, CheckpointManager, rng_state, set_rng_state
from tests.conftest import tiny_model

CONFIG = {"dim": 128, "patch_size": (1, 2, 2), "num_layers": 2}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """One optimizer step on a loss that touches every parameter."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((p * torch.randn(p.shape, generator=g)).sum() + p.pow(2).sum() for p in model.parameters())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0)


# ---------------------------------------------------------------------------------- EMA


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_ema_matches_loop(device, on_device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model = nn.Linear(3, 2).to(device)
    ema = EMA(model, decay=0.9, start_step=2, on_device=on_device)
    reference: dict[str, list[float]] | None = None
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.update(model, step)
        if step >= 2:
            values = {n: p.detach().flatten().tolist() for n, p in model.named_parameters()}
            if reference is None:
                reference = values
            else:
                reference = {n: [0.9 * s + 0.1 * v for s, v in zip(reference[n], values[n], strict=True)]
                             for n in values}
        else:
            assert ema.shadow is None
    for name, shadow in ema.shadow.items():
        assert shadow.dtype == torch.float32 and shadow.device.type == (device if on_device else "cpu")
        torch.testing.assert_close(shadow.cpu().flatten(), torch.tensor(reference[name]), rtol=1e-6, atol=1e-6)
    assert all(v.device.type == "cpu" for v in ema.state_dict()["shadow"].values())
    target = nn.Linear(3, 2).to(torch.bfloat16)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight.float(), ema.shadow["weight"].cpu().to(torch.bfloat16).float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ema_on_device_restored_shadow_moves_to_the_gpu_and_keeps_averaging():
    model = nn.Linear(3, 2).cuda()
    ema = EMA(model, decay=0.5, start_step=0, on_device=True)
    ema.update(model, 0)
    restored = EMA(model, decay=0.5, start_step=0, on_device=True)
    restored.load_state_dict(ema.state_dict())  # CPU tensors, as a checkpoint holds them
    with torch.no_grad():
        model.weight.add_(1.0)
    restored.update(model, 1)
    assert restored.shadow["weight"].device.type == "cuda"
    torch.testing.assert_close(restored.shadow["weight"], ema.shadow["weight"] + 0.5)


def test_ema_state_round_trip(tmp_path):
    model = tiny_model()
    ema = EMA(model, decay=0.99, start_step=0)
    ema.update(model, 0)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    restored = EMA(model)
    restored.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert restored.shadow.keys() == ema.shadow.keys()
    assert all(torch.equal(restored.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(UserError, match="does not match the model"):
        EMA(nn.Linear(2, 2)).load_state_dict(ema.state_dict())


def test_ema_strips_wrapper_prefixes():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self._orig_mod = nn.Linear(2, 2)

    ema = EMA(Wrapped(), start_step=0)
    ema.update(Wrapped(), 0)
    assert sorted(ema.shadow) == ["bias", "weight"]


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in the Python state
    torch.save(rng_state(), tmp_path / "rng.pt")
    first = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2))
    assert torch.equal(first[0], second[0]) and first[1:3] == second[1:3]
    assert np.array_equal(first[3], second[3])


# ---------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    model, optimizer = tiny_model(seed=0), None
    optimizer = adamw(model)
    train_step(model, optimizer, seed=1)
    manager = CheckpointManager(tmp_path, keep=3)
    extra = {"data_position": 17, "rng": rng_state(), "nested": {"list": [1, 2, torch.arange(3)]}}
    path = manager.save(5, model, optimizer, CONFIG, extra)
    assert path == tmp_path / "checkpoints" / "step_00000005" and manager.latest() == path
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["step"] == 5 and marker["model_config"]["patch_size"] == [1, 2, 2] and marker["world_size"] == 1

    fresh = tiny_model(seed=7)
    fresh_optimizer = adamw(fresh)
    loaded_extra = manager.load(path, fresh, fresh_optimizer)
    assert loaded_extra["data_position"] == 17 and torch.equal(loaded_extra["nested"]["list"][2], torch.arange(3))
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    saved_state, loaded_state = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved_state["param_groups"] == loaded_state["param_groups"]
    for key, state in saved_state["state"].items():
        for field, value in state.items():
            assert torch.equal(value, loaded_state["state"][key][field]), (key, field)
    # training continues identically
    train_step(model, optimizer, seed=2)
    train_step(fresh, fresh_optimizer, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_latest_ignores_incomplete_and_prunes(tmp_path):
    model = nn.Linear(2, 2)
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    manager.save(3, model, None, CONFIG)
    root = tmp_path / "checkpoints"
    # a newer checkpoint being written, one without its marker, and names that are not checkpoints
    for name in (".tmp-step_00000009", "step_00000008", "step_7", "step_00000010.old"):
        (root / name).mkdir()
    for name in (".tmp-step_00000009", "step_7", "step_00000010.old"):
        (root / name / "COMPLETE").write_text("{}")
    assert manager.latest() == root / "step_00000003"
    for step in (4, 5, 6):
        manager.save(step, model, None, CONFIG)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step_00000005", "step_00000006", "step_00000008", "step_00000010.old", "step_7"]
    assert manager.latest() == root / "step_00000006"
    # saving the same step again replaces it
    with torch.no_grad():
        model.weight.fill_(3.0)
    manager.save(6, model, None, CONFIG)
    fresh = nn.Linear(2, 2)
    manager.load(root / "step_00000006", fresh)
    assert (fresh.weight == 3.0).all()


def test_check_compatible(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.check_compatible(CONFIG)  # nothing saved yet: fine
    manager.save(1, nn.Linear(2, 2), None, CONFIG)
    manager.check_compatible(dict(CONFIG, patch_size=[1, 2, 2]))
    path = tmp_path / "checkpoints" / "step_00000001"
    message = (f"checkpoint in {path} was written for a different model (dim: 128 vs 256); "
               "use --no-resume or another --logdir")
    with pytest.raises(UserError) as error:
        manager.check_compatible(dict(CONFIG, dim=256))
    assert str(error.value) == message
    with pytest.raises(UserError, match=r"\(extra: <missing> vs 1\)"):
        manager.check_compatible(dict(CONFIG, extra=1))


def test_missing_rank_state(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, nn.Linear(2, 2), None, CONFIG)
    (path / "extra_rank0.pt").unlink()
    with pytest.raises(UserError, match="no state for rank 0"):
        manager.load(path, nn.Linear(2, 2))


# ---------------------------------------------------------------------------------- two ranks (FSDP2, gloo)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))


def forward_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """One optimizer step through the forward (FSDP2 parameters are only whole inside it)."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(x).pow(2).sum().backward()
    optimizer.step()


def two_rank_worker(rank: int, port: int, logdir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)  # a forked child: keep clear of the parent's intra-op thread pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = small_net()
    mesh = init_device_mesh("cpu", (2,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = adamw(model)
    forward_step(model, optimizer, seed=1)
    CheckpointManager(logdir).save(2, model, optimizer, CONFIG, {"rank": rank})
    dist.destroy_process_group()


def test_two_ranks_fsdp2_save_then_single_process_load(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")  # CPU only: no CUDA state to inherit
    workers = [context.Process(target=two_rank_worker, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        if w.is_alive():
            w.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    manager = CheckpointManager(tmp_path)
    path = manager.latest()
    assert path.name == "step_00000002"
    assert json.loads((path / "COMPLETE").read_text())["world_size"] == 2
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    # the sharded checkpoint loads into one unsharded process and equals the same step run there
    expected, expected_optimizer = small_net(), None
    expected_optimizer = adamw(expected)
    forward_step(expected, expected_optimizer, seed=1)
    model = small_net()
    optimizer = adamw(model)
    extra = manager.load(path, model, optimizer)
    assert extra == {"rank": 0}
    assert torch.load(path / "extra_rank1.pt", weights_only=True) == {"rank": 1}
    for a, b in zip(expected.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    forward_step(expected, expected_optimizer, seed=2)
    forward_step(model, optimizer, seed=2)
    for a, b in zip(expected.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
