"""Helpers for Triton kernel tests: bit-level comparison, and a run under the CPU interpreter.

Triton's interpreter has to be switched on (``TRITON_INTERPRET=1``) before ``triton`` is
imported, so a test file's checks run in a subprocess that executes the file as a script and
prints a JSON report as its last line. The script runs under bare ``lightning_s2a`` and
``lightning_s2a.engine`` package modules: their ``__init__``s import Lightning and the hooks
(``torch._dynamo``), more than half of the subprocess's time, and the kernels need neither.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

_BARE_PACKAGES = """
import os, runpy, sys, types
for name in ("lightning_s2a", "lightning_s2a.engine"):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(sys.argv[1], *name.split(".")[1:])]
    sys.modules[name] = package
runpy.run_path(sys.argv[2], run_name="__main__")
"""


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Same dtype, shape, device and bits; NaNs must sit at the same places (any NaN bits)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.masked_fill(nan, 0).view(as_int), b.masked_fill(nan, 0).view(as_int))


def diff(label: str, **pairs: tuple[Any, Any]) -> list[str]:
    """One failure line per pair ``(reference, Triton)`` that is not :func:`same`."""
    return [f"{label}: {name}" for name, (a, b) in pairs.items() if not same(a, b)]


def bare_imports() -> bool:
    """True if this process imported neither Lightning nor the engine's hooks."""
    return "lightning" not in sys.modules and "lightning_s2a.engine.hooks" not in sys.modules


def run_interpreted(script: str | Path) -> dict[str, Any]:
    """Run ``script`` under ``TRITON_INTERPRET=1`` and bare packages; return its JSON report."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    args = [str(ROOT / "lightning_s2a"), str(Path(script).resolve())]
    proc = subprocess.run(
        [sys.executable, "-c", _BARE_PACKAGES, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def import_without_triton(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[ModuleType]:
    """Import the engine modules ``names`` afresh, in order, as if Triton were not installed.

    ``monkeypatch`` records the modules as they are (in ``sys.modules`` and as attributes of
    ``lightning_s2a.engine``) and puts them back after the test.
    """
    import lightning_s2a.engine as engine

    for name in names:
        importlib.import_module(name)
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setattr(engine, name.rsplit(".", 1)[-1], None, raising=False)
        del sys.modules[name]
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    return [importlib.import_module(name) for name in names]
