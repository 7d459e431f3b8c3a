"""Checks that need no model run first (issue 14, items 2 and 3): every bad checkpoint, LoRA or
option is one line, exit 2, before any model is built; a pickle that would run code is refused
with the names it would call, without torch's advice to load unsafely, without warnings, and no
code runs."""

from __future__ import annotations

import json
import pickle
import re
import struct
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import longlive_cli.build
from core.checkpoint import save_generator, to_official_keys
from core.config import ModelConfig
from longlive_cli.app import main
from longlive_cli.build import meta_dit
from tests.conftest import tiny_model

SMALL = ["--preset", "tiny", "--height", "64", "--width", "64", "--frames", "8"]
CORRUPT = "the file is truncated or corrupt: download or save it again"
CODE = "we refuse to unpickle code: convert it to .safetensors (or a plain tensor dict) on a trusted machine"


class _RunsCode:
    """Unpickling this creates the marker file: the test that no code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def never_build(monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("a model was built before the checks")

    monkeypatch.setattr(longlive_cli.build, "build_models", built)
    monkeypatch.setattr(longlive_cli.build, "build_dit", built)


def _official(path: Path, **edits) -> Path:
    state = tiny_model(3).state_dict()
    state.update(edits)
    torch.save({"generator": to_official_keys(state)}, path)
    return path


def _lora(path: Path, drop_b: bool = False, in_features: int = 128) -> Path:
    lora = {"base_model.model.blocks.0.ffn.0.lora_A.weight": torch.ones(4, in_features),
            "base_model.model.blocks.0.ffn.0.lora_B.weight": torch.ones(256, 4)}
    if drop_b:
        del lora["base_model.model.blocks.0.ffn.0.lora_B.weight"]
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(lora, path)
    else:
        torch.save({"generator_lora": lora, "step": 1}, path)
    return path


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# (file maker, option, expected line as a regex; {p} is the file)
CASES = {
    "garbage": (lambda d: (d / "g.pt").write_bytes(b"not a checkpoint\n" * 8) and d / "g.pt", "--checkpoint",
                rf"cannot read {{p}} \(not a torch.save or safetensors file\): {re.escape(CORRUPT)}"),
    "truncated-zip": (lambda d: _truncated(_official(d / "t.pt")), "--checkpoint",
                      rf"cannot read {{p}} \(.+\): {re.escape(CORRUPT)}"),
    "truncated-safetensors": (lambda d: _truncated(save_generator(tiny_model(), d / "t.safetensors")),
                              "--checkpoint", rf"cannot read {{p}} \(.+\): {re.escape(CORRUPT)}"),
    "wrong-shape": (lambda d: _official(d / "w.pt", **{"blocks.0.ffn.0.weight": torch.zeros(256, 127)}),
                    "--checkpoint", r"checkpoint {p} does not match the model: 1 with the wrong shape \(blocks\.0"
                                    r"\.ffn\.0\.weight \(256, 127\) != \(256, 128\)\): check --preset / the file"),
    "zip-code": (lambda d: torch.save({"generator": {}, "hook": _RunsCode(d / "ran")}, d / "c.pt") or d / "c.pt",
                 "--checkpoint", rf"{{p}} holds Python objects other than tensors \(getattr\); {re.escape(CODE)}"),
    "lora-shape": (lambda d: _lora(d / "l.pt", in_features=127), "--lora",
                   r"LoRA {p} has the wrong shapes for blocks\.0\.ffn\.0 \(A \(4, 127\), B \(256, 4\); the layer is "
                   r"128 -> 256\): check --preset"),
    "lora-incomplete": (lambda d: _lora(d / "l.safetensors", drop_b=True), "--lora",
                        r"LoRA {p} lacks lora_A or lora_B for 1 layer \(blocks\.0\.ffn\.0\): the file is incomplete"),
    "lora-safetensors-shape": (lambda d: _lora(d / "l.safetensors", in_features=127), "--lora",
                               r"LoRA {p} has the wrong shapes for blocks\.0\.ffn\.0 .*"),
}


@pytest.mark.parametrize("command", ["generate", "bench"])
@pytest.mark.parametrize("kind", list(CASES))
def test_bad_checkpoint_or_lora_fails_before_any_model(tmp_path, capsys, never_build, command, kind):
    make, flag, expected = CASES[kind]
    path = make(tmp_path)
    # the LoRAs are made for the random tiny model: tiny must not mean the shipped shapes models here
    args = {"generate": ["generate", "x", *SMALL, "--random-weights", "-o", str(tmp_path / "v.mp4")],
            "bench": ["bench", "--preset", "tiny", "--device", "cpu"]}[command]
    assert main([*args, flag, str(path)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"error: {expected.format(p=re.escape(str(path)))}\n", err), err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("args,line", [
    (["generate", "x", *SMALL, "--crf", "99"], "--crf 99: x264 quality must be between 0 (lossless) and 51"),
    (["generate", "x", *SMALL[:-1], "12"], "--frames 12: the video is made of blocks of 8 latent frames; use a "
                                           "multiple of 8, e.g. 16"),
    (["generate", "x", *SMALL, "--seconds", "nan", "--frames", "8"], "give --seconds or --frames, not both"),
    (["generate", "x", *SMALL[:-2], "--seconds", "inf"], "--seconds inf: give a positive length, e.g. --seconds 10"),
    (["bench", "--preset", "tiny", "--device", "cpu", "--frames", "16"],
     "frames must exceed the 32 frames that fill the window, to reach steady state (got 16)"),
    (["generate", "x", *SMALL, "--steps", "4", "--set", "stream.sampling_steps=32"],
     "--set stream.sampling_steps=32 disagrees with the option that sets it to 4 (e.g. --steps, --seconds, "
     "--device): give one of them"),
    (["bench", "--preset", "tiny", "--device", "cpu", "--steps", "2", "--set", "stream.sampling_steps=4"],
     "--set stream.sampling_steps=4 disagrees with the option that sets it to 2 (e.g. --steps, --seconds, "
     "--device): give one of them"),
])
def test_bad_options_fail_before_any_model(capsys, never_build, args, line):
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {line}\n"


def test_a_flag_and_a_set_that_agree_are_fine(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["generate", "x", *SMALL, "--steps", "2", "--set", "stream.sampling_steps=2", "-o", str(out)]) == 0
    assert out.is_file()


def _sparse_5b_safetensors(path: Path, wrong: str) -> Path:
    """A 10 GB safetensors file of the 5B's names and shapes (one shape wrong) that takes almost no
    disk: the header is real, the data a hole."""
    header, offset = {}, 0
    for name, tensor in meta_dit(ModelConfig.preset("wan2.2-ti2v-5b")).state_dict().items():
        shape = list(tensor.shape)
        if name == wrong:
            shape[-1] -= 1
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return path


def test_a_wrong_5b_file_fails_in_a_second_without_reading_weights(tmp_path, capsys, monkeypatch, never_build):
    path = _sparse_5b_safetensors(tmp_path / "model.safetensors", "blocks.29.ffn.2.weight")
    assert path.stat().st_size > 9e9

    def read_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(safetensors.torch, "load_file", read_weights)
    started = time.perf_counter()
    code = main(["convert-nvfp4", str(path), str(tmp_path / "q.safetensors"), "--device", "cpu"])
    seconds = time.perf_counter() - started
    assert code == 2 and seconds < 2, seconds
    assert capsys.readouterr().err == (
        f"error: checkpoint {path} does not match the model: 1 with the wrong shape (blocks.29.ffn.2.weight "
        f"(3072, 14335) != (3072, 14336)): check --preset / the file\n")


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_plain_pickle_holding_code_is_the_same_one_line(tmp_path, capsys, never_build, protocol):
    """`pickle.dump`, not torch.save: torch would call it corrupt and advise weights_only=False
    (with a protocol warning); here it is named, refused, and nothing runs."""
    path, marker = tmp_path / "plain.pt", tmp_path / "ran"
    with path.open("wb") as f:
        pickle.dump({"generator": {"model.x": torch.zeros(1)}, "hook": _RunsCode(marker)}, f, protocol=protocol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", "x", *SMALL, "-o", str(tmp_path / "v.mp4"), "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    names = {2: "__builtin__.getattr, pathlib.Path, pathlib.PosixPath, ...",
             4: "pathlib.Path.touch, pathlib.PosixPath, torch.storage._load_from_bytes"}[protocol]
    assert err == f"error: {path} holds Python objects other than tensors ({names}); {CODE}\n"
    assert "weights_only" not in err and [str(w.message) for w in caught] == []
    assert not marker.exists()


def test_a_plain_pickle_of_data_is_not_called_corrupt(tmp_path, capsys):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"step": 3, "names": ["a", "b"]}, protocol=4))
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--checkpoint", str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path} is a plain Python pickle, not a torch.save checkpoint: "
                                       f"save the weights with torch.save or as .safetensors\n")
