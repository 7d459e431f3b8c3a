"""Model files: what to fetch from the Hugging Face Hub, and where they live on disk.

A model folder (default `~/.cache/longlive/models`, or `--model-dir`) mirrors the official
`wan_models/` layout:

    <model-dir>/LongLive-2.0-5B/model_bf16.pt                 the LongLive generator (merged LoRA)
    <model-dir>/Wan2.2-TI2V-5B/Wan2.2_VAE.pth                 the Wan2.2 VAE
    <model-dir>/Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth  the umt5-xxl text encoder
    <model-dir>/Wan2.2-TI2V-5B/google/umt5-xxl/               its tokenizer

`longlive download` fills it (resumable; only the files above, by allow-list); `generate` reads it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError, first_line

DEFAULT_MODEL_DIR = Path("~/.cache/longlive/models").expanduser()


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    folder: str  # sub-folder of the model folder
    allow: tuple[str, ...]
    purpose: str


REPOS = {
    "generator": HubRepo("Efficient-Large-Model/LongLive-2.0-5B", "LongLive-2.0-5B",
                         ("model_bf16.pt", "README.md"), "LongLive 2.0 generator (bf16, LoRA merged)"),
    "wan": HubRepo("Wan-AI/Wan2.2-TI2V-5B", "Wan2.2-TI2V-5B",
                   ("Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*"),
                   "Wan2.2 VAE, umt5-xxl text encoder and tokenizer"),
}


@dataclass(frozen=True)
class ModelFiles:
    """Paths of the 5B preset's files inside a model folder."""

    root: Path

    @property
    def generator(self) -> Path:
        return self.root / REPOS["generator"].folder / "model_bf16.pt"

    @property
    def vae(self) -> Path:
        return self.root / REPOS["wan"].folder / "Wan2.2_VAE.pth"

    @property
    def text_encoder_dir(self) -> Path:
        return self.root / REPOS["wan"].folder

    def require(self, *paths: Path) -> None:
        missing = [p for p in paths if not p.exists()]
        if not self.root.exists():
            raise UserError(f"model folder {self.root} not found: run `longlive download "
                            f"--local-dir {self.root}` or pass --model-dir")
        if missing:
            shown = ", ".join(str(p.relative_to(self.root)) for p in missing)
            raise UserError(f"model folder {self.root} lacks {shown}: run `longlive download "
                            f"--local-dir {self.root}` (resumes) or copy the files there")


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    return Path(model_dir).expanduser() if model_dir else DEFAULT_MODEL_DIR


@dataclass(frozen=True)
class PlannedFile:
    repo: HubRepo
    path: str
    size: int | None


def _allowed(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def _is_network_error(err: BaseException) -> bool:
    """Connection failures of any HTTP client the Hub library uses (httpx, requests, sockets)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, (OSError, ConnectionError, TimeoutError)) or bool(
        names & {"ConnectError", "NetworkError", "TransportError", "TimeoutException",
                 "ConnectionError", "OfflineModeIsEnabled"})


def _network_error(err: BaseException, endpoint: str | None, local_dir: Path) -> UserError:
    from huggingface_hub import constants

    where = endpoint or constants.ENDPOINT
    detail = first_line(err)
    return UserError(f"cannot reach {where} ({type(err).__name__}: {detail[:120]}): set --endpoint "
                     f"(or HF_ENDPOINT) to a mirror, or copy the files into {local_dir} "
                     f"({', '.join(r.folder for r in REPOS.values())})")


def plan_download(which: list[str], revision: str | None, endpoint: str | None, local_dir: Path,
                  api_factory: Callable | None = None) -> list[PlannedFile]:
    """Ask the Hub which files of each repo match its allow-list, with their sizes."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = (api_factory or HfApi)(endpoint=endpoint)
    planned = []
    for name in which:
        repo = REPOS[name]
        try:
            info = api.model_info(repo.repo_id, revision=revision, files_metadata=True)
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise UserError(f"{repo.repo_id} at revision {revision or 'main'} was not found on the "
                            f"Hub ({type(err).__name__}): check --revision") from None
        except HfHubHTTPError as err:
            raise _network_error(err, endpoint, local_dir) from None
        except Exception as err:  # httpx / requests raise their own connection errors
            if _is_network_error(err):
                raise _network_error(err, endpoint, local_dir) from None
            raise
        files = [PlannedFile(repo, s.rfilename, getattr(s, "size", None))
                 for s in info.siblings if _allowed(s.rfilename, repo.allow)]
        if not files:
            raise UserError(f"{repo.repo_id} has none of the expected files ({', '.join(repo.allow)}) "
                            f"at revision {revision or 'main'}: check --revision")
        planned.extend(files)
    return planned


def download(planned: list[PlannedFile], local_dir: Path, revision: str | None,
             endpoint: str | None, fetch: Callable | None = None) -> None:
    """Fetch the planned files (huggingface_hub resumes partial downloads)."""
    from huggingface_hub import snapshot_download

    fetch = fetch or snapshot_download
    for repo in dict.fromkeys(p.repo for p in planned):
        target = local_dir / repo.folder
        try:
            fetch(repo.repo_id, revision=revision, local_dir=target, endpoint=endpoint,
                  allow_patterns=list(repo.allow))
        except Exception as err:
            if _is_network_error(err):
                raise _network_error(err, endpoint, local_dir) from None
            raise
