#!/usr/bin/env bash
# The main command: a small comparison on toy/CartPole-Targets-MT3, then the report, then where things are.
# toy/CartPole-Targets-MT3 is the test-sized variant of toy/CartPole-Targets-MT10 (one physics, three
# unobserved cart targets): a task-blind policy provably succeeds on at most one of its three tasks, so
# the task-blind control and the multi-task methods separate within the config's 301,056-step budget.
# Every multi-task method (mtl_embed, varshare and its L2Soft ablation, pcgrad, paco, softmod), the
# task-blind control and the single-task oracle, 2 seeds, 2 runs at a time: about 10 minutes on 2 cores.
# The MT10 suite itself needs ~5M steps per run (about 40 minutes for this grid at 2 seeds here):
#   DEMO_CONFIG=configs/toy_cartpole_targets_mt10.toml bash scripts/demo.sh
# Running it again skips finished runs and resumes interrupted ones.
# Environment: DEMO_CONFIG, RUNS_DIR, REPORT_DIR, DEMO_JOBS (runs at a time), DEMO_SEEDS, DEMO_METHODS.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${DEMO_CONFIG:-configs/toy_cartpole_targets_mt3.toml}
NAME=$(basename "$CONFIG" .toml)
RUNS=${RUNS_DIR:-runs/${NAME}_demo}
REPORT=${REPORT_DIR:-reports/${NAME}_demo}
start=$(date +%s)
status=0   # a failed or interrupted run still gets a report of the others (it lists what is missing)
bash scripts/sweep.sh --config "$CONFIG" --methods "${DEMO_METHODS:-single,mtl_embed,task_blind,varshare,l2soft,pcgrad,paco,softmod}" \
  --seeds "${DEMO_SEEDS:-1-2}" -j "${DEMO_JOBS:-2}" --runs-dir "$RUNS" || status=$?
[ "$status" = 130 ] && exit 130   # stopped by Ctrl-C: the same command resumes
.venv/bin/python scripts/report.py --runs-dir "$RUNS" --out "$REPORT" >/dev/null
echo
echo "demo finished in $(( $(date +%s) - start )) s$([ $status = 0 ] || echo ", with failed runs (listed above and in the report)")"
echo "report:      $REPORT/report.md (tables; the same numbers in $REPORT/summary.csv and per_task.csv)"
echo "figures:     $(cd "$REPORT" && ls *.png | sed "s|^|$REPORT/|" | tr '\n' ' ')"
echo "runs:        $RUNS/<method>__s<seed>/ (config.json, eval.jsonl, summary.json, checkpoints; logs in $RUNS/logs)"
echo "TensorBoard: .venv/bin/tensorboard --logdir $RUNS"
exit $status
