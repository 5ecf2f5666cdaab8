#!/usr/bin/env bash
# The main job on a small default: PPO on CartPole-v1 (50k steps, about 15 s), then where things are.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS_DIR:-runs}
.venv/bin/python src/algos/ppo_single.py --config configs/cartpole.toml --total-timesteps 50000 --runs-dir "$RUNS" --no-progress
echo "runs are in $RUNS/ ; open the curves with: .venv/bin/tensorboard --logdir $RUNS"
