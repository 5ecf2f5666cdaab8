"""Choose each method's hyperparameters from its tuning runs (the config's ``[tuning]`` table).

    bash scripts/sweep.sh --config configs/toy_cartpole_targets_mt10.toml --tune -j 2 --runs-dir runs/targets_tuning
    python scripts/tune.py --config configs/toy_cartpole_targets_mt10.toml --runs-dir runs/targets_tuning \\
        --out reports/targets_tuning --write

Protocol: tuning seeds (>= 101, the table's ``seeds``) only choose hyperparameters; every tuned method has
the same number of configurations, declared in the config before any tuning run. Per method and
configuration (runs ``<label>@<configuration>__s<seed>``): the mean final success over the tuning seeds
(mean over seeds x tasks of the last evaluation, ``summary.json``), the success AUC (success averaged over
all evaluations, report.py's definition) and the seeds finished. The winner of a method: the highest mean
final success; a tie (equal to 1e-9) is broken by the higher AUC, a tie in both by the table's order.

Writes ``<out>/tuning.md`` and ``<out>/tuning.csv`` (every configuration, the chosen one marked). With
``--write``, the config's ``[methods]`` table gets one preset per tuned method,
``<label>_tuned = [algo, preset flags..., winning configuration's flags...]`` (a preset option that the winning
flags set again is dropped from the preset flags), after a comment naming the
tuning report (an existing ``<label>_tuned`` line is replaced; the rest of the file is left as it is).
A configuration with fewer finished seeds than the others (or than the table's seeds) stops the choice
unless ``--allow-incomplete``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

from report import check_seeds, fixed, load_runs, sample_efficiency, score_table  # noqa: E402
from sweep_grid import read_methods, read_tuning  # noqa: E402

TIE = 1e-9


def fail(msg: str) -> None:
    print(f"tune.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def evaluate(config: Path, runs_dirs: list[Path]) -> tuple[dict, list[dict], list[str]]:
    """The tuning table, one row per (method, configuration) in the table's order, and warnings."""
    methods = read_methods(config)
    tuning = read_tuning(config, methods)
    env_id = tomllib.loads(config.read_text()).get("env_id")
    runs, warnings_ = load_runs(runs_dirs)
    check_seeds(runs, tuning=True)
    declared = {f"{label}@{name}" for label, configs in tuning["methods"].items() for name in configs}
    keep = []
    for r in runs:
        if env_id and r["env_id"] != env_id:
            warnings_.append(f"{r['dir']}: benchmark {r['env_id']}, not the config's {env_id}; ignored")
        elif r["label"] not in declared:
            warnings_.append(f"{r['dir']}: {r['label']} is not a configuration of the [tuning] table of {config}; ignored")
        else:
            keep.append(r)
    scores, curves, members, notes = score_table(keep) if keep else ({}, {}, {}, [])
    warnings_ += notes
    budgets = sorted({r["config"]["args"].get("total_timesteps") for r in keep if r["task"] is None} - {None})  # oracle runs: a share
    if len(budgets) > 1:
        warnings_.append(f"the tuning runs have different budgets: {', '.join(f'{b:,}' for b in budgets)} steps")
    rows = []
    for label, configs in tuning["methods"].items():
        for name, flags in configs.items():
            key = next((k for k in scores if k[1] == f"{label}@{name}"), None)
            row = {"method": label, "configuration": name, "flags": flags, "seed_list": [], "mean_success": math.nan, "success_auc": math.nan}
            if key is not None:
                row["seed_list"] = sorted({r["seed"] for r in members[key]})
                row["mean_success"] = float(scores[key][1].mean())
                row["success_auc"] = sample_efficiency(*curves[key])[0]
            rows.append(row)
    return {**tuning, "env_id": env_id, "methods_table": methods, "budgets": budgets}, rows, warnings_


def choose(tuning: dict, rows: list[dict], allow_incomplete: bool) -> tuple[dict[str, dict], list[str]]:
    """The winning row of every method that has runs, and notes. Marks rows ``complete`` / ``chosen``."""
    winners, notes, refused = {}, [], []
    for label in tuning["methods"]:
        mine = [r for r in rows if r["method"] == label]
        wanted = set(tuning["seeds"]).union(*(r["seed_list"] for r in mine))
        for r in mine:
            r["complete"] = set(r["seed_list"]) == wanted
            r["chosen"] = False
        if not any(r["seed_list"] for r in mine):
            notes.append(f"{label}: no finished tuning run; nothing chosen")
            continue
        short = [r for r in mine if not r["complete"]]
        if short:
            text = "; ".join(f"{label}@{r['configuration']} has seed(s) {', '.join(map(str, r['seed_list'])) or 'none'}" for r in short)
            msg = f"{label}: configurations with fewer finished seeds than the others (seeds {', '.join(map(str, sorted(wanted)))}): {text}"
            if not allow_incomplete:
                refused.append(msg)
                continue
            notes.append(msg + " (chosen anyway: --allow-incomplete)")
        candidates = [r for r in mine if r["seed_list"]]
        best = candidates[0]
        auc = lambda r: -math.inf if math.isnan(r["success_auc"]) else r["success_auc"]  # noqa: E731
        for r in candidates[1:]:
            if r["mean_success"] > best["mean_success"] + TIE or (abs(r["mean_success"] - best["mean_success"]) <= TIE and auc(r) > auc(best) + TIE):
                best = r
        best["chosen"] = True
        tied = [r for r in candidates if r is not best and abs(r["mean_success"] - best["mean_success"]) <= TIE]
        if tied:
            notes.append(f"{label}: mean final success tied with {', '.join(r['configuration'] for r in tied)}; "
                         f"the success AUC chose {best['configuration']}" + (" (AUC tied too: the table's order)" if any(abs(auc(r) - auc(best)) <= TIE for r in tied) else ""))
        winners[label] = best
    if refused:
        fail("not choosing; wait for the runs, or pass --allow-incomplete:\n  " + "\n  ".join(refused))
    return winners, notes


def option_groups(flags: list[str]) -> list[list[str]]:
    """``["--a", "1", "--b", "--c", "2", "3"]`` -> ``[["--a", "1"], ["--b"], ["--c", "2", "3"]]`` (an option and its values)."""
    groups: list[list[str]] = []
    for f in flags:
        if f.startswith("--") or not groups:
            groups.append([f])
        else:
            groups[-1].append(f)
    return groups


def tuned_preset(tuning: dict, label: str, winner: dict) -> list[str]:
    """``[algo, preset flags..., winning flags...]``, without the preset's options that the winning flags set again
    (the run is the same, as the last value wins; the written preset keeps one value per option)."""
    algo, *preset = tuning["methods_table"][label]
    won = {g[0] for g in option_groups(winner["flags"])}
    kept = [f for g in option_groups(preset) if g[0] not in won for f in g]
    return [algo, *kept, *winner["flags"]]


def seeds_text(seeds: list[int]) -> str:
    s = sorted(seeds)
    return f"{s[0]}-{s[-1]}" if len(s) > 2 and s == list(range(s[0], s[-1] + 1)) else ", ".join(map(str, s))


def write_tables(out: Path, config: Path, runs_dirs: list[Path], tuning: dict, rows: list[dict], winners: dict, notes: list[str],
                 warnings_: list[str]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    k = len(next(iter(tuning["methods"].values())))
    budget = (" or ".join(f"{b:,}" for b in tuning["budgets"]) + " environment steps per run") if tuning["budgets"] else "budget not recorded in the runs"
    lines = [f"# Hyperparameter tuning: {config}", "",
             f"Benchmark {tuning['env_id']}. Tuning runs: {', '.join(map(str, runs_dirs))}; tuning seeds {seeds_text(tuning['seeds'])} "
             f"(never reported); {budget}. {len(tuning['methods'])} method(s), {k} configurations each, "
             "declared in the config's [tuning] table. Rule: the highest mean final success over the tuning seeds (mean over "
             "seeds x tasks of the last evaluation), ties broken by the success AUC (success averaged over all evaluations, as "
             "in report.py).", "",
             "| method | configuration | flags | seeds | mean final success | success AUC | chosen |",
             "|---|---|---|---:|---:|---:|:---:|"]
    for r in rows:
        seeds = f"{len(r['seed_list'])}" + ("" if r.get("complete", True) else " (incomplete)")
        num = lambda v: "-" if math.isnan(v) else fixed(v)  # noqa: E731
        lines.append(f"| {r['method']} | {r['configuration']} | `{' '.join(r['flags'])}` | {seeds} | {num(r['mean_success'])} | "
                     f"{num(r['success_auc'])} | {'**chosen**' if r.get('chosen') else ''} |")
    if winners:
        lines += ["", "Tuned presets (`--write` puts them in the config's [methods] table):", ""]
        lines += [f"- `{label}_tuned = {toml_array(tuned_preset(tuning, label, w))}` ({w['configuration']})" for label, w in winners.items()]
    if notes or warnings_:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes + warnings_]]
    text = "\n".join(lines) + "\n"
    (out / "tuning.md").write_text(text)
    with (out / "tuning.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["benchmark", "method", "configuration", "flags", "seeds", "seed_list", "mean_success",
                                          "success_auc", "complete", "chosen"])
        w.writeheader()
        for r in rows:
            w.writerow({"benchmark": tuning["env_id"], "method": r["method"], "configuration": r["configuration"], "flags": " ".join(r["flags"]),
                        "seeds": len(r["seed_list"]), "seed_list": " ".join(map(str, r["seed_list"])),
                        "mean_success": "" if math.isnan(r["mean_success"]) else f"{r['mean_success']:.6g}",
                        "success_auc": "" if math.isnan(r["success_auc"]) else f"{r['success_auc']:.6g}",
                        "complete": int(r.get("complete", False)), "chosen": int(r.get("chosen", False))})
    return text


def toml_array(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in items) + "]"


def write_back(config: Path, presets: dict[str, tuple[list[str], str]]) -> None:
    """Put ``<label>_tuned = [...]`` lines (each after its comment) in the [methods] table of ``config``: an
    existing ``<label>_tuned`` line (and the comment this script wrote above it) is replaced, a new one goes
    after the table's last entry. Every other line stays as it is; the result must parse to the same
    tables plus the tuned presets, or nothing is written."""
    text = config.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    header = re.compile(r"^\s*\[")
    start = next((i for i, line in enumerate(lines) if re.match(r"^\s*\[\s*methods\s*\]\s*(#.*)?$", line)), None)
    if start is None:
        fail(f"{config}: no [methods] table to write the tuned presets into")
    for label, (preset, comment) in presets.items():
        end = next((i for i in range(start + 1, len(lines)) if header.match(lines[i])), len(lines))
        new = [f"# {label}_tuned: {comment}\n", f"{label}_tuned = {toml_array(preset)}\n"]
        at = next((i for i in range(start + 1, end) if re.match(rf"^\s*{re.escape(label)}_tuned\s*=", lines[i])), None)
        if at is not None:
            first = at - 1 if at - 1 > start and lines[at - 1].startswith(f"# {label}_tuned:") else at
            lines[first : at + 1] = new
        else:
            last = max((i for i in range(start + 1, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")), default=start)
            lines[last + 1 : last + 1] = new
    new_text = "".join(lines)
    try:
        before, after = tomllib.loads(text), tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as e:
        fail(f"{config}: editing the [methods] table would break the file ({e}); nothing written")
    expected = {**before, "methods": {**before["methods"], **{f"{label}_tuned": p for label, (p, _) in presets.items()}}}
    if after != expected:
        fail(f"{config}: editing the [methods] table would change more than the tuned presets; nothing written")
    config.write_text(new_text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the benchmark config with the [methods] and [tuning] tables")
    p.add_argument("--runs-dir", type=Path, nargs="+", required=True, help="the tuning runs dir(s) (sweep.sh --tune)")
    p.add_argument("--out", type=Path, required=True, help="folder for tuning.md and tuning.csv")
    p.add_argument("--write", action="store_true", help="write <label>_tuned presets into the config's [methods] table")
    p.add_argument("--allow-incomplete", action="store_true", help="choose even if some configurations have fewer finished seeds")
    a = p.parse_args()
    if not a.config.is_file():
        fail(f"--config {a.config}: no such file")
    for d in a.runs_dir:
        if not d.is_dir():
            fail(f"--runs-dir {d}: no such folder")
    tuning, rows, warnings_ = evaluate(a.config, a.runs_dir)
    for w in warnings_:
        print(f"warning: {w}", file=sys.stderr)
    winners, notes = choose(tuning, rows, a.allow_incomplete)
    print(write_tables(a.out, a.config, a.runs_dir, tuning, rows, winners, notes, warnings_))
    if a.write and winners:
        report = a.out / "tuning.md"
        try:
            report = report.resolve().relative_to(REPO)
        except ValueError:
            pass
        incomplete = {label for label in winners if not all(r["complete"] for r in rows if r["method"] == label)}
        write_back(a.config, {label: (tuned_preset(tuning, label, w), f"scripts/tune.py chose {w['configuration']} on tuning seeds "
                                      f"{seeds_text(w['seed_list'])}{' (INCOMPLETE tuning)' if label in incomplete else ''}; see {report}")
                              for label, w in winners.items()})
        print(f"wrote {', '.join(f'{label}_tuned' for label in winners)} into the [methods] table of {a.config}")


if __name__ == "__main__":
    main()
