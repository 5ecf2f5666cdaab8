"""Parameter counting and capacity matching across methods (protocol.md section 4).

Every algorithm file exposes ``Args``, ``Agent(obs_dim, act_dim, discrete, num_tasks, args)`` and
``param_counts(agent, num_tasks) -> {"active_per_task", "inference", "total"}``; this module builds the
agent a benchmark config describes and counts it, and finds the hidden width that brings a method's
*active* parameters per task within a tolerance of a target (by default ppo_mtl_embed's count).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from functools import lru_cache
from pathlib import Path

import gymnasium as gym

from mtrl.envs import make_suite

ALGOS = ("ppo_single", "ppo_mtl_embed", "ppo_varshare", "ppo_pcgrad", "ppo_paco", "ppo_softmod")
_ALGO_DIR = Path(__file__).resolve().parents[1] / "algos"


def algo_module(algo: str):
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; allowed: {', '.join(ALGOS)}")
    if str(_ALGO_DIR) not in sys.path:
        sys.path.insert(0, str(_ALGO_DIR))
    return importlib.import_module(algo)


@lru_cache(maxsize=None)
def env_dims(env_id: str) -> tuple[int, int, bool, int]:
    """(obs_dim, act_dim, discrete, num_tasks) of a benchmark, from one env of its first task."""
    suite = make_suite(env_id)
    env = suite.tasks[0].make()
    space = env.action_space
    discrete = isinstance(space, gym.spaces.Discrete)
    dims = (env.observation_space.shape[0], space.n if discrete else space.shape[0], discrete, suite.num_tasks)
    env.close()
    return dims


def make_args(algo: str, config: str | None = None, **overrides):
    """The algorithm's ``Args`` with a benchmark config's values (as ``--config`` applies them) and overrides."""
    from mtrl.run import load_config

    mod = algo_module(algo)
    values = load_config(config, mod.Args, algo) if config else {}
    return dataclasses.replace(mod.Args(), **{**values, **overrides})


def count_params(algo: str, args) -> dict:
    """Parameter counts of ``algo`` built as ``args`` describes (one task for ppo_single)."""
    mod = algo_module(algo)
    obs_dim, act_dim, discrete, num_tasks = env_dims(args.env_id)
    if algo == "ppo_single":
        num_tasks = 1
    agent = mod.Agent(obs_dim, act_dim, discrete, num_tasks, args)
    return mod.param_counts(agent, num_tasks)


def match_width(algo: str, target: int, args, tol: float = 0.05, max_width: int = 4096) -> tuple[tuple[int, ...], dict]:
    """The hidden sizes ``(w,) * len(args.hidden_sizes)`` whose active-per-task count is closest to
    ``target``; raises ``ValueError`` if even the closest is more than ``tol`` (relative) away."""
    depth = len(args.hidden_sizes)

    def active(w: int) -> int:
        return count_params(algo, dataclasses.replace(args, hidden_sizes=(w,) * depth))["active_per_task"]

    lo, hi = 1, max_width  # active(w) increases with w: the smallest w with active(w) >= target, then its neighbour
    if active(hi) < target:
        raise ValueError(f"{algo}: even width {max_width} has fewer than {target} active parameters")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if active(mid) < target else (lo, mid)
    best = min({max(1, lo - 1), lo}, key=lambda w: abs(active(w) - target))
    sizes = (best,) * depth
    counts = count_params(algo, dataclasses.replace(args, hidden_sizes=sizes))
    err = abs(counts["active_per_task"] - target) / target
    if err > tol:
        raise ValueError(f"{algo}: closest width {best} gives {counts['active_per_task']} active parameters, "
                         f"{100 * err:.1f}% from the target {target} (tolerance {100 * tol:.0f}%)")
    return sizes, counts
