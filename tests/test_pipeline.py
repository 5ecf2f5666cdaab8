"""The pipeline around the algorithm files: capacity matching, the launcher, the report."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, only_run, run_algo
from mtrl.capacity import count_params, make_args, match_width

LAUNCH = [sys.executable, str(REPO / "scripts" / "launch.py")]
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
    """The benchmark configs record widths within 5% of ppo_mtl_embed's active count (protocol.md section 4)."""
    import tomllib

    for cfg in sorted((REPO / "configs").glob("*mt*.toml")):
        methods = tomllib.loads(cfg.read_text()).get("methods", {})
        target = count_params("ppo_mtl_embed", make_args("ppo_mtl_embed", str(cfg)))["active_per_task"]
        for label, (algo, *flags) in methods.items():
            if algo == "ppo_single" or "--task-encoding" in flags:
                continue
            kw = {}
            if "--hidden-sizes" in flags:
                i = flags.index("--hidden-sizes")
                kw["hidden_sizes"] = tuple(int(v) for v in flags[i + 1 : i + 3])
            if "--residual" in flags:
                kw["residual"] = flags[flags.index("--residual") + 1]
            active = count_params(algo, make_args(algo, str(cfg), **kw))["active_per_task"]
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
                   '[methods]\nembed = ["ppo_mtl_embed"]\nblind = ["ppo_mtl_embed", "--task-encoding", "none"]\nsingle = ["ppo_single"]\n')
    return cfg


def test_launcher_runs_a_grid_skips_finished_runs_resumes_and_reports(tmp_path):
    cfg, runs = write_config(tmp_path), tmp_path / "runs"
    base = [*LAUNCH, "--config", str(cfg), "--workers", "2", "--runs-dir", str(runs)]
    cmd = [*base, "--methods", "embed", "blind", "--seeds", "1-2", "--", *TINY]
    for c in (cmd, [*base, "--methods", "single", "--seeds", "1", "--", *TINY]):
        first = subprocess.run(c, capture_output=True, text=True, cwd=REPO, timeout=600)
        assert first.returncode == 0, first.stdout + first.stderr
    names = sorted(p.name for p in runs.iterdir() if p.name != "logs")
    tasks = json.loads((runs / "embed__s1" / "config.json").read_text())["task_names"]
    assert names == sorted([f"{m}__s{s}" for m in ("embed", "blind") for s in (1, 2)] + [f"single__{t}__s1" for t in tasks])
    cfg_single = json.loads((runs / "single__reversed-push__s1" / "config.json").read_text())
    assert cfg_single["args"]["task"] == "reversed-push" and cfg_single["args"]["learning_rate"] == 0.002
    assert json.loads((runs / "blind__s1" / "config.json").read_text())["args"]["task_encoding"] == "none"

    # again: every run is finished and skipped; a run without summary resumes from its checkpoint
    (runs / "embed__s2" / "summary.json").unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("[done]") == 3 and "[ok     ] embed__s2" in again.stdout
    assert "--resume" in (runs / "logs" / "embed__s2.log").read_text()
    assert (runs / "embed__s2" / "summary.json").is_file()

    # the report: numbers equal the mean of the runs' final per-task success
    out = tmp_path / "report"
    rep = subprocess.run([*REPORT, "--runs-dir", str(runs), "--out", str(out), "--reference", "embed", "--reps", "200"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert rep.returncode == 0, rep.stderr
    text = (out / "report.md").read_text()
    for label in ("embed", "blind", "single"):
        if label == "single":  # the oracle row assembles one run per task
            finals = [np.mean([json.loads((runs / f"single__{t}__s1" / "summary.json").read_text())["mean_success"] for t in tasks])]
        else:
            finals = [json.loads((runs / f"{label}__s{s}" / "summary.json").read_text())["mean_success"] for s in (1, 2)]
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert row.split("|")[2].strip() == str(len(finals))
        assert row.split("|")[3].strip().startswith(f"{np.mean(finals):.3f}")
    assert "P(embed > blind)" in text and (out / "curves_toy-CartPole-MT10.png").is_file() and (out / "profiles_toy-CartPole-MT10.png").is_file()


def test_launcher_slurm_array_and_bad_input(tmp_path):
    cfg, runs = write_config(tmp_path), tmp_path / "runs"
    proc = subprocess.run([*LAUNCH, "--config", str(cfg), "--methods", "embed", "--seeds", "3", "5", "--slurm", "--dry-run",
                           "--runs-dir", str(runs), "--slurm-directive=--time=01:00:00"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    script = (runs / "slurm" / "grid.sbatch").read_text()
    assert "#SBATCH --array=0-1%32" in script and "#SBATCH --time=01:00:00" in script and '--run-job "$SLURM_ARRAY_TASK_ID"' in script
    jobs = json.loads(next((runs / "slurm").glob("jobs-*.json")).read_text())["jobs"]
    assert [j["name"] for j in jobs] == ["embed__s3", "embed__s5"]
    bad = subprocess.run([*LAUNCH, "--config", str(cfg), "--methods", "nope"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode != 0 and "nope" in bad.stderr and "embed" in bad.stderr


def test_param_table_prints_every_preset_of_every_config():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "param_table.py"), "configs/toy_cartpole_mt10.toml"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"single", "mtl_embed", "varshare", "l2soft", "pcgrad", "paco", "softmod"} <= set(rows)
    assert "| 45x45 | 9,273 |" in rows["l2soft"] and "| 36x36 |" in rows["varshare"]  # preset flags and the method table both apply
