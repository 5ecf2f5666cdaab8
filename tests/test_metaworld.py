"""Meta-World: every script on MT10, the official evaluation adapter, goals, truncation bootstrapping."""

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import REPO, algo_cmd, read_jsonl, scalars
from mtrl.envs import final_obs, make_suite, make_vector_env
from mtrl.evaluation import Evaluator
from mtrl.ppo import ObsNormalizer

ALGOS = ["ppo_single", "ppo_mtl_embed", "ppo_varshare", "ppo_pcgrad", "ppo_paco", "ppo_softmod"]
TINY = ["--env-id", "metaworld/MT10", "--envs-per-task", "1", "--num-steps", "16", "--num-minibatches", "2", "--eval-episodes", "1"]
MT10 = make_suite("metaworld/MT10").task_names


@pytest.fixture(scope="module")
def mt10_runs(tmp_path_factory):
    """Each script on MT10 for two tiny iterations and a one-episode evaluation (two at a time)."""
    root = tmp_path_factory.mktemp("mt10")

    def launch(algo):
        extra = ["--task", "push-v3", "--total-timesteps", "32"] if algo == "ppo_single" else ["--total-timesteps", "320"]
        cmd = algo_cmd(algo, *TINY, *extra, "--runs-dir", str(root), "--run-name", algo, "--eval-every", "160" if algo != "ppo_single" else "16")
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(ALGOS, pool.map(launch, ALGOS)))
    return root, procs


@pytest.mark.parametrize("algo", ALGOS)
def test_every_script_runs_mt10_and_leaves_the_run_contract(mt10_runs, algo):
    root, procs = mt10_runs
    assert procs[algo].returncode == 0, procs[algo].stderr[-3000:]
    run_dir = root / algo
    names = ["push-v3"] if algo == "ppo_single" else MT10
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task_names"] == names and len(MT10) == 10
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert len(evals) == 2 and all(set(e["success"]) == set(names) for e in evals)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["final_success"]) == set(names) and summary["params"] == config["derived"]["params"]
    tags = scalars(run_dir)
    for name in names:
        assert f"eval/success_rate/{name}" in tags and f"eval/return/{name}" in tags
    assert max(v for _, v in tags["debug/first_minibatch_max_ratio_dev"]) < 1e-4
    assert (run_dir / "checkpoints" / "latest.pt").is_file()


def scripted_reach(x, task_ids):
    """The scripted reach-v3 policy for task 0 (reach), zero actions for the others; x: raw observations."""
    from metaworld.policies import SawyerReachV3Policy

    out = np.zeros((x.shape[0], 1, 4), np.float32)
    out[0, 0] = SawyerReachV3Policy().get_action(x[0, 0].numpy().astype(np.float64))
    return torch.as_tensor(out)


def test_official_evaluation_counts_success_and_covers_every_task():
    suite = make_suite("metaworld/MT3", seed=1)
    ev = Evaluator(suite, 4, seed=7, device=torch.device("cpu"))
    raw = ObsNormalizer((39,), enabled=False)
    results = ev.run(scripted_reach, raw)
    assert list(results) == ["reach-v3", "push-v3", "pick-place-v3"]
    # the scripted reacher succeeds within its episodes (counted: success at a step ends the episode);
    # doing nothing never pushes or picks anything
    assert results["reach-v3"]["success"] == 1.0
    assert results["push-v3"]["success"] == 0.0 and results["pick-place-v3"]["success"] == 0.0
    # the same episodes at the next evaluation (fresh envs, same goal order)
    assert ev.run(scripted_reach, raw) == results


def test_training_success_is_success_at_any_step_of_the_episode():
    """Mocked infos: env 0 succeeds at step 3 only, env 1 never; both episodes end by truncation at step 6,
    where env 0's last-step success is 0. The tracker reports env 0 successful, env 1 not, and restarts."""
    from mtrl.envs import EpisodeTracker

    tracker = EpisodeTracker(make_suite("metaworld/reach-v3"), np.zeros(2, dtype=int))
    no = np.zeros(2, bool)
    for t in range(6):
        success = np.array([1.0 if t == 3 else 0.0, 0.0])
        last = t == 5
        infos = {"success": success}
        if last:
            infos["final_info"] = {"success": success, "_success": np.ones(2, bool)}
        finished = tracker.step(np.ones(2), no, np.full(2, last), infos)
    assert [(f[3], f[4]) for f in finished] == [(True, 0), (False, 1)]
    assert not tracker.any_success.any() and (tracker.len == 0).all()


def test_fifty_evaluation_episodes_use_each_training_goal_once():
    suite = make_suite("metaworld/reach-v3", seed=2)
    env = suite.tasks[0].make_eval(5)
    goals = []
    for _ in range(50):
        env.reset()
        goals.append(tuple(np.round(env.unwrapped._target_pos, 6)))
    assert len(set(goals)) == 50
    env.reset()  # the 51st episode starts the next cycle
    assert tuple(np.round(env.unwrapped._target_pos, 6)) in set(goals)


def test_training_episodes_end_only_by_truncation_and_the_final_obs_is_kept():
    """Meta-World training: 500-step episodes end by truncation (never termination, even on success);
    SAME_STEP autoreset returns the reset observation and the true last one in info["final_obs"], which
    is what the scripts bootstrap from."""
    suite = make_suite("metaworld/reach-v3", seed=1)
    envs, _ = make_vector_env(suite, 2, seed=1)
    obs, _ = envs.reset(seed=[1, 2])
    from metaworld.policies import SawyerReachV3Policy

    policy = SawyerReachV3Policy()
    for t in range(500):
        actions = np.stack([policy.get_action(o) for o in obs])  # succeeds early: success must not terminate
        prev = obs
        obs, reward, term, trunc, infos = envs.step(actions)
        assert not term.any()
        if t < 499:
            assert not trunc.any()
    assert trunc.all() and "final_obs" in infos
    last = final_obs(obs, infos, trunc)
    # the true last observation continues the episode (close to the previous one), the returned one is a reset
    assert np.abs(last - prev).max() < 0.1 and np.abs(obs - last).max() > 0.01
    envs.close()


def test_mt10_config_anchor_preset_and_softmod_variants_parse_as_documented():
    """configs/metaworld_mt10.toml (context/mt10_reference.md): the mtppo_reference preset carries the Meta-World+
    MTPPO values that have a flag, and the compared softmod is the official network at its matched width."""
    import tomllib

    from mtrl.capacity import algo_module
    from mtrl.run import parse_args

    cfg = REPO / "configs" / "metaworld_mt10.toml"
    methods = tomllib.loads(cfg.read_text())["methods"]

    def preset(label):
        algo, *flags = methods[label]
        return parse_args(algo_module(algo).Args, algo, argv=["--config", str(cfg), *flags])

    ref = preset("mtppo_reference")
    assert (ref.hidden_sizes, ref.activation) == ((400, 400, 400), "relu")
    assert not (ref.norm_obs or ref.norm_reward or ref.norm_adv or ref.anneal_lr or ref.clip_vloss)
    assert (ref.max_grad_norm, ref.vf_coef, ref.learning_rate, ref.gamma, ref.gae_lambda) == (1.0, 0.001, 3e-4, 0.99, 0.97)
    assert (ref.update_epochs, ref.num_minibatches, ref.clip_coef, ref.ent_coef, ref.envs_per_task) == (16, 32, 0.2, 5e-3, 1)
    assert ref.task_encoding == "onehot"  # MW+ appends the one-hot too (use_one_hot = True)
    official, paper = preset("softmod"), preset("softmod_paper")
    assert (official.softmod_variant, official.hidden_sizes) == ("official", (100, 100))
    assert (paper.softmod_variant, paper.hidden_sizes) == ("paper", (119, 119))
