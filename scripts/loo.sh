#!/usr/bin/env bash
# Leave-one-task-out (LOO) study of one benchmark config (protocol.md section 7; context/loo.md), through the sweep
# (scripts/sweep.sh: finished runs skipped, runs with a checkpoint resumed, -j, Slurm, locks, grid.tsv), in two phases:
#   phase 1, per held-out task k x method x seed: pre-training on every task but k
#            (<method>__loo-<k>__pretrain__s<seed>: --train-tasks <all but k>, (T-1)/T of the config's budget),
#            and per k x seed the scratch run: the single-task oracle on k (single__<k>__s<seed>, the oracle's name);
#   phase 2, once every phase-1 run has finished: the transfers from each pre-training run to k
#            (<method>__loo-<k>__finetune__s<seed>, <method>__loo-<k>__task-only__s<seed>: --train-tasks k
#            --init-from <pre-training run> --transfer finetune|task-only, at the oracle's per-task budget and
#            evaluation grid; each is evaluated at step 0 too, the zero-shot jumpstart).
# Held-out tasks, methods and the transfer budget come from the config's [loo] table (scripts/sweep_grid.py --loo).
#
#   bash scripts/loo.sh --config configs/toy_cartpole_targets_mt10.toml --seeds 1-3 -j 2
#   bash scripts/loo.sh --config configs/toy_lunarlander_mt10.toml --held-out low-gravity --methods varshare,mtl_embed --dry-run
#   bash scripts/loo.sh --config configs/metaworld_mt10.toml --seeds 1-5 --slurm --partition gpu --gpus 1 --cpus 4 --time 24:00:00
#   python scripts/loo_report.py --runs-dir runs/toy_cartpole_targets_mt10_loo
#
# Options:
#   --config FILE          benchmark config with [methods] and [loo] tables (required)
#   --held-out A,B         these of the [loo] held_out tasks (default: all of them)
#   --methods A,B          these of the [loo] methods (default: all of them)
#   --seeds LIST           e.g. 1-3 or 1,3,7 (default 1-5)
#   --runs-dir DIR         where the run folders go (default runs/<config name>_loo)
#   --total-timesteps N    the multi-task budget N instead of the config's: pre-training N (T-1)/T, transfer and scratch N/T
#   -j N                   runs at a time on this machine (default 1)
#   --dry-run              print both phases' commands (with --slurm: write both sbatch files) and stop
#   --slurm                submit phase 1 as a Slurm array; once it has finished, run the same command again: it then
#                          submits phase 2 (it submits phase 1 again while any phase-1 run is unfinished)
#   --partition P, --time T, --cpus N, --gpus N, --max-parallel N: Slurm resources (see scripts/sweep.sh)
#   -- FLAGS               flags after -- go to every run
# Locally, phase 2 starts only if phase 1 finished every run; otherwise fix the failures and run the same command
# again (finished runs are skipped, so only what is missing runs).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "loo.sh: error: $*" >&2; exit 2; }

CONFIG="" HELD="" RUNS="" DRY=0 SLURM=0
PASS=() EXTRA=()   # PASS: options handed on to sweep.sh as they are
while [ $# -gt 0 ]; do
  case "$1" in
    --config|--held-out|--methods|--seeds|--runs-dir|--total-timesteps|-j|--jobs|--partition|--time|--cpus|--gpus|--max-parallel)
      [ $# -ge 2 ] || die "$1 needs a value (see --help)" ;;&
    --config) CONFIG=$2; shift 2 ;;
    --held-out) HELD=$2; shift 2 ;;
    --runs-dir) RUNS=$2; shift 2 ;;
    --methods|--seeds|--total-timesteps|-j|--jobs|--partition|--time|--cpus|--gpus|--max-parallel) PASS+=("$1" "$2"); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --slurm) SLURM=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[ -n "$CONFIG" ] || die "--config is required (a file in configs/ with a [loo] table)"
RUNS=${RUNS:-$REPO/runs/$(basename "$CONFIG" .toml)_loo}   # the default lives in the repository, as the sweep's does
HELD_ARGS=${HELD:+ --held-out ${HELD//,/ }}

sweep() {  # phase, then more sweep.sh options; run from the caller's folder (sweep.sh resolves relative paths there)
  local phase=$1
  shift
  bash "$REPO/scripts/sweep.sh" --config "$CONFIG" --runs-dir "$RUNS" "${PASS[@]}" --grid-args "--loo $phase$HELD_ARGS" "$@" -- "${EXTRA[@]}"
}

if [ $DRY = 1 ]; then
  slurm=(); [ $SLURM = 0 ] || slurm=(--slurm)
  echo "# phase 1: pre-training on all tasks but the held-out one, and scratch (the single-task oracle run)"
  sweep pretrain --dry-run "${slurm[@]}" || exit $?
  echo "# phase 2 (after phase 1): transfer to the held-out task, finetune and task-only"
  sweep transfer --dry-run "${slurm[@]}"
  exit $?
fi

if [ $SLURM = 1 ]; then
  todo=$(sweep pretrain --dry-run) || exit $?
  pending=$(printf '%s\n' "$todo" | grep -vc '^#' || true)   # phase-1 runs without summary.json
  if [ "$pending" -gt 0 ]; then
    echo "loo.sh: phase 1 has $pending unfinished run(s): submitting phase 1. Once it has finished, run this command again to submit phase 2."
    sweep pretrain --slurm
    exit $?
  fi
  echo "loo.sh: every phase-1 run has finished: submitting phase 2 (transfer)"
  sweep transfer --slurm
  exit $?
fi

echo "loo.sh: phase 1 of 2: pre-training and scratch"
sweep pretrain
code=$?
[ $code = 130 ] && exit 130
if [ $code != 0 ]; then
  echo "loo.sh: phase 1 did not finish every run (exit $code); phase 2 starts from the pre-training runs: fix the failures" \
       "above and run the same command again (finished runs are skipped)" >&2
  exit $code
fi
echo "loo.sh: phase 2 of 2: transfer (finetune, task-only)"
sweep transfer
