"""`longlive download`: allow-lists, layout, sizes, and the offline message (no network here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from core import hub
from core.errors import UserError
from longlive_cli.app import main

FILES = {
    "Efficient-Large-Model/LongLive-2.0-5B": [("model_bf16.pt", 10_000_000_000), ("README.md", 900),
                                              ("model_te.pt", 10_000_000_000), ("assets/x.png", 5)],
    "Wan-AI/Wan2.2-TI2V-5B": [("Wan2.2_VAE.pth", 2_818_000_000),
                              ("models_t5_umt5-xxl-enc-bf16.pth", 11_361_000_000),
                              ("google/umt5-xxl/spiece.model", 4_548_313),
                              ("google/umt5-xxl/tokenizer.json", 16_837_417),
                              ("diffusion_pytorch_model-00001-of-00003.safetensors", 9_000_000_000),
                              ("config.json", 250)],
}


class FakeApi:
    calls: list = []

    def __init__(self, endpoint=None):
        self.endpoint = endpoint

    def model_info(self, repo_id, revision=None, files_metadata=False):
        FakeApi.calls.append((repo_id, revision, self.endpoint))
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=n, size=s) for n, s in FILES[repo_id]])


def test_plan_keeps_only_the_allow_listed_files(tmp_path):
    planned = hub.plan_download(["generator", "wan"], "v1", None, tmp_path, api_factory=FakeApi)
    assert [(p.repo.folder, p.path) for p in planned] == [
        ("LongLive-2.0-5B", "model_bf16.pt"), ("LongLive-2.0-5B", "README.md"),
        ("Wan2.2-TI2V-5B", "Wan2.2_VAE.pth"), ("Wan2.2-TI2V-5B", "models_t5_umt5-xxl-enc-bf16.pth"),
        ("Wan2.2-TI2V-5B", "google/umt5-xxl/spiece.model"),
        ("Wan2.2-TI2V-5B", "google/umt5-xxl/tokenizer.json")]
    fetched = []
    hub.download(planned, tmp_path, "v1", "https://mirror", fetch=lambda repo, **kw: fetched.append((repo, kw)))
    assert [(repo, kw["local_dir"], kw["revision"], kw["endpoint"]) for repo, kw in fetched] == [
        ("Efficient-Large-Model/LongLive-2.0-5B", tmp_path / "LongLive-2.0-5B", "v1", "https://mirror"),
        ("Wan-AI/Wan2.2-TI2V-5B", tmp_path / "Wan2.2-TI2V-5B", "v1", "https://mirror")]
    assert fetched[1][1]["allow_patterns"] == list(hub.REPOS["wan"].allow)


def test_model_files_match_the_download_layout(tmp_path):
    files = hub.ModelFiles(tmp_path)
    assert files.generator == tmp_path / "LongLive-2.0-5B" / "model_bf16.pt"
    assert files.vae == tmp_path / "Wan2.2-TI2V-5B" / "Wan2.2_VAE.pth"
    with pytest.raises(UserError, match="lacks LongLive-2.0-5B/model_bf16.pt"):
        files.require(files.generator)
    with pytest.raises(UserError, match="not found: run `longlive download"):
        hub.ModelFiles(tmp_path / "nowhere").require(files.vae)


def test_dry_run_prints_sizes(monkeypatch, capsys, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["download", "--dry-run", "--local-dir", str(tmp_path), "--what", "wan"]) == 0
    out = capsys.readouterr().out
    assert "Wan2.2_VAE.pth" in out and "2.8 GB" in out and "total" in out
    assert "model_bf16.pt" not in out and "safetensors" not in out


@pytest.mark.parametrize("args,needle", [
    (["--endpoint", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
    (["--what", "everything"], "--what everything: choose from generator, wan"),
])
def test_offline_and_bad_input_are_one_line(capsys, tmp_path, args, needle):
    assert main(["download", "--local-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.strip().count("\n") == 0
    assert not any(Path(tmp_path).iterdir())  # nothing half-written
