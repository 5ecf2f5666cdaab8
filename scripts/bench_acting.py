"""The env share of ppo_single's rollout loop with one env, torch acting against --numpy-acting, interleaved.

The bench_throughput.py ratio (rollout SPS over a separately measured env-only SPS) moves when the machine's speed
moves between the two measurements. Here both acting paths run the rollout loop's per-step work (observation
statistics, acting, env step, reward statistics, truncation bootstrap, episode bookkeeping) in one process,
alternating, and the env step is timed inside the loop: the printed share is env time / loop time, the rollout /
env-only ratio the loop would have if the env ran at its in-loop speed.

    python scripts/bench_acting.py                       # metaworld/reach-v3, 64x64, 3 repetitions of 2,048 steps
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "src" / "algos"))

import ppo_single  # noqa: E402
from mtrl import envs as mtenvs  # noqa: E402
from mtrl import run as mtrun  # noqa: E402
from mtrl.ppo import NumpyPolicy, ObsNormalizer, RewardScaler  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="metaworld/reach-v3")
    p.add_argument("--steps", type=int, default=2048, help="loop steps per repetition")
    p.add_argument("--repetitions", type=int, default=3)
    a = p.parse_args()
    if a.steps < 1 or a.repetitions < 1:
        raise SystemExit(f"error: --steps {a.steps} and --repetitions {a.repetitions} must be >= 1")
    torch.set_num_threads(1)
    suite = mtenvs.make_suite(a.env_id, None, 1)
    envs, task_ids = mtenvs.make_vector_env(suite, 1, 1, "sync")
    obs = envs.reset(seed=[1])[0]
    obs_dim, space = envs.single_observation_space.shape[0], envs.single_action_space
    discrete = not hasattr(space, "low")
    agent = ppo_single.Agent(obs_dim, space.n if discrete else space.shape[0], discrete, 1, ppo_single.Args(env_id=a.env_id, hidden_sizes=(64, 64)))
    task_ids_t = torch.as_tensor(task_ids)
    obs_norm, reward_scaler = ObsNormalizer((obs_dim,), True), RewardScaler(1, 0.99, True)
    tracker, episodes = mtenvs.EpisodeTracker(suite, task_ids), mtrun.RecentEpisodes(suite.task_names)
    policy = NumpyPolicy(agent)

    def loop(mode: str) -> float:
        nonlocal obs
        env_s, start = 0.0, time.perf_counter()
        for _ in range(a.steps):
            x = obs_norm(obs)
            if mode == "numpy":
                action, _, _ = policy.act(x, task_ids)
            else:
                with torch.inference_mode():
                    action, logprob, value = agent.act(torch.as_tensor(x)[:, None], task_ids_t)
                action, _, _ = action[:, 0].numpy(), logprob[:, 0].numpy(), value[:, 0].numpy()
            t = time.perf_counter()
            obs, reward, term, trunc, infos = envs.step(action if discrete else np.clip(action, space.low, space.high))
            env_s += time.perf_counter() - t
            reward_scaler(reward, term | trunc)
            boot = trunc & ~term
            if boot.any():
                idx = np.flatnonzero(boot)
                with torch.inference_mode():
                    agent.get_value(torch.as_tensor(obs_norm(mtenvs.final_obs(obs, infos, boot)[idx], update=False))[:, None], task_ids_t[idx])
            episodes.add(tracker.step(reward, term, trunc, infos))
        return env_s / (time.perf_counter() - start)

    shares = {"torch (Agent.act)": [], "numpy (--numpy-acting)": []}
    for _ in range(a.repetitions):
        for name, mode in zip(shares, ("torch", "numpy")):
            shares[name].append(loop(mode))
    print(f"\n{a.env_id}, 1 env, 64x64, {a.steps} steps x {a.repetitions} repetitions, interleaved\n")
    print("| acting | env share of the rollout loop (each repetition) |")
    print("|---|---|")
    for name, v in shares.items():
        print(f"| {name} | {', '.join(f'{x:.2f}' for x in v)} |")


if __name__ == "__main__":
    main()
