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

``--loo pretrain|transfer`` expands the config's ``[loo]`` table instead (leave-one-task-out, protocol.md section 7;
scripts/loo.sh runs both phases; context/loo.md): per held-out task k x method x seed, phase ``pretrain`` is the
pre-training on every task but k (``--train-tasks``, (T-1)/T of the multi-task budget), named
``<label>__loo-<k>__pretrain__s<seed>``, plus the scratch run of k (the single-task oracle run itself,
``<single label>__<k>__s<seed>``); phase ``transfer`` needs phase 1 finished: ``--train-tasks k --init-from <runs
dir>/<pretrain run> --transfer finetune|task-only`` at the oracle's per-task budget and evaluation grid, named
``<label>__loo-<k>__<regime>__s<seed>``. ``[loo]`` format::

    [loo]
    held_out = ["short-pole", "long-pole-right"]   # tasks of the suite, fixed before any run
    methods = ["mtl_embed", "varshare"]            # [methods] labels of multi-task methods
    transfer_budget = 499_712                      # the oracle's per-task budget ([ppo_single] total_timesteps)

    python scripts/sweep_grid.py --config configs/toy_cartpole_mt10.toml --seeds 1-2 -- --eval-episodes 5
    python scripts/sweep_grid.py --config configs/toy_cartpole_targets_mt10.toml --tune --methods varshare
    python scripts/sweep_grid.py --config configs/toy_cartpole_targets_mt10.toml --loo transfer --runs-dir runs/x_loo --held-out short-pole
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


LOO_REGIMES = ("finetune", "task-only")  # phase 2; scratch (the oracle run) is in phase 1, zero-shot is the pre-training's evaluation


def read_loo(config: Path, methods: dict[str, list[str]]) -> dict:
    """The config's ``[loo]`` table, validated, with the budgets: ``{"held_out", "methods", "transfer_budget",
    "pretrain_budget", "single_label", "task_names"}``."""
    from mtrl.envs import make_suite

    data = tomllib.loads(config.read_text())
    table = data.get("loo")
    if not isinstance(table, dict):
        fail(f"{config} has no [loo] table (held_out = [tasks...], methods = [labels...], transfer_budget = steps)")
    unknown = [k for k in table if k not in ("held_out", "methods", "transfer_budget")]
    if unknown:
        fail(f"[loo] {', '.join(unknown)} in {config}: unknown key(s); allowed: held_out, methods, transfer_budget")
    names = make_suite(data.get("env_id", "")).task_names if data.get("env_id") else []
    held_out = table.get("held_out")
    if not isinstance(held_out, list) or not held_out or any(t not in names for t in held_out):
        fail(f"[loo] held_out = {held_out!r} in {config}: a non-empty list of tasks of {data.get('env_id')}; allowed: {', '.join(names)}")
    labels = table.get("methods")
    if not isinstance(labels, list) or not labels:
        fail(f"[loo] methods = {labels!r} in {config}: a non-empty list of [methods] labels")
    def has_slots(spec: list[str]) -> bool:  # a multi-task method whose network has task slots (not the task-blind control)
        return spec[0] != "ppo_single" and "--task-encoding none" not in " ".join(spec)

    bad = [label for label in labels if label not in methods or not has_slots(methods[label])]
    if bad:
        fail(f"[loo] methods: {', '.join(map(repr, bad))} in {config}: not [methods] presets of multi-task methods with task slots; "
             f"allowed: {', '.join(m for m, spec in methods.items() if has_slots(spec))}")
    singles = [m for m, s in methods.items() if s == ["ppo_single"]]
    if not singles:
        fail(f"{config}: the scratch regime is the single-task oracle run; add single = [\"ppo_single\"] to [methods]")
    oracle = data.get("ppo_single", {}).get("total_timesteps")
    budget = table.get("transfer_budget")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0 or (oracle is not None and budget != oracle):
        fail(f"[loo] transfer_budget = {budget!r} in {config}: the oracle's per-task budget, a positive whole number equal to "
             f"[ppo_single] total_timesteps ({oracle}), so that transfer and scratch get the same steps")
    total = data.get("total_timesteps")
    if not isinstance(total, int):
        fail(f"{config}: the LOO pre-training budget is (T-1)/T of the top-level total_timesteps, which is missing")
    # transfer runs are evaluated and checkpointed as the oracle runs are ([ppo_single], else the top level), so that
    # transfer and scratch curves share their steps
    single, grid = data.get("ppo_single", {}), []
    for key in ("eval_every", "checkpoint_every"):
        value = single.get(key, data.get(key))
        grid += [] if value is None else [f"--{key.replace('_', '-')}", str(value)]
    return {"held_out": held_out, "methods": labels, "transfer_budget": budget, "pretrain_budget": total * (len(names) - 1) // len(names),
            "single_label": singles[0], "task_names": names, "oracle_grid": grid}


def build_loo_grid(config: Path, phase: str, labels: list[str] | None, seeds: list[int] | None, total_timesteps: int | None,
                   extra: list[str], held_out: list[str] | None, runs_dir: str | None) -> list[tuple[str, str, list[str]]]:
    """The LOO runs of one phase, seed-major then held-out task (see the module docstring). ``total_timesteps`` (the
    multi-task budget) overrides the config's: pre-training gets N (T-1) / T, transfer and scratch N / T."""
    methods = read_methods(config)
    loo = read_loo(config, methods)
    seeds = seeds or [1, 2, 3, 4, 5]
    high = [s for s in seeds if s >= TUNING_SEED_MIN]
    if high:
        fail(f"--seeds {', '.join(map(str, high))}: seeds >= {TUNING_SEED_MIN} are tuning seeds, never reported")
    labels = labels or loo["methods"]
    unknown = [m for m in labels if m not in loo["methods"]]
    if unknown:
        fail(f"--methods {' '.join(unknown)}: not in the [loo] methods of {config}; allowed: {', '.join(loo['methods'])}")
    held_out = held_out or loo["held_out"]
    unknown = [t for t in held_out if t not in loo["held_out"]]
    if unknown:
        fail(f"--held-out {' '.join(unknown)}: not among the [loo] held_out tasks of {config} (fixed before any run); allowed: {', '.join(loo['held_out'])}")
    num_tasks = len(loo["task_names"])
    pretrain = loo["pretrain_budget"] if total_timesteps is None else total_timesteps * (num_tasks - 1) // num_tasks
    transfer = loo["transfer_budget"] if total_timesteps is None else total_timesteps // num_tasks
    if phase == "transfer" and not runs_dir:
        fail("--loo transfer needs --runs-dir (the pre-training runs that --init-from names)")
    grid = []
    for seed in seeds:
        for task in held_out:
            common = ["--config", str(config)]
            if phase == "pretrain":
                others = [t for t in loo["task_names"] if t != task]
                for label in labels:
                    algo, *flags = methods[label]
                    grid.append((f"{label}__loo-{task}__pretrain__s{seed}", algo, [*common, *flags, "--seed", str(seed), "--train-tasks", *others,
                                                                                "--total-timesteps", str(pretrain), *extra]))
                grid.append((f"{loo['single_label']}__{task}__s{seed}", "ppo_single",
                             [*common, "--seed", str(seed), "--task", task, "--total-timesteps", str(transfer), *extra]))
                continue
            for label in labels:
                algo, *flags = methods[label]
                source = str(Path(runs_dir) / f"{label}__loo-{task}__pretrain__s{seed}")
                for regime in LOO_REGIMES:
                    grid.append((f"{label}__loo-{task}__{regime}__s{seed}", algo, [*common, *flags, "--seed", str(seed), "--train-tasks", task, "--init-from",
                                                                                 source, "--transfer", regime, "--total-timesteps", str(transfer), *loo["oracle_grid"], *extra]))
    return grid


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
    p.add_argument("--loo", choices=["pretrain", "transfer"], default=None,
                   help="the [loo] table's leave-one-task-out runs: phase 1 (pre-training and scratch) or phase 2 (finetune, task-only)")
    p.add_argument("--held-out", nargs="+", default=None, help="with --loo: these of the [loo] held_out tasks (default: all)")
    p.add_argument("--runs-dir", default=None, help="the sweep's runs dir (with --loo transfer: where the pre-training runs are)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if not a.config.is_file():
        fail(f"--config {a.config}: no such file")
    if a.total_timesteps is not None and a.total_timesteps <= 0:
        fail(f"--total-timesteps {a.total_timesteps}: must be a positive number of environment steps")
    methods = [m for item in a.methods for m in item.replace(",", " ").split()] if a.methods else None
    seeds = parse_seeds(a.seeds) if a.seeds else None
    if a.loo and a.tune:
        fail("--loo and --tune are separate studies; give one of them")
    held_out = [t for item in a.held_out for t in item.replace(",", " ").split()] if a.held_out else None
    if held_out and not a.loo:
        fail("--held-out goes with --loo")
    grid = (build_loo_grid(a.config, a.loo, methods, seeds, a.total_timesteps, extra, held_out, a.runs_dir) if a.loo
            else build_grid(a.config, methods, seeds, a.total_timesteps, extra, tune=a.tune))
    for name, algo, args in grid:
        print(f"{name}\t{algo}\t{shlex.join(args)}")


if __name__ == "__main__":
    main()
