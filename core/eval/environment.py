"""The VBench environment: a virtual environment `longlive` manages, and the worker run inside it.

vbench 0.1.5 pins `numpy<2` and `transformers==4.33.2` (ours: numpy 2, transformers >= 4.45 for
umt5), needs a torchvision that matches its torch (and `torchvision.io.write_video`, put back by
`core.eval.compat` where torchvision >= 0.24 dropped it), `moviepy<2` and `setuptools<81`
(`pkg_resources` for CLIP). So VBench runs in its own venv, `~/.cache/longlive/vbench-env` by
default, made by `longlive download --eval` with the pinned set below; `eval-vbench` writes a
request, runs `python -m core.eval.worker` there and reads the per-clip scores back. An
interpreter that already imports vbench (the user's own VBench setup) is used as it is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from core.errors import UserError

DEFAULT_ENV_DIR = Path("~/.cache/longlive/vbench-env").expanduser()
# The set the worker is tested with (besides torch + torchvision, chosen by `torch_pair`).
VBENCH_REQUIREMENTS = (
    "vbench==0.1.5",  # brings numpy<2, transformers==4.33.2, timm, openai-clip, pyiqa, decord, opencv
    "scenedetect==0.7.2",  # its OpenCV comes with vbench (opencv-python)
    "moviepy<2",  # vbench2_beta_long imports moviepy.editor
    "setuptools<81",  # openai-clip imports pkg_resources
    "dreamsim==0.2.1",  # VBench-Long's background fast branch
    "peft==0.6.2",  # dreamsim's LoRA; later peft imports transformers.Cache (transformers >= 4.36)
    "av>=12",  # core.eval.compat's write_video
)
# torchvision release of each torch minor version.
TORCHVISION_FOR_TORCH = {"2.6": "0.21", "2.7": "0.22", "2.8": "0.23", "2.9": "0.24", "2.10": "0.25",
                         "2.11": "0.26", "2.12": "0.27", "2.13": "0.28", "2.14": "0.29"}
FALLBACK_TORCH = ("torch==2.14.1", "torchvision==0.29.1")  # for a local +cpu torch: PyPI has no CPU torchvision


def torch_pair(torch_version: str) -> tuple[str, str]:
    """torch + torchvision pins for the VBench env: this environment's torch and its torchvision;
    a local build (`2.13.0+cpu`) has no torchvision on PyPI, so it gets FALLBACK_TORCH."""
    base, _, local = torch_version.partition("+")
    minor = ".".join(base.split(".")[:2])
    if local or minor not in TORCHVISION_FOR_TORCH:
        return FALLBACK_TORCH
    return f"torch=={base}", f"torchvision=={TORCHVISION_FOR_TORCH[minor]}.*"


def env_python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def _spec(torch_pins: tuple[str, ...]) -> dict:
    return {"torch": list(torch_pins), "requirements": list(VBENCH_REQUIREMENTS)}


def install_env(env_dir: Path, torch_pins: tuple[str, ...], run: Callable = subprocess.run,
                log: Callable[[str], None] = print) -> bool:
    """Create or update the VBench venv (pip from PyPI); False when it already has this spec."""
    marker = env_dir / "longlive-vbench-env.json"
    spec = _spec(torch_pins)
    if marker.exists() and json.loads(marker.read_text()) == spec:
        log(f"VBench environment {env_dir} is up to date")
        return False
    if not env_python(env_dir).exists():
        log(f"creating {env_dir}")
        run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    pip = [str(env_python(env_dir)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    log(f"installing {' '.join(torch_pins)} into {env_dir}")
    run([*pip, *torch_pins], check=True)
    log(f"installing {', '.join(VBENCH_REQUIREMENTS)}")
    run([*pip, *torch_pins, *VBENCH_REQUIREMENTS], check=True)
    temp = marker.with_suffix(".tmp")
    temp.write_text(json.dumps(spec))
    os.replace(temp, marker)
    return True


def worker_python(env_dir: Path) -> Path:
    """The managed env's python, else this interpreter if it imports vbench; else one line + the fix."""
    if env_python(env_dir).exists():
        return env_python(env_dir)
    if importlib.util.find_spec("vbench") is not None:
        return Path(sys.executable)
    raise UserError(f"the VBench environment is not installed ({env_dir} is missing): run "
                    f"`longlive download --eval --env-only` (pip, from PyPI) first")


def run_worker(python: Path, request: dict, log: Callable[[str], None] = print) -> dict:
    """Run `core.eval.worker` on `request` with `python`; the per-clip scores it returns."""
    import core

    with tempfile.TemporaryDirectory(prefix="longlive-eval-") as temp:
        root = Path(temp)
        # Only our `core` package on the path: the worker must not see this env's numpy/transformers.
        (root / "pkg").mkdir()
        (root / "pkg" / "core").symlink_to(Path(core.__file__).parent, target_is_directory=True)
        request = {**request, "work_dir": request.get("work_dir") or str(root / "work")}
        (root / "request.json").write_text(json.dumps(request))
        env = {**os.environ, "PYTHONPATH": str(root / "pkg")}
        proc = subprocess.run([str(python), "-m", "core.eval.worker", str(root / "request.json"),
                               str(root / "response.json")], env=env, cwd=str(root), capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"the VBench worker ({python}) failed with exit code {proc.returncode}:\n{tail}")
        return json.loads((root / "response.json").read_text())
