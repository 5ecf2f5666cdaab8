"""Launch a grid of runs (methods x seeds) of one benchmark config, on this machine or on Slurm.

The config's ``[methods]`` table names the method variants, each ``label = [algo, extra flags...]``
(widths that match capacity live there or in the algorithm's own table). ``ppo_single`` on a suite
expands to one run per task (the single-task oracle). Every run gets a fixed name
``<label>__s<seed>`` (``<label>__<task>__s<seed>`` for the oracle) under ``--runs-dir``, so launching
the same grid again skips finished runs (``summary.json`` present) and resumes interrupted ones from
their checkpoint; a run folder without a checkpoint is moved aside to ``<name>.incomplete-<time>``
(never deleted) and started again.

    python scripts/launch.py --config configs/toy_cartpole_mt10.toml --seeds 1-5 --workers 2
    python scripts/launch.py --config configs/metaworld_mt10.toml --methods varshare mtl_embed --seeds 1-10 --slurm
    python scripts/launch.py --config configs/toy_cartpole_mt10.toml --dry-run -- --total-timesteps 100000

Flags after ``--`` are passed to every run. With ``--slurm`` the grid becomes one job array
(``<runs-dir>/slurm/grid.sbatch``, one array task per run, ``--slurm-max-parallel`` at a time); each task
calls this script back with ``--run-job <i>`` so the skip/resume decision is made when it starts,
which also makes requeued tasks resume.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mtrl.capacity import ALGOS  # noqa: E402


def parse_seeds(items: list[str]) -> list[int]:
    seeds = []
    for item in items:
        if "-" in item.strip("-"):
            a, b = item.split("-", 1)
            seeds += list(range(int(a), int(b) + 1))
        else:
            seeds.append(int(item))
    return seeds


def read_methods(config: Path) -> dict[str, list[str]]:
    data = tomllib.loads(config.read_text())
    methods = data.get("methods")
    if not methods:
        raise SystemExit(f"error: {config} has no [methods] table (label = [algo, flags...])")
    for label, spec in methods.items():
        if not isinstance(spec, list) or not spec or spec[0] not in ALGOS:
            raise SystemExit(f"error: [methods] {label} = {spec!r} in {config}: the first item must be one of {', '.join(ALGOS)}")
    return methods


def build_jobs(config: Path, labels: list[str], seeds: list[int], extra: list[str]) -> list[dict]:
    from mtrl.envs import make_suite

    methods = read_methods(config)
    unknown = [m for m in labels if m not in methods]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)} for {config}; allowed: {', '.join(methods)}")
    env_id = tomllib.loads(config.read_text()).get("env_id")
    jobs = []
    for seed in seeds:  # seed-major: a partial grid already compares every method
        for label in labels:
            algo, *flags = methods[label]
            tasks = [None]
            if algo == "ppo_single" and env_id and make_suite(env_id).num_tasks > 1:
                tasks = make_suite(env_id).task_names
            for task in tasks:
                name = f"{label}__{task}__s{seed}" if task else f"{label}__s{seed}"
                args = ["--config", str(config), *flags, "--seed", str(seed), *(["--task", task] if task else []), *extra]
                jobs.append({"name": name, "algo": algo, "args": args})
    return jobs


def job_command(job: dict, runs_dir: Path) -> list[str] | None:
    """The command that brings one run to completion now: None if finished, ``--resume`` if it has a
    checkpoint, a fresh run otherwise (an unfinished folder without a checkpoint is moved aside)."""
    run_dir = runs_dir / job["name"]
    script = [sys.executable, str(REPO / "src" / "algos" / f"{job['algo']}.py")]
    if (run_dir / "summary.json").is_file():
        return None
    if (run_dir / "checkpoints" / "latest.pt").is_file():
        return [*script, "--resume", str(run_dir), "--no-progress"]
    if run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{int(time.time())}"))
    return [*script, *job["args"], "--runs-dir", str(runs_dir), "--run-name", job["name"], "--no-progress"]


def run_job(job: dict, runs_dir: Path) -> int:
    cmd = job_command(job, runs_dir)
    if cmd is None:
        print(f"[done]    {job['name']}", flush=True)
        return 0
    log = runs_dir / "logs" / f"{job['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"[{'ok' if code == 0 else f'exit {code}':7}] {job['name']} ({time.time() - t:.0f} s, log {log})", flush=True)
    return code


SBATCH = """#!/usr/bin/env bash
#SBATCH --job-name={name}
#SBATCH --array=0-{last}%{parallel}
#SBATCH --cpus-per-task={cpus}
#SBATCH --output={out}/%A_%a.out
{extra}
cd {repo}
exec {python} scripts/launch.py --jobs-file {jobs} --run-job "$SLURM_ARRAY_TASK_ID"
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="benchmark config with a [methods] table")
    p.add_argument("--methods", nargs="+", default=None, help="labels of the config's [methods] table (default: all)")
    p.add_argument("--seeds", nargs="+", default=["1-5"], help="seeds, e.g. 1 2 3 or 1-10 (default 1-5)")
    p.add_argument("--runs-dir", type=Path, default=None, help="default: runs/<config name>")
    p.add_argument("--workers", type=int, default=1, help="runs at a time on this machine (each uses one core)")
    p.add_argument("--slurm", action="store_true", help="submit one Slurm job array instead of running here")
    p.add_argument("--slurm-max-parallel", type=int, default=32, help="array tasks running at once")
    p.add_argument("--slurm-cpus", type=int, default=2, help="--cpus-per-task of every array task")
    p.add_argument("--slurm-directive", action="append", default=[], help="extra #SBATCH line, e.g. --slurm-directive='--gres=gpu:1'")
    p.add_argument("--dry-run", action="store_true", help="print the commands (or write the sbatch file) and stop")
    p.add_argument("--jobs-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-job", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    if a.run_job is not None:  # one Slurm array task
        spec = json.loads(a.jobs_file.read_text())
        raise SystemExit(run_job(spec["jobs"][a.run_job], Path(spec["runs_dir"])))

    if a.config is None or not a.config.is_file():
        raise SystemExit(f"error: --config {a.config}: no such file")
    if a.workers < 1:
        raise SystemExit(f"error: --workers must be >= 1, got {a.workers}")
    labels = a.methods or list(read_methods(a.config))
    jobs = build_jobs(a.config, labels, parse_seeds(a.seeds), extra)
    runs_dir = (a.runs_dir or Path("runs") / a.config.stem).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)

    if a.slurm:
        out = runs_dir / "slurm"
        out.mkdir(exist_ok=True)
        jobs_file = out / f"jobs-{int(time.time())}.json"
        jobs_file.write_text(json.dumps({"runs_dir": str(runs_dir), "jobs": jobs}, indent=1))
        script = out / "grid.sbatch"
        script.write_text(SBATCH.format(name=a.config.stem, last=len(jobs) - 1, parallel=a.slurm_max_parallel, cpus=a.slurm_cpus, out=out,
                                        extra="\n".join(f"#SBATCH {d}" for d in a.slurm_directive), repo=REPO, python=sys.executable,
                                        jobs=jobs_file))
        print(f"{len(jobs)} runs -> {script}")
        if not a.dry_run:
            subprocess.run(["sbatch", str(script)], check=True)
        return
    if a.dry_run:
        for job in jobs:
            cmd = job_command(job, runs_dir) if not (runs_dir / job["name"]).exists() else None
            print(shlex.join(cmd) if cmd else f"# {job['name']}: exists (finished, or resumed when launched)")
        return
    print(f"{len(jobs)} runs, {a.workers} at a time, into {runs_dir}", flush=True)
    with ThreadPoolExecutor(a.workers) as pool:
        codes = list(pool.map(lambda j: run_job(j, runs_dir), jobs))
    failed = [j["name"] for j, c in zip(jobs, codes) if c != 0]
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (logs in {runs_dir / 'logs'})")


if __name__ == "__main__":
    main()
