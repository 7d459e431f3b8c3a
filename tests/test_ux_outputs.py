"""Write failures at the output location (issue 14, item 1): an unwritable folder is one line and
exit 2 before any model is built; a write refused mid-run (disk full) is one line naming the file
and the cause, exit 1, no traceback, nothing left behind, the first error never hidden by cleanup."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import core.errors
import longlive_cli.build
from core.checkpoint import atomic_write, save_generator
from core.decode import VideoWriter
from core.errors import OutputError
from longlive_cli.app import main
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--preset", "tiny", "--height", "64", "--width", "64", "--frames", "16"]
FULL = "No space left on device: free some space there (or raise the file-size limit) or choose another location"


def _refusal(folder: Path) -> str | None:
    """The strerror of creating a file in `folder`, or None if it can be written (as root, for one)."""
    try:
        fd = os.open(folder / ".ux-probe", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError as err:
        return err.strerror
    os.close(fd)
    os.unlink(folder / ".ux-probe")
    return None


def _unwritable_folder(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A folder this process cannot write in, and the reason the OS gives."""
    folder = Path("/sys") if kind == "sysfs" else tmp_path / "read-only"
    if kind == "chmod":
        folder.mkdir()
        folder.chmod(0o500)
    reason = _refusal(folder) if folder.is_dir() else None
    if reason is None:
        pytest.skip(f"{folder} is writable here (root ignores permission bits)")
    return folder, reason


@pytest.fixture
def never_build(monkeypatch):
    """Fail the test if a model is built: every check must come first."""
    def built(*args, **kwargs):
        raise AssertionError("a model was built before the checks")

    monkeypatch.setattr(longlive_cli.build, "build_models", built)
    monkeypatch.setattr(longlive_cli.build, "build_dit", built)


@pytest.mark.parametrize("kind", ["sysfs", "chmod"])
@pytest.mark.parametrize("target", ["-o", "--latents-out", "convert OUT", "train-ar --export"])
def test_unwritable_folder_is_one_line_before_any_model(tmp_path, capsys, never_build, kind, target):
    folder, reason = _unwritable_folder(tmp_path, kind)
    checkpoint = save_generator(tiny_model(), tmp_path / "gen.safetensors")
    name = {"-o": "v.mp4", "--latents-out": "z.safetensors", "convert OUT": "q.safetensors",
            "train-ar --export": "e.safetensors"}[target]
    path = folder / name
    args = {
        "-o": ["generate", "x", *SMALL, "-o", str(path)],
        "--latents-out": ["generate", "x", *SMALL, "-o", str(tmp_path / "v.mp4"), "--latents-out", str(path)],
        "convert OUT": ["convert-nvfp4", str(checkpoint), str(path), "--preset", "tiny", "--device", "cpu"],
        "train-ar --export": ["train-ar", "train_ar_tiny", "--logdir", str(tmp_path / "run"), "--export", str(path)],
    }[target]
    flag = target.split()[-1]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: {flag} {path}: cannot write in {folder} ({reason}): choose a writable location\n"
    assert not (tmp_path / "v.mp4").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["sysfs", "chmod"])
def test_unwritable_logdir_is_one_line_before_any_model(tmp_path, capsys, never_build, kind):
    folder, _ = _unwritable_folder(tmp_path, kind)
    try:  # the log dir is created, so the OS's reason is mkdir's (EPERM in sysfs, where open says EACCES)
        os.mkdir(folder / "run")
    except OSError as err:
        reason = err.strerror
    assert main(["train-ar", "train_ar_tiny", "--logdir", str(folder / "run")]) == 2
    assert capsys.readouterr().err == (f"error: log dir {folder / 'run'} is not writable ({reason}): "
                                       f"pass a writable --logdir\n")
    assert not (folder / "run").exists()


def test_a_folder_that_cannot_hold_files_is_one_line(tmp_path, capsys, never_build):
    """/proc refuses to create any file (the kernel says "No such file or directory")."""
    assert main(["generate", "x", *SMALL, "-o", "/proc/v.mp4"]) == 2
    assert capsys.readouterr().err == ("error: -o /proc/v.mp4: cannot write in /proc (No such file or directory): "
                                       "choose a writable location\n")


# A fresh mount namespace (user namespace too, so no root is needed where they are enabled): the
# small tmpfs exists only for the command, and what is left in it is listed before it goes.
_IN_TMPFS = ('mnt=$1; options=$2; fill=$3; listing=$4; shift 4; '
             'mount -t tmpfs -o "$options" tmpfs "$mnt" || exit 99; '
             'if [ "$fill" -gt 0 ]; then head -c "$fill" /dev/zero > "$mnt/filler"; fi; '
             '"$@"; code=$?; (cd "$mnt" && find . -mindepth 1 | sort) > "$listing"; exit $code')


def _run_in_tmpfs(tmp_path: Path, options: str, fill: int, args: list[str]) -> tuple[subprocess.CompletedProcess,
                                                                                        list[str]]:
    """`longlive ARGS` with a tmpfs (mount `options`, `fill` bytes taken by a file) on tmp_path/mnt;
    returns the run and the paths left in the tmpfs afterwards ("./name"). Skips where mounting is
    refused."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here")
    mnt, listing = tmp_path / "mnt", tmp_path / "left.txt"
    mnt.mkdir()
    command = ["unshare", "-rm", "sh", "-c", _IN_TMPFS, "sh", str(mnt), options, str(fill), str(listing),
               sys.executable, "-m", "longlive_cli", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode == 99 or not listing.exists():
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    return done, listing.read_text().split()


TINY_RUN = ["generate", "x", "--preset", "tiny", "--height", "32", "--width", "32", "--frames", "8"]


@pytest.mark.parametrize("target", ["-o", "--latents-out", "convert OUT", "train-ar --export", "train-ar --logdir",
                                    "eval-vbench --out"])
def test_a_read_only_mount_is_one_line_before_any_model(tmp_path, target):
    """The issue's case: a read-only mount as the output folder (the whole generation used to run
    first). Real, as root too (where a chmod-ed folder stays writable)."""
    path = tmp_path / "mnt" / {"-o": "v.mp4", "--latents-out": "z.safetensors", "convert OUT": "q.safetensors",
                               "train-ar --export": "e.safetensors", "train-ar --logdir": "run",
                               "eval-vbench --out": "results.json"}[target]
    if target == "convert OUT":
        save_generator(tiny_model(), tmp_path / "gen.safetensors")
    args = {
        "-o": [*TINY_RUN, "-o", str(path)],
        "--latents-out": [*TINY_RUN, "-o", str(tmp_path / "v.mp4"), "--latents-out", str(path)],
        "convert OUT": ["convert-nvfp4", str(tmp_path / "gen.safetensors"), str(path), "--preset", "tiny",
                        "--device", "cpu"],
        "train-ar --export": ["train-ar", "train_ar_tiny", "--logdir", str(tmp_path / "run"), "--export", str(path)],
        "train-ar --logdir": ["train-ar", "train_ar_tiny", "--logdir", str(path)],
        "eval-vbench --out": ["eval-vbench", "--suite", "vbench", "--preset", "tiny", "--device", "cpu",
                              "--out", str(path)],
    }[target]
    done, left = _run_in_tmpfs(tmp_path, "ro,size=120k", 0, args)
    assert done.returncode == 2, done.stderr
    flag = target.split()[-1]
    assert done.stderr == (f"error: log dir {path} is not writable (Read-only file system): pass a writable --logdir\n"
                           if flag == "--logdir" else
                           f"error: {flag} {path}: cannot write in {path.parent} (Read-only file system): "
                           f"choose a writable location\n")
    assert left == [] and done.stdout == "" and not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("target", ["-o", "--latents-out"])
def test_a_full_tmpfs_is_one_line_exit_1_and_leaves_nothing(tmp_path, target):
    """The issue's case: a 120k tmpfs, almost all taken, so the probe passes and the write fails
    part-way. Whatever was written (the video or the latents) is taken back."""
    mnt = tmp_path / "mnt"
    out, latents = (mnt / "v.mp4", tmp_path / "z.safetensors") if target == "-o" else \
        (tmp_path / "v.mp4", mnt / "z.safetensors")
    done, left = _run_in_tmpfs(tmp_path, "size=120k", 118 * 1024,
                               [*TINY_RUN, "-o", str(out), "--latents-out", str(latents)])
    full = out if target == "-o" else latents
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == f"error: cannot write {full}: {FULL}"
    assert "Traceback" not in done.stderr and done.stderr.count("error:") == 1
    assert left == ["./filler"] and not out.exists() and not latents.exists()


def test_a_full_disk_while_training_is_one_line_and_keeps_no_partial_checkpoint(tmp_path):
    """A 2 MB tmpfs as --logdir holds the generated data and the logs but not the first
    checkpoint (the tiny model with its Adam state): DCP's gathered error becomes one line naming
    the checkpoint, and its partial folder is removed."""
    run = tmp_path / "mnt" / "run"
    done, left = _run_in_tmpfs(tmp_path, "size=2m", 0, ["train-ar", "train_ar_tiny", "--logdir", str(run),
                                                        "--max-steps", "2"])
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == f"error: cannot write {run}/checkpoints/step_00000002: {FULL}"
    assert "Traceback" not in done.stderr and done.stderr.count("error:") == 1
    assert "./run/checkpoints" in left and not [path for path in left if path.startswith("./run/checkpoints/")]
    assert not [path for path in left if path.endswith(".tmp")]


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["encoding", "closing"])
def test_disk_full_mid_run_is_one_line_exit_1_and_leaves_nothing(tmp_path, capsys, monkeypatch, fast_decode, where):
    """ENOSPC injected where libav reports it: muxing a packet of the second chunk (the encoder
    thread), or writing the mp4 index at the end, after the latents were saved (those are taken
    back too)."""
    if where == "encoding":
        encode, calls = VideoWriter._encode, []

        def refuse_later(self, frames):
            calls.append(1)
            if len(calls) == 2:
                raise _enospc()
            encode(self, frames)

        monkeypatch.setattr(VideoWriter, "_encode", refuse_later)
    else:
        close = VideoWriter._close

        def close_then_refuse(self, complete):
            close(self, complete)
            raise _enospc()

        monkeypatch.setattr(VideoWriter, "_close", close_then_refuse)
    out = tmp_path / "v.mp4"
    assert main(["generate", "x", *SMALL, "-o", str(out), "--latents-out", str(tmp_path / "z.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: cannot write {out}: {FULL}"
    assert "Traceback" not in err and err.count("error:") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_late_failure_of_the_last_chunk_is_not_taken_for_success(tmp_path, capsys, monkeypatch, fast_decode):
    """The encoder thread fails on the last chunk only after the generation loop has ended (the
    writer is closing): the video must not be finalised, the error is the one line, exit 1."""
    encode, calls = VideoWriter._encode, []

    def slow_then_refuse(self, frames):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(0.5)  # __exit__ starts meanwhile
            raise _enospc()
        encode(self, frames)

    monkeypatch.setattr(VideoWriter, "_encode", slow_then_refuse)
    out = tmp_path / "v.mp4"
    assert main(["generate", "x", *SMALL, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: cannot write {out}: {FULL}"
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_disk_full_for_real_under_a_file_size_limit(tmp_path):
    """A real refused write, no injection: the mp4 may not grow past 4 KB (RLIMIT_FSIZE; works as
    root too, where a read-only chmod does not). The kernel answers EFBIG."""
    out = tmp_path / "v.mp4"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    # random weights: a noise video is sure to outgrow 4 KB (the shapes model's plain frames may not)
    args = ["generate", "x", "--preset", "tiny", "--random-weights", "--height", "32", "--width", "32", "--frames", "8",
            "-o", str(out)]
    done = subprocess.run([sys.executable, "-m", "longlive_cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == (f"error: cannot write {out}: File too large: free some space there "
                                            f"(or raise the file-size limit) or choose another location")
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failing_cleanup_never_hides_the_first_error(tmp_path, monkeypatch):
    """The encoder fails (disk full), then closing the container fails (I/O error) and removing
    the temp file fails too (a read-only remount): the encoder's error is the one raised."""
    path = tmp_path / "v.mp4"

    def refuse(self, frames):
        raise _enospc()

    def close_fails(self, complete):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def unlink_refused(target):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(VideoWriter, "_encode", refuse)
    monkeypatch.setattr(VideoWriter, "_close", close_fails)
    frames = np.zeros((4, 64, 64, 3), np.uint8)
    with pytest.raises(OutputError) as info:
        with VideoWriter(path, 64, 64) as writer:
            monkeypatch.setattr(core.errors.os, "unlink", unlink_refused)
            writer.write(frames)
            writer._thread.join(timeout=30)  # the encoder has failed and stopped
    monkeypatch.undo()
    assert str(info.value) == f"cannot write {path}: {FULL}"


def _safetensors_refusal(temp: str) -> None:
    raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_refusal(temp: str) -> None:
    try:  # torch's zip writer: a RuntimeError whose context is the refused Python write
        raise _enospc()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904


@pytest.mark.parametrize("write", [_safetensors_refusal, _torch_refusal])
def test_atomic_write_names_the_file_and_cause(tmp_path, write):
    """The writers report a refused write in their own ways (safetensors quotes the errno, torch
    wraps it in a RuntimeError): both become the same one line; nothing is left."""
    path = tmp_path / "out.bin"
    with pytest.raises(OutputError) as info:
        atomic_write(path, write)
    assert str(info.value) == f"cannot write {path}: {FULL}"
    assert list(tmp_path.iterdir()) == []


def test_latents_metadata_and_video_survive_a_normal_run(tmp_path, fast_decode):
    """The write path above changed how the video is closed: a normal run still writes both."""
    from safetensors import safe_open

    out, latents = tmp_path / "v.mp4", tmp_path / "z.safetensors"
    assert main(["generate", "x", *SMALL[:-2], "--frames", "8", "-o", str(out), "--latents-out", str(latents)]) == 0
    with safe_open(str(latents), "pt") as f:
        assert f.get_tensor("latents").shape == torch.Size([1, 8, 48, 4, 4])
        assert f.metadata()["switches"] == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4", "z.safetensors"]
