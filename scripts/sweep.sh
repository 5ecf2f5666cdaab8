#!/usr/bin/env bash
# Run a grid of methods x seeds (x tasks for the single-task oracle) of one benchmark config,
# on this machine (-j N at a time) or as one Slurm job array (--slurm).
#
#   bash scripts/sweep.sh --config configs/toy_cartpole_mt10.toml --seeds 1-5 -j 2
#   bash scripts/sweep.sh --config configs/toy_cartpole_mt10.toml --methods mtl_embed,varshare --seeds 1-2 --dry-run
#   bash scripts/sweep.sh --config configs/metaworld_mt10.toml --seeds 1-10 --slurm --partition gpu --gpus 1 --cpus 4 --time 24:00:00
#   bash scripts/sweep.sh --config configs/toy_cartpole_mt10.toml -- --eval-episodes 5      # flags after -- go to every run
#   bash scripts/sweep.sh --config configs/toy_cartpole_targets_mt10.toml --tune -j 2 --runs-dir runs/targets_tuning
#
# Options:
#   --config FILE          benchmark config with a [methods] table (required)
#   --methods A,B          labels of the config's [methods] table (default: all of them)
#   --seeds LIST           e.g. 1-5 or 1,3,7 (default 1-5; report seeds are 1-100, seeds >= 101 are tuning seeds)
#   --runs-dir DIR         where the run folders go (default runs/<config name>, with --tune runs/<config name>_tuning)
#   --total-timesteps N    multi-task budget of every run; oracle runs get N / num_tasks (default: the config's)
#   --tune                 hyperparameter tuning: the config's [tuning] table, methods x configurations x tuning
#                          seeds (its seeds and budget unless --seeds / --total-timesteps), run names
#                          <label>@<configuration>__s<seed>; --methods picks tuned methods. Keep tuning runs in a
#                          runs dir of their own (runs/<study>_tuning): the report refuses to mix them with report
#                          runs. Then: python scripts/tune.py --config FILE --runs-dir DIR --out DIR [--write]
#   -j N                   runs at a time on this machine, one thread each (default 1)
#   --dry-run              print each run's command (or write the sbatch file) and stop
#   --slurm                write one sbatch array script (one array task per run) and submit it if sbatch exists
#   --partition P, --time T, --cpus N (default 1), --gpus N (default 0), --max-parallel N (default 64): Slurm resources
#   --grid-args "ARGS"     more arguments for scripts/sweep_grid.py (scripts/loo.sh: "--loo pretrain|transfer --held-out ...")
#
# Every run has a fixed name (<label>__s<seed>, oracle <label>__<task>__s<seed>) under the runs dir, so a
# sweep launched again skips runs whose summary.json exists, resumes runs that have a checkpoint, and
# starts again runs that stopped before their first checkpoint (the old folder is moved aside to
# <name>.incomplete-<time>, never deleted). Each run's output goes to <runs dir>/logs/<name>.log, with a
# progress line every 30 s (tail -f it); failed runs are listed with their logs at the end and make the
# sweep exit 1. Ctrl-C (or SIGTERM to the sweep) stops the running runs, each saving a checkpoint, starts
# no new one and exits 130; the same command resumes. A run that another sweep is running is left alone
# ("busy"; a lock file per run). Under Slurm each array task makes the skip/resume decision when it
# starts, so resubmitting (or a requeue) continues the sweep. <runs dir>/grid.tsv lists every run ever
# asked for there; the report names the ones that never finished.
set -uo pipefail
CALLER=$(pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"   # runs start here; paths given relative to the caller's folder are made absolute below
PY=${PYTHON:-$REPO/.venv/bin/python}

die() { echo "sweep.sh: error: $*" >&2; exit 2; }
is_int() { [[ $1 =~ ^[0-9]+$ ]]; }

CONFIG="" METHODS="" SEEDS="" RUNS="" BUDGET="" JOBS=1 DRY=0 SLURM=0 TUNE=0
PARTITION="" TIME="" CPUS=1 GPUS=0 MAXPAR=64 GRID_FILE="" INDEX="" GRID_ARGS=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config|--methods|--seeds|--runs-dir|--total-timesteps|-j|--jobs|--partition|--time|--cpus|--gpus|--max-parallel|--grid-file|--run-index|--grid-args)
      [ $# -ge 2 ] || die "$1 needs a value (see --help)" ;;&
    --config) CONFIG=${2-}; shift 2 ;;
    --methods) METHODS=${2-}; shift 2 ;;
    --seeds) SEEDS=${2-}; shift 2 ;;
    --runs-dir) RUNS=${2-}; shift 2 ;;
    --total-timesteps) BUDGET=${2-}; shift 2 ;;
    -j|--jobs) JOBS=${2-}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --tune) TUNE=1; shift ;;
    --slurm) SLURM=1; shift ;;
    --partition) PARTITION=${2-}; shift 2 ;;
    --time) TIME=${2-}; shift 2 ;;
    --cpus) CPUS=${2-}; shift 2 ;;
    --gpus) GPUS=${2-}; shift 2 ;;
    --max-parallel) MAXPAR=${2-}; shift 2 ;;
    --grid-args) GRID_ARGS=${2-}; shift 2 ;;
    --grid-file) GRID_FILE=${2-}; shift 2 ;;   # internal: one Slurm array task
    --run-index) INDEX=${2-}; shift 2 ;;       # internal: one Slurm array task
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

from_caller() { if [ -n "$1" ] && [[ $1 != /* ]] && [ "$CALLER" != "$REPO" ]; then echo "$CALLER/$1"; else echo "$1"; fi; }
CONFIG=$(from_caller "$CONFIG") RUNS=$(from_caller "$RUNS") GRID_FILE=$(from_caller "$GRID_FILE")
[ -x "$PY" ] || die "python '$PY' not found: run 'bash scripts/setup.sh' first, or set PYTHON"

# ---- one run: skip if finished, resume if it has a checkpoint, else start it (fresh folder) ----
run_command() {  # name algo args -> prints the command as a shell-quoted line, or nothing if finished
  local name=$1 algo=$2 args=$3 dir="$RUNS/$1"
  if [ -f "$dir/summary.json" ]; then return 0; fi
  if [ -f "$dir/checkpoints/latest.pt" ]; then
    printf '%q ' "$PY" "src/algos/$algo.py" --resume "$dir"; echo
  else
    printf '%q ' "$PY" "src/algos/$algo.py"; printf '%s ' "$args"; printf '%q ' --runs-dir "$RUNS" --run-name "$name"; echo
  fi
}

note_status() { [ -z "${STATUS_DIR:-}" ] || echo "$1" >"$STATUS_DIR/$name"; }  # this sweep's own tally

tally() {  # this sweep's progress after a run ended: runs done of all, and the time left at the rate so far
  [ -n "${STATUS_DIR:-}" ] || return 0
  [ "${1:-}" != ran ] || touch "$STATUS_DIR/.ran.$name"
  local done ran left
  done=$(find "$STATUS_DIR" -maxdepth 1 -type f ! -name '.ran.*' | wc -l)
  ran=$(find "$STATUS_DIR" -maxdepth 1 -type f -name '.ran.*' | wc -l)
  left=""
  [ "$ran" = 0 ] || left=", about $(( ($(date +%s) - SWEEP_START) * (N - done) / ran / 60 )) min left"
  echo " | $done/$N runs done$left"
}

run_one() {  # name algo args -> runs it to completion, output to its log; prints one status line
  # Locally (SUPERVISE=1) the run gets its own session, so a Ctrl-C reaches only the sweep, which passes
  # one SIGTERM on (a second signal would stop the run without its final checkpoint). Under Slurm the
  # run stays in the job's process tree: Slurm signals it directly on scancel or at the time limit.
  local name=$1 algo=$2 args=$3 dir="$RUNS/$1" log="$RUNS/logs/$1.log" cmd t0 code pid="" stop=0 lock
  if [ "${SUPERVISE:-0}" = 1 ]; then  # first thing: a SIGTERM from now on is passed on once, or stops the start
    trap '' INT
    trap 'trap "" TERM; if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null; else stop=1; fi' TERM
  fi
  mkdir -p "$RUNS/logs"
  exec {lock}>"$RUNS/logs/$name.lock"   # held by the run itself while it lives: no two sweeps run it at once
  if ! flock -n "$lock"; then
    note_status busy; echo "[busy]    $name (running in another sweep; left alone)"; return 0
  fi
  cmd=$(run_command "$name" "$algo" "$args")
  if [ -z "$cmd" ]; then note_status 0; echo "[done]    $name$(tally)"; return 0; fi
  if [ -e "$dir" ] && [ ! -f "$dir/checkpoints/latest.pt" ]; then mv -T -- "$dir" "$dir.incomplete-$(date +%s%N)" || return 1; fi
  t0=$(date +%s)
  echo "\$ $cmd" >>"$log"
  eval "set -- $cmd"
  if [ "${SUPERVISE:-0}" = 1 ]; then
    if [ $stop = 1 ]; then note_status 143; echo "[stopped] $name (before it started)"; return 143; fi
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 setsid "$@" >>"$log" 2>&1 </dev/null &
    pid=$!
    [ $stop = 0 ] || kill -TERM "$pid" 2>/dev/null   # the signal came between the check and pid=$!
    wait "$pid"
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done   # a trapped signal interrupts wait, not the run
    wait "$pid"; code=$?   # the run's own exit status (bash keeps it for a reaped child)
  else
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$@" >>"$log" 2>&1 </dev/null
    code=$?
  fi
  note_status "$code"
  local status="exit $code"
  [ "$code" = 0 ] && status=ok
  [ "$code" = 130 ] || [ "$code" = 143 ] && status=stopped
  printf '[%-7s] %s (%s s, log %s)%s\n' "$status" "$name" "$(( $(date +%s) - t0 ))" "$log" "$(tally ran)"
  return $code
}

# ---- a Slurm array task: run line INDEX of the grid file ----
if [ -n "$INDEX" ]; then
  [ -f "$GRID_FILE" ] || die "--grid-file '$GRID_FILE': no such file"
  [ -n "$RUNS" ] || die "--run-index needs --runs-dir"
  line=$(sed -n "$((INDEX + 1))p" "$GRID_FILE")
  [ -n "$line" ] || die "--run-index $INDEX: the grid has $(wc -l <"$GRID_FILE") runs"
  IFS=$'\t' read -r name algo args <<<"$line"
  run_one "$name" "$algo" "$args"
  exit $?
fi

# ---- validate, before any work starts ----
[ -n "$CONFIG" ] || die "--config is required (a file in configs/)"
[ -f "$CONFIG" ] || die "--config '$CONFIG': no such file"
for pair in "-j:$JOBS" "--cpus:$CPUS" "--gpus:$GPUS" "--max-parallel:$MAXPAR"; do
  is_int "${pair#*:}" || die "${pair%%:*} '${pair#*:}': must be a whole number"
done
[ "$JOBS" -ge 1 ] || die "-j $JOBS: must be >= 1"
[ "$CPUS" -ge 1 ] || die "--cpus $CPUS: must be >= 1"
[ "$MAXPAR" -ge 1 ] || die "--max-parallel $MAXPAR: must be >= 1"
[ -z "$BUDGET" ] || is_int "$BUDGET" || die "--total-timesteps '$BUDGET': must be a positive whole number"
[ -z "$TIME" ] || [[ $TIME =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || die "--time '$TIME': use a Slurm time such as 90, 04:00:00 or 1-12:00:00"
SUFFIX=""; [ $TUNE = 0 ] || SUFFIX=_tuning
RUNS=${RUNS:-runs/$(basename "$CONFIG" .toml)$SUFFIX}
[[ $RUNS = /* ]] || RUNS="$REPO/$RUNS"

grid_args=(--config "$CONFIG" --runs-dir "$RUNS")
[ -z "$SEEDS" ] || grid_args+=(--seeds ${SEEDS//,/ })   # default: 1-5, with --tune the [tuning] table's
[ $TUNE = 0 ] || grid_args+=(--tune)
[ -z "$METHODS" ] || grid_args+=(--methods ${METHODS//,/ })
[ -z "$BUDGET" ] || grid_args+=(--total-timesteps "$BUDGET")
[ -z "$GRID_ARGS" ] || grid_args+=($GRID_ARGS)   # word-split on purpose: task names hold no spaces
GRID=$("$PY" scripts/sweep_grid.py "${grid_args[@]}" -- "${EXTRA[@]}") || exit 2
N=$(printf '%s\n' "$GRID" | wc -l)
mixed=$( { cat "$RUNS/grid.tsv" 2>/dev/null; printf '%s\n' "$GRID"; } | awk -F'\t' '  # tuning seeds (>= 101) never share a runs dir with report seeds
  match($1, /__s[0-9]+$/) { seed = substr($1, RSTART + 3) + 0; if (seed >= 101) t = t ? t : $1; else r = r ? r : $1 }
  END { if (t && r) print t " and " r }')
[ -z "$mixed" ] || die "runs dir '$RUNS' would hold tuning runs (seeds >= 101) and report runs (seeds 1-100), e.g. $mixed (its grid.tsv and this sweep): give tuning runs their own --runs-dir, e.g. runs/<study>_tuning"
if [ $SLURM = 1 ] && [[ $RUNS =~ [[:space:]] ]]; then die "--runs-dir '$RUNS': #SBATCH lines cannot hold whitespace; choose a path without it"; fi
if [ $DRY = 0 ] || [ $SLURM = 1 ]; then mkdir -p "$RUNS"; fi
if [ $DRY = 0 ]; then  # the report compares this list with the finished runs, to name the missing ones
  (  # under a lock: two sweeps started together must not lose each other's lines
    flock 9
    tmp=$(mktemp "$RUNS/grid.tsv.XXXXXX")
    { cat "$RUNS/grid.tsv" 2>/dev/null; printf '%s\n' "$GRID"; } | awk -F'\t' '!seen[$1]++' >"$tmp" && mv "$tmp" "$RUNS/grid.tsv"
  ) 9>"$RUNS/.grid.lock"
fi

# ---- Slurm: one array task per run ----
if [ $SLURM = 1 ]; then
  mkdir -p "$RUNS/slurm"
  stamp=$(date +%Y%m%d-%H%M%S)
  GRID_FILE="$RUNS/slurm/grid-$stamp.tsv"
  printf '%s\n' "$GRID" >"$GRID_FILE"
  script="$RUNS/slurm/sweep-$stamp.sbatch"
  {
    echo "#!/usr/bin/env bash"
    echo "#SBATCH --job-name=$(basename "$CONFIG" .toml)$SUFFIX"
    echo "#SBATCH --array=0-$((N - 1))%$MAXPAR"
    echo "#SBATCH --cpus-per-task=$CPUS"
    echo "#SBATCH --output=$RUNS/slurm/%A_%a.out"
    [ -z "$PARTITION" ] || echo "#SBATCH --partition=$PARTITION"
    [ -z "$TIME" ] || echo "#SBATCH --time=$TIME"
    [ "$GPUS" = 0 ] || echo "#SBATCH --gres=gpu:$GPUS"
    echo "cd $(printf '%q' "$REPO")"
    echo "exec bash scripts/sweep.sh --grid-file $(printf '%q' "$GRID_FILE") --runs-dir $(printf '%q' "$RUNS") --run-index \"\$SLURM_ARRAY_TASK_ID\""
  } >"$script"
  echo "$N runs -> $script (grid $GRID_FILE)"
  if [ $DRY = 1 ]; then exit 0; fi
  if command -v sbatch >/dev/null; then
    sbatch "$script" || die "sbatch $script failed"
  else
    echo "sbatch not found on this machine: submit with 'sbatch $script' where Slurm runs"
  fi
  exit 0
fi

# ---- dry run: the command each run gets now ----
if [ $DRY = 1 ]; then
  while IFS=$'\t' read -r name algo args; do
    cmd=$(run_command "$name" "$algo" "$args")
    if [ -z "$cmd" ]; then echo "# $name: finished (summary.json), skipped"; else echo "$cmd"; fi
  done <<<"$GRID"
  exit 0
fi

# ---- local: -j N at a time; Ctrl-C (or SIGTERM) stops the running runs with a checkpoint ----
echo "$N runs, $JOBS at a time, into $RUNS (logs in $RUNS/logs)"
start=$(date +%s)
SWEEP_START=$start
STATUS_DIR=$(mktemp -d)
trap 'rm -rf "$STATUS_DIR"' EXIT
STOP=0
on_signal() {
  [ $STOP = 0 ] || return   # one stop per run: a second signal would cost the runs their final checkpoint
  STOP=1
  echo "sweep.sh: stopping: the running runs save a checkpoint, no new run starts; the same command resumes them" >&2
  kill -TERM $(jobs -rp) 2>/dev/null
}
trap on_signal INT TERM
names=()
while IFS=$'\t' read -r name algo args; do
  while [ $STOP = 0 ] && [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  [ $STOP = 0 ] || break
  names+=("$name")
  SUPERVISE=1 run_one "$name" "$algo" "$args" </dev/null &
done <<<"$GRID"
while [ -n "$(jobs -rp)" ]; do wait; done
failed=0 busy=0 stopped=0
for name in "${names[@]}"; do
  code=$(cat "$STATUS_DIR/$name" 2>/dev/null || echo "none")
  case "$code" in
    0) ;;
    busy) busy=$((busy + 1)) ;;
    130|143) stopped=$((stopped + 1)) ;;
    none) if [ $STOP = 1 ]; then stopped=$((stopped + 1)); else
            [ $failed = 0 ] && echo "FAILED runs:" >&2
            echo "  $name (no exit status: its supervisor was killed): $RUNS/logs/$name.log" >&2
            failed=$((failed + 1)); fi ;;
    *) [ $failed = 0 ] && echo "FAILED runs:" >&2
       echo "  $name (exit $code): $RUNS/logs/$name.log" >&2
       failed=$((failed + 1)) ;;
  esac
done
summary="$((${#names[@]} - failed - busy - stopped)) of $N runs done"
[ $failed = 0 ] || summary+=", $failed failed"
[ $stopped = 0 ] || summary+=", $stopped stopped with a checkpoint (the same command resumes them)"
[ $busy = 0 ] || summary+=", $busy left to another sweep that is running them"
[ ${#names[@]} = "$N" ] || summary+=", $((N - ${#names[@]})) not started"
echo "sweep finished in $(( $(date +%s) - start )) s: $summary"
[ $STOP = 0 ] || exit 130
[ $failed = 0 ]
