"""The numpy-vectorised CartPole (mtrl.envs.CartPoleVectorEnv) against its reference, gymnasium's SyncVectorEnv
over the toy CartPole envs: the same observations, rewards, ends, final observations and successes, bit for bit,
step by step; and a whole training run that is identical with either."""

import json

import numpy as np
import pytest
import torch
from conftest import only_run, run_algo

from mtrl.envs import CartPoleVectorEnv, EpisodeTracker, final_obs, make_suite, make_vector_env


def _controller(obs: np.ndarray, park: np.ndarray) -> np.ndarray:
    """A linear balancing law parked at a per-env position: long episodes, truncations, successes on and off
    target (the caller mixes in random actions for terminations)."""
    x, x_dot, theta, theta_dot = np.asarray(obs, dtype=np.float64).T
    return (theta * 10.0 + theta_dot * 2.0 + (x - park) * 1.0 + x_dot * 2.0 > 0).astype(np.int64)


@pytest.mark.parametrize("env_id, per_task", [("toy/CartPole-Targets-MT10", 3), ("toy/CartPole-MT10", 2), ("CartPole-v1", 5)])
def test_vectorised_cartpole_equals_gymnasium_step_by_step(env_id, per_task):
    suite = make_suite(env_id)
    fast, ids = make_vector_env(suite, per_task, seed=3)
    ref, ref_ids = make_vector_env(suite, per_task, seed=3, vector_mode="gym")
    assert isinstance(fast, CartPoleVectorEnv) and not isinstance(ref, CartPoleVectorEnv)
    assert (ids == ref_ids).all() and fast.single_observation_space == ref.single_observation_space
    assert fast.single_action_space == ref.single_action_space
    n = len(ids)
    seeds = [3 + i for i in range(n)]
    obs_f, _ = fast.reset(seed=seeds)
    obs_r, _ = ref.reset(seed=seeds)
    np.testing.assert_array_equal(obs_f, obs_r)
    assert obs_f.dtype == obs_r.dtype == np.float32
    trk_f, trk_r = EpisodeTracker(suite, ids), EpisodeTracker(suite, ids)
    rng = np.random.default_rng(0)
    park = rng.choice([-1.0, 0.0, 1.0, 0.22, -0.24, 0.77, -1.23], size=n)  # held: on, near (both sides of 0.25) and off every target
    explore = rng.choice([0.0, 0.02, 0.3], size=n)  # random-action rate per env
    ends = {"terminated": 0, "truncated": 0, "success": 0, "failure": 0, "held_but_failed": 0}
    for _ in range(2600):
        act = _controller(obs_f, park)
        flip = rng.random(n) < explore
        act = np.where(flip, rng.integers(0, 2, size=n), act)
        obs_f, rew_f, term_f, trunc_f, inf_f = fast.step(act)
        obs_r, rew_r, term_r, trunc_r, inf_r = ref.step(act)
        np.testing.assert_array_equal(obs_f, obs_r)
        # the float64 physics state too: a reordered operation shows here long before it reaches a float32 obs
        np.testing.assert_array_equal(fast.state, np.stack([e.unwrapped.state for e in ref.envs]))
        np.testing.assert_array_equal(rew_f, rew_r)
        assert rew_f.dtype == rew_r.dtype
        np.testing.assert_array_equal(term_f, term_r)
        np.testing.assert_array_equal(trunc_f, trunc_r)
        done = term_f | trunc_f
        np.testing.assert_array_equal(final_obs(obs_f, inf_f, done), final_obs(obs_r, inf_r, done))
        fin_f, fin_r = trk_f.step(rew_f, term_f, trunc_f, inf_f), trk_r.step(rew_r, term_r, trunc_r, inf_r)
        assert fin_f == fin_r
        ends["terminated"] += int(term_f.sum())
        ends["truncated"] += int(trunc_f.sum())
        ends["success"] += sum(ok for *_, ok, _i in fin_f)
        ends["failure"] += sum(not ok for *_, ok, _i in fin_f)
        ends["held_but_failed"] += sum(not ok and trunc_f[i] and not term_f[i] for *_, ok, i in fin_f)
    # the comparison covered every kind of episode end (it cannot pass on a run of only one kind)
    assert min(ends["terminated"], ends["truncated"], ends["success"], ends["failure"]) >= 3, ends
    if "Targets" in env_id:  # 500 steps held, but away from the target
        assert ends["held_but_failed"] >= 3, ends


def test_vectorised_cartpole_refuses_bad_actions_and_modes():
    suite = make_suite("toy/CartPole-Targets-MT3")
    envs, _ = make_vector_env(suite, 1, seed=0)
    envs.reset(seed=[0, 1, 2])
    with pytest.raises(ValueError, match="actions must be 3 values in"):
        envs.step(np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="actions must be 3 values in"):
        envs.step(np.array([0, 1]))
    with pytest.raises(ValueError, match="vector_mode 'fast'"):
        make_vector_env(suite, 1, seed=0, vector_mode="fast")
    lunar, _ = make_vector_env(make_suite("toy/LunarLander-MT10"), 1, seed=0)
    assert not isinstance(lunar, CartPoleVectorEnv)  # only CartPole tasks are vectorised
    lunar.close()


def test_a_training_run_is_identical_with_the_vectorised_and_the_gymnasium_envs(tmp_path):
    """ppo_mtl_embed on Targets-MT3: the same final weights and the same evaluations with --vector-mode sync (training
    and evaluation envs vectorised) and gym (gymnasium's SyncVectorEnv for both: the reference)."""
    common = ["--env-id", "toy/CartPole-Targets-MT3", "--total-timesteps", "12288", "--num-steps", "256",
              "--eval-every", "6144", "--eval-episodes", "4", "--seed", "5"]
    out = {}
    for mode in ("sync", "gym"):
        d = tmp_path / mode
        run_algo("ppo_mtl_embed", *common, "--vector-mode", mode, "--runs-dir", str(d))
        run = only_run(d)
        ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)
        evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
        out[mode] = (ckpt, evals)
    (ck_s, ev_s), (ck_g, ev_g) = out["sync"], out["gym"]
    key = "agent"
    assert ck_s[key].keys() == ck_g[key].keys()
    for name in ck_s[key]:
        assert torch.equal(ck_s[key][name], ck_g[key][name]), name
    strip = lambda e: {k: v for k, v in e.items() if k != "wall_clock"}  # noqa: E731
    assert [strip(e) for e in ev_s] == [strip(e) for e in ev_g]
    assert len(ev_s) >= 2
