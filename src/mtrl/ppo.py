"""PPO backbone pieces every algorithm file uses: normalisers, GAE with truncation, action heads.

Nothing here is method specific; the methods live in ``src/algos/``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# running statistics (float64, numpy; saved in checkpoints)
# ----------------------------------------------------------------------------------------------
class RunningMeanStd:
    """Parallel-variance running mean/var (Chan et al.), as in gymnasium's NormalizeObservation."""

    def __init__(self, shape=(), epsilon: float = 1e-4):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        if x.shape[0] == 1:  # one env (the oracle): the same numbers without numpy's reductions (~20 us a call)
            b_mean, b_var, b_count = x[0], 0.0, 1
        else:
            b_mean, b_var, b_count = x.mean(0), x.var(0), x.shape[0]
        delta = b_mean - self.mean
        tot = self.count + b_count
        self.mean = self.mean + delta * b_count / tot
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / tot
        self.var = m2 / tot
        self.count = tot

    def state_dict(self) -> dict:
        return {"mean": np.array(self.mean, np.float64), "var": np.array(self.var, np.float64), "count": float(self.count)}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.var, self.count = np.array(d["mean"]), np.array(d["var"]), float(d["count"])


class ObsNormalizer:
    """One running mean/var for all tasks (the task one-hot is appended later, never normalised).

    ``__call__(obs, update=True)`` updates the statistics with the raw batch (during training) and
    returns the normalised, clipped float32 batch; evaluation calls it with ``update=False``."""

    def __init__(self, shape, enabled: bool = True, clip: float = 10.0, eps: float = 1e-8):
        self.rms, self.enabled, self.clip, self.eps = RunningMeanStd(shape), enabled, clip, eps

    def __call__(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        if not self.enabled:
            return np.asarray(obs, np.float32)
        if update:
            self.rms.update(obs)
        z = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.eps)
        return np.clip(z, -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict:
        return self.rms.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.rms.load_state_dict(d)


class RewardScaler:
    """Divides rewards by the running std of the discounted return (gymnasium NormalizeReward), one
    statistic shared by all envs and tasks. The per-env return accumulator restarts at episode ends."""

    def __init__(self, num_envs: int, gamma: float, enabled: bool = True, clip: float = 10.0, eps: float = 1e-8):
        self.rms, self.gamma, self.enabled, self.clip, self.eps = RunningMeanStd(()), gamma, enabled, clip, eps
        self.ret = np.zeros(num_envs)

    def __call__(self, rewards: np.ndarray, done: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return np.asarray(rewards, np.float32)
        self.ret = self.ret * self.gamma + rewards
        self.rms.update(self.ret)
        self.ret[done] = 0.0
        return np.clip(rewards / np.sqrt(self.rms.var + self.eps), -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict:
        return self.rms.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.rms.load_state_dict(d)


# ----------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------
def compute_gae(rewards, values, next_value, terminations, truncations, final_values, gamma, gae_lambda):
    """Generalised advantage estimation over a (num_steps, num_envs) rollout, truncation-aware.

    The bootstrap value after step ``t`` is 0 if the episode terminated there, ``final_values[t]`` (the
    value of the true final observation) if it was truncated there, and otherwise ``values[t+1]``
    (``next_value`` after the last step). The recursion is cut at every episode end.
    All inputs are numpy arrays; returns ``(advantages, returns)`` as float32 arrays.
    """
    num_steps = rewards.shape[0]
    term = terminations.astype(np.float32)
    done = np.maximum(term, truncations.astype(np.float32))
    advantages = np.zeros_like(rewards, dtype=np.float32)
    lastgaelam = np.zeros_like(next_value, dtype=np.float32)
    for t in reversed(range(num_steps)):
        nextvalues = next_value if t == num_steps - 1 else values[t + 1]
        nextvalues = np.where(truncations[t], final_values[t], nextvalues) * (1.0 - term[t])
        delta = rewards[t] + gamma * nextvalues - values[t]
        lastgaelam = delta + gamma * gae_lambda * (1.0 - done[t]) * lastgaelam
        advantages[t] = lastgaelam
    return advantages, (advantages + values).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# networks and action distributions
# ----------------------------------------------------------------------------------------------
def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
_FUNCTIONAL = {nn.Tanh: torch.tanh, nn.ReLU: torch.relu}


def sequential_forward(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``seq(x)`` for an MLP of ``nn.Linear`` and activation modules, calling the same kernels without the
    per-module call overhead (~10 us per module on a CPU: it dominates acting with one env). Bit-identical."""
    for m in seq:
        x = torch.nn.functional.linear(x, m.weight, m.bias) if type(m) is nn.Linear else _FUNCTIONAL[type(m)](x)
    return x


_NUMPY = {nn.Tanh: np.tanh, nn.ReLU: lambda x: np.maximum(x, np.float32(0))}


class NumpyPolicy:
    """A float32 numpy copy of an actor-critic whose ``actor`` and ``critic`` are ``nn.Sequential`` MLPs (Linear and
    Tanh/ReLU) with a state-independent ``actor_logstd`` (or None: categorical), for acting with few envs (ppo_single
    ``--numpy-acting``): a small numpy matmul costs ~2 us where a torch op costs ~10. ``refresh()`` after every update.
    ``act`` samples from numpy's global generator (saved in checkpoints) and returns numpy (action, logprob, value),
    the same distribution as ``action_head``; not bit-identical to the torch path (float32 sums in another order)."""

    def __init__(self, agent: nn.Module):
        self.agent = agent
        self.refresh()

    def refresh(self) -> None:
        def copy(seq):
            return [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy()) if type(m) is nn.Linear
                    else _NUMPY[type(m)] for m in seq]

        self.actor, self.critic = copy(self.agent.actor), copy(self.agent.critic)
        logstd = self.agent.actor_logstd
        self.logstd = None if logstd is None else logstd.detach().cpu().numpy().copy()

    @staticmethod
    def forward(layers, x: np.ndarray) -> np.ndarray:
        for layer in layers:
            x = x @ layer[0] + layer[1] if type(layer) is tuple else layer(x)
        return x

    def act(self, x: np.ndarray, task_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x: (envs, obs_dim) float32, task_ids: (envs,) -> action (envs,) or (envs, act_dim), logprob (envs,), value (envs,)."""
        out, value = self.forward(self.actor, x), self.forward(self.critic, x)[:, 0]
        if self.logstd is None:  # categorical: inverse-CDF sampling of softmax(out)
            z = out - out.max(-1, keepdims=True)
            logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
            u = np.random.random_sample((len(x), 1))
            action = np.minimum((np.cumsum(np.exp(logp_all), -1) < u).sum(-1), out.shape[-1] - 1)
            logp = np.take_along_axis(logp_all, action[:, None], -1)[:, 0]
            return action.astype(np.int64), logp.astype(np.float32), value
        logstd = self.logstd[task_ids]
        eps = np.random.standard_normal(out.shape).astype(np.float32)
        action = out + np.exp(logstd) * eps
        logp = (-0.5 * eps**2 - logstd - np.float32(LOG_SQRT_2PI)).sum(-1)
        return action, logp.astype(np.float32), value


def action_head(out: torch.Tensor, logstd: torch.Tensor | None, action=None, deterministic=False, entropy=True):
    """Sample (or evaluate) an action from the actor output.

    Discrete (``logstd is None``): ``out`` are categorical logits. Continuous: ``out`` is the Gaussian
    mean and ``logstd`` broadcasts to it. Returns ``(action, log_prob, entropy)``; ``deterministic``
    returns the mode (argmax / mean); ``entropy=False`` (acting) returns None for it."""
    if logstd is None:
        logp_all = torch.log_softmax(out, -1)
        if action is None:
            probs = logp_all.exp()
            action = out.argmax(-1) if deterministic else torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1])
        logp = logp_all.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
        return action, logp, -(logp_all.exp() * logp_all).sum(-1) if entropy else None
    logstd = logstd.expand_as(out)
    std = logstd.exp()
    if action is None:
        action = out if deterministic else out + std * torch.randn_like(out)
    logp = (-0.5 * ((action - out) / std) ** 2 - logstd - LOG_SQRT_2PI).sum(-1)
    return action, logp, (logstd + 0.5 + LOG_SQRT_2PI).sum(-1) if entropy else None


def explained_variance(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    var_y = np.var(y_true)
    return float("nan") if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)
