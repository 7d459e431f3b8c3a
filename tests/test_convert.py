"""`longlive convert-nvfp4` and quant/convert.py: bf16 files (official .pt layout, safetensors,
with a LoRA) and official model_4o6.pt exports to the packed format, round trips, the size
ratio, and one-line errors (exit 2)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from core.checkpoint import merge_lora, save_generator, to_official_keys
from core.config import ModelConfig
from core.dit import CausalWanDiT
from core.errors import UserError
from longlive_cli.app import main
from longlive_cli.convert import convert
from quant.linear import NVFP4Config, nvfp4_layers, quantize_model
from quant.nvfp4 import quantize, to_blocked
from quant.nvfp4_linear import NVFP4Linear
from quant.packed import load_packed
from tests.conftest import text_context, tiny_model

TINY = ModelConfig.preset("tiny")
# Wide enough that the packed block linears dominate the file as in the 5B (whose file ratio is
# ~0.29): in the 2-layer tiny preset the bf16 embeddings, time projection and head are half of it.
WIDE = ModelConfig(dim=64, ffn_dim=8192, num_heads=2, num_layers=4, in_channels=4, out_channels=4,
                   text_dim=16, freq_dim=16)


def forward(model, config: ModelConfig = TINY) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, config.in_channels, 2, 4, 4, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([[700.0, 700.0]]), text_context(1, seed=2, text_dim=config.text_dim),
                     frames_per_block=2).float()


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def packed_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(as_bits(sa[k]), as_bits(sb[k])) for k in sa)


def reference_quantized(model, rule="mse"):
    return quantize_model(model.to(torch.bfloat16), NVFP4Config(weight_rule=rule, activation_rule=rule))


def load_quantized(path, config: ModelConfig, mode="w4a16", dtype=torch.bfloat16) -> CausalWanDiT:
    with torch.device("meta"):
        model = CausalWanDiT(config)
    return load_packed(path, model, mode).to(dtype=dtype).eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# bf16 sources.


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_round_trip(tmp_path, suffix):
    source = save_generator(tiny_model(seed=4, dtype=torch.bfloat16), tmp_path / f"gen{suffix}")
    report = convert(source, tmp_path / "q.safetensors", "tiny", rule="mse")
    loaded = load_quantized(report.output, TINY, dtype=torch.bfloat16)
    expected = reference_quantized(tiny_model(seed=4))
    assert packed_equal(loaded, expected)
    assert torch.equal(forward(loaded), forward(expected))
    assert [layer.name for layer in report.layers] == list(nvfp4_layers(expected))
    assert all(20 < layer.sqnr_db < 23 for layer in report.layers)  # measured 21.1-21.3 dB
    assert report.nvfp4_bytes * 16 == report.bf16_bytes * 9 // 2 + 4 * 16 * 20
    metadata = safetensors.safe_open(str(report.output), "pt").metadata()
    assert metadata["format"] == "longlive-nvfp4" and metadata["rule"] == "mse" and metadata["mode"] == "w4a16"
    assert metadata["preset"] == "tiny" and metadata["source"] == source.name
    assert metadata["source_sha256"] == sha256(source) and "lora" not in metadata


def test_packed_file_is_under_0_3_of_the_bf16_file(tmp_path):
    model = tiny_model(seed=1, dtype=torch.bfloat16, **WIDE.__dict__)
    source = save_generator(model, tmp_path / "wide.pt")
    report = convert(source, tmp_path / "wide.safetensors", WIDE)
    assert report.output_bytes == (tmp_path / "wide.safetensors").stat().st_size
    assert report.file_ratio <= 0.30, report.file_ratio  # measured 0.2945
    loaded = load_quantized(report.output, WIDE)
    out = forward(loaded, WIDE)
    reference = forward(model.float(), WIDE)
    assert 10 * torch.log10(reference.square().sum() / (reference - out).square().sum()) > 21  # measured 22.5


def test_convert_merges_the_lora_first(tmp_path):
    base = tiny_model(seed=2, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    lora = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.0"):
        linear = base.get_submodule(name)
        lora[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, linear.in_features, generator=g) * 0.1
        lora[f"base_model.model.{name}.lora_B.weight"] = torch.randn(linear.out_features, 4, generator=g) * 0.1
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    source = save_generator(base, tmp_path / "gen.pt")
    report = convert(source, tmp_path / "q.safetensors", "tiny", lora=tmp_path / "lora.pt")
    merged = merge_lora(tiny_model(seed=2, dtype=torch.bfloat16).float(), lora)
    loaded = load_quantized(report.output, TINY)
    assert packed_equal(loaded, reference_quantized(merged))
    assert not packed_equal(loaded, reference_quantized(tiny_model(seed=2)))
    metadata = safetensors.safe_open(str(report.output), "pt").metadata()
    assert metadata["lora"] == "lora.pt" and metadata["lora_sha256"] == sha256(tmp_path / "lora.pt")


def test_ema_weights_and_storage_mode(tmp_path):
    ema = tiny_model(seed=6, dtype=torch.bfloat16)
    torch.save({"generator": to_official_keys(tiny_model(seed=5, dtype=torch.bfloat16).state_dict()),
                "generator_ema": to_official_keys(ema.state_dict())}, tmp_path / "train.pt")
    report = convert(tmp_path / "train.pt", tmp_path / "q.safetensors", "tiny", mode="w4a4",
                                use_ema=True, rule="static_6")
    loaded = load_quantized(report.output, TINY, mode="w4a4")
    expected = quantize_model(ema, NVFP4Config(mode="w4a4", weight_rule="static_6", activation_rule="static_6"))
    assert packed_equal(loaded, expected)
    metadata = safetensors.safe_open(str(report.output), "pt").metadata()
    assert metadata["mode"] == "w4a4" and metadata["rule"] == "static_6" and metadata["use_ema"] == "true"


# ----------------------------------------------------------------------------------------------
# Official model_4o6.pt exports.


def official_export(model, rule: str, with_metadata: bool = True, values_padded_to=None) -> dict:
    """The layout of scripts/save_merged_nvfp4_generator.py, written from our reference quantizer:
    packed block linears with blocked (swizzled) scales, master weights dropped."""
    state = {}
    packed_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                    and n.startswith("blocks.")}
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in packed_names and leaf == "weight":
            q = quantize(tensor, rule)
            rows, cols = tensor.shape
            prows, pcols = -(-rows // 128) * 128, -(-cols // 64) * 64
            state[f"{module}.quantized_weight_values"] = q.codes
            state[f"{module}.quantized_weight_scale_factors"] = to_blocked(q.scales)
            state[f"{module}.quantized_weight_amax"] = q.amax.reshape(1)
            state[f"{module}.quantized_weight_metadata"] = torch.tensor([rows, cols, prows, pcols], dtype=torch.int32)
        else:
            state[name] = tensor
    payload = {"generator": to_official_keys(state)}
    if with_metadata:
        payload.update(checkpoint_format="longlive_generator_nvfp4", checkpoint_version=1,
                       quantization={"format": "nvfp4", "scale_rule": rule, "weight_scale_rule": None,
                                     "activation_scale_rule": None, "materialized": True})
    return payload


@pytest.mark.parametrize("rule", ["mse", "static_6"])
def test_import_official_export(tmp_path, rule):
    model = tiny_model(seed=7, dtype=torch.bfloat16)
    torch.save(official_export(model, rule), tmp_path / "model_4o6.pt")
    report = convert(tmp_path / "model_4o6.pt", tmp_path / "q.safetensors", "tiny")
    assert report.imported and report.rule == rule and len(report.layers) == 20
    assert all(layer.sqnr_db is None for layer in report.layers)
    loaded = load_quantized(report.output, TINY)
    expected = reference_quantized(tiny_model(seed=7), rule)
    assert packed_equal(loaded, expected)
    assert torch.equal(forward(loaded), forward(expected))
    metadata = safetensors.safe_open(str(report.output), "pt").metadata()
    assert metadata["rule"] == rule and metadata["imported_from"] == "longlive_generator_nvfp4"


def test_import_unswizzles_padded_layers(tmp_path):
    # A layer whose rows and scale columns need padding (200 x 48): values padded to the padded
    # shape and scales blocked from the zero-padded [256, 4] matrix, as FourOverSix stores them.
    from quant.convert import _unpack_official_layer

    weight = torch.randn(200, 48, generator=torch.Generator().manual_seed(1))
    q = quantize(weight, "mse")
    values = torch.zeros(256, 32, dtype=torch.uint8)
    values[:200, :24] = q.codes
    state = {"l.quantized_weight_values": values, "l.quantized_weight_scale_factors": to_blocked(q.scales),
             "l.quantized_weight_amax": q.amax.reshape(1),
             "l.quantized_weight_metadata": torch.tensor([200, 48, 256, 64], dtype=torch.int32)}
    assert to_blocked(q.scales).numel() == 256 * 64 // 16
    got = _unpack_official_layer("l.", state, "mse", Path("x.pt"))
    assert torch.equal(got.codes, q.codes) and torch.equal(got.amax, q.amax)
    assert torch.equal(got.scales.view(torch.uint8), q.scales.view(torch.uint8))


def test_import_needs_the_rule_when_the_file_has_none(tmp_path):
    path = tmp_path / "model_4o6.pt"
    torch.save(official_export(tiny_model(seed=7, dtype=torch.bfloat16), "mse", with_metadata=False), path)
    with pytest.raises(UserError, match="does not record its scale rule: pass --rule"):
        convert(path, tmp_path / "q.safetensors", "tiny")
    report = convert(path, tmp_path / "q.safetensors", "tiny", rule="mse")
    assert report.rule == "mse"
    torch.save(official_export(tiny_model(seed=7, dtype=torch.bfloat16), "mse"), path)
    with pytest.raises(UserError, match="was quantized with scale rule 'mse', not 'static_6'"):
        convert(path, tmp_path / "q2.safetensors", "tiny", rule="static_6")


def test_cli_dispatches_official_exports(tmp_path, capsys):
    torch.save(official_export(tiny_model(seed=7, dtype=torch.bfloat16), "mse"), tmp_path / "model_4o6.pt")
    out = tmp_path / "q.safetensors"
    assert main(["convert-nvfp4", str(tmp_path / "model_4o6.pt"), str(out), "--preset", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "imported" in text and "20 layers" in text
    assert isinstance(load_quantized(out, TINY).blocks[0].ffn[0], NVFP4Linear)


# ----------------------------------------------------------------------------------------------
# The command.


def test_cli_converts_with_table_and_totals(tmp_path, capsys):
    source = save_generator(tiny_model(dtype=torch.bfloat16), tmp_path / "gen.pt")
    out = tmp_path / "out" / "q.safetensors"
    assert main(["convert-nvfp4", str(source), str(out), "--preset", "tiny", "--rule", "abs_max",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "blocks.1.ffn.2" in text and "128x256" in text
    assert "20 layers" in text and "SQNR mean" in text and str(out) in text.replace("\n", "")
    assert safetensors.safe_open(str(out), "pt").metadata()["rule"] == "abs_max"


def write_input(tmp_path: Path, kind: str) -> Path:
    source = tmp_path / "gen.pt"
    if kind in ("truncated-pt", "truncated-st", "nvfp4", "wide"):
        model = tiny_model(dtype=torch.bfloat16, **({"ffn_dim": 512} if kind == "wide" else {}))
        good = save_generator(model, tmp_path / ("good.safetensors" if kind == "truncated-st" else "good.pt"))
        if kind == "nvfp4":
            return convert(good, tmp_path / "q.safetensors", "tiny").output
        if kind == "wide":
            return good
        data = good.read_bytes()
        source = tmp_path / f"bad{good.suffix}"
        source.write_bytes(data[: len(data) // 2])
    return source


@pytest.mark.parametrize("kind,extra,needle", [
    ("missing", [], "gen.pt not found"),
    ("truncated-pt", [], "the file is truncated or corrupt"),
    ("truncated-st", [], "the file is truncated or corrupt"),
    ("nvfp4", [], "is already a packed NVFP4 checkpoint"),
    ("wide", [], "does not match the model"),
    ("wide", ["--rule", "nvfp4"], "unknown NVFP4 scale rule 'nvfp4'"),
    ("wide", ["--mode", "native"], "--mode native is a runtime mode, not a storage mode"),
    ("wide", ["--mode", "w8a8"], "'w8a8' is not one of 'w4a16', 'w4a4', 'native'"),
    ("wide", ["--preset", "big"], "--preset big: unknown model preset"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, kind, extra, needle):
    source = write_input(tmp_path, kind)
    args = ["convert-nvfp4", str(source), str(tmp_path / "out.safetensors"), "--preset", "tiny", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err.replace("\n", ""), err
    assert err.count("error:") == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_output_must_be_safetensors_and_inner_dims_multiple_of_16(tmp_path):
    source = save_generator(tiny_model(dtype=torch.bfloat16), tmp_path / "gen.pt")
    with pytest.raises(UserError, match="must end in .safetensors"):
        convert(source, tmp_path / "q.pt", "tiny")
    odd = ModelConfig(**{**TINY.__dict__, "dim": 120, "num_heads": 4})
    odd_source = save_generator(tiny_model(dtype=torch.bfloat16, dim=120), tmp_path / "odd.pt")
    with pytest.raises(UserError, match=r"blocks.0.self_attn.q has in_features=120, not a multiple of 16"):
        convert(odd_source, tmp_path / "q.safetensors", odd)
