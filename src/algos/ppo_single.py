"""ppo_single: one PPO agent on one task (the single-task oracle), CleanRL style.

Reads top to bottom: Args -> env setup -> networks -> rollout -> GAE -> update -> logging, evaluation,
checkpoint. Backbone: baselines.md section 0 (separate actor and critic MLPs, orthogonal init,
categorical or Gaussian head, GAE with bootstrapping from the true final observation at truncation,
per-minibatch advantage normalisation, clipped surrogate, shared observation normalisation and
reward scaling). Run: ``python src/algos/ppo_single.py --env-id CartPole-v1``; a task of a suite:
``--env-id toy/CartPole-MT10 --task reversed-push``.
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
from mtrl.ppo import (ACTIVATIONS, NumpyPolicy, ObsNormalizer, RewardScaler, action_head, compute_gae, explained_variance, layer_init,
                      sequential_forward)

ALGO = "ppo_single"


@dataclass
class Args:
    # ---- experiment
    env_id: str = "CartPole-v1"
    """benchmark id: CartPole-v1, LunarLander-v3, toy/CartPole-MT10, toy/LunarLander-MT10, metaworld/MT3, metaworld/MT10, metaworld/<task>-v3"""
    task: Optional[str] = None
    """run only this task of a suite (this is how the single-task oracle of a suite is produced)"""
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

    numpy_acting: bool = False
    """act in the rollout with a numpy copy of the network refreshed after every update (mtrl.ppo.NumpyPolicy): with one env, about 3x cheaper per step than torch; the same policy, not bit-identical (float32 sums, numpy's random stream)"""

    # ---- network
    hidden_sizes: tuple[int, ...] = (64, 64)
    """hidden layer widths of the actor and of the critic"""
    activation: Literal["tanh", "relu"] = "tanh"
    """hidden activation of every method"""


def validate(args: Args) -> None:
    suite = mtenvs.make_suite(args.env_id, args.task)
    if suite.num_tasks != 1:
        raise mtrun.ArgError(f"{ALGO} runs one task: pass --task, one of {', '.join(suite.task_names)}")


# ----------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------
class Agent(nn.Module):
    """Separate actor and critic MLPs; a state-independent log-std for continuous actions."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, num_tasks: int, args: Args):
        super().__init__()

        def mlp(out_dim: int, out_std: float) -> nn.Sequential:
            layers, d = [], obs_dim
            for h in args.hidden_sizes:
                layers += [layer_init(nn.Linear(d, h)), ACTIVATIONS[args.activation]()]
                d = h
            return nn.Sequential(*layers, layer_init(nn.Linear(d, out_dim), std=out_std))

        self.critic = mlp(1, 1.0)
        self.actor = mlp(act_dim, 0.01)
        self.actor_logstd = None if discrete else nn.Parameter(torch.zeros(num_tasks, act_dim))

    def get_value(self, x, task_ids):
        """x: (groups, samples, obs_dim), task_ids: (groups,) -> values (groups, samples)."""
        return self.critic(x).squeeze(-1)

    def get_action_and_value(self, x, task_ids, action=None, deterministic=False):
        logstd = None if self.actor_logstd is None else self.actor_logstd[task_ids][:, None]
        action, logprob, entropy = action_head(self.actor(x), logstd, action, deterministic)
        return action, logprob, entropy, self.critic(x).squeeze(-1)

    def act(self, x, task_ids):
        """The rollout's get_action_and_value (action, logprob, value), bit-identical to it, without module-call
        overhead or the entropy: with one env, acting costs more than a Meta-World step otherwise."""
        logstd = None if self.actor_logstd is None else self.actor_logstd[task_ids][:, None]
        action, logprob, _ = action_head(sequential_forward(self.actor, x), logstd, entropy=False)
        return action, logprob, sequential_forward(self.critic, x).squeeze(-1)


def param_counts(agent: Agent, num_tasks: int) -> dict:
    n = sum(p.numel() for p in agent.parameters())
    return {"active_per_task": n, "inference": n, "total": n}


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    suite = mtenvs.make_suite(args.env_id, args.task, args.seed)
    num_tasks = suite.num_tasks
    num_envs = num_tasks * args.envs_per_task
    batch_size = num_envs * args.num_steps
    minibatch_steps = args.num_steps // args.num_minibatches
    num_iterations = math.ceil(args.total_timesteps / batch_size)
    mtrun.seed_everything(args.seed, args.torch_deterministic)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    device = mtrun.pick_device(args.cuda)

    # ---- env setup
    envs, task_ids = mtenvs.make_vector_env(suite, args.envs_per_task, args.seed, args.vector_mode)
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
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)  # fused: ~30% faster steps on CPU, same maths
    params = param_counts(agent, num_tasks)
    derived = {"num_tasks": num_tasks, "num_envs": num_envs, "batch_size": batch_size, "minibatch_size": batch_size // args.num_minibatches,
               "num_iterations": num_iterations, "final_step": num_iterations * batch_size, "params": params, "device": str(device)}

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
    numpy_policy = NumpyPolicy(agent) if args.numpy_acting else None

    for iteration in range(start_iteration, num_iterations + 1):
        iteration_start_step = global_step
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        # ---- rollout
        rollout_start = time.time()
        if numpy_policy is not None:
            numpy_policy.refresh()  # the weights of the last update
        for step in range(args.num_steps):
            if run.stop_signal is not None:
                break
            x = obs_norm(next_obs)
            obs_buf[:, step] = x
            if numpy_policy is not None:
                action, logprob, value = numpy_policy.act(x, task_ids)
            else:
                with torch.inference_mode():
                    action, logprob, value = agent.act(torch.as_tensor(x, device=device)[:, None], task_ids_t)
                action, logprob, value = action[:, 0].cpu().numpy(), logprob[:, 0].cpu().numpy(), value[:, 0].cpu().numpy()
            actions_buf[:, step], logprobs_buf[:, step], values_buf[:, step] = action, logprob, value
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
