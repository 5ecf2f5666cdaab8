"""Evaluation curves of individual runs as one markdown table: per run and evaluation, the mean success over the
run's tasks and the success of chosen tasks. For studies too partial for scripts/report.py (which leaves out an
oracle seed without all its tasks), such as the first metaworld/MT10 runs:

    python scripts/eval_table.py context/results/mt10_reduced/*__s1 --tasks reach-v3,push-v3,pick-place-v3

A task a run does not have (an oracle run has one) prints "-". Steps are the run's own environment steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mtrl.run import read_jsonl  # noqa: E402  (the reader the tests and the other scripts use)


def evaluations(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "eval.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {run_dir}: no eval.jsonl (not a run directory, or never evaluated)")
    return read_jsonl(path)


def rows(run_dir: Path, tasks: list[str]) -> list[str]:
    return [f"| {Path(run_dir).name} | {e['global_step']:,} | {e['mean_success']:.2f} | "
            + " | ".join(f"{e['success'][t]:.2f}" if t in e["success"] else "-" for t in tasks) + " |" for e in evaluations(run_dir)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (with eval.jsonl)")
    p.add_argument("--tasks", default=None, help="comma-separated task names for the per-task columns (default: every task of the first run)")
    a = p.parse_args()
    tasks = a.tasks.split(",") if a.tasks else sorted(evaluations(a.runs[0])[0]["success"])
    print("| run | steps | mean success (its tasks) | " + " | ".join(tasks) + " |")
    print("|---|---:|---:|" + "---:|" * len(tasks))
    for r in a.runs:
        print("\n".join(rows(r, tasks)))


if __name__ == "__main__":
    main()
