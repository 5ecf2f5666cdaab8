"""Deterministic evaluation with frozen normalisation statistics (protocol.md section 2)."""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from mtrl.envs import EpisodeTracker, Suite, make_vector_env


class Evaluator:
    """Runs ``episodes_per_task`` episodes of every task and reports success rate and mean return.

    The eval envs are built once and reset with the same seeds at every evaluation, so every
    evaluation of a run sees the same episodes (and two runs with the same seed see the same ones).
    ``act_fn(obs, task_ids) -> actions`` receives normalised observations grouped by task, shape
    (num_tasks, envs_per_task, obs_dim) on ``device``, with ``task_ids = arange(num_tasks)``, and must
    act deterministically (distribution mode), returning (num_tasks, envs_per_task[, act_dim])."""

    def __init__(self, suite: Suite, episodes_per_task: int, seed: int, device, max_envs_per_task: int = 16):
        self.suite, self.device, self.seed = suite, device, seed
        self.n_per_task = min(episodes_per_task, max_envs_per_task)
        self.envs, self.task_ids = make_vector_env(suite, self.n_per_task, seed)
        # every env runs a fixed quota of episodes, so long and short episodes are not over- or under-counted
        base, extra = divmod(episodes_per_task, self.n_per_task)
        self.quota = np.array([base + (i % self.n_per_task < extra) for i in range(len(self.task_ids))])
        self.group_task_ids = torch.arange(suite.num_tasks, device=device)
        space = self.envs.single_action_space
        self.clip = (space.low, space.high) if isinstance(space, gym.spaces.Box) else None

    @torch.no_grad()
    def run(self, act_fn: Callable, obs_norm) -> dict:
        obs, _ = self.envs.reset(seed=[self.seed + i for i in range(len(self.task_ids))])
        tracker = EpisodeTracker(self.suite, self.task_ids)
        remaining = self.quota.copy()
        results = {name: {"success": [], "return": []} for name in self.suite.task_names}
        while remaining.sum() > 0:
            x = torch.as_tensor(obs_norm(obs, update=False), device=self.device).view(self.suite.num_tasks, self.n_per_task, -1)
            action = act_fn(x, self.group_task_ids).flatten(0, 1).cpu().numpy()
            if self.clip is not None:
                action = np.clip(action, *self.clip)
            obs, reward, term, trunc, infos = self.envs.step(action)
            for task, ret, _length, success, env in tracker.step(reward, term, trunc, infos):
                if remaining[env] > 0:
                    remaining[env] -= 1
                    name = self.suite.task_names[task]
                    results[name]["success"].append(float(success))
                    results[name]["return"].append(ret)
        return {k: {"success": float(np.mean(v["success"])), "return": float(np.mean(v["return"]))} for k, v in results.items()}

    def close(self) -> None:
        self.envs.close()
