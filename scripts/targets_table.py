"""One row per finished run of toy/CartPole-Targets-MT10 (tuning or report runs): final success, success AUC, the four
off-centre tasks, the mean final KL per task of the centre and of the off-centre tasks, and the cosine of the
standard-right and standard-left residual means (VarShare and L2Soft; for L2Soft the "KL" is the size of its residuals
measured at the prior the run records, c 0.1 for every L2Soft tuning run, not a price it pays). Rows follow the
config's [tuning] order (report runs: its [methods] order), then seed; single-task (oracle) runs are skipped.

    python scripts/targets_table.py --config configs/toy_cartpole_targets_mt10.toml \\
        context/results/targets_mt10_tuning context/results/targets_mt10_tuning_extra
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import final_task_kl  # noqa: E402

OFF_CENTRE = ["standard-right", "long-pole-right", "standard-left", "long-pole-left"]


def row(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines() if line]
    tasks = list(s["final_success"])
    auc = sum(sum(e["success"].values()) / len(e["success"]) for e in evals) / len(evals)  # report.py's success AUC
    off = " ".join(f"{s['final_success'][t]:.1f}" for t in OFF_CENTRE)
    kl, cos = s.get("final_kl") or {}, s.get("residual_cosine")
    kl_cell = cos_cell = "-"
    if kl and cos:
        per_task = {t: final_task_kl(kl, t) for t in tasks}
        centre = [per_task[t] for t in tasks if t not in OFF_CENTRE]
        kl_cell = f"{sum(centre) / len(centre):.1f} / {sum(per_task[t] for t in OFF_CENTRE) / len(OFF_CENTRE):.1f}"
        cos_cell = f"{cos[tasks.index('standard-right')][tasks.index('standard-left')]:+.2f}"
    label, _, rest = run.name.partition("@")
    configuration = rest.split("__s")[0] if rest else "-"
    seed = run.name.rsplit("__s", 1)[1]
    return f"| {label if rest else run.name.split('__s')[0]} | {configuration} | {seed} | {s['mean_success']:.2f} | {auc:.3f} | {off} | {kl_cell} | {cos_cell} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the suite config (its [tuning] table orders the rows)")
    p.add_argument("runs_dirs", type=Path, nargs="+", help="folders of run folders (finished runs: summary.json)")
    a = p.parse_args()
    for d in [a.config, *a.runs_dirs]:
        if not d.exists():
            raise SystemExit(f"error: {d}: no such file or folder")
    config = tomllib.loads(a.config.read_text())
    order = {}
    for label, grid in config.get("tuning", {}).items():
        if isinstance(grid, dict):
            for name in grid:
                order[f"{label}@{name}"] = len(order)
    for label in config.get("methods", {}):  # report runs: the [methods] table's order
        order.setdefault(label, len(order))
    runs = [r.parent for d in a.runs_dirs for r in d.glob("*/summary.json") if ".incomplete-" not in r.parent.name]
    # single-task runs (the oracle: one task each) have no off-centre columns; their row is in report.py's table
    runs = [r for r in runs if set(OFF_CENTRE) <= set(json.loads((r / "summary.json").read_text())["final_success"])]
    runs.sort(key=lambda r: (order.get(r.name.split("__s")[0], len(order)), int(r.name.rsplit("__s", 1)[1]), r.name))
    print("| method | configuration | seed | final success | success AUC | off-centre (R, long-R, L, long-L) | "
          "KL centre / off-centre (nats per task) | cosine right-left |")
    print("|---|---|---:|---:|---:|---|---|---:|")
    for run in runs:
        print(row(run))


if __name__ == "__main__":
    main()
