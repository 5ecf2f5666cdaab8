"""GAE against hand-computed values, and the final-observation plumbing of SAME_STEP autoreset."""

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from mtrl.envs import final_obs
from mtrl.ppo import compute_gae


def test_gae_hand_computed_with_termination_and_truncation():
    # one env, gamma = lambda = 0.5; step 1 terminates, step 2 is truncated (final obs value 100)
    rewards = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    values = np.array([[10.0], [20.0], [30.0], [40.0]], np.float32)
    terms = np.array([[0], [1], [0], [0]], bool)
    truncs = np.array([[0], [0], [1], [0]], bool)
    final_values = np.array([[0.0], [999.0], [100.0], [0.0]], np.float32)  # 999: must be ignored (terminated)
    next_value = np.array([50.0], np.float32)
    adv, ret = compute_gae(rewards, values, next_value, terms, truncs, final_values, gamma=0.5, gae_lambda=0.5)
    # t=3: 4 + .5*50 - 40 = -11                (bootstraps from the value after the rollout)
    # t=2: 3 + .5*100 - 30 = 23, chain cut     (truncated: bootstraps from the final observation)
    # t=1: 2 + 0 - 20 = -18, chain cut         (terminated: no bootstrap)
    # t=0: 1 + .5*20 - 10 = 1; 1 + .25*(-18) = -3.5
    np.testing.assert_allclose(adv[:, 0], [-3.5, -18.0, 23.0, -11.0])
    np.testing.assert_allclose(ret[:, 0], [6.5, 2.0, 53.0, 29.0])


def test_gae_terminated_and_truncated_at_once_is_terminal():
    adv, _ = compute_gae(np.array([[1.0]]), np.array([[0.0]]), np.array([5.0]), np.array([[True]]), np.array([[True]]),
                         np.array([[7.0]]), gamma=0.9, gae_lambda=0.9)
    assert adv[0, 0] == 1.0


def test_gae_no_episode_end_matches_discounted_sum_at_lambda_one():
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    nv = rng.normal(size=3)
    z = np.zeros((6, 3), bool)
    _, ret = compute_gae(r, v, nv, z, z, np.zeros((6, 3)), gamma=0.9, gae_lambda=1.0)
    expected = sum(0.9**k * r[k] for k in range(6)) + 0.9**6 * nv  # Monte-Carlo return from t=0
    np.testing.assert_allclose(ret[0], expected, rtol=1e-5)


def test_final_obs_is_the_true_last_observation_not_the_reset_one():
    envs = SyncVectorEnv([lambda: gym.make("CartPole-v1", max_episode_steps=3) for _ in range(2)], autoreset_mode=AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=0)
    for _ in range(3):
        prev = obs
        obs, _, term, trunc, infos = envs.step(np.zeros(2, np.int64))
    assert trunc.all() and not term.any()
    fo = final_obs(obs, infos, trunc)
    for i in range(2):
        np.testing.assert_array_equal(fo[i], infos["final_obs"][i])
        assert not np.allclose(fo[i], obs[i])  # obs[i] is the reset observation of the next episode
        # the final obs is one CartPole step after the previous obs (x moves by tau * x_dot)
        assert abs(fo[i][0] - (prev[i][0] + 0.02 * prev[i][1])) < 1e-5
