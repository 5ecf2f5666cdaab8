"""Turn finished runs into tables and figures (protocol.md section 3).

    python scripts/report.py --runs-dir runs/toy_cartpole_mt10            # writes reports/toy_cartpole_mt10/
    python scripts/report.py --runs-dir runs/a runs/b --out reports/x --reference varshare
    python scripts/report.py --runs-dir runs/a --out reports/a_s12 --seeds 1 2       # only seeds 1 and 2

Runs are grouped by benchmark and method label. The label is the sweep's run-name prefix
(``<label>__s<seed>``, ``<label>__<task>__s<seed>`` for the single-task oracle) or else the algorithm
name. Oracle runs of one seed (one run per task) are assembled into one multi-task score vector.
Scores are final per-task success rates (the run's last evaluation, ``summary.json``).

Nothing is dropped silently: unfinished run folders, runs that the sweep's ``grid.tsv`` asked for but
that never finished (or never started), seeds that other methods have, oracle seeds without every task,
and the same run found twice are listed in the report and on stderr. Folders the sweep moved aside
(``*.incomplete-*``) are ignored and counted.

Writes ``report.md`` (per benchmark: mean and IQM of success over runs x tasks with 95% stratified
bootstrap CIs; sample efficiency (success averaged over all evaluations, and the median step at which a
run's mean success first reaches 0.9); active / inference / total parameters; wall clock and SPS; a
per-task table of mean +- sample std over seeds; the probability of improvement of the reference
method over each other method with its 95% CI; for every preset ``<label>`` that has a tuned twin
``<label>_tuned`` (scripts/tune.py --write), the two side by side; with ``--tuning-report``, the tuning
table of scripts/tune.py; with ``--ablation CONFIG``, the L2Soft vs VarShare ablation of the config's
``[ablation]`` table, protocol.md section 8), ``curves_<benchmark>.png`` (IQM and mean success vs
total environment steps, 95% CI bands), ``profiles_<benchmark>.png`` (performance profiles),
``varshare_<benchmark>_<label>.png`` (KL and residual size per task over training, for VarShare runs),
and ``summary.csv`` / ``per_task.csv`` with the numbers of the tables. Bootstrap seeds are fixed, so a
report is reproducible.

Tuning seeds (>= 101) only choose hyperparameters: a report of runs with seeds >= 101 is refused (they
belong in a tuning runs dir, read by scripts/tune.py), and so is any mix of tuning and report seeds, even
with ``--tuning``, which reads a pure tuning dir (``<label>@<configuration>`` rows).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import warnings
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning, module="arch")  # rliable passes a RandomState to arch
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from mtrl.envs import make_suite  # noqa: E402
from mtrl.run import read_jsonl  # noqa: E402
sys.path.insert(0, str(REPO / "scripts"))
from sweep_grid import TUNING_SEED_MIN  # noqa: E402

NAME = re.compile(r"^(?P<label>[^_].*?)(__(?P<task>.+))?__s(?P<seed>\d+)$")


def load_runs(runs_dirs: list[Path], seeds: set[int] | None = None) -> tuple[list[dict], list[str]]:
    """Finished runs (``summary.json`` present), and a warning for every run that is not there: unfinished
    folders, runs listed in a sweep's ``grid.tsv`` without a finished folder, duplicates. With ``seeds``, only
    runs of those seeds are read (the others are counted in one warning)."""
    runs, warnings_, seen, moved_aside, other_seeds = [], [], {}, 0, 0
    for d in runs_dirs:
        finished_names = set()
        for cfg in sorted(Path(d).glob("*/config.json")):
            run_dir = cfg.parent
            if ".incomplete-" in run_dir.name:
                moved_aside += 1
                continue
            if seeds is not None and json.loads(cfg.read_text())["args"]["seed"] not in seeds:
                other_seeds += 1
                continue
            ev = run_dir / "eval.jsonl"
            evals = read_jsonl(ev) if ev.is_file() else []
            if not (run_dir / "summary.json").is_file():
                last = f"last evaluation at step {evals[-1]['global_step']:,}" if evals else "no evaluation yet"
                warnings_.append(f"{run_dir}: not finished (no summary.json; {last})")
                continue
            config, s = json.loads(cfg.read_text()), json.loads((run_dir / "summary.json").read_text())
            m = NAME.match(run_dir.name)
            label = m["label"] if m else config["algo"]
            run = {"dir": run_dir, "config": config, "summary": s, "label": label, "seed": config["args"]["seed"],
                   "task": config["args"].get("task"), "env_id": config["args"]["env_id"], "evals": evals}
            key = (run["env_id"], label, run["seed"], run["task"] or (m["task"] if m else None))  # LOO: <label>__loo-<task>__<regime>__s<seed>
            if key in seen:
                warnings_.append(f"{run_dir}: the same run as {seen[key]} (benchmark, method, seed, task); only the first is used")
                continue
            seen[key] = run_dir
            finished_names.add(run_dir.name)
            runs.append(run)
        grid = Path(d) / "grid.tsv"
        if grid.is_file():
            for line in grid.read_text().splitlines():
                name = line.split("\t")[0]
                m = NAME.match(name)
                if seeds is not None and m and int(m["seed"]) not in seeds:
                    continue
                if name and name not in finished_names and not (Path(d) / name / "config.json").is_file():
                    warnings_.append(f"{Path(d) / name}: in the sweep's grid but never started or failed before writing "
                                     f"its config (log: {Path(d) / 'logs' / (name + '.log')})")
    if moved_aside:
        warnings_.append(f"{moved_aside} folder(s) that the sweep moved aside (*.incomplete-*) are ignored")
    if other_seeds:
        warnings_.append(f"{other_seeds} run folder(s) of seeds other than --seeds {' '.join(map(str, sorted(seeds)))} are left out")
    return runs, warnings_


def check_seeds(runs: list[dict], tuning: bool = False) -> None:
    """Exit with an error if the runs mix tuning seeds (>= 101) and report seeds (1-100), or, for a report
    (``tuning`` False), hold any tuning run at all; ``tuning``: only tuning runs are allowed."""
    tune = [str(r["dir"]) for r in runs if r["seed"] >= TUNING_SEED_MIN]
    report = [str(r["dir"]) for r in runs if r["seed"] < TUNING_SEED_MIN]

    def named(dirs: list[str]) -> str:
        return ", ".join(dirs[:10]) + (f" and {len(dirs) - 10} more" if len(dirs) > 10 else "")

    if tune and report:
        raise SystemExit(f"error: the runs mix tuning seeds (>= {TUNING_SEED_MIN}; only for choosing hyperparameters) and report "
                         f"seeds (1-{TUNING_SEED_MIN - 1}): {len(tune)} tuning run(s): {named(tune)}; {len(report)} report run(s): "
                         f"{named(report)}. Keep tuning runs in their own runs dir (runs/<study>_tuning).")
    if tune and not tuning:
        raise SystemExit(f"error: {len(tune)} run(s) with tuning seeds (>= {TUNING_SEED_MIN}) never appear in a report: {named(tune)}. "
                         "Read a tuning dir with scripts/tune.py, or with --tuning.")
    if report and tuning:
        raise SystemExit(f"error: --tuning reads tuning runs (seeds >= {TUNING_SEED_MIN}) only; report seed run(s): {named(report)}")


def by_step(evals: list[dict]) -> dict[int, dict]:
    """Evaluations keyed by global step; a repeated step (a run resumed at its end) keeps the last line."""
    return {e["global_step"]: e for e in evals}


def score_table(runs: list[dict]) -> tuple[dict, dict, dict, list[str]]:
    """Per (benchmark, label): final success (runs, tasks), curves (runs, tasks, evals) at the evaluation
    steps that all its runs share (x axis: total environment steps, oracle steps x T), the runs themselves,
    and warnings (missing seeds, incomplete oracle seeds, evaluation grids that differ)."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r["env_id"], r["label"])].append(r)
    seeds_of_benchmark = defaultdict(set)
    for r in runs:
        seeds_of_benchmark[r["env_id"]].add(r["seed"])
    scores, curves, members, notes = {}, {}, {}, []
    for key, rs in sorted(groups.items()):
        absent = sorted(seeds_of_benchmark[key[0]] - {r["seed"] for r in rs})
        if absent:
            notes.append(f"{key[0]} {key[1]}: no finished run for seed(s) {', '.join(map(str, absent))} (other methods have them)")
        if rs[0]["task"] is not None:  # single-task oracle: one run per task and seed
            task_names = make_suite(key[0]).task_names
            scale = len(task_names)
            by_seed = defaultdict(dict)
            for r in rs:
                by_seed[r["seed"]][r["task"]] = r
            for s, d in sorted(by_seed.items()):
                if set(d) != set(task_names):
                    notes.append(f"{key[0]} {key[1]} seed {s}: oracle incomplete, no finished run for task(s) "
                                 f"{', '.join(t for t in task_names if t not in d)}; the seed is left out")
            seeds = sorted(s for s, d in by_seed.items() if set(d) == set(task_names))
            if not seeds:
                continue
            grid = [[by_seed[s][t] for t in task_names] for s in seeds]  # (seeds, tasks) of runs
            final = np.array([[run["summary"]["final_success"][t] for run, t in zip(row, task_names)] for row in grid])
            members[key] = [run for row in grid for run in row]
        else:
            rs = sorted(rs, key=lambda r: r["seed"])
            task_names = rs[0]["config"]["task_names"]
            scale = 1
            grid = [[r] * len(task_names) for r in rs]
            final = np.array([[r["summary"]["final_success"][t] for t in task_names] for r in rs])
            members[key] = rs
        evals = [[by_step(run["evals"]) for run in row] for row in grid]
        step_sets = [set(e) for row in evals for e in row]
        common = sorted(set.intersection(*step_sets))
        if set.union(*step_sets) != set(common):
            notes.append(f"{key[0]} {key[1]}: runs were evaluated at different steps; its curve uses the {len(common)} steps all runs share")
        curve = np.array([[[e[st]["success"][t] for st in common] for e, t in zip(row, task_names)] for row in evals])
        scores[key] = (task_names, final)
        curves[key] = ([st * scale for st in common], curve.reshape(len(grid), len(task_names), len(common)))
    return scores, curves, members, notes


def sample_efficiency(steps: list[int], curve: np.ndarray, threshold: float = 0.9) -> tuple[float, str]:
    """Mean success over all evaluations (area under the success curve, normalised), and the median over runs
    of the first evaluation step at which the run's mean success over tasks reaches ``threshold`` ("-" if
    fewer than half of the runs reach it)."""
    if not steps:
        return float("nan"), "-"
    per_run = curve.mean(1)  # (runs, evals)
    firsts = [next((steps[j] for j in range(len(steps)) if r[j] >= threshold), None) for r in per_run]
    reached = sorted(f for f in firsts if f is not None)
    median = f"{int(np.median(firsts)):,}" if len(reached) == len(firsts) else (f"{reached[len(firsts) // 2]:,}" if len(reached) > len(firsts) // 2 else "-")
    return float(per_run.mean()), median


def interval_estimates(score_dict: dict, func, reps: int, seed: int = 0):
    """rliable's stratified-bootstrap point estimates and 95% CIs, the same on every call and one seeded bootstrap
    per key. rliable 1.2 draws its resampling indices from numpy's global generator whatever random_state it is
    given, so the global generator is seeded here (and restored afterwards): a report regenerated from the same run
    files prints the same CIs. rliable resamples all keys of one call from one stream, so a key's CI would move
    when another key joins the dict (a method joining a study's folder); each key gets its own call instead."""
    from rliable import library as rly

    state = np.random.get_state()
    point, ci = {}, {}
    try:
        for key, scores in score_dict.items():
            np.random.seed(seed)
            p, c = rly.get_interval_estimates({key: scores}, func, reps=reps, random_state=np.random.RandomState(seed))
            point[key], ci[key] = p[key], c[key]
        return point, ci
    finally:
        np.random.set_state(state)


def mean_and_iqm(x: np.ndarray) -> np.ndarray:
    from rliable import metrics

    return np.array([metrics.aggregate_mean(x), metrics.aggregate_iqm(x)])


def fixed(x: float, digits: int = 3) -> str:
    """x with `digits` decimals, an exact half rounded up. Success means are fractions (a 10-episode success over
    tasks and evaluations: k / 2000 and the like), so exact halves such as 0.8405 are common, and the float that
    stands for one lies just above or just below it depending on the order of the sums that made it; plain
    formatting would then print 0.840 from one script and 0.841 from another. Snapping to 9 decimals first makes
    every table print the same digits for the same fraction."""
    if not math.isfinite(x):
        return f"{x}"
    return str(Decimal(f"{x:.9f}").quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def fmt_ci(point, ci) -> str:
    return f"{fixed(point)} [{fixed(ci[0])}, {fixed(ci[1])}]"


def wall_clock_and_sps(runs: list[dict], num_tasks: int) -> tuple[float, float]:
    """Minutes per seed (the oracle: summed over its T task runs, its whole cost) and mean SPS per run."""
    wall = sum(r["summary"]["wall_clock_s"] for r in runs) / 60 / (len(runs) // num_tasks if runs[0]["task"] else len(runs))
    return wall, float(np.mean([r["summary"]["mean_SPS"] for r in runs]))


def warnings_section(warnings_: list[str], heading: str) -> list[str]:
    """Print every warning to stderr; return the report's section that lists them ([] without warnings)."""
    for w in warnings_:
        print(f"warning: {w}", file=sys.stderr)
    return [f"## Warnings: {heading}", "", *[f"- {w}" for w in warnings_], ""] if warnings_ else []


def write_report(runs_dirs: list[Path], out: Path, reference: str, reps: int = 2000, tuning: bool = False,
                 tuning_report: Path | None = None, ablation: Path | None = None, seeds: list[int] | None = None,
                 ablation_tasks: list[str] | None = None) -> str:
    from rliable import metrics

    if tuning_report is not None and not tuning_report.is_file():
        raise SystemExit(f"error: --tuning-report {tuning_report}: no such file (scripts/tune.py writes <out>/tuning.md)")
    groups = read_ablation(ablation) if ablation is not None else {}
    runs, warnings_ = load_runs(runs_dirs, set(seeds) if seeds else None)
    if not runs:
        only = f" of seed(s) {' '.join(map(str, seeds))}" if seeds else ""
        raise SystemExit(f"error: no finished run (summary.json){only} under {', '.join(map(str, runs_dirs))}")
    check_seeds(runs, tuning)
    scores, curves, members, notes = score_table(runs)
    warnings_ += notes
    known = sorted({t for names, _ in scores.values() for t in names})
    unknown = [t for t in ablation_tasks or [] if t not in known]
    if unknown:
        raise SystemExit(f"error: --ablation-tasks {' '.join(unknown)}: no such task in these runs; allowed: {', '.join(known)}")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {'Tuning runs (seeds >= %d; not for reporting)' % TUNING_SEED_MIN if tuning else 'Report'}: {', '.join(map(str, runs_dirs))}", "",
             "Final success rate per task (last evaluation). Mean and IQM over runs x tasks, 95% stratified bootstrap "
             f"CIs ({reps} reps, rliable). Parameters: active per task, inference (one task's deployed network), total stored. "
             "Wall clock: minutes per seed (the oracle: its T task runs together).", ""]
    lines += warnings_section(warnings_, "missing, unfinished or partial runs (not in the numbers below)")
    summary_rows, task_rows = [], []
    for env_id in sorted({k[0] for k in scores}):
        keys = sorted((k for k in scores if k[0] == env_id), key=lambda k: k[1])
        score_dict = {k[1]: scores[k][1] for k in keys}
        point, ci = interval_estimates(score_dict, mean_and_iqm, reps)
        lines += [f"## {env_id}", "", "| method | runs | mean success | IQM success | success AUC | steps to 0.9 | active params | inference | total | wall clock (min) | SPS |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k in keys:
            label = k[1]
            p = members[k][0]["summary"]["params"]
            wall, sps = wall_clock_and_sps(members[k], len(scores[k][0]))
            auc, to_threshold = sample_efficiency(*curves[k])
            lines.append(f"| {label} | {len(score_dict[label])} | {fmt_ci(point[label][0], ci[label][:, 0])} | "
                         f"{fmt_ci(point[label][1], ci[label][:, 1])} | {fixed(auc)} | {to_threshold} | {p['active_per_task']:,} | {p['inference']:,} | "
                         f"{p['total']:,} | {wall:.1f} | {sps:,.0f} |")
            summary_rows.append({"benchmark": env_id, "method": label, "runs": len(score_dict[label]),
                                 "mean": point[label][0], "mean_ci_low": ci[label][0, 0], "mean_ci_high": ci[label][1, 0],
                                 "iqm": point[label][1], "iqm_ci_low": ci[label][0, 1], "iqm_ci_high": ci[label][1, 1],
                                 "success_auc": auc, "steps_to_0.9": to_threshold.replace(",", ""), "active_params": p["active_per_task"],
                                 "inference_params": p["inference"], "total_params": p["total"], "wall_clock_min": wall, "sps": sps})
        pairs = [label for label in score_dict if f"{label}_tuned" in score_dict]
        if pairs:
            lines += ["", "Default vs tuned (the spec-default preset and its tuned twin from scripts/tune.py --write; "
                          "mean and IQM of final success with 95% CIs, as above):", "",
                      "| method | default: runs | default: mean success | default: IQM success | tuned: runs | tuned: mean success | tuned: IQM success |",
                      "|---|---:|---|---|---:|---|---|"]
            for label in pairs:
                cells = [f"{len(score_dict[m])} | {fmt_ci(point[m][0], ci[m][:, 0])} | {fmt_ci(point[m][1], ci[m][:, 1])}" for m in (label, f"{label}_tuned")]
                lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
        task_names = scores[keys[0]][0]
        lines += ["", "Per-task success, mean +- sample std over seeds:", "", "| method | " + " | ".join(task_names) + " |",
                  "|---|" + "---:|" * len(task_names)]
        for k in keys:
            names, final = scores[k]
            col = {t: final[:, i] for i, t in enumerate(names)}
            std = {t: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for t, v in col.items()}
            lines.append(f"| {k[1]} | " + " | ".join(f"{col[t].mean():.2f} +- {std[t]:.2f}" if t in col else "-" for t in task_names) + " |")
            task_rows += [{"benchmark": env_id, "method": k[1], "task": t, "seeds": len(col[t]), "mean": col[t].mean(), "std": std[t]} for t in names]
        if reference in score_dict:
            lines += ["", f"Probability of improvement of {reference} over each method: P(X > Y) + P(X = Y) / 2 for the final "
                          "success X of a random run of it and Y of the other method on the same task, averaged over tasks "
                          "(0.5 = no difference), with 95% stratified bootstrap CIs:", ""]
            ref = score_dict[reference]
            others = {label: s for label, s in score_dict.items() if label != reference and s.shape[1] == ref.shape[1]}
            poi, poi_ci = interval_estimates({label: [ref, s] for label, s in others.items()}, metrics.probability_of_improvement, reps)
            for label in others:
                lines.append(f"- P({reference} > {label}) = {fmt_ci(float(poi[label]), np.ravel(poi_ci[label]))}")
            for label in sorted(set(score_dict) - set(others) - {reference}):
                lines.append(f"- {label}: not comparable with {reference} (different task sets)")
        lines.append("")
        lines += ablation_section(groups, {k[1]: k for k in keys}, score_dict, point, ci, curves, members,
                                  {k[1]: scores[k][0] for k in keys}, ablation_tasks)
        plot_benchmark(env_id, {k[1]: curves[k] for k in keys}, score_dict, out, reps)
        stem = env_id.replace("/", "-")
        lines += [f"![curves](curves_{stem}.png) ![profiles](profiles_{stem}.png)", ""]
        for k in keys:
            if plot_varshare(env_id, k[1], members[k], out):
                lines += [f"VarShare diagnostics of {k[1]} (per task, mean over seeds): KL(q_t || p) and ||mu_t|| / ||theta||.", "",
                          f"![{k[1]} diagnostics](varshare_{stem}_{k[1]}.png)", ""]
            lines += residual_directions(env_id, k[1], members[k], out)
    if tuning_report is not None:  # its tables, headings two levels down
        lines += [f"## Hyperparameter tuning ({tuning_report})", ""]
        lines += [("##" + line if line.startswith("#") else line) for line in tuning_report.read_text().splitlines()] + [""]
    write_csv(out / "summary.csv", summary_rows)
    write_csv(out / "per_task.csv", task_rows)
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def final_task_kl(final_kl: dict, task: str) -> float:
    """A task's final KL(q_t || p) in nats from summary.json's ``final_kl`` (mean part + variance part)."""
    return final_kl.get(f"varshare/kl_mean_part/{task}", 0.0) + final_kl.get(f"varshare/kl_var_part/{task}", 0.0)


EARLY_FRACTION = 0.25  # the ablation's early AUC: evaluations in the first quarter of the budget


def read_ablation(config: Path) -> dict[str, list[str]]:
    """The config's ``[ablation]`` table (protocol.md section 8): group name -> [methods] labels, in the table's order."""
    import tomllib

    if not config.is_file():
        raise SystemExit(f"error: --ablation {config}: no such config file")
    data = tomllib.loads(config.read_text())
    table, methods = data.get("ablation"), data.get("methods", {})
    if not isinstance(table, dict) or not table or not all(isinstance(v, list) and v for v in table.values()):
        raise SystemExit(f"error: --ablation {config}: needs an [ablation] table of groups, each a non-empty list of [methods] labels")
    unknown = [label for labels in table.values() for label in labels  # <label>_tuned: written by scripts/tune.py --write
               if label not in methods and not (label.endswith("_tuned") and label[: -len("_tuned")] in methods)]
    if unknown:
        raise SystemExit(f"error: [ablation] in {config}: {', '.join(unknown)} not in its [methods] table; allowed: {', '.join(methods)}")
    return table


def kl_factor(run: dict, ref_sigma0: dict | None) -> float | None:
    """The factor that puts a run's final KL at the reference prior: ``(sigma0_run / sigma0_ref)^2`` when every layer's
    sigma0 differs from the reference by one ratio (``prior_scale`` alone differs, fan_in mode) and the run's KL is a
    mean part only (``mu^2 / (2 sigma0^2)`` scales exactly so); 1 for the same prior or where sigma0 is not recorded;
    None where no single factor exists."""
    sigma0 = run["config"].get("derived", {}).get("sigma0")
    if not sigma0 or not ref_sigma0:
        return 1.0
    if set(sigma0) != set(ref_sigma0):
        return None
    ratios = [sigma0[k] / ref_sigma0[k] for k in sigma0]
    if max(ratios) - min(ratios) > 1e-9 * max(ratios):
        return None
    if abs(ratios[0] - 1.0) <= 1e-12:
        return 1.0
    has_var = any(v != 0 for k, v in (run["summary"].get("final_kl") or {}).items() if k.startswith("varshare/kl_var_part/"))
    return None if has_var else ratios[0] ** 2


def ablation_section(groups: dict, keys: dict, score_dict: dict, point: dict, ci: dict, curves: dict, members: dict,
                     task_names: dict, focus_tasks: list[str] | None = None) -> list[str]:
    """One table per ablation group: final success (mean, 95% CI), early AUC (mean success over the evaluations in the
    first quarter of the budget) and AUC (all evaluations), the residual price each task pays (final KL in nats at the
    prior of the group's first row, see :func:`kl_factor`; L2Soft and mean mode: the KL's mean part, i.e. the penalty at
    the matched price over beta) and the residual directions (mean and most negative off-diagonal cosine of the task x
    task residual-mean cosines), mean over seeds; and each seed's final success (mean over tasks), so a table can
    show the seeds apart. Then one summary table of every group's rows (a row in two groups: once), with the active
    parameters per task and, for ``focus_tasks``, each task's final KL and final success (mean over seeds): the
    README's LunarLander-MT10 ablation table is this table as printed."""
    lines, summary, in_summary = [], [], set()
    for group, labels in groups.items():
        present = [label for label in labels if label in score_dict]
        missing = [label for label in labels if label not in score_dict]
        if not present:
            continue
        tasks = score_dict[present[0]].shape[1]
        ref_sigma0 = members[keys[present[0]]][0]["config"].get("derived", {}).get("sigma0")
        lines += [f"### Ablation: {group} (protocol.md section 8)", "",
                  f"Early AUC: mean success over the evaluations in the first {EARLY_FRACTION:.0%} of the budget; AUC: over all. "
                  "KL: final KL(q_t || p) per task in nats, summed over tasks (L2Soft and mean mode: its mean part, the matched "
                  f"penalty / beta), at the prior of the group's first row ({present[0]}): a run with another prior scale (an "
                  "L2Soft row pinned to another c) has its mean part rescaled by (sigma0_run / sigma0_ref)^2, '-' where no single "
                  "factor exists. Cosines: off-diagonal entries of the task x task cosine of the residual means. Per seed: each run's "
                  "final success, mean over tasks (seed: success).", "",
                  "| method | runs | mean success | early AUC | AUC | total KL | largest task KL | mean cosine | lowest cosine | per seed |",
                  "|---|---:|---|---:|---:|---:|---|---:|---:|---|"]
        task_kl = {}
        for label in present:
            steps, curve = curves[keys[label]]
            early = [j for j, st in enumerate(steps) if st <= EARLY_FRACTION * steps[-1]] if steps else []
            early_auc = fixed(curve[:, :, early].mean()) if early else "-"
            runs = members[keys[label]]
            kl = [r["summary"].get("final_kl") or {} for r in runs]
            factors = [kl_factor(r, ref_sigma0) for r in runs]
            kl_cells, cos_cells = ["-", "-"], ["-", "-"]
            if kl and all(kl) and None not in factors:
                names = list(runs[0]["summary"]["final_success"])
                per_task = {t: float(np.mean([f * final_task_kl(k, t) for k, f in zip(kl, factors)]))
                            for t in names}
                task_kl[label] = per_task
                top = max(per_task, key=per_task.get)
                kl_cells = [f"{sum(per_task.values()):.1f}", f"{top} {per_task[top]:.1f}"]
            if all(r["summary"].get("residual_cosine") for r in runs):
                cos = np.mean([np.asarray(r["summary"]["residual_cosine"]) for r in runs], 0)
                off = cos[~np.eye(len(cos), dtype=bool)]
                cos_cells = [f"{off.mean():+.2f}", f"{off.min():+.2f}"]
            runs_per_seed = len(runs) // len(score_dict[label])  # the oracle: its T task runs per seed, in seed order
            per_seed = ", ".join(f"{r['seed']}: {fixed(float(row.mean()), 2)}" for r, row in zip(runs[::runs_per_seed], score_dict[label]))
            lines.append(f"| {label} | {len(score_dict[label])} | {fmt_ci(point[label][0], ci[label][:, 0])} | {early_auc} | "
                         f"{fixed(curve.mean())} | {' | '.join(kl_cells)} | {' | '.join(cos_cells)} | {per_seed} |")
            if label not in in_summary:
                in_summary.add(label)
                cells = [group, label, str(len(score_dict[label])), f"{runs[0]['summary']['params']['active_per_task']:,}",
                         fmt_ci(point[label][0], ci[label][:, 0]), per_seed, early_auc, fixed(curve.mean()), cos_cells[1]]
                if focus_tasks:  # a task this row did not train on (leave-one-out): '-'
                    kl_of, names = task_kl.get(label), list(task_names[label])
                    cells.append(" / ".join(f"{kl_of[t]:.1f}" if t in kl_of else "-" for t in focus_tasks) if kl_of else "-")
                    cells.append(" / ".join(f"{score_dict[label][:, names.index(t)].mean():.2f}" if t in names else "-" for t in focus_tasks))
                summary.append(cells)
        if task_kl:
            names = list(next(iter(task_kl.values())))
            lines += ["", f"Final KL per task, nats (mean over seeds; {tasks} tasks):", "", "| method | " + " | ".join(names) + " |",
                      "|---|" + "---:|" * len(names)]
            lines += [f"| {label} | " + " | ".join(f"{v[t]:.1f}" for t in names) + " |" for label, v in task_kl.items()]
        if missing:
            lines += ["", f"Not run yet in this group: {', '.join(missing)}."]
        lines.append("")
    if summary:
        focus = " / ".join(focus_tasks or [])
        head = ["group", "method", "runs", "active params", "final success [95% CI]", "per seed (seed: success)", "early AUC", "AUC",
                "lowest cosine"] + ([f"KL {focus} (nats)", f"success {focus}"] if focus_tasks else [])
        lines += ["### Ablation summary: every group's rows in one table", "",
                  "The columns of the group tables above; KL: per task at the prior of the row's group's first row ('-' as "
                  "above); success: final, mean over seeds.", "",
                  "| " + " | ".join(head) + " |", "|---|---|---:|---:|---|---|---:|---:|---:|" + "---|---|" * bool(focus_tasks)]
        lines += ["| " + " | ".join(cells) + " |" for cells in summary] + [""]
    return lines


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)


def plot_varshare(env_id: str, label: str, runs: list[dict], out: Path) -> bool:
    """KL and relative residual size per task over training, from the ``kl`` / ``rel_residual`` fields that
    ppo_varshare writes in eval.jsonl (mean over seeds, at the steps all runs share). False if the runs
    have none (not VarShare)."""
    if not all(r["evals"] and "kl" in r["evals"][0] for r in runs):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [by_step(r["evals"]) for r in runs]
    steps = sorted(set.intersection(*(set(e) for e in evals)))
    tasks = list(runs[0]["evals"][0]["kl"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, field, ylabel in ((axes[0], "kl", "KL(q_t || p) (nats)"), (axes[1], "rel_residual", "||mu_t|| / ||theta|| (mean over layers)")):
        for t in tasks:
            ax.plot(steps, np.mean([[e[st][field][t] for st in steps] for e in evals], 0), label=t)
        ax.set(xlabel="environment steps (all tasks)", ylabel=ylabel)
    axes[0].set_title(f"{env_id} {label}: KL per task")
    axes[1].set_title("residual size per task")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / f"varshare_{env_id.replace('/', '-')}_{label}.png", dpi=120)
    plt.close(fig)
    return True


def residual_directions(env_id: str, label: str, runs: list[dict], out: Path) -> list[str]:
    """VarShare and L2Soft runs (``residual_cosine`` in summary.json): the task x task cosine similarity of the
    per-task residual means (all layers flattened), mean over seeds, as a heatmap, and each task's final KL
    (VarShare) per seed. Returns the report lines ([] for other methods)."""
    if not all(r["summary"].get("residual_cosine") for r in runs):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(runs[0]["summary"]["final_success"])
    cos = np.mean([np.asarray(r["summary"]["residual_cosine"]) for r in runs], 0)
    stem = f"residual_cosine_{env_id.replace('/', '-')}_{label}"
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=9 if len(tasks) <= 5 else 5)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"{label}: cosine of residual means, task x task ({len(runs)} seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)
    lines = [f"Residual directions of {label} (cosine similarity of the per-task residual means, all layers flattened, "
             f"mean over {len(runs)} seeds; where a task's residual is zero its row is 0):", "", f"![{label} residual directions]({stem}.png)", ""]
    kl = [r["summary"].get("final_kl") or {} for r in runs]
    if all(kl):
        total = {t: [final_task_kl(k, t) for k in kl] for t in tasks}
        lines += [f"Final KL(q_t || p) per task of {label}, nats (mean over seeds; seeds in brackets):", "", "| task | KL | per seed |", "|---|---:|---|"]
        lines += [f"| {t} | {np.mean(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} |" for t, v in total.items()] + [""]
    return lines


def plot_benchmark(env_id: str, curves: dict, score_dict: dict, out: Path, reps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import library as rly
    from rliable import metrics

    stem = env_id.replace("/", "-")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, (steps, curve) in curves.items():  # curve: (runs, tasks, evals)
        if not steps:
            continue

        def iqm_and_mean_per_eval(x):
            return np.array([metrics.aggregate_iqm(x[..., j]) for j in range(x.shape[-1])] + [x[..., j].mean() for j in range(x.shape[-1])])

        point, ci = interval_estimates({label: curve}, iqm_and_mean_per_eval, max(200, reps // 10))
        n = len(steps)
        for ax, part in ((axes[0], slice(0, n)), (axes[1], slice(n, 2 * n))):
            ax.plot(steps, point[label][part], label=label)
            ax.fill_between(steps, ci[label][0][part], ci[label][1][part], alpha=0.2)
    for ax, name in zip(axes, ("IQM success", "mean success")):
        ax.set(xlabel="environment steps (all tasks)", ylabel=name, title=f"{env_id}: {name} (95% CI)", ylim=(-0.02, 1.02))
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"curves_{stem}.png", dpi=120)
    plt.close(fig)

    taus = np.linspace(0, 1, 21)
    dists, dist_cis = interval_estimates(score_dict, lambda x: rly.score_distributions(x, taus), max(200, reps // 10))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in score_dict:
        ax.plot(taus, dists[label], label=label)
        ax.fill_between(taus, dist_cis[label][0], dist_cis[label][1], alpha=0.2)
    ax.set(xlabel="success threshold tau", ylabel="fraction of runs x tasks with success > tau", title=env_id)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"profiles_{stem}.png", dpi=120)
    plt.close(fig)


def check_inputs(runs_dirs: list[Path], reps: int, seeds: list[int] | None = None) -> None:
    """Exit with an error unless every --runs-dir folder exists, --reps is at least 100 and every --seeds is >= 1."""
    for d in runs_dirs:
        if not d.is_dir():
            raise SystemExit(f"error: --runs-dir {d}: no such folder")
    if reps < 100:
        raise SystemExit(f"error: --reps {reps}: use at least 100 bootstrap repetitions")
    if seeds is not None and (not seeds or min(seeds) < 1):
        raise SystemExit(f"error: --seeds {' '.join(map(str, seeds or []))}: give one or more seeds, each >= 1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", type=Path, nargs="+", required=True, help="folder(s) holding run folders")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: reports/<name of the first runs dir>)")
    p.add_argument("--reference", default="varshare", help="method whose probability of improvement over the others is reported")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap repetitions")
    p.add_argument("--tuning", action="store_true", help="read a pure tuning runs dir (seeds >= 101); without it such runs are refused")
    p.add_argument("--tuning-report", type=Path, default=None, help="a tuning.md of scripts/tune.py to include in report.md")
    p.add_argument("--ablation", type=Path, default=None, help="a config with an [ablation] table: add its groups' tables (protocol.md section 8)")
    p.add_argument("--ablation-tasks", nargs="+", default=None,
                   help="with --ablation: tasks whose final KL and success get columns in the ablation summary table")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="only runs of these seeds (e.g. the seeds every ablation row has); default: every seed present")
    a = p.parse_args()
    check_inputs(a.runs_dir, a.reps, a.seeds)
    if a.ablation_tasks and a.ablation is None:
        raise SystemExit(f"error: --ablation-tasks {' '.join(a.ablation_tasks)}: needs --ablation CONFIG (its tables carry the columns)")
    print(write_report(a.runs_dir, a.out or Path("reports") / a.runs_dir[0].name, a.reference, a.reps, a.tuning, a.tuning_report,
                       a.ablation, a.seeds, a.ablation_tasks))


if __name__ == "__main__":
    main()
