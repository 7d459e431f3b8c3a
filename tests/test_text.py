"""The umt5 text encoder (core/text.py) against an independent reference.

`reference_encode` below is written from reference-systems.md §2.1 alone (token embedding, per-layer
relative position bias with the bidirectional bucket formula, T5 RMSNorm, attention without
1/sqrt(d) and with padding keys masked, gated GELU-tanh FFN `fc2(fc1(x) * gelu(gate(x)))`, final
norm, rows at and beyond the token count zeroed). It reads the Wan-named weights and computes in
float64; it shares no code with transformers or core/text.py. Weights are written by the tests in
the official layouts (`models_t5_umt5-xxl-enc-bf16.pth`, a Hugging Face folder).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from core import text as text_mod
from core.errors import UserError
from core.text import (
    ByteTokenizer,
    TextEncoder,
    TextEncoderConfig,
    build_umt5,
    clean_text,
    find_text_encoder,
    hf_to_wan_keys,
    wan_state_dict_shapes,
    wan_to_hf_keys,
)
from core.umt5 import relative_position_bucket
from tests.conftest import hf_umt5

TINY = TextEncoderConfig.preset("tiny")
L = 512
TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# The reference (reference-systems.md §2.1).


def slow_bucket(rel: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """The doc's formula, one distance at a time (rel = key_pos - query_pos)."""
    half = num_buckets // 2
    exact = half // 2
    bucket = half if rel > 0 else 0
    a = abs(rel)
    if a < exact:
        return bucket + a
    return bucket + min(half - 1, exact + math.floor(math.log(a / exact) / math.log(max_distance / exact)
                                                     * (half - exact)))


def reference_bucket(rel: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    half = num_buckets // 2
    exact = half // 2
    a = rel.abs()
    large = exact + torch.floor(torch.log(a.double().clamp(min=1) / exact) / math.log(max_distance / exact)
                                * (half - exact)).long()
    return (rel > 0).long() * half + torch.where(a < exact, a, large.clamp(max=half - 1))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_encode(wan: dict[str, Tensor], ids: Tensor, mask: Tensor,
                     config: TextEncoderConfig = TINY) -> Tensor:
    w = {k: v.double() for k, v in wan.items()}
    n, length = ids.shape
    heads, eps = config.num_heads, config.eps
    pos = torch.arange(length)
    buckets = reference_bucket(pos[None, :] - pos[:, None], config.relative_attention_num_buckets,
                               config.relative_attention_max_distance)  # [query, key]
    key_ok = mask.bool()[:, None, None, :]
    x = w["token_embedding.weight"][ids]
    for i in range(config.num_layers):
        p = f"blocks.{i}."
        h = rms_norm(x, w[p + "norm1.weight"], eps)
        q, k, v = (
            (h @ w[p + f"attn.{name}.weight"].T).view(n, length, heads, -1) for name in "qkv")
        bias = w[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)  # [heads, q, k]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias  # no 1/sqrt(d)
        attn = scores.masked_fill(~key_ok, float("-inf")).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(n, length, -1)
        x = x + out @ w[p + "attn.o.weight"].T
        h = rms_norm(x, w[p + "norm2.weight"], eps)
        ffn = gelu_tanh(h @ w[p + "ffn.gate.0.weight"].T) * (h @ w[p + "ffn.fc1.weight"].T)
        x = x + ffn @ w[p + "ffn.fc2.weight"].T
    x = rms_norm(x, w["norm.weight"], eps)
    return torch.where(pos[None, :, None] < mask.sum(1)[:, None, None], x, 0.0)


def byte_ids(texts: list[str]) -> tuple[Tensor, Tensor]:
    """Expected ByteTokenizer output: bytes + 3, eos 1, pad 0 to 512, cut keeping the eos."""
    ids = torch.zeros(len(texts), L, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [b + 3 for b in text.encode()][: L - 1] + [1]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids, (ids != 0).long()


def random_wan(config: TextEncoderConfig = TINY, seed: int = 0) -> dict[str, Tensor]:
    """The test's own Wan-named weights (independent of core.text's random init)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in wan_state_dict_shapes(config).items():
        values = torch.randn(shape, generator=g)
        if "norm" in name:
            out[name] = 1 + 0.2 * values
        elif "embedding" in name:
            out[name] = values
        else:
            out[name] = values / math.sqrt(shape[1])
    return out


def write_wan(path: Path, wan: dict[str, Tensor], dtype: torch.dtype = torch.bfloat16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(dtype) for k, v in wan.items()}, path)
    return path


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


PROMPTS = {
    # different lengths, multi-byte characters, one exactly filling 511 + eos, one cut
    "padded": ["a cat", "A long shot of a red fox running through snow at dusk.", "雪中的狐狸"],
    "full": ["x" * 511, "y" * 700 + " z"],
    "mixed": ["short", "w" * 600, "", "mid length prompt with   spaces"],
}


# ----------------------------------------------------------------------------------------------
# Numerics.


@pytest.mark.parametrize("batch,file_dtype", [("padded", torch.float32), ("full", torch.bfloat16),
                                              ("mixed", torch.bfloat16)])
def test_wan_file_matches_reference(tmp_path, batch, file_dtype):
    wan = random_wan(seed=1)
    path = write_wan(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", wan, file_dtype)
    encoder = TextEncoder.from_wan_checkpoint(path, ByteTokenizer(), config=TINY)
    prompts = PROMPTS[batch]
    got = encoder.encode(prompts)
    ids, mask = byte_ids([clean_text(p) for p in prompts])
    expected = reference_encode({k: v.to(file_dtype) for k, v in wan.items()}, ids, mask)
    assert got.shape == (len(prompts), L, TINY.d_model) and got.dtype == torch.float32
    assert (got.double() - expected).abs().max().item() <= TOL
    # The test is not vacuous: every prompt row is non-zero and differs between prompts.
    lengths = mask.sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert got[i, :n].norm(dim=-1).min() > 0.1


def test_reference_is_sensitive_to_each_piece():
    """Sanity of the reference itself: padding keys are masked (valid rows do not depend on how
    much padding follows), and bias / mapping mistakes change the output."""
    wan = random_wan(seed=2)
    ids, mask = byte_ids(["a fox"])
    full = reference_encode(wan, ids, mask)
    short = reference_encode(wan, ids[:, :10], mask[:, :10])
    assert torch.allclose(full[:, :10], short, atol=1e-12)
    swapped = dict(wan)
    for i in range(TINY.num_layers):
        swapped[f"blocks.{i}.ffn.gate.0.weight"] = wan[f"blocks.{i}.ffn.fc1.weight"]
        swapped[f"blocks.{i}.ffn.fc1.weight"] = wan[f"blocks.{i}.ffn.gate.0.weight"]
    assert (reference_encode(swapped, ids, mask) - full).abs().max() > 1e-2


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (16, 64), (8, 20)])
def test_relative_bucket_against_slow_formula(buckets, max_distance):
    config = TextEncoderConfig(vocab_size=300, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1,
                               relative_attention_num_buckets=buckets,
                               relative_attention_max_distance=max_distance)
    model = build_umt5(config, random_wan(config))
    rel = torch.cat([torch.arange(-1500, 1501), torch.tensor([-10**6, -4097, 4097, 10**6])])
    slow = torch.tensor([slow_bucket(int(r), buckets, max_distance) for r in rel])
    assert torch.equal(relative_position_bucket(rel, model.config.relative_attention_num_buckets,
                                                model.config.relative_attention_max_distance), slow)  # the encoder's
    assert torch.equal(reference_bucket(rel, buckets, max_distance), slow)  # what the test uses
    assert set(slow.tolist()) == set(range(buckets)) - {buckets // 2}  # +0 is not a forward distance


# ----------------------------------------------------------------------------------------------
# Names.

# reference-systems.md §2.2, per block i (10 tensors) plus the embedding and the final norm.
XXL_BLOCK_SHAPES = {
    "norm1.weight": (4096,), "attn.q.weight": (4096, 4096), "attn.k.weight": (4096, 4096),
    "attn.v.weight": (4096, 4096), "attn.o.weight": (4096, 4096), "norm2.weight": (4096,),
    "ffn.gate.0.weight": (10240, 4096), "ffn.fc1.weight": (10240, 4096),
    "ffn.fc2.weight": (4096, 10240), "pos_embedding.embedding.weight": (32, 64),
}


def test_umt5_xxl_official_keys_on_meta():
    config = TextEncoderConfig.preset("umt5-xxl")
    expected = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
    expected.update({f"blocks.{i}.{k}": v for i in range(24) for k, v in XXL_BLOCK_SHAPES.items()})
    assert len(expected) == 242
    assert wan_state_dict_shapes(config) == expected
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(config.to_hf())
    hf = model.state_dict()
    wan = hf_to_wan_keys(hf)
    assert {k: tuple(v.shape) for k, v in wan.items()} == expected
    assert set(wan_to_hf_keys(wan)) == set(hf)
    assert sum(math.prod(s) for s in expected.values()) == 5_680_910_336


@pytest.mark.parametrize("preset", ["tiny", "umt5-xxl"])
def test_key_mapping_round_trip(preset):
    config = TextEncoderConfig.preset(preset)
    wan = {k: torch.empty(s, device="meta") for k, s in wan_state_dict_shapes(config).items()}
    hf = wan_to_hf_keys(wan)
    assert hf["shared.weight"] is hf["encoder.embed_tokens.weight"] is wan["token_embedding.weight"]
    back = hf_to_wan_keys(hf)
    assert list(back) == list(wan) and all(back[k] is wan[k] for k in wan)
    assert all(hf_to_wan_keys({k: v}) for k, v in hf.items())  # every HF name maps alone
    for i in (0, config.num_layers - 1):  # the two FFN input branches are not swapped
        assert hf[f"encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"] is wan[f"blocks.{i}.ffn.gate.0.weight"]
        assert hf[f"encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"] is wan[f"blocks.{i}.ffn.fc1.weight"]


@pytest.mark.parametrize("mapping,name", [(wan_to_hf_keys, "blocks.0.attn.qq.weight"),
                                          (wan_to_hf_keys, "encoder.final_layer_norm.weight"),
                                          (hf_to_wan_keys, "decoder.block.0.layer.0.SelfAttention.q.weight"),
                                          (hf_to_wan_keys, "norm.weight")])
def test_key_mapping_rejects_foreign_names(mapping, name):
    with pytest.raises(ValueError, match="not a"):
        mapping({name: torch.zeros(1)})


# ----------------------------------------------------------------------------------------------
# Tokenizers and cleaning.


@pytest.mark.parametrize("text,tokens", [
    ("", []),
    ("ab", [97 + 3, 98 + 3]),
    ("é", [0xC3 + 3, 0xA9 + 3]),
    ("q" * 511, [ord("q") + 3] * 511),
    ("r" * 2000, [ord("r") + 3] * 511),  # cut, eos kept last
])
def test_byte_tokenizer(text, tokens):
    ids, mask = ByteTokenizer()([text, "z"])
    assert ids.shape == mask.shape == (2, L) and ids.dtype == mask.dtype == torch.long
    expected = torch.tensor(tokens + [1] + [0] * (L - len(tokens) - 1))
    assert torch.equal(ids[0], expected)
    assert torch.equal(mask[0], (expected != 0).long())
    assert ids[1, :2].tolist() == [ord("z") + 3, 1] and mask[1].sum() == 2
    assert ByteTokenizer.vocab_size == TINY.vocab_size == 259


@pytest.mark.parametrize("raw,clean", [
    ("  a \t\n\r b  ", "a b"),
    ("a\u00a0\u2003\u3000b", "a b"),
    ("&amp;lt;b&amp;gt; &amp;amp;", "<b> &"),  # unescaped twice, not three times
    ("&lt;x&gt;", "<x>"),
    ("Case Stays", "Case Stays"),
    ("", ""),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


@pytest.mark.parametrize("raw,clean", [
    ("色调艳丽，过曝", "色调艳丽,过曝"),  # fullwidth punctuation, as in the default negative prompt
    ("\u201cquoted\u201d", '"quoted"'),
    ("cafÃ©", "café"),  # mojibake
])
def test_clean_text_ftfy(raw, clean):
    pytest.importorskip("ftfy")
    assert clean_text(raw) == clean


def test_clean_text_without_ftfy(monkeypatch, caplog):
    """Without ftfy the rest of the cleaning still follows the official `regex` \\s, which leaves
    the information separators U+001C..U+001F alone (Python's \\s would collapse them)."""
    monkeypatch.setattr(text_mod, "ftfy", None)
    monkeypatch.setattr(text_mod, "_warned_no_ftfy", False)
    assert clean_text(" a\x1cb \u3000 c&amp;amp; ") == "a\x1cb c&"
    assert "ftfy is not installed" in caplog.text


# ----------------------------------------------------------------------------------------------
# Zero rows, cache, order.


def count_calls(encoder: TextEncoder) -> list[int]:
    """Record the batch size of every encoder forward."""
    calls: list[int] = []
    forward = encoder.model.forward

    def counted(ids, mask):
        calls.append(ids.shape[0])
        return forward(ids, mask)

    encoder.model.forward = counted
    return calls


def test_zero_rows_cache_and_order():
    encoder = TextEncoder.tiny(seed=3)
    calls = count_calls(encoder)
    prompts = ["b", "a fox", "b", "a  fox ", "c" * 600]
    out = encoder.encode(prompts)
    assert calls == [3]  # "b", "a fox" (twice, once with extra spaces), the long one
    lengths = [2, 6, 2, 6, L]
    for i, n in enumerate(lengths):
        assert torch.all(out[i, n:] == 0) and not torch.any(out[i, n:].signbit())
        assert out[i, :n].norm(dim=-1).min() > 0.1
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3])
    again = encoder.encode(["a fox", "b"])
    assert calls == [3]
    assert torch.equal(again[0], out[1]) and torch.equal(again[1], out[0])
    # One prompt at a time without a cache gives the same rows in the same order.
    plain = TextEncoder.tiny(seed=3, max_cached_prompts=0)
    for i, prompt in enumerate(prompts):
        assert (plain.encode([prompt])[0] - out[i]).abs().max() <= 1e-6


@pytest.mark.parametrize("max_cached,batch_size,expected_calls", [
    (0, 16, [2, 2]), (1, 16, [2, 1]), (8, 16, [2]), (8, 1, [1, 1]),
])
def test_cache_limits_and_batches(max_cached, batch_size, expected_calls):
    encoder = TextEncoder.tiny(max_cached_prompts=max_cached, batch_size=batch_size)
    calls = count_calls(encoder)
    first = encoder.encode(["p", "q"])
    second = encoder.encode(["q", "p"])
    assert calls == expected_calls
    assert (first.flip(0) - second).abs().max() <= 1e-6


def test_encode_rejects_a_bare_string():
    with pytest.raises(ValueError, match="list of strings"):
        TextEncoder.tiny().encode("a prompt")
    assert TextEncoder.tiny().encode([]).shape == (0, L, TINY.d_model)


# ----------------------------------------------------------------------------------------------
# Hugging Face folders and the model-folder finder.

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "runs", "in", "the", "snow", "at", "dusk"]


def write_hf_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer saved the way AutoTokenizer reads it (tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(folder)


def word_ids(texts: list[str]) -> tuple[Tensor, Tensor]:
    ids = torch.zeros(len(texts), L, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [WORDS.index(w) if w in WORDS else 2 for w in text.split()][: L - 1] + [1]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids, (ids != 0).long()


def write_model_dir(root: Path, layout: str, wan: dict[str, Tensor]) -> Path:
    """A model folder in one of the layouts `find_text_encoder` accepts."""
    if layout in ("wan", "wan-parent"):
        base = root / "Wan2.2-TI2V-5B" if layout == "wan-parent" else root
        write_wan(base / "models_t5_umt5-xxl-enc-bf16.pth", wan, torch.float32)
        write_hf_tokenizer(base / "google" / "umt5-xxl")
        return root
    model = hf_umt5(TINY, wan)
    weights_dir = root / "text_encoder" if layout == "diffusers" else root
    model.save_pretrained(weights_dir, **({"max_shard_size": "100KB"} if layout == "hf-shards" else {}))
    write_hf_tokenizer(root / "tokenizer" if layout == "diffusers" else root)
    return root


@pytest.mark.parametrize("layout", ["wan", "wan-parent", "hf", "hf-shards", "diffusers"])
def test_model_dir_layouts_match_reference(tmp_path, layout):
    wan = random_wan(seed=4)
    root = write_model_dir(tmp_path / "model", layout, wan)
    files = find_text_encoder(root)
    assert files.layout == ("wan" if layout.startswith("wan") else "hf")
    if layout == "hf-shards":
        assert len(list(files.weights.glob("*.safetensors"))) > 1
    encoder = TextEncoder.from_model_dir(root, config=TINY)
    prompts = ["a red fox runs in the snow", "the   fox at dusk", "zebra a"]
    got = encoder.encode(prompts)
    ids, mask = word_ids([clean_text(p) for p in prompts])
    assert (got.double() - reference_encode(wan, ids, mask)).abs().max().item() <= TOL
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_hf_tokenizer_truncation_keeps_eos(tmp_path):
    write_hf_tokenizer(tmp_path)
    tokenizer = text_mod.HFTokenizer(tmp_path, L)
    ids, mask = tokenizer(["fox " * 600, "a snow"])
    assert ids.shape == (2, L)
    assert ids[0, -1] == 1 and ids[0, -2] == WORDS.index("fox") and mask[0].sum() == L
    assert ids[1, :3].tolist() == [3, 9, 1] and mask[1].sum() == 3 and ids[1, 3:].abs().sum() == 0


def test_hf_folder_from_pretrained_agrees(tmp_path):
    """transformers' own loader reads the folder we wrote and computes the same thing."""
    from transformers import UMT5EncoderModel

    wan = random_wan(seed=5)
    write_model_dir(tmp_path, "hf", wan)
    ours = TextEncoder.from_hf_folder(tmp_path)
    theirs = UMT5EncoderModel.from_pretrained(tmp_path, local_files_only=True).eval()
    ids, mask = word_ids(["a red fox"])
    with torch.no_grad():
        hidden = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours.encode(["a red fox"])
    assert (got[0, :4] - hidden[0, :4]).abs().max() <= TOL


# ----------------------------------------------------------------------------------------------
# Bad input.


def make_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """Builds a broken model folder; returns (folder to load, path the message must name)."""
    root = tmp_path / "model"
    wan = random_wan()
    if case == "missing folder":
        return root, str(root)
    if case == "empty folder":
        root.mkdir()
        return root, str(root)
    if case == "truncated weights":
        write_model_dir(root, "wan", wan)
        weights = root / "models_t5_umt5-xxl-enc-bf16.pth"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return root, str(weights)
    if case == "wrong config":
        write_model_dir(root, "wan", random_wan(dataclass_replace(TINY, d_model=32, d_kv=8)))
        return root, str(root / "models_t5_umt5-xxl-enc-bf16.pth")
    if case == "not a t5 file":
        write_model_dir(root, "wan", wan)
        torch.save({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, root / "models_t5_umt5-xxl-enc-bf16.pth")
        return root, str(root / "models_t5_umt5-xxl-enc-bf16.pth")
    if case == "no tokenizer folder":
        write_wan(root / "models_t5_umt5-xxl-enc-bf16.pth", wan)
        return root, str(root / "models_t5_umt5-xxl-enc-bf16.pth")
    if case == "empty tokenizer folder":
        write_wan(root / "models_t5_umt5-xxl-enc-bf16.pth", wan)
        (root / "google" / "umt5-xxl").mkdir(parents=True)
        return root, str(root / "google" / "umt5-xxl")
    if case == "hf weights for another config":
        write_model_dir(root, "hf", wan)
        config = (root / "config.json").read_text().replace('"d_ff": 128', '"d_ff": 96')
        (root / "config.json").write_text(config)
        return root, str(root)
    if case == "hf config of t5":
        write_model_dir(root, "hf", wan)
        config = (root / "config.json").read_text().replace('"model_type": "umt5"', '"model_type": "t5"')
        (root / "config.json").write_text(config)
        return root, str(root / "config.json")
    if case == "hf config not an object":
        write_model_dir(root, "hf", wan)
        (root / "config.json").write_text("[1, 2]")
        return root, str(root / "config.json")
    if case == "hf config with a bad width":
        write_model_dir(root, "hf", wan)
        config = (root / "config.json").read_text().replace('"d_ff": 128', '"d_ff": -4')
        (root / "config.json").write_text(config)
        return root, str(root / "config.json")
    if case == "hf without weights":
        write_model_dir(root, "hf", wan)
        (root / "model.safetensors").unlink()
        return root, str(root)
    raise AssertionError(case)


def dataclass_replace(config: TextEncoderConfig, **changes) -> TextEncoderConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


@pytest.mark.parametrize("case,needle", [
    ("missing folder", "not found"),
    ("empty folder", "no text encoder in"),
    ("truncated weights", "truncated or corrupt"),
    ("wrong config", "does not match the text encoder config"),
    ("not a t5 file", "unexpected"),
    ("no tokenizer folder", "no tokenizer folder"),
    ("empty tokenizer folder", "cannot load the tokenizer"),
    ("hf weights for another config", "wrong shape"),
    ("hf config of t5", "not umt5"),
    ("hf config not an object", "not a JSON object"),
    ("hf config with a bad width", "d_ff must be a positive integer"),
    ("hf without weights", "no weights"),
])
def test_bad_input_is_one_line_user_error(tmp_path, case, needle):
    root, named = make_case(tmp_path, case)
    with pytest.raises(UserError) as excinfo:
        TextEncoder.from_model_dir(root, config=TINY)
    message = one_line_error(excinfo)
    assert needle in message and named in message, message


@pytest.mark.parametrize("field,value", [
    ("d_model", 0), ("num_layers", -1), ("vocab_size", 2), ("d_kv", 1.5), ("text_len", True),
    ("eps", 0.0), ("relative_attention_num_buckets", 6), ("relative_attention_max_distance", 8),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclass_replace(TINY, **{field: value})


def test_presets_and_hf_config():
    xxl = TextEncoderConfig.preset("umt5-xxl")
    assert (xxl.vocab_size, xxl.d_model, xxl.d_kv, xxl.num_heads, xxl.d_ff, xxl.num_layers) == (
        256384, 4096, 64, 64, 10240, 24)
    assert TINY.d_model == 64  # the tiny DiT's text_dim
    hf = xxl.to_hf()
    assert (hf.feed_forward_proj, hf.is_encoder_decoder, hf.pad_token_id, hf.eos_token_id) == (
        "gated-gelu", False, 0, 1)
    assert TextEncoderConfig.from_hf(hf) == xxl
    assert TextEncoderConfig.from_hf(hf.to_dict()) == xxl  # a config.json's dict reads the same
    from transformers import UMT5Config

    assert TextEncoderConfig.from_hf({"model_type": "umt5"}) == TextEncoderConfig.from_hf(UMT5Config())  # defaults
    with pytest.raises(ValueError, match="unknown text encoder preset"):
        TextEncoderConfig.preset("umt5-base")


# ----------------------------------------------------------------------------------------------
# GPU placement.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("keep_on_device", [False, True])
def test_gpu_placement_and_bf16(keep_on_device):
    encoder = TextEncoder.tiny(seed=6, device="cuda", keep_on_device=keep_on_device)
    assert encoder.dtype == torch.bfloat16
    prompts = ["a red fox", "snow at dusk, long shot"]
    out = encoder.encode(prompts)
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    assert encoder.on_device == keep_on_device
    assert all(p.device.type == ("cuda" if keep_on_device else "cpu") for p in encoder.model.parameters())
    wan = {k: v.to(torch.bfloat16) for k, v in text_mod.random_wan_state_dict(TINY, 6).items()}
    ids, mask = byte_ids(prompts)
    expected = reference_encode(wan, ids, mask)
    assert (out.double().cpu() - expected).abs().max().item() <= 0.1  # bf16 activations
    encoder.offload()
    assert not encoder.on_device


def _slow_random_wan_state_dict(config: TextEncoderConfig, seed: int) -> dict[str, Tensor]:
    """The draw written out without in-place ops: what the tests' expected values rest on."""
    out = {}
    for index, (name, shape) in enumerate(text_mod.wan_state_dict_shapes(config).items()):
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100003 + index))
        if name.endswith(("norm1.weight", "norm2.weight")) or name == text_mod.WAN_NORM:
            values = 1 + 0.1 * values
        elif name != text_mod.WAN_EMBEDDING and not name.endswith("pos_embedding.embedding.weight"):
            values = values / shape[1] ** 0.5
        out[name] = values
    return out


@pytest.mark.parametrize("seed", [0, 6])
def test_random_weights_default_draw_is_stable(seed):
    got = text_mod.random_wan_state_dict(TINY, seed)
    expected = _slow_random_wan_state_dict(TINY, seed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_random_weights_drawn_in_bf16_keep_shapes_and_scales():
    fp32 = text_mod.random_wan_state_dict(TINY, 1)
    bf16 = text_mod.random_wan_state_dict(TINY, 1, dtype=torch.bfloat16)
    assert {k: v.shape for k, v in bf16.items()} == {k: v.shape for k, v in fp32.items()}
    assert all(v.dtype == torch.bfloat16 for v in bf16.values())
    for name, values in bf16.items():  # same distribution per tensor: norm scales near 1, projections 1/sqrt(fan_in)
        assert abs(values.float().std().item() - fp32[name].std().item()) <= 0.25 * fp32[name].std().item() + 1e-3
        assert abs(values.float().mean().item() - fp32[name].mean().item()) <= 0.25 * fp32[name].std().item() + 0.02
    encoder = TextEncoder.random(TINY, 1, init_dtype=torch.bfloat16)
    assert encoder.encode(["a red ball"]).isfinite().all()


def test_pin_host_is_a_no_op_off_cuda():
    plain = TextEncoder.tiny(seed=2)
    pinned = TextEncoder.tiny(seed=2)
    pinned.pin_host_memory()  # a CPU encoder: nothing to page-lock
    assert not pinned.host_pinned
    prompts = ["a red fox", "snow at dusk"]
    assert torch.equal(plain.encode(prompts), pinned.encode(prompts))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pinned_host_weights_encode_the_same():
    plain = TextEncoder.tiny(seed=6, device="cuda")
    pinned = TextEncoder.tiny(seed=6, device="cuda")
    pinned.pin_host_memory()
    assert pinned.host_pinned and not plain.host_pinned
    prompts = ["a red fox", "snow at dusk, long shot"]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # as the interactive thread encodes
        got = pinned.encode(prompts)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, plain.encode(prompts))
    assert not pinned.on_device and pinned.host_pinned  # offloaded back to the page-locked copies


def test_a_live_prompt_feed_pins_the_encoder_first():
    from core.interactive import open_feed

    calls = []

    class Encoder:
        def pin_host_memory(self):
            calls.append("pin")

        def encode(self, prompts):
            calls.append(("encode", tuple(prompts)))
            return torch.zeros(len(prompts), 2, 3)

    with open_feed(lambda: None, Encoder(), torch.device("cpu"), torch.float32) as feed:
        assert calls == ["pin"]  # before any prompt is typed
        assert feed.take(0) is None
    with open_feed(None, Encoder(), torch.device("cpu"), torch.float32) as feed:  # no live source: no pinning
        assert feed is None
    assert calls == ["pin"]
