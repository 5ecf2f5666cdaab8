"""Helpers: run an algorithm script as a user would (a subprocess) and read what it left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtrl.run import read_jsonl  # noqa: F401  (re-exported for the tests)
from mtrl.run import read_scalars as scalars  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
ALGOS = REPO / "src" / "algos"


def algo_cmd(algo: str, *args: str) -> list[str]:
    return [sys.executable, str(ALGOS / f"{algo}.py"), "--no-progress", *args]


def run_algo(algo: str, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(algo_cmd(algo, *args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{algo} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def only_run(runs_dir: Path) -> Path:
    runs = [p for p in Path(runs_dir).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d
