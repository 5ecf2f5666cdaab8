"""PaCo against independent references: explicit per-set linear layers, autograd of the loss without the masked
task, convex-hull checks of w-reset, hand-counted parameters, tiny runs."""

import copy
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, only_run, run_algo, scalars
from mtrl import run as mtrun
from mtrl.envs import CARTPOLE_MT10

sys.path.insert(0, str(REPO / "src" / "algos"))
import ppo_paco as pc  # noqa: E402

NAMES = list(CARTPOLE_MT10)
TINY = ["--total-timesteps", "2560", "--envs-per-task", "1", "--num-steps", "128", "--num-minibatches", "2",
        "--eval-every", "1280", "--eval-episodes", "1"]


def make_agent(seed=0, discrete=True, num_tasks=4, **kw):
    torch.manual_seed(seed)
    args = pc.Args(hidden_sizes=(16, 8), num_param_sets=3, **kw)
    return pc.Agent(obs_dim=5, act_dim=3, discrete=discrete, num_tasks=num_tasks, args=args), args


def randomise(agent, seed=1):
    """Distinct parameter sets, biases and w (the initial copies would hide routing mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def plain_mlp(layers, x, comp_row, activation):
    """Reference: one task's network rebuilt from the explicit weighted sum of its layers' sets."""
    h = x
    for i, layer in enumerate(layers):
        h = sum(comp_row[k] * F.linear(h, layer.weight[k], layer.bias[k]) for k in range(layer.weight.shape[0]))
        if i < len(layers) - 1:
            h = torch.relu(h) if activation == "relu" else torch.tanh(h)
    return h


def test_compositional_layer_equals_weighted_sum_of_its_k_linear_layers():
    torch.manual_seed(0)
    layer = pc.CompositionalLinear(6, 4, 3, math.sqrt(2), copy_init=False)
    with torch.no_grad():
        layer.bias.normal_()
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 7, 6, generator=g), torch.randn(4, 3, generator=g)
    tasks = torch.tensor([3, 0, 3, 1, 2])
    out = layer(x, w, tasks)
    for gi in range(5):
        ref = sum(w[tasks[gi], k] * F.linear(x[gi], layer.weight[k], layer.bias[k]) for k in range(3))
        torch.testing.assert_close(out[gi], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["copy", "independent"])
def test_parameter_sets_start_as_copies_only_under_copy_init_and_are_orthogonal(mode):
    agent, _ = make_agent(param_set_init=mode)
    for layer, gain in [(agent.actor[0], math.sqrt(2)), (agent.actor[1], math.sqrt(2)), (agent.actor[2], 0.01), (agent.critic[2], 1.0)]:
        w = layer.weight.detach()
        same = all(torch.equal(w[0], w[k]) for k in range(1, w.shape[0]))
        assert same == (mode == "copy")
        assert layer.bias.abs().max() == 0
        for k in range(w.shape[0]):  # orthogonal with the template's gain: W W^T (out <= in) or W^T W is gain^2 I
            m = w[k] @ w[k].T if w.shape[1] <= w.shape[2] else w[k].T @ w[k]
            torch.testing.assert_close(m, gain**2 * torch.eye(m.shape[0]), rtol=1e-4, atol=1e-5 * gain**2)


def test_copy_init_with_simplex_w_starts_every_task_as_the_single_init_network():
    agent, args = make_agent(activation="tanh")
    torch.testing.assert_close(agent.w.sum(1), torch.ones(4))
    assert (agent.w >= 0).all() and agent.w.std() > 0.01  # random points of the simplex, not 1/K
    x = torch.randn(4, 6, 5)
    out = agent.mlp_forward(agent.actor, x, agent.w, torch.arange(4))
    h = x
    for i, layer in enumerate(agent.actor):  # set 0 alone, no composition
        h = F.linear(h, layer.weight[0], layer.bias[0])
        h = torch.tanh(h) if i < 2 else h
    torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-6)
    # the official N(0, 1) w does not sum to 1: the tasks start as rescaled copies
    agent_n, _ = make_agent(w_init="normal")
    assert (agent_n.w.sum(1) - 1).abs().max() > 0.1


@pytest.mark.parametrize("share_w", [True, False])
@pytest.mark.parametrize("discrete", [True, False])
def test_mixed_task_groups_equal_each_group_alone_and_the_explicit_network(share_w, discrete):
    agent, args = make_agent(share_w=share_w, discrete=discrete, activation="relu")
    randomise(agent)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 5, generator=g)
    tasks = torch.tensor([2, 0, 3, 2, 1, 0])  # mixed, repeated, out of order
    act = torch.randint(0, 3, (6, 3), generator=g) if discrete else torch.randn(6, 3, 3, generator=g)
    _, logp, ent, value = agent.get_action_and_value(x, tasks, act)
    critic_w = agent.w if share_w else agent.critic_w
    for gi in range(6):
        _, lp1, en1, v1 = agent.get_action_and_value(x[gi : gi + 1], tasks[gi : gi + 1], act[gi : gi + 1])
        torch.testing.assert_close(torch.stack([logp[gi], ent[gi], value[gi]]), torch.stack([lp1[0], en1[0], v1[0]]))
        t = tasks[gi].item()
        torch.testing.assert_close(value[gi], plain_mlp(agent.critic, x[gi], critic_w[t], "relu").squeeze(-1), rtol=1e-5, atol=1e-5)
        out = plain_mlp(agent.actor, x[gi], agent.w[t], "relu")
        if discrete:
            ref = torch.log_softmax(out, -1).gather(-1, act[gi][:, None]).squeeze(-1)
        else:
            ref = torch.distributions.Normal(out, agent.actor_logstd[t].exp()).log_prob(act[gi]).sum(-1)
        torch.testing.assert_close(logp[gi], ref, rtol=1e-5, atol=1e-5)
    if not share_w:  # the critic's own table is used: changing the actor's w leaves the values alone
        with torch.no_grad():
            agent.w.add_(1.0)
        torch.testing.assert_close(agent.get_value(x, tasks), value)


def task_losses(agent, obs, tasks, act, adv, ret, num_tasks):
    """A PPO-shaped per-task loss (policy term, entropy, value), built with the file's per_task_mean."""
    _, logp, ent, value = agent.get_action_and_value(obs, tasks, act)
    pg = -adv * logp.exp()
    v = 0.5 * (value - ret) ** 2
    return (pc.per_task_mean(pg, tasks, num_tasks) - 0.01 * pc.per_task_mean(ent, tasks, num_tasks)
            + 0.5 * pc.per_task_mean(v, tasks, num_tasks))


def test_per_task_mean_is_the_mean_over_each_tasks_samples():
    g = torch.Generator().manual_seed(0)
    x, tasks = torch.randn(8, 5, generator=g), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = pc.per_task_mean(x, tasks, 4)
    for t in range(4):
        torch.testing.assert_close(out[t], x[tasks == t].mean())
    torch.testing.assert_close(out.mean(), x.mean())


@pytest.mark.parametrize("share_w", [True, False])
def test_maskout_removes_exactly_the_masked_tasks_contribution_to_the_parameter_sets(share_w):
    num_tasks = 4
    agent, _ = make_agent(discrete=False, share_w=share_w, num_tasks=num_tasks)
    randomise(agent)
    ref_keep, ref_full = copy.deepcopy(agent), copy.deepcopy(agent)
    g = torch.Generator().manual_seed(7)
    tasks = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    obs, act = torch.randn(8, 5, 5, generator=g), torch.randn(8, 5, 3, generator=g)
    adv, ret = torch.randn(8, 5, generator=g), 3 * torch.randn(8, 5, generator=g)
    ret[tasks == 2] += 20.0  # task 2's value loss is far larger: it is the one the threshold masks
    loss_t = task_losses(agent, obs, tasks, act, adv, ret, num_tasks)
    order = loss_t.detach().sort().values
    assert loss_t.detach().argmax() == 2
    threshold = 0.5 * (order[-1] + order[-2]).item()
    masked = pc.backward_with_maskout(agent, loss_t, threshold)
    assert masked.tolist() == [False, False, True, False]
    # reference 1: autograd of the loss without task 2 (same 1/T scale) for the parameter sets
    keep = task_losses(ref_keep, obs, tasks, act, adv, ret, num_tasks)
    (keep[[0, 1, 3]].sum() / num_tasks).backward()
    # reference 2: the full loss for the task-specific parameters (w, log-std), masked task included
    task_losses(ref_full, obs, tasks, act, adv, ret, num_tasks).mean().backward()
    for p, pk, pf in zip(agent.param_sets(), ref_keep.param_sets(), ref_full.param_sets()):
        torch.testing.assert_close(p.grad, pk.grad, rtol=1e-5, atol=1e-7)
        assert (p.grad - pf.grad).abs().max() > 1e-4  # the masked task did contribute: the check can fail
    for p, pf in zip([*agent.w_params(), agent.actor_logstd], [*ref_full.w_params(), ref_full.actor_logstd]):
        torch.testing.assert_close(p.grad, pf.grad, rtol=1e-5, atol=1e-7)
    assert agent.w.grad[2].abs().max() > 0  # the masked task's w keeps its own update
    # no task above the threshold: a plain backward of the mean loss, no mask
    fresh, full = copy.deepcopy(ref_full), copy.deepcopy(ref_full)
    fresh.zero_grad(), full.zero_grad()
    assert pc.backward_with_maskout(fresh, task_losses(fresh, obs, tasks, act, adv, ret, num_tasks), 1e9) is None
    assert pc.backward_with_maskout(full, task_losses(full, obs, tasks, act, adv, ret, num_tasks), None) is None
    for p, q in zip(fresh.parameters(), ref_full.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("mix", ["dirichlet", "official"])
@pytest.mark.parametrize("share_w", [True, False])
def test_w_reset_is_a_convex_combination_of_the_healthy_tasks_only(mix, share_w):
    torch.manual_seed(0)
    args = pc.Args(hidden_sizes=(4,), num_param_sets=6, share_w=share_w)
    agent = pc.Agent(3, 2, True, 5, args)
    masked = torch.tensor([False, True, False, True, False])
    with torch.no_grad():  # healthy tasks 0, 2, 4 sit at basis vectors: the new w reads out its coefficients
        for w in agent.w_params():
            w.copy_(torch.randn(5, 6) * 5)
            w[[0, 2, 4]] = torch.eye(6)[[0, 1, 2]]
    before = [w.detach().clone() for w in agent.w_params()]
    coef = agent.reset_w(masked, mix)
    for w, old in zip(agent.w_params(), before):
        new = w.detach()
        torch.testing.assert_close(new[[0, 2, 4]], old[[0, 2, 4]])  # healthy tasks untouched
        assert (new[[1, 3]][:, 3:] == 0).all()  # no weight on the masked tasks' own (old) w
        c = new[[1, 3]][:, :3]
        assert (c >= 0).all() and (c > 0).all()
        torch.testing.assert_close(c.sum(1), torch.ones(2))
        torch.testing.assert_close(c, coef)  # the same coefficients for actor and critic w
    # all tasks masked: nothing to mix from, w stays
    assert agent.reset_w(torch.ones(5, dtype=torch.bool), mix) is None


def test_w_reset_dirichlet_coefficients_are_uniform_on_the_simplex():
    torch.manual_seed(1)
    agent = pc.Agent(3, 2, True, 4, pc.Args(hidden_sizes=(4,), num_param_sets=3))
    masked = torch.tensor([True, False, False, False])
    with torch.no_grad():
        agent.w[1:] = torch.eye(3)
    first = []
    for _ in range(4000):
        agent.reset_w(masked, "dirichlet")
        first.append(agent.w[0, 0].item())
    first = torch.tensor(first)
    # uniform on the 3-simplex: each coordinate is Beta(1, 2), mean 1/3, variance 1/18
    assert abs(first.mean().item() - 1 / 3) < 0.015 and abs(first.var().item() - 1 / 18) < 0.005


def test_parameter_accounting():
    for share_w, discrete in [(True, False), (False, True)]:
        agent, _ = make_agent(discrete=discrete, share_w=share_w)
        counts = pc.param_counts(agent, 4)
        # actor 5->16->8->3, critic 5->16->8->1, weights + biases of one set
        one = (5 * 16 + 16) + (16 * 8 + 8) + (8 * 3 + 3) + (5 * 16 + 16) + (16 * 8 + 8) + (8 * 1 + 1)
        logstd = 0 if discrete else 3
        n_w = 1 if share_w else 2
        assert counts["active_per_task"] == 3 * one + n_w * 3 + logstd
        assert counts["inference"] == one + logstd
        assert counts["total"] == 3 * one + n_w * 4 * 3 + 4 * logstd == sum(p.numel() for p in agent.parameters())


@pytest.mark.parametrize("bad", [{"num_param_sets": 0}, {"maskout_threshold": -1.0}, {"maskout_threshold": float("inf")}])
def test_validate_rejects_bad_values(bad):
    with pytest.raises(mtrun.ArgError, match=list(bad)[0].replace("_", "-")):
        pc.validate(pc.Args(**bad))


def test_tiny_multitask_run_contract_and_diagnostics(runs_dir):
    run_algo("ppo_paco", "--runs-dir", str(runs_dir), *TINY)
    run_dir = only_run(runs_dir)
    tags = scalars(run_dir)
    for name in NAMES:
        assert f"eval/success_rate/{name}" in tags and f"eval/return/{name}" in tags
        for tag in ["paco/task_loss", "paco/w_entropy", "paco/w_norm", "paco/w_sum", "paco/masked"]:
            assert f"{tag}/{name}" in tags, tag
    devs = [v for _, v in tags["debug/first_minibatch_max_ratio_dev"]]
    assert len(devs) == 2 and max(devs) < 1e-4
    for tag in ["paco/masked_tasks", "paco/w_resets", "paco/task_loss_max", "paco/w_cosine_mean", "paco/set_spread/actor.0"]:
        assert tag in tags, tag
    # the K sets start as copies and spread once trained
    assert tags["paco/set_spread/actor.0"][-1][1] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["final_success"]) == set(NAMES) and summary["total_steps"] == 2560
    config = json.loads((run_dir / "config.json").read_text())
    assert config["derived"]["params"] == summary["params"]
    assert len(summary["final_w"]["actor_critic"]) == 10 and len(summary["final_w"]["actor_critic"][0]) == 5


def test_tiny_run_with_a_low_threshold_masks_and_resets(runs_dir):
    run_algo("ppo_paco", "--runs-dir", str(runs_dir), *TINY, "--maskout-threshold", "0.05", "--no-share-w")
    tags = scalars(only_run(runs_dir))
    assert sum(v for _, v in tags["paco/masked_tasks"]) > 0 and sum(v for _, v in tags["paco/w_resets"]) > 0
    assert max(v for _, v in tags["debug/first_minibatch_max_ratio_dev"]) < 1e-4
    assert "paco/critic_w_entropy/standard" in tags


def test_tiny_continuous_run(runs_dir):
    run_algo("ppo_paco", "--runs-dir", str(runs_dir), "--env-id", "metaworld/reach-v3", "--envs-per-task", "1", "--num-steps", "64",
             "--num-minibatches", "2", "--total-timesteps", "128", "--eval-every", "0", "--eval-episodes", "1")
    run_dir = only_run(runs_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_steps"] == 128
    assert json.loads((run_dir / "config.json").read_text())["derived"]["params"] == summary["params"]
    assert max(v for _, v in scalars(run_dir)["debug/first_minibatch_max_ratio_dev"]) < 1e-4


def test_the_maskout_threshold_rule_by_hand(tmp_path):
    """scripts/paco_threshold.py: 10 x the 99th percentile of the per-iteration paco/task_loss_max, rounded up to two
    significant digits, from the runs' TensorBoard files; a folder without the scalars is an error."""
    import subprocess

    from torch.utils.tensorboard import SummaryWriter

    sys.path.insert(0, str(REPO / "scripts"))
    from paco_threshold import round_up_2sig

    assert [round_up_2sig(x) for x in (0.123, 1234.0, 20.0, 0.5, 990.1)] == pytest.approx([0.13, 1300.0, 20.0, 0.5, 1000.0])
    for name, values in (("a", range(1, 51)), ("b", range(51, 101))):  # two runs: 1..100 in all
        w = SummaryWriter(str(tmp_path / name))
        for i, v in enumerate(values):
            w.add_scalar("paco/task_loss_max", float(v), 1000 * (i + 1))
            w.add_scalar("paco/mask_events", 1.0 if v == 7 else 0.0, 1000 * (i + 1))
        w.close()
    csv_path = tmp_path / "series.csv"
    for inputs in ([str(tmp_path / "a"), str(tmp_path / "b"), "--write-csv", str(csv_path)], [str(csv_path)]):  # runs, then their CSV
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "paco_threshold.py"), *inputs],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr
        # np.percentile(1..100, 99) = 99.01 -> 990.1 -> 1000; median 50.5; one mask event
        assert "over 100 iterations of 2 run(s); mask events in these runs: 1" in proc.stdout
        assert "| median | 50.5 |" in proc.stdout and "| 99th percentile | 99.01 |" in proc.stdout
        assert "= 1000  (--maskout-threshold)" in proc.stdout
    assert len(csv_path.read_text().splitlines()) == 101
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "paco_threshold.py"), str(tmp_path / "empty")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0 and "no paco/task_loss_max scalars" in proc.stderr
