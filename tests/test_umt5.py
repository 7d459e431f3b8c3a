"""`core.umt5.UMT5Encoder` against transformers' `UMT5EncoderModel` (eager), the implementation the
encoder ran on until it was written out here: equal bit for bit in fp32, so every embedding the
shipped shapes generator was trained on is unchanged; in bf16 within rounding (our softmax runs
in fp32 as the official code's does, transformers' eager one in bf16)."""

from __future__ import annotations

import pytest
import torch

from core.text import (
    ByteTokenizer,
    TextEncoder,
    TextEncoderConfig,
    build_umt5,
    clean_text,
    random_wan_state_dict,
)
from tests.conftest import hf_umt5

PROMPTS = ["a red circle moves left to right on a blue background", "x", "雪中的狐狸  at dusk",
           "w" * 600]
CONFIGS = {
    "tiny": TextEncoderConfig.preset("tiny"),
    # odd widths, fewer buckets, more layers than heads: every shape path of the bias and the FFN
    "odd": TextEncoderConfig(vocab_size=300, d_model=40, d_kv=6, num_heads=5, d_ff=72, num_layers=3,
                             relative_attention_num_buckets=16, relative_attention_max_distance=40),
}


def ids_and_mask(prompts: list[str], text_len: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    return ByteTokenizer(text_len)([clean_text(p) for p in prompts])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 3])
def test_equals_transformers_bit_for_bit_in_fp32(name, seed):
    config = CONFIGS[name]
    wan = random_wan_state_dict(config, seed)
    ours = build_umt5(config, {k: v.clone() for k, v in wan.items()})
    ids, mask = ids_and_mask(PROMPTS)
    ids = ids % config.vocab_size  # the odd vocabulary is smaller than the byte ids
    with torch.no_grad():
        expected = hf_umt5(config, wan)(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    lengths = mask.sum(1)
    for row, length in enumerate(lengths.tolist()):  # rows past the tokens are cut by TextEncoder
        assert torch.equal(got[row, :length], expected[row, :length]), (name, row)
    # not vacuous: padding changes nothing before it, and the prompts differ
    with torch.no_grad():
        alone = ours(ids[1:2, :lengths[1]], mask[1:2, :lengths[1]])
    assert torch.allclose(alone[0], got[1, :lengths[1]], atol=1e-5)  # other matmul sizes round otherwise
    assert (got[0, :2] - got[2, :2]).abs().max() > 1e-2


def test_bf16_within_rounding_of_transformers():
    config = CONFIGS["tiny"]
    wan = random_wan_state_dict(config, 1)
    ours = build_umt5(config, {k: v.clone() for k, v in wan.items()}).to(torch.bfloat16)
    ids, mask = ids_and_mask(PROMPTS[:3])
    with torch.no_grad():
        expected = hf_umt5(config, wan, torch.bfloat16)(input_ids=ids, attention_mask=mask).last_hidden_state
        reference = hf_umt5(config, wan)(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert got.dtype == torch.bfloat16
    for row, length in enumerate(mask.sum(1).tolist()):
        ours_error = (got[row, :length].float() - reference[row, :length]).abs().max()
        their_error = (expected[row, :length].float() - reference[row, :length]).abs().max()
        assert ours_error <= 2 * their_error + 1e-2, (row, ours_error, their_error)


def test_the_shipped_shapes_encoder_gives_the_embeddings_it_was_trained_with():
    """The shapes generator was trained on transformers' embeddings of this encoder."""
    from core.assets import shapes_text_encoder_path

    path = shapes_text_encoder_path()
    if not path.is_file():
        pytest.skip("no shipped text encoder")
    config = TextEncoderConfig.preset("tiny")
    encoder = TextEncoder.from_wan_checkpoint(path, ByteTokenizer(config.text_len), config=config)
    from safetensors.torch import load_file

    wan = load_file(path)
    prompts = PROMPTS[:3] + ["an orange square moves top to bottom on a black background", ""]
    ids, mask = ids_and_mask(prompts)
    with torch.no_grad():
        expected = hf_umt5(config, wan)(input_ids=ids, attention_mask=mask).last_hidden_state
    got = encoder.encode(prompts)
    for row, length in enumerate(mask.sum(1).tolist()):
        assert torch.equal(got[row, :length], expected[row, :length])
        assert not got[row, length:].any()


def test_fp16_activations_stay_finite(monkeypatch):
    """FFN outputs past fp16's range: the official clamp after each residual keeps them finite."""
    import core.umt5

    config = CONFIGS["tiny"]
    wan = {k: v * (2e4 if k.endswith("ffn.fc2.weight") else 1.0)
           for k, v in random_wan_state_dict(config, 2).items()}
    model = build_umt5(config, wan).to(torch.float16)
    ids, mask = ids_and_mask(["a loud prompt " * 8])
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask)).all()
        monkeypatch.setattr(core.umt5, "_clamp_fp16", lambda x: x)
        assert not torch.isfinite(model(ids, mask)).all()  # the case needs the clamp
