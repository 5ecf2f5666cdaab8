"""One row per finished run of toy/CartPole-Targets-MT10 (tuning or report runs), or with ``--mean`` one row per
method (and tuning configuration) averaged over its seeds: final success, success AUC, the four off-centre tasks, the
mean final KL per task of the centre and of the off-centre tasks, and the cosine of the standard-right and
standard-left residual means (VarShare and L2Soft; for L2Soft the "KL" is the size of its residuals measured at the
prior the run records, c 0.1 for every L2Soft tuning run, not a price it pays). Rows follow the config's [tuning]
order (report runs: its [methods] order), then seed. Single-task (oracle) runs are one row per seed made of its ten
task runs (a seed missing a task is left out and named on stderr): final success and AUC are the means over the
task runs, as in scripts/report.py (which, across runs evaluated at different steps, keeps only the shared steps;
this table uses each run's own). A multi-task run without the off-centre tasks (another suite, a LOO pre-training)
is an error.

    python scripts/targets_table.py --config configs/toy_cartpole_targets_mt10.toml \\
        context/results/targets_mt10_tuning context/results/targets_mt10_tuning_extra
    python scripts/targets_table.py --config configs/toy_cartpole_targets_mt10.toml --mean context/results/targets_mt10
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import by_step, final_task_kl, fixed  # noqa: E402

from mtrl.envs import make_suite  # noqa: E402
from mtrl.run import read_jsonl  # noqa: E402

OFF_CENTRE = ["standard-right", "long-pole-right", "standard-left", "long-pole-left"]


def auc_of(run: Path) -> float:
    """report.py's success AUC of one run: the mean over evaluations of the mean success over its tasks."""
    evals = read_jsonl(run / "eval.jsonl")
    evals = list(by_step(evals).values())  # a step evaluated twice (a run resumed at its end) counts once, its last line
    tasks = list(evals[0]["success"])
    curve = np.array([[[e["success"][t] for e in evals] for t in tasks]])  # (1 run, tasks, evals), as report.py holds it
    return float(curve.mean(1).mean())  # report.py's order; printed with report.fixed, so an exact half rounds the same in both


def run_stats(run: Path) -> dict:
    """The table's numbers of one multi-task run (KL centre / off-centre and cosine None where the run has none)."""
    s = json.loads((run / "summary.json").read_text())
    tasks = list(s["final_success"])
    kl, cos = s.get("final_kl") or {}, s.get("residual_cosine")
    kl_pair = cos_rl = None
    if kl and cos:
        per_task = {t: final_task_kl(kl, t) for t in tasks}
        kl_pair = (float(np.mean([per_task[t] for t in tasks if t not in OFF_CENTRE])), float(np.mean([per_task[t] for t in OFF_CENTRE])))
        cos_rl = cos[tasks.index("standard-right")][tasks.index("standard-left")]
    label, _, rest = run.name.partition("@")
    return {"label": label if rest else run.name.split("__s")[0], "configuration": rest.split("__s")[0] if rest else "-",
            "seed": int(run.name.rsplit("__s", 1)[1]), "success": s["mean_success"], "auc": auc_of(run),
            "off": [s["final_success"][t] for t in OFF_CENTRE], "kl": kl_pair, "cos": cos_rl}


def oracle_stats(runs: list[Path], suite_tasks: list[str]) -> list[dict]:
    """One entry per seed whose oracle ran every task: means over its task runs (`<label>__<task>__s<seed>`)."""
    by_seed = defaultdict(dict)
    for run in runs:
        label_task, seed = run.name.rsplit("__s", 1)
        label, task = label_task.split("__", 1)
        by_seed[(label, int(seed))][task] = run
    out = []
    for (label, seed), per_task in sorted(by_seed.items()):
        missing = [t for t in suite_tasks if t not in per_task]
        if missing:
            print(f"note: {label} seed {seed}: oracle incomplete (no finished run for {', '.join(missing)}); left out", file=sys.stderr)
            continue
        final = {t: json.loads((per_task[t] / "summary.json").read_text())["final_success"][t] for t in suite_tasks}
        out.append({"label": label, "configuration": "-", "seed": seed, "success": float(np.mean(list(final.values()))),
                    "auc": float(np.mean([auc_of(per_task[t]) for t in suite_tasks])), "off": [final[t] for t in OFF_CENTRE],
                    "kl": None, "cos": None})
    return out


def fmt(label: str, configuration: str, seeds: str, rows: list[dict]) -> str:
    """One table row: the means over ``rows`` (one row: its own numbers)."""
    off = " ".join(f"{np.mean([r['off'][i] for r in rows]):.1f}" for i in range(len(OFF_CENTRE)))
    kls = [r["kl"] for r in rows if r["kl"] is not None]
    kl_cell = f"{np.mean([k[0] for k in kls]):.1f} / {np.mean([k[1] for k in kls]):.1f}" if kls else "-"
    coss = [r["cos"] for r in rows if r["cos"] is not None]
    cos_cell = f"{np.mean(coss):+.2f}" if coss else "-"
    return (f"| {label} | {configuration} | {seeds} | {fixed(np.mean([r['success'] for r in rows]), 2)} | "
            f"{fixed(np.mean([r['auc'] for r in rows]))} | {off} | {kl_cell} | {cos_cell} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the suite config (its [tuning] table orders the rows)")
    p.add_argument("--mean", action="store_true", help="one row per method (and configuration): means over its seeds")
    p.add_argument("--methods", default=None, help="only these labels, comma-separated (default: every run found)")
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
    configs = {r: json.loads((r / "config.json").read_text()) for r in runs}
    single = [r for r in runs if configs[r]["args"].get("task") is not None]  # the oracle: one task per run (as report.py)
    other = [r for r in runs if r not in single and not set(OFF_CENTRE) <= set(configs[r]["task_names"])]
    if other:
        raise SystemExit(f"error: not toy/CartPole-Targets-MT10 multi-task runs (an off-centre task is missing): {', '.join(r.name for r in other)}")
    rows = [run_stats(r) for r in runs if r not in single]
    suites = {configs[r]["args"]["env_id"] for r in single}
    for env_id in sorted(suites):
        rows += oracle_stats([r for r in single if configs[r]["args"]["env_id"] == env_id], make_suite(env_id).task_names)
    rows.sort(key=lambda r: (order.get(r["label"] if r["configuration"] == "-" else f"{r['label']}@{r['configuration']}", len(order)),
                             r["label"], r["configuration"], r["seed"]))
    if a.methods:
        wanted = a.methods.split(",")
        unknown = [m for m in wanted if m not in {r["label"] for r in rows}]
        if unknown:
            raise SystemExit(f"error: --methods {','.join(unknown)}: no finished run with that label; found: {', '.join(sorted({r['label'] for r in rows}))}")
        rows = [r for r in rows if r["label"] in wanted]
    print("| method | configuration | " + ("seeds" if a.mean else "seed") + " | final success | success AUC | "
          "off-centre (R, long-R, L, long-L) | KL centre / off-centre (nats per task) | cosine right-left |")
    print("|---|---|---:|---:|---:|---|---|---:|")
    if not a.mean:
        for r in rows:
            print(fmt(r["label"], r["configuration"], str(r["seed"]), [r]))
        return
    groups = defaultdict(list)
    for r in rows:  # dicts keep the sorted order
        groups[(r["label"], r["configuration"])].append(r)
    for (label, configuration), rs in groups.items():
        print(fmt(label, configuration, ",".join(str(r["seed"]) for r in rs), rs))


if __name__ == "__main__":
    main()
