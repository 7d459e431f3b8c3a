"""The small scripts of docs/benchmarks/ that made committed model files or benchmark figures:
merge_lora.py (a progressive distillation's warm start), stack_loras.py (a progressive student as
one `--lora` file), writer_speed.py (the H.264 writer's rate per content) and vae_decode.py's
kernel classes."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from core.checkpoint import merge_lora, read_lora_sampling, read_state_dict, save_generator
from core.train.lora import save_lora_file
from tests.conftest import random_lora, tiny_model

SCRIPTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def run_script(name: str, args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / name), *args])
    runpy.run_path(str(SCRIPTS / name), run_name="__main__")


def test_merge_then_stack_reproduce_a_progressive_student(tmp_path, monkeypatch):
    base = save_generator(tiny_model(seed=3), tmp_path / "base.safetensors")
    first, second = random_lora(3, seed=1), random_lora(2, seed=2)
    first_file = save_lora_file(first, tmp_path / "four.safetensors", step=9, metadata={"sampling_steps": 4})
    second_file = save_lora_file(second, tmp_path / "two.safetensors", step=7,
                                 metadata={"sampling_steps": 2, "timestep_shift": 2.0})

    run_script("merge_lora.py", [str(base), str(first_file), str(tmp_path / "merged.safetensors"),
                                 "--preset", "tiny"], monkeypatch)
    merged = read_state_dict(tmp_path / "merged.safetensors")
    expected = merge_lora(tiny_model(seed=3), first).state_dict()
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=0, msg=name)

    stacked_file = tmp_path / "stacked.safetensors"
    run_script("stack_loras.py", [str(stacked_file), str(first_file), str(second_file)], monkeypatch)
    # samples as the last student was distilled
    assert read_lora_sampling(stacked_file) == {"sampling_steps": 2, "timestep_shift": 2.0}
    at_once = merge_lora(tiny_model(seed=3), read_state_dict_lora(stacked_file)).state_dict()
    one_after_another = merge_lora(merge_lora(tiny_model(seed=3), first), second).state_dict()
    for name, value in one_after_another.items():
        torch.testing.assert_close(at_once[name], value, rtol=1e-5, atol=1e-6, msg=name)


def read_state_dict_lora(path: Path) -> dict[str, torch.Tensor]:
    from core.checkpoint import read_lora_state_dict

    lora = read_lora_state_dict(path)
    assert {v.shape[0] for k, v in lora.items() if ".lora_A." in k} == {5}  # ranks 3 + 2
    return lora


@pytest.mark.parametrize("preset", ["medium", "ultrafast"])
def test_writer_speed_script_times_noise_and_smooth_content(preset, monkeypatch, capsys):
    run_script("writer_speed.py", ["--height", "64", "--width", "64", "--chunks", "2", "--frames-per-chunk", "4",
                                   "--preset", preset, "--thread-type", "slice,frame"], monkeypatch)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["content"], r["thread_type"]) for r in rows] == [
        ("noise", "slice"), ("noise", "frame"), ("smooth", "slice"), ("smooth", "frame")]
    assert all(r["seconds_per_chunk"] > 0 and r["preset"] == preset for r in rows)
    assert rows[0]["bytes"] > rows[2]["bytes"]  # noise is what x264 cannot compress


def test_vae_decode_kernel_classes_sum_every_kernel_once():
    script = runpy.run_path(str(SCRIPTS / "vae_decode.py"))
    kernels = [
        {"name": "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32", "ms": 300.0, "calls": 296},
        {"name": "triton_poi_fused_convolution_7", "ms": 58.8, "calls": 240},
        {"name": "triton_poi_fused_clone_slice_6", "ms": 22.9, "calls": 208},
        {"name": "triton_red_fused_clamp_min_convolution_div_expand_linalg_vector_norm_mul_silu_8", "ms": 8.6,
         "calls": 168},
        {"name": "void cudnn::engines_precompiled::nchwToNhwcKernel<bf16>", "ms": 10.2, "calls": 112},
        {"name": "triton_poi_fused_add_convolution_12", "ms": 3.4, "calls": 32},
        {"name": "Memset (Device)", "ms": 0.5, "calls": 4},
    ]
    classes = script["kernel_classes"](kernels)
    assert classes["cudnn convolution"] == {"ms": 300.0, "calls": 296}
    assert classes["inductor bias / layout pass around a conv"]["calls"] == 240
    assert classes["inductor causal-cache / slice copy"]["calls"] == 208
    assert classes["inductor norm + SiLU (+ cache concat)"]["calls"] == 168  # not a conv pass: it normalises
    assert classes["cudnn layout transpose"]["calls"] == 112
    assert classes["inductor residual add"]["calls"] == 32
    assert classes["other"]["calls"] == 4
    assert sum(c["calls"] for c in classes.values()) == sum(k["calls"] for k in kernels)
    assert list(classes) == sorted(classes, key=lambda name: -classes[name]["ms"])
