"""ppo_varshare: variational task-specific residuals in weight space with a KL price (VarShare), CleanRL style.

Every linear layer of actor and critic (heads included) computes, for task t, ``W_t = theta + delta_t``
with a shared bias. ``delta_t`` has a Gaussian posterior ``N(mu_t, sigma_t^2)`` and a zero-mean prior
``N(0, sigma0^2)``, ``sigma0 = prior_scale / sqrt(fan_in)``; the closed-form KL of every task, scaled by
``kl_coef / N`` (N = the iteration's batch size), is added to every minibatch loss. PPO's ratio is computed
under the same weight noise that generated the action (``--noise rollout|step|mean``); the critic is at its
posterior mean ``theta + mu_t`` (no weight noise). ``--residual l2`` is the L2Soft ablation: a deterministic
residual with penalty ``(lambda_l / N) sum_t ||delta_l^t||^2``.
Calibration options (section 10 of the definition): ``--critic-noise off|same`` (same: the critic takes the
actor's draw), ``--prior-scale-mode fan_in|init`` (init: ``sigma0 = prior_scale * rms(theta at init)``),
``--critic varshare|onehot`` (onehot: ppo_mtl_embed's critic, no residual, no KL), ``--kl-samples N`` (a fixed
KL denominator), ``--bias-residual`` (biases get a per-task residual too), ``--residual-lr-scale s`` (mu, rho
in their own Adam group at s times the learning rate). Ablation: ``--fixed-sigma`` (sigma stays at sigma0, rho is not learnt).
Definitions: context/spec/varshare.md; this file is ppo_mtl_embed plus the method.
LOO (``--train-tasks``, ``--init-from``, ``--transfer``): task k's slot is row k of every residual (mu_k and rho_k; L2Soft's
delta_k; with ``--bias-residual`` mu_b_k, rho_b_k), with ``--critic onehot`` the critic's one-hot column k, and row k of the
log-std (``task_slots``); theta and the biases are shared.
Run: ``python src/algos/ppo_varshare.py --config configs/toy_cartpole_mt10.toml``.
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

ALGO = "ppo_varshare"


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

    # ---- VarShare (varshare.md)
    residual: Literal["variational", "l2"] = "variational"
    """variational: VarShare; l2: the L2Soft ablation (deterministic residual, L2 penalty, no noise)"""
    noise: Literal["rollout", "step", "mean"] = "rollout"
    """weight noise: one draw per env per iteration (rollout), local reparameterisation per sample (step), none (mean); ignored with --residual l2"""
    prior_scale: float = 0.1
    """c in sigma0 = c / sqrt(fan_in) (or c * rms(theta at init), --prior-scale-mode init): the prior std of a residual weight, relative to the layer's init scale"""
    prior_scale_mode: Literal["fan_in", "init"] = "fan_in"
    """how sigma0 of a layer scales: fan_in: sigma0 = c / sqrt(fan_in); init: sigma0 = c * rms(theta at initialisation), the same relative price in every layer (heads included)"""
    sigma_init_ratio: float = 1.0
    """initial sigma / sigma0 (1: q = p at the start, so KL = 0 and every task starts as the shared network)"""
    fixed_sigma: bool = False
    """ablation: sigma stays at sigma0 (rho is a constant, not learnt): weight noise without a learnt posterior; the KL is its mean part alone, and rho is not active"""
    kl_coef: float = 1.0
    """beta: the price of one nat of KL; the loss adds beta * sum_t KL_t / N to every minibatch (N: --kl-samples)"""
    kl_samples: Optional[int] = None
    """N, the denominator of the KL term: default None = the iteration's batch size (num_envs x num_steps); a number fixes the per-sample weight beta / N whatever the rollout shape"""
    kl_warmup_frac: float = 0.0
    """warm beta up linearly over this fraction of training (0: off)"""
    l2_coef: Optional[float] = None
    """L2Soft strength lambda for every layer; default None = matched to VarShare, lambda_l = beta / (2 sigma0_l^2)"""
    eval_weight_samples: int = 0
    """also evaluate K sampled weight draws theta + mu_t + sigma_t * eps (one draw per task per evaluation pass; rollout noise only)"""
    critic_noise: Literal["off", "same"] = "off"
    """off: the critic is at its posterior mean theta + mu_t, no weight noise (its residuals still pay their KL); same: it takes the actor's draw"""
    critic: Literal["varshare", "onehot"] = "varshare"
    """varshare: a critic of VarShare layers; onehot: ppo_mtl_embed's critic (plain MLP on [observation, task one-hot]; no residual, no KL, no noise)"""
    bias_residual: bool = False
    """biases also carry a per-task residual (posterior mu_b, rho_b; prior sigma0 of the layer's weights); counts in the active parameters"""
    residual_lr_scale: float = 1.0
    """learning rate of the residual parameters (mu, rho; L2Soft's delta; bias residuals) relative to --learning-rate (their own Adam group, annealed alike)"""


CHOICES = {"residual": ("variational", "l2"), "noise": ("rollout", "step", "mean"), "prior_scale_mode": ("fan_in", "init"),
           "critic_noise": ("off", "same"), "critic": ("varshare", "onehot")}


def validate(args: Args) -> None:
    mtenvs.make_suite(args.env_id)
    for name, allowed in CHOICES.items():  # tyro checks these on the command line; Args built in code (capacity helper, tests) too
        if getattr(args, name) not in allowed:
            raise mtrun.ArgError(f"--{name.replace('_', '-')} {getattr(args, name)!r} is not allowed; choose one of: {', '.join(allowed)}")
    for name in ["prior_scale", "sigma_init_ratio", "residual_lr_scale"]:
        if not getattr(args, name) > 0:
            raise mtrun.ArgError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.kl_samples is not None and not args.kl_samples > 0:
        raise mtrun.ArgError(f"--kl-samples must be a positive number of samples (or left out: the iteration's batch size), got {args.kl_samples}")
    if args.kl_coef < 0 or (args.l2_coef is not None and args.l2_coef < 0):
        raise mtrun.ArgError(f"--kl-coef and --l2-coef must be >= 0, got {args.kl_coef} and {args.l2_coef}")
    if not 0.0 <= args.kl_warmup_frac <= 1.0:
        raise mtrun.ArgError(f"--kl-warmup-frac must be in [0, 1], got {args.kl_warmup_frac}")
    if args.l2_coef is not None and args.residual != "l2":
        raise mtrun.ArgError(f"--l2-coef {args.l2_coef} is the L2Soft strength: use it with --residual l2 (got --residual {args.residual})")
    if args.fixed_sigma and (args.residual != "variational" or args.noise == "mean" or args.sigma_init_ratio != 1.0):
        raise mtrun.ArgError(f"--fixed-sigma keeps sigma at sigma0: use it with --residual variational, --noise rollout or step and "
                             f"--sigma-init-ratio 1 (got --residual {args.residual}, --noise {args.noise}, --sigma-init-ratio {args.sigma_init_ratio})")
    if args.eval_weight_samples < 0 or (args.eval_weight_samples > 0 and (args.residual != "variational" or args.noise != "rollout")):
        raise mtrun.ArgError(f"--eval-weight-samples {args.eval_weight_samples}: must be >= 0, and > 0 only with --residual variational --noise rollout")


# ----------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------
def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class VarShareLinear(nn.Module):
    """Shared weight theta plus a per-task residual delta_t in weight space; the bias is shared (with
    ``--bias-residual`` it carries a per-task residual too, mu_b_t and rho_b_t, with the weights' sigma0).

    Inputs are grouped, ``x: (G, M, in)`` with one task per group (``task_ids: (G,)``), so each sample
    goes through its own task's residual with one batched matmul. ``noise`` is this layer's weight
    noise ``eps: (G, out, in)`` (rollout mode; ``(G, out, in + 1)`` with a bias residual, the last column
    for the bias), its pre-activation noise ``xi: (G, M, out)`` (step mode), or None (posterior mean)."""

    def __init__(self, in_features: int, out_features: int, num_tasks: int, init_std: float, args: Args):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.theta = nn.Parameter(nn.init.orthogonal_(torch.empty(out_features, in_features), init_std))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.mu = nn.Parameter(torch.zeros(num_tasks, out_features, in_features))  # L2Soft: this is delta
        if args.prior_scale_mode == "init":  # the same relative price in every layer: c times the rms of theta at init
            self.sigma0 = args.prior_scale * self.theta.detach().double().square().mean().sqrt().item()
        else:
            self.sigma0 = args.prior_scale / math.sqrt(in_features)
        self.variational = args.residual == "variational"
        self.bias_residual = args.bias_residual
        if self.bias_residual:
            self.mu_b = nn.Parameter(torch.zeros(num_tasks, out_features))  # L2Soft: delta_b
        if self.variational:
            rho0 = inverse_softplus(args.sigma_init_ratio * self.sigma0)
            rhos = {"rho": torch.full((num_tasks, out_features, in_features), rho0)}
            if self.bias_residual:
                rhos["rho_b"] = torch.full((num_tasks, out_features), rho0)
            for name, rho in rhos.items():
                if args.fixed_sigma:  # a buffer: saved and loaded with the weights, never trained
                    self.register_buffer(name, rho)
                else:
                    self.register_parameter(name, nn.Parameter(rho))

    def sigma(self) -> torch.Tensor:
        return nn.functional.softplus(self.rho)

    def sigma_b(self) -> torch.Tensor:
        return nn.functional.softplus(self.rho_b)

    def residual_parameters(self) -> list[nn.Parameter]:
        """mu, rho (L2Soft: delta), and the bias residual's mu_b, rho_b: the parameters of --residual-lr-scale."""
        names = ["mu", "rho"] + (["mu_b", "rho_b"] if self.bias_residual else [])
        return [getattr(self, n) for n in names if n in self._parameters]  # not L2Soft's missing rho nor a --fixed-sigma buffer

    def residual_mean(self) -> torch.Tensor:
        """(T, n): each task's residual means, weights then (with --bias-residual) bias, flattened."""
        return torch.cat([self.mu.flatten(1), self.mu_b], 1) if self.bias_residual else self.mu.flatten(1)

    def residual_sigma(self) -> torch.Tensor:
        """(T, n): the posterior std of ``residual_mean``'s entries (variational only)."""
        return torch.cat([self.sigma().flatten(1), self.sigma_b()], 1) if self.bias_residual else self.sigma().flatten(1)

    def group_weight(self, task_ids, noise=None, noise_mode="mean"):
        """(G, out, in): each group's weight, theta + mu_t (+ sigma_t * eps in rollout mode). With a bias
        residual (G, out, in + 1): the last column is the group's bias b + mu_b_t (+ sigma_b_t * eps_b)."""
        weight = self.theta + self.mu[task_ids]  # the posterior mean of each group's task
        if self.bias_residual:
            weight = torch.cat([weight, (self.bias + self.mu_b[task_ids])[..., None]], -1)
        if noise_mode == "rollout" and noise is not None:
            sigma = self.sigma()[task_ids]
            if self.bias_residual:
                sigma = torch.cat([sigma, self.sigma_b()[task_ids][..., None]], -1)
            weight = weight + sigma * noise
        return weight

    def forward(self, x, task_ids, noise=None, noise_mode="mean", use_residual=True, weight=None):
        """``weight``: this layer's group weights from ``group_weight``, computed once for a whole rollout."""
        if not use_residual:
            return x @ self.theta.T + self.bias
        if weight is None:
            weight = self.group_weight(task_ids, noise, noise_mode)
        if self.bias_residual:  # each group's bias is the last column
            y = torch.baddbmm(weight[..., -1:].transpose(1, 2), x, weight[..., :-1].transpose(1, 2))
        else:
            y = torch.baddbmm(self.bias, x, weight.transpose(1, 2))
        if noise_mode == "step" and noise is not None:  # local reparameterisation with a stored draw
            var = torch.bmm(x * x, self.sigma()[task_ids].square().transpose(1, 2))
            if self.bias_residual:  # var = x^2 sigma_W^2 + sigma_b^2
                var = var + self.sigma_b()[task_ids].square()[:, None]
            y = y + torch.sqrt(var + 1e-16) * noise
        return y

    def kl_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per task, summed over this layer's weights (and bias residuals), in nats: the mean part
        mu^2 / (2 sigma0^2) and the variance part (s - 1 - ln s) / 2 with s = sigma^2 / sigma0^2 (zero for L2Soft)."""
        mean_part = self.residual_mean().square().sum(1) / (2 * self.sigma0**2)
        if not self.variational:
            return mean_part, torch.zeros_like(mean_part)
        log_s = 2 * (torch.log(self.residual_sigma()) - math.log(self.sigma0))
        var_part = 0.5 * (log_s.exp() - 1 - log_s).sum(1)
        return mean_part, var_part


class Agent(nn.Module):
    """Separate actor and critic MLPs of VarShare layers (heads included); per-task log-std. With
    ``--critic onehot`` the critic is ppo_mtl_embed's (a plain MLP on [observation, task one-hot])."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, num_tasks: int, args: Args):
        super().__init__()
        self.num_tasks = num_tasks
        self.activation = ACTIVATIONS[args.activation]()
        self.noise_mode = args.noise if args.residual == "variational" else "mean"
        self.critic_onehot = args.critic == "onehot"
        self.critic_noise = not self.critic_onehot and args.critic_noise == "same"  # the critic takes the actor's draw

        def mlp(out_dim: int, out_std: float) -> nn.ModuleList:
            dims = [obs_dim, *args.hidden_sizes]
            hidden = [VarShareLinear(i, o, num_tasks, math.sqrt(2), args) for i, o in zip(dims[:-1], dims[1:])]
            return nn.ModuleList([*hidden, VarShareLinear(dims[-1], out_dim, num_tasks, out_std, args)])

        def onehot_mlp(out_dim: int, out_std: float) -> nn.Sequential:  # ppo_mtl_embed's mlp with --task-encoding onehot
            layers, d = [], obs_dim + num_tasks
            for h in args.hidden_sizes:
                layers += [layer_init(nn.Linear(d, h)), ACTIVATIONS[args.activation]()]
                d = h
            return nn.Sequential(*layers, layer_init(nn.Linear(d, out_dim), std=out_std))

        self.critic = onehot_mlp(1, 1.0) if self.critic_onehot else mlp(1, 1.0)
        self.actor = mlp(act_dim, 0.01)
        self.actor_logstd = None if discrete else nn.Parameter(torch.zeros(num_tasks, act_dim))
        self.preact_sizes = [layer.out_features for layer in self.noisy_layers()]  # step mode: actor (then critic) layers
        self.preact_dim = sum(self.preact_sizes)

    def named_varshare_layers(self):
        """The layers with a residual: actor then critic (actor only with --critic onehot)."""
        nets = ["actor"] if self.critic_onehot else ["actor", "critic"]
        return [(f"{net}.{i}", layer) for net in nets for i, layer in enumerate(getattr(self, net))]

    def noisy_layers(self) -> list[VarShareLinear]:
        """The layers that take weight noise: the actor's, and the critic's with --critic-noise same."""
        return [*self.actor, *(self.critic if self.critic_noise else [])]

    def sample_weight_noise(self, num_groups: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Rollout mode: a standard-normal tensor of every noisy layer's residual shape (+ a bias column) for each group (env)."""
        return [torch.randn(num_groups, l.out_features, l.in_features + l.bias_residual, device=l.theta.device, generator=generator)
                for l in self.noisy_layers()]

    def sample_preact_noise(self, num_groups: int, num_samples: int) -> torch.Tensor:
        """Step mode: one standard-normal draw per sample and pre-activation of every noisy layer, (G, M, preact_dim)."""
        return torch.randn(num_groups, num_samples, self.preact_dim, device=self.actor[0].theta.device)

    @torch.no_grad()
    def rollout_weights(self, task_ids, noise=None) -> list[torch.Tensor] | None:
        """Every layer's group weights (actor, then critic) for a rollout, where the parameters and the
        rollout-mode draw are fixed: computed once per iteration instead of at every step (bit-identical
        to computing them in ``forward``); layers without noise (the critic with --critic-noise off) get theta + mu_t.
        None in step mode (its noise is per sample)."""
        if self.noise_mode == "step":
            return None
        layers = self.named_varshare_layers()
        per_layer = [*(noise if noise is not None else []), *[None] * len(layers)]  # no noise: the posterior mean (critic-noise off)
        return [layer.group_weight(task_ids, n, self.noise_mode) for (_, layer), n in zip(layers, per_layer)]

    def mlp_forward(self, layers, x, task_ids, noise, use_residual, weights=None):
        for i, layer in enumerate(layers):
            x = layer(x, task_ids, noise[i], self.noise_mode, use_residual, None if weights is None else weights[i])
            if i < len(layers) - 1:
                x = self.activation(x)
        return x

    def split_noise(self, noise):
        """Per-layer noise of actor and critic (with --critic-noise same the critic uses the same env's draw as
        the actor; otherwise None: the critic is at its posterior mean)."""
        if noise is None:
            per_layer = [None] * len(self.preact_sizes)
        elif self.noise_mode == "step":
            per_layer = list(torch.split(noise, self.preact_sizes, dim=-1))
        else:
            per_layer = noise
        return per_layer[: len(self.actor)], (per_layer[len(self.actor) :] if self.critic_noise else [None] * len(self.critic))

    def get_value(self, x, task_ids, noise=None, use_residual=True, weights=None):
        """x: (groups, samples, obs_dim), task_ids: (groups,) -> values (groups, samples)."""
        if self.critic_onehot:  # ppo_mtl_embed's task_input: the one-hot of each group appended to its samples
            onehot = nn.functional.one_hot(task_ids, self.num_tasks).to(x.dtype)
            return self.critic(torch.cat([x, onehot[:, None].expand(-1, x.shape[1], -1)], -1)).squeeze(-1)
        w = None if weights is None else weights[len(self.actor):]
        return self.mlp_forward(self.critic, x, task_ids, self.split_noise(noise)[1], use_residual, w).squeeze(-1)

    def get_action_and_value(self, x, task_ids, noise=None, action=None, deterministic=False, use_residual=True, weights=None):
        logstd = None if self.actor_logstd is None else self.actor_logstd[task_ids][:, None]
        w = None if weights is None else weights[: len(self.actor)]
        out = self.mlp_forward(self.actor, x, task_ids, self.split_noise(noise)[0], use_residual, w)
        action, logprob, entropy = action_head(out, logstd, action, deterministic)
        return action, logprob, entropy, self.get_value(x, task_ids, noise, use_residual, weights)

    def kl_per_task(self) -> tuple[torch.Tensor, torch.Tensor]:
        """KL_t split into (mean part, variance part), summed over the layers of actor and critic (actor only with
        --critic onehot): (T,), (T,)."""
        parts = [layer.kl_parts() for _, layer in self.named_varshare_layers()]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def residual_penalty(self, beta: float, l2_coef: float | None) -> torch.Tensor:
        """VarShare: beta * sum_t KL_t. L2Soft: sum_l lambda_l sum_t ||delta_l^t||^2 with lambda_l = beta / (2 sigma0_l^2)
        (matched: exactly beta times the KL mean part) or lambda_l = l2_coef."""
        if self.noise_mode != "mean" or self.actor[0].variational:
            return beta * sum(self.kl_per_task()).sum()
        if l2_coef is None:
            return beta * self.kl_per_task()[0].sum()
        return l2_coef * sum(layer.residual_mean().square().sum() for _, layer in self.named_varshare_layers())


def param_groups(agent: Agent, args: Args) -> list[dict]:
    """Adam parameter groups: the shared parameters (theta, b, log-std, a onehot critic) at --learning-rate, and the
    residual parameters (mu, rho; L2Soft's delta; bias residuals) at --residual-lr-scale times it."""
    residual = [p for _, layer in agent.named_varshare_layers() for p in layer.residual_parameters()]
    ids = {id(p) for p in residual}
    shared = [p for p in agent.parameters() if id(p) not in ids]
    return [{"params": shared, "lr": args.learning_rate}, {"params": residual, "lr": args.residual_lr_scale * args.learning_rate}]


def noise_subset(noise, idx):
    """The noise of a subset of groups (envs)."""
    if noise is None:
        return None
    return [None if n is None else n[idx] for n in noise] if isinstance(noise, list) else noise[idx]


def param_counts(agent: Agent, num_tasks: int) -> dict:
    """varshare.md section 9. Active per task: |theta| + |b| + |mu_t| + |rho_t| (+ |mu_b_t| + |rho_b_t| with a bias
    residual), plus the task's log-std row. L2Soft and --noise mean: |theta| + |b| + |mu_t| (+ |mu_b_t|): rho enters
    neither the forward pass nor the data term. --critic onehot: its parameters count as shared, except the other
    tasks' one-hot columns of its first layer (multiplied by 0), as in ppo_mtl_embed. Inference: the merged network
    theta + mu_t of one task, |theta| + |b| (+ the onehot critic, + log-std row)."""
    layers = [layer for _, layer in agent.named_varshare_layers()]
    shared = sum(l.theta.numel() + l.bias.numel() for l in layers)
    if agent.critic_onehot:
        shared += sum(p.numel() for p in agent.critic.parameters()) - (num_tasks - 1) * agent.critic[0].out_features
    per_weight = 1 if agent.noise_mode == "mean" or "rho" not in layers[0]._parameters else 2  # mu (and rho where it is learnt and enters the forward pass)
    residual = sum((l.mu[0].numel() + (l.bias.numel() if l.bias_residual else 0)) * per_weight for l in layers)
    logstd = 0 if agent.actor_logstd is None else agent.actor_logstd.shape[1]
    total = sum(p.numel() for p in agent.parameters())
    return {"active_per_task": shared + residual + logstd, "inference": shared + logstd, "total": total}


def task_slots(agent: Agent) -> list[tuple[torch.Tensor, int, int]]:
    """Each task's own entries for LOO (protocol.md section 7), as (parameter, dim, offset): task t's entry is index
    offset + t along dim. Row t of every residual parameter (mu, rho; L2Soft's delta; the bias residuals mu_b, rho_b),
    with --critic onehot the one-hot column of its first layer, and the task's log-std row; theta and the biases are shared."""
    slots = [(p, 0, 0) for _, layer in agent.named_varshare_layers() for p in layer.residual_parameters()]
    if agent.critic_onehot:
        slots.append((agent.critic[0].weight, 1, agent.critic[0].in_features - agent.num_tasks))
    return slots + ([] if agent.actor_logstd is None else [(agent.actor_logstd, 0, 0)])


@torch.no_grad()
def varshare_diagnostics(agent: Agent, task_names: list[str], beta: float, kl_samples: int) -> dict:
    """varshare.md section 8, the per-iteration part (kl_samples: N of the loss's beta / N). rel_residual is
    ||mu_t|| / ||theta|| (weights); centering, sigma ratio and confident fraction include bias residuals."""
    out = {}
    mean_part, var_part = agent.kl_per_task()
    for t, name in enumerate(task_names):
        out[f"varshare/kl_mean_part/{name}"] = mean_part[t].item()
        out[f"varshare/kl_var_part/{name}"] = var_part[t].item()
        out[f"varshare/kl_loss_share/{name}"] = beta * (mean_part[t] + var_part[t]).item() / kl_samples
    rel = []
    confident = torch.zeros(len(task_names))
    n_weights = 0
    for lname, layer in agent.named_varshare_layers():
        mu_norm = layer.mu.flatten(1).norm(dim=1)  # (T,)
        rel.append(mu_norm / layer.theta.norm().clamp_min(1e-12))
        out[f"varshare/rel_residual_layer/{lname}"] = rel[-1].mean().item()
        mu = layer.residual_mean()  # (T, n), bias residual included
        out[f"varshare/centering/{lname}"] = (mu.sum(0).norm() / mu.norm(dim=1).sum().clamp_min(1e-12)).item()
        if layer.variational:
            sigma = layer.residual_sigma()
            out[f"varshare/sigma_ratio_median/{lname}"] = (sigma / layer.sigma0).median().item()
            confident += (mu.abs() / sigma > 1).sum(1).float().cpu()
            n_weights += mu.shape[1]
    rel = torch.stack(rel).mean(0)
    for t, name in enumerate(task_names):
        out[f"varshare/rel_residual/{name}"] = rel[t].item()
        if n_weights:
            out[f"varshare/frac_confident/{name}"] = (confident[t] / n_weights).item()
    return out


def specialisation(score_full: float, score_theta: float) -> float:
    """spec_t = 1 - score(theta) / score(theta + mu_t), clipped to [0, 1]; 0 where the task scores 0."""
    return 0.0 if score_full <= 0 else float(min(1.0, max(0.0, 1.0 - score_theta / score_full)))


@torch.no_grad()
def policy_divergence(agent: Agent, obs: torch.Tensor, task_ids: torch.Tensor, task_names: list[str]) -> dict:
    """KL(pi_{theta+mu_t} || pi_theta) averaged over each task's own rollout states (obs: (envs, steps, obs_dim)); only
    the tasks with envs (a LOO pre-training has no states of its held-out tasks)."""
    no_noise = [None] * len(agent.actor)
    full = agent.mlp_forward(agent.actor, obs, task_ids, no_noise, True)
    off = agent.mlp_forward(agent.actor, obs, task_ids, no_noise, False)
    if agent.actor_logstd is None:
        logp, logq = torch.log_softmax(full, -1), torch.log_softmax(off, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:  # same state-independent std in both: KL = sum_d (m1 - m2)^2 / (2 std^2)
        var = agent.actor_logstd[task_ids][:, None].exp().square()
        kl = ((full - off).square() / (2 * var)).sum(-1)
    per_env = kl.mean(1)
    return {name: per_env[task_ids == t].mean().item() for t, name in enumerate(task_names) if bool((task_ids == t).any())}


@torch.no_grad()
def residual_cosine(agent: Agent) -> list[list[float]]:
    """Cross-task cosine similarity of the residual means, all layers (and bias residuals) flattened: (T, T)."""
    mu = torch.cat([layer.residual_mean() for _, layer in agent.named_varshare_layers()], 1)
    unit = mu / mu.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).cpu().tolist()


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
    optimizer = optim.Adam(loo.trainable(param_groups(agent, args)), lr=args.learning_rate, eps=1e-5, fused=True)  # fused: ~30% faster steps on CPU, same maths
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # shared, residual (--residual-lr-scale)
    params = param_counts(agent, num_tasks)
    noise_mode = agent.noise_mode  # "mean" for --residual l2
    kl_samples = args.kl_samples if args.kl_samples is not None else batch_size  # N of the KL term's beta / N
    derived = {"num_tasks": num_tasks, "num_envs": num_envs, "batch_size": batch_size, "minibatch_size": batch_size // args.num_minibatches,
               "num_iterations": num_iterations, "final_step": num_iterations * batch_size, "params": params, "device": str(device),
               "noise_mode": noise_mode, "sigma0": {n: l.sigma0 for n, l in agent.named_varshare_layers()},
               "kl_samples": kl_samples, "kl_weight_per_sample": args.kl_coef / kl_samples}
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
        """At the posterior mean theta + mu_t, and again with the residual off (theta alone)."""
        agent.eval()
        results = evaluator.run(lambda x, t: agent.get_action_and_value(x, t, deterministic=True)[0], obs_norm)
        theta_results = evaluator.run(lambda x, t: agent.get_action_and_value(x, t, deterministic=True, use_residual=False)[0], obs_norm)
        sampled = []
        eval_rng = torch.Generator(device).manual_seed(args.seed + step)  # its own RNG: training draws stay as without it
        for _ in range(args.eval_weight_samples):  # sampled weights, one draw per task, deterministic actions
            eval_eps = agent.sample_weight_noise(num_tasks, eval_rng)
            sampled.append(evaluator.run(lambda x, t: agent.get_action_and_value(x, t, eval_eps, deterministic=True)[0], obs_norm))
        if sampled:
            run.log_eval(step, {k: {m: float(np.mean([r[k][m] for r in sampled])) for m in ("success", "return")} for k in suite.task_names},
                         prefix="eval_sampled")
        agent.train()
        run.log_eval(step, theta_results, prefix="eval_theta")
        spec = {k: specialisation(results[k]["success"], theta_results[k]["success"]) for k in suite.task_names}
        policy_kl = policy_divergence(agent, b_obs, task_ids_t, suite.task_names) if b_obs is not None else {}
        run.log({**{f"varshare/specialisation/{k}": v for k, v in spec.items()}, **{f"varshare/policy_kl/{k}": v for k, v in policy_kl.items()}}, step)
        diag = varshare_diagnostics(agent, suite.task_names, 1.0, 1)  # KL_t (mean + variance part) and ||mu_t|| / ||theta||, for the report
        return run.log_eval(step, results, extra={"theta_success": {k: r["success"] for k, r in theta_results.items()},
                                                  "specialisation": spec, "policy_kl": policy_kl,
                                                  "kl": {k: diag[f"varshare/kl_mean_part/{k}"] + diag[f"varshare/kl_var_part/{k}"] for k in suite.task_names},
                                                  "rel_residual": {k: diag[f"varshare/rel_residual/{k}"] for k in suite.task_names}})

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
    xi_buf = torch.zeros((num_envs, args.num_steps, agent.preact_dim) if noise_mode == "step" else (0,), device=device)  # step-mode noise
    b_obs = None  # the last rollout's observations, for the policy-divergence diagnostic

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
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * base_lr
        beta = args.kl_coef * (min(1.0, iteration_start_step / (args.kl_warmup_frac * num_iterations * batch_size)) if args.kl_warmup_frac > 0 else 1.0)
        # weight noise of this iteration: one draw per env, used for its whole rollout and in every update epoch (section 5)
        eps = agent.sample_weight_noise(num_envs) if noise_mode == "rollout" else None
        rollout_w = agent.rollout_weights(task_ids_t, eps)  # each env's weights for this rollout (None in step mode)

        # ---- rollout
        rollout_start = time.time()
        for step in range(args.num_steps):
            if run.stop_signal is not None:
                break
            x = obs_norm(next_obs)
            obs_buf[:, step] = x
            noise = agent.sample_preact_noise(num_envs, 1) if noise_mode == "step" else eps
            if noise_mode == "step":
                xi_buf[:, step] = noise[:, 0]
            with torch.inference_mode():
                action, logprob, _, value = agent.get_action_and_value(torch.as_tensor(x, device=device)[:, None], task_ids_t, noise, weights=rollout_w)
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
                    final_values = agent.get_value(torch.as_tensor(final_x, device=device)[:, None], task_ids_t[idx], noise_subset(noise, idx),
                                                   weights=noise_subset(rollout_w, idx))
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
            next_noise = agent.sample_preact_noise(num_envs, 1) if noise_mode == "step" else eps
            next_value = agent.get_value(torch.as_tensor(obs_norm(next_obs, update=False), device=device)[:, None], task_ids_t, next_noise,
                                         weights=rollout_w)[:, 0].cpu().numpy()
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
                mb_noise = xi_buf[:, t_idx] if noise_mode == "step" else eps  # the noise that generated the actions
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[:, t_idx], task_ids_t, mb_noise, b_actions[:, t_idx])
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
                residual_loss = agent.residual_penalty(beta, args.l2_coef) / kl_samples  # full KL of every task, scaled by beta / N
                loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss + residual_loss
                nonfinite |= ~torch.isfinite(loss)

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                loo.mask_gradients()  # frozen entries: other tasks' slots (and every shared entry with --transfer task-only)
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                gradient_steps += 1
                stats.append(torch.stack([pg_loss, v_loss, entropy_loss, approx_kl, clipfrac, residual_loss]).detach())
            if args.target_kl is not None and approx_kl > args.target_kl:
                break
        mtrun.check_finite(nonfinite, run, global_step)

        # ---- logging, evaluation, checkpoint
        pg, vl, ent, kl, cf, rl = torch.stack(stats).mean(0).tolist()
        sps = (global_step - start_step) / (time.time() - start_time)
        run.log({"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/SPS": sps, "charts/rollout_SPS": batch_size / rollout_time,
                 "charts/residual_learning_rate": optimizer.param_groups[1]["lr"], "charts/gradient_steps": gradient_steps, "charts/wall_clock_s": time.time() - run.start_time,
                 "losses/policy_loss": pg, "losses/value_loss": vl, "losses/entropy": ent, "losses/approx_kl": kl, "losses/clipfrac": cf,
                 "losses/explained_variance": explained_variance(values_buf.ravel(), returns.ravel()),
                 "debug/first_minibatch_max_ratio_dev": float(first_ratio_dev), "losses/residual_penalty": rl, "varshare/beta": beta,
                 **varshare_diagnostics(agent, suite.task_names, beta, kl_samples), **episodes.scalars()}, global_step)
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
                "sigma0": derived["sigma0"], "kl_weight_per_sample": derived["kl_weight_per_sample"],
                "final_theta_success": last_eval.get("theta_success"), "final_specialisation": last_eval.get("specialisation"),
                "residual_cosine": residual_cosine(agent), "final_kl": {k: v for k, v in varshare_diagnostics(agent, suite.task_names, 1.0, 1).items() if "kl_mean" in k or "kl_var" in k},
                "wall_clock_s": time.time() - run.start_time, "mean_SPS": (global_step - start_step) / max(time.time() - start_time, 1e-9)})
    envs.close()
    evaluator.close()


if __name__ == "__main__":
    main(mtrun.parse_args(Args, ALGO, validate))
