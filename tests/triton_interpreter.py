"""The Triton kernels' CPU checks under Triton's interpreter (TRITON_INTERPRET=1 must be set before
triton is imported, hence another process). Every registered check script runs in one process per
test run, each in a namespace of its own, its stdout its result: a Python start with torch and
triton costs ~4 s, four of them were a tenth of the suite's process starts."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import made_once

ROOT = Path(__file__).resolve().parents[1]
# name -> (test module, the name of its script): code that prints its result (a JSON line, "ok") last
SCRIPTS = {"nvfp4": ("tests.test_nvfp4_kernels", "INTERPRETER_CHECKS"),
           "fp8_rows": ("tests.test_fp8_kernels", "INTERPRETER_CHECKS"),
           "fp8_rescale": ("tests.test_fp8_kernels", "RESCALE_CHECKS"),
           "kv_dequantize": ("tests.test_quant_kv", "INTERPRETED_KERNEL")}

RUNNER = r"""
import contextlib, io, json, sys, traceback
results = {}
for name, code in json.load(open(sys.argv[1])).items():
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"<{name}>", "exec"), {"__name__": f"interpreted_{name}"})
        results[name] = {"stdout": out.getvalue()}
    except BaseException:
        results[name] = {"stdout": out.getvalue(), "error": traceback.format_exc()}
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
"""


def interpreted(tmp_path_factory, name: str) -> str:
    """The stdout of script `name` (SCRIPTS) run under the interpreter; fails with its traceback."""
    pytest.importorskip("triton")

    def make(folder: Path) -> None:
        scripts = {key: getattr(importlib.import_module(module), attr) for key, (module, attr) in SCRIPTS.items()}
        (folder / "scripts.json").write_text(json.dumps(scripts))
        env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TRITON_INTERPRET": "1",
               "PYTHONPATH": str(ROOT)}
        files = [str(folder / "scripts.json"), str(folder / "results.json")]
        proc = subprocess.run([sys.executable, "-c", RUNNER, *files], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]

    result = json.loads((made_once(tmp_path_factory, "triton-interpreter", make) / "results.json").read_text())[name]
    assert "error" not in result, result["error"]
    return result["stdout"]


def interpreter_result(tmp_path_factory, name: str) -> dict:
    """The JSON line script `name` printed last."""
    return json.loads(interpreted(tmp_path_factory, name).strip().splitlines()[-1])
