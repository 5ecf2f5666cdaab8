#!/usr/bin/env bash
# A real single-node Slurm on this machine, to test `scripts/sweep.sh --slurm` end to end.
#
#   bash scripts/slurm_local.sh check    # start Slurm, submit a two-run tiny sweep, wait, check both finished, stop
#   bash scripts/slurm_local.sh start    # start the daemons (installs slurm-wlm and munge with apt if missing)
#   bash scripts/slurm_local.sh stop     # stop the daemons this script started
#
# Needs root (it runs apt-get, munged, slurmctld and slurmd). Everything Slurm writes (slurm.conf, state,
# logs, pid files) lives in $SLURM_LOCAL_DIR (default /tmp/mtrl-slurm); clients find the config through
# SLURM_CONF, so /etc/slurm is left alone. Only munge uses its standard paths (/etc/munge, /run/munge).
# Accounting is off, so completion is read from the runs' own summary.json, not from sacct.
# Exit codes: 0 ok, 1 failure, 3 Slurm could not be installed or started here (no root, no apt).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${SLURM_LOCAL_DIR:-/tmp/mtrl-slurm}
export SLURM_CONF="$DIR/slurm.conf"

unavailable() { echo "slurm_local: $*" >&2; exit 3; }

install() {
  command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || unavailable "slurm-wlm/munge are not installed and installing them needs root"
  command -v apt-get >/dev/null || unavailable "slurm-wlm/munge are not installed and there is no apt-get"
  echo "installing slurm-wlm and munge (about two minutes)"
  apt-get update -qq >/dev/null || unavailable "apt-get update failed (no package network?)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null || unavailable "apt-get install slurm-wlm munge failed"
}

STARTED=0
up() { sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

start() {
  install
  if up; then echo "slurm already up: $(sinfo -h -o '%P %D %t %C')"; return 0; fi
  [ "$(id -u)" = 0 ] || unavailable "starting munged/slurmctld/slurmd needs root"
  mkdir -p "$DIR/state" "$DIR/spool"
  # munge: one key, owned by the munge user; (re)start only if no daemon answers
  if ! munge -n </dev/null >/dev/null 2>&1; then
    [ -f /etc/munge/munge.key ] || mungekey -c
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    chown -R munge: /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    runuser -u munge -- munged --force
    for _ in $(seq 20); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.5; done
    cp /run/munge/munged.pid "$DIR/munged.pid" 2>/dev/null || true   # ours: stop it too
  fi
  local host
  host=$(hostname -s)
  cat >"$SLURM_CONF" <<EOF
ClusterName=mtrl-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
AuthType=auth/munge
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  STARTED=1
  for _ in $(seq 60); do
    up && { echo "slurm up: $(sinfo -h -o '%P %D %t %C')"; return 0; }
    sleep 1
  done
  echo "slurm did not come up; logs in $DIR" >&2
  stop
  exit 1
}

stop() {
  for d in slurmd slurmctld munged; do
    if [ -f "$DIR/$d.pid" ]; then
      pid=$(cat "$DIR/$d.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      rm -f "$DIR/$d.pid"
    fi
  done
}

check() {
  start
  if [ $STARTED = 1 ]; then trap stop EXIT; fi   # leave daemons that were already running alone
  local runs="$DIR/runs-$$"
  # two tiny runs: mtl_embed on toy/CartPole-MT10, seeds 1 and 2 (one Slurm array task each)
  bash scripts/sweep.sh --config configs/toy_cartpole_mt10.toml --methods mtl_embed --seeds 1-2 --runs-dir "$runs" \
    --slurm --cpus 1 --time 00:10:00 -- --total-timesteps 10240 --eval-every 10240 --eval-episodes 1
  for _ in $(seq 300); do
    [ -z "$(squeue -h 2>/dev/null)" ] && break
    sleep 2
  done
  local ok=0
  for s in 1 2; do
    if [ -f "$runs/mtl_embed__s$s/summary.json" ]; then echo "finished under Slurm: $runs/mtl_embed__s$s"; else ok=1; echo "NOT finished: $runs/mtl_embed__s$s" >&2; fi
  done
  if [ $ok != 0 ]; then
    echo "--- slurm job output ---" >&2; cat "$runs"/slurm/*.out >&2 2>/dev/null || true
    echo "--- slurmctld.log (tail) ---" >&2; tail -20 "$DIR/slurmctld.log" >&2 || true
  fi
  [ $ok != 0 ] || rm -rf "$runs"
  return $ok
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  check) check ;;
  *) echo "usage: bash scripts/slurm_local.sh start|stop|check" >&2; exit 2 ;;
esac
