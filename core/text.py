"""The umt5-xxl text encoder of Wan2.2 / LongLive 2.0 (`core.umt5.UMT5Encoder`), its files and tokenizers.

Prompts become the DiT's context (reference-systems.md §2):

    prompt --clean_text--> text --tokenizer--> ids, mask [N, 512] (eos appended, pad 0)
           --UMT5 encoder (per-layer relative bias, padding keys masked)--> [N, 512, d_model]
           --rows at and beyond each prompt's token count set to exactly 0--> context

Weights come from the official `models_t5_umt5-xxl-enc-bf16.pth` (Wan names, the model's own), from
a Hugging Face folder (config.json + weights, its names mapped by `hf_to_wan_keys`, the one name
adapter), or, for the `tiny` preset, from a seeded random generator paired with the vocabulary-free
`ByteTokenizer`. The model is built on `meta` and takes the file's tensors with `assign=True`.

`TextEncoder` caches one embedding per distinct (cleaned) prompt, and by default keeps the 5.7B
weights in host memory: they visit the GPU only while a batch of new prompts is encoded, so they do
not sit beside the DiT. Legend: N prompts, L text slots (`text_len`), D `d_model`.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor

from core.checkpoint import check_shapes, read_state_dict
from core.config import require as _require
from core.errors import UserError, first_line, first_names
from core.runtime import resolve_device, resolve_dtype
from core.umt5 import UMT5Encoder

if TYPE_CHECKING:  # transformers takes seconds to import: only HF config conversions pay for it
    from transformers import UMT5Config

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

PAD_ID = 0  # umt5 <pad>; also what every slot after the eos holds
EOS_ID = 1  # umt5 </s>, appended to every prompt
UNK_ID = 2  # umt5 <unk>

# The official Wan2.2-TI2V-5B folder: the encoder weights and the tokenizer beside them.
WAN_WEIGHTS_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"
WAN_MODEL_DIR = "Wan2.2-TI2V-5B"  # the folder the official code reads, when given its parent
HF_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


# ----------------------------------------------------------------------------------------------
# Config.


@dataclass
class TextEncoderConfig:
    """umt5 encoder architecture (one relative-bias table per layer, gated GELU-tanh FFN)."""

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "eps":
                _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                         f"eps must be > 0 (got {value!r})")
            else:
                _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                         f"{field.name} must be a positive integer (got {value!r})")
        # Bidirectional buckets: half per direction, a quarter of them exact (needs >= 1).
        _require(self.relative_attention_num_buckets % 4 == 0,
                 f"relative_attention_num_buckets must be a multiple of 4 "
                 f"(got {self.relative_attention_num_buckets})")
        _require(self.relative_attention_max_distance > self.relative_attention_num_buckets // 4,
                 f"relative_attention_max_distance must exceed relative_attention_num_buckets / 4 "
                 f"(got {self.relative_attention_max_distance})")
        _require(self.vocab_size > UNK_ID, f"vocab_size must hold the special ids 0..{UNK_ID} "
                                           f"(got {self.vocab_size})")

    @classmethod
    def preset(cls, name: str) -> TextEncoderConfig:
        if name not in TEXT_ENCODER_PRESETS:
            raise ValueError(f"unknown text encoder preset {name!r} "
                             f"(allowed: {', '.join(TEXT_ENCODER_PRESETS)})")
        return dataclasses.replace(TEXT_ENCODER_PRESETS[name])

    def to_hf(self) -> UMT5Config:
        """The matching transformers config of an encoder-only UMT5."""
        from transformers import UMT5Config

        return UMT5Config(
            vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
            num_heads=self.num_heads, num_layers=self.num_layers, num_decoder_layers=self.num_layers,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            layer_norm_epsilon=self.eps, feed_forward_proj="gated-gelu",  # GELU-tanh gate
            is_encoder_decoder=False, use_cache=False,
            pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
            # Eager attention follows the official op order: bit-exact with the Wan code on CPU in
            # fp32 and bf16 (SDPA drifts by up to 0.2 in bf16 on a 4-layer model).
            attn_implementation="eager",
        )

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | UMT5Config, *, text_len: int = 512,
                source: str = "config") -> TextEncoderConfig:
        """Our config of a HF umt5 config (a `config.json`'s dict or a transformers `UMT5Config`;
        absent keys take `UMT5Config`'s defaults); UserError if it is not the Wan encoder kind."""
        hf = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        model_type = hf.get("model_type", "umt5")
        if model_type != "umt5":
            raise UserError(f"{source} describes a {model_type!r} model, not umt5: give the folder "
                            f"of a UMT5 encoder (google/umt5-xxl kind)")
        # transformers' reading of feed_forward_proj: "gated-gelu" is a GELU-tanh ("gelu_new") gate.
        projection = hf.get("feed_forward_proj", "gated-gelu")
        parts = str(projection).split("-")
        activation = "gelu_new" if projection == "gated-gelu" else parts[-1]
        if parts[0] != "gated" or len(parts) != 2 or activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"{source} has feed_forward_proj {projection!r}; the Wan "
                            f"encoder needs 'gated-gelu': give a umt5 gated-gelu config")
        try:
            return cls(vocab_size=hf.get("vocab_size", 250112), d_model=hf.get("d_model", 512),
                       d_kv=hf.get("d_kv", 64), num_heads=hf.get("num_heads", 6), d_ff=hf.get("d_ff", 1024),
                       num_layers=hf.get("num_layers", 8),
                       relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
                       relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
                       eps=hf.get("layer_norm_epsilon", 1e-6), text_len=text_len)
        except ValueError as err:
            raise UserError(f"{source}: {first_line(err)}") from err


BYTE_VOCAB_SIZE = 256 + 3  # the ByteTokenizer's ids: pad, eos, unk, then the 256 byte values

TEXT_ENCODER_PRESETS: dict[str, TextEncoderConfig] = {
    # Wan2.2 / LongLive `umt5_xxl(encoder_only=True)`: 5,680,910,336 parameters.
    "umt5-xxl": TextEncoderConfig(vocab_size=256384, d_model=4096, d_kv=64, num_heads=64,
                                  d_ff=10240, num_layers=24),
    # d_model = the tiny DiT's text_dim (64); pairs with ByteTokenizer, no vocabulary file.
    "tiny": TextEncoderConfig(vocab_size=BYTE_VOCAB_SIZE, d_model=64, d_kv=16, num_heads=4,
                              d_ff=128, num_layers=2),
}


# ----------------------------------------------------------------------------------------------
# Names: the one adapter between the official (Wan, the model's own) and the transformers names.

# (Wan name inside `blocks.i.`, HF name inside `encoder.block.i.`)
_BLOCK_NAMES = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),  # the GELU branch
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),  # the linear branch
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)
_WAN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_WAN_TO_HF_BLOCK = dict(_BLOCK_NAMES)
_HF_TO_WAN_BLOCK = {hf: wan for wan, hf in _BLOCK_NAMES}
WAN_EMBEDDING = "token_embedding.weight"
WAN_NORM = "norm.weight"
HF_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")  # one tied tensor in the model
HF_NORM = "encoder.final_layer_norm.weight"


def wan_to_hf_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Wan T5 encoder names -> `UMT5EncoderModel` names. The token embedding goes to both
    `shared.weight` and `encoder.embed_tokens.weight` (the same tensor), as the model's state dict
    lists both. ValueError on a name that is not a Wan encoder parameter."""
    out: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        block = _WAN_BLOCK.match(name)
        if name == WAN_EMBEDDING:
            for hf_name in HF_EMBEDDINGS:
                out[hf_name] = tensor
        elif name == WAN_NORM:
            out[HF_NORM] = tensor
        elif block is not None and block[2] in _WAN_TO_HF_BLOCK:
            out[f"encoder.block.{block[1]}.{_WAN_TO_HF_BLOCK[block[2]]}"] = tensor
        else:
            raise ValueError(f"{name!r} is not a Wan umt5 encoder parameter name")
    return out


def hf_to_wan_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`UMT5EncoderModel` names -> Wan names (the inverse of `wan_to_hf_keys`). Either embedding
    name gives `token_embedding.weight`; the encoder's own one wins when both are present."""
    out: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        block = _HF_BLOCK.match(name)
        if name in HF_EMBEDDINGS:
            if name == HF_EMBEDDINGS[1] or WAN_EMBEDDING not in out:
                out[WAN_EMBEDDING] = tensor
        elif name == HF_NORM:
            out[WAN_NORM] = tensor
        elif block is not None and block[2] in _HF_TO_WAN_BLOCK:
            out[f"blocks.{block[1]}.{_HF_TO_WAN_BLOCK[block[2]]}"] = tensor
        else:
            raise ValueError(f"{name!r} is not a UMT5 encoder parameter name")
    return out


def wan_state_dict_shapes(config: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official encoder file with its shape (242 for umt5-xxl)."""
    c = config
    inner = c.num_heads * c.d_kv
    block = {
        "norm1.weight": (c.d_model,),
        "attn.q.weight": (inner, c.d_model),
        "attn.k.weight": (inner, c.d_model),
        "attn.v.weight": (inner, c.d_model),
        "attn.o.weight": (c.d_model, inner),
        "pos_embedding.embedding.weight": (c.relative_attention_num_buckets, c.num_heads),
        "norm2.weight": (c.d_model,),
        "ffn.gate.0.weight": (c.d_ff, c.d_model),
        "ffn.fc1.weight": (c.d_ff, c.d_model),
        "ffn.fc2.weight": (c.d_model, c.d_ff),
    }
    shapes = {WAN_EMBEDDING: (c.vocab_size, c.d_model)}
    for i in range(c.num_layers):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    shapes[WAN_NORM] = (c.d_model,)
    return shapes




# ----------------------------------------------------------------------------------------------
# Weights.


def random_wan_state_dict(config: TextEncoderConfig, seed: int = 0, *, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Deterministic, non-degenerate weights in Wan names (tests, the tiny preset): embedding
    N(0, 1), norm scales 1 + N(0, 0.1^2), relative-bias tables N(0, 1) (so the buckets matter),
    projections N(0, 1/fan_in). Drawn on `device` in `dtype` (fp32 on the CPU by default: the
    values the tests know); a benchmark of umt5-xxl's real shapes draws its 5.7B values on the GPU
    in bf16 (seconds instead of minutes of CPU sampling; other values, same shapes)."""
    out: dict[str, Tensor] = {}
    for index, (name, shape) in enumerate(wan_state_dict_shapes(config).items()):
        generator = torch.Generator(device).manual_seed(seed * 100003 + index)
        values = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == WAN_NORM:
            values = values.mul_(0.1).add_(1)
        elif name != WAN_EMBEDDING and not name.endswith("pos_embedding.embedding.weight"):
            values = values.div_(shape[1] ** 0.5)
        out[name] = values
    return out


def read_wan_weights(path: PathLike, config: TextEncoderConfig) -> dict[str, Tensor]:
    """The official encoder file (Wan names), checked against `config`."""
    wan = read_state_dict(path)
    check_shapes(wan_state_dict_shapes(config), wan, f"text encoder weights {path}", "the text encoder config",
                 "give the umt5 encoder file that matches the config (umt5-xxl for Wan2.2)")
    return wan


def read_hf_weights(path: PathLike, config: TextEncoderConfig) -> dict[str, Tensor]:
    """Weights of a HF folder (safetensors shards) or file (.safetensors / .bin), in Wan names.
    A full encoder-decoder checkpoint is accepted: its decoder and LM head are dropped. When only
    one of the two tied embedding names is stored (save_pretrained dedups), it fills both."""
    tensors = {name: t for name, t in read_state_dict(path).items()
               if not name.startswith(("decoder.", "lm_head."))}
    embedding = next((tensors[name] for name in reversed(HF_EMBEDDINGS) if name in tensors), None)
    if embedding is not None:
        for name in HF_EMBEDDINGS:
            tensors[name] = embedding
    check_shapes(_hf_shapes(config), tensors, f"text encoder weights {path}", "the text encoder config",
                 "the weights do not belong to the config.json beside them: download the folder again")
    return hf_to_wan_keys(tensors)


def _hf_shapes(config: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    shapes = wan_state_dict_shapes(config)
    hf = wan_to_hf_keys({name: torch.empty(shape, device="meta") for name, shape in shapes.items()})
    return {name: tuple(t.shape) for name, t in hf.items()}


def build_umt5(config: TextEncoderConfig, wan_state_dict: Mapping[str, Tensor]) -> UMT5Encoder:
    """A `UMT5Encoder` in eval mode holding `wan_state_dict`'s tensors (Wan names, no copy): built
    on `meta`, loaded with `assign=True`."""
    with torch.device("meta"):
        model = UMT5Encoder(config)
    model.load_state_dict(dict(wan_state_dict), strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Text cleaning and tokenizers.

try:  # the official cleaning starts with ftfy (it maps e.g. fullwidth "，" to ","): parity needs it
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

# The official `regex` \s: Unicode White_Space. Python's \s also matches U+001C..U+001F.
_WHITESPACE_RUN = re.compile(r"[^\S\x1c-\x1f]+")
_warned_no_ftfy = False


def clean_text(text: str) -> str:
    """The official "whitespace" cleaning: ftfy fix, HTML-unescape twice, strip, collapse every
    whitespace run to one space. No lower-casing."""
    global _warned_no_ftfy
    if ftfy is not None:
        text = ftfy.fix_text(text)
    elif not _warned_no_ftfy:
        _warned_no_ftfy = True
        log.warning("ftfy is not installed: prompts are not ftfy-fixed, so text with fullwidth "
                    "punctuation, curly quotes or mojibake encodes differently from the official "
                    "code (pip install ftfy)")
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


class Tokenizer(Protocol):
    """Texts -> (ids [N, L] int64, attention mask [N, L] int64): eos appended, right-padded with
    0 to exactly L = text_len, truncated to L keeping the eos last."""

    text_len: int
    vocab_size: int  # ids it can emit are < vocab_size

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]: ...


class ByteTokenizer:
    """Vocabulary-free tokenizer of the tiny preset: UTF-8 bytes + 3 (0 pad, 1 eos, 2 unk)."""

    offset = UNK_ID + 1
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, text_len: int = 512) -> None:
        _require(text_len > 1, f"text_len must be > 1 to hold a token and the eos (got {text_len})")
        self.text_len = text_len

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids = torch.full((len(texts), self.text_len), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            # Like HF truncation with add_special_tokens: cut the text, then append the eos.
            tokens = [b + self.offset for b in text.encode("utf-8")][: self.text_len - 1] + [EOS_ID]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, (ids != PAD_ID).long()


class HFTokenizer:
    """A transformers tokenizer folder (google/umt5-xxl layout) read offline, called like the
    official wrapper: max_length padding, truncation, special tokens (appends </s>)."""

    def __init__(self, folder: PathLike, text_len: int = 512) -> None:
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.text_len = text_len
        if not self.folder.is_dir():
            raise UserError(f"tokenizer folder {self.folder} not found: give the google/umt5-xxl "
                            f"folder of the model download")
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError, ImportError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise UserError(f"cannot load the tokenizer in {self.folder} ({first_line(err)}): it "
                            f"needs tokenizer.json and tokenizer_config.json (google/umt5-xxl "
                            f"layout); download the folder again") from err
        self._tokenizer.padding_side = "right"  # the zeroing after the prompt assumes right padding
        self._tokenizer.truncation_side = "right"
        self.vocab_size = len(self._tokenizer)

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        batch = self._tokenizer(list(texts), padding="max_length", truncation=True,
                                max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        return batch["input_ids"].long(), batch["attention_mask"].long()


# ----------------------------------------------------------------------------------------------
# Finding the files.


@dataclass(frozen=True)
class TextEncoderFiles:
    """Where a model folder keeps the encoder: `weights` is the official .pth (layout "wan") or
    the HF weights folder/file (layout "hf", with `config` its config.json)."""

    layout: Literal["wan", "hf"]
    weights: Path
    tokenizer: Path
    config: Path | None = None


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _hf_weights(folder: Path) -> Path | None:
    """The folder itself when it holds safetensors (one file or shards), else the .bin file."""
    if any(folder.glob(HF_WEIGHT_PATTERNS[0])):
        return folder
    bin_file = folder / HF_WEIGHT_PATTERNS[1]
    return bin_file if bin_file.is_file() else None


def find_text_encoder(model_dir: PathLike) -> TextEncoderFiles:
    """The encoder files of a model folder, looked for in this order:
    the official Wan2.2-TI2V-5B layout (`models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`),
    the same one level down in `Wan2.2-TI2V-5B/`, a HF folder (`config.json` + weights +
    tokenizer files), a diffusers folder (`text_encoder/` + `tokenizer/`)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UserError(f"model folder {root} not found: check the path "
                        f"(`longlive download` fetches the released weights)")
    for wan_dir in (root, root / WAN_MODEL_DIR):
        weights = wan_dir / WAN_WEIGHTS_NAME
        if weights.is_file():
            tokenizer = wan_dir / WAN_TOKENIZER_DIR
            if not tokenizer.is_dir():
                raise UserError(f"{weights} has no tokenizer folder beside it ({tokenizer} is "
                                f"missing): download the google/umt5-xxl folder of Wan2.2-TI2V-5B")
            return TextEncoderFiles("wan", weights, tokenizer)
    for hf_dir, tokenizer in ((root, root), (root / "text_encoder", root / "tokenizer")):
        config = hf_dir / "config.json"
        if not config.is_file():
            continue
        weights = _hf_weights(hf_dir)
        if weights is None:
            raise UserError(f"{hf_dir} has a config.json but no weights (*.safetensors or "
                            f"pytorch_model.bin): download the folder again")
        if not _has_tokenizer(tokenizer):
            raise UserError(f"{hf_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}) in "
                            f"{tokenizer}: add the google/umt5-xxl tokenizer files")
        return TextEncoderFiles("hf", weights, tokenizer, config)
    raise UserError(f"no text encoder in {root}: looked for {WAN_WEIGHTS_NAME} + {WAN_TOKENIZER_DIR}/ "
                    f"(also under {WAN_MODEL_DIR}/), a HF config.json + weights, and text_encoder/ + "
                    f"tokenizer/; download Wan2.2-TI2V-5B or give the right folder")


def read_hf_config(path: PathLike, text_len: int = 512) -> TextEncoderConfig:
    """Our config of a HF `config.json`."""
    path = Path(path)
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({first_line(err)}): give a valid config.json") from err
    if not isinstance(hf_config, dict):
        raise UserError(f"cannot read {path} (not a JSON object): give a valid config.json")
    return TextEncoderConfig.from_hf(hf_config, text_len=text_len, source=str(path))


# ----------------------------------------------------------------------------------------------
# The encoder.


class TextEncoder:
    """Prompts -> context `[N, text_len, d_model]` (the DiT's `prompt_embeds`).

    `device` computes, in `dtype` (default bf16 on CUDA, fp32 on CPU); results come back on
    `device`. With `keep_on_device=False` (default) the weights live in host memory and are moved
    to `device` only while new prompts are encoded; `keep_on_device=True` keeps them there until
    `offload()`. Embeddings are cached per distinct cleaned prompt (up to `max_cached_prompts`,
    least recently used dropped first; 0 disables the cache); new prompts are encoded in batches of
    at most `batch_size`.
    """

    def __init__(self, model: UMT5Encoder, tokenizer: Tokenizer, config: TextEncoderConfig, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
                 keep_on_device: bool = False, batch_size: int = 16,
                 max_cached_prompts: int = 1024) -> None:
        _require(batch_size > 0, f"batch_size must be a positive integer (got {batch_size})")
        _require(max_cached_prompts >= 0, f"max_cached_prompts must be >= 0 (got {max_cached_prompts})")
        if tokenizer.text_len != config.text_len:
            raise ValueError(f"the tokenizer pads to {tokenizer.text_len} slots but config.text_len "
                             f"is {config.text_len}: build both with one text_len")
        if tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"the tokenizer emits ids up to {tokenizer.vocab_size - 1} but the encoder "
                            f"has {config.vocab_size} embeddings: pair the weights with their tokenizer")
        self.config = config
        self.tokenizer = tokenizer
        self.device = resolve_device(str(device))  # "cuda" -> "cuda:N": compares equal to p.device
        self.dtype = resolve_dtype(dtype, self.device)
        self.keep_on_device = keep_on_device
        self.batch_size = batch_size
        self.max_cached_prompts = max_cached_prompts
        self.model = model.to(device="cpu", dtype=self.dtype).eval()
        # The host copies `offload` puts back: no device->host copy, and file-backed (mmap)
        # tensors stay file-backed.
        self._host = {name: t.data for name, t in self._tensors()}
        self._cache: OrderedDict[str, Tensor] = OrderedDict()  # cleaned prompt -> [tokens, D]
        if keep_on_device:
            self._to_device()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_wan_checkpoint(cls, weights: PathLike, tokenizer: PathLike | Tokenizer, *,
                            config: TextEncoderConfig | None = None, **options: Any) -> TextEncoder:
        """The official `models_t5_umt5-xxl-enc-bf16.pth` (config default umt5-xxl) with a
        tokenizer folder (or object). `options`: see the class."""
        config = config or TextEncoderConfig.preset("umt5-xxl")
        model = build_umt5(config, read_wan_weights(weights, config))
        return cls(model, _tokenizer(tokenizer, config), config, **options)

    @classmethod
    def from_hf_folder(cls, folder: PathLike, tokenizer: PathLike | Tokenizer | None = None, *,
                       text_len: int = 512, **options: Any) -> TextEncoder:
        """A transformers folder (config.json + safetensors or pytorch_model.bin); the tokenizer
        defaults to the same folder."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} has no config.json: give a Hugging Face UMT5 encoder folder")
        config = read_hf_config(folder / "config.json", text_len)
        weights = _hf_weights(folder)
        if weights is None:
            raise UserError(f"{folder} has no weights (*.safetensors or pytorch_model.bin): "
                            f"download the folder again")
        model = build_umt5(config, read_hf_weights(weights, config))
        return cls(model, _tokenizer(folder if tokenizer is None else tokenizer, config), config,
                   **options)

    @classmethod
    def from_model_dir(cls, model_dir: PathLike, *, config: TextEncoderConfig | None = None,
                       **options: Any) -> TextEncoder:
        """Whatever `find_text_encoder` finds in `model_dir` (`config` applies to the Wan layout)."""
        files = find_text_encoder(model_dir)
        if files.layout == "wan":
            return cls.from_wan_checkpoint(files.weights, files.tokenizer, config=config, **options)
        text_len = config.text_len if config is not None else 512
        hf_dir = files.config.parent if files.config is not None else files.weights
        return cls.from_hf_folder(hf_dir, files.tokenizer, text_len=text_len, **options)

    @classmethod
    def random(cls, config: TextEncoderConfig, seed: int = 0, *, init_device: torch.device | str = "cpu",
               init_dtype: torch.dtype = torch.float32, **options: Any) -> TextEncoder:
        """Seeded random weights of `config`'s shapes with the ByteTokenizer; nothing is read
        (tests, benchmarks of the real encoder's cost). `init_device`/`init_dtype`: where and in
        what the values are drawn (see `random_wan_state_dict`); the weights then live as `options`
        say, in host memory by default."""
        state = random_wan_state_dict(config, seed, device=init_device, dtype=init_dtype)
        model = build_umt5(config, state)
        return cls(model, ByteTokenizer(config.text_len), config, **options)

    @classmethod
    def tiny(cls, seed: int = 0, **options: Any) -> TextEncoder:
        """The tiny preset: seeded random weights and the ByteTokenizer; nothing is read."""
        return cls.random(TextEncoderConfig.preset("tiny"), seed, **options)

    # -- placement ---------------------------------------------------------------------------

    def _tensors(self) -> list[tuple[str, Tensor]]:
        """Parameters and buffers."""
        return [*self.model.named_parameters(), *self.model.named_buffers()]

    @property
    def host_pinned(self) -> bool:
        return all(t.is_pinned() for t in self._host.values())

    def pin_host_memory(self) -> None:
        """Page-lock the host copies (CUDA, weights not kept on the device; a no-op otherwise or when
        done), so each visit (umt5-xxl: 11.4 GB per new prompt) is an asynchronous DMA copy on the
        encoding stream instead of a staged copy from pageable memory. Worth its one-off copy only
        when prompts keep coming (live switches; docs/benchmarks/switch_latency.py times both)."""
        if self.device.type != "cuda" or self.keep_on_device or self.host_pinned:
            return
        for name, tensor in self._tensors():
            tensor.data = self._host[name] = self._host[name].pin_memory()

    def _to_device(self) -> None:
        # From page-locked memory the copies are queued on the current (side) stream, which the
        # encoder's kernels follow; the host copies are never written, so nothing can race them.
        for _, tensor in self._tensors():
            tensor.data = tensor.data.to(self.device, non_blocking=tensor.data.is_pinned())

    def offload(self) -> None:
        """Put the weights back in host memory (frees their device memory)."""
        for name, tensor in self._tensors():
            tensor.data = self._host[name]

    @property
    def on_device(self) -> bool:
        return self.model.token_embedding.weight.device == self.device

    # -- encoding ----------------------------------------------------------------------------

    def clear_cache(self) -> None:
        self._cache.clear()

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Context `[N, text_len, d_model]` on `device` in `dtype`, rows in prompt order; rows at
        and beyond each prompt's token count (its eos included) are exactly 0."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        texts = [clean_text(p) for p in prompts]
        rows: dict[str, Tensor] = {}  # this call's embeddings, safe from cache eviction
        for text in texts:
            if text in self._cache:
                self._cache.move_to_end(text)
                rows[text] = self._cache[text]
        new = [text for text in dict.fromkeys(texts) if text not in rows]
        if new:
            for text, embedding in zip(new, self._encode_new(new), strict=True):
                rows[text] = embedding
                self._remember(text, embedding)
        out = torch.zeros(len(texts), self.config.text_len, self.config.d_model,
                          dtype=self.dtype, device=self.device)
        for i, text in enumerate(texts):
            out[i, : rows[text].shape[0]] = rows[text]
        return out

    def _remember(self, text: str, embedding: Tensor) -> None:
        if self.max_cached_prompts == 0:
            return
        self._cache[text] = embedding
        while len(self._cache) > self.max_cached_prompts:
            self._cache.popitem(last=False)

    def _encode_new(self, texts: list[str]) -> list[Tensor]:
        """The unpadded `[tokens_i, D]` embeddings of `texts`, weights visiting `device`."""
        self._to_device()
        try:
            out: list[Tensor] = []
            for start in range(0, len(texts), self.batch_size):
                out += self._run(texts[start:start + self.batch_size])
            return out
        finally:
            if not self.keep_on_device:
                self.offload()

    @torch.inference_mode()
    def _run(self, texts: list[str]) -> list[Tensor]:
        ids, mask = self.tokenizer(texts)
        assert ids.shape == mask.shape == (len(texts), self.config.text_len), ids.shape
        full = [text[:40] for text, row in zip(texts, mask, strict=True) if row[-1] != 0]
        if full:  # longer prompts were cut to fit (the official truncates silently)
            log.info("prompts filling all %d text slots: %s", self.config.text_len, first_names(full))
        hidden = self.model(ids.to(self.device), mask.to(self.device))
        lengths = mask.sum(dim=1).tolist()
        # Clone: a view would keep the whole padded batch alive in the cache.
        return [hidden[i, :length].clone() for i, length in enumerate(lengths)]


def _tokenizer(tokenizer: PathLike | Tokenizer, config: TextEncoderConfig) -> Tokenizer:
    if isinstance(tokenizer, (str, os.PathLike)):
        return HFTokenizer(tokenizer, config.text_len)
    return tokenizer
