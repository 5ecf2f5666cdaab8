"""ppo_softmod: soft modularization (Yang et al., NeurIPS 2020) on the PPO backbone, CleanRL style.

Actor and critic are each a routed network: a state embedding ``f(s)`` (2-layer MLP) and a task
embedding ``h(z_t)`` (a linear map of the one-hot) feed a routing network that turns ``f(s) * h(z_t)``
into soft routing probabilities between consecutive layers of ``n`` modules (for each module of the
next layer, a softmax over the modules of the previous layer); the last layer's modules are summed and
an output head reads the sum. ``--softmod-variant official`` switches to the official code's network
(gating MLP, routing conditioned on all previous probabilities, activation after the weighted sum, a
final routing vector); its routing network uses ReLU whatever ``--activation`` is, as the official code
does. The paper's SAC-temperature loss reweighting has no PPO counterpart and is left out.
Definitions and every departure: context/softmod.md; this file is ppo_mtl_embed plus the method.
LOO (``--train-tasks``, ``--init-from``, ``--transfer``): task k's slot is its task embedding, column k of the weight of h (the
linear map of the one-hot) in actor and critic, and row k of the log-std (``task_slots``); h's bias is shared.
Run: ``python src/algos/ppo_softmod.py --config configs/toy_cartpole_mt10.toml``.
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

ALGO = "ppo_softmod"


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

    # ---- Soft Modularization (baselines.md section 5, context/softmod.md)
    num_modules: int = 2
    """n: modules per layer; the L = len(hidden_sizes) module layers have modules hidden_sizes[l] wide (paper MT10: L = 2, n = 2, 256)"""
    embedding_dim: Optional[int] = None
    """D: width of the embeddings f(s), h(z) and of the routing features; None = hidden_sizes[0] (scales with capacity matching)"""
    softmod_variant: Literal["paper", "official"] = "paper"
    """paper: the paper's equations; official: the official code's network (context/softmod.md section 3)"""


def validate(args: Args) -> None:
    mtenvs.make_suite(args.env_id)
    if len(args.hidden_sizes) < 2:
        raise mtrun.ArgError(f"--hidden-sizes must give at least 2 module layers (routing runs between consecutive layers), got {args.hidden_sizes}")
    if args.num_modules < 2:
        raise mtrun.ArgError(f"--num-modules must be >= 2 (one module per layer leaves nothing to route), got {args.num_modules}")
    if args.embedding_dim is not None and args.embedding_dim <= 0:
        raise mtrun.ArgError(f"--embedding-dim must be > 0 (or unset for hidden_sizes[0]), got {args.embedding_dim}")


# ----------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------
class SoftModularNetwork(nn.Module):
    """One routed network (the actor's or the critic's): state embedding f, task embedding h, routing network,
    L = len(hidden_sizes) layers of n modules and an output head. Inputs are grouped, ``x: (G, M, obs_dim)``
    with one task per group (``task_ids: (G,)``); the output is ``(G, M, out_dim)``."""

    def __init__(self, obs_dim: int, out_dim: int, out_std: float, num_tasks: int, args: Args):
        super().__init__()
        n, widths = args.num_modules, tuple(args.hidden_sizes)
        dim = args.embedding_dim or widths[0]  # D
        self.n, self.official = n, args.softmod_variant == "official"
        self.activation = ACTIVATIONS[args.activation]()
        # f(s): 2-layer MLP with a linear output; h(z): a linear map of the one-hot (column t of its weight is task t's embedding)
        self.state_embedding = nn.Sequential(layer_init(nn.Linear(obs_dim, dim)), ACTIVATIONS[args.activation](), layer_init(nn.Linear(dim, dim)))
        self.task_embedding = layer_init(nn.Linear(num_tasks, dim))
        # base network: module layer l stores its n modules as one weight (n, out, in) and bias (n, out); layer 1 reads f(s)
        dims = (dim, *widths)
        self.module_weight = nn.ParameterList(
            [nn.Parameter(torch.stack([nn.init.orthogonal_(torch.empty(o, i), math.sqrt(2)) for _ in range(n)])) for i, o in zip(dims[:-1], dims[1:])])
        self.module_bias = nn.ParameterList([nn.Parameter(torch.zeros(n, o)) for o in widths])
        self.head = layer_init(nn.Linear(widths[-1], out_dim), std=out_std)
        # routing network: W_d (features -> n*n logits, small init: near-uniform routing at the start) and W_u (probabilities -> features)
        num_routes = len(widths) - 1
        if self.official:
            feat = widths[0]  # the official gating MLP is as wide as a module (256 and 256)
            # the official routing network (gating MLP, W_d input, conditioned features) uses ReLU whatever --activation is;
            # the state embedding and the modules keep --activation (context/softmod.md section 3)
            self.gate_activation = nn.ReLU()
            self.gating = nn.Sequential(layer_init(nn.Linear(dim, feat)), nn.ReLU(), layer_init(nn.Linear(feat, feat)))
            self.route_up = nn.ModuleList([layer_init(nn.Linear(k * n * n, feat)) for k in range(1, num_routes + 1)])  # reads all previous p-hat
            self.route_last = layer_init(nn.Linear(feat, n), std=0.01)  # the final routing vector over the last layer's modules
        else:
            feat = dim
            self.route_up = nn.ModuleList([layer_init(nn.Linear(n * n, feat)) for _ in range(num_routes - 1)])
        self.route_down = nn.ModuleList([layer_init(nn.Linear(feat, n * n), std=0.01) for _ in range(num_routes)])

    def embed(self, x, task_ids):
        """f(s) and the routing input f(s) * h(z_t), both (G, M, D)."""
        state = self.state_embedding(x)
        task = self.task_embedding.weight.T[task_ids] + self.task_embedding.bias  # h(z_t) = W_h one_hot(t) + b_h: (G, D)
        return state, state * task[:, None]

    def routing(self, cond):
        """The routing probabilities: L-1 tensors (G, M, n, n) whose [..., j, i] weighs module i of layer l in the input
        of module j of layer l+1 (softmax over i), and the official final routing vector (G, M, n) (None for the paper)."""
        act, shape = self.activation, cond.shape[:-1] + (self.n, self.n)
        if not self.official:
            logits = [self.route_down[0](act(cond))]  # p^1 = W_d^1 act(f(s) * h(z))
            for up, down in zip(self.route_up, self.route_down[1:]):
                logits.append(down(act(up(logits[-1]) * cond)))  # p^(l+1) = W_d^(l+1) act((W_u^(l+1) p^l) * f(s) * h(z))
            return [torch.softmax(p.view(shape), -1) for p in logits], None
        relu = self.gate_activation  # official: ReLU throughout the routing network, whatever --activation is
        cond = self.gating(relu(cond))
        probs = [torch.softmax(self.route_down[0](relu(cond)).view(shape), -1)]
        for k, up in enumerate(self.route_up):
            feats = relu(up(torch.cat([p.flatten(-2) for p in probs], -1)) * cond)
            if k + 1 < len(self.route_down):
                probs.append(torch.softmax(self.route_down[k + 1](feats).view(shape), -1))
            else:
                return probs, torch.softmax(self.route_last(feats), -1)

    def forward(self, x, task_ids, return_routing=False):
        state, cond = self.embed(x, task_ids)
        probs, last = self.routing(cond)
        act = self.activation
        inp = act(state) if self.official else state  # the input of every module of layer 1
        w, b = self.module_weight[0], self.module_bias[0]
        y = nn.functional.linear(inp, w.flatten(0, 1), b.flatten()).unflatten(-1, w.shape[:2])  # all n modules in one matmul: (G, M, n, d_1)
        for p, w, b in zip(probs, self.module_weight[1:], self.module_bias[1:]):
            # paper: f_j^(l+1) = sum_i p_ji act(W_i f_i + b_i); official: act(sum_i p_ji (W_i f_i + b_i))
            inp = act(p @ y) if self.official else p @ act(y)
            y = torch.einsum("gmni,noi->gmno", inp, w) + b
        out = act((last.unsqueeze(-1) * y).sum(-2)) if self.official else act(y).sum(-2)  # the output layer reads the last layer's modules
        out = self.head(out)
        return (out, probs, last) if return_routing else out


class Agent(nn.Module):
    """Separate actor and critic soft-modularized networks (each with its own embeddings and routing); per-task log-std."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, num_tasks: int, args: Args):
        super().__init__()
        self.critic = SoftModularNetwork(obs_dim, 1, 1.0, num_tasks, args)
        self.actor = SoftModularNetwork(obs_dim, act_dim, 0.01, num_tasks, args)
        self.actor_logstd = None if discrete else nn.Parameter(torch.zeros(num_tasks, act_dim))

    def get_value(self, x, task_ids):
        """x: (groups, samples, obs_dim), task_ids: (groups,) -> values (groups, samples)."""
        return self.critic(x, task_ids).squeeze(-1)

    def get_action_and_value(self, x, task_ids, action=None, deterministic=False):
        logstd = None if self.actor_logstd is None else self.actor_logstd[task_ids][:, None]
        action, logprob, entropy = action_head(self.actor(x, task_ids), logstd, action, deterministic)
        return action, logprob, entropy, self.get_value(x, task_ids)


def param_counts(agent: Agent, num_tasks: int) -> dict:
    """Active per task: every scalar that enters one task's forward pass: all modules, the routing network, f and h,
    except the other tasks' columns of h's weight (they multiply a 0 of the one-hot) and log-std rows. No merge
    shrinks a routed network for one task, so inference = active."""
    total = sum(p.numel() for p in agent.parameters())
    per_task_only = 0 if agent.actor_logstd is None else agent.actor_logstd.shape[1]
    per_task_only += agent.actor.task_embedding.out_features + agent.critic.task_embedding.out_features
    active = total - (num_tasks - 1) * per_task_only
    return {"active_per_task": active, "inference": active, "total": total}


def task_slots(agent: Agent) -> list[tuple[torch.Tensor, int, int]]:
    """Each task's own entries for LOO (protocol.md section 7), as (parameter, dim, offset): task t's entry is index
    offset + t along dim. Column t of the weight of the task embedding h (the map of the one-hot) of actor and critic,
    i.e. the task's embedding, and its log-std row; h's bias, f, the routing network and the modules are shared."""
    slots = [(agent.actor.task_embedding.weight, 1, 0), (agent.critic.task_embedding.weight, 1, 0)]
    return slots + ([] if agent.actor_logstd is None else [(agent.actor_logstd, 0, 0)])


@torch.no_grad()
def task_routing(net: SoftModularNetwork, obs: torch.Tensor, task_ids: torch.Tensor, num_tasks: int):
    """Every routing distribution of ``net`` on ``obs`` (envs, steps, obs_dim): (envs, steps, rows, n), rows = all
    rows of all routing matrices (and the official final vector), and each task's mean over its samples: (T, rows, n)
    (NaN for a task without samples: the held-out tasks of a LOO pre-training)."""
    probs, last = net.routing(net.embed(obs, task_ids)[1])
    dists = torch.cat([p.flatten(2, -2) for p in probs] + ([] if last is None else [last.unsqueeze(-2)]), 2)
    means = torch.stack([dists[task_ids == t].mean((0, 1)) for t in range(num_tasks)])
    return dists, means


@torch.no_grad()
def routing_diagnostics(agent: Agent, obs: torch.Tensor, task_ids: torch.Tensor, task_names: list[str]) -> dict:
    """On the rollout's observations: mean entropy (nats; uniform = ln n) of the routing distributions; task spread:
    total-variation distance of each task's mean routing from the mean over tasks; state spread: of each sample's
    routing from its task's mean. Actor (per task too) and critic. Only the tasks with samples count."""
    out, present = {}, task_ids.unique()
    for net_name, net in [("", agent.actor), ("_critic", agent.critic)]:
        dists, means = task_routing(net, obs, task_ids, len(task_names))
        entropy = -(dists * dists.clamp_min(1e-12).log()).sum(-1).mean((1, 2))  # per env
        out[f"softmod/routing_entropy{net_name}"] = entropy.mean().item()
        out[f"softmod/routing_task_spread{net_name}"] = (0.5 * (means[present] - means[present].mean(0)).abs().sum(-1)).mean().item()
        out[f"softmod/routing_state_spread{net_name}"] = (0.5 * (dists - means[task_ids][:, None]).abs().sum(-1)).mean().item()
        if not net_name:
            out.update({f"softmod/routing_entropy/{task_names[t]}": entropy[task_ids == t].mean().item() for t in present.tolist()})
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
               "num_iterations": num_iterations, "final_step": num_iterations * batch_size, "params": params, "device": str(device),
               "embedding_dim": args.embedding_dim or args.hidden_sizes[0]}
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
    b_obs = None  # the last rollout's observations, for the final routing summary

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
                pg_loss = torch.max(-mb_advantages * ratio, -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()
                mb_returns = b_returns[:, t_idx]
                if args.clip_vloss:
                    mb_values = b_values[:, t_idx]
                    v_clipped = mb_values + torch.clamp(newvalue - mb_values, -args.clip_coef, args.clip_coef)
                    v_loss = 0.5 * torch.max((newvalue - mb_returns) ** 2, (v_clipped - mb_returns) ** 2).mean()
                else:
                    v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss
                nonfinite |= ~torch.isfinite(loss)

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                loo.mask_gradients()  # frozen entries: other tasks' slots (and every shared entry with --transfer task-only)
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                gradient_steps += 1
                stats.append(torch.stack([pg_loss, v_loss, entropy_loss, approx_kl, clipfrac]).detach())
            if args.target_kl is not None and approx_kl > args.target_kl:
                break
        mtrun.check_finite(nonfinite, run, global_step)
        routing_stats = routing_diagnostics(agent, b_obs, task_ids_t, suite.task_names)

        # ---- logging, evaluation, checkpoint
        pg, vl, ent, kl, cf = torch.stack(stats).mean(0).tolist()
        sps = (global_step - start_step) / (time.time() - start_time)
        run.log({"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/SPS": sps, "charts/rollout_SPS": batch_size / rollout_time,
                 "charts/gradient_steps": gradient_steps, "charts/wall_clock_s": time.time() - run.start_time,
                 "losses/policy_loss": pg, "losses/value_loss": vl, "losses/entropy": ent, "losses/approx_kl": kl, "losses/clipfrac": cf,
                 "losses/explained_variance": explained_variance(values_buf.ravel(), returns.ravel()),
                 "debug/first_minibatch_max_ratio_dev": float(first_ratio_dev), **routing_stats, **episodes.scalars()}, global_step)
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
                "final_routing": None if b_obs is None else dict(zip(loo.train_names, task_routing(agent.actor, b_obs, task_ids_t, num_tasks)[1][loo.train_ids].tolist())),
                "wall_clock_s": time.time() - run.start_time, "mean_SPS": (global_step - start_step) / max(time.time() - start_time, 1e-9)})
    envs.close()
    evaluator.close()


if __name__ == "__main__":
    main(mtrun.parse_args(Args, ALGO, validate))
