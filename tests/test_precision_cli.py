"""`--precision nvfp4` / `--kv-precision nvfp4` through the CLI and the streaming pipeline: the
quantized runs work end to end, stay close to bf16 (SQNR thresholds), and bad choices are one
line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from core.config import StreamConfig
from core.pipeline import generate_latents
from longlive_cli.app import main
from tests.conftest import SMALL_STREAM, text_context, tiny_model

FAST = ["--preset", "tiny", "--random-weights", "--frames", "8", "--height", "64", "--width", "64"]


def sqnr_db(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (x - reference).pow(2).sum()))


@pytest.mark.parametrize("mode, threshold", [("w4a16", 28.0), ("w4a4", 26.0)])
def test_streaming_run_with_nvfp4_weights_and_cache_stays_close_to_full_precision(mode, threshold):
    from quant.kv import nvfp4_storage
    from quant.linear import NVFP4Config, quantize_model

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 12, 48, 4, 4, generator=g)
    contexts = [text_context(1, seed=i) for i in range(6)]
    stream = StreamConfig(**SMALL_STREAM)
    reference = generate_latents(tiny_model(), noise, contexts, stream)
    model = quantize_model(tiny_model(), NVFP4Config(mode=mode))
    quantized = generate_latents(model, noise, contexts, stream, kv_storage=nvfp4_storage())
    # measured: w4a16 30.4 dB, w4a4 28.4 dB (fp32 tiny model, mse rules; weights alone 30.6 / 28.7)
    assert sqnr_db(quantized, reference) >= threshold


def test_generate_with_nvfp4_weights_and_cache(tmp_path, capsys):
    video = tmp_path / "nvfp4.mp4"
    assert main(["generate", "a red ball", *FAST, "--precision", "nvfp4", "--kv-precision", "nvfp4",
                 "-o", str(video)]) == 0
    assert video.stat().st_size > 0
    assert "nvfp4 w4a16 (mse), kv nvfp4 (mse)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, label", [(["--precision", "fp8"], "fp8 w8a8"),
                                          (["--precision", "fp8", "--kv-precision", "nvfp4"], "fp8 w8a8, kv nvfp4"),
                                          (["--precision", "fp8", "--kv-precision", "fp8"], "fp8 w8a8, kv fp8")])
def test_generate_with_fp8_weights(tmp_path, capsys, flags, label):
    video = tmp_path / "fp8.mp4"
    assert main(["generate", "a red ball", *FAST, *flags, "-o", str(video)]) == 0
    assert video.stat().st_size > 0 and label in capsys.readouterr().out


def test_fp8_is_not_a_training_format(tmp_path, capsys):
    assert main(["train-ar", "train_ar_tiny", "--precision", "fp8", "--logdir", str(tmp_path / "run")]) == 2
    assert "fp8 is an inference format" in capsys.readouterr().err


def test_bench_reports_the_packed_sizes(capsys):
    sizes = {}
    for flags in ([], ["--precision", "nvfp4", "--kv-precision", "nvfp4"]):
        assert main(["bench", "--preset", "tiny", "--window", "12", "--sink", "4", "--frames-per-block", "4",
                     "--frames", "20", "--height", "64", "--width", "64", "--json",
                     *flags]) == 0
        result = json.loads(capsys.readouterr().out)
        sizes[result["storage"]] = (result["weights_gib"], result["kv_cache_gib"])
    (bf16_w, bf16_kv), (fp4_w, fp4_kv) = sizes["bf16"], sizes["nvfp4 w4a16 (mse), kv nvfp4 (mse)"]
    assert fp4_w < 0.6 * bf16_w and fp4_kv < 0.4 * bf16_kv


@pytest.mark.parametrize("flags, needle", [
    (["--precision", "nvfp4", "--quant-mode", "native"], "Blackwell"),
    (["--precision", "fp4"], "'fp4' is not one of 'bf16', 'nvfp4'"),
    (["--kv-precision", "int4"], "'int4' is not one of 'bf16', 'nvfp4'"),
    (["--precision", "nvfp4", "--set", "quant.mode=w2a2"], "bad value for 'quant.mode': 'w2a2' (allowed: w4a16"),
    (["--precision", "nvfp4", "--set", "quant.rule=median"], "rule must be one of"),
])
def test_bad_precision_choices_are_one_line_exit_2(tmp_path, capsys, flags, needle):
    assert main(["generate", "x", *FAST, *flags, "-o", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
