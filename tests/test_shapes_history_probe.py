"""docs/benchmarks/shapes_history_probe.py: the history-sensitivity measure reads 1 for a model that
carries its history on, 0 for one that ignores it; the script runs on a shapes-preset file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "shapes_history_probe.py"
spec = importlib.util.spec_from_file_location("shapes_history_probe", SCRIPT)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


@pytest.mark.parametrize("predict, expected", [
    (lambda history: history.clone(), 1.0),  # continues its history exactly
    (lambda history: torch.zeros_like(history), 0.0),  # ignores it
    (lambda history: 0.5 * history, 0.25),
])
def test_history_sensitivity(predict, expected):
    g = torch.Generator().manual_seed(0)
    truth, moved = torch.randn(1, 4, 6, 2, 2, generator=g), torch.randn(1, 4, 6, 2, 2, generator=g)
    result = probe.history_response(predict, truth, moved, slice(2, 4))
    assert result["history_sensitivity"] == pytest.approx(expected, rel=1e-6)
    if expected == 1.0:
        assert result["mse_true_history"] == 0 and result["mse_moved_history"] > 0


def test_script_runs_on_a_shapes_preset_file(tmp_path, capsys, one_thread):
    from safetensors.torch import save_file

    from core.config import ModelConfig
    from core.dit import CausalWanDiT, random_init_

    model = CausalWanDiT(ModelConfig.preset("shapes"))
    random_init_(model, seed=1)
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    # its main() here (the module above), with the shipped VAE the script defaults to (relative to the root)
    vae = SCRIPT.parents[2] / "core" / "assets" / "shapes" / "vae.safetensors"
    assert probe.main([str(path), "--sigmas", "0.9", "--vae", str(vae)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["sigma"] == 0.9 and row["history_sensitivity"] >= 0 and row["mse_true_history"] > 0
