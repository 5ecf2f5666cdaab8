"""ppo_mtl_embed: task conditioning, the task-blind control, routing of the suite's tasks."""

import json
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, only_run, read_jsonl, run_algo, scalars
from mtrl.envs import CARTPOLE_MT10, make_suite

sys.path.insert(0, str(REPO / "src" / "algos"))
import ppo_mtl_embed as me  # noqa: E402

NAMES = list(CARTPOLE_MT10)
TINY = ["--total-timesteps", "2560", "--envs-per-task", "1", "--num-steps", "128", "--num-minibatches", "2",
        "--eval-every", "1280", "--eval-episodes", "1"]


def test_cartpole_mt10_tasks_have_the_tabulated_physics():
    suite = make_suite("toy/CartPole-MT10")
    assert suite.task_names == NAMES
    for task in suite.tasks:
        env = task.make()
        u = env.unwrapped
        g, mc, mp, l, f, rev = CARTPOLE_MT10[task.name]
        assert (u.gravity, u.masscart, u.masspole, u.length, u.force_mag) == (g, mc, mp, l, f)
        assert u.total_mass == mc + mp and u.polemass_length == mp * l
        # reversed tasks exchange the actions: the same action pushes the cart the other way
        env.reset(seed=0)
        env.step(1)
        assert (u.state[1] < 0) == rev  # action 1 normally pushes right (x_dot > 0)


def test_lunarlander_mt10_has_ten_tasks_and_a_swapped_engine_task():
    suite = make_suite("toy/LunarLander-MT10")
    assert suite.num_tasks == 10 and any("swapped" in n for n in suite.task_names)
    env = suite.tasks[suite.task_names.index("swapped-engines")].make()
    assert env.action(1) == 3 and env.action(3) == 1 and env.action(2) == 2


@pytest.mark.parametrize("encoding", ["onehot", "embedding", "none"])
def test_task_encoding_changes_outputs_only_when_the_task_is_encoded(encoding):
    torch.manual_seed(0)
    agent = me.Agent(4, 2, True, 10, me.Args(task_encoding=encoding))
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(1, 5, 4).expand(10, 5, 4)  # the same observations under every task
    out = agent.actor(agent.task_input(x, torch.arange(10), getattr(agent, "actor_embedding", None)))
    spread = (out - out[:1]).abs().max().item()
    assert (spread > 1e-3) == (encoding != "none")


def test_onehot_rows_route_by_group_and_param_counts_exclude_other_tasks():
    agent = me.Agent(4, 2, False, 10, me.Args(task_encoding="onehot", hidden_sizes=(8, 8)))
    x = torch.randn(3, 2, 4)
    tasks = torch.tensor([7, 0, 7])
    inp = agent.task_input(x, tasks, None)
    assert torch.equal(inp[..., 4:].argmax(-1), tasks[:, None].expand(3, 2))
    counts = me.param_counts(agent, 10)
    total = sum(p.numel() for p in agent.parameters())
    assert counts["total"] == total and counts["active_per_task"] == total - 9 * (8 + 8 + 2)


def test_tiny_multitask_run_logs_every_task(runs_dir):
    run_algo("ppo_mtl_embed", "--runs-dir", str(runs_dir), *TINY)
    run_dir = only_run(runs_dir)
    tags = scalars(run_dir)
    for name in NAMES:
        assert f"eval/success_rate/{name}" in tags and f"eval/return/{name}" in tags
    assert max(v for _, v in tags["debug/first_minibatch_max_ratio_dev"]) < 1e-4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["final_success"]) == set(NAMES) and summary["total_steps"] == 2560
    assert json.loads((run_dir / "config.json").read_text())["derived"]["params"] == summary["params"]
