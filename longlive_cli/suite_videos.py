"""Which videos of an evaluation folder a run may keep.

`eval-vbench` generates a suite's videos into a folder and, run again, keeps the ones already
there (a stopped run resumes). A video is kept only when it was made exactly as this run would
make it: the folder's `generation.json` records the generation settings (the resolved recipe, the
model files' fingerprints) and each video's own record (seed, prompts, length). Videos made
otherwise (other steps, guidance, LoRA, model, seed, length) are never scored under this run's
name: the run stops with one line before any generation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from core.errors import UserError

STAMP_NAME = "generation.json"
HASHED_BYTES = 256 * 2**20  # files up to this size are fingerprinted by content, larger by size and time


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file up to HASHED_BYTES (a copied file keeps its fingerprint), else its size and
    modification time; a folder by its resolved path."""
    p = Path(path).expanduser()
    if not p.is_file():
        return f"path:{p.resolve()}"
    stat = p.stat()
    if stat.st_size > HASHED_BYTES:
        return f"size:{stat.st_size}:mtime_ns:{stat.st_mtime_ns}"
    from core.checkpoint import file_sha256

    return f"sha256:{file_sha256(p)}"


def jsonable(value: Any) -> Any:
    """Dataclasses, enums, paths and tuples as plain JSON values (for records compared as JSON)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def recipe_settings(recipe) -> dict[str, Any]:
    """A generation recipe as the settings that decide its videos: the device does not, and the
    seed is each video's own (in its record)."""
    settings = jsonable(recipe)
    for key in ("device", "seed"):
        settings.get("runtime", {}).pop(key, None)
    return settings


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _differences(old: Any, new: Any, limit: int = 3) -> str:
    a, b = _flat(old), _flat(new)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    shown = [f"{k}: {a.get(k, '-')} there, {b.get(k, '-')} now" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def claim_folder(folder: Path, settings: dict[str, Any], records: dict[str, Any]) -> None:
    """Check `folder` against this run before anything is generated, then record the run in it.

    `settings`: what every video shares (JSON values); `records`: each planned video's own record
    by file stem. A UserError (one line) when the folder holds videos made otherwise: under other
    settings, with another record, or with no record at all (an older run)."""
    settings, records = jsonable(settings), jsonable(records)
    stamp_path = folder / STAMP_NAME
    present = {p.stem for p in folder.glob("*.mp4")}
    fix = "give another --videos-dir (or --out), or delete those videos to make them again"
    stamp: dict[str, Any] = {"settings": settings, "videos": {}}
    if stamp_path.is_file():
        try:
            stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
            stamp["settings"], stamp["videos"]  # noqa: B018  (the two keys a stamp has)
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{stamp_path} is not a readable record of how its videos were made: {fix}") from None
        if present and stamp["settings"] != settings:
            raise UserError(f"{folder} holds videos made with other settings "
                            f"({_differences(stamp['settings'], settings)}): {fix}")
    elif present:
        raise UserError(f"{folder} holds {len(present)} video(s) with no {STAMP_NAME} saying how they were made: {fix}")
    for name in sorted(present & records.keys()):
        if name not in stamp["videos"]:
            raise UserError(f"{folder / name}.mp4 has no record in {STAMP_NAME}: {fix}")
        if stamp["videos"][name] != records[name]:
            raise UserError(f"{folder / name}.mp4 was made otherwise "
                            f"({_differences(stamp['videos'][name], records[name])}): {fix}")
    from core.checkpoint import atomic_write

    kept = {name: stamp["videos"][name] for name in present if name in stamp["videos"]}
    text = json.dumps({"settings": settings, "videos": {**kept, **records}}, indent=1, sort_keys=True) + "\n"
    atomic_write(stamp_path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
