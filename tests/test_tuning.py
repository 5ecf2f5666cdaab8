"""Hyperparameter tuning (protocol: tuning seeds >= 101 choose hyperparameters, never reported): the config's
[tuning] table, scripts/sweep.sh --tune, scripts/tune.py (winner rule, write-back) and report.py's refusal to
mix tuning and report seeds. No training: the sweep is dry-run, the runs are fabricated as test_pipeline does."""

import json
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO
from test_pipeline import fake_run

SWEEP = ["bash", str(REPO / "scripts" / "sweep.sh")]
TUNE = [sys.executable, str(REPO / "scripts" / "tune.py")]
REPORT = [sys.executable, str(REPO / "scripts" / "report.py")]
ENV = "toy/CartPole-MT10"

CONFIG = """env_id = "toy/CartPole-MT10"   # a comment that must survive --write
learning_rate = 0.001

[methods]
single = ["ppo_single"]
embed = ["ppo_mtl_embed"]
vs = ["ppo_varshare", "--hidden-sizes", "36", "36"]   # matched width

# ---- tuning
[tuning]
seeds = "101-103"
total_timesteps = 20480
[tuning.vs]
"c0.1_b1" = ["--prior-scale", "0.1", "--kl-coef", "1"]
"c1_b0.1" = ["--prior-scale", "1", "--kl-coef", "0.1"]
[tuning.embed]
"lr1e-3" = ["--learning-rate", "1e-3"]
"lr3e-3" = ["--learning-rate", "3e-3"]
"""


def run(cmd, cwd=REPO, timeout=1200):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def tasks():
    from mtrl.envs import make_suite

    return make_suite(ENV).task_names


def write_config(tmp_path: Path, text: str = CONFIG) -> Path:
    cfg = tmp_path / "grid.toml"
    cfg.write_text(text)
    return cfg


def set_curve(run_dir: Path, fractions: list[float]) -> None:
    """Rewrite a fabricated run's evaluations as ``fraction x final success`` at its evaluation steps."""
    final = json.loads((run_dir / "summary.json").read_text())["final_success"]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    for e, f in zip(evals, fractions, strict=True):
        e["success"] = {t: f * v for t, v in final.items()}
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))


def tuning_runs(runs: Path, skip: tuple[str, ...] = ()) -> None:
    """vs: c1_b0.1 (0.7) beats c0.1_b1 (0.5) on mean final success. embed: both 0.6, lr1e-3 rising linearly
    (AUC 0.6 x (1/3 + 2/3 + 1) / 3 = 0.4), lr3e-3 at 0.6 from its first evaluation (AUC 0.6): lr3e-3 wins the tie."""
    ts = tasks()
    finals = {"vs@c0.1_b1": dict.fromkeys(ts, 0.5), "vs@c1_b0.1": dict.fromkeys(ts, 0.7),
              "embed@lr1e-3": {t: (0.4 if i % 2 else 0.8) for i, t in enumerate(ts)}, "embed@lr3e-3": dict.fromkeys(ts, 0.6)}
    for label, final in finals.items():
        for seed in (101, 102, 103):
            name = f"{label}__s{seed}"
            if name in skip:
                continue
            fake_run(runs, name, "ppo_x", seed, final)
            if label == "embed@lr3e-3":
                set_curve(runs / name, [1.0, 1.0, 1.0])


# ---- the [tuning] table and sweep.sh --tune

def test_sweep_tune_expands_methods_x_configurations_x_tuning_seeds(tmp_path):
    cfg, runs = write_config(tmp_path), tmp_path / "runs_tuning"
    proc = run([*SWEEP, "--config", str(cfg), "--tune", "--runs-dir", str(runs), "--dry-run", "--", "--eval-episodes", "1"])
    assert proc.returncode == 0, proc.stderr
    py, algos = sys.executable, "src/algos/"
    expected = []
    for seed in (101, 102, 103):  # seed-major, then the [tuning] table's order of methods and configurations
        for label, algo, preset, configs in [("vs", "ppo_varshare", ["--hidden-sizes", "36", "36"],
                                              {"c0.1_b1": ["--prior-scale", "0.1", "--kl-coef", "1"], "c1_b0.1": ["--prior-scale", "1", "--kl-coef", "0.1"]}),
                                             ("embed", "ppo_mtl_embed", [], {"lr1e-3": ["--learning-rate", "1e-3"], "lr3e-3": ["--learning-rate", "3e-3"]})]:
            for name, flags in configs.items():
                expected.append([py, algos + f"{algo}.py", "--config", str(cfg), *preset, *flags, "--seed", str(seed), "--total-timesteps", "20480",
                                 "--eval-episodes", "1", "--runs-dir", str(runs), "--run-name", f"{label}@{name}__s{seed}"])
    assert [shlex.split(line) for line in proc.stdout.splitlines()] == expected

    # --methods picks tuned methods; --seeds / --total-timesteps override the table's; the default runs dir is <config>_tuning
    proc = run([*SWEEP, "--config", str(cfg), "--tune", "--methods", "embed", "--seeds", "104", "--total-timesteps", "10240", "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert [c[-1] for c in lines] == ["embed@lr1e-3__s104", "embed@lr3e-3__s104"]
    assert lines[0][lines[0].index("--total-timesteps") + 1] == "10240"
    assert lines[0][lines[0].index("--runs-dir") + 1] == str(REPO / "runs" / "grid_tuning")
    assert not (REPO / "runs" / "grid_tuning").exists()

    # the report seeds stay out of tuning and the tuning seeds out of report sweeps; an untuned method is named
    for args, words in [(["--tune", "--seeds", "3"], ["3", "report seeds", ">= 101"]),
                        (["--seeds", "101"], ["101", "tuning seeds", "--tune"]),
                        (["--tune", "--methods", "single"], ["single", "no [tuning.<label>] table", "vs, embed"])]:
        proc = run([*SWEEP, "--config", str(cfg), "--runs-dir", str(runs), "--dry-run", *args])
        assert proc.returncode == 2 and all(w in proc.stderr for w in words), (args, proc.stderr)

    # a runs dir never holds both: a tuning sweep into a report runs dir is refused before any work
    report_runs = tmp_path / "report_runs"
    report_runs.mkdir()
    (report_runs / "embed__s1").mkdir()
    (report_runs / "grid.tsv").write_text("embed__s1\tppo_mtl_embed\t--seed 1\n")
    proc = run([*SWEEP, "--config", str(cfg), "--tune", "--runs-dir", str(report_runs)])
    assert proc.returncode == 2 and "embed__s1" in proc.stderr and "own --runs-dir" in proc.stderr, proc.stderr
    assert sorted(p.name for p in report_runs.iterdir()) == ["embed__s1", "grid.tsv"]


@pytest.mark.parametrize("edit, words", [
    (("[tuning.embed]\n", '[tuning.embed]\n"lr1e-2" = ["--learning-rate", "1e-2"]\n'), ["same number of configurations", "vs has 2", "embed has 3"]),
    (('seeds = "101-103"', 'seeds = "99-101"'), ["99, 100", "report seeds", ">= 101"]),
    (("[tuning.embed]", "[tuning.nope]"), ["nope", "not in the [methods] table"]),
    (('"lr1e-3" =', '"lr__1e-3" ='), ["lr__1e-3", "configuration name"]),
    (('["--learning-rate", "1e-3"]', '["--learning-rate", 1e-3]'), ["lr1e-3", "list of strings"]),
])
def test_the_tuning_table_is_validated_before_any_run(tmp_path, edit, words):
    cfg = write_config(tmp_path, CONFIG.replace(*edit))
    proc = run([*SWEEP, "--config", str(cfg), "--tune", "--runs-dir", str(tmp_path / "runs"), "--dry-run"])
    assert proc.returncode == 2 and all(w in proc.stderr for w in words), proc.stderr
    proc = run([*TUNE, "--config", str(cfg), "--runs-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert proc.returncode == 2 and all(w in proc.stderr for w in words), proc.stderr


# ---- scripts/tune.py

def test_tune_picks_the_highest_mean_success_with_the_auc_tie_break_and_writes_the_presets_back(tmp_path):
    cfg, runs, out = write_config(tmp_path), tmp_path / "runs_tuning", tmp_path / "out"
    tuning_runs(runs)
    proc = run([*TUNE, "--config", str(cfg), "--runs-dir", str(runs), "--out", str(out), "--write"])
    assert proc.returncode == 0, proc.stderr
    import csv

    rows = {(r["method"], r["configuration"]): r for r in csv.DictReader((out / "tuning.csv").open())}
    expected = {("vs", "c0.1_b1"): (0.5, 0.5 * 2 / 3, 0), ("vs", "c1_b0.1"): (0.7, 0.7 * 2 / 3, 1),
                ("embed", "lr1e-3"): (0.6, 0.4, 0), ("embed", "lr3e-3"): (0.6, 0.6, 1)}
    assert list(rows) == list(expected)
    for key, (mean, auc, chosen) in expected.items():
        r = rows[key]
        assert float(r["mean_success"]) == pytest.approx(mean) and float(r["success_auc"]) == pytest.approx(auc), key
        assert (r["seeds"], r["seed_list"], r["complete"], int(r["chosen"])) == ("3", "101 102 103", "1", chosen), key
    md = (out / "tuning.md").read_text()
    assert "| vs | c1_b0.1 | `--prior-scale 1 --kl-coef 0.1` | 3 | 0.700 | 0.467 | **chosen** |" in md
    assert "| embed | lr1e-3 | `--learning-rate 1e-3` | 3 | 0.600 | 0.400 |  |" in md
    assert "embed: mean final success tied with lr1e-3; the success AUC chose lr3e-3" in md

    # the presets are in [methods], the file still parses, every other line is untouched
    text = cfg.read_text()
    data = tomllib.loads(text)
    assert data["methods"]["vs_tuned"] == ["ppo_varshare", "--hidden-sizes", "36", "36", "--prior-scale", "1", "--kl-coef", "0.1"]
    assert data["methods"]["embed_tuned"] == ["ppo_mtl_embed", "--learning-rate", "3e-3"]
    assert data["tuning"] == tomllib.loads(CONFIG)["tuning"]
    added = text.splitlines()
    for line in CONFIG.splitlines():
        added.remove(line)
    assert len(added) == 4 and f"see {out / 'tuning.md'}" in added[0] and added[0].startswith("# vs_tuned: scripts/tune.py chose c1_b0.1")
    assert text.index("embed_tuned =") < text.index("[tuning]")

    # again, after c0.1_b1 got better: the preset line is replaced, not added
    for seed in (101, 102, 103):
        s = runs / f"vs@c0.1_b1__s{seed}" / "summary.json"
        s.write_text(json.dumps({**json.loads(s.read_text()), "final_success": dict.fromkeys(tasks(), 0.9)}))
    proc = run([*TUNE, "--config", str(cfg), "--runs-dir", str(runs), "--out", str(out), "--write"])
    assert proc.returncode == 0, proc.stderr
    text = cfg.read_text()
    assert text.count("vs_tuned =") == 1 and text.count("# vs_tuned:") == 1 and len(text.splitlines()) == len(CONFIG.splitlines()) + 4
    assert tomllib.loads(text)["methods"]["vs_tuned"][-4:] == ["--prior-scale", "0.1", "--kl-coef", "1"]

    # a tuned preset is a method like the others: a report sweep runs it on report seeds
    proc = run([*SWEEP, "--config", str(cfg), "--methods", "vs_tuned", "--seeds", "1", "--runs-dir", str(tmp_path / "report_runs"), "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "--hidden-sizes 36 36 --prior-scale 0.1 --kl-coef 1 --seed 1" in proc.stdout and "vs_tuned__s1" in proc.stdout


def test_a_tuned_preset_keeps_one_value_per_option():
    """A preset that pins an option the winning configuration sets again (the last value wins in the run) is written
    with the winning value only."""
    sys.path.insert(0, str(REPO / "scripts"))
    from tune import option_groups, tuned_preset

    assert option_groups(["--a", "1", "--b", "--c", "-2", "3"]) == [["--a", "1"], ["--b"], ["--c", "-2", "3"]]
    tuning = {"methods_table": {"vs": ["ppo_varshare", "--prior-scale", "0.1", "--kl-coef", "1", "--hidden-sizes", "36", "36", "--fixed-sigma"]}}
    winner = {"flags": ["--prior-scale", "1", "--kl-coef", "0.1"]}
    assert tuned_preset(tuning, "vs", winner) == ["ppo_varshare", "--hidden-sizes", "36", "36", "--fixed-sigma", "--prior-scale", "1", "--kl-coef", "0.1"]


def test_tune_refuses_to_choose_with_a_configuration_short_of_seeds_unless_allowed(tmp_path):
    cfg, runs, out = write_config(tmp_path), tmp_path / "runs_tuning", tmp_path / "out"
    tuning_runs(runs, skip=("vs@c1_b0.1__s103",))
    fake_run(runs, "vs@c1_b0.1__s103", "ppo_x", 103, dict.fromkeys(tasks(), 0.7), finished=False)  # still running
    before = cfg.read_text()
    proc = run([*TUNE, "--config", str(cfg), "--runs-dir", str(runs), "--out", str(out), "--write"])
    assert proc.returncode == 2, proc.stderr
    assert "vs@c1_b0.1 has seed(s) 101, 102" in proc.stderr and "--allow-incomplete" in proc.stderr
    assert cfg.read_text() == before and not (out / "tuning.md").exists()

    proc = run([*TUNE, "--config", str(cfg), "--runs-dir", str(runs), "--out", str(out), "--allow-incomplete"])
    assert proc.returncode == 0, proc.stderr
    md = (out / "tuning.md").read_text()
    assert "| vs | c1_b0.1 | `--prior-scale 1 --kl-coef 0.1` | 2 (incomplete) | 0.700 |" in md and "chosen anyway: --allow-incomplete" in md
    assert f"{runs / 'vs@c1_b0.1__s103'}: not finished" in md


# ---- report.py

def test_report_refuses_to_mix_tuning_and_report_seeds(tmp_path):
    runs = tmp_path / "runs"
    ts = tasks()
    fake_run(runs, "embed__s1", "ppo_x", 1, dict.fromkeys(ts, 0.5))
    fake_run(runs, "embed@lr1e-3__s101", "ppo_x", 101, dict.fromkeys(ts, 0.9))
    for extra in ([], ["--tuning"]):
        proc = run([*REPORT, "--runs-dir", str(runs), "--out", str(tmp_path / "report"), "--reps", "100", *extra])
        assert proc.returncode != 0 and "mix tuning seeds" in proc.stderr, proc.stderr
        assert str(runs / "embed@lr1e-3__s101") in proc.stderr and str(runs / "embed__s1") in proc.stderr
    assert not (tmp_path / "report").exists()
    # a pure tuning dir: refused as a report; read with --tuning
    (runs / "embed__s1" / "config.json").unlink()
    proc = run([*REPORT, "--runs-dir", str(runs), "--out", str(tmp_path / "report"), "--reps", "100"])
    assert proc.returncode != 0 and str(runs / "embed@lr1e-3__s101") in proc.stderr and "--tuning" in proc.stderr, proc.stderr


def test_report_shows_default_and_tuned_side_by_side_and_the_tuning_table(tmp_path):
    import numpy as np

    runs, ts = tmp_path / "runs", tasks()
    for s in (1, 2, 3):
        fake_run(runs, f"embed__s{s}", "ppo_x", s, dict.fromkeys(ts, 0.5))
        fake_run(runs, f"embed_tuned__s{s}", "ppo_x", s, {t: (0.6 if i % 2 else 1.0) for i, t in enumerate(ts)})
    (tmp_path / "tuning.md").write_text("# Hyperparameter tuning: grid.toml\n\n| method | configuration |\n|---|---|\n| embed | lr3e-3 |\n")
    out = tmp_path / "report"
    proc = run([*REPORT, "--runs-dir", str(runs), "--out", str(out), "--reps", "100", "--tuning-report", str(tmp_path / "tuning.md")])
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| embed | 3 | 0.500 [") and line.count("|") == 8)
    tuned = np.array([0.6 if i % 2 else 1.0 for i in range(len(ts))])
    assert f"| 3 | {tuned.mean():.3f} [" in row and row.count("[") == 4
    assert "### Hyperparameter tuning: grid.toml" in text and "| embed | lr3e-3 |" in text
    assert text.index("Default vs tuned") < text.index(f"## Hyperparameter tuning ({tmp_path / 'tuning.md'})")


# ---- the shipped tables

# Two tuning seeds on both suites: the cut declared in context/decisions.md #46 and #48.
@pytest.mark.parametrize("name, seeds", [("toy_cartpole_targets_mt10", [101, 102]), ("toy_lunarlander_mt10", [101, 102])])
def test_shipped_tuning_tables_are_valid_and_capacity_matched(name, seeds):
    """Six configurations per multi-task method, the declared tuning seeds, and every configuration's active
    parameters within 5% of ppo_mtl_embed's (PaCo's K and softmod's modules carry their own widths)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from sweep_grid import read_tuning

    from mtrl.capacity import algo_module, count_params, make_args
    from mtrl.run import parse_args

    cfg = REPO / "configs" / f"{name}.toml"
    tuning = read_tuning(cfg)
    assert tuning["seeds"] == seeds
    assert {label: len(c) for label, c in tuning["methods"].items()} == dict.fromkeys(["varshare", "l2soft", "mtl_embed", "pcgrad", "paco", "softmod"], 6)
    methods = tomllib.loads(cfg.read_text())["methods"]
    target = count_params("ppo_mtl_embed", make_args("ppo_mtl_embed", str(cfg)))["active_per_task"]
    for label, configs in tuning["methods"].items():
        algo, *preset = methods[label]
        for conf, flags in configs.items():
            args = parse_args(algo_module(algo).Args, algo, argv=["--config", str(cfg), *preset, *flags])
            active = count_params(algo, args)["active_per_task"]
            assert abs(active - target) <= 0.05 * target, (label, conf, args.hidden_sizes, active, target)
