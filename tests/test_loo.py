"""Leave-one-task-out (protocol.md section 7; context/loo.md): --train-tasks, --init-from and --transfer in every
multi-task script, scripts/loo.sh's grid and scripts/loo_report.py.

Tiny runs in this process (the scripts' own parse_args and main) on toy/CartPole-Targets-MT3: pre-training on
standard and standard-right, transfer to the held-out standard-left."""

from __future__ import annotations

import dataclasses
import json
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, read_jsonl
from mtrl import run as mtrun
from mtrl.capacity import algo_module
from mtrl.envs import make_suite

SUITE = "toy/CartPole-Targets-MT3"
TASKS = make_suite(SUITE).task_names  # standard, standard-right, standard-left
HELD = "standard-left"
K = TASKS.index(HELD)
TINY = ["--env-id", SUITE, "--total-timesteps", "128", "--envs-per-task", "1", "--num-steps", "32", "--num-minibatches", "2",
        "--eval-episodes", "1", "--eval-every", "0", "--checkpoint-every", "0", "--hidden-sizes", "16", "16", "--no-progress"]
# every multi-task method (L2Soft is ppo_varshare --residual l2), plus the slot variants (embedding rows, bias residual
# and onehot critic, PCGrad with the task parameters in the surgery, PaCo with separate w; softmod's official network has the paper's slot)
METHODS = {
    "mtl_embed": ("ppo_mtl_embed", []),
    "mtl_embed_embedding": ("ppo_mtl_embed", ["--task-encoding", "embedding"]),
    "pcgrad": ("ppo_pcgrad", []),
    "pcgrad_project": ("ppo_pcgrad", ["--pcgrad-task-params", "project", "--task-encoding", "embedding"]),
    "varshare": ("ppo_varshare", []),
    "varshare_bias_onehot_step": ("ppo_varshare", ["--bias-residual", "--critic", "onehot", "--noise", "step"]),
    "l2soft": ("ppo_varshare", ["--residual", "l2"]),
    "paco": ("ppo_paco", ["--no-share-w"]),
    "softmod": ("ppo_softmod", ["--softmod-variant", "official"]),
}
# a method option that --init-from must refuse to change, per algorithm
OTHER_METHOD = {"ppo_mtl_embed": ["--task-encoding", "none"], "ppo_pcgrad": ["--pcgrad-reduction", "sum"], "ppo_varshare": ["--noise", "mean"],
                "ppo_paco": ["--num-param-sets", "3"], "ppo_softmod": ["--num-modules", "3"]}


def parse(algo: str, argv: list[str]):
    mod = algo_module(algo)
    return mtrun.parse_args(mod.Args, algo, mod.validate, argv=argv)


def run_main(algo: str, argv: list[str]):
    """Parse and run as the script would, in this process; give pytest its signal handlers back."""
    args = parse(algo, argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        algo_module(algo).main(args)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return args


def checkpoint(run_dir):
    return torch.load(run_dir / mtrun.CHECKPOINT_NAME, weights_only=False)


@pytest.fixture(scope="module", params=list(METHODS))
def loo_runs(request, tmp_path_factory):
    """Pre-training on the two other tasks, then task-only and finetune transfers to the held-out task."""
    algo, flags = METHODS[request.param]
    runs = tmp_path_factory.mktemp(request.param)
    base = [*TINY, *flags, "--runs-dir", str(runs)]
    pre_args = run_main(algo, [*base, "--run-name", "pre", "--train-tasks", *[t for t in TASKS if t != HELD]])
    for regime in ("task-only", "finetune"):
        run_main(algo, [*base, "--run-name", regime, "--train-tasks", HELD, "--init-from", str(runs / "pre"), "--transfer", regime])
    mod = algo_module(algo)
    mtrun.seed_everything(pre_args.seed)  # the pre-training's initial network, built as its main built it
    fresh = mod.Agent(4, 2, True, len(TASKS), pre_args)
    names = {id(p): n for n, p in fresh.named_parameters()}
    slots = {names[id(p)]: (dim, offset) for p, dim, offset in mod.task_slots(fresh)}
    return {"name": request.param, "algo": algo, "flags": flags, "runs": runs, "fresh": fresh.state_dict(), "slots": slots}


def test_init_from_refuses_a_changed_sigma_regime_and_reads_an_older_config_with_defaults(loo_runs, capsys, tmp_path):
    """VarShare: --fixed-sigma and the prior (c, mode) must match the pre-training (a fixed sigma loaded from a learnt-sigma
    run would stay at the source's values, not at sigma0); an older run's config.json without these keys had the defaults."""
    import json
    import shutil

    if loo_runs["algo"] != "ppo_varshare":
        pytest.skip("a VarShare option")
    base = [*TINY, *loo_runs["flags"], "--runs-dir", str(loo_runs["runs"]), "--run-name", "refused", "--train-tasks", HELD,
            "--init-from", str(loo_runs["runs"] / "pre")]
    for extra, word in ((["--fixed-sigma"], "--fixed-sigma"), (["--prior-scale", "0.3"], "--prior-scale"),
                        (["--prior-scale-mode", "init"], "--prior-scale-mode")):
        with pytest.raises(SystemExit):
            parse("ppo_varshare", [*base, *extra])
        assert word in capsys.readouterr().err
    old = tmp_path / "old"
    shutil.copytree(loo_runs["runs"] / "pre", old)
    config = json.loads((old / "config.json").read_text())
    for key in ("fixed_sigma", "prior_scale_mode"):
        config["args"].pop(key)
    (old / "config.json").write_text(json.dumps(config))
    args = parse("ppo_varshare", [*base[:-1], str(old)])
    assert args.init_from == str(old) and not args.fixed_sigma


def slot_index(shape, dim: int, index: int):
    idx = [slice(None)] * len(shape)
    idx[dim] = index
    return tuple(idx)


def split(state: dict, slots: dict, name: str):
    """A parameter's entries: task k's slot, the other tasks' slots, the shared rest (None where there is none)."""
    t = state[name].clone()
    if name not in slots:
        return None, None, t
    dim, offset = slots[name]
    mine = t[slot_index(t.shape, dim, offset + K)].clone()
    others = torch.stack([t[slot_index(t.shape, dim, offset + j)] for j in range(len(TASKS)) if j != K])
    keep = torch.ones(t.shape[dim], dtype=torch.bool)
    keep[offset : offset + len(TASKS)] = False
    return mine, others, t.index_select(dim, keep.nonzero()[:, 0])


def test_pretraining_leaves_the_held_out_slot_exactly_at_its_initial_value(loo_runs):
    pre = checkpoint(loo_runs["runs"] / "pre")["agent"]
    assert pre.keys() == loo_runs["fresh"].keys()
    trained = []
    for name in loo_runs["slots"]:
        init_k, init_others, _ = split(loo_runs["fresh"], loo_runs["slots"], name)
        k, others, _ = split(pre, loo_runs["slots"], name)
        assert torch.equal(k, init_k), f"{name}: the held-out task's slot moved during pre-training"
        trained.append(not torch.equal(others, init_others))
    assert any(trained), "the train tasks' slots never moved: nothing was trained"
    config = json.loads((loo_runs["runs"] / "pre" / "config.json").read_text())
    assert config["derived"]["loo"]["train_tasks"] == [t for t in TASKS if t != HELD] and config["derived"]["num_envs"] == 2
    evals = read_jsonl(loo_runs["runs"] / "pre" / "eval.jsonl")
    assert set(evals[-1]["success"]) == set(TASKS)  # every task evaluated, the held-out one too: its zero-shot score


def test_task_only_trains_only_the_held_out_slot_and_finetune_keeps_the_other_slots(loo_runs):
    pre = checkpoint(loo_runs["runs"] / "pre")["agent"]
    slots = loo_runs["slots"]
    for regime in ("task-only", "finetune"):
        ckpt = checkpoint(loo_runs["runs"] / regime)
        moved_slot, moved_shared = [], []
        for name in pre:
            k0, others0, shared0 = split(pre, slots, name)
            k1, others1, shared1 = split(ckpt["agent"], slots, name)
            if others0 is not None:
                assert torch.equal(others1, others0), f"{regime}: {name}: another task's slot changed"
                moved_slot.append(not torch.equal(k1, k0))
            moved_shared.append(not torch.equal(shared1, shared0))
            if regime == "task-only":
                assert torch.equal(shared1, shared0), f"task-only: shared entries of {name} changed"
        assert any(moved_slot), f"{regime}: the held-out task's slot never moved"
        if regime == "finetune":
            assert any(moved_shared), "finetune: no shared parameter moved"
        # a fresh optimiser: every Adam state counts this run's own steps only
        steps = {float(s["step"]) for s in ckpt["optimizer"]["state"].values()}
        assert steps == {float(ckpt["gradient_steps"])} and ckpt["gradient_steps"] == 4 * 4 * 2
    config = json.loads((loo_runs["runs"] / "task-only" / "config.json").read_text())
    loo = config["derived"]["loo"]
    assert config["args"]["init_from"] == str(loo_runs["runs"] / "pre") and loo["init_from_step"] == 128 and loo["transfer"] == "task-only"
    slot_size = sum(pre[n].numel() // pre[n].shape[d] for n, (d, _) in slots.items())
    assert loo["trainable_params"] == slot_size


def test_transfer_starts_from_the_pretrained_weights_and_statistics(loo_runs):
    pre_dir, runs = loo_runs["runs"] / "pre", loo_runs["runs"]
    zero_shot = read_jsonl(pre_dir / "eval.jsonl")[-1]
    pre_norm = checkpoint(pre_dir)["obs_norm"]
    for regime in ("task-only", "finetune"):
        evals = read_jsonl(runs / regime / "eval.jsonl")
        assert [e["global_step"] for e in evals] == [0, 128]
        assert evals[0]["success"] == zero_shot["success"] and evals[0]["return"] == zero_shot["return"]  # the jumpstart is zero-shot
        # the normalisation statistics are the pre-training's and keep updating (one observation per env and step)
        assert checkpoint(runs / regime)["obs_norm"]["count"] == pytest.approx(pre_norm["count"] + 128)


def test_a_transfer_resumes_from_its_checkpoint_and_an_older_run_without_the_loo_options_too(loo_runs, tmp_path):
    """--resume takes the checkpoint's state (no second load of --init-from, no second step-0 evaluation); a run
    started before the LOO options existed (config.json without them) resumes with their defaults."""
    import shutil

    copy = tmp_path / "task-only"
    shutil.copytree(loo_runs["runs"] / "task-only", copy)
    (copy / "summary.json").unlink()
    config = json.loads((copy / "config.json").read_text())
    config["args"]["init_from"] = str(tmp_path / "gone")  # the pre-training run is not needed any more
    (copy / "config.json").write_text(json.dumps(config))
    run_main(loo_runs["algo"], ["--resume", str(copy), "--no-progress"])
    assert [e["global_step"] for e in read_jsonl(copy / "eval.jsonl")] == [0, 128, 128]
    assert json.loads((copy / "summary.json").read_text())["final_success"] == json.loads((loo_runs["runs"] / "task-only" / "summary.json").read_text())["final_success"]
    old = tmp_path / "old"
    shutil.copytree(loo_runs["runs"] / "pre", old)
    config = json.loads((old / "config.json").read_text())
    for key in ("train_tasks", "init_from", "transfer"):
        del config["args"][key]
    (old / "config.json").write_text(json.dumps(config))
    assert parse(loo_runs["algo"], ["--resume", str(old)]).transfer == "finetune"


def test_init_from_refuses_another_width_suite_or_method_before_creating_anything(loo_runs, capsys):
    algo, runs, pre = loo_runs["algo"], loo_runs["runs"], str(loo_runs["runs"] / "pre")
    base = [*TINY, *loo_runs["flags"], "--runs-dir", str(runs), "--run-name", "refused", "--init-from", pre]
    other_algo = "ppo_mtl_embed" if algo != "ppo_mtl_embed" else "ppo_paco"
    cases = [(algo, [*base, "--train-tasks", HELD, "--hidden-sizes", "8", "8"], ["--hidden-sizes", "[8, 8]", "[16, 16]"]),
             (algo, [*base, "--env-id", "toy/CartPole-MT10", "--train-tasks", "standard"], ["--env-id", "toy/CartPole-MT10", SUITE]),
             (algo, [*base, "--train-tasks", HELD, *OTHER_METHOD[algo]], [OTHER_METHOD[algo][0]]),
             (other_algo, [*TINY, "--runs-dir", str(runs), "--run-name", "refused", "--init-from", pre, "--train-tasks", HELD],
              ["algorithm differs", other_algo, algo])]
    for which, argv, words in cases:
        with pytest.raises(SystemExit) as e:
            parse(which, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(w in err for w in words), (argv, err)
    assert not (runs / "refused").exists()


def test_loo_arguments_are_checked_before_anything_runs(tmp_path, capsys):
    base = [*TINY, "--runs-dir", str(tmp_path)]
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text(json.dumps({"algo": "ppo_mtl_embed", "args": {}}))
    for argv, words in [([*base, "--train-tasks", "sideways"], ["sideways", "allowed: standard, standard-right, standard-left"]),
                        ([*base, "--train-tasks", HELD, HELD], ["given more than once"]),
                        ([*base, "--transfer", "task-only"], ["task-only", "--init-from"]),
                        ([*base, "--init-from", str(tmp_path / "nowhere")], ["not a run directory"]),
                        ([*base, "--init-from", str(tmp_path / "unfinished")], ["has not finished"])]:
        with pytest.raises(SystemExit) as e:
            parse("ppo_mtl_embed", argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(w in err for w in words), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unfinished"]


@pytest.mark.parametrize("flags", [[], ["--bias-residual"], ["--residual", "l2"]], ids=["varshare", "bias_residual", "l2soft"])
def test_varshare_zero_shot_is_theta_alone(tmp_path, flags):
    """The held-out task's posterior mean is theta + mu_k with mu_k = 0: its evaluation is that of theta alone."""
    import ppo_varshare as vs

    args = run_main("ppo_varshare", [*TINY, *flags, "--runs-dir", str(tmp_path), "--run-name", "pre", "--train-tasks", "standard", "standard-right"])
    final = read_jsonl(tmp_path / "pre" / "eval.jsonl")[-1]
    assert final["success"][HELD] == final["theta_success"][HELD]
    agent = vs.Agent(4, 2, True, len(TASKS), args)
    agent.load_state_dict(checkpoint(tmp_path / "pre")["agent"])
    x, task = torch.randn(1, 256, 4) * 2, torch.tensor([K])
    with torch.no_grad():
        full = agent.mlp_forward(agent.actor, x, task, [None] * len(agent.actor), True)
        theta = agent.mlp_forward(agent.actor, x, task, [None] * len(agent.actor), False)
        other = agent.mlp_forward(agent.actor, x, torch.tensor([0]), [None] * len(agent.actor), True)
    assert torch.allclose(full, theta, atol=1e-6, rtol=0) and torch.equal(full.argmax(-1), theta.argmax(-1))
    assert not torch.allclose(other, theta, atol=1e-6, rtol=0)  # a trained task's residual did move


@pytest.mark.parametrize("algo", ["ppo_mtl_embed", "ppo_pcgrad", "ppo_varshare", "ppo_paco", "ppo_softmod"])
def test_continuous_actions_the_log_std_row_is_part_of_the_slot(algo):
    """With a loss that reaches every task, only the entries that may train move: task-only trains task k's slot and
    log-std row; --train-tasks without k (pre-training) leaves them bit-identical."""
    mod = algo_module(algo)
    for train, transfer in [((HELD,), "task-only"), (tuple(t for t in TASKS if t != HELD), "finetune")]:
        torch.manual_seed(0)
        args = dataclasses.replace(mod.Args(), env_id=SUITE, hidden_sizes=(8, 8), train_tasks=train, transfer=transfer)
        agent = mod.Agent(4, 2, False, len(TASKS), args)
        loo = mtrun.LeaveOneOut(args, make_suite(SUITE))
        loo.start(agent, mod.task_slots(agent), None, None)
        before = {n: p.detach().clone() for n, p in agent.named_parameters()}
        optimizer = torch.optim.Adam(loo.trainable(agent.parameters()), lr=1e-2, eps=1e-5)
        for _ in range(3):
            _, logprob, entropy, value = agent.get_action_and_value(torch.randn(3, 5, 4), torch.arange(3), action=torch.randn(3, 5, 2))
            optimizer.zero_grad()
            (logprob.sum() + entropy.sum() + value.square().sum()).backward()
            loo.mask_gradients()
            optimizer.step()
        logstd = agent.actor_logstd.detach()
        assert torch.equal(logstd[K] != before["actor_logstd"][K], torch.tensor([transfer == "task-only"] * 2))
        others = [j for j in range(3) if j != K]
        assert (logstd[others] != before["actor_logstd"][others]).all() == (transfer == "finetune")
        names = {id(p): n for n, p in agent.named_parameters()}
        slot_names = {names[id(p)] for p, _, _ in mod.task_slots(agent)}
        for n, p in agent.named_parameters():
            if n not in slot_names:
                assert torch.equal(p, before[n]) == (transfer == "task-only"), n


def test_paco_w_reset_mixes_only_the_train_tasks():
    import ppo_paco as paco

    agent = paco.Agent(4, 2, True, 3, paco.Args(hidden_sizes=(8, 8)))
    before = agent.w.detach().clone()
    coef = agent.reset_w(torch.tensor([True, False]), "dirichlet", [0, 1])  # task 2 held out: neither reset nor mixed in
    assert coef.shape == (1, 1) and torch.equal(agent.w[0], before[1]) and torch.equal(agent.w[2], before[2])


# ---- scripts/loo.sh and scripts/loo_report.py
LOO_CONFIG = f'''env_id = "{SUITE}"
total_timesteps = 384
envs_per_task = 1
num_steps = 32
num_minibatches = 2
eval_every = 192
eval_episodes = 1
checkpoint_every = 0
hidden_sizes = [16, 16]
[ppo_single]
total_timesteps = 128
eval_every = 64
[methods]
single = ["ppo_single"]
embed = ["ppo_mtl_embed"]
blind = ["ppo_mtl_embed", "--task-encoding", "none"]
l2 = ["ppo_varshare", "--residual", "l2", "--hidden-sizes", "12", "12"]
[loo]
held_out = ["{HELD}", "standard"]
methods = ["embed", "l2"]
transfer_budget = 128
'''


def loo_sh(*args, cwd=REPO):
    return subprocess.run(["bash", str(REPO / "scripts" / "loo.sh"), *args], capture_output=True, text=True, cwd=cwd, timeout=1200)


def test_loo_sh_dry_run_lists_both_phases_with_names_budgets_and_flags(tmp_path):
    cfg, runs = tmp_path / "loo.toml", tmp_path / "runs"
    cfg.write_text(LOO_CONFIG)
    proc = loo_sh("--config", str(cfg), "--seeds", "1,2", "--held-out", HELD, "--runs-dir", str(runs), "--dry-run", "--", "--eval-episodes", "2")
    assert proc.returncode == 0, proc.stderr
    py, algos = sys.executable, "src/algos/"
    common = ["--eval-episodes", "2", "--runs-dir", str(runs), "--run-name"]
    phase1, phase2 = [], []
    for seed in (1, 2):
        for label, algo, flags in [("embed", "ppo_mtl_embed", []), ("l2", "ppo_varshare", ["--residual", "l2", "--hidden-sizes", "12", "12"])]:
            phase1.append([py, algos + f"{algo}.py", "--config", str(cfg), *flags, "--seed", str(seed), "--train-tasks", "standard", "standard-right",
                           "--total-timesteps", "256", *common, f"{label}__loo-{HELD}__pretrain__s{seed}"])  # (T-1)/T of 384
            for regime in ("finetune", "task-only"):
                phase2.append([py, algos + f"{algo}.py", "--config", str(cfg), *flags, "--seed", str(seed), "--train-tasks", HELD, "--init-from",
                               str(runs / f"{label}__loo-{HELD}__pretrain__s{seed}"), "--transfer", regime, "--total-timesteps", "128",
                               "--eval-every", "64", "--checkpoint-every", "0", *common, f"{label}__loo-{HELD}__{regime}__s{seed}"])
        phase1.append([py, algos + "ppo_single.py", "--config", str(cfg), "--seed", str(seed), "--task", HELD, "--total-timesteps", "128",
                       *common, f"single__{HELD}__s{seed}"])
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# phase 1") and lines[len(phase1) + 1].startswith("# phase 2")
    assert [shlex.split(line) for line in lines[1 : len(phase1) + 1]] == phase1
    assert [shlex.split(line) for line in lines[len(phase1) + 2 :]] == phase2
    assert not runs.exists()


@pytest.mark.parametrize("edit, words", [
    (("transfer_budget = 128", "transfer_budget = 100"), ["transfer_budget = 100", "[ppo_single] total_timesteps (128)"]),
    ((f'held_out = ["{HELD}", "standard"]', 'held_out = ["sideways"]'), ["held_out", "sideways", "allowed: standard"]),
    (('methods = ["embed", "l2"]', 'methods = ["embed", "blind"]'), ["'blind'", "allowed: embed, l2"]),
    (("", ""), ["--held-out nowhere", "allowed: standard-left, standard"]),
])
def test_loo_sh_refuses_a_bad_loo_table_or_held_out_task(tmp_path, edit, words):
    cfg = tmp_path / "loo.toml"
    cfg.write_text(LOO_CONFIG.replace(*edit))
    extra = ["--held-out", "nowhere"] if edit == ("", "") else []
    proc = loo_sh("--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--dry-run", *extra)
    assert proc.returncode == 2 and all(w in proc.stderr for w in words), proc.stderr


def test_loo_sh_runs_both_phases_and_the_report_reads_them(tmp_path):
    cfg, runs, out = tmp_path / "loo.toml", tmp_path / "runs", tmp_path / "report"
    cfg.write_text(LOO_CONFIG)
    proc = loo_sh("--config", str(cfg), "--seeds", "1", "--held-out", HELD, "--methods", "embed", "-j", "2", "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in runs.iterdir() if (p / "summary.json").is_file())
    assert names == sorted([f"embed__loo-{HELD}__{r}__s1" for r in ("pretrain", "finetune", "task-only")] + [f"single__{HELD}__s1"])
    report = subprocess.run([sys.executable, str(REPO / "scripts" / "loo_report.py"), "--runs-dir", str(runs), "--out", str(out), "--reps", "100"],
                            capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert report.returncode == 0, report.stderr
    text = (out / "loo.md").read_text()
    for row in ["| single | scratch | 1 |", "| embed | finetune | 1 |", "| embed | task-only | 1 |", "| embed | zero-shot | 1 |"]:
        assert row in text, text
    assert "differs from the pre-training" not in text and (out / f"loo_toy-CartPole-Targets-MT3_{HELD}.png").is_file()
    csv_rows = (out / "loo.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 4 and "auc_ratio_scratch" in csv_rows[0]
    # the summary row repeats the per-regime numbers: jumpstart, finetune and task-only AUC / scratch and final, scratch's
    import csv as csv_module

    by = {r["regime"]: r for r in csv_module.DictReader(csv_rows)}
    f = lambda regime, field, d=2: "-" if not np.isfinite(float(by[regime][field] or "nan")) else f"{float(by[regime][field]):.{d}f}"  # noqa: E731
    summary = (f"| toy/CartPole-Targets-MT3 | {HELD} | embed | 1/1 | {f('zero-shot', 'jumpstart')} | {f('finetune', 'auc_ratio_scratch')} | "
               f"{f('finetune', 'final')} | {f('task-only', 'auc_ratio_scratch')} | {f('task-only', 'final')} | {f('scratch', 'auc', 3)} | "
               f"{f('scratch', 'final')} |")
    assert summary in text, text


def test_loo_summary_table_puts_each_regime_in_its_own_column():
    """loo_report.summary_table by hand: distinct numbers per regime land in their columns; a NaN ratio prints '-'."""
    sys.path.insert(0, str(REPO / "scripts"))
    from loo_report import summary_table

    def row(method, regime, seeds, **numbers):
        return {"benchmark": "b", "held_out": "k", "method": method, "regime": regime, "seeds": seeds, **numbers}

    rows = [row("single", "scratch", 3, auc=0.8, final=1.0),
            row("m", "finetune", 3, jumpstart=0.25, auc_ratio_scratch=1.5, final=0.75),
            row("m", "task-only", 2, jumpstart=0.25, auc_ratio_scratch=0.5, final=0.125),
            row("m", "zero-shot", 3, jumpstart=0.25),
            row("n", "finetune", 1, jumpstart=0.0, auc_ratio_scratch=float("nan"), final=0.0)]
    table = summary_table(rows)
    assert "| b | k | m | 3/2 | 0.25 | 1.50 | 0.75 | 0.50 | 0.13 | 0.800 | 1.00 |" in table  # 0.125 printed half up (report.fixed)
    assert "| b | k | n | 1/0 | 0.00 | - | 0.00 | - | - | 0.800 | 1.00 |" in table
