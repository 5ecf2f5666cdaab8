"""Cost of one PPO update (all epochs and minibatches of an iteration) per method, relative to ppo_mtl_embed.

Every case runs on the same benchmark config with the same batch and the same hidden width (so the
number is the method's compute cost, not a capacity difference), as a user runs it; the time per
iteration outside the rollout (update + per-iteration diagnostics + logging) is read from its
TensorBoard wall clock, first iteration dropped, median over iterations.

    python scripts/bench_update.py                       # toy/CartPole-MT10, width 64x64
    python scripts/bench_update.py --config configs/toy_lunarlander_mt10.toml --iterations 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from bench_throughput import timed_run  # noqa: E402

CASES = [
    ("mtl_embed", "ppo_mtl_embed", []),
    ("varshare (rollout noise)", "ppo_varshare", ["--noise", "rollout"]),
    ("varshare (step noise)", "ppo_varshare", ["--noise", "step"]),
    ("varshare (mean)", "ppo_varshare", ["--noise", "mean"]),
    ("L2Soft", "ppo_varshare", ["--residual", "l2"]),
    ("pcgrad", "ppo_pcgrad", []),
    ("paco", "ppo_paco", []),
    ("softmod", "ppo_softmod", []),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy_cartpole_mt10.toml")
    p.add_argument("--width", type=int, default=64, help="hidden width of every method (two hidden layers)")
    p.add_argument("--iterations", type=int, default=8, help="iterations per case (the first is dropped)")
    p.add_argument("--only", nargs="*", default=None, help="labels to run (default: every method whose file exists)")
    a = p.parse_args()
    cfg = tomllib.loads((REPO / a.config).read_text())
    batch = cfg["envs_per_task"] * cfg["num_steps"] * (10 if "MT10" in cfg["env_id"] else 1)
    rows = []
    for label, algo, flags in CASES:
        if (a.only and label not in a.only) or not (REPO / "src" / "algos" / f"{algo}.py").exists():
            continue
        extra = ["--config", a.config, "--hidden-sizes", str(a.width), str(a.width), *flags]
        t = timed_run(algo, cfg["env_id"], extra, batch * a.iterations)
        rows.append((label, float(np.median(t["update_s"])), float(np.median(t["rollout_s"])), t["batch"]))
        print(f"measured {label}: update {rows[-1][1]:.3f} s, rollout {rows[-1][2]:.3f} s", file=sys.stderr)
    base = rows[0][1]
    print(f"\n{a.config}: batch {rows[0][3]:,}, {cfg['update_epochs']} epochs x {cfg['num_minibatches']} minibatches, "
          f"hidden {a.width}x{a.width}, torch threads 1, {os.cpu_count()} CPUs\n")
    print("| method | update s / iteration | vs mtl_embed | rollout s / iteration |")
    print("|---|---:|---:|---:|")
    for label, upd, roll, _ in rows:
        print(f"| {label} | {upd:.3f} | {upd / base:.2f} | {roll:.3f} |")


if __name__ == "__main__":
    main()
