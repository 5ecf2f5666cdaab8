#!/usr/bin/env bash
# The main command: a small comparison on toy/CartPole-MT10, then the report, then where things are.
# Every multi-task method (mtl_embed, varshare and its L2Soft ablation, pcgrad, paco, softmod) and the
# single-task oracle, 2 seeds, the config's budget (1,996,800 steps per multi-task run; the oracle
# 199,680 per task), 2 runs at a time: about 10 minutes on 2 cores. Running it again skips finished
# runs and resumes interrupted ones.
# Environment: RUNS_DIR, REPORT_DIR, DEMO_JOBS (runs at a time), DEMO_SEEDS, DEMO_METHODS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS_DIR:-runs/toy_cartpole_mt10_demo}
REPORT=${REPORT_DIR:-reports/toy_cartpole_mt10_demo}
start=$(date +%s)
status=0   # a failed or interrupted run still gets a report of the others (it lists what is missing)
bash scripts/sweep.sh --config configs/toy_cartpole_mt10.toml --methods "${DEMO_METHODS:-single,mtl_embed,varshare,l2soft,pcgrad,paco,softmod}" \
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
