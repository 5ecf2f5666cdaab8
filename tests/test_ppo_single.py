"""ppo_single end to end: the run contract, the ratio invariant, determinism, resume, bad input."""

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import REPO, algo_cmd, only_run, read_jsonl, run_algo, scalars
from mtrl.run import state_fingerprint

TINY = {
    "CartPole-v1": ["--total-timesteps", "1024", "--envs-per-task", "2", "--num-steps", "128", "--eval-every", "512", "--eval-episodes", "2"],
    "LunarLander-v3": ["--total-timesteps", "1024", "--envs-per-task", "2", "--num-steps", "128", "--eval-every", "512", "--eval-episodes", "2"],
    "metaworld/reach-v3": ["--total-timesteps", "256", "--envs-per-task", "2", "--num-steps", "64", "--eval-every", "0", "--eval-episodes", "1"],
}
REQUIRED_SCALARS = ["charts/episodic_return", "charts/SPS", "charts/learning_rate", "charts/gradient_steps", "charts/wall_clock_s",
                    "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                    "losses/explained_variance", "eval/success_rate", "debug/first_minibatch_max_ratio_dev"]


def check_contract(run_dir, algo, env_id, task_names, final_step):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == algo and config["args"]["env_id"] == env_id
    assert config["task_names"] == task_names
    assert set(config["git"]) == {"commit", "dirty"} and config["versions"]["torch"].startswith("2.13")
    assert isinstance(config["versions"]["cpu"], str) and config["versions"]["cpu"]   # seeds may come from several CPU types
    assert config["derived"]["final_step"] == final_step and "params" in config["derived"]
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert evals and evals[-1]["global_step"] == final_step
    for e in evals:
        assert set(e["success"]) == set(task_names) and set(e["return"]) == set(task_names)
        assert 0.0 <= e["mean_success"] <= 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ["algo", "env_id", "seed", "total_steps", "final_success", "final_return", "mean_success", "params", "wall_clock_s", "mean_SPS"]:
        assert key in summary, key
    assert summary["total_steps"] == final_step
    assert set(summary["params"]) == {"active_per_task", "inference", "total"}
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    tags = scalars(run_dir)
    if env_id.startswith("metaworld"):  # 500-step episodes: none finishes in a tiny run
        REQ = [t for t in REQUIRED_SCALARS if t != "charts/episodic_return"]
    else:
        REQ = REQUIRED_SCALARS
    for tag in REQ:
        assert tag in tags, tag
    for name in task_names:
        assert f"eval/success_rate/{name}" in tags and f"eval/return/{name}" in tags
    return tags


@pytest.mark.parametrize("env_id", list(TINY))
def test_tiny_run_leaves_the_run_contract(runs_dir, env_id):
    run_algo("ppo_single", "--env-id", env_id, "--runs-dir", str(runs_dir), *TINY[env_id])
    run_dir = only_run(runs_dir)
    assert run_dir.name.startswith(env_id.replace("/", "-") + "__ppo_single__1__")
    batch = 2 * int(TINY[env_id][TINY[env_id].index("--num-steps") + 1])
    final = -(-int(TINY[env_id][1]) // batch) * batch
    tags = check_contract(run_dir, "ppo_single", env_id, [env_id.split("/")[-1] if "metaworld" in env_id else env_id], final)
    # the PPO ratio is exactly 1 before the first optimiser step of every iteration
    devs = [v for _, v in tags["debug/first_minibatch_max_ratio_dev"]]
    assert len(devs) == final // batch and max(devs) < 1e-4


def test_suite_task_runs_alone(runs_dir):
    run_algo("ppo_single", "--env-id", "toy/CartPole-MT10", "--task", "reversed-push", "--runs-dir", str(runs_dir), *TINY["CartPole-v1"])
    run_dir = only_run(runs_dir)
    assert "reversed-push" in run_dir.name
    check_contract(run_dir, "ppo_single", "toy/CartPole-MT10", ["reversed-push"], 1024)


def test_config_file_values_are_defaults_and_flags_override(runs_dir, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('learning_rate = 0.001\nnum_steps = 64\nhidden_sizes = [32, 16]\n[ppo_varshare]\nkl_coef = 3.0\n')
    run_algo("ppo_single", "--config", str(cfg), "--num-steps", "32", "--runs-dir", str(runs_dir), "--total-timesteps", "128",
             "--envs-per-task", "2", "--eval-episodes", "1")
    args = json.loads((only_run(runs_dir) / "config.json").read_text())["args"]
    assert args["learning_rate"] == 0.001 and args["num_steps"] == 32 and args["hidden_sizes"] == [32, 16]


def test_same_seed_gives_identical_losses_and_evaluations(tmp_path):
    results = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        run_algo("ppo_single", "--runs-dir", str(d), "--run-name", "x", *TINY["CartPole-v1"])
        tags = scalars(d / "x")
        losses = {k: [v for _, v in tags[k]] for k in tags if k.startswith("losses/")}
        evals = [(e["global_step"], e["success"], e["return"]) for e in read_jsonl(d / "x" / "eval.jsonl")]
        results.append((losses, evals))
    assert results[0] == results[1]


def test_sigterm_leaves_a_checkpoint_and_resume_finishes_with_the_saved_state(runs_dir):
    args = ["--runs-dir", str(runs_dir), "--run-name", "r", "--total-timesteps", "60000", "--envs-per-task", "4", "--num-steps", "128",
            "--checkpoint-every", "20480", "--eval-every", "0", "--eval-episodes", "2"]
    ckpt = runs_dir / "r" / "checkpoints" / "latest.pt"
    proc = subprocess.Popen(algo_cmd("ppo_single", *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert not (runs_dir / "r" / "summary.json").exists()
    saved = torch.load(ckpt, weights_only=False)
    assert 0 < saved["global_step"] < 60000 and saved["global_step"] % 512 == 0
    expected = state_fingerprint({k: saved[k] for k in ["agent", "optimizer", "obs_norm", "reward_scaler", "global_step", "iteration", "gradient_steps", "rng"]})

    resumed = run_algo("ppo_single", "--resume", str(runs_dir / "r"))
    assert f"at step {saved['global_step']} (state fingerprint {expected})" in resumed.stdout
    summary = json.loads((runs_dir / "r" / "summary.json").read_text())
    assert summary["total_steps"] == 60416  # ceil(60000 / 512) * 512
    tags = scalars(runs_dir / "r")
    steps = [s for s, _ in tags["losses/policy_loss"]]
    assert steps[-1] == 60416 and len(set(steps)) == 60416 // 512  # every iteration logged once, none lost
    # the wall clock continues from the checkpoint's: the resumed part does not start again at 0
    after = [v for s, v in tags["charts/wall_clock_s"] if s > saved["global_step"]]
    assert saved["wall_clock_s"] > 0 and min(after) > saved["wall_clock_s"], (saved["wall_clock_s"], after[:3])
    assert summary["wall_clock_s"] > saved["wall_clock_s"]


@pytest.mark.parametrize("bad,needle", [
    (["--env-id", "Foo-v0"], "Foo-v0"),
    (["--env-id", "toy/CartPole-MT10"], "--task"),
    (["--env-id", "toy/CartPole-MT10", "--task", "nope"], "nope"),
    (["--env-id", "metaworld/nope-v3"], "nope-v3"),
    (["--num-steps", "128", "--num-minibatches", "3"], "--num-minibatches 3 must divide --num-steps 128"),
    (["--learning-rate", "0"], "--learning-rate must be > 0"),
    (["--total-timesteps", "-5"], "--total-timesteps must be > 0"),
    (["--resume", "no/such/run"], "no/such/run"),
])
def test_bad_input_fails_fast_without_a_run_directory(runs_dir, bad, needle):
    proc = run_algo("ppo_single", "--runs-dir", str(runs_dir), *bad, check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "error:" in proc.stderr
    assert list(runs_dir.iterdir()) == []


def test_unknown_config_key_is_an_error(runs_dir, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("learning_rate = 0.001\nbogus_key = 1\n")
    proc = run_algo("ppo_single", "--config", str(cfg), "--runs-dir", str(runs_dir), check=False, timeout=60)
    assert proc.returncode == 2 and "bogus_key" in proc.stderr
    assert list(runs_dir.iterdir()) == []


def test_existing_run_directory_is_never_overwritten(runs_dir):
    (runs_dir / "taken").mkdir()
    (runs_dir / "taken" / "keep.txt").write_text("x")
    proc = run_algo("ppo_single", "--runs-dir", str(runs_dir), "--run-name", "taken", check=False, timeout=60)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert [p.name for p in (runs_dir / "taken").iterdir()] == ["keep.txt"]
