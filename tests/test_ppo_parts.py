"""Backbone pieces against independent references: torch.distributions, numpy statistics."""

import numpy as np
import pytest
import torch

from mtrl.ppo import ObsNormalizer, RewardScaler, RunningMeanStd, action_head


def test_gaussian_head_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logstd, a = torch.randn(5, 3), torch.randn(5, 3) * 0.3, torch.randn(5, 3)
    _, logp, ent = action_head(mean, logstd, a)
    ref = torch.distributions.Normal(mean, logstd.exp())
    torch.testing.assert_close(logp, ref.log_prob(a).sum(-1))
    torch.testing.assert_close(ent, ref.entropy().sum(-1))
    act, _, _ = action_head(mean, logstd, deterministic=True)
    torch.testing.assert_close(act, mean)


def test_categorical_head_matches_torch_distributions():
    torch.manual_seed(0)
    logits, a = torch.randn(6, 4), torch.randint(0, 4, (6,))
    _, logp, ent = action_head(logits, None, a)
    ref = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(logp, ref.log_prob(a))
    torch.testing.assert_close(ent, ref.entropy())
    assert torch.equal(action_head(logits, None, deterministic=True)[0], logits.argmax(-1))
    # sampling frequencies follow the probabilities (Monte Carlo, 4 sigma)
    probs = torch.softmax(logits[0], -1)
    draws = action_head(logits[:1].expand(40000, 4), None)[0]
    freq = torch.bincount(draws, minlength=4).float() / 40000
    assert torch.all((freq - probs).abs() < 4 * (probs * (1 - probs) / 40000).sqrt() + 1e-3)


def test_running_mean_std_equals_numpy_over_batches():
    rng = np.random.default_rng(1)
    data = rng.normal(3.0, 2.0, size=(1000, 4))
    rms = RunningMeanStd((4,), epsilon=0.0)
    rms.count = 0.0
    for chunk in np.array_split(data, 37):
        if rms.count == 0:
            rms.mean, rms.var, rms.count = chunk.mean(0), chunk.var(0), len(chunk)
        else:
            rms.update(chunk)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-10)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-10)


def test_obs_normalizer_is_frozen_without_update_and_roundtrips():
    norm = ObsNormalizer((2,))
    norm(np.array([[1.0, 10.0], [3.0, 30.0]]))
    before = norm.state_dict()
    z = norm(np.array([[2.0, 20.0]]), update=False)
    np.testing.assert_allclose(z, [[0.0, 0.0]], atol=1e-3)  # the mean of what it has seen
    assert norm.state_dict()["count"] == before["count"]
    other = ObsNormalizer((2,))
    other.load_state_dict(before)
    np.testing.assert_array_equal(other(np.array([[5.0, 5.0]]), update=False), norm(np.array([[5.0, 5.0]]), update=False))


def test_reward_scaler_divides_by_std_of_discounted_return_and_resets_at_done():
    s = RewardScaler(1, gamma=0.5)
    out = [s(np.array([1.0]), np.array([False]))[0] for _ in range(3)]
    # discounted returns seen: 1, 1.5, 1.75 -> the last output is 1 / std of {1, 1.5, 1.75} (with the tiny prior count)
    assert abs(out[-1] - 1 / np.std([1, 1.5, 1.75])) < 1e-2
    s(np.array([1.0]), np.array([True]))
    assert s.ret[0] == 0.0


def test_running_mean_std_one_row_fast_path_is_bit_identical_to_the_general_update():
    from mtrl.ppo import RunningMeanStd

    rng = np.random.default_rng(0)
    fast, ref = RunningMeanStd((5,)), RunningMeanStd((5,))
    for _ in range(200):
        x = rng.normal(3.0, 2.0, (1, 5))
        fast.update(x)
        # the general update written out (numpy reductions over the single row)
        b_mean, b_var, b_count = x.mean(0), x.var(0), x.shape[0]
        delta = b_mean - ref.mean
        tot = ref.count + b_count
        ref.mean = ref.mean + delta * b_count / tot
        ref.var = (ref.var * ref.count + b_var * b_count + delta**2 * ref.count * b_count / tot) / tot
        ref.count = tot
    assert np.array_equal(fast.mean, ref.mean) and np.array_equal(fast.var, ref.var) and fast.count == ref.count
    assert np.allclose(fast.var, 4.0, rtol=0.3)  # and it is a running variance (not a constant)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("discrete", [True, False])
def test_single_act_is_bit_identical_to_get_action_and_value(discrete, activation):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "src" / "algos"))
    import ppo_single

    torch.manual_seed(0)
    agent = ppo_single.Agent(7, 3, discrete, 1, ppo_single.Args(hidden_sizes=(16, 16), activation=activation))
    x, tasks = torch.randn(1, 1, 7), torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        for seed in range(20):
            torch.manual_seed(seed)
            a, lp, _, v = agent.get_action_and_value(x, tasks)
            torch.manual_seed(seed)
            a2, lp2, v2 = agent.act(x, tasks)
            assert torch.equal(a, a2) and torch.equal(lp, lp2) and torch.equal(v, v2)


@pytest.mark.parametrize("discrete", [True, False])
def test_numpy_policy_is_the_torch_policy(discrete):
    """ppo_single --numpy-acting: the numpy copy gives the torch network's value and log-prob of its own sampled action
    (to float32 rounding), and samples the same distribution (Monte Carlo against the softmax / the Gaussian)."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "src" / "algos"))
    import ppo_single

    from mtrl.ppo import NumpyPolicy

    torch.manual_seed(0)
    agent = ppo_single.Agent(7, 3, discrete, 1, ppo_single.Args(hidden_sizes=(16, 16), activation="tanh"))
    with torch.no_grad():  # a non-trivial policy: larger head and log-std than at init
        agent.actor[-1].weight.mul_(100)
        if not discrete:
            agent.actor_logstd.fill_(-0.5)
    policy = NumpyPolicy(agent)
    np.random.seed(0)
    x = np.random.randn(1, 7).astype(np.float32)
    tasks = np.zeros(1, np.int64)
    actions = []
    for _ in range(20_000):
        a, lp, v = policy.act(x, tasks)
        actions.append(a[0])
    with torch.no_grad():
        v_t = agent.get_value(torch.as_tensor(x)[:, None], torch.zeros(1, dtype=torch.long))
        out = agent.actor(torch.as_tensor(x))[0].numpy()
    assert lp.dtype == np.float32 and v.dtype == np.float32
    np.testing.assert_allclose(v[0], v_t[0, 0].item(), rtol=1e-5, atol=1e-6)
    # the log-prob numpy reports for each sampled action equals torch's for that action
    np.random.seed(1)
    pairs = [policy.act(x, tasks) for _ in range(50)]
    with torch.no_grad():
        a_np = torch.as_tensor(np.array([p[0][0] for p in pairs]))[None]
        _, lp_torch, _, _ = agent.get_action_and_value(torch.as_tensor(x)[:, None].expand(1, 50, 7), torch.zeros(1, dtype=torch.long), a_np)
    np.testing.assert_allclose(np.array([p[1][0] for p in pairs]), lp_torch[0].numpy(), rtol=1e-5, atol=1e-5)
    samples = np.array(actions)
    if discrete:
        probs = np.exp(out - out.max()) / np.exp(out - out.max()).sum()
        assert probs.max() < 0.95  # a non-degenerate check
        freq = np.bincount(samples, minlength=3) / len(samples)
        np.testing.assert_allclose(freq, probs, atol=0.015)
    else:
        np.testing.assert_allclose(samples.mean(0), out, atol=0.02)
        np.testing.assert_allclose(samples.std(0), np.exp(-0.5), rtol=0.03)


@pytest.mark.parametrize("env", ["CartPole-v1", "metaworld/reach-v3"])
def test_numpy_acting_run_keeps_the_ratio_exact(runs_dir, env):
    from conftest import only_run, run_algo, scalars

    run_algo("ppo_single", "--env-id", env, "--numpy-acting", "--total-timesteps", "256", "--envs-per-task", "1", "--num-steps", "128",
             "--num-minibatches", "2", "--eval-every", "0", "--eval-episodes", "1", "--runs-dir", str(runs_dir))
    devs = [v for _, v in scalars(only_run(runs_dir))["debug/first_minibatch_max_ratio_dev"]]
    assert len(devs) == 2 and max(devs) < 1e-4, devs
