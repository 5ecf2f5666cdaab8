"""The real cost of metaworld/MT10 on this machine: one full-size iteration of every method, and the cost table.

Each method of ``configs/metaworld_mt10.toml``'s ``[methods]`` runs as a user runs it (a subprocess, one torch
thread) for exactly one iteration at the config's settings (10 envs x 9,984 steps = 99,840 samples, 16 epochs x
32 minibatches), followed by the final evaluation with ``--eval-episodes E`` per task. Phase times are read from the
run's own logs: the iteration from ``charts/SPS`` (steps since the loop started), the rollout from
``charts/rollout_SPS``, the update as their difference, and the evaluation as ``eval.jsonl``'s wall clock minus
the last ``charts/wall_clock_s``, scaled from E to the config's ``eval_episodes``. Assumptions that bias the
evaluation column up by a few percent: the per-iteration diagnostics and logging after ``charts/wall_clock_s``
and the evaluator's env construction are counted in it and scaled too, and every episode of a one-iteration
policy runs its full 500 steps (trained policies end episodes at success). The oracle (``single``) runs one task (``--task``) with its
``[ppo_single]`` settings (1 env x 9,984 steps).

From the phase times, per run: ``iterations x (rollout + update) + evaluations x evaluation`` (the config's budget,
``eval_every`` and the final evaluation), and per grid (methods x seeds; the oracle x 10 tasks). The 16-core estimate
runs one single-threaded run per core (a sweep with -j 16), so the grid's hours divide by 16; the GPU column moves the
update to a GPU at an assumed speed-up (``--gpu-update-speedup``, not measured here: no GPU) and keeps rollout and
evaluation on the CPU. Assumptions are printed with the table.

    python scripts/bench_mt10_cost.py                          # every method, 2 at a time, E = 5
    python scripts/bench_mt10_cost.py --methods mtl_embed,varshare -j 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

CONFIG = REPO / "configs" / "metaworld_mt10.toml"


def one_iteration(label: str, spec: list[str], data: dict, episodes: int, task: str, runs_dir: str) -> dict:
    from mtrl.run import read_jsonl
    from mtrl.run import read_scalars as scalars

    algo, *flags = spec
    single = algo == "ppo_single"
    cmd = [sys.executable, str(REPO / "src" / "algos" / f"{algo}.py"), "--config", str(CONFIG), *flags, *(["--task", task] if single else []),
           "--total-timesteps", "1", "--eval-every", "0", "--eval-episodes", str(episodes), "--checkpoint-every", "0",
           "--runs-dir", runs_dir, "--run-name", label, "--no-progress", "--torch-threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"error: {label} failed:\n{proc.stderr[-2000:]}")
    run_dir = Path(runs_dir) / label
    batch = json.loads((run_dir / "config.json").read_text())["derived"]["batch_size"]  # one iteration: --total-timesteps 1
    tags = scalars(run_dir)
    sps, rollout_sps = tags["charts/SPS"][-1][1], tags["charts/rollout_SPS"][-1][1]
    iteration_s, rollout_s = batch / sps, batch / rollout_sps
    eval_s = read_jsonl(run_dir / "eval.jsonl")[-1]["wall_clock"] - tags["charts/wall_clock_s"][-1][1]
    params = json.loads((run_dir / "summary.json").read_text())["params"]
    return {"label": label, "single": single, "batch": batch, "rollout_s": rollout_s, "update_s": iteration_s - rollout_s, "eval_s": eval_s, "params": params}


def run_cost(m: dict, data: dict, episodes: int) -> tuple[float, int, int]:
    """Hours per run from the phase times: (hours, iterations, evaluations)."""
    single = m.get("single", m["label"] == "single")
    table = data.get("ppo_single", {}) if single else {}
    total = table.get("total_timesteps", data["total_timesteps"])
    every = table.get("eval_every", data["eval_every"])
    iterations = -(-total // m["batch"])
    final = iterations * m["batch"]
    evaluations = final // every + (final % every != 0)  # every crossing of eval_every, plus the final one if not on it
    eval_s = m["eval_s"] * data["eval_episodes"] / episodes
    return (iterations * (m["rollout_s"] + m["update_s"]) + evaluations * eval_s) / 3600, iterations, evaluations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated [methods] labels (default: all of them)")
    p.add_argument("--eval-episodes", type=int, default=5, help="episodes per task of the timed evaluation (scaled to the config's)")
    p.add_argument("--task", default="reach-v3", help="the oracle's task")
    p.add_argument("--seeds", type=int, default=10, help="seeds of the full grid")
    p.add_argument("-j", type=int, default=2, help="methods timed at a time (one thread each; at most the number of cores)")
    p.add_argument("--gpu-update-speedup", type=float, default=5.0, help="assumed update speed-up on one GPU (not measured here)")
    a = p.parse_args()
    data = tomllib.loads(CONFIG.read_text())
    methods = data["methods"]
    labels = a.methods.split(",") if a.methods else list(methods)
    bad = [m for m in labels if m not in methods]
    if bad:
        raise SystemExit(f"error: --methods {','.join(bad)}: not in {CONFIG.name} [methods]; allowed: {', '.join(methods)}")
    if a.eval_episodes < 1 or a.j < 1 or a.seeds < 1 or a.gpu_update_speedup <= 0:
        raise SystemExit("error: --eval-episodes, -j and --seeds must be >= 1 and --gpu-update-speedup > 0")
    from bench_throughput import env_only_sps

    env_sps = env_only_sps("metaworld/MT10", 1, 20_000)
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(a.j) as pool:
        rows = list(pool.map(lambda m: one_iteration(m, methods[m], data, a.eval_episodes, a.task, d), labels))
    print(f"\nmetaworld/MT10, {CONFIG.name}: one full iteration per method, {a.j} at a time, torch threads 1, {os.cpu_count()} CPUs. "
          f"MT10 env-only (sync, random actions, 10 envs): {env_sps:,.0f} steps/s. Evaluation timed at {a.eval_episodes} episodes "
          f"per task, scaled to {data['eval_episodes']}.\n")
    print(f"| method | active params | samples / iteration | rollout s | update s | eval s ({data['eval_episodes']} eps/task) | rollout / env-only | "
          "training / env-only | iterations | evaluations | hours per run | grid hours, this machine (2 runs at a time) | grid hours, 16 cores | "
          "16 cores + GPU update |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    total = {"here": 0.0, "16": 0.0, "gpu": 0.0}
    for m in rows:
        hours, iterations, evaluations = run_cost(m, data, a.eval_episodes)
        runs = a.seeds * (10 if m["single"] else 1)
        gpu_hours = hours - iterations * m["update_s"] * (1 - 1 / a.gpu_update_speedup) / 3600
        cells = {"here": hours * runs / min(2, os.cpu_count() or 1), "16": hours * runs / 16, "gpu": gpu_hours * runs / 16}
        ratio = "- | -" if m["single"] else (f"{m['batch'] / m['rollout_s'] / env_sps:.2f} | "  # the oracle: one env (bench_throughput.py)
                                             f"{m['batch'] / (m['rollout_s'] + m['update_s']) / env_sps:.2f}")
        for k in total:
            total[k] += cells[k]
        print(f"| {m['label']} | {m['params']['active_per_task']:,} | {m['batch']:,} | {m['rollout_s']:.0f} | {m['update_s']:.0f} | "
              f"{m['eval_s'] * data['eval_episodes'] / a.eval_episodes:.0f} | {ratio} | {iterations} | "
              f"{evaluations} | {hours:.1f} | {cells['here']:,.0f} | {cells['16']:,.0f} | {cells['gpu']:,.0f} |")
    print(f"| all ({a.seeds} seeds; oracle x 10 tasks) | | | | | | | | | | | {total['here']:,.0f} | {total['16']:,.0f} | {total['gpu']:,.0f} |")
    print(f"\nAssumptions: runs are single-threaded and independent, so a machine with n cores runs n at a time (this machine: 2; "
          f"the 16-core column: 16, with the per-run times measured here, i.e. the same per-core speed); the GPU column divides "
          f"the update time by {a.gpu_update_speedup:g} (assumed, not measured) and keeps stepping, acting and evaluation on the CPU; "
          f"evaluation cost is linear in episodes.")


if __name__ == "__main__":
    main()
