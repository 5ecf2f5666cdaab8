"""toy/CartPole-Targets-MT10 and its MT3 variant (context/spec/protocol.md section 1, context/toy_suites.md):
the reward, the success rule, the unobserved target, and the claim that a task-blind policy cannot pass."""

import gymnasium as gym
import numpy as np
import pytest

from mtrl.envs import CARTPOLE_MT10, CARTPOLE_TARGETS_MT10, CartPoleTarget, EpisodeTracker, make_suite, make_vector_env


def test_suite_is_the_definitions_table():
    suite = make_suite("toy/CartPole-Targets-MT10")
    assert suite.task_names == ["standard", "high-gravity", "low-gravity", "heavy-cart", "long-pole", "short-pole",
                                "standard-right", "long-pole-right", "standard-left", "long-pole-left"]
    targets = {name: target for name, (_, target) in CARTPOLE_TARGETS_MT10.items()}
    assert [targets[n] for n in suite.task_names] == [0.0] * 6 + [1.0, 1.0, -1.0, -1.0]
    assert suite.success_rule == "info_success"
    env = suite.tasks[suite.task_names.index("long-pole-left")].make()
    u = env.unwrapped
    assert (u.gravity, u.masscart, u.masspole, u.length, u.force_mag) == CARTPOLE_MT10["long-pole"][:5]
    assert u.polemass_length == pytest.approx(0.1 * 1.0)
    assert make_suite("toy/CartPole-Targets-MT3").task_names == ["standard", "standard-right", "standard-left"]


def test_reward_is_the_distance_to_the_target_and_the_target_is_not_observed():
    plain = gym.make("CartPole-v1")
    right = make_suite("toy/CartPole-Targets-MT10").tasks[6].make()  # standard-right, x* = +1
    obs_p, _ = plain.reset(seed=3)
    obs_r, _ = right.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(40):
        a = int(rng.integers(2))
        obs_p, _, term_p, trunc_p, _ = plain.step(a)
        obs_r, reward, term_r, trunc_r, info = right.step(a)
        np.testing.assert_array_equal(obs_p, obs_r)  # same physics, same observation: x* is not in it
        assert (term_p, trunc_p) == (term_r, trunc_r)
        assert reward == pytest.approx(max(0.0, 1.0 - abs(float(obs_r[0]) - 1.0) / 2.4))
        assert info["success"] is False
        if term_p:
            break


class ScriptedCart(gym.Env):
    """Cart positions from a script; truncates at ``len(xs)`` unless told to terminate at the end."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, xs, terminate=False):
        self.xs, self.terminate = list(xs), terminate

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(4, np.float32), {}

    def step(self, action):
        x = self.xs[self.t]
        self.t += 1
        end = self.t == len(self.xs)
        return np.array([x, 0, 0, 0], np.float32), 1.0, end and self.terminate, end and not self.terminate, {}


@pytest.mark.parametrize("tail_distance,terminate,success", [
    (0.25, False, True),    # mean |x - x*| over the last 100 steps exactly at the tolerance: success
    (0.26, False, False),   # just above it
    (0.0, True, False),     # on target but terminated (fell) at the last step
])
def test_success_needs_the_time_limit_and_the_last_100_steps_near_the_target(tail_distance, terminate, success):
    # 400 steps far away (they must not count), then 100 steps at the given distance from x* = -1
    xs = [2.0] * 400 + [-1.0 + tail_distance] * 100
    env = CartPoleTarget(ScriptedCart(xs, terminate), target=-1.0)
    env.reset()
    for t in range(500):
        _, reward, term, trunc, info = env.step(0)
        assert info["success"] is (success and t == 499)
    assert term is terminate and trunc is (not terminate)
    assert reward == pytest.approx(1.0 - tail_distance / 2.4)


@pytest.mark.parametrize("vector_mode", ["gym", "sync"])
def test_success_reaches_the_episode_tracker_through_the_vector_env(vector_mode):
    """SAME_STEP autoreset moves the last step's info into final_info: the tracker must still see it (gymnasium's
    SyncVectorEnv and the vectorised CartPole)."""
    suite = make_suite("toy/CartPole-Targets-MT3")
    envs, task_ids = make_vector_env(suite, 1, seed=0, vector_mode=vector_mode)
    tracker = EpisodeTracker(suite, task_ids)
    obs, _ = envs.reset(seed=[0, 1, 2])
    finished = []
    for _ in range(600):  # a balancing controller that ignores the task: rests near x = 0
        obs, r, term, trunc, infos = envs.step(_balance(obs))
        finished += tracker.step(r, term, trunc, infos)
        if len(finished) >= 3:
            break
    assert sorted(task for task, *_ in finished) == [0, 1, 2]
    success = {task: ok for task, _, length, ok, _ in finished}
    assert success[0] and not success[1] and not success[2]   # centre held, neither off-centre target


def _balance(obs: np.ndarray) -> np.ndarray:
    """A task-blind linear feedback law that keeps a CartPole upright near the centre for 500 steps."""
    x, x_dot, theta, theta_dot = np.asarray(obs, dtype=np.float64).T
    return (theta * 10.0 + theta_dot * 2.0 + x * 1.0 + x_dot * 2.0 > 0).astype(np.int64)


def test_a_task_blind_policy_is_capped_on_the_mt3_variant():
    """Any task-blind policy sees identical trajectories on the three tasks (same physics, unobserved target),
    so its mean return over them is at most 500 x max_x mean_k (1 - |x - x*_k| / 2.4) = 500 x 0.722 = 361.1, its
    mean return over the two off-centre tasks at most 500 x (2 - 2/2.4) / 2 = 291.7 (the learning tests' ceiling),
    and it succeeds on at most one task. Checked on a balancing controller parked at several positions."""
    suite = make_suite("toy/CartPole-Targets-MT3")
    for park in (0.0, 0.5, 1.0, -1.0):
        returns, successes = [], []
        for task in suite.tasks:
            env = task.make()
            obs, _ = env.reset(seed=7)
            ret, info = 0.0, {}
            for _ in range(500):
                shifted = np.array([obs[0] - park, *obs[1:]])
                obs, r, term, trunc, info = env.step(int(_balance(shifted[None])[0]))
                ret += r
                if term or trunc:
                    break
            returns.append(ret)
            successes.append(info["success"])
        assert np.mean(returns) <= 500 * (1 + 2 * (1 - 1 / 2.4)) / 3 + 1e-6, (park, returns)
        assert (returns[1] + returns[2]) / 2 <= 500 * (2 - 2 / 2.4) / 2 + 1e-6, (park, returns)
        assert sum(successes) <= 1, (park, successes)
    assert 500 * (1 + 2 * (1 - 1 / 2.4)) / 3 == pytest.approx(361.111, abs=1e-3)
