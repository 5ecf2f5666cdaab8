"""Learning: each method solves the easy problems (small budgets, one seed; marked slow, run in CI)."""

import json

import pytest

from conftest import only_run, run_algo


@pytest.mark.slow
def test_ppo_single_solves_cartpole_within_500k(runs_dir):
    run_algo("ppo_single", "--config", "configs/cartpole.toml", "--runs-dir", str(runs_dir), "--eval-every", "0", "--checkpoint-every", "0")
    summary = json.loads((only_run(runs_dir) / "summary.json").read_text())
    assert summary["total_steps"] >= 500_000 - 512
    assert summary["mean_return"] >= 475, summary
