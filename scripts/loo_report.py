"""The leave-one-task-out report (protocol.md section 7; context/loo.md) of the runs scripts/loo.sh made.

    python scripts/loo_report.py --runs-dir runs/toy_cartpole_targets_mt10_loo               # writes reports/toy_cartpole_targets_mt10_loo/
    python scripts/loo_report.py --runs-dir runs/x_loo runs/x --out reports/x_loo           # scratch runs may come from the main sweep's oracle

Per benchmark and held-out task k, for every method and regime (finetune, task-only, zero-shot, and scratch: the
single-task oracle run on k), each a number per seed with its 95% bootstrap CI over seeds (rliable, fixed seeds):
- jumpstart: the zero-shot success on k, i.e. the pre-trained network with k's slot untouched: the transfer run's
  step-0 evaluation (finetune, task-only) and the pre-training run's final evaluation (zero-shot; the two are
  the same evaluation and are checked against each other); scratch is not evaluated at step 0;
- success AUC: the mean success on k over the evaluations of the transfer budget (step 0 excluded, so all regimes
  share scratch's evaluation steps; zero-shot: its constant success);
- steps to 0.9: the first evaluation step with success >= 0.9 on k, a run that never reaches it counted at its
  final step (censored; the table gives how many seeds reached it);
- final success on k;
and each relative to scratch (difference, and ratio for AUC and steps), bootstrapped over the seeds of both.
Writes ``loo.md``, ``loo.csv`` and ``loo_<benchmark>_<task>.png`` (success on k vs transfer steps: finetune,
task-only and scratch, mean over seeds with 95% CI bands, zero-shot dashed; one panel per method). Loading, seed
checks and bootstrap come from scripts/report.py; nothing is dropped silently (missing and unfinished runs are listed).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import by_step, check_inputs, check_seeds, fixed, fmt_ci, interval_estimates, load_runs, warnings_section, write_csv  # noqa: E402

LOO_NAME = re.compile(r"^(?P<label>.+?)__loo-(?P<task>.+)__(?P<regime>pretrain|finetune|task-only)__s(?P<seed>\d+)$")
REGIMES = ("finetune", "task-only", "zero-shot")
THRESHOLD = 0.9


def run_metrics(run: dict, task: str) -> dict:
    """One transfer or scratch run on ``task``: its curve (steps, success), jumpstart (step-0 evaluation or None),
    AUC, steps to THRESHOLD (censored at the final step) and whether it was reached, final success."""
    evals = by_step(run["evals"])
    steps = sorted(s for s in evals if s > 0)
    success = [evals[s]["success"][task] for s in steps]
    first = next((s for s, v in zip(steps, success) if v >= THRESHOLD), None)
    return {"curve": (sorted(evals), [evals[s]["success"][task] for s in sorted(evals)]), "eval_steps": steps,
            "jumpstart": evals[0]["success"][task] if 0 in evals else None, "auc": float(np.mean(success)) if success else float("nan"),
            "steps": float(first if first is not None else run["summary"]["total_steps"]), "reached": first is not None,
            "final": run["summary"]["final_success"][task]}


def zero_shot_metrics(pretrain: dict, task: str) -> dict:
    """The zero-shot regime: the pre-trained network, never trained on ``task``: its final evaluation there, constant."""
    z = pretrain["summary"]["final_success"][task]
    return {"curve": None, "eval_steps": None, "jumpstart": z, "auc": z, "steps": 0.0 if z >= THRESHOLD else float("nan"),
            "reached": z >= THRESHOLD, "final": z}


def collect(runs: list[dict]) -> tuple[dict, list[str]]:
    """{(benchmark, task): {"scratch": {seed: metrics}, (label, regime): {seed: metrics}}} and notes (consistency)."""
    table, notes, pretrains = defaultdict(lambda: defaultdict(dict)), [], {}
    for r in runs:
        m = LOO_NAME.match(r["dir"].name)
        if m and m["regime"] == "pretrain":
            pretrains[(r["env_id"], m["task"], m["label"], r["seed"])] = r
            table[(r["env_id"], m["task"])][(m["label"], "zero-shot")][r["seed"]] = zero_shot_metrics(r, m["task"])
        elif m:
            table[(r["env_id"], m["task"])][(m["label"], m["regime"])][r["seed"]] = run_metrics(r, m["task"])
    held_out = {key for key in table}
    for r in runs:  # scratch: the single-task oracle run of a held-out task
        if r["config"]["algo"] == "ppo_single" and (r["env_id"], r["task"]) in held_out:
            table[(r["env_id"], r["task"])]["scratch"][r["seed"]] = run_metrics(r, r["task"])
    for (env_id, task), groups in table.items():
        for group, by_seed in groups.items():
            if group == "scratch" or group[1] == "zero-shot":
                continue
            label, regime = group
            for seed, met in by_seed.items():
                source = pretrains.get((env_id, task, label, seed))
                zero = None if source is None else source["summary"]["final_success"][task]
                if met["jumpstart"] is None:
                    notes.append(f"{env_id} {task} {label} {regime} seed {seed}: no step-0 evaluation (not started with --init-from?)")
                elif zero is not None and abs(met["jumpstart"] - zero) > 1e-9:
                    notes.append(f"{env_id} {task} {label} {regime} seed {seed}: step-0 success {met['jumpstart']} differs from the "
                                 f"pre-training's final success {zero} on {task} (the same evaluation; expected equal)")
            scratch_steps = {tuple(m["eval_steps"]) for m in groups.get("scratch", {}).values()}
            if any(tuple(m["eval_steps"]) not in scratch_steps for m in by_seed.values()) and scratch_steps:
                notes.append(f"{env_id} {task} {label} {regime}: evaluated at other steps than scratch; AUCs are over different points")
    return table, notes


def estimates(groups: dict, field: str, reps: int, scratch: np.ndarray | None) -> tuple[dict, dict]:
    """Per group: (mean, CI) of ``field`` over its seeds, and relative to scratch ((difference, ratio), CIs)."""
    values = {g: np.array([m[field] for m in by_seed.values()], float)[:, None] for g, by_seed in groups.items()}
    values = {g: v for g, v in values.items() if len(v) and not np.isnan(v).any()}
    absolute = interval_estimates(values, lambda x: np.array([x.mean()]), reps) if values else ({}, {})
    relative = ({}, {})
    others = {g: v for g, v in values.items() if g != "scratch"}
    if scratch is not None and len(scratch) and others:
        relative = interval_estimates({g: [v, scratch] for g, v in others.items()},
                                      lambda x, y: np.array([x.mean() - y.mean(), x.mean() / y.mean() if y.mean() > 0 else np.nan]), reps)
    return absolute, relative


def cell(est: tuple[dict, dict], group, index: int = 0, steps: bool = False) -> str:
    point, ci = est
    if group not in point or np.isnan(point[group][index]):
        return "-"
    if steps:  # a number of environment steps
        return f"{point[group][index]:,.0f} [{ci[group][0, index]:,.0f}, {ci[group][1, index]:,.0f}]"
    return fmt_ci(float(point[group][index]), np.ravel(ci[group][:, index]))


def write_loo_report(runs_dirs: list[Path], out: Path, reps: int = 2000) -> str:
    runs, warnings_ = load_runs(runs_dirs)
    if not runs:
        raise SystemExit(f"error: no finished run (summary.json) under {', '.join(map(str, runs_dirs))}")
    check_seeds(runs)
    table, notes = collect(runs)
    if not table:
        raise SystemExit(f"error: no LOO run (<method>__loo-<task>__<regime>__s<seed>) under {', '.join(map(str, runs_dirs))}")
    warnings_ += notes
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Leave-one-task-out: {', '.join(map(str, runs_dirs))}", "",
             f"Per held-out task: success on it after transfer (protocol.md section 7). Mean over seeds with 95% bootstrap CIs "
             f"({reps} reps); '- scratch' and '/ scratch' compare with the single-task oracle run on the task (seeds of both "
             f"resampled). Jumpstart: zero-shot success (the pre-trained network with the task's slot untouched). AUC: mean "
             f"success over the transfer budget's evaluations. Steps to {THRESHOLD}: first evaluation at or above it, censored "
             "at the run's final step when never reached (reached: seeds that did).", ""]
    lines += warnings_section(warnings_, "missing, unfinished or inconsistent runs")
    summary_at = len(lines)  # the summary table goes here, once every task's rows are known
    rows = []
    for (env_id, task), groups in sorted(table.items()):
        order = (["scratch"] if "scratch" in groups else []) + sorted((g for g in groups if g != "scratch"),
                                                                     key=lambda g: (g[0], REGIMES.index(g[1])))
        scratch = {f: np.array([m[f] for m in groups["scratch"].values()], float)[:, None] if "scratch" in groups else None
                   for f in ("auc", "steps", "final")}
        est = {f: estimates(groups, f, reps, scratch.get(f)) for f in ("jumpstart", "auc", "steps", "final")}
        lines += [f"## {env_id}: held-out {task}", "",
                  f"| method | regime | seeds | jumpstart | success AUC | AUC - scratch | AUC / scratch | steps to {THRESHOLD} (reached) | "
                  "steps / scratch | final success | final - scratch |", "|---|---|---:|---|---|---|---|---|---|---|---|"]
        for g in order:
            label, regime = ("single", "scratch") if g == "scratch" else g
            by_seed = groups[g]
            reached = sum(m["reached"] for m in by_seed.values())
            lines.append(f"| {label} | {regime} | {len(by_seed)} | {cell(est['jumpstart'][0], g)} | {cell(est['auc'][0], g)} | "
                         f"{cell(est['auc'][1], g, 0)} | {cell(est['auc'][1], g, 1)} | {cell(est['steps'][0], g, steps=True)} ({reached}/{len(by_seed)}) | "
                         f"{cell(est['steps'][1], g, 1)} | {cell(est['final'][0], g)} | {cell(est['final'][1], g, 0)} |")
            row = {"benchmark": env_id, "held_out": task, "method": label, "regime": regime, "seeds": len(by_seed), "reached_0.9": reached}
            for f in ("jumpstart", "auc", "steps", "final"):
                point, ci = est[f][0]
                row.update({f: point[g][0] if g in point else "", f"{f}_ci_low": ci[g][0, 0] if g in ci else "", f"{f}_ci_high": ci[g][1, 0] if g in ci else ""})
            for f, parts in (("auc", ("minus", "ratio")), ("steps", ("minus", "ratio")), ("final", ("minus", "ratio"))):
                point, ci = est[f][1]
                for i, part in enumerate(parts):
                    row.update({f"{f}_{part}_scratch": point[g][i] if g in point else "", f"{f}_{part}_scratch_ci_low": ci[g][0, i] if g in ci else "",
                                f"{f}_{part}_scratch_ci_high": ci[g][1, i] if g in ci else ""})
            rows.append(row)
        png = plot_transfer(env_id, task, groups, out, reps)
        lines += ["", f"![transfer curves on {task}]({png})", ""]
    write_csv(out / "loo.csv", rows)
    lines[summary_at:summary_at] = summary_table(rows)
    text = "\n".join(lines)
    (out / "loo.md").write_text(text)
    return text


def summary_table(rows: list[dict]) -> list[str]:
    """The compact table: per held-out task and method, the means over seeds of the jumpstart, and for finetune and
    task-only the AUC / scratch and the final success (the CIs are in the per-task tables below)."""
    def num(row: dict | None, field: str, digits: int = 2) -> str:
        value = None if row is None or row.get(field, "") == "" else float(row[field])
        return "-" if value is None or not np.isfinite(value) else fixed(value, digits)  # a ratio to a scratch AUC of 0: "-"

    by = {(r["benchmark"], r["held_out"], r["method"], r["regime"]): r for r in rows}
    out = ["## Summary (means over seeds; CIs in the per-task tables)", "",
           "| benchmark | held-out task | method | seeds (finetune / task-only) | jumpstart | finetune AUC / scratch | finetune final | "
           "task-only AUC / scratch | task-only final | scratch AUC | scratch final |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for env_id, task in dict.fromkeys((r["benchmark"], r["held_out"]) for r in rows):
        scratch = by.get((env_id, task, "single", "scratch"))
        for method in dict.fromkeys(r["method"] for r in rows if (r["benchmark"], r["held_out"]) == (env_id, task) and r["regime"] != "scratch"):
            ft, to, zs = (by.get((env_id, task, method, regime)) for regime in ("finetune", "task-only", "zero-shot"))
            seeds = "/".join(str(r["seeds"]) if r is not None else "0" for r in (ft, to))  # finetune / task-only
            out.append(f"| {env_id} | {task} | {method} | {seeds} | {num(zs or ft, 'jumpstart')} | {num(ft, 'auc_ratio_scratch')} | "
                       f"{num(ft, 'final')} | {num(to, 'auc_ratio_scratch')} | {num(to, 'final')} | {num(scratch, 'auc', 3)} | {num(scratch, 'final')} |")
    return out + [""]


def plot_transfer(env_id: str, task: str, groups: dict, out: Path, reps: int) -> str:
    """Success on ``task`` vs transfer steps, one panel per method: finetune, task-only, scratch (mean, 95% CI band over
    seeds, at the steps all seeds share), zero-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({g[0] for g in groups if g != "scratch"})
    cols = min(3, max(1, len(labels)))
    rows_ = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.2 * rows_), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        for name, g, style in (("finetune", (label, "finetune"), "-"), ("task-only", (label, "task-only"), "-"), ("scratch", "scratch", ":")):
            if g not in groups:
                continue
            curves = [m["curve"] for m in groups[g].values()]
            steps = sorted(set.intersection(*(set(c[0]) for c in curves)))
            if not steps:
                continue
            y = np.array([[dict(zip(*c))[s] for s in steps] for c in curves])[:, None, :]  # (seeds, 1, steps)
            point, ci = interval_estimates({name: y}, lambda x: x.mean(axis=(0, 1)), max(200, reps // 10))
            ax.plot(steps, point[name], style, label=name)
            ax.fill_between(steps, ci[name][0], ci[name][1], alpha=0.2)
        if (label, "zero-shot") in groups:
            ax.axhline(np.mean([m["final"] for m in groups[(label, "zero-shot")].values()]), ls="--", color="gray", label="zero-shot")
        ax.set(title=label, xlabel="transfer steps", ylabel=f"success on {task}", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"{env_id}: transfer to held-out {task} (mean over seeds, 95% CI)", fontsize=10)
    fig.tight_layout()
    name = f"loo_{env_id.replace('/', '-')}_{task}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", type=Path, nargs="+", required=True, help="folder(s) holding the LOO runs (and scratch runs)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: reports/<name of the first runs dir>)")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap repetitions")
    a = p.parse_args()
    check_inputs(a.runs_dir, a.reps)
    print(write_loo_report(a.runs_dir, a.out or Path("reports") / a.runs_dir[0].name, a.reps))


if __name__ == "__main__":
    main()
