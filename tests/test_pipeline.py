"""The pipeline around the algorithm files: capacity matching, the sweep (local and Slurm), the report."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, only_run, run_algo
from mtrl.capacity import count_params, make_args, match_width

REPORT = [sys.executable, str(REPO / "scripts" / "report.py")]


def test_mtl_embed_count_by_hand():
    args = make_args("ppo_mtl_embed", None, env_id="toy/CartPole-MT10", hidden_sizes=(64, 64))
    # obs 4 + one-hot 10 -> 64 -> 64 -> out; actor out 2 (logits), critic out 1; other tasks' one-hot columns excluded
    mlp = lambda out: (14 * 64 + 64) + (64 * 64 + 64) + (64 * out + out)  # noqa: E731
    counts = count_params("ppo_mtl_embed", args)
    assert counts["total"] == mlp(2) + mlp(1)
    assert counts["active_per_task"] == mlp(2) + mlp(1) - 9 * 64 * 2


@pytest.mark.parametrize("overrides", [dict(), dict(residual="l2")])
def test_match_width_lands_within_five_percent_and_is_the_closest(overrides):
    target = count_params("ppo_mtl_embed", make_args("ppo_mtl_embed", "configs/toy_cartpole_mt10.toml"))["active_per_task"]
    args = make_args("ppo_varshare", "configs/toy_cartpole_mt10.toml", **overrides)
    sizes, counts = match_width("ppo_varshare", target, args)
    assert abs(counts["active_per_task"] - target) <= 0.05 * target
    w = sizes[0]
    for other in (w - 1, w + 1):  # no neighbouring width is closer
        c = count_params("ppo_varshare", make_args("ppo_varshare", "configs/toy_cartpole_mt10.toml", hidden_sizes=(other, other), **overrides))
        assert abs(c["active_per_task"] - target) >= abs(counts["active_per_task"] - target)
    with pytest.raises(ValueError, match="tolerance"):
        match_width("ppo_varshare", target, args, tol=1e-6)


def test_config_widths_are_the_matched_ones():
    """The benchmark configs record widths within 5% of ppo_mtl_embed's active count (protocol.md section 4):
    every preset (tuning configurations included), parsed with all its flags as its script parses them."""
    import tomllib

    from mtrl.capacity import algo_module
    from mtrl.run import parse_args

    for cfg in sorted((REPO / "configs").glob("*mt*.toml")):
        data = tomllib.loads(cfg.read_text())
        methods = data.get("methods", {})
        presets = dict(methods)
        for label, grid in data.get("tuning", {}).items():
            if isinstance(grid, dict):
                presets.update({f"{label}@{name}": [*methods[label], *flags] for name, flags in grid.items()})
        target = count_params("ppo_mtl_embed", make_args("ppo_mtl_embed", str(cfg)))["active_per_task"]
        equal_width = set(data.get("ablation", {}).get("equal_width", []))  # the ablation's equal-width table: 64x64 on purpose
        for label, (algo, *flags) in presets.items():
            if label in equal_width:  # the ablation's equal-width rows: exactly the top-level width, on purpose unmatched
                args = parse_args(algo_module(algo).Args, algo, argv=["--config", str(cfg), *flags])
                assert tuple(args.hidden_sizes) == tuple(data["hidden_sizes"]), (cfg.name, label, args.hidden_sizes)
                continue
            if algo == "ppo_single" or "--task-encoding" in flags or label.startswith("mtppo_reference"):  # mtppo_reference*: an anchor to a published number, not a compared method
                continue
            args = parse_args(algo_module(algo).Args, algo, argv=["--config", str(cfg), *flags])
            active = count_params(algo, args)["active_per_task"]
            assert abs(active - target) <= 0.05 * target, (cfg.name, label, active, target)


@pytest.mark.parametrize("algo", ["ppo_mtl_embed", "ppo_varshare", "ppo_pcgrad", "ppo_paco", "ppo_softmod"])
def test_summary_params_equal_the_helper(runs_dir, algo):
    run_algo(algo, "--runs-dir", str(runs_dir), "--total-timesteps", "1280", "--envs-per-task", "1", "--num-steps", "128",
             "--num-minibatches", "2", "--eval-episodes", "1", "--hidden-sizes", "20", "12")
    summary = json.loads((only_run(runs_dir) / "summary.json").read_text())
    assert summary["params"] == count_params(algo, make_args(algo, None, hidden_sizes=(20, 12)))


TINY = ["--total-timesteps", "1280", "--envs-per-task", "1", "--num-steps", "128", "--num-minibatches", "2", "--eval-episodes", "1",
        "--eval-every", "0", "--hidden-sizes", "16", "16"]


def write_config(tmp_path):
    cfg = tmp_path / "grid.toml"
    cfg.write_text('env_id = "toy/CartPole-MT10"\nlearning_rate = 0.001\n[ppo_single]\nlearning_rate = 0.002\n'
                   '[methods]\nembed = ["ppo_mtl_embed"]\nblind = ["ppo_mtl_embed", "--task-encoding", "none"]\nsingle = ["ppo_single"]\n'
                   'broken = ["ppo_mtl_embed", "--gamma", "1.5"]\n')
    return cfg


SWEEP = ["bash", str(REPO / "scripts" / "sweep.sh")]


def sweep(*args, timeout=600):
    return subprocess.run([*SWEEP, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_sweep_dry_run_lists_exactly_the_grid_and_sees_finished_and_resumable_runs(tmp_path):
    cfg, runs = write_config(tmp_path), tmp_path / "runs"
    args = ["--config", str(cfg), "--methods", "embed,single", "--seeds", "1,3", "--total-timesteps", "10240", "--runs-dir", str(runs), "--dry-run"]
    proc = sweep(*args, "--", "--eval-episodes", "1")
    assert proc.returncode == 0, proc.stderr
    from mtrl.envs import make_suite

    tasks = make_suite("toy/CartPole-MT10").task_names
    py, algos = sys.executable, "src/algos/"
    expected = []
    for seed in (1, 3):
        expected.append([py, algos + "ppo_mtl_embed.py", "--config", str(cfg), "--seed", str(seed), "--total-timesteps", "10240",
                         "--eval-episodes", "1", "--runs-dir", str(runs), "--run-name", f"embed__s{seed}"])
        for t in tasks:  # the oracle: one run per task, with its share of the budget
            expected.append([py, algos + "ppo_single.py", "--config", str(cfg), "--seed", str(seed), "--task", t, "--total-timesteps", "1024",
                             "--eval-episodes", "1", "--runs-dir", str(runs), "--run-name", f"single__{t}__s{seed}"])
    import shlex

    assert [shlex.split(line) for line in proc.stdout.splitlines()] == expected
    # paths relative to the caller's folder mean the same runs when called from elsewhere
    here = subprocess.run([*SWEEP, "--config", cfg.name, "--methods", "embed,single", "--seeds", "1,3", "--total-timesteps", "10240",
                           "--runs-dir", "runs", "--dry-run", "--", "--eval-episodes", "1"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert [shlex.split(line) for line in here.stdout.splitlines()] == expected, here.stderr

    # a finished run is skipped; a run with a checkpoint is resumed
    (runs / "embed__s1").mkdir(parents=True)
    (runs / "embed__s1" / "summary.json").write_text("{}")
    (runs / "embed__s3" / "checkpoints").mkdir(parents=True)
    (runs / "embed__s3" / "checkpoints" / "latest.pt").write_text("")
    lines = sweep(*args).stdout.splitlines()
    assert lines[0] == "# embed__s1: finished (summary.json), skipped"
    assert shlex.split(lines[11]) == [py, algos + "ppo_mtl_embed.py", "--resume", str(runs / "embed__s3")]
    assert len(lines) == 22


def test_sweep_runs_in_parallel_skips_finished_runs_resumes_and_reports_failures(tmp_path):
    cfg, runs = write_config(tmp_path), tmp_path / "runs"
    cmd = ["--config", str(cfg), "-j", "2", "--runs-dir", str(runs), "--methods", "embed,blind", "--seeds", "1-2", "--", *TINY]
    first = sweep(*cmd)
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.name for p in runs.iterdir() if p.is_dir() and p.name != "logs") == ["blind__s1", "blind__s2", "embed__s1", "embed__s2"]
    assert [line.split("\t")[0] for line in (runs / "grid.tsv").read_text().splitlines()] == ["embed__s1", "blind__s1", "embed__s2", "blind__s2"]
    assert json.loads((runs / "blind__s1" / "config.json").read_text())["args"]["task_encoding"] == "none"
    assert json.loads((runs / "embed__s1" / "config.json").read_text())["args"]["learning_rate"] == 0.001

    # again: finished runs are skipped; a run without summary.json resumes from its checkpoint
    (runs / "embed__s2" / "summary.json").unlink()
    again = sweep(*cmd)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("[done]") == 3 and "[ok     ] embed__s2" in again.stdout
    assert "--resume" in (runs / "logs" / "embed__s2.log").read_text()
    assert (runs / "embed__s2" / "summary.json").is_file()

    # a failing run: the others still run, the sweep exits 1 and names the failed run's log
    failing = sweep("--config", str(cfg), "-j", "2", "--runs-dir", str(runs), "--methods", "embed,broken", "--seeds", "1", "--", *TINY)
    log = runs / "logs" / "broken__s1.log"
    assert failing.returncode == 1 and f"broken__s1 (exit 2): {log}" in failing.stderr, failing.stdout + failing.stderr
    assert "--gamma must be in [0, 1]" in log.read_text() and "[done]    embed__s1" in failing.stdout


def test_sweeps_started_together_keep_every_line_of_the_grid_file(tmp_path):
    cfg, runs = write_config(tmp_path), tmp_path / "runs"
    procs = [subprocess.Popen([*SWEEP, "--config", str(cfg), "--methods", "broken", "--seeds", str(s), "--runs-dir", str(runs)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for s in range(1, 7)]
    for p in procs:
        p.communicate(timeout=1200)
        assert p.returncode == 1  # the preset's --gamma 1.5 is refused: every run fails, each in its own sweep
    names = [line.split("\t")[0] for line in (runs / "grid.tsv").read_text().splitlines()]
    assert sorted(names) == [f"broken__s{s}" for s in range(1, 7)]


def test_sweep_refuses_bad_input_before_any_work(tmp_path):
    cfg = write_config(tmp_path)
    for args, words in [(["--config", str(cfg), "--methods", "nope"], ["nope", "embed, blind"]),
                        (["--config", str(cfg), "-j", "0"], ["-j 0", ">= 1"]),
                        (["--config", str(cfg), "--seeds", "5-2"], ["5-2", "low <= high"]),
                        (["--config", str(cfg), "--total-timesteps", "lots"], ["lots", "positive whole number"]),
                        (["--config", str(cfg), "--slurm", "--time", "soon"], ["soon", "Slurm time"]),
                        (["--config", str(tmp_path / "none.toml")], ["none.toml", "no such file"]),
                        (["--bogus"], ["--bogus"])]:
        proc = sweep(*args, "--runs-dir", str(tmp_path / "runs"))
        assert proc.returncode == 2 and all(w in proc.stderr for w in words), (args, proc.stderr)
    assert not list((tmp_path / "runs").glob("*/config.json"))


def test_sweep_writes_a_slurm_array_with_the_requested_resources(tmp_path):
    cfg, runs = write_config(tmp_path), tmp_path / "runs"
    proc = sweep("--config", str(cfg), "--methods", "embed", "--seeds", "3,5", "--runs-dir", str(runs), "--slurm", "--dry-run",
                 "--partition", "gpu", "--time", "04:00:00", "--cpus", "4", "--gpus", "1", "--max-parallel", "8", "--", *TINY)
    assert proc.returncode == 0, proc.stderr
    script = next((runs / "slurm").glob("sweep-*.sbatch")).read_text()
    for line in ["#SBATCH --array=0-1%8", "#SBATCH --cpus-per-task=4", "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00",
                 "#SBATCH --gres=gpu:1", '--run-index "$SLURM_ARRAY_TASK_ID"']:
        assert line in script, line
    grid = next((runs / "slurm").glob("grid-*.tsv")).read_text().splitlines()
    assert [line.split("\t")[0] for line in grid] == ["embed__s3", "embed__s5"]
    # what one array task does, without Slurm: array index 1 runs the second run of the grid
    import os

    task = subprocess.run(["bash", str(next((runs / "slurm").glob("sweep-*.sbatch")))], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"})
    assert task.returncode == 0 and "[ok     ] embed__s5" in task.stdout, task.stdout + task.stderr
    assert (runs / "embed__s5" / "summary.json").is_file() and not (runs / "embed__s3").exists()


def test_sweep_ctrl_c_stops_runs_with_a_checkpoint_and_a_second_sweep_leaves_running_runs_alone(tmp_path):
    import os
    import signal
    import time

    cfg, runs = write_config(tmp_path), tmp_path / "runs"
    cmd = [*SWEEP, "--config", str(cfg), "--methods", "embed", "--seeds", "1-2", "-j", "2", "--runs-dir", str(runs), "--",
           "--total-timesteps", "5000000", "--checkpoint-every", "0", "--eval-every", "0"]

    def start_and_wait_for(marker: str):
        # SIGINT at its default in the sweep: a shell started with SIGINT ignored (as a background job of a
        # non-interactive shell is) cannot trap it, so the test must not inherit how pytest itself was started
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 300  # generous: a loaded machine starts python and torch slowly
        logs = [runs / "logs" / f"embed__s{s}.log" for s in (1, 2)]
        while not all(log.is_file() and marker in log.read_text() for log in logs):
            assert time.time() < deadline and proc.poll() is None, "the runs did not start"
            time.sleep(0.5)
        return proc

    # Ctrl-C reaches the whole foreground process group; the sweep stops each run once, with a checkpoint
    first = start_and_wait_for("steps (")  # the runs are training (their first progress line; no periodic checkpoint)
    os.killpg(first.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(first.pid, signal.SIGINT)  # an impatient second Ctrl-C must not cost the runs their checkpoint
    out, err = first.communicate(timeout=1200)
    assert first.returncode == 130, out + err
    assert "[stopped] embed__s1" in out and "[stopped] embed__s2" in out and "the same command resumes them" in err
    for s in (1, 2):
        assert (runs / f"embed__s{s}" / "checkpoints" / "latest.pt").is_file() and not (runs / f"embed__s{s}" / "summary.json").exists()
        assert "stopped by signal 15; checkpoint at step" in (runs / "logs" / f"embed__s{s}.log").read_text()

    # the same command resumes them; a second sweep started meanwhile leaves both alone
    again = start_and_wait_for("resumed")
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert second.returncode == 0 and second.stdout.count("[busy]") == 2, second.stdout + second.stderr
    os.kill(again.pid, signal.SIGTERM)  # SIGTERM to the sweep alone also stops its runs
    out, err = again.communicate(timeout=1200)
    assert again.returncode == 130 and out.count("[stopped]") == 2, out + err


@pytest.mark.slow
def test_sweep_under_a_real_single_node_slurm(tmp_path):
    """scripts/slurm_local.sh check: starts Slurm on this machine (installing it with apt if needed), submits a
    two-run sweep with --slurm and checks that both runs finish. Skipped only where Slurm cannot be set up here."""
    import os

    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh"), "check"], capture_output=True, text=True, cwd=REPO,
                          timeout=900, env={**os.environ, "SLURM_LOCAL_DIR": str(tmp_path / "slurm")})
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("finished under Slurm") == 2


# ---- the report, on synthetic runs with known per-task successes ----

def fake_run(runs: Path, name: str, algo: str, seed: int, success: dict, task: str | None = None, finished: bool = True,
             diag: bool = False, steps=(1000, 2000, 3000), wall: float = 60.0, extra: dict | None = None):
    """A run folder as the algorithm scripts write it, with a curve rising linearly to ``success``."""
    d = runs / name
    d.mkdir(parents=True)
    tasks = list(success)
    (d / "config.json").write_text(json.dumps({"algo": algo, "task_names": tasks,
                                               "args": {"seed": seed, "task": task, "env_id": "toy/CartPole-MT10"}}))
    evals = []
    for i, step in enumerate(steps):
        frac = (i + 1) / len(steps)
        e = {"global_step": step, "mean_success": 0.0, "success": {t: frac * v for t, v in success.items()}}
        if diag:
            e["kl"] = {t: float(i + k) for k, t in enumerate(tasks)}
            e["rel_residual"] = {t: 0.01 * (i + k) for k, t in enumerate(tasks)}
        evals.append(e)
    (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    if finished:
        (d / "summary.json").write_text(json.dumps({"final_success": success, "mean_success": float(np.mean(list(success.values()))),
                                                    "params": {"active_per_task": 100, "inference": 90, "total": 1000},
                                                    "wall_clock_s": wall, "mean_SPS": 1000.0, **(extra or {})}))


def stratified_bootstrap(x: np.ndarray, stat, reps: int, rng) -> tuple[float, float]:
    """Independent of rliable: resample runs with replacement within each task (column), percentile 95% interval."""
    runs_, tasks_ = x.shape
    stats = [stat(np.take_along_axis(x, rng.integers(0, runs_, (runs_, tasks_)), 0)) for _ in range(reps)]
    return tuple(np.percentile(stats, [2.5, 97.5]))


def iqm_by_hand(x: np.ndarray) -> float:
    v = np.sort(x.ravel())
    k = int(0.25 * len(v))
    return float(v[k: len(v) - k].mean())


def improvement_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) + P(X = Y) / 2 over all pairs of runs, per task, averaged over tasks."""
    return float(np.mean([np.mean([(a > b) + 0.5 * (a == b) for a in x[:, t] for b in y[:, t]]) for t in range(x.shape[1])]))


def test_report_numbers_equal_a_direct_computation(tmp_path):
    from mtrl.envs import make_suite

    tasks = make_suite("toy/CartPole-MT10").task_names
    rng = np.random.default_rng(0)
    runs = tmp_path / "runs"
    true = {"varshare": np.round(rng.uniform(0.3, 1.0, (5, 10)), 1), "embed": np.round(rng.uniform(0.0, 0.8, (5, 10)), 1)}
    for label, x in true.items():
        for i, row in enumerate(x):
            fake_run(runs, f"{label}__s{i + 1}", "ppo_x", i + 1, dict(zip(tasks, row.tolist())), diag=label == "varshare")
    oracle = np.round(rng.uniform(0.0, 1.0, (5, 10)), 1)  # (seeds, tasks): each task a different value
    for s in range(5):
        for j, t in enumerate(tasks):
            fake_run(runs, f"single__{t}__s{s + 1}", "ppo_single", s + 1, {t: float(oracle[s, j])}, task=t, steps=(100, 200, 300), wall=6.0)

    out = tmp_path / "report"
    config = tmp_path / "c.toml"  # an ablation group with the oracle in it: its per-seed column pairs seeds right
    config.write_text('[methods]\nsingle = ["ppo_single"]\nvarshare = ["ppo_x"]\n[ablation]\ng = ["single", "varshare"]\n')
    proc = subprocess.run([*REPORT, "--runs-dir", str(runs), "--out", str(out), "--reps", "2000", "--ablation", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    section = (out / "report.md").read_text().split("### Ablation: g")[1]
    for label, x in (("single", oracle), ("varshare", true["varshare"])):
        cell = next(line for line in section.splitlines() if line.startswith(f"| {label} |")).split("|")[-2].strip()
        assert cell == ", ".join(f"{s + 1}: {x[s].mean():.2f}" for s in range(5))
    assert "warning" not in proc.stderr and "Warnings" not in (out / "report.md").read_text()
    text = (out / "report.md").read_text()
    rows = {r["method"]: r for r in csv.DictReader((out / "summary.csv").open())}
    true["single"] = oracle
    for label, x in true.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |")).split("|")
        assert row[2].strip() == str(len(x))
        assert row[3].strip().startswith(f"{x.mean():.3f} [") and row[4].strip().startswith(f"{iqm_by_hand(x):.3f} [")
        assert float(rows[label]["mean"]) == pytest.approx(x.mean(), abs=1e-5)
        assert float(rows[label]["iqm"]) == pytest.approx(iqm_by_hand(x), abs=1e-5)
        for stat, col in ((np.mean, "mean"), (iqm_by_hand, "iqm")):
            lo, hi = stratified_bootstrap(x, stat, 4000, np.random.default_rng(1))
            assert float(rows[label][f"{col}_ci_low"]) == pytest.approx(lo, abs=0.01) and float(rows[label][f"{col}_ci_high"]) == pytest.approx(hi, abs=0.01)
            assert f"[{float(rows[label][f'{col}_ci_low']):.3f}, {float(rows[label][f'{col}_ci_high']):.3f}]" in "|".join(row)
        # success AUC: the mean over runs, tasks and evaluations of the linear curves (1/3, 2/3, 1) x final
        assert float(rows[label]["success_auc"]) == pytest.approx(x.mean() * 2 / 3, abs=1e-5)
    # the oracle: its curve is on total steps (100 x T ...), its wall clock the T task runs of a seed together
    assert rows["single"]["wall_clock_min"] == "1" and rows["varshare"]["wall_clock_min"] == "1"
    # per-task table: mean +- sample std over seeds, oracle tasks in the suite's order
    per_task = {(r["method"], r["task"]): r for r in csv.DictReader((out / "per_task.csv").open())}
    for j, t in enumerate(tasks):
        assert float(per_task[("single", t)]["mean"]) == pytest.approx(oracle[:, j].mean(), abs=1e-5)
        assert float(per_task[("varshare", t)]["std"]) == pytest.approx(true["varshare"][:, j].std(ddof=1), abs=1e-5)
    embed_row = next(line for line in text.splitlines() if line.startswith("| embed |") and "+-" in line)
    assert f"{true['embed'][:, 0].mean():.2f} +- {true['embed'][:, 0].std(ddof=1):.2f}" in embed_row
    # probability of improvement: the Mann-Whitney statistic by hand
    for other in ("embed", "single"):
        line = next(line for line in text.splitlines() if line.startswith(f"- P(varshare > {other}) = "))
        assert line.split("= ")[1].startswith(f"{improvement_by_hand(true['varshare'], true[other]):.3f} [")
    for png in ("curves_toy-CartPole-MT10.png", "profiles_toy-CartPole-MT10.png", "varshare_toy-CartPole-MT10_varshare.png"):
        assert (out / png).stat().st_size > 5000, png
        assert png in text


def test_report_ablation_section_numbers_by_hand(tmp_path):
    """--ablation CONFIG: one table per [ablation] group, rows in the group's order, early AUC over the first quarter
    of the budget, per-task KL, the residual cosines and each seed's final success, each equal to a hand computation;
    labels not run are named."""
    tasks = ["a", "b", "c"]
    steps = tuple(range(1000, 9000, 1000))  # 8 evaluations, the first two in the first quarter
    runs = tmp_path / "runs"
    cos = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, -0.6], [-0.2, -0.6, 1.0]])
    finals = {"varshare": [0.8, 0.4, 1.0], "l2soft": [0.6, 0.2, 0.4]}
    sigma0 = {"actor.0": 0.5, "actor.1": 0.2}
    for label, final in finals.items():
        for seed in (1, 2):
            kl = {f"varshare/kl_mean_part/{t}": 2.0 * seed + i for i, t in enumerate(tasks)} | {f"varshare/kl_var_part/{t}": 0.5 for t in tasks}
            fake_run(runs, f"{label}__s{seed}", "ppo_varshare", seed, dict(zip(tasks, [f / seed for f in final])), steps=steps,
                     extra={"final_kl": kl, "residual_cosine": cos.tolist()})
            cfg = runs / f"{label}__s{seed}" / "config.json"
            cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "derived": {"sigma0": sigma0}}))
    # rows at other priors: a mean-part-only row at a tenth of the prior scale (its KL x 0.01 at the reference prior),
    # and a row with a variance part at another prior (no single factor: '-')
    for label, scale, var in (("l2soft_tuned", 0.1, 0.0), ("varshare_step", 0.1, 0.5)):
        kl = {f"varshare/kl_mean_part/{t}": 100.0 * (i + 1) for i, t in enumerate(tasks)} | {f"varshare/kl_var_part/{t}": var for t in tasks}
        fake_run(runs, f"{label}__s1", "ppo_varshare", 1, dict(zip(tasks, [0.5] * 3)), steps=steps, extra={"final_kl": kl})
        cfg = runs / f"{label}__s1" / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "derived": {"sigma0": {k: scale * v for k, v in sigma0.items()}}}))
    config = tmp_path / "c.toml"
    config.write_text('[methods]\nvarshare = ["ppo_varshare"]\nl2soft = ["ppo_varshare", "--residual", "l2"]\nvarshare_step = ["ppo_varshare"]\n'
                      'varshare_mean = ["ppo_varshare"]\n[ablation]\nmatched = ["l2soft", "varshare", "varshare_step", "l2soft_tuned", "varshare_mean"]\n')
    out = tmp_path / "report"
    proc = subprocess.run([*REPORT, "--runs-dir", str(runs), "--out", str(out), "--reps", "200", "--ablation", str(config),
                           "--ablation-tasks", "c", "a"], capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    section = (out / "report.md").read_text().split("### Ablation: matched")[1]
    summary = section.split("### Ablation summary")[1]  # one row per label, the group's cells plus the focus tasks
    assert "| KL c / a (nats) | success c / a |" in summary
    summary_rows = {r[1].strip(): [c.strip() for c in r] for r in (line.split("|")[1:-1] for line in summary.splitlines() if line.startswith("| matched |"))}
    assert list(summary_rows) == ["l2soft", "varshare", "varshare_step", "l2soft_tuned"]
    for label in ("l2soft", "varshare"):
        row, f = summary_rows[label], finals[label]
        assert row[0] == "matched" and row[2] == "2" and row[3] == "100"
        assert row[4].startswith(f"{np.mean(f) * 0.75:.3f} [") and row[5] == f"1: {np.mean(f):.2f}, 2: {np.mean(f) / 2:.2f}"
        assert row[8] == "-0.60"
        assert row[9] == "5.5 / 3.5"  # task c: mean over seeds of 2 s + 2 + 0.5; task a: of 2 s + 0.5
        assert row[10] == f"{f[2] * 0.75:.2f} / {f[0] * 0.75:.2f}"  # seeds 1 and 2 end at f and f / 2
    assert summary_rows["l2soft_tuned"][9] == "3.0 / 1.0" and summary_rows["varshare_step"][9] == "-"
    assert summary_rows["varshare_step"][10] == "0.50 / 0.50"
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| l2soft |") or line.startswith("| varshare |")]
    assert [r[0].strip() for r in rows][:2] == ["l2soft", "varshare"]  # the group's order
    for label, row in zip(["l2soft", "varshare"], rows[:2]):
        x = np.mean(finals[label]) * (1 + 1 / 2) / 2  # seed 2 ends at half of seed 1's success
        assert row[9].strip() == f"1: {np.mean(finals[label]):.2f}, 2: {np.mean(finals[label]) / 2:.2f}"
        assert row[2].strip().startswith(f"{x:.3f} [")
        assert float(row[3]) == pytest.approx(x * (1 + 2) / 8 / 2, abs=1e-3)  # early: evaluations at 1/8 and 2/8 of the final
        assert float(row[4]) == pytest.approx(x * 4.5 / 8, abs=1e-3)
        per_task = [np.mean([2.0 * s + i + 0.5 for s in (1, 2)]) for i in range(3)]  # 3.5, 4.5, 5.5
        assert float(row[5]) == pytest.approx(sum(per_task), abs=0.05) and row[6].strip() == "c 5.5"
        assert row[7].strip() == f"{np.mean([0.5, -0.2, 0.5, -0.6, -0.2, -0.6]):+.2f}" and row[8].strip() == "-0.60"
    assert "| varshare | 3.5 | 4.5 | 5.5 |" in section
    assert "| l2soft_tuned | 1.0 | 2.0 | 3.0 |" in section  # 100, 200, 300 nats at c / 10 are 1, 2, 3 at the reference c
    step_row = next(line for line in section.splitlines() if line.startswith("| varshare_step |")).split("|")[1:-1]
    assert step_row[5].strip() == "-" and step_row[6].strip() == "-"
    assert "at the prior of the group's first row (l2soft)" in section
    assert "Not run yet in this group: varshare_mean." in section
    config.write_text('[methods]\nvarshare = ["ppo_varshare"]\n[ablation]\nmatched = ["varshare", "nope"]\n')
    proc = subprocess.run([*REPORT, "--runs-dir", str(runs), "--out", str(out), "--ablation", str(config)], capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode != 0 and "nope not in its [methods] table" in proc.stderr
    config.write_text('[methods]\nvarshare = ["ppo_varshare"]\n[ablation]\nmatched = ["varshare"]\n')
    for extra, message in ((["--ablation", str(config), "--ablation-tasks", "a", "d"], "--ablation-tasks d: no such task in these runs; allowed: a, b, c"),
                           (["--ablation-tasks", "a"], "--ablation-tasks a: needs --ablation CONFIG")):
        proc = subprocess.run([*REPORT, "--runs-dir", str(runs), "--out", str(tmp_path / "bad"), *extra], capture_output=True, text=True, cwd=REPO, timeout=1200)
        assert proc.returncode != 0 and message in proc.stderr and not (tmp_path / "bad").exists()


def test_report_lists_every_missing_unfinished_or_partial_run(tmp_path):
    from mtrl.envs import make_suite

    tasks = make_suite("toy/CartPole-MT10").task_names
    runs, other = tmp_path / "runs", tmp_path / "other"
    for s in (1, 2, 3):
        fake_run(runs, f"varshare__s{s}", "ppo_x", s, dict.fromkeys(tasks, 1.0), diag=True,
                 steps=(1000, 1500, 2000, 3000) if s == 3 else (1000, 2000, 3000))  # seed 3 has an extra evaluation
    for s in (1, 2):
        fake_run(runs, f"embed__s{s}", "ppo_x", s, dict.fromkeys(tasks, 0.5))
    fake_run(runs, "embed__s3", "ppo_x", 3, dict.fromkeys(tasks, 0.5), finished=False)
    fake_run(runs, "embed__s3.incomplete-123", "ppo_x", 3, dict.fromkeys(tasks, 0.5), finished=False)
    for t in tasks[:-1]:  # oracle seed 1 lacks its last task
        fake_run(runs, f"single__{t}__s1", "ppo_single", 1, {t: 1.0}, task=t)
    fake_run(other, "varshare__s1", "ppo_x", 1, dict.fromkeys(tasks, 0.0), diag=True)  # the same run in a second folder
    (runs / "grid.tsv").write_text("varshare__s1\tppo_varshare\t--seed 1\nbroken__s1\tppo_mtl_embed\t--seed 1\n")

    out = tmp_path / "report"
    proc = subprocess.run([*REPORT, "--runs-dir", str(runs), str(other), "--out", str(out), "--reps", "200"],
                          capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    expected = [f"{runs / 'embed__s3'}: not finished (no summary.json; last evaluation at step 3,000)",
                f"{runs / 'broken__s1'}: in the sweep's grid but never started",
                f"{other / 'varshare__s1'}: the same run as {runs / 'varshare__s1'}",
                "1 folder(s) that the sweep moved aside (*.incomplete-*) are ignored",
                "toy/CartPole-MT10 embed: no finished run for seed(s) 3 (other methods have them)",
                f"toy/CartPole-MT10 single seed 1: oracle incomplete, no finished run for task(s) {tasks[-1]}; the seed is left out",
                "toy/CartPole-MT10 varshare: runs were evaluated at different steps; its curve uses the 3 steps all runs share"]
    for w in expected:
        assert w in text and w in proc.stderr, w
    assert "| single |" not in text  # no complete oracle seed: no row
    rows = {r["method"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["varshare"]["runs"] == "3" and rows["varshare"]["mean"] == "1"  # the duplicate (all zeros) is not used
    assert rows["varshare"]["steps_to_0.9"] == "3000" and rows["embed"]["steps_to_0.9"] == "-"


def test_report_cis_do_not_depend_on_the_other_methods(tmp_path):
    """Each method (and each probability-of-improvement pair) gets its own seeded bootstrap: adding a method to the
    folder leaves m's mean and IQM CIs and P(ref > m) with its CI unchanged (one shared bootstrap moved CI ends by
    up to 0.01 when ablation rows joined a study's folder)."""
    rng = np.random.default_rng(3)
    tasks = [f"t{i}" for i in range(6)]
    runs, more = tmp_path / "runs", tmp_path / "more"
    for label in ("ref", "m", "b"):  # b sorts before m: a shared bootstrap would draw b's resamples first
        for s in (1, 2, 3):
            success = dict(zip(tasks, np.round(rng.uniform(0, 1, len(tasks)), 1).tolist()))
            for d in ((runs, more) if label != "b" else (more,)):
                if not (d / f"{label}__s{s}").exists():
                    fake_run(d, f"{label}__s{s}", "ppo_x", s, success)
    lines = []
    for d in (runs, more):
        proc = subprocess.run([*REPORT, "--runs-dir", str(d), "--out", str(d / "report"), "--reps", "300", "--reference", "ref"],
                              capture_output=True, text=True, cwd=REPO, timeout=1200)
        assert proc.returncode == 0, proc.stderr
        text = (d / "report" / "report.md").read_text().splitlines()
        lines.append([next(line for line in text if line.startswith(start)) for start in ("- P(ref > m) = ", "| m | 3 | ", "| ref | 3 | ")])
    assert "- P(ref > b) = " in (more / "report" / "report.md").read_text()
    assert lines[0] == lines[1]
    low, high = (float(x) for x in lines[0][1].split("|")[3].split("[")[1].strip(" ]").split(", "))
    assert low < high  # the rows compared carry real intervals


def test_report_seeds_reads_only_the_named_seeds_and_refuses_bad_ones(tmp_path):
    """--seeds 1 2: every row is the mean over seeds 1-2 only (a hand computation), grid entries of other seeds
    are not reported missing, the left-out folders are counted; seed 0 or a seed with no run is an error."""
    tasks = ["a", "b"]
    runs = tmp_path / "runs"
    finals = {1: [1.0, 0.5], 2: [0.5, 0.0], 3: [0.0, 0.0]}
    for s, f in finals.items():
        fake_run(runs, f"embed__s{s}", "ppo_x", s, dict(zip(tasks, f)))
    fake_run(runs, "vs__s1", "ppo_x", 1, dict(zip(tasks, [0.25, 0.25])))
    (runs / "grid.tsv").write_text("vs__s3\tppo_varshare\t--seed 3\nvs__s2\tppo_varshare\t--seed 2\n")
    out = tmp_path / "report"
    proc = subprocess.run([*REPORT, "--runs-dir", str(runs), "--out", str(out), "--reps", "200", "--reference", "vs", "--seeds", "1", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    rows = {r["method"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["embed"]["runs"] == "2" and float(rows["embed"]["mean"]) == pytest.approx(0.5)  # (1 + .5 + .5 + 0) / 4
    assert rows["vs"]["runs"] == "1" and float(rows["vs"]["mean"]) == pytest.approx(0.25)
    assert "1 run folder(s) of seeds other than --seeds 1 2 are left out" in text
    assert f"{runs / 'vs__s2'}: in the sweep's grid but never started" in text and "vs__s3" not in text
    for bad, msg in ((["0"], "--seeds 0: give one or more seeds, each >= 1"), (["7"], "no finished run (summary.json) of seed(s) 7")):
        proc = subprocess.run([*REPORT, "--runs-dir", str(runs), "--out", str(tmp_path / "r2"), "--seeds", *bad],
                              capture_output=True, text=True, cwd=REPO, timeout=1200)
        assert proc.returncode != 0 and msg in proc.stderr, proc.stderr
    assert not (tmp_path / "r2").exists()


def test_param_table_prints_every_preset_of_every_config():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "param_table.py"), "configs/toy_cartpole_mt10.toml"],
                          capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"single", "mtl_embed", "varshare", "l2soft", "pcgrad", "paco", "softmod"} <= set(rows)
    assert "| 45x45 | 9,273 |" in rows["l2soft"] and "| 36x36 |" in rows["varshare"]  # preset flags and the method table both apply


@pytest.mark.parametrize("algo", ["ppo_single", "ppo_mtl_embed", "ppo_varshare", "ppo_pcgrad", "ppo_paco", "ppo_softmod"])
def test_evaluation_never_changes_training(tmp_path, algo):
    """The same seed trained with an evaluation after every iteration or with none ends in bit-identical
    weights: evaluation uses its own envs and RNG, so the report may compare runs evaluated on different grids."""
    import torch

    finals = []
    extra = ["--eval-weight-samples", "1"] if algo == "ppo_varshare" else []
    for every in ("0", "1280"):
        runs = tmp_path / every
        run_algo(algo, "--runs-dir", str(runs), "--total-timesteps", "5120", "--envs-per-task", "1", "--num-steps", "128", "--num-minibatches", "2",
                 "--eval-episodes", "1", "--eval-every", every, "--hidden-sizes", "16", "16", *extra)  # 4 iterations (single: 40)
        finals.append(torch.load(only_run(runs) / "checkpoints" / "latest.pt", weights_only=False)["agent"])
    assert finals[0].keys() == finals[1].keys()
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


def test_collect_results_copies_the_small_files_with_relative_paths(tmp_path):
    """scripts/collect_results.sh: per finished run config.json (this checkout's absolute path removed),
    eval.jsonl and summary.json; no checkpoints, event files or logs; unfinished runs left out; grid.tsv merged into
    the destination's, so collecting a study's new seeds from a fresh runs dir keeps the committed rows."""
    runs = tmp_path / "runs"
    done, unfinished = runs / "embed__s1", runs / "embed__s2"
    for d in (done, unfinished):
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "latest.pt").write_bytes(b"x")
        (d / "events.out.tfevents.1").write_bytes(b"x")
        (d / "config.json").write_text(json.dumps({"args": {"runs_dir": f"{REPO}/runs/study"}, "command": [f"{REPO}/.venv/bin/python"]}))
        (d / "eval.jsonl").write_text("{}\n")
    (done / "summary.json").write_text("{}")
    (runs / "grid.tsv").write_text(f"embed__s1\tppo_mtl_embed\t--init-from {REPO}/runs/study/pre__s1\nembed__s2\tppo_mtl_embed\t\n")
    dest = tmp_path / "results"
    dest.mkdir()  # an earlier collection of the same study, from another runs dir: its grid rows must survive
    (dest / "grid.tsv").write_text("other__s1\tppo_single\t--seed 1\nembed__s1\tppo_mtl_embed\t--stale\n")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "collect_results.sh"), str(runs), str(dest)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (dest / "embed__s1").iterdir()) == ["config.json", "eval.jsonl", "summary.json"]
    assert not (dest / "embed__s2").exists() and (dest / "grid.tsv").is_file()
    config = json.loads((dest / "embed__s1" / "config.json").read_text())
    assert config == {"args": {"runs_dir": "runs/study"}, "command": [".venv/bin/python"]}
    # merged: the earlier row kept in its place, a run in both takes the new row (relative --init-from: LOO rows), new runs appended
    assert (dest / "grid.tsv").read_text().splitlines() == [
        "other__s1\tppo_single\t--seed 1", "embed__s1\tppo_mtl_embed\t--init-from runs/study/pre__s1", "embed__s2\tppo_mtl_embed\t"]
    bad = subprocess.run(["bash", str(REPO / "scripts" / "collect_results.sh"), str(tmp_path / "nope"), str(dest)], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_mt10_cost_table_arithmetic_by_hand():
    """scripts/bench_mt10_cost.py: hours per run = iterations x (rollout + update) + evaluations x evaluation, with the
    evaluation scaled from the timed episodes to the config's; evaluations = eval_every crossings + the final one."""
    import tomllib

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_mt10_cost import CONFIG, run_cost

    data = tomllib.loads(CONFIG.read_text())
    assert (data["total_timesteps"], data["eval_every"], data["eval_episodes"]) == (20_067_840, 2_000_000, 50)
    hours, iterations, evaluations = run_cost({"label": "mtl_embed", "single": False, "batch": 99_840, "rollout_s": 100.0, "update_s": 20.0, "eval_s": 10.0}, data, 5)
    assert (iterations, evaluations) == (201, 11)  # crossings at 2M ... 20M, and the final evaluation at 20,067,840
    assert hours == pytest.approx((201 * 120 + 11 * 100) / 3600)
    hours, iterations, evaluations = run_cost({"label": "single", "single": True, "batch": 9_984, "rollout_s": 10.0, "update_s": 2.0, "eval_s": 1.0}, data, 5)
    assert (iterations, evaluations) == (200, 10)  # 1,996,800 steps: crossings at 200k ... 1.8M, and the final one
    assert hours == pytest.approx((200 * 12 + 10 * 10) / 3600)


def test_table_numbers_round_an_exact_half_the_same_whatever_the_summation_order():
    """report.fixed: success means are fractions whose exact halves (1681/2000 = 0.8405) come out of the float sums
    just above or just below the half, by the order of the sums; every table prints them as one value (half up)."""
    import random

    sys.path.insert(0, str(REPO / "scripts"))
    from report import fixed

    values = [0.1 * k for k in range(11)] * 150 + [0.1] * 340 + [0.2] * 10  # 2,000 ten-episode successes
    assert sum(values) / len(values) == pytest.approx(0.4305)  # the exact mean: 861 / 2000, a half at 3 decimals
    means = set()
    for seed in range(40):  # the same numbers summed in other orders
        random.Random(seed).shuffle(values)
        means.add(float(np.mean(values)))
    assert {f"{m:.3f}" for m in means} == {"0.430", "0.431"}  # plain formatting depends on the order ...
    assert {fixed(m) for m in means} == {"0.431"}  # ... fixed does not
    assert (fixed(0.8125), fixed(0.8405), fixed(1.0, 2), fixed(0.0), fixed(0.83349)) == ("0.813", "0.841", "1.00", "0.000", "0.833")
    assert fixed(float("nan")) == "nan"


def test_bootstrap_cis_are_the_same_on_every_call():
    """A report regenerated from the same run files must print the same CIs: rliable resamples with numpy's global
    generator, so report.interval_estimates seeds it (and leaves the caller's global state as it was)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from report import interval_estimates, mean_and_iqm

    rng = np.random.default_rng(0)
    scores = {"a": rng.uniform(size=(5, 10)), "b": rng.uniform(size=(3, 10))}
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = interval_estimates(scores, mean_and_iqm, reps=200)
    assert np.array_equal(np.random.get_state()[1], before)  # the global generator is restored
    np.random.uniform(size=7)  # whatever the caller's generator has done in between
    second = interval_estimates(scores, mean_and_iqm, reps=200)
    for label in scores:
        assert np.array_equal(first[0][label], second[0][label]) and np.array_equal(first[1][label], second[1][label])
        assert first[1][label][0, 0] < first[0][label][0] < first[1][label][1, 0]  # a real interval around the mean
    other = interval_estimates(scores, mean_and_iqm, reps=200, seed=1)
    assert not np.array_equal(first[1]["a"], other[1]["a"])  # the seed is what fixes them


def test_targets_table_numbers_by_hand(tmp_path):
    """scripts/targets_table.py: success, AUC, the off-centre tasks, KL centre / off-centre and the right-left cosine."""
    from mtrl.envs import make_suite

    tasks = make_suite("toy/CartPole-Targets-MT10").task_names
    success = {t: (1.0 if "right" in t or "left" in t else 0.5) for t in tasks}
    kl = {f"varshare/kl_mean_part/{t}": float(i) for i, t in enumerate(tasks)} | {f"varshare/kl_var_part/{t}": 1.0 for t in tasks}
    cos = np.eye(len(tasks))
    cos[tasks.index("standard-right"), tasks.index("standard-left")] = -0.25
    fake_run(tmp_path, "varshare@c1_b0.1__s101", "ppo_varshare", 101, success, steps=(100, 200), extra={"final_kl": kl, "residual_cosine": cos.tolist()})
    out = subprocess.run([sys.executable, "scripts/targets_table.py", "--config", "configs/toy_cartpole_targets_mt10.toml", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    cells = [c.strip() for c in out.stdout.splitlines()[2].split("|")[1:-1]]
    off = [i for i, t in enumerate(tasks) if "right" in t or "left" in t]
    centre_kl = np.mean([i + 1.0 for i in range(len(tasks)) if i not in off])
    off_kl = np.mean([i + 1.0 for i in off])
    mean = np.mean(list(success.values()))
    assert cells[:5] == ["varshare", "c1_b0.1", "101", f"{mean:.2f}", f"{mean * 0.75:.3f}"]  # the curve: 1/2 then all of the final
    assert cells[5] == "1.0 1.0 1.0 1.0" and cells[6] == f"{centre_kl:.1f} / {off_kl:.1f}" and cells[7] == "-0.25"


def test_targets_table_mean_rows_and_oracle_by_hand(tmp_path):
    """targets_table.py --mean: one row per method averaged over its seeds, and the oracle's row made of its task runs
    (a seed that misses a task is left out, not averaged in)."""
    from mtrl.envs import make_suite

    tasks = make_suite("toy/CartPole-Targets-MT10").task_names
    for seed, value in [(1, 1.0), (2, 0.5)]:
        fake_run(tmp_path, f"mtl_embed__s{seed}", "ppo_mtl_embed", seed, {t: value for t in tasks}, steps=(100, 200))
    for seed in (1, 2):
        for i, t in enumerate(tasks):
            if seed == 2 and t == "standard-left":
                continue  # seed 2's oracle is incomplete
            fake_run(tmp_path, f"single__{t}__s{seed}", "ppo_single", seed, {t: 1.0 if i % 2 else 0.0}, task=t, steps=(10, 20, 30, 40))
            config = tmp_path / f"single__{t}__s{seed}" / "config.json"  # the suite the oracle's task comes from
            config.write_text(config.read_text().replace("toy/CartPole-MT10", "toy/CartPole-Targets-MT10"))
    out = subprocess.run([sys.executable, "scripts/targets_table.py", "--config", "configs/toy_cartpole_targets_mt10.toml", "--mean", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "single seed 2: oracle incomplete" in out.stderr
    rows = {c[0]: c for c in ([x.strip() for x in line.split("|")[1:-1]] for line in out.stdout.splitlines()[2:])}
    assert list(rows) == ["single", "mtl_embed"]  # the config's [methods] order
    # mtl_embed: final 1.0 and 0.5 -> 0.75; each curve is (1/2, 1) x final -> AUC 0.75 x final -> 0.5625
    assert rows["mtl_embed"][2:4] == ["1,2", "0.75"] and float(rows["mtl_embed"][4]) == pytest.approx(0.5625, abs=6e-4)
    assert rows["mtl_embed"][5] == "0.8 0.8 0.8 0.8"  # (1 + 0.5) / 2 = 0.75, printed to one decimal
    # the oracle, seed 1 only: odd-indexed tasks succeed; curves 1/4..1 -> AUC 0.625 x final
    odd = np.mean([1.0 if i % 2 else 0.0 for i in range(len(tasks))])
    off = " ".join(f"{1.0 if tasks.index(t) % 2 else 0.0:.1f}" for t in ["standard-right", "long-pole-right", "standard-left", "long-pole-left"])
    assert rows["single"][2:6] == ["1", f"{odd:.2f}", "0.313", off]  # 0.5 x 0.625 = 0.3125: an exact half, printed half up
    only = subprocess.run([sys.executable, "scripts/targets_table.py", "--config", "configs/toy_cartpole_targets_mt10.toml", "--mean",
                           "--methods", "mtl_embed", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert only.returncode == 0 and [line.split("|")[1].strip() for line in only.stdout.splitlines()[2:]] == ["mtl_embed"]
    bad = subprocess.run([sys.executable, "scripts/targets_table.py", "--config", "configs/toy_cartpole_targets_mt10.toml",
                          "--methods", "mtl_embedd", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode != 0 and "mtl_embedd" in bad.stderr


def test_run_cost_splits_a_run_into_rollout_update_and_evaluation_by_hand(tmp_path):
    """scripts/run_cost.py against a hand-made run: B = 100 samples per iteration, rollout_SPS 50 (2 s per rollout),
    iteration ends (charts/wall_clock_s) at 5, 12, 19, 23 s, evaluations of 3 s after iterations 1, 2 and 4 (ending at
    8, 15, 26 s). By hand: updates 12-5-2-3 = 2, 19-12-2-3 = 2, 23-19-2 = 2 (5, 5, 2 if evaluations were not taken out);
    set-up 5-2-2 = 1."""
    from torch.utils.tensorboard import SummaryWriter

    sys.path.insert(0, str(REPO / "scripts"))
    import run_cost

    run = tmp_path / "fake__s1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"derived": {"batch_size": 100}}))
    w = SummaryWriter(str(run))
    for step, wall in [(100, 5.0), (200, 12.0), (300, 19.0), (400, 23.0)]:
        w.add_scalar("charts/wall_clock_s", wall, step)
        w.add_scalar("charts/rollout_SPS", 50.0, step)
    w.close()
    (run / "eval.jsonl").write_text("".join(json.dumps({"global_step": s, "wall_clock": t}) + "\n" for s, t in [(100, 8.0), (200, 15.0), (400, 26.0)]))
    r = run_cost.phase_times(run)
    assert r["iterations"] == 4 and r["evaluations"] == 3 and not r["resumed"]
    assert r["rollout_s"] == pytest.approx(2.0) and r["update_s"] == pytest.approx(2.0)
    assert r["eval_s"] == pytest.approx(3.0) and r["setup_s"] == pytest.approx(1.0)
    assert r["wall_clock_h"] == pytest.approx(26.0 / 3600)
    with pytest.raises(SystemExit, match="not a run directory"):
        run_cost.phase_times(tmp_path)


def test_eval_table_prints_each_evaluation_with_the_chosen_tasks_by_hand(tmp_path):
    """scripts/eval_table.py: a multi-task run with two evaluations and an oracle run of one task; the chosen tasks
    print in the given order, a task the run lacks prints "-", and a folder without eval.jsonl is an error."""
    multi, oracle = tmp_path / "mtl__s1", tmp_path / "single__b__s1"
    multi.mkdir(), oracle.mkdir()
    (multi / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        {"global_step": 100, "mean_success": 0.25, "success": {"a": 0.5, "b": 0.0}},
        {"global_step": 200, "mean_success": 0.75, "success": {"a": 1.0, "b": 0.5}}]))
    (oracle / "eval.jsonl").write_text(json.dumps({"global_step": 10, "mean_success": 0.3, "success": {"b": 0.3}}) + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_table.py"), str(multi), str(oracle), "--tasks", "b,a"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| run | steps | mean success (its tasks) | b | a |"
    assert lines[2:] == ["| mtl__s1 | 100 | 0.25 | 0.00 | 0.50 |", "| mtl__s1 | 200 | 0.75 | 0.50 | 1.00 |",
                         "| single__b__s1 | 10 | 0.30 | 0.30 | - |"]
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_table.py"), str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode != 0 and "no eval.jsonl" in bad.stderr
