"""Checkpoint files: read, check, load, merge LoRA, save.

Formats (reference-model.md §7):
  * generator `.pt` pickles in the official layouts `{"generator": ..., "generator_ema": ...}`,
    `{"model": ...}` or a bare state dict, with `model.`-prefixed keys (the official wrapper
    holds the DiT as `model`) and, in training checkpoints, FSDP / checkpoint / compile wrapper
    tokens inside the keys;
  * `.safetensors` files (one file, or a folder of shards) with bare or `model.` keys;
  * LoRA files `{"generator_lora": {...}, "critic_lora": {...}, "step": n}` or a bare PEFT dict
    with keys `base_model.model.blocks.{i}.{linear}.lora_{A,B}.weight`.

Our `CausalWanDiT` uses the official bare names, so `normalize_keys` / `to_official_keys` are
the only name mapping. Pickles are read with `weights_only=True` (no code runs) and `mmap=True`;
models are built on `meta` and loaded with `assign=True`, so no weights are allocated twice.
Every bad file is a one-line `UserError` naming the file, the problem and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from core.dit import CausalWanDiT
from core.errors import UserError, discard_partial, first_line, first_names, os_error_of, plural, write_failed

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Tokens that FSDP, activation checkpointing and torch.compile insert into parameter names.
WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Leading prefixes of wrapped models: the official wrapper (`model.`) and DDP (`module.`).
OUTER_PREFIXES = ("model.", "module.")
OFFICIAL_PREFIX = "model."
LORA_PREFIX = "base_model.model."  # PEFT wraps the bare DiT
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<target>.+)\.lora_(?P<part>[AB])\.weight$")


# ----------------------------------------------------------------------------------------------
# Names: the one adapter between official and bare parameter names.


def bare_name(key: str) -> str:
    """An official / wrapped parameter name -> our bare name: the wrapper tokens are stripped
    wherever they occur, then leading `model.` / `module.` prefixes (no bare name starts with
    either, so stripping is unambiguous)."""
    for token in WRAPPER_TOKENS:
        key = key.replace(token, "")
    while key.startswith(OUTER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _by_bare_name(entries: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entries.items():
        name = bare_name(str(key))
        if name in out:
            raise UserError(f"two checkpoint entries map to the parameter {name!r} (one of them "
                            f"is {key!r}): the file mixes wrapped and bare names; save it again")
        out[name] = value
    return out


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Official / wrapped names -> our bare names (`bare_name`); non-tensor entries are dropped."""
    return _by_bare_name({key: value for key, value in state_dict.items() if isinstance(value, Tensor)})


def to_official_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Bare names -> the official wrapper names (`model.` + bare)."""
    return {OFFICIAL_PREFIX + key: value for key, value in state_dict.items()}


def block_linear_names(num_layers: int) -> list[str]:
    """The official LoRA / quantization targets: every nn.Linear inside the blocks (10 per
    block, 300 for the 5B)."""
    return [f"blocks.{i}.{name}" for i in range(num_layers) for name in BLOCK_LINEARS]




# ----------------------------------------------------------------------------------------------
# Reading files.

_CORRUPT_FIX = "the file is truncated or corrupt: download or save it again"


_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (non-zip) format opens with this number pickled at protocol 2.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
_SCAN_OPCODES = 1_000_000  # opcodes read when naming a plain pickle's first refused global


def _pickle_format(path: Path) -> str:
    """"zip" (torch.save), "legacy" (torch.save before 1.6), "plain" (another pickle, e.g.
    `pickle.dump`) or "unknown", from the first bytes."""
    with path.open("rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head == _LEGACY_MAGIC:
        return "legacy"
    return "plain" if head[:1] == pickle.PROTO else "unknown"


_FRAMING_OPS = ("PROTO", "FRAME", "STOP", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT")


def _first_pickle_ops(path: Path) -> tuple[list[tuple[str, Any, bool]], bool]:
    """(opcode name, argument, pushes a value) of the first pickle in `path`, read with
    `pickletools` (opcodes only: nothing runs; byte strings are dropped), and whether that pickle
    is whole (a damaged one gives what was read)."""
    import pickletools

    ops: list[tuple[str, Any, bool]] = []
    with path.open("rb") as f:
        try:
            for op, arg, _ in pickletools.genops(f):
                ops.append((op.name, None if isinstance(arg, bytes | bytearray) else arg, bool(op.stack_after)))
                if len(ops) >= _SCAN_OPCODES:
                    return ops, True
        except ValueError:
            return ops, False
    return ops, bool(ops) and ops[-1][0] == "STOP"


def _called_globals(ops: list[tuple[str, Any, bool]]) -> list[str]:
    """"module.name" of every class or function a pickle's opcodes would call, in order."""
    names: list[str] = []
    stack: list[Any] = []  # pushed values, strings only (None for the rest): never popped, which
    memo: dict[int, Any] = {}  # is enough to read the two names just before a STACK_GLOBAL
    for name, arg, pushes in ops:
        if name in ("GLOBAL", "INST"):
            names.append(".".join(str(arg).split(" ", 1)))
        elif name == "STACK_GLOBAL" and len(stack) >= 2:
            names.append(f"{stack[-2]}.{stack[-1]}")
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1] if stack else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(int(arg)))
        elif pushes:
            stack.append(arg if isinstance(arg, str) else None)
    return list(dict.fromkeys(names))


def _check_plain_pickle(path: Path) -> None:
    """A pickle that is not a torch.save file: refused with the globals it would call, unless it
    is the legacy torch.save header written at a newer pickle protocol (torch reads that)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    ops, whole = _first_pickle_ops(path)
    refused = [name for name in _called_globals(ops) if name not in _get_allowed_globals()]
    refused.sort(key=lambda name: name.startswith("torch."))  # foreign code first, torch's own helpers last
    if refused:
        raise _code_refused(path, first_names(refused))
    if not whole:
        raise UserError(f"cannot read {path} (a damaged pickle): {_CORRUPT_FIX}")
    if [(name, arg) for name, arg, _ in ops if name not in _FRAMING_OPS] != [("LONG1", _LEGACY_MAGIC_NUMBER)]:
        raise UserError(f"{path} is a plain Python pickle, not a torch.save checkpoint: save the weights "
                        f"with torch.save or as .safetensors")


def _code_refused(path: Path, what: str) -> UserError:
    return UserError(f"{path} holds Python objects other than tensors ({what}); we refuse to unpickle code: "
                     f"convert it to .safetensors (or a plain tensor dict) on a trusted machine")


def _load_pickle(path: Path) -> Any:
    """`torch.load` that never runs code from the file. Pickles that are not torch.save files are
    inspected (opcodes only) and refused before torch sees them."""
    kind = _pickle_format(path)
    if kind == "plain":
        _check_plain_pickle(path)
    elif kind == "unknown":
        raise UserError(f"cannot read {path} (not a torch.save or safetensors file): {_CORRUPT_FIX}")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols above 2 in legacy files; the result is checked below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # mmap needs the zip format (torch >= 1.6 default); legacy pickles are read without it.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as err:
        # weights_only names the refused class or function as a "GLOBAL"; its own text advises
        # loading unsafely, so only our words are shown.
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if refused or "GLOBAL" in str(err):
            raise _code_refused(path, refused.group(1) if refused else "a Python object") from None
        inner = err.__context__ if isinstance(err.__context__, pickle.UnpicklingError) else None
        detail = first_line(inner) if inner is not None else "not a readable pickle"
        if detail.startswith("Unsupported operand"):  # a newer pickle protocol in a legacy file
            raise UserError(f"cannot read {path} safely ({detail}: a pickle feature the weights-only loader "
                            f"does not read): save it again with torch.save's defaults or as .safetensors") from None
        raise UserError(f"cannot read {path} ({detail}): {_CORRUPT_FIX}") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as err:
        # Torch reports truncated zips as OSError/RuntimeError, bad legacy magic as KeyError.
        raise UserError(f"cannot read {path} ({first_line(err)}): {_CORRUPT_FIX}") from err


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, OSError) as err:
        raise UserError(f"cannot read {path} ({first_line(err)}): {_CORRUPT_FIX}") from err


def _load_shards(folder: Path) -> dict[str, Tensor]:
    """A folder of `*.safetensors` shards (the Wan base weights) as one state dict."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{folder} is a folder without .safetensors files: give a checkpoint "
                        f"file or a folder of safetensors shards")
    merged: dict[str, Tensor] = {}
    for shard in shards:
        tensors = _load_safetensors(shard)
        repeated = sorted(merged.keys() & tensors.keys())
        if repeated:
            raise UserError(f"{shard} repeats tensors of another shard in {folder} "
                            f"({first_names(repeated)}): remove the stray file")
        merged.update(tensors)
    return merged


def _load_file(path: PathLike) -> Any:
    """The raw object stored in a checkpoint file or shard folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found: check the path "
                        f"(`longlive download` fetches the released weights)")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied: fix its permissions")
    if path.is_dir():
        return _load_shards(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_pickle(path)


def _tensor_dict(obj: Any, path: PathLike, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} does not hold a {what} (found {type(obj).__name__}, expected a "
                        f"dict of tensors): check the file")
    return obj


def _generator_entry(checkpoint: Mapping[str, Any], path: PathLike, use_ema: bool) -> Any:
    """Pick the generator weights from an outer layout (reference §7.2 priority)."""
    if "generator" in checkpoint or "generator_ema" in checkpoint:
        if use_ema and "generator_ema" in checkpoint:
            return checkpoint["generator_ema"]
        if "generator" not in checkpoint:
            raise UserError(f"{path} holds only EMA weights (generator_ema): load it with "
                            f"--use-ema")
        if use_ema:
            log.warning("%s has no generator_ema; loading the generator weights", path)
        return checkpoint["generator"]
    if isinstance(checkpoint.get("model"), Mapping):
        return checkpoint["model"]
    if "generator_lora" in checkpoint:
        raise UserError(f"{path} is a LoRA-only checkpoint (generator_lora): pass it as the LoRA "
                        f"(--lora) and give the base generator weights as the checkpoint")
    return checkpoint


def file_sha256(path: PathLike) -> str:
    """sha256 of a file; of a shard folder, of its *.safetensors files concatenated in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    for part in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        with part.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Name -> shape and the string metadata of a safetensors file, from its header alone."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
            return shapes, dict(f.metadata() or {})
    except (safetensors.SafetensorError, OSError) as err:
        raise UserError(f"cannot read {path} ({first_line(err)}): {_CORRUPT_FIX}") from err


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return _safetensors_header(path)[0]


def read_shapes(path: PathLike, *, use_ema: bool = False) -> dict[str, tuple[int, ...]]:
    """Bare names -> shapes of the generator weights in a checkpoint, without reading weight data:
    the header of safetensors files, the memory-mapped pickle of a zip `.pt` (a legacy pickle is
    read whole). The same one-line errors as `read_state_dict`."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        shapes = _safetensors_shapes(path)
    elif path.is_dir() and any(path.glob("*.safetensors")):
        shapes = {}
        for shard in sorted(path.glob("*.safetensors")):
            shapes.update(_safetensors_shapes(shard))
    else:
        return {name: tuple(t.shape) for name, t in read_state_dict(path, use_ema=use_ema).items()}
    return _by_bare_name(shapes)


def read_state_dict(path: PathLike, *, use_ema: bool = False) -> dict[str, Tensor]:
    """The generator's state dict in a checkpoint, with bare names (tensors on CPU)."""
    checkpoint = _tensor_dict(_load_file(path), path, "state dict")
    state_dict = _tensor_dict(_generator_entry(checkpoint, path, use_ema), path, "state dict")
    return normalize_keys(state_dict)


# ----------------------------------------------------------------------------------------------
# Loading into a model.


def check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, Tensor | tuple[int, ...]],
                 source: str, target: str, fix: str) -> None:
    """One-line UserError unless `found` (tensors, or their shapes) has exactly the expected
    names and shapes."""
    shapes = {name: value if isinstance(value, tuple) else tuple(value.shape) for name, value in found.items()}
    missing = [name for name in expected if name not in shapes]
    unexpected = [name for name in shapes if name not in expected]
    wrong = [f"{name} {shapes[name]} != {shape}"
             for name, shape in expected.items() if name in shapes and shapes[name] != shape]
    problems = [f"{len(names)} {kind} ({first_names(names)})"
                for kind, names in (("missing", missing), ("unexpected", unexpected),
                                    ("with the wrong shape", wrong)) if names]
    if problems:
        raise UserError(f"{source} does not match {target}: {', '.join(problems)}: {fix}")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor | tuple[int, ...]], source: str) -> None:
    """Raise a UserError unless names and shapes (of tensors, or the shapes themselves, e.g. from
    `read_shapes`) equal the model's exactly."""
    if any(name.endswith("quantized_weight_values") for name in state_dict):
        raise UserError(f"{source} is a packed NVFP4 checkpoint: load it into the NVFP4 model "
                        f"(quant/), not as a plain generator")
    check_shapes({name: tuple(t.shape) for name, t in model.state_dict().items()}, state_dict,
                 f"checkpoint {source}", "the model", "check --preset / the file")


def load_generator(model: nn.Module, path: PathLike, *, use_ema: bool = False) -> nn.Module:
    """Load a generator checkpoint strictly into `model` (which may live on `meta`)."""
    state_dict = read_state_dict(path, use_ema=use_ema)
    check_state_dict(model, state_dict, str(path))
    # A meta model takes the file's tensors as they are (no copy); a materialised model keeps
    # its device and dtype and copies the values in.
    assign = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model


# ----------------------------------------------------------------------------------------------
# LoRA.


def _lora_key(key: str) -> str:
    """PEFT key with the `base_model.model.` prefix, without wrapper tokens or adapter name."""
    for token in WRAPPER_TOKENS:
        key = key.replace(token, "")
    key = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key)
    return key if key.startswith(LORA_PREFIX) else LORA_PREFIX + key


def _lora_entries(checkpoint: Mapping[str, Any], path: PathLike) -> dict[str, Any]:
    """The generator LoRA entries of a file's outer dict (official `generator_lora` layout or a
    bare PEFT dict), with PEFT keys; values are tensors, or shapes when read from a header."""
    if "generator_lora" in checkpoint:
        checkpoint = _tensor_dict(checkpoint["generator_lora"], path, "LoRA state dict")
    elif any(key in checkpoint for key in ("generator", "generator_ema", "model")):
        raise UserError(f"{path} is a generator checkpoint, not a LoRA: pass it as the "
                        f"checkpoint, or give the LoRA file (generator_lora)")
    lora = {_lora_key(str(key)): value for key, value in checkpoint.items()
            if isinstance(value, Tensor | tuple)}
    if not lora:
        raise UserError(f"{path} holds no LoRA tensors: give the LoRA file (generator_lora)")
    return lora


def read_lora_state_dict(path: PathLike) -> dict[str, Tensor]:
    """The generator LoRA of a file (official `generator_lora` layout or a bare PEFT dict)."""
    return _lora_entries(_tensor_dict(_load_file(path), path, "LoRA state dict"), path)


def read_lora_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """PEFT key -> shape of a LoRA file's generator LoRA, without reading weight data (the header
    of a safetensors file, the memory-mapped pickle of a zip `.pt`); the errors of
    `read_lora_state_dict`."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        return _lora_entries(_safetensors_shapes(path), path)
    return {key: tuple(value.shape) for key, value in read_lora_state_dict(path).items()}


def read_lora_sampling(path: PathLike) -> dict[str, float]:
    """The sampling a LoRA was distilled for, where its file records it (`longlive distill
    --export-lora` writes `sampling_steps` and, since 2026-12-06, `timestep_shift`; official files
    record nothing): {"sampling_steps": int, "timestep_shift": float}, either key absent when not
    recorded. Read once per file version: a run asks twice (its sampling, its note), and a .pt is
    read whole."""
    path = Path(path)
    stat = path.stat()
    return dict(_cached_lora_sampling(str(path.resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _cached_lora_sampling(resolved: str, size: int, mtime_ns: int) -> tuple[tuple[str, float], ...]:
    path = Path(resolved)
    if path.suffix == ".safetensors":
        stored = _safetensors_header(path)[1]
    else:
        stored = _load_file(path)
        stored = stored if isinstance(stored, Mapping) else {}
    found = []
    for key, kind in (("sampling_steps", int), ("timestep_shift", float)):
        try:
            value = kind(stored[key]) if stored.get(key) is not None else None
        except (TypeError, ValueError):
            value = None
        if value is not None and value > 0:
            found.append((key, value))
    return tuple(found)


def check_lora(model: nn.Module, lora: Mapping[str, Tensor | tuple[int, ...]], source: str) -> int:
    """Check a LoRA (tensors, or their shapes from `read_lora_shapes`) against the block linears
    of `model` (which may live on `meta`): known keys, complete A/B pairs, one rank, the layers'
    shapes. Returns the rank; one-line UserErrors."""
    allowed = set(block_linear_names(len(model.blocks)))
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in lora.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise UserError(f"LoRA {source} has an unknown key {key!r} (expected "
                            f"{LORA_PREFIX}blocks.N.LINEAR.lora_A/B.weight): check the file")
        if match["target"] not in allowed:
            raise UserError(f"LoRA {source} targets {match['target']!r}, which is not a block "
                            f"linear of this model: check --preset / the file")
        parts.setdefault(match["target"], {})[match["part"]] = value if isinstance(value, tuple) else tuple(value.shape)
    incomplete = [target for target, ab in parts.items() if len(ab) != 2]
    if incomplete:
        raise UserError(f"LoRA {source} lacks lora_A or lora_B for {plural(len(incomplete), 'layer')} "
                        f"({first_names(incomplete)}): the file is incomplete")
    ranks = {ab["A"][0] if ab["A"] else 0 for ab in parts.values()}
    if len(ranks) != 1:
        raise UserError(f"LoRA {source} mixes ranks {sorted(ranks)}: all layers need one rank; "
                        f"check the file")
    rank = ranks.pop()
    for target, ab in parts.items():
        linear = model.get_submodule(target)
        if ab["A"] != (rank, linear.in_features) or ab["B"] != (linear.out_features, rank):
            raise UserError(f"LoRA {source} has the wrong shapes for {target} (A "
                            f"{ab['A']}, B {ab['B']}; the layer is "
                            f"{linear.in_features} -> {linear.out_features}): check --preset")
    return rank


def merge_lora(model: CausalWanDiT, lora_state_dict: Mapping[str, Tensor],
               alpha: float | None = None, *, source: str = "state dict") -> CausalWanDiT:
    """Fold a LoRA into the block linears: W' = W + (alpha / rank) B @ A, computed in fp32 and
    rounded to each weight's dtype once; the arithmetic of PEFT's `merge_and_unload(safe_merge=True)`
    (the official merge) bit for bit (tests/test_checkpoint.py), without importing PEFT (~5 s of
    start-up with transformers). Returns `model`, its other tensors and flags untouched."""
    lora = {_lora_key(key): value for key, value in lora_state_dict.items()}
    rank = check_lora(model, lora, source)
    if alpha is None:
        alpha = rank  # the official adapters use alpha = rank (scale 1)
    assert not any(p.is_meta for p in model.parameters()), "merge_lora needs materialised weights"
    scale = alpha / rank
    for target in sorted({_LORA_KEY.match(key)["target"] for key in lora}):
        weight = model.get_submodule(target).weight
        a = lora[f"{LORA_PREFIX}{target}.lora_A.weight"].to(weight.device, torch.float32)
        b = lora[f"{LORA_PREFIX}{target}.lora_B.weight"].to(weight.device, torch.float32)
        with torch.no_grad():
            merged = weight.float() + (b @ a) * scale
            if not torch.isfinite(merged).all():
                raise UserError(f"LoRA {source} gives non-finite weights for {target}: the file is "
                                f"broken; check it or train it again")
            weight.copy_(merged)
    return model


# ----------------------------------------------------------------------------------------------
# Saving.


def _temp_name(path: Path) -> str:
    return str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"))


def check_writable(path: Path, flag: str, *, create_folders: bool = False) -> None:
    """Create and remove the temp file `atomic_write` would use beside `path`: a one-line
    UserError, before any heavy work, if the folder is missing or not writable. With
    `create_folders` a missing folder is fine (the writer creates it): its nearest existing parent
    is probed instead."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name")
    _probe_folder(path.parent, path.name, f"{flag} {path}", create_folders)


def check_writable_folder(folder: Path, flag: str) -> None:
    """The same probe for a folder that files will be written into (created if missing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file: give a folder")
    _probe_folder(folder, "probe", f"{flag} {folder}", create_folders=True)


def _probe_folder(folder: Path, name: str, what: str, create_folders: bool) -> None:
    if create_folders:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{what}: folder {folder} does not exist: create it or choose another path")
    temp_name = _temp_name(folder / name)
    try:
        os.close(os.open(temp_name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as err:
        raise UserError(f"{what}: cannot write in {folder} ({err.strerror or first_line(err)}): "
                        f"choose a writable location") from None
    os.unlink(temp_name)


def atomic_write(path: Path, write) -> None:
    """Run `write(temp_path)` on a temp file beside `path`, then rename it into place. A failed
    write leaves nothing behind; one the operating system refused (disk full, read-only, file
    too large) is an `OutputError` naming `path` and the cause."""
    path = Path(path)
    temp_name = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never clobber another writer's temp file; mode 0o666 lets the umask decide the
        # final permissions, as for a normally created file (some writers recreate it as 0o600).
        os.close(os.open(temp_name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = os.stat(temp_name).st_mode & 0o777
        write(temp_name)
        os.chmod(temp_name, mode)
        with open(temp_name, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException as err:
        discard_partial(temp_name)
        cause = os_error_of(err) if isinstance(err, Exception) else None
        if cause is not None:
            raise write_failed(path, cause) from err
        raise


def _torch_save(obj: Any, path: str) -> None:
    """`torch.save` through a Python file: a refused write keeps its OSError (errno) in the
    exception chain, where torch's own file writer reports only "unexpected pos"."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_generator(model_or_state_dict: nn.Module | Mapping[str, Tensor], path: PathLike, *,
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Write generator weights atomically.

    `.safetensors`: bare names, metadata as strings (non-strings JSON-encoded).
    Anything else (`.pt`): the official layout `{"generator": {"model." + name: tensor},
    **metadata}`, loadable by the official code and by `read_state_dict`.
    """
    path = Path(path)
    source = model_or_state_dict
    state_dict = source.state_dict() if isinstance(source, nn.Module) else source
    tensors = {name: t.detach().contiguous() for name, t in normalize_keys(state_dict).items()}
    metadata = dict(metadata or {})
    if path.suffix == ".safetensors":
        text = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, temp, text))
    else:
        if "generator" in metadata:
            raise ValueError("metadata may not use the key 'generator' (it holds the weights)")
        payload = {"generator": to_official_keys(tensors), **metadata}
        atomic_write(path, lambda temp: _torch_save(payload, temp))
    return path
