"""ppo_mtl_embed: one actor and one critic shared by all tasks, conditioned on the task, CleanRL style.

The task enters as a one-hot vector concatenated to the normalised observation (the Meta-World
convention, default), as a learned embedding, or not at all (``--task-encoding none``: the task-blind
control). Everything else is the PPO backbone of ppo_single (baselines.md sections 0 and 2), with
``envs_per_task`` environments per task and env-stratified minibatches (every task in every
minibatch). This file is the template the other multi-task scripts are diffs of.
LOO (``--train-tasks``, ``--init-from``, ``--transfer``): task k's slot is column k of the one-hot input of the first layer of
actor and critic (row k of both embeddings with ``--task-encoding embedding``) and row k of the log-std (``task_slots``).
Run: ``python src/algos/ppo_mtl_embed.py --config configs/toy_cartpole_mt10.toml``.
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

ALGO = "ppo_mtl_embed"


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

        # ---- logging, evaluation, checkpoint
        pg, vl, ent, kl, cf = torch.stack(stats).mean(0).tolist()
        sps = (global_step - start_step) / (time.time() - start_time)
        run.log({"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/SPS": sps, "charts/rollout_SPS": batch_size / rollout_time,
                 "charts/gradient_steps": gradient_steps, "charts/wall_clock_s": time.time() - run.start_time,
                 "losses/policy_loss": pg, "losses/value_loss": vl, "losses/entropy": ent, "losses/approx_kl": kl, "losses/clipfrac": cf,
                 "losses/explained_variance": explained_variance(values_buf.ravel(), returns.ravel()),
                 "debug/first_minibatch_max_ratio_dev": float(first_ratio_dev), **episodes.scalars()}, global_step)
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
