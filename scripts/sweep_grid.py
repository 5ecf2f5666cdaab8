"""The run grid of a sweep: methods x seeds (x tasks for the single-task oracle) of one benchmark config.

Used by ``scripts/sweep.sh``; prints one line per run, tab-separated: the run name, the algorithm, and
the run's flags (shell-quoted). The config's ``[methods]`` table names the method variants, each
``label = [algo, extra flags...]``. ``ppo_single`` on a suite expands to one run per task (the
single-task oracle). Run names are fixed, ``<label>__s<seed>`` (``<label>__<task>__s<seed>`` for the
oracle), so a sweep launched again finds its runs. ``--total-timesteps N`` sets the multi-task budget;
each oracle run then gets ``N // num_tasks`` (its share of the same total), so one flag scales a grid.

Seeds 1-100 are report seeds, seeds >= 101 tuning seeds (protocol: tuning seeds only choose
hyperparameters). ``--tune`` expands the config's ``[tuning]`` table instead: methods x configurations x
tuning seeds, each run the preset's flags followed by the configuration's, named
``<label>@<configuration>__s<seed>``; the seeds (default) and the budget (default, if the table states
one) come from the table. ``[tuning]`` format (every tuned method the same number of configurations)::

    [tuning]
    seeds = "101-103"               # tuning seeds, all >= 101
    total_timesteps = 2_498_560     # optional: the tuning budget of every method (default: the config's)
    [tuning.varshare]               # a [methods] label; configuration name = flags appended to the preset's
    "c0.1_b1" = ["--prior-scale", "0.1", "--kl-coef", "1"]

    python scripts/sweep_grid.py --config configs/toy_cartpole_mt10.toml --seeds 1-2 -- --eval-episodes 5
    python scripts/sweep_grid.py --config configs/toy_cartpole_targets_mt10.toml --tune --methods varshare
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mtrl.capacity import ALGOS  # noqa: E402


TUNING_SEED_MIN = 101  # seeds 1-100 are report seeds, >= 101 tuning seeds
CONFIG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+=-]*(_[A-Za-z0-9.+=-]+)*$")  # no "__", "@", "/" or spaces


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


def read_tuning(config: Path, methods: dict[str, list[str]] | None = None) -> dict:
    """The config's ``[tuning]`` table, validated: ``{"seeds": [...], "total_timesteps": int | None,
    "methods": {label: {configuration: [flags...]}}}`` (labels and configurations in the file's order)."""
    table = tomllib.loads(config.read_text()).get("tuning")
    methods = read_methods(config) if methods is None else methods
    if not isinstance(table, dict):
        fail(f"{config} has no [tuning] table (seeds = \"101-103\", then [tuning.<label>] tables: configuration = [flags...])")
    unknown = [k for k, v in table.items() if not isinstance(v, dict) and k not in ("seeds", "total_timesteps")]
    if unknown:
        fail(f"[tuning] {', '.join(unknown)} in {config}: unknown key(s); allowed: seeds, total_timesteps and [tuning.<label>] tables")
    if "seeds" not in table:
        fail(f"[tuning] in {config} needs seeds (e.g. seeds = \"101-103\"; tuning seeds are >= {TUNING_SEED_MIN})")
    raw = table["seeds"]
    seeds = parse_seeds([" ".join(map(str, raw)) if isinstance(raw, list) else str(raw)])
    check_tuning_seeds(seeds, f"[tuning] seeds in {config}")
    budget = table.get("total_timesteps")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0):
        fail(f"[tuning] total_timesteps = {budget!r} in {config}: must be a positive whole number of environment steps")
    grids = {k: v for k, v in table.items() if isinstance(v, dict)}
    if not grids:
        fail(f"[tuning] in {config} has no [tuning.<label>] table: nothing to tune")
    for label, configs in grids.items():
        if label not in methods:
            fail(f"[tuning.{label}] in {config}: {label!r} is not in the [methods] table; allowed: {', '.join(methods)}")
        if "@" in label:
            fail(f"[tuning.{label}] in {config}: a tuned label cannot hold '@' (run names are <label>@<configuration>__s<seed>)")
        if not configs:
            fail(f"[tuning.{label}] in {config} has no configuration")
        for name, flags in configs.items():
            if not CONFIG_NAME.match(name):
                fail(f"[tuning.{label}] {name!r} in {config}: a configuration name is letters, digits and . + = - with single "
                     "underscores between them (it is part of the run names: no '__', '@', '/' or spaces)")
            if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
                fail(f"[tuning.{label}] {name} = {flags!r} in {config}: the flags must be a list of strings (quote numbers too)")
    sizes = {label: len(c) for label, c in grids.items()}
    if len(set(sizes.values())) > 1:
        fail(f"[tuning] in {config}: every tuned method needs the same number of configurations; "
             + ", ".join(f"{label} has {n}" for label, n in sizes.items()))
    return {"seeds": seeds, "total_timesteps": budget, "methods": grids}


def check_tuning_seeds(seeds: list[int], what: str) -> None:
    low = [s for s in seeds if s < TUNING_SEED_MIN]
    if low:
        fail(f"{what}: seed(s) {', '.join(map(str, low))} are report seeds; tuning seeds are >= {TUNING_SEED_MIN}, "
             f"disjoint from the report seeds 1-{TUNING_SEED_MIN - 1}")


def build_grid(config: Path, labels: list[str] | None, seeds: list[int] | None, total_timesteps: int | None, extra: list[str],
               tune: bool = False) -> list[tuple[str, str, list[str]]]:
    """The runs, seed-major. ``tune``: the ``[tuning]`` table's methods x configurations (``labels``: which
    tuned methods; ``seeds`` and ``total_timesteps`` default to the table's)."""
    from mtrl.envs import make_suite

    methods = read_methods(config)
    if tune:
        tuning = read_tuning(config, methods)
        labels = labels or list(tuning["methods"])
        untuned = [m for m in labels if m in methods and m not in tuning["methods"]]
        if untuned:
            fail(f"--methods {' '.join(untuned)}: no [tuning.<label>] table in {config}; tuned: {', '.join(tuning['methods'])}")
        seeds = seeds or tuning["seeds"]
        check_tuning_seeds(seeds, "--seeds with --tune")
        total_timesteps = total_timesteps or tuning["total_timesteps"]
    else:
        seeds = seeds or [1, 2, 3, 4, 5]
        high = [s for s in seeds if s >= TUNING_SEED_MIN]
        if high:
            fail(f"--seeds {', '.join(map(str, high))}: seeds >= {TUNING_SEED_MIN} are tuning seeds, never reported; "
                 "use --tune (the config's [tuning] table) into a tuning runs dir, or report seeds 1-100")
    labels = labels or list(methods)
    unknown = [m for m in labels if m not in methods]
    if unknown:
        fail(f"--methods {' '.join(unknown)}: not in the [methods] table of {config}; allowed: {', '.join(methods)}")
    if tune:  # each configuration is a method of its own: the preset's flags, then the configuration's
        methods = {f"{label}@{name}": [*methods[label], *flags] for label in labels for name, flags in tuning["methods"][label].items()}
        labels = list(methods)
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
    p.add_argument("--seeds", nargs="+", default=None, help="seeds, e.g. 1 2 3 or 1-10 (default 1-5; --tune: the [tuning] table's)")
    p.add_argument("--total-timesteps", type=int, default=None, help="multi-task budget; oracle runs get budget // num_tasks")
    p.add_argument("--tune", action="store_true", help="the [tuning] table's methods x configurations x tuning seeds")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if not a.config.is_file():
        fail(f"--config {a.config}: no such file")
    if a.total_timesteps is not None and a.total_timesteps <= 0:
        fail(f"--total-timesteps {a.total_timesteps}: must be a positive number of environment steps")
    methods = [m for item in a.methods for m in item.replace(",", " ").split()] if a.methods else None
    seeds = parse_seeds(a.seeds) if a.seeds else None
    for name, algo, args in build_grid(a.config, methods, seeds, a.total_timesteps, extra, tune=a.tune):
        print(f"{name}\t{algo}\t{shlex.join(args)}")


if __name__ == "__main__":
    main()
