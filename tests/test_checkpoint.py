"""Checkpoint formats, strict loading, LoRA merging and atomic saving (core/checkpoint.py).

Every file is written here in the official layouts (reference-model.md §7) from a tiny model
with random weights; loading builds a fresh model on `meta` and must give the source back bit
for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from core import checkpoint as ckpt
from core.config import ModelConfig
from core.dit import CausalWanDiT, count_parameters
from core.errors import UserError
from tests.conftest import text_context, tiny_model

TINY = ModelConfig.preset("tiny")


def meta_model(config: ModelConfig = TINY) -> CausalWanDiT:
    with torch.device("meta"):
        return CausalWanDiT(config)


def official(model: nn.Module, wrap: str = "") -> dict[str, torch.Tensor]:
    """The official wrapper names, optionally with an FSDP/compile token after `model.`."""
    return {f"model.{wrap}{k}": v.clone() for k, v in model.state_dict().items()}


def forward(model: CausalWanDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 48, 4, 8, 8, generator=g)
    t = torch.tensor([[900.0, 900.0, 400.0, 400.0]])
    with torch.no_grad():
        return model(x, t, text_context(1, seed=3), frames_per_block=2)


def assert_same_model(loaded: nn.Module, source: nn.Module) -> None:
    expected = source.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    assert torch.equal(forward(loaded), forward(source))


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# Names.


def test_normalize_round_trip():
    bare = tiny_model().state_dict()
    official_sd = ckpt.to_official_keys(bare)
    assert all(k.startswith("model.") for k in official_sd)
    assert list(ckpt.normalize_keys(official_sd)) == list(bare)
    assert ckpt.to_official_keys(ckpt.normalize_keys(official_sd)) == official_sd
    assert ckpt.normalize_keys(bare) == bare


@pytest.mark.parametrize("key", [
    "model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ffn.0.weight",
    "_orig_mod.model.blocks.0.ffn.0.weight",
    "module.model._orig_mod.blocks.0._fsdp_wrapped_module.ffn.0.weight",
    "model.blocks.0.ffn.0.weight",
    "blocks.0.ffn.0.weight",
])
def test_normalize_strips_wrapper_tokens(key):
    weight = torch.ones(2)
    normalized = ckpt.normalize_keys({key: weight, "step": 3, "note": "text"})
    assert list(normalized) == ["blocks.0.ffn.0.weight"]
    assert normalized["blocks.0.ffn.0.weight"] is weight


def test_normalize_rejects_colliding_names():
    with pytest.raises(UserError, match="blocks.0.ffn.0.weight"):
        ckpt.normalize_keys({"model.blocks.0.ffn.0.weight": torch.ones(1),
                             "blocks.0.ffn.0.weight": torch.ones(1)})


# ----------------------------------------------------------------------------------------------
# Outer layouts.


def write_layout(layout: str, source: CausalWanDiT, other: CausalWanDiT, folder: Path) -> Path:
    """`source`'s weights in one official layout (`other` is a decoy that must not load)."""
    path = folder / "ckpt.pt"
    if layout == "generator":
        torch.save({"generator": official(source), "generator_optimizer": {"lr": 1e-5},
                    "step": 600}, path)
    elif layout == "generator_ema-used":  # EMA keys keep the FSDP wrapper tokens
        torch.save({"generator": official(other),
                    "generator_ema": official(source, "_fsdp_wrapped_module."), "step": 9}, path)
    elif layout == "generator_ema-ignored":
        torch.save({"generator": official(source), "generator_ema": official(other)}, path)
    elif layout == "model":
        torch.save({"model": official(source)}, path)
    elif layout == "bare-official":
        torch.save(official(source), path)
    elif layout == "bare-names":
        torch.save(source.state_dict(), path)
    elif layout == "legacy-pickle":
        torch.save({"generator": official(source)}, path, _use_new_zipfile_serialization=False)
    elif layout == "merged-bf16":  # scripts/merge_lora_generator.py layout
        torch.save({"generator": official(source), "checkpoint_format":
                    "longlive_generator_merged_lora", "source_generator_ckpt": "ar/model.pt",
                    "source_lora_ckpt": "lora.pt", "model_name": "Wan2.2-TI2V-5B",
                    "dtype": "bfloat16", "merged_lora": True}, path)
    elif layout == "safetensors":
        path = folder / "ckpt.safetensors"
        safetensors.torch.save_file(source.state_dict(), path, {"dtype": "float32"})
    elif layout == "safetensors-official":
        path = folder / "ckpt.safetensors"
        safetensors.torch.save_file(official(source), path)
    elif layout == "safetensors-shards":
        path = folder / "shards"
        path.mkdir()
        items = list(source.state_dict().items())
        for i, part in enumerate((items[:20], items[20:])):
            safetensors.torch.save_file(dict(part), path / f"model-{i:05d}-of-00002.safetensors")
    else:
        raise AssertionError(layout)
    return path


LAYOUTS = [
    ("generator", False), ("generator_ema-used", True), ("generator_ema-ignored", False),
    ("model", False), ("bare-official", False), ("bare-names", False), ("legacy-pickle", False),
    ("merged-bf16", False), ("safetensors", False), ("safetensors-official", False),
    ("safetensors-shards", False),
]


@pytest.mark.parametrize("layout,use_ema", LAYOUTS)
def test_layouts_load_bit_exact(tmp_path, layout, use_ema):
    dtype = torch.bfloat16 if layout == "merged-bf16" else torch.float32
    source, other = tiny_model(seed=1, dtype=dtype), tiny_model(seed=2, dtype=dtype)
    path = write_layout(layout, source, other, tmp_path)
    loaded = ckpt.load_generator(meta_model(), path, use_ema=use_ema)
    assert_same_model(loaded.eval(), source)


def test_use_ema_without_ema_falls_back_to_generator(tmp_path):
    source = tiny_model(seed=1)
    path = write_layout("generator", source, source, tmp_path)
    assert_same_model(ckpt.load_generator(meta_model(), path, use_ema=True).eval(), source)


def test_ema_only_file_needs_use_ema(tmp_path):
    path = tmp_path / "ema.pt"
    torch.save({"generator_ema": official(tiny_model())}, path)
    with pytest.raises(UserError, match="use-ema"):
        ckpt.read_state_dict(path)


def test_load_into_materialised_model_keeps_its_dtype(tmp_path):
    source = tiny_model(seed=1)
    path = write_layout("generator", source, source, tmp_path)
    target = tiny_model(seed=5, dtype=torch.float64)
    ckpt.load_generator(target, path)
    assert all(p.dtype == torch.float64 for p in target.parameters())
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor.double()), name


def build(checkpoint=None, lora=None, dtype=torch.float32, seed=0) -> CausalWanDiT:
    """The builder of every command (longlive_cli/build.py), checks included."""
    from longlive_cli.build import DiTSpec, build_dit, check_dit_spec

    spec = DiTSpec(TINY, torch.device("cpu"), dtype, checkpoint=checkpoint, lora=lora, seed=seed)
    check_dit_spec(spec)
    return build_dit(spec).model


def test_build_from_checkpoint(tmp_path):
    source = tiny_model(seed=1)
    path = write_layout("generator", source, source, tmp_path)
    model = build(path)
    assert not model.training
    assert_same_model(model, source)
    half = build(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_build_random_is_seeded():
    a, b = build(seed=3), build(seed=3)
    assert_same_model(a, b)
    assert_same_model(a, tiny_model(seed=3))
    assert not torch.equal(a.head.head.weight, build(seed=4).head.head.weight)


# ----------------------------------------------------------------------------------------------
# Bad files.


def edited(edit: str) -> dict[str, torch.Tensor]:
    sd = official(tiny_model())
    if edit == "missing":
        del sd["model.blocks.1.ffn.0.weight"]
    elif edit == "unexpected":
        sd["model.blocks.0.extra.weight"] = torch.zeros(3)
    elif edit == "wrong-shape":
        sd["model.blocks.1.cross_attn.k.weight"] = torch.zeros(128, 64)
    return sd


@pytest.mark.parametrize("edit,name,count", [
    ("missing", "blocks.1.ffn.0.weight", "1 missing"),
    ("unexpected", "blocks.0.extra.weight", "1 unexpected"),
    ("wrong-shape", "blocks.1.cross_attn.k.weight", "1 with the wrong shape"),
])
def test_mismatch_names_the_key(tmp_path, edit, name, count):
    path = tmp_path / "bad.pt"
    torch.save({"generator": edited(edit)}, path)
    with pytest.raises(UserError) as excinfo:
        ckpt.load_generator(meta_model(), path)
    message = one_line_error(excinfo)
    assert name in message and count in message and str(path) in message


def test_wrong_preset_is_a_user_error(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save({"generator": official(tiny_model())}, path)
    with pytest.raises(UserError, match="check --preset"):
        ckpt.load_generator(meta_model(ModelConfig.preset("wan2.2-ti2v-5b")), path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0])
def test_truncated_file(tmp_path, suffix, keep):
    path = tmp_path / f"model{suffix}"
    ckpt.save_generator(tiny_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(UserError) as excinfo:
        ckpt.read_state_dict(path)
    assert "truncated or corrupt" in one_line_error(excinfo)


@pytest.mark.parametrize("content", [b"not a checkpoint\n" * 20, b"\x80\x02" + b"\xff" * 64])
def test_garbage_pickle(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="truncated or corrupt"):
        ckpt.read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ckpt.read_state_dict(tmp_path / "nope.pt")


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class NotATensor:
    """An arbitrary user class: weights_only loading must refuse it."""


@pytest.mark.parametrize("payload", ["code", "object"])
def test_pickled_code_is_refused(tmp_path, payload):
    marker = tmp_path / "marker"
    sd = official(tiny_model())
    sd["model.blocks.0.ffn.0.weight"] = RunsCode(marker) if payload == "code" else NotATensor()
    path = tmp_path / "evil.pt"
    torch.save({"generator": sd}, path)
    with pytest.raises(UserError) as excinfo:
        ckpt.load_generator(meta_model(), path)
    message = one_line_error(excinfo)
    assert "refuse to unpickle" in message and "safetensors" in message
    assert not marker.exists()


def test_lora_only_file_as_generator(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": lora_tensors(tiny_model(), 4)[0], "step": 5}, path)
    with pytest.raises(UserError, match="LoRA-only"):
        build(path)


def test_non_dict_file(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(UserError, match="dict of tensors"):
        ckpt.read_state_dict(path)


# ----------------------------------------------------------------------------------------------
# LoRA.


def lora_tensors(model: CausalWanDiT, rank: int, seed: int = 0, prefix: str = "base_model.model."
                 ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Random nonzero A [r, in] and B [out, r] for every block linear."""
    g = torch.Generator().manual_seed(seed)
    lora, pairs = {}, {}
    for target in ckpt.block_linear_names(len(model.blocks)):
        linear = model.get_submodule(target)
        a = 0.1 * torch.randn(rank, linear.in_features, generator=g)
        b = 0.1 * torch.randn(linear.out_features, rank, generator=g)
        lora[f"{prefix}{target}.lora_A.weight"] = a
        lora[f"{prefix}{target}.lora_B.weight"] = b
        pairs[target] = (a, b)
    return lora, pairs


@pytest.mark.parametrize("alpha", [None, 4.0, 8.0])
@pytest.mark.parametrize("file_layout", ["official", "bare-peft", "no-prefix"])
def test_lora_merge(tmp_path, alpha, file_layout):
    rank = 4
    base = tiny_model(seed=1)
    base_path = write_layout("generator", base, base, tmp_path)
    lora, pairs = lora_tensors(base, rank, prefix="" if file_layout == "no-prefix" else
                               "base_model.model.")
    lora_path = tmp_path / "lora.pt"
    if file_layout == "official":
        critic = {k: torch.zeros_like(v) for k, v in lora.items()}  # the fake score's
        torch.save({"generator_lora": lora, "critic_lora": critic, "step": 5000}, lora_path)
    else:
        torch.save(lora, lora_path)

    merged = ckpt.merge_lora(build(base_path), ckpt.read_lora_state_dict(lora_path), alpha=alpha,
                             source=str(lora_path))
    scale = (alpha or rank) / rank

    assert type(merged) is CausalWanDiT
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    assert list(merged.state_dict()) == list(base.state_dict())
    adapted = {f"{target}.weight" for target in pairs}
    for name, tensor in base.state_dict().items():
        if name in adapted:
            continue
        assert torch.equal(merged.state_dict()[name], tensor), name
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    for target, (a, b) in pairs.items():
        w0 = base.get_submodule(target).weight
        expected = w0 + (b @ a) * scale
        torch.testing.assert_close(merged.get_submodule(target).weight, expected,
                                   atol=1e-6, rtol=0)
        assert not torch.equal(merged.get_submodule(target).weight, w0)
        xi = x[:, :w0.shape[1]]
        with torch.no_grad():
            change = merged.get_submodule(target)(xi) - base.get_submodule(target)(xi)
        torch.testing.assert_close(change, scale * ((xi @ a.T) @ b.T), atol=1e-5, rtol=0)


def test_merge_lora_in_bf16_rounds_once():
    rank = 4
    base = tiny_model(seed=1, dtype=torch.bfloat16)
    lora, pairs = lora_tensors(base, rank)
    merged = ckpt.merge_lora(tiny_model(seed=1, dtype=torch.bfloat16), lora)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert all(p.requires_grad for p in merged.parameters())  # PEFT's freezing is undone
    for target, (a, b) in pairs.items():
        expected = (base.get_submodule(target).weight.float() + b @ a).to(torch.bfloat16)
        assert torch.equal(merged.get_submodule(target).weight, expected), target


def peft_merge(model: CausalWanDiT, lora: dict[str, torch.Tensor], alpha: float) -> CausalWanDiT:
    """The official route: PEFT wraps the model in fp32, loads the adapters, merges safely."""
    import peft

    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    rank = next(v for k, v in lora.items() if ".lora_A." in k).shape[0]
    targets = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in lora})
    wrapped = peft.get_peft_model(model.float(), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    peft.set_peft_model_state_dict(wrapped, lora)
    merged = wrapped.merge_and_unload(safe_merge=True)
    for name, param in merged.named_parameters():
        param.data = param.data.to(dtypes[name])
    return merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [None, 6.0])
def test_merge_equals_peft_bit_for_bit(dtype, alpha):
    rank = 4
    lora, _ = lora_tensors(tiny_model(seed=2), rank, seed=7)
    ours = ckpt.merge_lora(tiny_model(seed=2, dtype=dtype), lora, alpha=alpha).state_dict()
    theirs = peft_merge(tiny_model(seed=2, dtype=dtype), lora, alpha or rank).state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    base = tiny_model(seed=2, dtype=dtype).state_dict()
    assert not torch.equal(ours["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.weight"])


def test_a_lora_that_breaks_the_weights_is_one_line():
    lora, _ = lora_tensors(tiny_model(), 4)
    key = next(k for k in lora if ".lora_B." in k)
    lora[key] = torch.full_like(lora[key], float("inf"))
    with pytest.raises(UserError, match="non-finite weights") as excinfo:
        ckpt.merge_lora(tiny_model(), lora, source="x.safetensors")
    assert "\n" not in str(excinfo.value) and "x.safetensors" in str(excinfo.value)


def bad_lora(kind: str) -> dict[str, torch.Tensor]:
    lora, _ = lora_tensors(tiny_model(), 4)
    if kind == "mixed-ranks":
        lora["base_model.model.blocks.1.ffn.2.lora_A.weight"] = torch.randn(8, 256)
        lora["base_model.model.blocks.1.ffn.2.lora_B.weight"] = torch.randn(128, 8)
    elif kind == "unknown-target":
        lora["base_model.model.head.head.lora_A.weight"] = torch.randn(4, 128)
        lora["base_model.model.head.head.lora_B.weight"] = torch.randn(192, 4)
    elif kind == "missing-B":
        del lora["base_model.model.blocks.0.self_attn.k.lora_B.weight"]
    elif kind == "wrong-shape":
        lora["base_model.model.blocks.0.ffn.0.lora_A.weight"] = torch.randn(4, 64)
    elif kind == "not-lora":
        lora["base_model.model.blocks.0.ffn.0.lora_B.bias"] = torch.randn(256)
    return lora


@pytest.mark.parametrize("kind,pattern", [
    ("mixed-ranks", "ranks"), ("unknown-target", "head.head"), ("missing-B", "self_attn.k"),
    ("wrong-shape", "blocks.0.ffn.0"), ("not-lora", "unknown key"),
])
def test_bad_lora(tmp_path, kind, pattern):
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": bad_lora(kind), "step": 1}, path)
    with pytest.raises(UserError, match=pattern) as excinfo:
        build(lora=path)
    assert str(path) in one_line_error(excinfo)


def test_generator_file_as_lora(tmp_path):
    path = write_layout("generator", tiny_model(), tiny_model(), tmp_path)
    with pytest.raises(UserError, match="not a LoRA"):
        ckpt.read_lora_state_dict(path)


def test_block_linears_of_the_5b():
    model = meta_model(ModelConfig.preset("wan2.2-ti2v-5b"))
    names = ckpt.block_linear_names(30)
    assert len(names) == len(set(names)) == 300
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    in_blocks = {f"blocks.{n}" for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}
    assert in_blocks == set(names)
    assert len(model.state_dict()) == 825 and count_parameters(model) == 4_999_787_712


# ----------------------------------------------------------------------------------------------
# Saving.


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_round_trip(tmp_path, suffix):
    source = tiny_model(seed=6)
    path = ckpt.save_generator(source, tmp_path / "sub" / f"out{suffix}",
                               metadata={"checkpoint_format": "longlive_generator",
                                         "merged_lora": True})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's 0o600
    assert_same_model(ckpt.load_generator(meta_model(), path).eval(), source)
    if suffix == ".pt":  # the official layout: generator with model.-prefixed keys + metadata
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"generator", "checkpoint_format", "merged_lora"}
        assert raw["merged_lora"] is True
        assert list(raw["generator"]) == list(official(source))
    else:
        with safetensors.safe_open(path, "pt") as f:
            assert f.metadata() == {"checkpoint_format": "longlive_generator",
                                    "merged_lora": "true"}
            assert set(f.keys()) == set(source.state_dict())


@pytest.mark.parametrize("suffix,writer", [(".safetensors", "safetensors.torch.save_file"),
                                           (".pt", "torch.save")])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing(tmp_path, monkeypatch, suffix, writer, existing):
    path = tmp_path / f"out{suffix}"
    if existing:
        path.write_bytes(b"previous")

    def broken_writer(obj, target, *args, **kwargs):
        if hasattr(target, "write"):  # torch.save is given an open file
            target.write(b"partial")
        else:
            Path(target).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(writer, broken_writer)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_generator(tiny_model(), path)
    expected = [path.name] if existing else []
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    if existing:
        assert path.read_bytes() == b"previous"
