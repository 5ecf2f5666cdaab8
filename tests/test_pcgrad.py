"""PCGrad against independent references: Algorithm 1 in plain Python loops, per-task gradients from T
autograd calls, the plain gradient of the mean loss for task-specific parameters, and tiny runs."""

import json
import sys

import pytest
import torch

from conftest import REPO, only_run, run_algo, scalars
from mtrl.envs import CARTPOLE_MT10

sys.path.insert(0, str(REPO / "src" / "algos"))
import ppo_pcgrad as pc  # noqa: E402

NAMES = list(CARTPOLE_MT10)
STATS = ["conflict_frac", "mean_cosine", "projected_frac", "update_cosine", "update_norm_ratio"]


def reference_pcgrad(grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Algorithm 1 of the paper, written out: for each task i, the other tasks in a random order
    (torch.randperm of the T-1 others), project g_i^PC on the normal plane of the ORIGINAL g_j when
    they conflict. Returns every g_i^PC (the caller reduces)."""
    originals = [grads[k].clone() for k in range(len(grads))]
    num_tasks = len(originals)
    out = []
    for i in range(num_tasks):
        g_pc = originals[i].clone()
        others = [j for j in range(num_tasks) if j != i]
        for p in torch.randperm(num_tasks - 1, generator=generator).tolist():
            g_j = originals[others[p]]
            dot = float(torch.dot(g_pc, g_j))
            if dot < 0:
                g_pc = g_pc - dot / float(torch.dot(g_j, g_j)) * g_j
        out.append(g_pc)
    return torch.stack(out)


def gradient_set(seed: int, num_tasks: int, dim: int, shared: float) -> torch.Tensor:
    """Random per-task gradients around a common direction (shared = 0: isotropic, many conflicts)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g, dtype=torch.float64)
    scales = torch.rand(num_tasks, 1, generator=g, dtype=torch.float64) * 3 + 0.1  # unequal magnitudes
    return scales * (shared * common + torch.randn(num_tasks, dim, generator=g, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- surgery
def test_surgery_matches_algorithm_1_written_with_python_loops():
    total_projections = 0
    for seed in range(40):
        num_tasks, dim, shared = [2, 3, 5, 10][seed % 4], [3, 8, 64, 500][(seed // 4) % 4], [0.0, 0.5, 1.0][seed % 3]
        grads = gradient_set(seed, num_tasks, dim, shared)
        orders = pc.draw_orders(num_tasks, torch.Generator().manual_seed(1000 + seed))
        fast, projected = pc.pcgrad_project(grads, orders)
        slow = reference_pcgrad(grads, torch.Generator().manual_seed(1000 + seed))
        torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
        total_projections += int(projected.sum())
    assert total_projections > 50  # the sets really exercise the projection


def test_orders_visit_every_other_task_once_and_follow_torch_rng():
    torch.manual_seed(3)
    a = pc.draw_orders(6)
    torch.manual_seed(3)
    b = pc.draw_orders(6)
    assert torch.equal(a, b) and a.shape == (6, 5)
    for i in range(6):
        assert sorted(a[i].tolist()) == [j for j in range(6) if j != i]
    assert not torch.equal(a, pc.draw_orders(6))  # fresh orders at the next call


def test_what_the_projection_guarantees_and_what_it_does_not():
    """After task i's LAST projection (onto g_j), g_i^PC is orthogonal to that g_j and, since nothing changes
    afterwards, does not conflict with any g_j visited from then on. Earlier projections carry no such
    guarantee for T >= 3: a later projection can re-create a conflict with an earlier g_j. For T = 2 there is
    one projection at most, so the two projected gradients never conflict with the other task's gradient."""
    found_reconflict = False
    for seed in range(200):
        num_tasks = [2, 3, 4, 8][seed % 4]
        grads = gradient_set(seed, num_tasks, 6, 0.0)
        orders = pc.draw_orders(num_tasks, torch.Generator().manual_seed(seed))
        proj, projected = pc.pcgrad_project(grads, orders)
        norms = grads.norm(dim=1)
        for i in range(num_tasks):
            dots = [float(proj[i] @ grads[j]) for j in orders[i].tolist()]
            tols = [1e-9 * float(proj[i].norm() * norms[j]) + 1e-12 for j in orders[i].tolist()]
            steps = projected[i].nonzero().flatten().tolist()
            if not steps:
                assert torch.equal(proj[i], grads[i])
                continue
            last = steps[-1]
            assert abs(dots[last]) <= tols[last]
            assert all(d >= -t for d, t in zip(dots[last:], tols[last:]))
            if num_tasks == 2:
                assert dots[0] >= -tols[0]
            found_reconflict |= any(d < -1e-6 for d in dots[:last])
    assert found_reconflict  # the guarantee really is only for the last projection


def test_non_conflicting_gradients_pass_unchanged():
    g = torch.Generator().manual_seed(0)
    grads = torch.rand(5, 30, generator=g, dtype=torch.float64)  # positive entries: every dot product > 0
    proj, projected = pc.pcgrad_project(grads, pc.draw_orders(5, g))
    assert not projected.any()
    torch.testing.assert_close(proj, grads, rtol=0, atol=1e-15)
    # a task that conflicts with nobody keeps its gradient while the others are projected
    grads = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.1, -1.0, 0.2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    proj, projected = pc.pcgrad_project(grads, pc.draw_orders(4, g))
    for i in [0, 3]:  # dot >= 0 with every other gradient
        assert torch.equal(proj[i], grads[i]) and not projected[i].any()
    assert not torch.allclose(proj[1], grads[1]) and not torch.allclose(proj[2], grads[2])


def test_surgery_stats_by_hand():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    gram = grads @ grads.T
    coef, projected = pc.pcgrad_coefficients(gram, pc.draw_orders(3))
    weights = coef.sum(0)
    conflict, cosine, proj_frac, upd_cos, ratio = pc.surgery_stats(gram, projected, weights).tolist()
    assert conflict == pytest.approx(1 / 3)  # only the pair (0, 1) has a negative dot product
    assert cosine == pytest.approx((-1 / 2**0.5 + 0 + 1 / 2**0.5) / 3, abs=1e-6)
    # task 0 projects on g_1 (dot -1), task 1 on g_0 (dot -1), task 2 never: 2 of the 6 visits, in any order
    assert proj_frac == pytest.approx(2 / 6)
    direction, plain = weights @ grads, grads.sum(0)
    assert upd_cos == pytest.approx(float(direction @ plain / (direction.norm() * plain.norm())), abs=1e-6)
    assert ratio == pytest.approx(float(direction.norm() / plain.norm()), abs=1e-6)


# ---------------------------------------------------------------------------------------------- gradients
def make_agent(encoding="onehot", discrete=False, task_params="plain", seed=0):
    torch.manual_seed(seed)
    args = pc.Args(hidden_sizes=(16, 8), task_encoding=encoding, pcgrad_task_params=task_params)
    agent = pc.Agent(obs_dim=5, act_dim=3, discrete=discrete, num_tasks=4, args=args)
    with torch.no_grad():  # break the symmetric initialisation (zero log-std, tiny policy head)
        for p in agent.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return agent


def task_losses(agent, task_ids, seed=7):
    """A PPO-shaped loss per task: mean over the task's samples of -logp * adv + 0.5 * v_coef * (v - ret)^2 -
    0.01 * entropy, with the task of every sample taken from its group (written with masks, not task_avg)."""
    g = torch.Generator().manual_seed(seed)
    groups = len(task_ids)
    obs = torch.randn(groups, 6, 5, generator=g)
    discrete = agent.actor_logstd is None
    act = torch.randint(0, 3, (groups, 6), generator=g) if discrete else torch.randn(groups, 6, 3, generator=g)
    adv, ret = torch.randn(groups, 6, generator=g), torch.randn(groups, 6, generator=g)
    _, logp, ent, value = agent.get_action_and_value(obs, task_ids, act)
    per_sample = -logp * adv + 0.25 * (value - ret) ** 2 - 0.01 * ent
    return torch.stack([per_sample[task_ids == k].mean() for k in range(agent.num_tasks)])


TASK_IDS = torch.tensor([2, 0, 3, 1, 1, 3, 0, 2])  # two envs per task, out of order


@pytest.mark.parametrize("encoding,discrete", [("onehot", False), ("embedding", False), ("none", True)])
def test_per_task_gradients_from_one_backward_equal_t_autograd_calls(encoding, discrete):
    agent = make_agent(encoding, discrete)
    task_grads = pc.PerTaskGradients(agent, TASK_IDS)
    params = list(agent.parameters())
    losses = task_losses(agent, TASK_IDS)
    expected = [torch.autograd.grad(losses[k] / 4, params, retain_graph=True, allow_unused=True) for k in range(4)]
    losses.mean().backward()
    got = task_grads(params)
    for n, (name, p) in enumerate(agent.named_parameters()):
        ref = torch.stack([e[n] if e[n] is not None else torch.zeros_like(p) for e in expected])
        torch.testing.assert_close(got[n], ref, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(got[n].sum(0), p.grad, rtol=1e-5, atol=1e-7, msg=name)  # the terms add up to the plain gradient
    with torch.no_grad():  # forward passes without autograd (rollouts) leave the kept tensors alone
        agent.get_action_and_value(torch.randn(8, 2, 5), TASK_IDS)
    assert all(len(x) == 2 and x[0].shape[1] == 6 for x in task_grads.saved.values())


def flat_group(agent, net, task_params, per_task, obs_dim=5):
    """(T, P) of one group: the reference's own selection of the parameters the surgery sees."""
    names = dict(agent.named_parameters())
    cols = []
    for name in names:
        if not (name.startswith(net + ".") or (task_params == "project" and name.startswith(net + "_"))):
            continue
        g = per_task[name]
        if name == f"{net}.0.weight" and agent.encoding == "onehot" and task_params == "plain":
            g = g[:, :, :obs_dim]  # one-hot columns are task-specific
        cols.append((name, g.flatten(1)))
    return cols


@pytest.mark.parametrize("encoding,discrete,task_params",
                         [("onehot", False, "plain"), ("embedding", False, "plain"), ("onehot", True, "project"), ("embedding", False, "project")])
def test_update_is_projected_mean_on_shared_and_plain_gradient_on_task_specific_parameters(encoding, discrete, task_params):
    agent = make_agent(encoding, discrete, task_params)
    task_grads = pc.PerTaskGradients(agent, TASK_IDS)
    groups = pc.surgery_groups(agent, 5, task_params)
    names = dict(agent.named_parameters())
    # reference: per-task gradients by autograd, plain gradient of the mean loss
    losses = task_losses(agent, TASK_IDS)
    rows = [torch.autograd.grad(losses[k], list(names.values()), retain_graph=True, allow_unused=True) for k in range(4)]
    per_task = {n: torch.stack([r[i] if r[i] is not None else torch.zeros_like(p) for r in rows]) for i, (n, p) in enumerate(names.items())}
    plain = dict(zip(names, torch.autograd.grad(losses.mean(), list(names.values()), retain_graph=True)))
    torch.manual_seed(11)
    expected = {}
    for net in ["actor", "critic"]:  # the same RNG draws as the script: actor's orders, then critic's
        cols = flat_group(agent, net, task_params, per_task)
        mat = torch.cat([c for _, c in cols], 1).double()
        direction = reference_pcgrad(mat, None).mean(0)
        for name, c in cols:
            expected[name], direction = direction[: c.shape[1]], direction[c.shape[1]:]
    # the script's path
    losses.mean().backward()
    torch.manual_seed(11)
    stats = pc.pcgrad_gradients(groups, task_grads)
    assert stats.shape == (2, 5)
    n_projected = 0
    for name, p in names.items():
        if name in expected:
            if name.endswith("0.weight") and encoding == "onehot" and task_params == "plain":
                torch.testing.assert_close(p.grad[:, :5].flatten().double(), expected[name], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(p.grad[:, 5:], plain[name][:, 5:], rtol=1e-5, atol=1e-7)  # one-hot columns: plain
            else:
                torch.testing.assert_close(p.grad.flatten().double(), expected[name], rtol=1e-4, atol=1e-6, msg=name)
            n_projected += not torch.allclose(p.grad, plain[name], rtol=1e-3, atol=1e-5)
        else:  # log-std and embedding rows in plain mode
            assert task_params == "plain" and ("logstd" in name or "embedding" in name)
            torch.testing.assert_close(p.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert n_projected > 0  # the surgery changed something: this data has conflicts


def test_sum_reduction_is_t_times_the_mean_with_the_same_orders():
    grads = {}
    for reduction in ["mean", "sum"]:
        agent = make_agent("embedding", False)
        task_grads = pc.PerTaskGradients(agent, TASK_IDS)
        losses = task_losses(agent, TASK_IDS)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        torch.manual_seed(5)
        pc.pcgrad_gradients(pc.surgery_groups(agent, 5, "plain"), task_grads)
        grads[reduction] = [p.grad.clone() for p in agent.parameters()]
    for m, s in zip(grads["mean"], grads["sum"]):
        torch.testing.assert_close(s, 4 * m, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- runs
TINY = ["--total-timesteps", "2560", "--envs-per-task", "1", "--num-steps", "128", "--num-minibatches", "2",
        "--eval-every", "1280", "--eval-episodes", "1"]


def test_tiny_cartpole_mt10_run_contract_exact_ratio_and_diagnostics(runs_dir):
    run_algo("ppo_pcgrad", "--runs-dir", str(runs_dir), *TINY)
    run_dir = only_run(runs_dir)
    tags = scalars(run_dir)
    for name in NAMES:
        assert f"eval/success_rate/{name}" in tags
    devs = [v for _, v in tags["debug/first_minibatch_max_ratio_dev"]]
    assert len(devs) == 2 and max(devs) < 1e-4
    for net in ["actor", "critic"]:
        values = {s: [v for _, v in tags[f"pcgrad/{s}/{net}"]] for s in STATS}
        assert all(0 <= v <= 1 for s in ["conflict_frac", "projected_frac"] for v in values[s])
        assert all(-1 <= v <= 1 for s in ["mean_cosine", "update_cosine"] for v in values[s])
        assert max(values["projected_frac"]) > 0  # ten CartPole variants do conflict
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert set(summary["final_success"]) == set(NAMES) and summary["total_steps"] == 2560
    assert config["derived"]["params"] == summary["params"]
    # every parameter but the one-hot columns (64 per layer and task) is projected
    assert sum(config["derived"]["pcgrad_projected_params"].values()) == summary["params"]["total"] - 2 * 64 * 10


def test_tiny_continuous_run_gaussian_head(runs_dir):
    run_algo("ppo_pcgrad", "--runs-dir", str(runs_dir), "--env-id", "metaworld/reach-v3", "--envs-per-task", "1", "--num-steps", "64",
             "--num-minibatches", "2", "--total-timesteps", "128", "--eval-every", "0", "--eval-episodes", "1",
             "--pcgrad-reduction", "sum", "--pcgrad-task-params", "project")
    run_dir = only_run(runs_dir)
    tags = scalars(run_dir)
    assert max(v for _, v in tags["debug/first_minibatch_max_ratio_dev"]) < 1e-4
    # one task: nothing to project, the PCGrad direction is the plain gradient
    assert tags["pcgrad/projected_frac/actor"][-1][1] == 0
    assert tags["pcgrad/update_cosine/actor"][-1][1] == pytest.approx(1, abs=1e-5)
    assert tags["pcgrad/update_norm_ratio/critic"][-1][1] == pytest.approx(1, abs=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads((run_dir / "config.json").read_text())["derived"]["params"] == summary["params"]
