"""The run contract (protocol.md section 5), written once for every algorithm file.

- :func:`parse_args`: tyro + ``--config file.toml`` (file values are defaults, flags override, unknown
  keys are an error) + ``--resume <run dir>`` (the saved config is reloaded) + validation, all before
  any work starts.
- :class:`Run`: the run directory (never overwritten), ``config.json``, TensorBoard (and W&B with
  ``--track``), ``eval.jsonl``, ``summary.json``, atomic checkpoints, SIGTERM/SIGINT handling, progress.
- :func:`check_loo` and :class:`LeaveOneOut`: the leave-one-task-out options of the multi-task scripts
  (``--train-tasks``, ``--init-from``, ``--transfer``; protocol.md section 7, context/loo.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import tomllib
import typing
from collections import deque
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import tyro

from mtrl.envs import make_suite, make_vector_env

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_NAME = "checkpoints/latest.pt"
# arguments that may differ between a run and its ``--resume`` (they do not change results)
RESUME_MAY_CHANGE = {"resume", "progress", "cuda", "track", "config", "torch_threads", "vector_mode"}


class ArgError(ValueError):
    """Bad user input; reported as ``error: ...`` with exit code 2 before any work starts."""


def fail(msg: str, code: int = 2) -> typing.NoReturn:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag:
            if i + 1 >= len(argv):
                fail(f"{flag} needs a value")
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _coerce(args_cls, values: dict) -> dict:
    hints = typing.get_type_hints(args_cls)
    return {k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]).lower() else v for k, v in values.items()}


def load_config(path: str, args_cls, algo: str) -> dict:
    """Top-level keys of the TOML file apply to every algorithm; a table named after the algorithm
    (``[ppo_varshare]``) holds its own values; tables of other algorithms and the sweep's
    ``[methods]``, ``[tuning]``, ``[loo]`` and ``[ablation]`` tables are skipped; any other table is an error (a misspelt algorithm name)."""
    p = Path(path)
    if not p.is_file():
        raise ArgError(f"--config {path!r}: no such file")
    with p.open("rb") as f:
        data = tomllib.load(f)
    from mtrl.capacity import ALGOS

    fields = {f.name for f in dataclasses.fields(args_cls)}
    tables = [k for k, v in data.items() if isinstance(v, dict) and k not in (*ALGOS, "methods", "tuning", "loo", "ablation")]
    if tables:
        raise ArgError(f"unknown table(s) {', '.join(tables)} in config {path!r}; allowed: {', '.join(ALGOS)}, methods (sweep presets), "
                       "tuning (tuning grids), loo (leave-one-task-out study), ablation (report groups)")
    values = {}
    for scope, table in [("top level", {k: v for k, v in data.items() if not isinstance(v, dict)}), (f"[{algo}]", data.get(algo, {}))]:
        for k, v in table.items():
            key = k.replace("-", "_")
            if key not in fields:
                raise ArgError(
                    f"unknown key {k!r} ({scope}) in config {path!r} for {algo}; allowed keys: {', '.join(sorted(fields))}"
                )
            values[key] = v
    return _coerce(args_cls, values)


def parse_args(args_cls, algo: str, validate=None, argv: list[str] | None = None):
    """Parse the command line into ``args_cls``. ``validate(args)`` (algorithm specific) raises
    :class:`ArgError`; any bad input exits with code 2 and a message before anything is created."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        default = args_cls()
        resume = _flag_value(argv, "--resume")
        config = _flag_value(argv, "--config")
        saved = None
        if resume is not None:
            cfg = Path(resume) / "config.json"
            if not cfg.is_file():
                raise ArgError(f"--resume {resume!r}: not a run directory (no config.json there)")
            saved = json.loads(cfg.read_text())
            if saved.get("algo") != algo:
                raise ArgError(f"--resume {resume!r} is a {saved.get('algo')} run, not {algo}")
            default = dataclasses.replace(default, **_coerce(args_cls, saved["args"]))
        elif config is not None:
            default = dataclasses.replace(default, **load_config(config, args_cls, algo))
        args = tyro.cli(args_cls, default=default, args=argv)
        if saved is not None:
            saved_args = {**jsonable(dataclasses.asdict(args_cls())), **saved["args"]}  # an option newer than the run: its default
            changed = [k for k, v in dataclasses.asdict(args).items() if k not in RESUME_MAY_CHANGE and json.loads(json.dumps(jsonable(v))) != saved_args.get(k)]
            if changed:
                raise ArgError(f"--resume continues a run with its saved arguments; cannot change {', '.join(changed)}")
            if not (Path(resume) / CHECKPOINT_NAME).is_file():
                raise ArgError(f"--resume {resume!r}: no checkpoint at {CHECKPOINT_NAME}")
        try:
            check_common(args)
            if validate is not None:
                validate(args)
            if hasattr(args, "train_tasks"):  # the multi-task scripts' LOO options (protocol.md section 7)
                check_loo(args, algo, resuming=saved is not None)
        except ValueError as e:  # e.g. an unknown env id or task from make_suite
            raise ArgError(str(e)) from None
        if saved is None:
            run_dir = Path(args.runs_dir) / (args.run_name or "")
            if args.run_name and run_dir.exists():
                raise ArgError(f"run directory {str(run_dir)!r} already exists; runs are never overwritten (choose another --run-name or --resume it)")
    except ArgError as e:
        fail(str(e))
    return args


def check_common(args) -> None:
    positive = ["total_timesteps", "learning_rate", "num_steps", "envs_per_task", "num_minibatches", "update_epochs", "eval_episodes"]
    for name in positive:
        if hasattr(args, name) and not getattr(args, name) > 0:
            raise ArgError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.num_steps % args.num_minibatches != 0:
        raise ArgError(
            f"--num-minibatches {args.num_minibatches} must divide --num-steps {args.num_steps} "
            "(minibatches are env-stratified: every minibatch holds num_steps/num_minibatches time steps of every env)"
        )
    for name in ["eval_every", "checkpoint_every"]:
        if getattr(args, name) < 0:
            raise ArgError(f"--{name.replace('_', '-')} must be >= 0 (0 disables), got {getattr(args, name)}")
    for name in ["gamma", "gae_lambda"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ArgError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")


# ----------------------------------------------------------------------------------------------
# set-up helpers
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


def pick_device(cuda: bool) -> torch.device:
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(d: dict) -> None:
    random.setstate(d["python"])
    np.random.set_state(d["numpy"])
    torch.set_rng_state(d["torch"])


def _git_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": commit or "unknown", "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def _cpu_model() -> str:
    """The CPU's model name (seeds of one study may come from different CPU types, which give different numbers)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _versions() -> dict:
    out = {"python": platform.python_version(), "cpu": _cpu_model()}
    for pkg in ["torch", "numpy", "gymnasium", "metaworld", "mujoco", "tyro", "tensorboard"]:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def state_fingerprint(tree) -> str:
    """A hash of every number in a nested checkpoint structure (tensors, arrays, scalars)."""
    h = hashlib.sha256()

    def visit(x, path):
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                visit(x[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                visit(v, f"{path}/{i}")
        elif isinstance(x, torch.Tensor):
            h.update(path.encode())
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(x, (np.ndarray, np.generic)):
            h.update(path.encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, (int, float, bool, str)) or x is None:
            h.update(f"{path}={x!r}".encode())

    visit(tree, "")
    return h.hexdigest()[:16]


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file (a run's ``eval.jsonl``), in order. Reports, benchmark scripts and
    tests read runs back with this and ``read_scalars``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """All TensorBoard scalars of a run directory: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ----------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------
class Progress:
    """One status line: rewritten in place on a terminal (at most 4 times a second), and one plain
    line every ``interval`` seconds otherwise, so log files stay short."""

    def __init__(self, total: int, enabled: bool, interval: float = 30.0):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.interval = 0.25 if self.tty else interval
        self.last = 0.0

    def update(self, step: int, sps: float, extra="", force: bool = False) -> None:
        """``extra``: a string, or a callable returning one (called only when a line is printed: this runs
        every environment step)."""
        now = time.time()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        extra = extra() if callable(extra) else extra
        line = f"{step:>10,}/{self.total:,} steps ({100 * step / self.total:5.1f}%) | {sps:7.0f} SPS | {extra}"
        if self.tty:
            print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


class RecentEpisodes:
    """Recent finished episodes per task, for logging and the progress line."""

    def __init__(self, task_names: list[str], maxlen: int = 20):
        self.task_names = task_names
        self.ret = [deque(maxlen=maxlen) for _ in task_names]
        self.success = [deque(maxlen=maxlen) for _ in task_names]
        self.new: list[tuple[int, float, int, bool]] = []

    def add(self, finished) -> None:
        for task, ret, length, success, *_ in finished:
            self.ret[task].append(ret)
            self.success[task].append(float(success))
        self.new.extend(finished)

    def scalars(self) -> dict:
        """Scalars of the episodes finished since the last call (empty if none)."""
        new, self.new = self.new, []
        if not new:
            return {}
        out = {
            "charts/episodic_return": float(np.mean([e[1] for e in new])),
            "charts/episodic_length": float(np.mean([e[2] for e in new])),
            "charts/success_rate": float(np.mean([e[3] for e in new])),
        }
        if len(self.task_names) > 1:
            for t, name in enumerate(self.task_names):
                mine = [e for e in new if e[0] == t]
                if mine:
                    out[f"charts/episodic_return/{name}"] = float(np.mean([e[1] for e in mine]))
                    out[f"charts/success_rate/{name}"] = float(np.mean([e[3] for e in mine]))
        return out

    def summary_line(self) -> str:
        rets = [r for d in self.ret for r in d]
        succ = [s for d in self.success for s in d]
        if not rets:
            return "no episode finished yet"
        return f"return {np.mean(rets):8.1f} | success {np.mean(succ):4.2f}"


# ----------------------------------------------------------------------------------------------
# the run directory
# ----------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args, algo: str, task_names: list[str], derived: dict):
        self.args, self.algo, self.task_names = args, algo, task_names
        self.start_time = time.time()
        self.stop_signal: int | None = None
        if args.resume:
            self.dir = Path(args.resume)
            self.name = self.dir.name
        else:
            env_part = args.env_id.replace("/", "-") + (f"-{args.task}" if getattr(args, "task", None) else "")
            self.name = args.run_name or f"{env_part}__{algo}__{args.seed}__{int(time.time())}"
            self.dir = Path(args.runs_dir) / self.name
            try:
                self.dir.mkdir(parents=True, exist_ok=False)
            except FileExistsError:
                fail(f"run directory {str(self.dir)!r} already exists; runs are never overwritten")
            (self.dir / "checkpoints").mkdir()
            config = {
                "algo": algo,
                "run_name": self.name,
                "args": jsonable(dataclasses.asdict(args)),
                "derived": jsonable(derived),
                "task_names": task_names,
                "git": _git_info(),
                "versions": _versions(),
                "command": sys.argv,
                "start_time": self.start_time,
            }
            (self.dir / "config.json").write_text(json.dumps(config, indent=2))
        self.writer = None
        self.wandb = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # second signal: stop at once
            raise KeyboardInterrupt
        self.stop_signal = signum
        print(f"\nreceived signal {signum}: saving a checkpoint and stopping", file=sys.stderr, flush=True)

    # ---- logging ----
    def open_logs(self, global_step: int) -> None:
        """Open TensorBoard (and W&B). On resume, events after ``global_step`` are purged from the
        view and ``eval.jsonl`` lines after it are dropped, so the logs continue the checkpoint."""
        if self.args.track:
            import wandb

            self.wandb = wandb.init(
                project=self.args.wandb_project_name,
                entity=self.args.wandb_entity,
                sync_tensorboard=True,
                config=dataclasses.asdict(self.args),
                name=self.name,
                id=self.name.replace("/", "-")[:128],
                resume="allow",
                dir=str(self.dir),
                save_code=True,
            )
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.dir), purge_step=global_step + 1 if self.args.resume else None)
        ev = self.dir / "eval.jsonl"
        if self.args.resume and ev.exists():
            keep = [line for line in ev.read_text().splitlines() if line and json.loads(line)["global_step"] <= global_step]
            ev.write_text("".join(line + "\n" for line in keep))

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def log_eval(self, global_step: int, results: dict, prefix: str = "eval", extra: dict | None = None) -> dict:
        """``results``: task name -> {"success": float, "return": float}. Writes TensorBoard scalars and
        (for the primary ``eval`` prefix) one ``eval.jsonl`` line. Returns the line's record."""
        success = float(np.mean([r["success"] for r in results.values()]))
        ret = float(np.mean([r["return"] for r in results.values()]))
        self.writer.add_scalar(f"{prefix}/success_rate", success, global_step)
        self.writer.add_scalar(f"{prefix}/return", ret, global_step)
        for name, r in results.items():
            self.writer.add_scalar(f"{prefix}/success_rate/{name}", r["success"], global_step)
            self.writer.add_scalar(f"{prefix}/return/{name}", r["return"], global_step)
        record = {
            "global_step": global_step,
            "wall_clock": time.time() - self.start_time,
            "mean_success": success,
            "mean_return": ret,
            "success": {k: r["success"] for k, r in results.items()},
            "return": {k: r["return"] for k, r in results.items()},
            **(extra or {}),
        }
        if prefix == "eval":
            with (self.dir / "eval.jsonl").open("a") as f:
                f.write(json.dumps(jsonable(record)) + "\n")
        return record

    # ---- checkpoints ----
    def save_checkpoint(self, state: dict) -> None:
        """Also saves the run's wall clock so far, so a resumed run's wall clock continues from it. After a crash the
        time since the last checkpoint is not counted; a stop signal's checkpoint holds the iteration start, so the
        partial rollout it drops (at most one rollout, done again after the resume) is counted twice."""
        path = self.dir / CHECKPOINT_NAME
        tmp = path.with_suffix(".tmp")
        torch.save({**state, "wall_clock_s": time.time() - self.start_time}, tmp)
        os.replace(tmp, path)  # atomic: a crash mid-write keeps the previous checkpoint

    def load_checkpoint(self) -> dict | None:
        if not self.args.resume:
            return None
        ckpt = torch.load(self.dir / CHECKPOINT_NAME, weights_only=False, map_location="cpu")
        self.start_time = time.time() - ckpt.get("wall_clock_s", 0.0)  # a checkpoint older than this key: 0
        return ckpt

    # ---- the end ----
    def finish(self, summary: dict) -> None:
        summary = {"algo": self.algo, "env_id": self.args.env_id, "seed": self.args.seed, "run_name": self.name, **summary}
        (self.dir / "summary.json").write_text(json.dumps(jsonable(summary), indent=2))
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(flag: torch.Tensor, run: Run, global_step: int) -> None:
    """Stop the run with a clear message if any loss of this iteration was NaN/inf. The checkpoint on
    disk is the last good one (no checkpoint is written after a non-finite loss)."""
    if bool(flag):
        run.close()
        fail(
            f"non-finite loss at global step {global_step}; stopping. The last good checkpoint is "
            f"{run.dir / CHECKPOINT_NAME} (resume with --resume {run.dir} after fixing the cause)",
            code=3,
        )


# ----------------------------------------------------------------------------------------------
# leave-one-task-out (protocol.md section 7; context/loo.md)
# ----------------------------------------------------------------------------------------------
TRANSFER_REGIMES = ("finetune", "task-only")
# what a run started with --init-from must share with that run, besides the algorithm: the suite, the network and
# the options that define the method (hyperparameters such as the learning rate or beta may differ)
INIT_FROM_MUST_MATCH = ("env_id", "hidden_sizes", "activation")
METHOD_OPTIONS = {
    "ppo_mtl_embed": ("task_encoding", "task_embedding_dim"),
    "ppo_pcgrad": ("task_encoding", "task_embedding_dim", "pcgrad_reduction", "pcgrad_task_params"),
    "ppo_varshare": ("residual", "noise", "critic", "critic_noise", "bias_residual", "fixed_sigma", "prior_scale", "prior_scale_mode"),
    "ppo_paco": ("num_param_sets", "share_w"),
    "ppo_softmod": ("softmod_variant", "num_modules", "embedding_dim"),
}


def check_loo(args, algo: str, resuming: bool = False) -> None:
    """``--train-tasks``, ``--transfer`` and ``--init-from``, before anything is created. ``--init-from`` must name a
    finished run of the same algorithm, suite, widths, activation and method options (``METHOD_OPTIONS``); every
    difference is named with both values. Not re-checked on ``--resume`` (the checkpoint holds the weights)."""
    names = make_suite(args.env_id).task_names
    if args.train_tasks is not None:
        unknown = [t for t in args.train_tasks if t not in names]
        if unknown:
            raise ArgError(f"--train-tasks: unknown task(s) {', '.join(unknown)} of {args.env_id}; allowed: {', '.join(names)}")
        if not args.train_tasks:
            raise ArgError("--train-tasks: give at least one task (or leave the flag out: every task of the suite)")
        twice = sorted({t for t in args.train_tasks if list(args.train_tasks).count(t) > 1})
        if twice:
            raise ArgError(f"--train-tasks: {', '.join(twice)} given more than once")
    if args.transfer not in TRANSFER_REGIMES:
        raise ArgError(f"--transfer {args.transfer!r} is not allowed; choose one of: {', '.join(TRANSFER_REGIMES)}")
    if args.transfer == "task-only" and not args.init_from:
        raise ArgError("--transfer task-only trains only the task slots of a pre-trained network: it needs --init-from <run dir>")
    if not args.init_from or resuming:
        return
    src = Path(args.init_from)
    if not (src / "config.json").is_file():
        raise ArgError(f"--init-from {str(src)!r}: not a run directory (no config.json there)")
    if not (src / "summary.json").is_file() or not (src / CHECKPOINT_NAME).is_file():
        raise ArgError(f"--init-from {str(src)!r}: the run has not finished (no summary.json or no {CHECKPOINT_NAME}); a transfer starts "
                       "from a run's final weights")
    saved = json.loads((src / "config.json").read_text())
    if saved.get("algo") != algo:
        raise ArgError(f"--init-from {str(src)!r}: the algorithm differs: this run {algo}, that run {saved.get('algo')}")
    mine = jsonable(dataclasses.asdict(args))
    # a key that an older run's config.json lacks had its default then (an option added later)
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING}
    theirs = {k: saved["args"].get(k, jsonable({k: defaults.get(k)})[k]) for k in (*INIT_FROM_MUST_MATCH, *METHOD_OPTIONS.get(algo, ()))}
    diffs = [f"--{k.replace('_', '-')}: this run {mine.get(k)!r}, that run {theirs[k]!r}"
             for k in theirs if json.loads(json.dumps(mine.get(k))) != theirs[k]]
    if diffs:
        raise ArgError(f"--init-from {str(src)!r} is a different suite, network or method ({'; '.join(diffs)}); a transfer starts from "
                       "a run of the same suite, widths, activation and method options")


class LeaveOneOut:
    """The LOO options of every multi-task script, written once (protocol.md section 7; context/loo.md).

    - ``--train-tasks``: ``train_ids`` (suite ids, in the suite's order) are the tasks that get environments
      (``make_vector_env``) and hence data; the network keeps a slot for every task of the suite, with the suite's
      task ids, and evaluation covers every task of the suite.
    - ``--init-from``: ``start`` loads the finished run's final weights and normalisation statistics (observations
      and rewards; both keep updating), not its optimiser state nor its step counter.
    - Which entries train (``start``, then ``mask_gradients`` after every backward and any gradient surgery, before
      the clip): the slots of tasks outside ``--train-tasks`` never change (their gradient is zeroed: no data
      reaches them, but a regulariser could, e.g. VarShare's KL on rho at sigma0, nonzero by float rounding), and
      with ``--transfer task-only`` no shared entry changes either. A parameter without any trainable entry gets
      ``requires_grad`` False and stays out of the optimiser (``trainable``); in a partly trainable one the frozen
      entries always have a zero gradient, so a fresh Adam (m = v = 0) leaves them bit-identical."""

    def __init__(self, args, suite):
        self.args, self.suite = args, suite
        chosen = set(suite.task_names if args.train_tasks is None else args.train_tasks)
        self.train_ids = [i for i, name in enumerate(suite.task_names) if name in chosen]
        self.train_names = [suite.task_names[i] for i in self.train_ids]
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its frozen entries, broadcastable)
        self.info = {"train_tasks": self.train_names, "fixed_slots": [n for n in suite.task_names if n not in chosen],
                     "init_from": args.init_from, "transfer": args.transfer}

    def make_vector_env(self, envs_per_task: int, seed: int, vector_mode: str = "sync"):
        """``mtrl.envs.make_vector_env`` of the train tasks, with the suite's task ids (every task: the same envs and seeds)."""
        sub = dataclasses.replace(self.suite, tasks=tuple(self.suite.tasks[i] for i in self.train_ids))
        envs, sub_ids = make_vector_env(sub, envs_per_task, seed, vector_mode)
        return envs, np.asarray(self.train_ids)[sub_ids]

    def start(self, agent: torch.nn.Module, slots: list[tuple[torch.Tensor, int, int]], obs_norm, reward_scaler) -> None:
        """After building the agent, before the optimiser. ``slots``: every per-task table of the agent as
        ``(parameter, dim, offset)``: task t's slot is index ``offset + t`` along ``dim`` (a one-hot column of a first
        layer, a row of an embedding, of VarShare's mu or of the log-std); every other entry is shared."""
        args = self.args
        if args.init_from and not args.resume:  # on resume the checkpoint holds the state
            ckpt = torch.load(Path(args.init_from) / CHECKPOINT_NAME, weights_only=False, map_location="cpu")
            try:
                agent.load_state_dict(ckpt["agent"])
            except RuntimeError as e:
                fail(f"--init-from {args.init_from}: its weights do not fit this network: {e}")
            obs_norm.load_state_dict(ckpt["obs_norm"])
            reward_scaler.load_state_dict(ckpt["reward_scaler"])
            self.info["init_from_step"] = ckpt["global_step"]
        task_only, num_tasks = args.transfer == "task-only", self.suite.num_tasks
        slot_of = {id(p): (dim, offset) for p, dim, offset in slots}
        trainable = total = 0
        for p in agent.parameters():
            total += p.numel()
            if id(p) not in slot_of:  # shared
                p.requires_grad_(not task_only)
                trainable += 0 if task_only else p.numel()
                continue
            dim, offset = slot_of[id(p)]
            keep = torch.full((p.shape[dim],), not task_only)
            keep[offset : offset + num_tasks] = False
            keep[[offset + t for t in self.train_ids]] = True
            shape = [1] * p.dim()
            shape[dim] = -1
            n = int(keep.sum()) * (p.numel() // p.shape[dim])
            trainable += n
            p.requires_grad_(n > 0)
            if 0 < n < p.numel():
                self.masks.append((p, (~keep).view(shape).to(p.device)))
        if trainable == 0:
            fail(f"--transfer {args.transfer}: nothing would train: this network has no task slot (e.g. --task-encoding none) and no log-std")
        self.info.update(trainable_params=trainable, frozen_params=total - trainable)

    @staticmethod
    def trainable(params):
        """The optimiser's parameters without the frozen ones: a list of parameters, or of parameter groups (kept, even empty)."""
        params = list(params)
        if params and isinstance(params[0], dict):
            return [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in params]
        return [p for p in params if p.requires_grad]

    def mask_gradients(self) -> None:
        """Zero the gradient of every frozen entry of a partly trainable parameter (after backward and any gradient
        surgery, before the clip: the clip then sees only what trains)."""
        for p, frozen in self.masks:
            if p.grad is not None:
                p.grad.masked_fill_(frozen, 0.0)
