"""ppo_softmod against independent references: explicit per-sample loops over the paper's (and the official
code's) equations, routing distributions, task conditioning, grouped batches, parameter accounting, tiny runs."""

import json
import math
import sys

import pytest
import torch

from conftest import REPO, only_run, read_jsonl, run_algo, scalars
from mtrl import run as mtrun
from mtrl.envs import CARTPOLE_MT10

sys.path.insert(0, str(REPO / "src" / "algos"))
import ppo_softmod as sm  # noqa: E402

NAMES = list(CARTPOLE_MT10)
TINY = ["--total-timesteps", "2560", "--envs-per-task", "1", "--num-steps", "128", "--num-minibatches", "2",
        "--eval-every", "1280", "--eval-episodes", "1"]
VARIANTS = ["paper", "official"]


def make_agent(variant="paper", seed=0, discrete=False, hidden_sizes=(16, 8), num_tasks=4, randomise=True, **kw):
    torch.manual_seed(seed)
    args = sm.Args(hidden_sizes=hidden_sizes, softmod_variant=variant, **kw)
    agent = sm.Agent(obs_dim=5, act_dim=3, discrete=discrete, num_tasks=num_tasks, args=args)
    if randomise:  # move every weight off its initialisation, so routing is far from uniform and all paths matter
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in agent.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return agent, args


# ---------------------------------------------------------------------------------------------------------
# explicit per-sample references, written from the equations with Python floats and loops
# ---------------------------------------------------------------------------------------------------------
def _lin(W, b, x):
    return [sum(W[o][i] * x[i] for i in range(len(x))) + b[o] for o in range(len(W))]


def _softmax(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def _vec(t):
    return t.detach().double().tolist()


def reference_paper(net, s, t, act):
    """Paper: F(s) 2-layer MLP, H(z) linear, p^1 = W_d act(F*H), p^(l+1) = W_d act((W_u p^l) * F*H),
    p-hat softmax over the previous layer's modules, f_j^(l+1) = sum_i p-hat_ji act(W_i f_i + b_i), output = head(sum_j act(W_j f_j + b_j))."""
    f1, f2 = net.state_embedding[0], net.state_embedding[2]
    F = _lin(_vec(f2.weight), _vec(f2.bias), [act(a) for a in _lin(_vec(f1.weight), _vec(f1.bias), s)])
    onehot = [1.0 if k == t else 0.0 for k in range(net.task_embedding.in_features)]
    H = _lin(_vec(net.task_embedding.weight), _vec(net.task_embedding.bias), onehot)
    e = [a * b for a, b in zip(F, H)]
    n = net.n
    p = _lin(_vec(net.route_down[0].weight), _vec(net.route_down[0].bias), [act(a) for a in e])
    logits = [p]
    for up, down in zip(net.route_up, net.route_down[1:]):
        u = _lin(_vec(up.weight), _vec(up.bias), logits[-1])
        logits.append(_lin(_vec(down.weight), _vec(down.bias), [act(a * b) for a, b in zip(u, e)]))
    phat = [[_softmax([q[j * n + i] for i in range(n)]) for j in range(n)] for q in logits]
    inputs = [F] * n  # every module of layer 1 reads F(s)
    for layer in range(len(net.module_weight)):
        W, b = _vec(net.module_weight[layer]), _vec(net.module_bias[layer])
        outs = [[act(a) for a in _lin(W[i], b[i], inputs[i])] for i in range(n)]
        if layer < len(net.module_weight) - 1:
            P = phat[layer]
            inputs = [[sum(P[j][i] * outs[i][d] for i in range(n)) for d in range(len(outs[0]))] for j in range(n)]
    summed = [sum(outs[j][d] for j in range(n)) for d in range(len(outs[0]))]
    return _lin(_vec(net.head.weight), _vec(net.head.bias), summed), phat


def _relu(a):
    return max(a, 0.0)


def reference_official(net, s, t, act, gate=_relu):
    """Official code (ModularGatedCascadeCondNet): modules read act(F); gating MLP on gate(F*H); each routing layer
    conditions on all previous softmaxed probabilities; act after the weighted sum; a final routing vector. The routing
    network (gate) is ReLU whatever act is, as in the official code; F and the modules use act."""
    f1, f2 = net.state_embedding[0], net.state_embedding[2]
    F = _lin(_vec(f2.weight), _vec(f2.bias), [act(a) for a in _lin(_vec(f1.weight), _vec(f1.bias), s)])
    onehot = [1.0 if k == t else 0.0 for k in range(net.task_embedding.in_features)]
    H = _lin(_vec(net.task_embedding.weight), _vec(net.task_embedding.bias), onehot)
    emb = [gate(a * b) for a, b in zip(F, H)]
    g1, g2 = net.gating[0], net.gating[2]
    emb = _lin(_vec(g2.weight), _vec(g2.bias), [gate(a) for a in _lin(_vec(g1.weight), _vec(g1.bias), emb)])
    n = net.n
    raw = _lin(_vec(net.route_down[0].weight), _vec(net.route_down[0].bias), [gate(a) for a in emb])
    weights = [[_softmax(raw[j * n:(j + 1) * n]) for j in range(n)]]
    flat = [x for row in weights[0] for x in row]
    for k, up in enumerate(net.route_up):
        cond = [gate(a * b) for a, b in zip(_lin(_vec(up.weight), _vec(up.bias), flat), emb)]
        if k + 1 < len(net.route_down):
            raw = _lin(_vec(net.route_down[k + 1].weight), _vec(net.route_down[k + 1].bias), cond)
            weights.append([_softmax(raw[j * n:(j + 1) * n]) for j in range(n)])
            flat = flat + [x for row in weights[-1] for x in row]
        else:
            last = _softmax(_lin(_vec(net.route_last.weight), _vec(net.route_last.bias), cond))
    W, b = _vec(net.module_weight[0]), _vec(net.module_bias[0])
    outs = [_lin(W[i], b[i], [act(a) for a in F]) for i in range(n)]
    for layer in range(1, len(net.module_weight)):
        W, b, P = _vec(net.module_weight[layer]), _vec(net.module_bias[layer]), weights[layer - 1]
        ins = [[act(sum(P[j][i] * outs[i][d] for i in range(n))) for d in range(len(outs[0]))] for j in range(n)]
        outs = [_lin(W[j], b[j], ins[j]) for j in range(n)]
    out = [act(sum(last[j] * outs[j][d] for j in range(n))) for d in range(len(outs[0]))]
    return _lin(_vec(net.head.weight), _vec(net.head.bias), out), weights


ACT = {"tanh": math.tanh, "relu": _relu}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_hand_sized_network_matches_the_equations_computed_with_loops(variant, activation):
    # L = 3 module layers (so the W_u recursion / conditioning on previous probabilities is exercised), n = 2 modules,
    # tiny unequal widths, D = 4, 3 tasks
    agent, _ = make_agent(variant, seed=3, hidden_sizes=(3, 2, 4), num_tasks=3, num_modules=2, embedding_dim=4, activation=activation)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 2, 5, generator=g)
    tasks = torch.tensor([2, 0, 1])
    reference = reference_paper if variant == "paper" else reference_official
    for net in [agent.actor, agent.critic]:
        out, probs, _ = net(x, tasks, return_routing=True)
        for gi in range(3):
            for m in range(2):
                ref_out, ref_p = reference(net, _vec(x[gi, m]), tasks[gi].item(), ACT[activation])
                torch.testing.assert_close(out[gi, m].double(), torch.tensor(ref_out, dtype=torch.float64), rtol=1e-5, atol=1e-6)
                for layer, P in enumerate(ref_p):
                    torch.testing.assert_close(probs[layer][gi, m].double(), torch.tensor(P, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_official_routing_gate_is_relu_whatever_the_activation():
    """--softmod-variant official: the routing network (gating MLP, the input of W_d, the conditioned features) is ReLU
    under --activation tanh, as in the official code, while F(s) and the modules stay tanh; the paper variant keeps
    --activation everywhere (its routing gate is tanh under tanh)."""
    agent, _ = make_agent("official", seed=4, hidden_sizes=(3, 2, 4), num_tasks=3, num_modules=2, embedding_dim=4, activation="tanh")
    paper, _ = make_agent("paper", seed=4, hidden_sizes=(3, 2, 4), num_tasks=3, num_modules=2, embedding_dim=4, activation="tanh")
    for net in [agent.actor, agent.critic]:
        assert isinstance(net.gating[1], torch.nn.ReLU) and isinstance(net.gate_activation, torch.nn.ReLU)
        assert isinstance(net.state_embedding[1], torch.nn.Tanh) and isinstance(net.activation, torch.nn.Tanh)
    for net in [paper.actor, paper.critic]:
        assert not any(isinstance(m, torch.nn.ReLU) for m in net.modules()) and not hasattr(net, "gate_activation")
        assert isinstance(net.activation, torch.nn.Tanh)
    g = torch.Generator().manual_seed(12)
    x, tasks = torch.randn(3, 2, 5, generator=g), torch.tensor([2, 0, 1])
    net = agent.actor
    out, probs, last = net(x, tasks, return_routing=True)
    # the same network with a tanh gate routes differently (so the checks below can tell the two apart) ...
    ref_tanh, p_tanh = reference_official(net, _vec(x[0, 0]), 2, math.tanh, gate=math.tanh)
    ref_relu, p_relu = reference_official(net, _vec(x[0, 0]), 2, math.tanh, gate=_relu)
    assert max(abs(a - b) for a, b in zip(p_tanh[0][0], p_relu[0][0])) > 1e-3
    # ... and the network is the ReLU-gated one, computed with explicit loops
    torch.testing.assert_close(out[0, 0].double(), torch.tensor(ref_relu, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    for layer, P in enumerate(p_relu):
        torch.testing.assert_close(probs[layer][0, 0].double(), torch.tensor(P, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # and with torch ops: the routing of a tanh network equals a hand-built ReLU gate on the same weights
    F, cond = net.embed(x, tasks)
    gate = net.gating(torch.relu(cond))
    p1 = torch.softmax(net.route_down[0](torch.relu(gate)).view(*gate.shape[:-1], 2, 2), -1)
    torch.testing.assert_close(probs[0], p1)
    # the paper variant under tanh: its first routing layer reads tanh(F * H)
    _, cond = paper.actor.embed(x, tasks)
    p1 = torch.softmax(paper.actor.route_down[0](torch.tanh(cond)).view(*cond.shape[:-1], 2, 2), -1)
    torch.testing.assert_close(paper.actor(x, tasks, return_routing=True)[1][0], p1)


def test_hand_set_weights_route_as_specified():
    """Weights set by hand: L = 2, n = 2, the module outputs and routing logits are fixed numbers, so the output is
    computable on paper. Module i of layer 1 outputs act(a_i) (constant through its bias); routing logits make
    p-hat = [[s, 1-s], [1-s, s]] with s = sigmoid(2); layer 2 is the identity per module; head sums the features."""
    agent, args = make_agent("paper", hidden_sizes=(1, 1), num_tasks=2, num_modules=2, embedding_dim=2, activation="relu", randomise=False)
    net = agent.actor
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.module_bias[0].copy_(torch.tensor([[1.0], [3.0]]))  # layer-1 modules output relu(1) = 1 and relu(3) = 3
        net.module_weight[1].copy_(torch.ones(2, 1, 1))  # layer-2 module j outputs relu(its input)
        net.route_down[0].bias.copy_(torch.tensor([1.0, -1.0, -1.0, 1.0]))  # logits [[1, -1], [-1, 1]] (row j = next module)
        net.head.weight.copy_(torch.ones(3, 1))
    s = 1 / (1 + math.exp(-2.0))
    # module 1 of layer 2 gets s*1 + (1-s)*3, module 2 gets (1-s)*1 + s*3; the output sums both = 4 for every action
    expected = (s * 1 + (1 - s) * 3) + ((1 - s) * 1 + s * 3)
    out, probs, _ = net(torch.randn(2, 3, 5), torch.tensor([0, 1]), return_routing=True)
    torch.testing.assert_close(probs[0][0, 0], torch.tensor([[s, 1 - s], [1 - s, s]]))
    torch.testing.assert_close(out, torch.full((2, 3, 3), expected))
    # an asymmetric check of the axis: route both next modules from module 2 only -> output 2 * 3
    with torch.no_grad():
        net.route_down[0].bias.copy_(torch.tensor([-30.0, 30.0, -30.0, 30.0]))
    torch.testing.assert_close(net(torch.randn(1, 1, 5), torch.tensor([0])), torch.full((1, 1, 3), 6.0))


@pytest.mark.parametrize("variant", VARIANTS)
def test_routing_probabilities_are_distributions_over_the_previous_layer(variant):
    agent, _ = make_agent(variant, hidden_sizes=(8, 6, 7, 5), num_modules=3)
    x, tasks = torch.randn(4, 9, 5), torch.tensor([0, 1, 2, 3])
    for net in [agent.actor, agent.critic]:
        _, probs, last = net(x, tasks, return_routing=True)
        assert len(probs) == 3 and all(p.shape == (4, 9, 3, 3) for p in probs)
        for p in probs + ([last] if last is not None else []):
            assert (p >= 0).all()
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
            assert (p - 1 / 3).abs().max() > 0.05  # a real routing, not the uniform one
        # the columns (fixed previous module, over next modules) are not normalised: the softmax runs over the last axis only
        assert max((p.sum(-2) - 1).abs().max().item() for p in probs) > 1e-2
        assert (last is None) == (variant == "paper")


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_changes_with_the_task_and_the_routing_depends_on_it(variant):
    agent, _ = make_agent(variant, num_tasks=10)
    x = torch.randn(1, 5, 5).expand(10, 5, 5)  # the same observations under every task
    tasks = torch.arange(10)
    for net in [agent.actor, agent.critic]:
        out, probs, _ = net(x, tasks, return_routing=True)
        assert (out - out[:1]).abs().max().item() > 1e-3
        assert (probs[0] - probs[0][:1]).abs().max().item() > 1e-3
    # and the state also enters the routing: same task, different observations -> different probabilities
    _, probs, _ = agent.actor(torch.randn(1, 5, 5), torch.tensor([0]), return_routing=True)
    assert (probs[0] - probs[0][:, :1]).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_task_grouped_batch_equals_each_group_alone(variant):
    agent, _ = make_agent(variant, hidden_sizes=(8, 6, 7), num_modules=3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 5, generator=g)
    tasks = torch.tensor([2, 0, 3, 2, 1, 0])  # mixed, repeated, out of order
    actions = torch.randn(6, 4, 3, generator=g)
    _, logp, ent, value = agent.get_action_and_value(x, tasks, actions)
    for gi in range(6):
        _, lp1, ent1, v1 = agent.get_action_and_value(x[gi : gi + 1], tasks[gi : gi + 1], actions[gi : gi + 1])
        torch.testing.assert_close(logp[gi : gi + 1], lp1)
        torch.testing.assert_close(ent[gi : gi + 1], ent1)
        torch.testing.assert_close(value[gi : gi + 1], v1)
    # one sample per group (the rollout layout) gives the same as the grouped call
    flat_tasks = tasks.repeat_interleave(4)
    _, lp_flat, _, v_flat = agent.get_action_and_value(x.reshape(24, 1, 5), flat_tasks, actions.reshape(24, 1, 3))
    torch.testing.assert_close(lp_flat.view(6, 4), logp)
    torch.testing.assert_close(v_flat.view(6, 4), value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_by_hand_and_by_gradient_support(variant):
    agent, _ = make_agent(variant, randomise=False)  # obs 5, act 3 (Gaussian), 4 tasks, modules (16, 8), n = 2, D = 16
    counts = sm.param_counts(agent, 4)

    def per_net(out_dim):
        f = (5 * 16 + 16) + (16 * 16 + 16)
        h = 4 * 16 + 16
        modules = 2 * (16 * 16 + 16) + 2 * (8 * 16 + 8)
        head = 8 * out_dim + out_dim
        routing = 16 * 4 + 4  # W_d of the single routing layer
        if variant == "official":
            routing += (16 * 16 + 16) * 2 + (4 * 16 + 16) + (16 * 2 + 2)  # gating MLP, W_u on p-hat^1, final routing vector
        return f + h + modules + head + routing

    total = per_net(3) + per_net(1) + 4 * 3
    assert counts["total"] == total == sum(p.numel() for p in agent.parameters())
    assert counts["active_per_task"] == counts["inference"] == total - 3 * (16 + 16 + 3)
    # independent check: the scalars with a non-zero gradient from one task's forward pass are exactly the active ones
    agent, _ = make_agent(variant, activation="tanh")
    if variant == "official":  # its ReLU routing gate has units dead for every input of a task (zero gradient although the
        for net in [agent.actor, agent.critic]:  # weights enter the forward pass): count the support with a tanh gate
            net.gate_activation = net.gating[1] = torch.nn.Tanh()
    x, act = torch.randn(1, 6, 5), torch.randn(1, 6, 3)
    _, logp, _, value = agent.get_action_and_value(x, torch.tensor([2]), act)
    (logp.sum() + value.sum()).backward()
    touched = sum(int((p.grad != 0).sum()) for p in agent.parameters() if p.grad is not None)
    assert touched == counts["active_per_task"]


def test_routing_diagnostics_against_direct_computation():
    agent, _ = make_agent("paper", num_tasks=2, hidden_sizes=(8, 6, 7), num_modules=3)
    x, tasks = torch.randn(4, 5, 5), torch.tensor([0, 1, 1, 0])
    stats = sm.routing_diagnostics(agent, x, tasks, ["a", "b"])
    _, probs, _ = agent.actor(x, tasks, return_routing=True)
    rows = torch.cat(probs, 2)  # the rows of both routing matrices: (G, M, 2n, n)
    entropy = -(rows * rows.log()).sum(-1)
    assert stats["softmod/routing_entropy"] == pytest.approx(entropy.mean().item(), rel=1e-5)
    assert stats["softmod/routing_entropy/b"] == pytest.approx(entropy[1:3].mean().item(), rel=1e-5)
    mean_a, mean_b = rows[[0, 3]].mean((0, 1)), rows[[1, 2]].mean((0, 1))
    tv = [0.5 * (m - (mean_a + mean_b) / 2).abs().sum(-1).mean() for m in (mean_a, mean_b)]  # per task, averaged over rows
    spread = (tv[0] + tv[1]) / 2
    assert stats["softmod/routing_task_spread"] == pytest.approx(spread.item(), rel=1e-5)
    # uniform routing (W_d = 0): entropy ln n and no spread
    with torch.no_grad():
        for lin in agent.actor.route_down:
            lin.weight.zero_()
            lin.bias.zero_()
    stats = sm.routing_diagnostics(agent, x, tasks, ["a", "b"])
    assert stats["softmod/routing_entropy"] == pytest.approx(math.log(3), rel=1e-6)
    assert stats["softmod/routing_task_spread"] < 1e-7 and stats["softmod/routing_state_spread"] < 1e-7


@pytest.mark.parametrize("bad", [dict(num_modules=1), dict(hidden_sizes=(64,)), dict(embedding_dim=0)])
def test_validate_rejects_bad_values(bad):
    with pytest.raises(mtrun.ArgError) as e:
        sm.validate(sm.Args(**bad))
    assert str(next(iter(bad.values()))) in str(e.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_multitask_run_leaves_the_contract_and_routing_diagnostics(runs_dir, variant):
    run_algo("ppo_softmod", "--runs-dir", str(runs_dir), *TINY, "--softmod-variant", variant)
    run_dir = only_run(runs_dir)
    tags = scalars(run_dir)
    for name in NAMES:
        assert f"eval/success_rate/{name}" in tags and f"eval/return/{name}" in tags
        assert f"softmod/routing_entropy/{name}" in tags
    devs = [v for _, v in tags["debug/first_minibatch_max_ratio_dev"]]
    assert len(devs) == 2 and max(devs) < 1e-4
    for tag in ["softmod/routing_entropy", "softmod/routing_entropy_critic", "softmod/routing_task_spread", "softmod/routing_state_spread"]:
        assert len(tags[tag]) == 2, tag
    assert all(0 < v <= math.log(2) + 1e-6 for _, v in tags["softmod/routing_entropy"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["final_success"]) == set(NAMES) and summary["total_steps"] == 2560
    config = json.loads((run_dir / "config.json").read_text())
    assert config["derived"]["params"] == summary["params"] and config["derived"]["embedding_dim"] == 64
    routing = torch.tensor(summary["final_routing"]["reversed-push"])  # rows of p-hat (+ the official final vector)
    assert routing.shape == (3 if variant == "official" else 2, 2)
    torch.testing.assert_close(routing.sum(-1), torch.ones(routing.shape[0]))
    assert len(read_jsonl(run_dir / "eval.jsonl")) == 2


def test_tiny_continuous_run_gaussian_head(runs_dir):
    run_algo("ppo_softmod", "--runs-dir", str(runs_dir), "--env-id", "metaworld/reach-v3", "--envs-per-task", "1", "--num-steps", "64",
             "--num-minibatches", "2", "--total-timesteps", "128", "--eval-every", "0", "--eval-episodes", "1")
    run_dir = only_run(runs_dir)
    tags = scalars(run_dir)
    assert max(v for _, v in tags["debug/first_minibatch_max_ratio_dev"]) < 1e-4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_steps"] == 128 and "reach-v3" in "".join(summary["final_success"])
    assert "softmod/routing_entropy" in tags
