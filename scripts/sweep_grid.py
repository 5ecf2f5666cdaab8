"""The run grid of a sweep: methods x seeds (x tasks for the single-task oracle) of one benchmark config.

Used by ``scripts/sweep.sh``; prints one line per run, tab-separated: the run name, the algorithm, and
the run's flags (shell-quoted). The config's ``[methods]`` table names the method variants, each
``label = [algo, extra flags...]``. ``ppo_single`` on a suite expands to one run per task (the
single-task oracle). Run names are fixed, ``<label>__s<seed>`` (``<label>__<task>__s<seed>`` for the
oracle), so a sweep launched again finds its runs. ``--total-timesteps N`` sets the multi-task budget;
each oracle run then gets ``N // num_tasks`` (its share of the same total), so one flag scales a grid.

    python scripts/sweep_grid.py --config configs/toy_cartpole_mt10.toml --seeds 1-2 -- --eval-episodes 5
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mtrl.capacity import ALGOS  # noqa: E402


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_seeds(items: list[str]) -> list[int]:
    """``["1-3", "7"]`` or ``["1,2"]`` -> [1, 2, 3, 7]."""
    seeds = []
    for item in (s for it in items for s in it.replace(",", " ").split()):
        try:
            if "-" in item.strip("-"):
                a, b = item.split("-", 1)
                if int(b) < int(a):
                    raise ValueError
                seeds += list(range(int(a), int(b) + 1))
            else:
                seeds.append(int(item))
        except ValueError:
            fail(f"--seeds {item!r}: allowed are integers and ranges like 1-5 (low <= high)")
    if not seeds:
        fail("--seeds: give at least one seed")
    return seeds


def read_methods(config: Path) -> dict[str, list[str]]:
    methods = tomllib.loads(config.read_text()).get("methods")
    if not methods:
        fail(f"{config} has no [methods] table (label = [algo, flags...])")
    for label, spec in methods.items():
        if not isinstance(spec, list) or not spec or spec[0] not in ALGOS:
            fail(f"[methods] {label} = {spec!r} in {config}: the first item must be one of {', '.join(ALGOS)}")
    return methods


def build_grid(config: Path, labels: list[str] | None, seeds: list[int], total_timesteps: int | None, extra: list[str]) -> list[tuple[str, str, list[str]]]:
    from mtrl.envs import make_suite

    methods = read_methods(config)
    labels = labels or list(methods)
    unknown = [m for m in labels if m not in methods]
    if unknown:
        fail(f"--methods {' '.join(unknown)}: not in the [methods] table of {config}; allowed: {', '.join(methods)}")
    env_id = tomllib.loads(config.read_text()).get("env_id")
    suite = make_suite(env_id) if env_id else None
    grid = []
    for seed in seeds:  # seed-major: a partial grid already compares every method
        for label in labels:
            algo, *flags = methods[label]
            oracle = algo == "ppo_single" and suite is not None and suite.num_tasks > 1
            budget = [] if total_timesteps is None else ["--total-timesteps", str(total_timesteps // suite.num_tasks if oracle else total_timesteps)]
            for task in suite.task_names if oracle else [None]:
                name = f"{label}__{task}__s{seed}" if task else f"{label}__s{seed}"
                grid.append((name, algo, ["--config", str(config), *flags, "--seed", str(seed), *(["--task", task] if task else []), *budget, *extra]))
    return grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="benchmark config with a [methods] table")
    p.add_argument("--methods", nargs="+", default=None, help="labels of the config's [methods] table (default: all)")
    p.add_argument("--seeds", nargs="+", default=["1-5"], help="seeds, e.g. 1 2 3 or 1-10 (default 1-5)")
    p.add_argument("--total-timesteps", type=int, default=None, help="multi-task budget; oracle runs get budget // num_tasks")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if not a.config.is_file():
        fail(f"--config {a.config}: no such file")
    if a.total_timesteps is not None and a.total_timesteps <= 0:
        fail(f"--total-timesteps {a.total_timesteps}: must be a positive number of environment steps")
    methods = [m for item in a.methods for m in item.replace(",", " ").split()] if a.methods else None
    for name, algo, args in build_grid(a.config, methods, parse_seeds(a.seeds), a.total_timesteps, extra):
        print(f"{name}\t{algo}\t{shlex.join(args)}")


if __name__ == "__main__":
    main()
