"""ppo_pcgrad: gradient surgery (PCGrad, Yu et al. NeurIPS 2020) on ppo_mtl_embed, CleanRL style.

Same network as ppo_mtl_embed. In every minibatch, the PPO loss averaged over each task's samples gives
per-task losses L_k and per-task gradients g_k of the shared parameters (all T from one backward pass).
Each task i visits the other tasks j in a fresh random order and, whenever ``g_i^PC . g_j < 0``,
removes from g_i^PC its component along the original g_j; the update direction is the mean (or, as in
the paper, the sum) of the projected gradients, then grad-norm clip and Adam as usual. Actor parameters
(policy and entropy loss) and critic parameters (value loss) are projected separately; task-specific
parameters (log-std rows, embedding rows, the first layers' one-hot columns) keep their plain gradient.
Definitions: context/spec/baselines.md section 3; notes: context/pcgrad.md. This file is ppo_mtl_embed
plus the method.
LOO (``--train-tasks``, ``--init-from``, ``--transfer``): task k's slot is column k of the one-hot input of the first layer of
actor and critic (row k of both embeddings with ``--task-encoding embedding``) and row k of the log-std (``task_slots``).
Run: ``python src/algos/ppo_pcgrad.py --config configs/toy_cartpole_mt10.toml``.
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

ALGO = "ppo_pcgrad"


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
    task_encoding: Literal["onehot", "embedding", "none"] = "onehot"
    """how the task enters the network: one-hot appended to the observation, a learned embedding, or none (task-blind control)"""
    task_embedding_dim: int = 16
    """embedding width with --task-encoding embedding (actor and critic each learn their own table)"""

    # ---- PCGrad (baselines.md section 3)
    pcgrad_reduction: Literal["mean", "sum"] = "mean"
    """combine the projected per-task gradients by their mean (the template's scale) or sum (the paper); task-specific parameters follow"""
    pcgrad_task_params: Literal["plain", "project"] = "plain"
    """plain: log-std rows, embedding rows and one-hot columns keep their plain gradient; project: they enter the surgery too (official code)"""


def validate(args: Args) -> None:
    mtenvs.make_suite(args.env_id)
    if args.task_embedding_dim <= 0:
        raise mtrun.ArgError(f"--task-embedding-dim must be > 0, got {args.task_embedding_dim}")


# ----------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------
class Agent(nn.Module):
    """Separate actor and critic MLPs on [observation, task encoding]; per-task log-std."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, num_tasks: int, args: Args):
        super().__init__()
        self.num_tasks, self.encoding = num_tasks, args.task_encoding
        task_dim = {"onehot": num_tasks, "embedding": args.task_embedding_dim, "none": 0}[args.task_encoding]
        if args.task_encoding == "embedding":
            self.actor_embedding = nn.Embedding(num_tasks, task_dim)
            self.critic_embedding = nn.Embedding(num_tasks, task_dim)

        def mlp(out_dim: int, out_std: float) -> nn.Sequential:
            layers, d = [], obs_dim + task_dim
            for h in args.hidden_sizes:
                layers += [layer_init(nn.Linear(d, h)), ACTIVATIONS[args.activation]()]
                d = h
            return nn.Sequential(*layers, layer_init(nn.Linear(d, out_dim), std=out_std))

        self.critic = mlp(1, 1.0)
        self.actor = mlp(act_dim, 0.01)
        self.actor_logstd = None if discrete else nn.Parameter(torch.zeros(num_tasks, act_dim))

    def task_input(self, x, task_ids, embedding: nn.Embedding | None):
        """Append the task encoding of each group to its samples: (G, M, obs_dim) -> (G, M, obs_dim + task_dim)."""
        if self.encoding == "none":
            return x
        enc = nn.functional.one_hot(task_ids, self.num_tasks).to(x.dtype) if embedding is None else embedding(task_ids)
        return torch.cat([x, enc[:, None].expand(-1, x.shape[1], -1)], -1)

    def get_value(self, x, task_ids):
        """x: (groups, samples, obs_dim), task_ids: (groups,) -> values (groups, samples)."""
        return self.critic(self.task_input(x, task_ids, getattr(self, "critic_embedding", None))).squeeze(-1)

    def get_action_and_value(self, x, task_ids, action=None, deterministic=False):
        logstd = None if self.actor_logstd is None else self.actor_logstd[task_ids][:, None]
        actor_x = self.task_input(x, task_ids, getattr(self, "actor_embedding", None))
        action, logprob, entropy = action_head(self.actor(actor_x), logstd, action, deterministic)
        return action, logprob, entropy, self.get_value(x, task_ids)


def param_counts(agent: Agent, num_tasks: int) -> dict:
    """Active per task: every scalar that enters one task's forward pass. Other tasks' one-hot columns of
    the first layers (multiplied by 0), embedding rows and log-std rows do not."""
    total = sum(p.numel() for p in agent.parameters())
    per_task_only = 0 if agent.actor_logstd is None else agent.actor_logstd.shape[1]
    if agent.encoding == "onehot":
        per_task_only += agent.actor[0].out_features + agent.critic[0].out_features
    elif agent.encoding == "embedding":
        per_task_only += agent.actor_embedding.embedding_dim + agent.critic_embedding.embedding_dim
    if agent.actor_logstd is None and agent.encoding == "none":
        return {"active_per_task": total, "inference": total, "total": total}
    return {"active_per_task": total - (num_tasks - 1) * per_task_only, "inference": total, "total": total}


def task_slots(agent: Agent) -> list[tuple[torch.Tensor, int, int]]:
    """Each task's own entries for LOO (protocol.md section 7), as (parameter, dim, offset): task t's entry is index
    offset + t along dim. The one-hot column of the first layer of actor and critic (or the task's row of both
    embeddings) and the task's log-std row; with --task-encoding none only the log-std row."""
    slots = [] if agent.actor_logstd is None else [(agent.actor_logstd, 0, 0)]
    if agent.encoding == "onehot":
        obs_dim = agent.actor[0].in_features - agent.num_tasks
        slots += [(agent.actor[0].weight, 1, obs_dim), (agent.critic[0].weight, 1, obs_dim)]
    elif agent.encoding == "embedding":
        slots += [(agent.actor_embedding.weight, 0, 0), (agent.critic_embedding.weight, 0, 0)]
    return slots


# ----------------------------------------------------------------------------------------------
# PCGrad
# ----------------------------------------------------------------------------------------------
def draw_orders(num_tasks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each task i, the other tasks in a fresh random order: one ``torch.randperm`` per i (torch's RNG,
    so a seeded run draws the same orders). Returns (T, T-1) task indices."""
    orders = []
    for i in range(num_tasks):
        others = torch.cat([torch.arange(i), torch.arange(i + 1, num_tasks)])
        orders.append(others[torch.randperm(num_tasks - 1, generator=generator)])
    return torch.stack(orders) if orders else torch.zeros((0, 0), dtype=torch.long)


def pcgrad_coefficients(gram: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 of the paper, run in the span of the original gradients, which holds every g_i^PC.

    ``gram[i, j] = g_i . g_j``; ``orders[i]`` lists the tasks j that task i visits, in order. Returns
    ``coef`` (T, T) with ``g_i^PC = sum_m coef[i, m] g_m`` and ``projected`` (T, T-1), whether task i
    projected at its s-th visit. Step s runs every task's s-th visit at once: ``g_i^PC . g_j =
    sum_m coef[i, m] gram[m, j]``; if it is < 0, ``g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j`` (the original
    g_j) is ``coef[i, j] -= g_i^PC . g_j / gram[j, j]``. Exact in exact arithmetic; O(T^3) after the Gram
    matrix instead of O(T^2 P). The recursion runs in float64."""
    num_tasks = gram.shape[0]
    gram = gram.double()
    coef = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    rows = torch.arange(num_tasks, device=gram.device)
    orders = orders.to(gram.device)
    projected = torch.zeros(orders.shape, dtype=torch.bool, device=gram.device)
    for s in range(orders.shape[1]):
        j = orders[:, s]
        dot = (coef * gram[:, j].T).sum(1)  # g_i^PC . g_j for every i, with j = orders[i, s]
        projected[:, s] = dot < 0
        coef[rows, j] -= torch.where(projected[:, s], dot / gram[j, j].clamp_min(1e-30), 0.0)
    return coef, projected


def pcgrad_project(grads: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The surgery on a (T, P) matrix of per-task gradients: returns the projected gradients g^PC (T, P)
    and ``projected`` (T, T-1) (see pcgrad_coefficients)."""
    coef, projected = pcgrad_coefficients(grads @ grads.T, orders)
    return coef.to(grads.dtype) @ grads, projected


def surgery_stats(gram: torch.Tensor, projected: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[conflict_frac, mean_cosine, projected_frac, update_cosine, update_norm_ratio] of one group.

    conflict_frac: fraction of the T(T-1)/2 unordered task pairs with g_i . g_j < 0 (the same fraction
    of ordered pairs: the dot product is symmetric); mean_cosine: mean pairwise cosine of the original
    gradients (a zero gradient counts as cosine 0); projected_frac: fraction of the T(T-1) visits of
    Algorithm 1 that projected; update_cosine, update_norm_ratio: the PCGrad direction sum_m weights[m] g_m
    against the plain direction sum_m g_m (cosine and norm ratio)."""
    gram, weights = gram.double(), weights.double()
    num_tasks = gram.shape[0]
    pairs = torch.triu_indices(num_tasks, num_tasks, 1, device=gram.device)
    norms = gram.diagonal().clamp_min(0).sqrt()
    cosine = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    num_pairs = max(pairs.shape[1], 1)
    ones = torch.ones_like(weights)
    plain_sq, pc_sq, cross = ones @ gram @ ones, weights @ gram @ weights, weights @ gram @ ones
    return torch.stack([(gram[pairs[0], pairs[1]] < 0).double().sum() / num_pairs, cosine[pairs[0], pairs[1]].sum() / num_pairs,
                        projected.double().sum() / max(projected.numel(), 1), cross / (plain_sq * pc_sq).sqrt().clamp_min(1e-30),
                        (pc_sq / plain_sq.clamp_min(1e-30)).sqrt()]).float()


class PerTaskGradients:
    """Exact per-task gradients of every parameter from the ONE backward pass of the loss (sum over tasks
    of per-task terms), instead of T backward passes.

    Nothing in the network or the loss mixes samples (no batch norm; the advantages are normalised with
    constant statistics), so a sample's output reaches only its own task's term. A Linear layer's weight
    gradient is ``sum over samples of dL/dy x^T`` and its bias gradient ``sum of dL/dy``; summing over one
    task's samples only gives that task's gradient exactly. Forward hooks keep x and dL/dy of every Linear
    layer for the last forward pass run with autograd on (rollouts and evaluation run without autograd and
    are not kept). Task-row parameters (log-std rows, embedding rows) reach only their own task, so the
    task-k gradient of such a table is row k of its gradient and zero elsewhere. Only the tasks that have envs
    (``self.tasks``: all but the held-out ones of a LOO pre-training) get a gradient: a task without samples has none."""

    def __init__(self, agent: Agent, task_ids: torch.Tensor):
        self.tasks, counts = torch.unique(task_ids, return_counts=True)  # sorted, as argsort below orders the groups
        if (counts != counts[0]).any():
            raise ValueError(f"every task needs the same number of envs, got {counts.tolist()}")
        self.num_tasks = len(self.tasks)
        self.order = torch.argsort(task_ids, stable=True)  # groups (envs) sorted by task
        self.layer_of, self.saved = {}, {}
        for module in agent.modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(self.keep)
                self.layer_of[id(module.weight)] = self.layer_of[id(module.bias)] = module
        tables = [agent.actor_logstd, getattr(agent, "actor_embedding", None), getattr(agent, "critic_embedding", None)]
        self.task_rows = {id(t if isinstance(t, nn.Parameter) else t.weight) for t in tables if t is not None}
        unknown = [n for n, p in agent.named_parameters() if id(p) not in self.layer_of and id(p) not in self.task_rows]
        if unknown:
            raise ValueError(f"no per-task gradient rule for {unknown}")

    def keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            saved = self.saved[module] = [inputs[0].detach(), None]
            output.register_hook(lambda grad: saved.__setitem__(1, grad))

    def by_task(self, z: torch.Tensor) -> torch.Tensor:
        """(groups, samples, d) -> (tasks with envs, samples of one task, d)."""
        return z[self.order].reshape(self.num_tasks, -1, z.shape[-1])

    def __call__(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """g_k of each parameter, (tasks with envs, *p.shape), for the loss just backpropagated (call after backward)."""
        out = []
        for p in params:
            if id(p) in self.layer_of:
                layer = self.layer_of[id(p)]
                x, dy = self.saved[layer]
                x, dy = self.by_task(x), self.by_task(dy)
                out.append(torch.bmm(dy.transpose(1, 2), x) if p is layer.weight else dy.sum(1))
            else:
                g = torch.zeros((self.num_tasks, *p.shape), dtype=p.dtype, device=p.device)
                rows = torch.arange(self.num_tasks, device=p.device)
                g[rows, self.tasks] = p.grad[self.tasks]
                out.append(g)
        return out


def surgery_groups(agent: Agent, obs_dim: int, task_params: str) -> dict[str, tuple[list, list]]:
    """The parameters PCGrad projects, in two groups projected separately (actor: policy and entropy loss;
    critic: value loss), each parameter with the mask of its shared entries (None: all shared).

    With ``task_params="plain"``, the task-specific parameters keep their plain gradient: the log-std and
    embedding rows are in no group, and the first layers' one-hot columns (column k only ever multiplies
    task k's one-hot) are masked out. With ``"project"`` every parameter enters its group's surgery. Frozen parameters
    (``requires_grad`` False: LOO's --transfer task-only) are in no group, and a group left empty is dropped."""
    groups = {}
    for net in ["actor", "critic"]:
        params, masks = [], []
        for name, p in getattr(agent, net).named_parameters():
            mask = None
            if name == "0.weight" and agent.encoding == "onehot" and task_params == "plain":
                mask = torch.ones_like(p, dtype=torch.bool)
                mask[:, obs_dim:] = False
            if p.requires_grad:
                params.append(p)
                masks.append(mask)
        if task_params == "project":
            tables = [getattr(agent, f"{net}_embedding", None)] + ([agent.actor_logstd] if net == "actor" else [])
            for t in tables:
                if t is not None and (t if isinstance(t, nn.Parameter) else t.weight).requires_grad:
                    params.append(t if isinstance(t, nn.Parameter) else t.weight)
                    masks.append(None)
        if params:
            groups[net] = (params, masks)
    return groups


def pcgrad_gradients(groups: dict, task_grads: PerTaskGradients) -> torch.Tensor:
    """Call after ``loss.backward()``: every p.grad holds the plain gradient of the loss (sum over tasks of its
    terms, L_k / T for the mean reduction, L_k for the sum). Replaces the shared entries of each group by
    ``sum_i g_i^PC`` of the per-task gradients of those terms (the mean or the sum of the projected
    gradients of the L_k: the surgery commutes with scaling all g_k by 1/T). One Gram matrix per group,
    the surgery in its coefficients, and one weighted sum of the per-task gradients per parameter.
    Returns the diagnostics, (groups, 5) (see surgery_stats)."""
    stats = []
    for params, masks in groups.values():
        grads = [g if m is None else g * m for g, m in zip(task_grads(params), masks)]  # task-specific entries -> 0
        gram = sum(g.flatten(1) @ g.flatten(1).T for g in grads)  # gram[i, j] = g_i . g_j
        coef, projected = pcgrad_coefficients(gram, draw_orders(len(gram)))
        weights = coef.sum(0)  # sum_i g_i^PC = sum_m weights[m] g_m
        for p, m, g in zip(params, masks, grads):
            direction = torch.tensordot(weights.to(g.dtype), g, 1)
            p.grad = direction if m is None else torch.where(m, direction, p.grad)
        stats.append(surgery_stats(gram, projected, weights))
    return torch.stack(stats)


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
    task_grads = PerTaskGradients(agent, task_ids_t)  # hooks on the Linear layers: per-task gradients from one backward
    groups = surgery_groups(agent, obs_dim, args.pcgrad_task_params)
    task_avg = nn.functional.one_hot(task_ids_t, num_tasks).T[loo.train_ids].float() / args.envs_per_task  # (train tasks, envs): mean over task k's envs
    derived = {"num_tasks": num_tasks, "num_envs": num_envs, "batch_size": batch_size, "minibatch_size": batch_size // args.num_minibatches,
               "num_iterations": num_iterations, "final_step": num_iterations * batch_size, "params": params, "device": str(device),
               "pcgrad_projected_params": {net: sum(p.numel() if m is None else int(m.sum()) for p, m in zip(*groups[net])) for net in groups}}
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
        stats, first_ratio_dev, pcgrad_stats = [], None, []
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
                    v_losses = 0.5 * ((newvalue - mb_returns) ** 2)
                pg_loss, v_loss, entropy_loss = pg_losses.mean(), v_losses.mean(), entropy.mean()
                task_loss = task_avg @ (pg_losses - args.ent_coef * entropy + args.vf_coef * v_losses).mean(1)  # L_k, (train tasks,)
                loss = task_loss.mean() if args.pcgrad_reduction == "mean" else task_loss.sum()  # mean: the template's loss
                nonfinite |= ~torch.isfinite(loss)

                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # the plain gradient; the hooks keep what the per-task gradients need
                pcgrad_stats.append(pcgrad_gradients(groups, task_grads))  # shared entries <- sum_i g_i^PC, actor and critic apart
                loo.mask_gradients()  # frozen entries: other tasks' slots (and every shared entry with --transfer task-only)
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                gradient_steps += 1
                stats.append(torch.stack([pg_loss, v_loss, entropy_loss, approx_kl, clipfrac]).detach())
            if args.target_kl is not None and approx_kl > args.target_kl:
                break
        mtrun.check_finite(nonfinite, run, global_step)

        # ---- logging, evaluation, checkpoint
        pg, vl, ent, kl, cf = torch.stack(stats).mean(0).tolist()
        pc = torch.stack(pcgrad_stats).mean(0).tolist()  # (groups, 5), mean over the minibatches of the iteration
        pcgrad_log = {f"pcgrad/{stat}/{net}": pc[g][k] for g, net in enumerate(groups)
                      for k, stat in enumerate(["conflict_frac", "mean_cosine", "projected_frac", "update_cosine", "update_norm_ratio"])}
        sps = (global_step - start_step) / (time.time() - start_time)
        run.log({"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/SPS": sps, "charts/rollout_SPS": batch_size / rollout_time,
                 "charts/gradient_steps": gradient_steps, "charts/wall_clock_s": time.time() - run.start_time,
                 "losses/policy_loss": pg, "losses/value_loss": vl, "losses/entropy": ent, "losses/approx_kl": kl, "losses/clipfrac": cf,
                 "losses/explained_variance": explained_variance(values_buf.ravel(), returns.ravel()),
                 "debug/first_minibatch_max_ratio_dev": float(first_ratio_dev), **pcgrad_log, **episodes.scalars()}, global_step)
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
                "wall_clock_s": time.time() - run.start_time, "mean_SPS": (global_step - start_step) / max(time.time() - start_time, 1e-9)})
    envs.close()
    evaluator.close()


if __name__ == "__main__":
    main(mtrun.parse_args(Args, ALGO, validate))
