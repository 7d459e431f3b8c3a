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

from core.errors import WRITE_ERRNOS, UserError, first_line, os_error_of, write_failed

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


def present_bytes(planned: list[PlannedFile], local_dir: Path) -> int:
    """Bytes of the planned files already complete in the model folder (a resumed download)."""
    done = 0
    for item in planned:
        path = local_dir / item.repo.folder / item.path
        if item.size is not None and path.is_file() and path.stat().st_size == item.size:
            done += item.size
    return done


def byte_bars(on_bytes: Callable[[int], None]) -> type:
    """A stand-in for tqdm, for `snapshot_download(tqdm_class=...)`: it draws nothing and reports
    the bytes fetched so far (the largest count among its byte bars: the Hub library keeps one
    for bytes received and one for bytes written) to `on_bytes`, from the download threads."""
    counts: dict[int, float] = {}

    class ByteBars:
        def __init__(self, *args, total=None, initial=0, unit="it", **kwargs):
            self.total, self.n, self.unit = total, initial or 0, unit
            self.format_dict = {"rate": None}

        def update(self, n: float | None = 1) -> None:
            self.n += n or 0
            if self.unit == "B":
                counts[id(self)] = self.n
                on_bytes(int(max(counts.values())))

        def refresh(self, *args, **kwargs) -> None:
            """Nothing is drawn."""

        def close(self) -> None:
            """Nothing to release."""

        def set_description(self, *args, **kwargs) -> None:
            """Descriptions are not shown."""

        set_description_str = set_postfix_str = set_description

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.close()

    return ByteBars


class _BytesAcrossRepos:
    """Byte counts of one repository at a time, reported as a running total over all of them."""

    def __init__(self, on_bytes: Callable[[int], None]):
        self.on_bytes, self.finished, self.current = on_bytes, 0, 0

    def report(self, fetched: int) -> None:
        self.current = fetched
        self.on_bytes(self.finished + fetched)

    def next_repo(self) -> None:
        self.finished, self.current = self.finished + self.current, 0


def download(planned: list[PlannedFile], local_dir: Path, revision: str | None,
             endpoint: str | None, fetch: Callable | None = None,
             on_bytes: Callable[[int], None] | None = None) -> None:
    """Fetch the planned files (huggingface_hub resumes partial downloads); `on_bytes(n)` gets the
    bytes fetched so far by this call, over all repositories."""
    from huggingface_hub import snapshot_download

    fetch = fetch or snapshot_download
    total = _BytesAcrossRepos(on_bytes) if on_bytes is not None else None
    for repo in dict.fromkeys(p.repo for p in planned):
        target = local_dir / repo.folder
        bars = {} if total is None else {"tqdm_class": byte_bars(total.report)}
        try:
            fetch(repo.repo_id, revision=revision, local_dir=target, endpoint=endpoint,
                  allow_patterns=list(repo.allow), **bars)
        except Exception as err:
            refused = os_error_of(err)
            if refused is not None and refused.errno in WRITE_ERRNOS:  # disk full, read-only: not the network
                raise write_failed(target, refused) from None
            if _is_network_error(err):
                raise _network_error(err, endpoint, local_dir) from None
            raise
        if total is not None:
            total.next_repo()
