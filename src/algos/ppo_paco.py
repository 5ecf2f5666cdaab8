"""ppo_paco: parameter-compositional multi-task PPO (PaCo, Sun et al. NeurIPS 2022), CleanRL style.

Every linear layer of actor and critic (heads included) holds K parameter sets ``(V_i, b_i)``; task t
uses ``W^t = sum_i w_t[i] V_i`` and ``b^t = sum_i w_t[i] b_i`` with a trainable compositional vector
``w_t`` of length K. The network never sees the one-hot: the task enters only through ``w_t``. The
paper's stability tricks, adapted to PPO: loss maskout (a task whose per-task PPO loss exceeds
``--maskout-threshold`` is left out of the parameter sets' gradient in that minibatch) and w-reset (the
w of such a task is replaced by a random convex combination of the other tasks' w). Definitions:
context/spec/baselines.md section 4, notes in context/paco.md; this file is ppo_mtl_embed plus the method.
LOO (``--train-tasks``, ``--init-from``, ``--transfer``): task k's slot is its compositional vector w_k (actor and critic)
and row k of the log-std (``task_slots``); the parameter sets are shared.
Run: ``python src/algos/ppo_paco.py --config configs/toy_cartpole_mt10.toml``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim

from mtrl import envs as mtenvs
from mtrl import run as mtrun
from mtrl.evaluation import Evaluator
from mtrl.ppo import ACTIVATIONS, ObsNormalizer, RewardScaler, action_head, compute_gae, explained_variance, layer_init

ALGO = "ppo_paco"


@dataclass
class Args:
    # ---- experiment
    env_id: str = "toy/CartPole-MT10"
    """benchmark id: toy/CartPole-MT10, toy/LunarLander-MT10, metaworld/MT3, metaworld/MT10 (a single-task id runs as a suite of one)"""
    seed: int = 1
    """seed of torch, numpy, python and the environments"""
    config: Optional[str] = None
    """TOML file of a benchmark's hyperparameters (configs/*.toml): its values become the defaults, explicit flags override"""
    runs_dir: str = "runs"
    """folder that holds one sub-folder per run"""
    run_name: Optional[str] = None
    """name of the run folder (default: <env id>__<algo>__<seed>__<unix time>); an existing folder is an error"""
    resume: Optional[str] = None
    """a run folder to continue from its checkpoint, with its saved arguments, to the same final step"""
    cuda: bool = True
    """use CUDA when it is available (the code runs the same on CPU)"""
    torch_deterministic: bool = True
    """cudnn deterministic mode"""
    torch_threads: int = 1
    """torch CPU threads (1 is fastest for these small networks; 0 keeps torch's default)"""
    track: bool = False
    """also log to Weights & Biases (needs a W&B login; never used by the tests)"""
    wandb_project_name: str = "varshare-mtrl"
    """W&B project"""
    wandb_entity: Optional[str] = None
    """W&B entity (team or user)"""
    progress: bool = True
    """show a compact progress line (rewritten in place on a terminal, every 30 s in a log file)"""

    # ---- budget, evaluation, checkpoints
    total_timesteps: int = 500_000
    """environment steps over all tasks; the run stops at the first iteration boundary at or past it"""
    eval_every: int = 50_000
    """evaluate every this many environment steps (0: only at the end)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes per task"""
    checkpoint_every: int = 50_000
    """write checkpoints/latest.pt every this many environment steps (0: only at the end and on SIGTERM/SIGINT)"""

    # ---- leave-one-task-out (protocol.md section 7, context/loo.md)
    train_tasks: Optional[tuple[str, ...]] = None
    """the tasks that get environments and data (default: every task of the suite); the network keeps every task's slot, other tasks' slots stay exactly as they are, evaluation covers every task"""
    init_from: Optional[str] = None
    """a finished run (same algorithm, suite, widths, activation, method options) whose final weights and normalisation statistics this run starts from; fresh optimiser, step 0, evaluated at step 0"""
    transfer: Literal["finetune", "task-only"] = "finetune"
    """finetune: every parameter trains; task-only (needs --init-from): only the train tasks' slots (see the docstring), every shared parameter frozen"""

    # ---- environments and preprocessing
    envs_per_task: int = 4
    """parallel environments per task"""
    vector_mode: Literal["sync", "async", "gym"] = "sync"
    """sync: all envs in this process (CartPole tasks numpy-vectorised, bit-identical to gym); async: one subprocess per env (for many-core machines); gym: gymnasium's SyncVectorEnv for every suite (the reference)"""
    norm_obs: bool = True
    """normalise observations with one running mean/var shared by all tasks (frozen at evaluation)"""
    norm_reward: bool = True
    """scale rewards by the running std of the discounted return (one statistic for all tasks)"""

    # ---- PPO
    num_steps: int = 128
    """steps per environment per rollout"""
    learning_rate: float = 2.5e-4
    """Adam learning rate"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 4
    """minibatches per epoch; each holds num_steps/num_minibatches time steps of every environment"""
    update_epochs: int = 4
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """surrogate clipping coefficient"""
    clip_vloss: bool = False
    """clip the value loss"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    target_kl: Optional[float] = None
    """stop the epochs of an iteration early when the approximate KL exceeds this"""

    # ---- network
    hidden_sizes: tuple[int, ...] = (64, 64)
    """hidden layer widths of the actor and of the critic"""
    activation: Literal["tanh", "relu"] = "tanh"
    """hidden activation of every method"""

    # ---- PaCo (baselines.md section 4)
    num_param_sets: int = 5
    """K: parameter sets of every layer; task t uses W^t = sum_i w_t[i] V_i, b^t = sum_i w_t[i] b_i (5: the paper's MT10 value)"""
    param_set_init: Literal["copy", "independent"] = "copy"
    """copy: the K sets start as K copies of one orthogonal initialisation (the paper's default); independent: K separate draws"""
    w_init: Literal["simplex", "normal"] = "simplex"
    """initial w_t: simplex = uniform on the probability simplex (sums to 1, so with copy init every task starts as the backbone's init network); normal = N(0, 1) entries (official code)"""
    share_w: bool = True
    """actor and critic use the same w_t (official code); --no-share-w gives each its own"""
    maskout_threshold: Optional[float] = 20.0
    """loss maskout: a task whose loss (policy - ent_coef * entropy + vf_coef * value, over its samples of the minibatch) exceeds this is left out of the parameter sets' gradient in that minibatch; None or 0: off"""
    w_reset: bool = True
    """w-reset: after each step with masked tasks, replace their w by random convex combinations of the unmasked tasks' w"""
    w_reset_mix: Literal["dirichlet", "official"] = "dirichlet"
    """w-reset coefficients: dirichlet = uniform on the simplex (Dirichlet(1)); official = U[0, 1) draws divided by their sum (official code)"""


def validate(args: Args) -> None:
    mtenvs.make_suite(args.env_id)
    if args.num_param_sets < 1:
        raise mtrun.ArgError(f"--num-param-sets must be >= 1, got {args.num_param_sets}")
    if args.maskout_threshold is not None and not (args.maskout_threshold >= 0 and math.isfinite(args.maskout_threshold)):
        raise mtrun.ArgError(f"--maskout-threshold must be a finite number >= 0 (None or 0: off), got {args.maskout_threshold}")


# ----------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------
class CompositionalLinear(nn.Module):
    """K parameter sets ``(V_i, b_i)`` of one linear layer; task t uses ``W^t = sum_i w[t, i] V_i`` and
    ``b^t = sum_i w[t, i] b_i``.

    Inputs are grouped, ``x: (G, M, in)`` with one task per group (``task_ids: (G,)``): the composed weights of
    all tasks are one ``(T, K) x (K, out * in)`` matmul, each group takes its task's, and the layer is one
    batched matmul. ``copy``: the K sets start as copies of one orthogonal draw (the template's ``layer_init``);
    biases start at 0."""

    def __init__(self, in_features: int, out_features: int, num_sets: int, init_std: float, copy_init: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_sets, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_sets, out_features))
        with torch.no_grad():
            for i in range(num_sets):
                if copy_init and i > 0:
                    self.weight[i].copy_(self.weight[0])
                else:
                    nn.init.orthogonal_(self.weight[i], init_std)

    def forward(self, x, w, task_ids):
        weight = (w @ self.weight.flatten(1)).view(-1, self.out_features, self.in_features)[task_ids]  # (G, out, in)
        return torch.baddbmm((w @ self.bias)[task_ids][:, None], x, weight.transpose(1, 2))


def init_w(num_tasks: int, num_sets: int, mode: str) -> torch.Tensor:
    """simplex: uniform on the probability simplex (normalised Exp(1) draws = Dirichlet(1)); normal: N(0, 1) (official code)."""
    if mode == "normal":
        return torch.randn(num_tasks, num_sets)
    e = torch.empty(num_tasks, num_sets).exponential_()
    return e / e.sum(1, keepdim=True)


class Agent(nn.Module):
    """Separate actor and critic MLPs of compositional layers (heads included); the task enters only through its
    compositional vector w_t (one table for actor and critic, or one each with --no-share-w); per-task log-std."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, num_tasks: int, args: Args):
        super().__init__()
        self.num_tasks, self.num_sets = num_tasks, args.num_param_sets
        self.activation = ACTIVATIONS[args.activation]()
        copy_init = args.param_set_init == "copy"

        def mlp(out_dim: int, out_std: float) -> nn.ModuleList:
            dims = [obs_dim, *args.hidden_sizes]
            hidden = [CompositionalLinear(i, o, args.num_param_sets, math.sqrt(2), copy_init) for i, o in zip(dims[:-1], dims[1:])]
            return nn.ModuleList([*hidden, CompositionalLinear(dims[-1], out_dim, args.num_param_sets, out_std, copy_init)])

        self.critic = mlp(1, 1.0)
        self.actor = mlp(act_dim, 0.01)
        self.actor_logstd = None if discrete else nn.Parameter(torch.zeros(num_tasks, act_dim))
        self.w = nn.Parameter(init_w(num_tasks, args.num_param_sets, args.w_init))  # (T, K): the actor's (and, shared, the critic's)
        self.critic_w = None if args.share_w else nn.Parameter(init_w(num_tasks, args.num_param_sets, args.w_init))

    def w_params(self) -> list[nn.Parameter]:
        return [self.w] if self.critic_w is None else [self.w, self.critic_w]

    def param_sets(self) -> list[nn.Parameter]:
        """The shared parameters: every layer's K weight and bias sets."""
        return [p for layer in [*self.actor, *self.critic] for p in (layer.weight, layer.bias)]

    def mlp_forward(self, layers, x, w, task_ids):
        for i, layer in enumerate(layers):
            x = layer(x, w, task_ids)
            if i < len(layers) - 1:
                x = self.activation(x)
        return x

    def get_value(self, x, task_ids):
        """x: (groups, samples, obs_dim), task_ids: (groups,) -> values (groups, samples)."""
        w = self.w if self.critic_w is None else self.critic_w
        return self.mlp_forward(self.critic, x, w, task_ids).squeeze(-1)

    def get_action_and_value(self, x, task_ids, action=None, deterministic=False):
        logstd = None if self.actor_logstd is None else self.actor_logstd[task_ids][:, None]
        action, logprob, entropy = action_head(self.mlp_forward(self.actor, x, self.w, task_ids), logstd, action, deterministic)
        return action, logprob, entropy, self.get_value(x, task_ids)

    @torch.no_grad()
    def reset_w(self, masked: torch.Tensor, mix: str, tasks: list[int] | None = None) -> torch.Tensor | None:
        """w-reset: the w of every masked task becomes sum_j c_j w_j over the unmasked tasks j, with c >= 0 and
        sum_j c_j = 1 drawn afresh per masked task (the same c for actor and critic w). ``masked[i]`` is about task
        ``tasks[i]`` (default: every task; LOO: the train tasks, so a held-out task's w is neither reset nor mixed in).
        Returns c (masked x unmasked), or None when no task is unmasked."""
        tasks = torch.arange(len(masked), device=masked.device) if tasks is None else torch.as_tensor(tasks, device=masked.device)
        bad, healthy = tasks[masked], tasks[~masked]
        if len(healthy) == 0:
            return None
        raw = torch.empty(len(bad), len(healthy), device=self.w.device)
        raw = raw.exponential_() if mix == "dirichlet" else raw.uniform_()
        coef = raw / raw.sum(1, keepdim=True)
        for w in self.w_params():
            w[bad] = coef @ w[healthy]
        return coef


def per_task_mean(x: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Mean over each task's groups and samples: x (groups, samples) -> (num_tasks,). With equal-size groups and
    equally many groups per task (env-stratified minibatches), the mean over tasks is x.mean()."""
    onehot = nn.functional.one_hot(task_ids, num_tasks).to(x.dtype)  # (groups, T)
    return (onehot.T @ x.mean(1)) / onehot.sum(0).clamp_min(1)


def backward_with_maskout(agent: Agent, task_loss: torch.Tensor, threshold: float | None) -> torch.Tensor | None:
    """Backpropagate loss = mean_t L_t. Loss maskout: a task with L_t > threshold is left out of the gradient of the
    shared parameter sets (every layer's V_i, b_i) in this step, while its task-specific parameters (w_t, log-std
    row) keep the gradient of its own loss. Returns the mask (like task_loss) when some task was masked, else None.
    Frozen parameter sets (LOO's --transfer task-only) get no gradient."""
    loss = task_loss.mean()
    masked = task_loss.detach() > threshold if threshold else None
    sets = [p for p in agent.param_sets() if p.requires_grad]
    if masked is None or not bool(masked.any()) or not sets:
        loss.backward()
        return masked if masked is not None and bool(masked.any()) else None
    kept = torch.where(masked, torch.zeros_like(task_loss), task_loss).sum() / task_loss.numel()
    set_grads = torch.autograd.grad(kept, sets, retain_graph=True)
    loss.backward()  # w, log-std: every task's own loss
    for p, g in zip(sets, set_grads):
        p.grad = g
    return masked


def param_counts(agent: Agent, num_tasks: int) -> dict:
    """baselines.md section 4. Active per task: all K sets of every layer (weights and biases) enter every forward
    pass, plus w_t (one vector, or two with --no-share-w) and the task's log-std row. Inference: the merged network
    of one task (one set's size) plus its log-std row. Total: everything stored."""
    layers = [*agent.actor, *agent.critic]
    one_set = sum(layer.weight[0].numel() + layer.bias[0].numel() for layer in layers)
    w_per_task = sum(w.shape[1] for w in agent.w_params())
    logstd = 0 if agent.actor_logstd is None else agent.actor_logstd.shape[1]
    total = sum(p.numel() for p in agent.parameters())
    return {"active_per_task": agent.num_sets * one_set + w_per_task + logstd, "inference": one_set + logstd, "total": total}


def task_slots(agent: Agent) -> list[tuple[torch.Tensor, int, int]]:
    """Each task's own entries for LOO (protocol.md section 7), as (parameter, dim, offset): task t's entry is index
    offset + t along dim. The task's compositional vector w_t (actor and critic, or the shared one) and its log-std
    row; the parameter sets are shared."""
    return [(w, 0, 0) for w in agent.w_params()] + ([] if agent.actor_logstd is None else [(agent.actor_logstd, 0, 0)])


@torch.no_grad()
def paco_diagnostics(agent: Agent, task_names: list[str]) -> dict:
    """Per task: |w_t|, sum_i w_t[i] and the entropy of |w_t| / sum|w_t| (nats, at most ln K); across tasks: the mean
    pairwise cosine of the w; per layer: how far the K sets have spread from their mean (0 = identical copies)."""
    out = {}
    for prefix, w in zip(["w", "critic_w"], agent.w_params()):
        p = w.abs() / w.abs().sum(1, keepdim=True).clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
        for t, name in enumerate(task_names):
            out[f"paco/{prefix}_norm/{name}"] = w[t].norm().item()
            out[f"paco/{prefix}_sum/{name}"] = w[t].sum().item()
            out[f"paco/{prefix}_entropy/{name}"] = entropy[t].item()
        unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = unit @ unit.T
        n = len(task_names)
        out[f"paco/{prefix}_cosine_mean"] = ((cos.sum() - cos.diagonal().sum()) / max(n * (n - 1), 1)).item()
    for net in ["actor", "critic"]:
        for i, layer in enumerate(getattr(agent, net)):
            v = torch.cat([layer.weight.flatten(1), layer.bias], 1)  # (K, out * in + out)
            mean = v.mean(0)
            out[f"paco/set_spread/{net}.{i}"] = ((v - mean).norm(dim=1).mean() / mean.norm().clamp_min(1e-12)).item()
    return out


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    suite = mtenvs.make_suite(args.env_id, None, args.seed)
    num_tasks = suite.num_tasks
    loo = mtrun.LeaveOneOut(args, suite)  # --train-tasks, --init-from, --transfer (protocol.md section 7)
    num_envs = len(loo.train_ids) * args.envs_per_task
    batch_size = num_envs * args.num_steps
    minibatch_steps = args.num_steps // args.num_minibatches
    num_iterations = math.ceil(args.total_timesteps / batch_size)
    mtrun.seed_everything(args.seed, args.torch_deterministic)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    device = mtrun.pick_device(args.cuda)

    # ---- env setup
    envs, task_ids = loo.make_vector_env(args.envs_per_task, args.seed, args.vector_mode)  # the train tasks' envs, the suite's task ids
    obs_shape, act_space = envs.single_observation_space.shape, envs.single_action_space
    discrete = isinstance(act_space, gym.spaces.Discrete)
    obs_dim, act_dim = obs_shape[0], (act_space.n if discrete else act_space.shape[0])
    act_clip = None if discrete else (act_space.low, act_space.high)
    task_ids_t = torch.as_tensor(task_ids, device=device)
    obs_norm = ObsNormalizer(obs_shape, args.norm_obs)
    reward_scaler = RewardScaler(num_envs, args.gamma, args.norm_reward)
    evaluator = Evaluator(suite, args.eval_episodes, args.seed + 100_000, device, vector_mode=args.vector_mode)

    # ---- networks
    agent = Agent(obs_dim, act_dim, discrete, num_tasks, args).to(device)
    loo.start(agent, task_slots(agent), obs_norm, reward_scaler)  # --init-from weights and statistics; what does not train is frozen
    optimizer = optim.Adam(loo.trainable(agent.parameters()), lr=args.learning_rate, eps=1e-5, fused=True)  # fused: ~30% faster steps on CPU, same maths
    params = param_counts(agent, num_tasks)
    derived = {"num_tasks": num_tasks, "num_envs": num_envs, "batch_size": batch_size, "minibatch_size": batch_size // args.num_minibatches,
               "num_iterations": num_iterations, "final_step": num_iterations * batch_size, "params": params, "device": str(device)}
    derived["loo"] = loo.info  # train tasks, fixed slots, regime, init-from step, trainable and frozen parameter counts

    # ---- run directory, resume
    run = mtrun.Run(args, ALGO, suite.task_names, derived)
    global_step, start_iteration, gradient_steps = 0, 1, 0

    def checkpoint_state(step: int, iteration: int) -> dict:
        return {"agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "obs_norm": obs_norm.state_dict(),
                "reward_scaler": reward_scaler.state_dict(), "global_step": step, "iteration": iteration,
                "gradient_steps": gradient_steps, "rng": mtrun.rng_state()}

    ckpt = run.load_checkpoint()
    if ckpt is not None:
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
        obs_norm.load_state_dict(ckpt["obs_norm"])
        reward_scaler.load_state_dict(ckpt["reward_scaler"])
        mtrun.set_rng_state(ckpt["rng"])
        global_step, start_iteration, gradient_steps = ckpt["global_step"], ckpt["iteration"], ckpt["gradient_steps"]
        restored = checkpoint_state(global_step, start_iteration)
        restored["rng"] = ckpt["rng"]
        print(f"resumed {run.dir} at step {global_step} (state fingerprint {mtrun.state_fingerprint(restored)})", flush=True)
    run.open_logs(global_step)

    def evaluate(step: int) -> dict:
        agent.eval()
        results = evaluator.run(lambda x, t: agent.get_action_and_value(x, t, deterministic=True)[0], obs_norm)
        agent.train()
        return run.log_eval(step, results)

    # ---- rollout storage: env-major (num_envs, num_steps, ...), numpy; moved to the device once per iteration.
    # Networks take (groups, samples, features) with one task id per group: a group is an env here.
    obs_buf = np.zeros((num_envs, args.num_steps, obs_dim), np.float32)
    actions_buf = np.zeros((num_envs, args.num_steps) + (() if discrete else (act_dim,)), np.int64 if discrete else np.float32)
    logprobs_buf = np.zeros((num_envs, args.num_steps), np.float32)
    rewards_buf = np.zeros((num_envs, args.num_steps), np.float32)
    values_buf = np.zeros((num_envs, args.num_steps), np.float32)
    terminations_buf = np.zeros((num_envs, args.num_steps), bool)
    truncations_buf = np.zeros((num_envs, args.num_steps), bool)
    final_values_buf = np.zeros((num_envs, args.num_steps), np.float32)

    next_obs, _ = envs.reset(seed=[args.seed + i for i in range(num_envs)])
    tracker = mtenvs.EpisodeTracker(suite, task_ids)
    episodes = mtrun.RecentEpisodes(suite.task_names)
    progress = mtrun.Progress(num_iterations * batch_size, args.progress)
    start_time, start_step = time.time(), global_step
    last_eval = None
    if args.init_from and not args.resume:  # a transfer: the pre-trained network before any update (zero-shot: the jumpstart)
        evaluate(0)

    for iteration in range(start_iteration, num_iterations + 1):
        iteration_start_step = global_step
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        # ---- rollout
        rollout_start = time.time()
        for step in range(args.num_steps):
            if run.stop_signal is not None:
                break
            x = obs_norm(next_obs)
            obs_buf[:, step] = x
            with torch.inference_mode():
                action, logprob, _, value = agent.get_action_and_value(torch.as_tensor(x, device=device)[:, None], task_ids_t)
            action = action[:, 0].cpu().numpy()
            actions_buf[:, step], logprobs_buf[:, step], values_buf[:, step] = action, logprob[:, 0].cpu().numpy(), value[:, 0].cpu().numpy()
            next_obs, reward, terminations, truncations, infos = envs.step(action if act_clip is None else np.clip(action, *act_clip))
            done = terminations | truncations
            rewards_buf[:, step] = reward_scaler(reward, done)
            terminations_buf[:, step], truncations_buf[:, step] = terminations, truncations
            bootstrap = truncations & ~terminations  # truncation is not termination: bootstrap from the true final obs
            if bootstrap.any():
                idx = np.flatnonzero(bootstrap)
                final_x = obs_norm(mtenvs.final_obs(next_obs, infos, bootstrap)[idx], update=False)
                with torch.inference_mode():
                    final_values = agent.get_value(torch.as_tensor(final_x, device=device)[:, None], task_ids_t[idx])
                final_values_buf[idx, step] = final_values[:, 0].cpu().numpy()
            episodes.add(tracker.step(reward, terminations, truncations, infos))
            global_step += num_envs
            progress.update(global_step, (global_step - start_step) / (time.time() - start_time), episodes.summary_line)
        if run.stop_signal is not None:  # the partial rollout is dropped; the checkpoint holds the iteration start
            run.save_checkpoint(checkpoint_state(iteration_start_step, iteration))
            run.close()
            progress.close()
            print(f"stopped by signal {run.stop_signal}; checkpoint at step {iteration_start_step}: resume with --resume {run.dir}", flush=True)
            raise SystemExit(128 + run.stop_signal)
        rollout_time = time.time() - rollout_start

        # ---- GAE
        with torch.inference_mode():
            next_value = agent.get_value(torch.as_tensor(obs_norm(next_obs, update=False), device=device)[:, None], task_ids_t)[:, 0].cpu().numpy()
        advantages, returns = compute_gae(rewards_buf.T, values_buf.T, next_value, terminations_buf.T, truncations_buf.T, final_values_buf.T,
                                          args.gamma, args.gae_lambda)
        advantages, returns = advantages.T, returns.T

        # ---- update (env-stratified minibatches: shuffled time indices, every env in every minibatch: (num_envs, minibatch_steps, ...))
        b_obs = torch.as_tensor(obs_buf, device=device)
        b_actions = torch.as_tensor(actions_buf, device=device)
        b_logprobs = torch.as_tensor(logprobs_buf, device=device)
        b_advantages = torch.as_tensor(advantages, device=device)
        b_returns = torch.as_tensor(returns, device=device)
        b_values = torch.as_tensor(values_buf, device=device)
        stats, first_ratio_dev = [], None
        task_losses, mask_counts, resets = [], torch.zeros(num_tasks, device=device), 0
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        for epoch in range(args.update_epochs):
            time_perm = torch.randperm(args.num_steps, device=device)
            for start in range(0, args.num_steps, minibatch_steps):
                t_idx = time_perm[start : start + minibatch_steps]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[:, t_idx], task_ids_t, b_actions[:, t_idx])
                logratio = newlogprob - b_logprobs[:, t_idx]
                ratio = logratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
                    if first_ratio_dev is None:
                        first_ratio_dev = (ratio - 1).abs().max()
                mb_advantages = b_advantages[:, t_idx]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                pg_losses = torch.max(-mb_advantages * ratio, -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef))
                mb_returns = b_returns[:, t_idx]
                if args.clip_vloss:
                    mb_values = b_values[:, t_idx]
                    v_clipped = mb_values + torch.clamp(newvalue - mb_values, -args.clip_coef, args.clip_coef)
                    v_losses = 0.5 * torch.max((newvalue - mb_returns) ** 2, (v_clipped - mb_returns) ** 2)
                else:
                    v_losses = 0.5 * (newvalue - mb_returns) ** 2
                # per-task losses L_t (means over each task's samples); their mean is the template's loss
                pg_task, v_task, entropy_task = (per_task_mean(x, task_ids_t, num_tasks)[loo.train_ids] for x in (pg_losses, v_losses, entropy))
                task_loss = pg_task - args.ent_coef * entropy_task + args.vf_coef * v_task
                pg_loss, v_loss, entropy_loss = pg_task.mean(), v_task.mean(), entropy_task.mean()
                loss = task_loss.mean()
                nonfinite |= ~torch.isfinite(loss)

                optimizer.zero_grad(set_to_none=True)
                masked = backward_with_maskout(agent, task_loss, args.maskout_threshold)  # loss.backward() with loss maskout
                loo.mask_gradients()  # frozen entries: other tasks' slots (and every shared entry with --transfer task-only)
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                gradient_steps += 1
                task_losses.append(task_loss.detach())
                if masked is not None:
                    mask_counts[loo.train_ids] += masked
                    if args.w_reset:
                        coef = agent.reset_w(masked, args.w_reset_mix, loo.train_ids)
                        resets += 0 if coef is None else coef.shape[0]
                stats.append(torch.stack([pg_loss, v_loss, entropy_loss, approx_kl, clipfrac]).detach())
            if args.target_kl is not None and approx_kl > args.target_kl:
                break
        mtrun.check_finite(nonfinite, run, global_step)

        # ---- logging, evaluation, checkpoint
        pg, vl, ent, kl, cf = torch.stack(stats).mean(0).tolist()
        task_losses = torch.stack(task_losses)  # (minibatch steps, train tasks)
        sps = (global_step - start_step) / (time.time() - start_time)
        run.log({"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/SPS": sps, "charts/rollout_SPS": batch_size / rollout_time,
                 "charts/gradient_steps": gradient_steps, "charts/wall_clock_s": time.time() - run.start_time,
                 "losses/policy_loss": pg, "losses/value_loss": vl, "losses/entropy": ent, "losses/approx_kl": kl, "losses/clipfrac": cf,
                 "losses/explained_variance": explained_variance(values_buf.ravel(), returns.ravel()),
                 "debug/first_minibatch_max_ratio_dev": float(first_ratio_dev), "paco/masked_tasks": int((mask_counts > 0).sum()),
                 "paco/mask_events": int(mask_counts.sum()), "paco/w_resets": resets, "paco/task_loss_max": task_losses.max().item(),
                 **{f"paco/task_loss/{name}": v for name, v in zip(loo.train_names, task_losses.mean(0).tolist())},
                 **{f"paco/masked/{name}": v for name, v in zip(suite.task_names, mask_counts.tolist())},
                 **paco_diagnostics(agent, suite.task_names), **episodes.scalars()}, global_step)
        if iteration == num_iterations or (args.eval_every and global_step // args.eval_every > iteration_start_step // args.eval_every):
            last_eval = evaluate(global_step)
            progress.update(global_step, sps, f"eval success {last_eval['mean_success']:.2f} return {last_eval['mean_return']:.1f}", force=True)
        if iteration == num_iterations or (args.checkpoint_every and global_step // args.checkpoint_every > iteration_start_step // args.checkpoint_every):
            run.save_checkpoint(checkpoint_state(global_step, iteration + 1))

    progress.close()
    if last_eval is None:  # resumed at the final step
        last_eval = evaluate(global_step)
    run.finish({"total_steps": global_step, "final_success": last_eval["success"], "final_return": last_eval["return"],
                "mean_success": last_eval["mean_success"], "mean_return": last_eval["mean_return"], "params": params,
                "final_w": {k: w.tolist() for k, w in zip(["actor_critic" if agent.critic_w is None else "actor", "critic"], agent.w_params())},
                "wall_clock_s": time.time() - run.start_time, "mean_SPS": (global_step - start_step) / max(time.time() - start_time, 1e-9)})
    envs.close()
    evaluator.close()


if __name__ == "__main__":
    main(mtrun.parse_args(Args, ALGO, validate))
