"""VarShare against independent references: Monte Carlo KL, explicit per-sample weights, L2Soft gradients."""

import math
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "src" / "algos"))
import ppo_varshare as vs  # noqa: E402


def make_agent(seed=0, discrete=True, **kw):
    torch.manual_seed(seed)
    args = vs.Args(hidden_sizes=(16, 8), **kw)
    return vs.Agent(obs_dim=5, act_dim=3, discrete=discrete, num_tasks=4, args=args), args


def randomise_residuals(agent, seed=1, scale=1.0):
    g, g_rho = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, layer in agent.named_varshare_layers():
            layer.mu.copy_(torch.randn(layer.mu.shape, generator=g) * layer.sigma0 * scale)
            if layer.variational:
                ratio = 0.3 + 1.5 * torch.rand(layer.rho.shape, generator=g_rho)  # sigma / sigma0 in [0.3, 1.8]
                layer.rho.copy_(torch.log(torch.expm1(ratio * layer.sigma0)))


def test_kl_closed_form_matches_monte_carlo():
    agent, _ = make_agent()
    randomise_residuals(agent)
    layer = agent.actor[1]  # 16 -> 8
    mean_part, var_part = layer.kl_parts()
    closed = (mean_part + var_part)[2].item()
    mu, sigma, s0 = layer.mu[2].detach().double(), layer.sigma()[2].detach().double(), layer.sigma0
    n = 20000
    g = torch.Generator().manual_seed(3)
    delta = mu + sigma * torch.randn((n, *mu.shape), generator=g, dtype=torch.float64)
    log_q = (-0.5 * ((delta - mu) / sigma) ** 2 - torch.log(sigma)).sum((1, 2))
    log_p = (-0.5 * (delta / s0) ** 2 - math.log(s0)).sum((1, 2))
    samples = log_q - log_p  # the 2*pi terms cancel
    mc, se = samples.mean().item(), samples.std().item() / math.sqrt(n)
    assert abs(mc - closed) < 5 * se, (mc, closed, se)
    assert closed > 1.0  # a real, non-trivial KL


def test_kl_is_zero_at_initialisation_and_mean_mode_equals_the_shared_network():
    agent, args = make_agent(noise="mean")
    mean_part, var_part = agent.kl_per_task()
    assert mean_part.abs().max() < 1e-6 and var_part.abs().max() < 1e-5
    x = torch.randn(4, 7, 5)
    tasks = torch.tensor([0, 1, 2, 3])
    out = agent.mlp_forward(agent.actor, x, tasks, [None] * 3, True)
    # reference: a plain MLP with the shared weights only
    h = x
    for i, layer in enumerate(agent.actor):
        h = torch.nn.functional.linear(h, layer.theta, layer.bias)
        h = torch.relu(h) if args.activation == "relu" and i < 2 else (torch.tanh(h) if i < 2 else h)
    torch.testing.assert_close(out, h)


@pytest.mark.parametrize("noise", ["mean", "rollout", "step"])
def test_routing_each_sample_uses_its_own_task_residual(noise):
    agent, _ = make_agent(noise=noise)
    randomise_residuals(agent)
    layer = agent.actor[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 5, generator=g)
    tasks = torch.tensor([2, 0, 3, 2, 1, 0])  # mixed, repeated, out of order
    eps = torch.randn(6, layer.out_features, layer.in_features, generator=g) if noise == "rollout" else None
    xi = torch.randn(6, 3, layer.out_features, generator=g) if noise == "step" else None
    mixed = layer(x, tasks, eps if noise == "rollout" else xi, noise)
    sigma = layer.sigma().detach() if noise != "mean" else None
    for gi in range(6):
        t = tasks[gi].item()
        # each group alone
        alone = layer(x[gi : gi + 1], tasks[gi : gi + 1], (eps if noise == "rollout" else xi)[gi : gi + 1] if noise != "mean" else None, noise)
        torch.testing.assert_close(mixed[gi : gi + 1], alone)
        # explicit per-sample reference
        for m in range(3):
            w = layer.theta + layer.mu[t]
            if noise == "rollout":
                w = w + sigma[t] * eps[gi]
            ref = w @ x[gi, m] + layer.bias
            if noise == "step":
                ref = ref + torch.sqrt((x[gi, m] ** 2) @ (sigma[t] ** 2).T) * xi[gi, m]
            torch.testing.assert_close(mixed[gi, m], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise", ["rollout", "step"])
def test_logprob_recomputed_with_stored_noise_equals_rollout_logprob(noise):
    agent, _ = make_agent(noise=noise, discrete=False)
    randomise_residuals(agent)
    n_envs, n_steps = 4, 6
    tasks = torch.tensor([0, 1, 2, 3])
    obs = torch.randn(n_envs, n_steps, 5)
    eps = agent.sample_weight_noise(n_envs) if noise == "rollout" else None
    xi_buf = torch.zeros(n_envs, n_steps, agent.preact_dim)
    actions, logps = [], []
    with torch.no_grad():
        for t in range(n_steps):  # rollout: one sample per env and step
            nz = eps if noise == "rollout" else agent.sample_preact_noise(n_envs, 1)
            if noise == "step":
                xi_buf[:, t] = nz[:, 0]
            a, lp, _, _ = agent.get_action_and_value(obs[:, t : t + 1], tasks, nz)
            actions.append(a)
            logps.append(lp)
    actions, logps = torch.cat(actions, 1), torch.cat(logps, 1)
    stored = eps if noise == "rollout" else xi_buf
    _, relp, _, _ = agent.get_action_and_value(obs, tasks, stored, actions)  # update: all steps at once
    torch.testing.assert_close(relp, logps, rtol=0, atol=1e-5)
    # and the check can fail: fresh noise gives different log-probs
    fresh = agent.sample_weight_noise(n_envs) if noise == "rollout" else agent.sample_preact_noise(n_envs, n_steps)
    _, other, _, _ = agent.get_action_and_value(obs, tasks, fresh, actions)
    assert (other - logps).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(noise="rollout"), dict(noise="mean"), dict(residual="l2")])
def test_rollout_weights_computed_once_give_bit_identical_outputs(kw):
    """The rollout computes each env's weights once per iteration; a forward with them must equal the
    forward that builds them from theta, mu, sigma and eps (actor outputs, log-probs and values)."""
    agent, _ = make_agent(discrete=False, **kw)
    randomise_residuals(agent)
    tasks = torch.tensor([3, 0, 1, 1, 2])
    obs = torch.randn(5, 1, 5)
    eps = agent.sample_weight_noise(5) if kw.get("noise") == "rollout" else None
    weights = agent.rollout_weights(tasks, eps)
    assert len(weights) == len(agent.actor) + len(agent.critic) and weights[0].shape == (5, agent.actor[0].out_features, 5)
    with torch.no_grad():
        a, lp, ent, v = agent.get_action_and_value(obs, tasks, eps, deterministic=True)
        a2, lp2, ent2, v2 = agent.get_action_and_value(obs, tasks, eps, deterministic=True, weights=weights)
        v3 = agent.get_value(obs, tasks, eps, weights=weights)
    for x, y in ((a, a2), (lp, lp2), (v, v2), (v, v3)):
        assert torch.equal(x, y)
    if eps is not None:  # and the weights carry the noise: without it the outputs differ
        assert not torch.equal(a, agent.get_action_and_value(obs, tasks, None, deterministic=True, weights=agent.rollout_weights(tasks))[0])
    assert make_agent(noise="step")[0].rollout_weights(tasks) is None  # step mode draws per sample: nothing to cache


def test_mean_mode_with_matched_lambda_has_the_gradients_of_l2soft():
    grads = []
    for kw in [dict(residual="variational", noise="mean"), dict(residual="l2")]:
        agent, _ = make_agent(seed=0, discrete=False, kl_coef=2.0, **kw)
        randomise_residuals(agent, seed=1, scale=3.0)
        g = torch.Generator().manual_seed(9)
        obs, tasks = torch.randn(4, 5, 5, generator=g), torch.tensor([0, 1, 2, 3])
        act, adv, ret = torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
        _, logp, ent, value = agent.get_action_and_value(obs, tasks, None, act)
        loss = -(logp * adv).mean() + 0.5 * ((value - ret) ** 2).mean() - 0.01 * ent.mean() + agent.residual_penalty(2.0, None) / 20
        loss.backward()
        grads.append({n: (l.theta.grad.clone(), l.mu.grad.clone()) for n, l in agent.named_varshare_layers()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name][0], grads[1][name][0])
        torch.testing.assert_close(grads[0][name][1], grads[1][name][1])
        assert grads[0][name][1].abs().max() > 0


def test_l2_penalty_with_override_is_lambda_times_squared_norm():
    agent, _ = make_agent(residual="l2")
    randomise_residuals(agent)
    expected = 0.37 * sum((l.mu.detach() ** 2).sum() for _, l in agent.named_varshare_layers())
    torch.testing.assert_close(agent.residual_penalty(5.0, 0.37), expected)


def test_parameter_accounting_follows_section_9():
    agent, _ = make_agent(discrete=False)
    counts = vs.param_counts(agent, 4)
    # actor 5->16->8->3, critic 5->16->8->1; theta + bias
    shared = (5 * 16 + 16) + (16 * 8 + 8) + (8 * 3 + 3) + (5 * 16 + 16) + (16 * 8 + 8) + (8 * 1 + 1)
    residual_weights = 5 * 16 + 16 * 8 + 8 * 3 + 5 * 16 + 16 * 8 + 8
    assert counts["inference"] == shared + 3
    assert counts["active_per_task"] == shared + 2 * residual_weights + 3
    assert counts["total"] == shared + 4 * 2 * residual_weights + 4 * 3


TINY = ["--total-timesteps", "2560", "--envs-per-task", "1", "--num-steps", "128", "--num-minibatches", "2",
        "--eval-every", "1280", "--eval-episodes", "1"]


@pytest.mark.parametrize("mode", [["--noise", "rollout"], ["--noise", "step"], ["--noise", "mean"], ["--residual", "l2"]])
def test_tiny_run_each_mode_exact_ratio_and_diagnostics(runs_dir, mode):
    import json

    from conftest import only_run, read_jsonl, run_algo, scalars

    run_algo("ppo_varshare", "--runs-dir", str(runs_dir), *TINY, *mode)
    run_dir = only_run(runs_dir)
    tags = scalars(run_dir)
    devs = [v for _, v in tags["debug/first_minibatch_max_ratio_dev"]]
    assert len(devs) == 2 and max(devs) < 1e-4
    for tag in ["varshare/kl_mean_part/standard", "varshare/kl_var_part/reversed-push", "varshare/kl_loss_share/standard",
                "varshare/rel_residual/standard", "varshare/rel_residual_layer/actor.0", "varshare/centering/critic.2",
                "varshare/specialisation/reversed-push", "varshare/policy_kl/standard", "eval_theta/success_rate/standard",
                "losses/residual_penalty"]:
        assert tag in tags, tag
    if mode[-1] != "l2":
        assert "varshare/sigma_ratio_median/actor.2" in tags and "varshare/frac_confident/standard" in tags
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert {"theta_success", "specialisation", "policy_kl", "kl", "rel_residual"} <= set(evals[-1])
    # the report's diagnostics in eval.jsonl equal the TensorBoard values of the last iteration (same weights)
    for t in ("standard", "reversed-push"):
        kl_tb = tags["varshare/kl_mean_part/" + t][-1][1] + tags["varshare/kl_var_part/" + t][-1][1]
        assert evals[-1]["kl"][t] == pytest.approx(kl_tb, rel=1e-4, abs=1e-6)
        assert evals[-1]["rel_residual"][t] == pytest.approx(tags["varshare/rel_residual/" + t][-1][1], rel=1e-4, abs=1e-7)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["residual_cosine"]) == 10 and abs(summary["residual_cosine"][3][3] - 1) < 1e-5
    config = json.loads((run_dir / "config.json").read_text())
    assert config["derived"]["params"] == summary["params"]
    assert config["derived"]["noise_mode"] == ("mean" if mode[-1] == "l2" else mode[-1])
    # the KL starts at 0 and grows once the residuals learn
    assert tags["losses/residual_penalty"][-1][1] > 0


def test_eval_weight_samples_logs_sampled_evaluations_and_is_refused_without_noise(runs_dir):
    from conftest import only_run, run_algo, scalars

    run_algo("ppo_varshare", "--runs-dir", str(runs_dir), *TINY, "--eval-weight-samples", "2")
    tags = scalars(only_run(runs_dir))
    assert len(tags["eval_sampled/success_rate"]) == 2 and "eval_sampled/return/reversed-push" in tags
    bad = run_algo("ppo_varshare", "--runs-dir", str(runs_dir / "x"), "--noise", "mean", "--eval-weight-samples", "2", check=False)
    assert bad.returncode == 2 and "--eval-weight-samples 2" in bad.stderr


def test_sampled_weights_with_vanishing_sigma_act_like_the_posterior_mean():
    agent, _ = make_agent(noise="rollout", sigma_init_ratio=1e-6)
    randomise_residuals(agent, scale=3.0)
    with torch.no_grad():
        for _, layer in agent.named_varshare_layers():
            layer.rho.fill_(vs.inverse_softplus(1e-9))
    x, tasks = torch.randn(4, 6, 5), torch.tensor([0, 1, 2, 3])
    sampled = agent.get_action_and_value(x, tasks, agent.sample_weight_noise(4), deterministic=True)[0]
    mean = agent.get_action_and_value(x, tasks, deterministic=True)[0]
    assert torch.equal(sampled, mean)


def test_l2_coef_needs_the_l2_residual(runs_dir):
    from conftest import run_algo

    bad = run_algo("ppo_varshare", "--runs-dir", str(runs_dir), "--l2-coef", "0.5", check=False)
    assert bad.returncode == 2 and "--l2-coef 0.5" in bad.stderr and "--residual l2" in bad.stderr
    assert list(runs_dir.iterdir()) == []
