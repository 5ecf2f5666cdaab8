"""Training throughput over environment-only throughput, on this machine, in one run.

For each case: (1) env-only steps/s of the same vector env with random actions (pre-sampled, so the
sampler is not timed), (2) an algorithm run as a user runs it (a subprocess), whose rollout-phase and
overall steps/s are read from its TensorBoard scalars (first iteration excluded: start-up).

    python scripts/bench_throughput.py            # CartPole-v1 and metaworld/reach-v3, ppo_single
    python scripts/bench_throughput.py --steps 20000
    python scripts/bench_throughput.py --mt10 --steps 30720   # MT10: env-only sync/async and every method
    python scripts/bench_throughput.py --only Targets --steps 102400   # the vectorised CartPole against gymnasium's
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mtrl.envs import make_suite, make_vector_env  # noqa: E402

# (label, algo, env id, hyperparameters). reach-v3 uses CleanRL ppo_continuous_action's settings
# (1 env, 2048 steps, 32 minibatches, 10 epochs, 64x64), the setting of the 740 vs 2,505 steps/s figure.
CASES = [
    ("CartPole-v1", "ppo_single", "CartPole-v1", ["--config", "configs/cartpole.toml"]),
    ("metaworld/reach-v3", "ppo_single", "metaworld/reach-v3",
     ["--envs-per-task", "1", "--num-steps", "2048", "--num-minibatches", "32", "--update-epochs", "10", "--learning-rate", "3e-4",
      "--hidden-sizes", "64", "64", "--ent-coef", "0.0"]),
    ("metaworld/reach-v3 --numpy-acting", "ppo_single", "metaworld/reach-v3",
     ["--envs-per-task", "1", "--num-steps", "2048", "--num-minibatches", "32", "--update-epochs", "10", "--learning-rate", "3e-4",
      "--hidden-sizes", "64", "64", "--ent-coef", "0.0", "--numpy-acting"]),
] + [  # toy/CartPole-Targets-MT10 (40 envs): the numpy-vectorised CartPole (sync) against gymnasium's SyncVectorEnv (gym)
    (f"toy/CartPole-Targets-MT10 {mode}", algo, "toy/CartPole-Targets-MT10", ["--config", "configs/toy_cartpole_targets_mt10.toml", "--vector-mode", mode])
    for algo in ("ppo_mtl_embed", "ppo_varshare") for mode in ("gym", "sync")
]


def env_only_sps(env_id: str, envs_per_task: int, steps: int, seed: int = 0, vector_mode: str = "sync") -> float:
    suite = make_suite(env_id, None, seed)
    envs, _ = make_vector_env(suite, envs_per_task, seed, vector_mode)
    envs.reset(seed=seed)
    n_iter = max(1, steps // envs.num_envs)
    actions = [envs.action_space.sample() for _ in range(n_iter)]
    t = time.perf_counter()
    for a in actions:
        envs.step(a)
    sps = n_iter * envs.num_envs / (time.perf_counter() - t)
    envs.close()
    return sps


def timed_run(algo: str, env_id: str, extra: list[str], steps: int) -> dict:
    """Run ``algo`` as a user does (subprocess, no evaluation or checkpoints until the end) and return its
    per-iteration timings from TensorBoard: env steps, wall clock, rollout seconds, and the seconds spent
    outside the rollout (update, diagnostics, logging); the first iteration (start-up) is dropped."""
    from mtrl.run import read_scalars as scalars

    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, str(REPO / "src" / "algos" / f"{algo}.py"), "--env-id", env_id, *extra, "--total-timesteps", str(steps),
               "--eval-every", "0", "--eval-episodes", "1", "--checkpoint-every", "0", "--runs-dir", d, "--run-name", "b", "--no-progress"]
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        tags = scalars(Path(d) / "b")
    steps_at = np.array([s for s, _ in tags["charts/SPS"]])
    wall = np.array([v for _, v in tags["charts/wall_clock_s"]])
    batch = steps_at[0]
    rollout_s = batch / np.array([v for _, v in tags["charts/rollout_SPS"]])
    iter_s = np.diff(wall)  # iteration i+1: its rollout, its update, its logging
    return {"steps": steps_at[1:], "iter_s": iter_s, "rollout_s": rollout_s[1:], "update_s": iter_s - rollout_s[1:], "batch": int(batch)}


def training_sps(algo: str, env_id: str, extra: list[str], steps: int) -> tuple[float, float]:
    """Rollout-phase and overall training steps/s, first iteration excluded."""
    t = timed_run(algo, env_id, extra, steps)
    if len(t["iter_s"]) == 0:
        raise SystemExit(f"error: --steps {steps} gives a single iteration of {algo} on {env_id}; use more steps")
    return float(t["batch"] / np.mean(t["rollout_s"])), float(t["batch"] * len(t["iter_s"]) / t["iter_s"].sum())


# MT10: every method on configs/metaworld_mt10.toml with its matched width, shortened rollouts (1,024 steps per
# env) and 4 minibatches, so a minibatch (2,560 samples) and the gradient steps per sample (16 epochs) stay
# close to the config's (3,120 samples, 16 epochs x 32 minibatches of a 99,840-step batch).
MT10_SHORT = ["--config", "configs/metaworld_mt10.toml", "--num-steps", "1024", "--num-minibatches", "4"]
MT10_CASES = [(label, algo, "metaworld/MT10", [*MT10_SHORT, *flags]) for label, algo, flags in [
    ("mtl_embed", "ppo_mtl_embed", []), ("varshare", "ppo_varshare", []), ("l2soft", "ppo_varshare", ["--residual", "l2", "--hidden-sizes", "176", "176"]),
    ("pcgrad", "ppo_pcgrad", []), ("paco", "ppo_paco", []), ("softmod", "ppo_softmod", [])]]


def envs_per_task(extra: list[str]) -> int:
    if "--envs-per-task" in extra:
        return int(extra[extra.index("--envs-per-task") + 1])
    import tomllib

    return tomllib.loads((REPO / extra[extra.index("--config") + 1]).read_text())["envs_per_task"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30_000, help="environment steps per measurement")
    p.add_argument("--only", default=None, help="run only cases whose label contains this")
    p.add_argument("--mt10", action="store_true", help="MT10: env-only sync and async, and every method (use --steps >= 30720)")
    a = p.parse_args()
    rows = []
    cases = MT10_CASES if a.mt10 else CASES
    env_rows = {}
    if a.mt10:
        for mode in ("sync", "async"):
            env_rows[mode] = env_only_sps("metaworld/MT10", 1, a.steps, vector_mode=mode)
            print(f"measured MT10 env-only {mode}: {env_rows[mode]:.0f}", file=sys.stderr)
    for label, algo, env_id, extra in cases:
        if a.only and a.only not in label:
            continue
        rollout, overall = training_sps(algo, env_id, extra, a.steps)
        mode = extra[extra.index("--vector-mode") + 1] if "--vector-mode" in extra else "sync"
        env_sps = env_rows["sync"] if a.mt10 else env_only_sps(env_id, envs_per_task(extra), a.steps, vector_mode=mode)
        rows.append((env_id, (algo + label[len(env_id):]) if not a.mt10 else label, env_sps, rollout, overall))
        print(f"measured {label} {algo}: env {env_sps:.0f}, rollout {rollout:.0f}, training {overall:.0f}", file=sys.stderr)
    print(f"\nsteps per measurement: {a.steps}; torch threads 1; {os.cpu_count()} CPUs; sync vector env unless the row says gym\n")
    if env_rows:
        print(f"MT10 env-only (random actions, one env per task): sync {env_rows['sync']:,.0f} SPS, async {env_rows['async']:,.0f} SPS\n")
    print("| env | method | env-only SPS | rollout SPS | training SPS | rollout / env | training / env |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for env_id, label, env_sps, rollout, overall in rows:
        print(f"| {env_id} | {label} | {env_sps:,.0f} | {rollout:,.0f} | {overall:,.0f} | {rollout / env_sps:.2f} | {overall / env_sps:.2f} |")


if __name__ == "__main__":
    main()
