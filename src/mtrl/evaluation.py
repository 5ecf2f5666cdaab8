"""Deterministic evaluation with frozen normalisation statistics (protocol.md section 2).

Toy and gymnasium benchmarks: ``episodes_per_task`` episodes per task on fixed-seed envs. Meta-World:
the official protocol of ``metaworld.evaluation`` (see :meth:`Evaluator.run_official`)."""

from __future__ import annotations

import functools
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from gymnasium.vector import AutoresetMode, SyncVectorEnv

from mtrl.envs import EpisodeTracker, Suite, make_vector_env


class Evaluator:
    """Runs ``episodes_per_task`` episodes of every task and reports success rate and mean return.

    The eval envs are built once and reset with the same seeds at every evaluation, so every
    evaluation of a run sees the same episodes (and two runs with the same seed see the same ones).
    ``act_fn(obs, task_ids) -> actions`` receives normalised observations grouped by task, shape
    (num_tasks, envs_per_task, obs_dim) on ``device``, with ``task_ids = arange(num_tasks)``, and must
    act deterministically (distribution mode), returning (num_tasks, envs_per_task[, act_dim])."""

    def __init__(self, suite: Suite, episodes_per_task: int, seed: int, device, max_envs_per_task: int = 16, vector_mode: str = "sync"):
        """``vector_mode``: the training run's (mtrl.envs.make_vector_env); ``async`` evaluates in this process (sync)."""
        self.suite, self.device, self.seed, self.episodes = suite, device, seed, episodes_per_task
        self.official = suite.tasks[0].make_eval is not None  # Meta-World: metaworld.evaluation's protocol
        if self.official:
            self.n_per_task, self.envs = 1, None
            self.group_task_ids = torch.arange(suite.num_tasks, device=device)
            return
        self.n_per_task = min(episodes_per_task, max_envs_per_task)
        self.envs, self.task_ids = make_vector_env(suite, self.n_per_task, seed, "gym" if vector_mode == "gym" else "sync")
        # every env runs a fixed quota of episodes, so long and short episodes are not over- or under-counted
        base, extra = divmod(episodes_per_task, self.n_per_task)
        self.quota = np.array([base + (i % self.n_per_task < extra) for i in range(len(self.task_ids))])
        self.group_task_ids = torch.arange(suite.num_tasks, device=device)
        space = self.envs.single_action_space
        self.clip = (space.low, space.high) if isinstance(space, gym.spaces.Box) else None

    @torch.no_grad()
    def run(self, act_fn: Callable, obs_norm) -> dict:
        if self.official:
            return self.run_official(act_fn, obs_norm)
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

    def run_official(self, act_fn: Callable, obs_norm) -> dict:
        """Meta-World: ``metaworld.evaluation.evaluation`` on one eval env per task, built afresh (so every
        evaluation sees the same goals in the same order): ``episodes`` episodes per task (50 = each training
        goal once), deterministic actions, episodes end at the first success, which is then counted."""
        from metaworld.evaluation import evaluation

        envs = SyncVectorEnv([functools.partial(t.make_eval, self.seed + i) for i, t in enumerate(self.suite.tasks)],
                             autoreset_mode=AutoresetMode.SAME_STEP)
        space = envs.single_action_space
        try:
            _, _, success, returns = evaluation(_OfficialAgent(act_fn, obs_norm, self.group_task_ids, (space.low, space.high)), envs, self.episodes)
        finally:
            envs.close()
        return {n: {"success": float(success[n]), "return": float(np.mean(returns[n]))} for n in self.suite.task_names}

    def close(self) -> None:
        if self.envs is not None:
            self.envs.close()


class _OfficialAgent:
    """The agent interface of ``metaworld.evaluation``: raw observations of one env per task (in task order)
    -> deterministic, clipped actions, through the frozen observation normaliser."""

    def __init__(self, act_fn: Callable, obs_norm, task_ids: torch.Tensor, clip):
        self.act_fn, self.obs_norm, self.task_ids, self.clip = act_fn, obs_norm, task_ids, clip

    def eval_action(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(self.obs_norm(obs, update=False), device=self.task_ids.device)[:, None]
        with torch.no_grad():
            action = self.act_fn(x, self.task_ids)[:, 0].cpu().numpy()
        return np.clip(action, *self.clip)

    def reset(self, env_mask: np.ndarray) -> None:
        pass
