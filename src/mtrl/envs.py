"""Benchmarks as task lists, vector environments, and episode bookkeeping.

A benchmark id (what a user types after ``--env-id``) resolves to a :class:`Suite`: an ordered list of
tasks, each a name and a factory that builds one gymnasium env, plus the rule that decides whether an
episode was a success. Single-task ids are suites of one task. Every vector env built here uses
gymnasium's SAME_STEP autoreset: the step that ends an episode returns the *reset* observation and
puts the true final observation in ``info["final_obs"]`` (needed to bootstrap at truncation).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, AsyncVectorEnv, SyncVectorEnv

# ----------------------------------------------------------------------------------------------
# success rules
# ----------------------------------------------------------------------------------------------
SUCCESS_RULES = ("reached_time_limit", "return_threshold", "info_success")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: ``make(seed)`` builds a training env of it; ``make_eval(seed)``, where the benchmark has its
    own evaluation protocol (Meta-World), builds the evaluation env (see mtrl.evaluation)."""

    name: str
    make: Callable[..., gym.Env]
    make_eval: Callable[..., gym.Env] | None = None
    cartpole: tuple | None = None  # toy CartPole tasks: (gravity, masscart, masspole, length, force_mag, reversed, target or None)


@dataclasses.dataclass(frozen=True)
class Suite:
    env_id: str
    tasks: tuple[Task, ...]
    success_rule: str  # one of SUCCESS_RULES
    success_threshold: float = 0.0  # for return_threshold

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


# ----------------------------------------------------------------------------------------------
# toy suites
# ----------------------------------------------------------------------------------------------
class SwapActions(gym.ActionWrapper):
    """Exchange discrete actions according to a permutation (observations unchanged)."""

    def __init__(self, env: gym.Env, perm: tuple[int, ...]):
        super().__init__(env)
        self.perm = np.asarray(perm)

    def action(self, action):
        return int(self.perm[int(action)])


# name: (gravity, masscart, masspole, half pole length, force_mag, actions reversed)
CARTPOLE_MT10 = {
    "standard": (9.8, 1.0, 0.1, 0.5, 10.0, False),
    "high-gravity": (15.0, 1.0, 0.1, 0.5, 10.0, False),
    "low-gravity": (5.0, 1.0, 0.1, 0.5, 10.0, False),
    "heavy-cart": (9.8, 2.0, 0.1, 0.5, 10.0, False),
    "heavy-pole": (9.8, 1.0, 0.5, 0.5, 10.0, False),
    "long-pole": (9.8, 1.0, 0.1, 1.0, 10.0, False),
    "short-pole": (9.8, 1.0, 0.1, 0.25, 10.0, False),
    "weak-push": (9.8, 1.0, 0.1, 0.5, 6.0, False),
    "reversed-push": (9.8, 1.0, 0.1, 0.5, 10.0, True),
    "reversed-long-pole": (9.8, 1.0, 0.1, 1.0, 10.0, True),
}


def make_cartpole(gravity, masscart, masspole, length, force_mag, reversed_actions) -> gym.Env:
    env = gym.make("CartPole-v1")  # TimeLimit 500
    u = env.unwrapped
    u.gravity, u.masscart, u.masspole, u.length, u.force_mag = gravity, masscart, masspole, length, force_mag
    u.total_mass = masspole + masscart
    u.polemass_length = masspole * length
    if reversed_actions:
        env = SwapActions(env, (1, 0))
    return env


class CartPoleTarget(gym.Wrapper):
    """CartPole whose task is to hold the cart near a target position ``x*`` that is NOT observed.

    Reward per step: ``max(0, 1 - |x - x*| / 2.4)`` (1 at the target, falling linearly with the distance;
    the step that terminates pays it too, as CartPole pays its 1). Termination and the 500-step limit are
    CartPole's. ``info["success"]`` is True on the last step of an episode that reached the time limit
    with a mean ``|x - x*|`` of at most ``tolerance`` over its last ``window`` steps (False elsewhere), so
    the suite's success rule is ``info_success``."""

    def __init__(self, env: gym.Env, target: float, tolerance: float = 0.25, window: int = 100):
        super().__init__(env)
        self.target, self.tolerance, self.window = float(target), float(tolerance), int(window)
        self._dist = np.zeros(self.window)
        self._n = 0

    def reset(self, **kwargs):
        self._n = 0
        obs, info = self.env.reset(**kwargs)
        info["success"] = False
        return obs, info

    def step(self, action):
        obs, _reward, terminated, truncated, info = self.env.step(action)
        dist = abs(float(obs[0]) - self.target)
        self._dist[self._n % self.window] = dist
        self._n += 1
        info["success"] = bool(truncated and not terminated and self._n >= self.window and self._dist.mean() <= self.tolerance)
        return obs, max(0.0, 1.0 - dist / 2.4), terminated, truncated, info


# name: (physics of CARTPOLE_MT10, target cart position x*); protocol.md section 1
CARTPOLE_TARGETS_MT10 = {
    "standard": ("standard", 0.0),
    "high-gravity": ("high-gravity", 0.0),
    "low-gravity": ("low-gravity", 0.0),
    "heavy-cart": ("heavy-cart", 0.0),
    "long-pole": ("long-pole", 0.0),
    "short-pole": ("short-pole", 0.0),
    "standard-right": ("standard", 1.0),
    "long-pole-right": ("long-pole", 1.0),
    "standard-left": ("standard", -1.0),
    "long-pole-left": ("long-pole", -1.0),
}


# the test-sized variant (the learning tests use it): one physics, three targets, so a task-blind policy
# (one resting position) can succeed on at most one of the three tasks
CARTPOLE_TARGETS_MT3 = {name: CARTPOLE_TARGETS_MT10[name] for name in ("standard", "standard-right", "standard-left")}


def make_cartpole_target(physics: str, target: float) -> gym.Env:
    return CartPoleTarget(make_cartpole(*CARTPOLE_MT10[physics]), target)


class CartPoleVectorEnv(gym.vector.VectorEnv):
    """The toy CartPole tasks as one numpy-vectorised env: the same numbers as gymnasium's
    ``SyncVectorEnv`` over ``make_cartpole`` / ``make_cartpole_target`` envs (SAME_STEP autoreset), bit
    for bit, at a fraction of its cost (``tests/test_envs.py`` steps both side by side).

    ``params`` holds one row per env: ``(gravity, masscart, masspole, length, force_mag, reversed, target)``
    with ``target`` None for plain CartPole. The physics is gymnasium 1.x's ``CartPoleEnv.step`` (Euler,
    tau 0.02, the same operations in the same order, on float64 state), the 500-step limit is CartPole-v1's
    ``TimeLimit``, each env draws its resets from its own generator as a gymnasium env does
    (``seeding.np_random(seed)``, then ``uniform(-0.05, 0.05, 4)``), and the target reward and success
    follow :class:`CartPoleTarget`. Infos carry what the training code reads: ``final_obs``, and for
    target tasks ``success`` and ``final_info["success"]``."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}
    TAU, X_THRESHOLD, THETA_THRESHOLD, MAX_STEPS = 0.02, 2.4, 12 * 2 * np.pi / 360, 500

    def __init__(self, params: list[tuple]):
        from gymnasium.vector.utils import batch_space

        one = gym.make("CartPole-v1")
        self.single_observation_space, self.single_action_space = one.observation_space, one.action_space
        one.close()
        self.num_envs = n = len(params)
        self.observation_space = batch_space(self.single_observation_space, n)
        self.action_space = batch_space(self.single_action_space, n)
        col = lambda k: np.array([float(p[k]) for p in params])  # noqa: E731
        self.gravity, self.masscart, self.masspole, self.length, self.force_mag = (col(k) for k in range(5))
        self.total_mass = self.masspole + self.masscart  # as make_cartpole sets them
        self.polemass_length = self.masspole * self.length
        self.reversed = np.array([bool(p[5]) for p in params])
        self.has_target = any(p[6] is not None for p in params)
        if self.has_target and not all(p[6] is not None for p in params):
            raise ValueError("CartPoleVectorEnv: mix of target and plain CartPole tasks")
        self.target = np.array([float(p[6]) if p[6] is not None else 0.0 for p in params])
        self.window, self.tolerance = 100, 0.25  # CartPoleTarget's defaults
        self.state = np.zeros((n, 4))
        self.elapsed = np.zeros(n, dtype=np.int64)
        self.dist = np.zeros((n, self.window))
        self.rngs = [None] * n

    def _reset_one(self, i: int, seed: int | None = None) -> None:
        if seed is not None or self.rngs[i] is None:
            self.rngs[i], _ = gym.utils.seeding.np_random(seed)
        self.state[i] = self.rngs[i].uniform(low=-0.05, high=0.05, size=(4,))
        self.elapsed[i] = 0

    def reset(self, *, seed=None, options=None):
        if options:
            raise ValueError(f"CartPoleVectorEnv.reset: options are not supported, got {options!r}")
        seeds = seed if isinstance(seed, (list, tuple)) else [None if seed is None else seed + i for i in range(self.num_envs)]
        if len(seeds) != self.num_envs:
            raise ValueError(f"CartPoleVectorEnv.reset: {len(seeds)} seeds for {self.num_envs} envs")
        for i, s in enumerate(seeds):
            self._reset_one(i, s)
        infos = {}
        if self.has_target:
            infos = {"success": np.zeros(self.num_envs, dtype=bool), "_success": np.ones(self.num_envs, dtype=bool)}
        return self.state.astype(np.float32), infos

    def step(self, actions):
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or not ((actions == 0) | (actions == 1)).all():
            raise ValueError(f"CartPoleVectorEnv.step: actions must be {self.num_envs} values in {{0, 1}}, got {actions!r}")
        push = (actions == 1) != self.reversed
        x, x_dot, theta, theta_dot = self.state.T
        force = np.where(push, self.force_mag, -self.force_mag)
        costheta, sintheta = np.cos(theta), np.sin(theta)
        temp = (force + self.polemass_length * np.square(theta_dot) * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * np.square(costheta) / self.total_mass))
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        x = x + self.TAU * x_dot
        x_dot = x_dot + self.TAU * xacc
        theta = theta + self.TAU * theta_dot
        theta_dot = theta_dot + self.TAU * thetaacc
        self.state = np.stack((x, x_dot, theta, theta_dot), axis=1)
        terminated = (x < -self.X_THRESHOLD) | (x > self.X_THRESHOLD) | (theta < -self.THETA_THRESHOLD) | (theta > self.THETA_THRESHOLD)
        self.elapsed += 1
        truncated = self.elapsed >= self.MAX_STEPS
        obs = self.state.astype(np.float32)
        infos = {}
        if self.has_target:
            dist = np.abs(obs[:, 0].astype(np.float64) - self.target)
            self.dist[np.arange(self.num_envs), (self.elapsed - 1) % self.window] = dist
            reward = np.maximum(0.0, 1.0 - dist / 2.4)
            success = np.zeros(self.num_envs, dtype=bool)
            for i in np.flatnonzero(truncated & ~terminated & (self.elapsed >= self.window)):
                success[i] = self.dist[i].mean() <= self.tolerance
        else:
            reward = np.ones(self.num_envs)
        done = terminated | truncated
        if done.any():
            final = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(done):
                final[i] = obs[i].copy()
                self._reset_one(i)
                obs[i] = self.state[i].astype(np.float32)
            infos = {"final_obs": final, "_final_obs": done.copy(), "final_info": {}, "_final_info": done.copy()}
            if self.has_target:
                infos["final_info"] = {"success": success & done, "_success": done.copy()}
        if self.has_target:  # CartPoleTarget's success is only ever True on a last step, which shows its reset info
            infos["success"], infos["_success"] = np.zeros(self.num_envs, dtype=bool), np.ones(self.num_envs, dtype=bool)
        return obs, reward, terminated, truncated, infos

    def close(self, **kwargs):
        pass


# name: (gravity, enable_wind, wind_power, turbulence_power, side engines exchanged)
# LunarLander actions: 0 noop, 1 left orientation engine, 2 main engine, 3 right orientation engine.
LUNARLANDER_MT10 = {
    "calm": (-10.0, False, 0.0, 0.0, False),
    "low-gravity": (-6.0, False, 0.0, 0.0, False),
    "high-gravity": (-11.5, False, 0.0, 0.0, False),
    "breeze": (-10.0, True, 5.0, 0.5, False),
    "windy": (-10.0, True, 10.0, 1.0, False),
    "gusty": (-10.0, True, 15.0, 1.5, False),
    "storm": (-10.0, True, 20.0, 2.0, False),
    "low-gravity-storm": (-6.0, True, 20.0, 2.0, False),
    "swapped-engines": (-10.0, False, 0.0, 0.0, True),
    "swapped-engines-windy": (-10.0, True, 10.0, 1.0, True),
}


def make_lunarlander(gravity, enable_wind, wind_power, turbulence_power, swapped) -> gym.Env:
    env = gym.make(
        "LunarLander-v3",
        gravity=gravity,
        enable_wind=enable_wind,
        wind_power=wind_power,
        turbulence_power=turbulence_power,
    )
    if swapped:
        env = SwapActions(env, (0, 3, 2, 1))
    return env


# ----------------------------------------------------------------------------------------------
# Meta-World
# ----------------------------------------------------------------------------------------------
METAWORLD_SUITES = {
    "MT3": ("reach-v3", "push-v3", "pick-place-v3"),
}


def _metaworld_task_names() -> list[str]:
    import metaworld

    return list(metaworld.ALL_V3_ENVIRONMENTS.keys())


@functools.lru_cache(maxsize=8)
def metaworld_goals(suite_name: str, names: tuple[str, ...], seed: int) -> dict:
    """Each task's class and its 50 training goals: MT10's own goal set for ``MT10``, otherwise each task's
    MT1 goal set (what metaworld's ``make_mt_envs`` and custom-MT registrations use for single tasks)."""
    import metaworld

    if suite_name == "MT10":
        bench = metaworld.MT10(seed=seed)
        return {n: (bench.train_classes[n], [t for t in bench.train_tasks if t.env_name == n]) for n in names}
    out = {}
    for n in names:
        bench = metaworld.MT1(n, seed=seed)
        out[n] = (bench.train_classes[n], list(bench.train_tasks))
    return out


def make_metaworld(env_cls, goals, seed: int = 0, evaluation: bool = False) -> gym.Env:
    """One Meta-World v3 env built as metaworld's own MT registrations build it (``_init_each_env``,
    metaworld 3.1.1): V2 reward, 500-step TimeLimit, RecordEpisodeStatistics, a goal of the task's 50
    drawn at every reset. Training: random goal per episode, episodes end only by truncation.
    Evaluation: the goals in a seeded shuffled cycle (50 episodes = each goal once) and the episode
    ends at the first success (the official protocol of ``metaworld.evaluation``)."""
    from metaworld import _init_each_env

    # a copy: the pseudorandom wrapper shuffles its list in place (the goal sets are cached and shared)
    return _init_each_env(env_cls=env_cls, tasks=list(goals), seed=seed, max_episode_steps=500, reward_function_version="v2",
                          terminate_on_success=evaluation, task_select="pseudorandom" if evaluation else "random")


def _metaworld_tasks(suite_name: str, names: tuple[str, ...], seed: int) -> tuple[Task, ...]:
    """The goal sets are drawn (seconds for MT10) when the first env is built, not when the id is resolved."""

    def build(name: str, env_seed: int = 0, evaluation: bool = False) -> gym.Env:
        cls, goals = metaworld_goals(suite_name, names, seed)[name]
        env = make_metaworld(cls, goals, env_seed, evaluation)
        return _eval_env(env) if evaluation else env

    return tuple(Task(n, functools.partial(build, n), functools.partial(build, n, evaluation=True)) for n in names)


def _eval_env(env: gym.Env) -> gym.Env:
    env.get_wrapper_attr("toggle_sample_tasks_on_reset")(True)  # the pseudorandom cycle advances at every reset
    return env


# ----------------------------------------------------------------------------------------------
# resolving an id
# ----------------------------------------------------------------------------------------------
# id: (task table, env factory, success rule, return threshold)
TOY_SUITES = {
    "toy/CartPole-MT10": (CARTPOLE_MT10, make_cartpole, "reached_time_limit", 0.0),
    "toy/CartPole-Targets-MT10": (CARTPOLE_TARGETS_MT10, make_cartpole_target, "info_success", 0.0),
    "toy/CartPole-Targets-MT3": (CARTPOLE_TARGETS_MT3, make_cartpole_target, "info_success", 0.0),
    "toy/LunarLander-MT10": (LUNARLANDER_MT10, make_lunarlander, "return_threshold", 200.0),
}
GYM_SINGLE = ("CartPole-v1", "LunarLander-v3")


def _cartpole_params(maker, p: tuple) -> tuple | None:
    """A toy task's row for :class:`CartPoleVectorEnv`, or None if it is not a CartPole task."""
    if maker is make_cartpole:
        return (*p, None)
    if maker is make_cartpole_target:
        physics, target = p
        return (*CARTPOLE_MT10[physics], target)
    return None


def known_env_ids() -> list[str]:
    return [*GYM_SINGLE, *TOY_SUITES, *(f"metaworld/{s}" for s in (*METAWORLD_SUITES, "MT10")), "metaworld/<task>-v3"]


def make_suite(env_id: str, task: str | None = None, seed: int = 0) -> Suite:
    """Resolve a benchmark id (and optionally one task of a suite) into a :class:`Suite`.

    Raises ``ValueError`` naming the bad value and the allowed ones. Builds no environment."""
    if env_id in GYM_SINGLE:
        if task is not None:
            raise ValueError(f"--task {task!r} is only for suites; {env_id!r} is a single task")
        rule, thr = ("reached_time_limit", 0.0) if env_id == "CartPole-v1" else ("return_threshold", 200.0)
        cartpole = (9.8, 1.0, 0.1, 0.5, 10.0, False, None) if env_id == "CartPole-v1" else None  # CartPoleEnv's own values
        suite = Suite(env_id, (Task(env_id, lambda s=0, e=env_id: gym.make(e), cartpole=cartpole),), rule, thr)
    elif env_id in TOY_SUITES:
        table, maker, rule, thr = TOY_SUITES[env_id]
        tasks = tuple(Task(n, lambda s=0, p=p, maker=maker: maker(*p), cartpole=_cartpole_params(maker, p)) for n, p in table.items())
        suite = Suite(env_id, tasks, rule, thr)
    elif env_id.startswith("metaworld/"):
        name = env_id[len("metaworld/") :]
        if name in METAWORLD_SUITES:
            names = METAWORLD_SUITES[name]
        elif name == "MT10":
            from metaworld.env_dict import MT10_V3

            names = tuple(MT10_V3.keys())
        elif name in _metaworld_task_names():
            if task is not None:
                raise ValueError(f"--task {task!r} is only for suites; {env_id!r} is a single task")
            names = (name,)
        else:
            raise ValueError(
                f"unknown Meta-World id {env_id!r}: use metaworld/MT3, metaworld/MT10 or metaworld/<task>-v3 "
                f"with <task>-v3 one of {', '.join(_metaworld_task_names())}"
            )
        suite = Suite(env_id, _metaworld_tasks(name, names, seed), "info_success")
    else:
        raise ValueError(f"unknown env id {env_id!r}; allowed: {', '.join(known_env_ids())}")

    if task is not None:
        if task not in suite.task_names:
            raise ValueError(f"unknown --task {task!r} for {env_id}; allowed: {', '.join(suite.task_names)}")
        suite = dataclasses.replace(suite, tasks=tuple(t for t in suite.tasks if t.name == task))
    return suite


VECTOR_MODES = ("sync", "async", "gym")


def make_vector_env(suite: Suite, envs_per_task: int, seed: int, vector_mode: str = "sync"):
    """``envs_per_task`` copies of every task, task-major: env ``i`` runs task ``i // envs_per_task`` and is
    built with seed ``seed + i`` (callers reset them with the same seeds).

    ``vector_mode``: ``sync`` runs every env in this process, CartPole tasks as one :class:`CartPoleVectorEnv`
    (bit-identical to gymnasium's SyncVectorEnv, several times faster), others in gymnasium's SyncVectorEnv;
    ``gym`` always uses gymnasium's SyncVectorEnv (the reference); ``async`` one subprocess per env.

    Returns ``(envs, task_ids)``."""
    if vector_mode not in VECTOR_MODES:
        raise ValueError(f"vector_mode {vector_mode!r}: allowed {', '.join(VECTOR_MODES)}")
    task_ids = np.repeat(np.arange(suite.num_tasks), envs_per_task)
    if vector_mode == "sync" and all(t.cartpole is not None for t in suite.tasks):
        envs = CartPoleVectorEnv([suite.tasks[k].cartpole for k in task_ids])
        envs.action_space.seed(seed)
        return envs, task_ids
    fns = [functools.partial(t.make, seed + k * envs_per_task + j) for k, t in enumerate(suite.tasks) for j in range(envs_per_task)]
    cls = AsyncVectorEnv if vector_mode == "async" else SyncVectorEnv
    envs = cls(fns, autoreset_mode=AutoresetMode.SAME_STEP)
    envs.action_space.seed(seed)
    return envs, task_ids


def final_obs(next_obs: np.ndarray, infos: dict, done: np.ndarray) -> np.ndarray:
    """The true last observation of every env (SAME_STEP autoreset): ``info["final_obs"]`` where an
    episode ended, ``next_obs`` elsewhere."""
    out = next_obs.copy()
    if done.any():
        for i in np.flatnonzero(done):
            out[i] = infos["final_obs"][i]
    return out


class EpisodeTracker:
    """Accumulates raw rewards per env and reports finished episodes with their success."""

    def __init__(self, suite: Suite, task_ids: np.ndarray):
        self.suite, self.task_ids = suite, task_ids
        n = len(task_ids)
        self.ret = np.zeros(n)
        self.len = np.zeros(n, dtype=np.int64)
        self.any_success = np.zeros(n, dtype=bool)

    def step(self, rewards, terminations, truncations, infos) -> list[tuple[int, float, int, bool, int]]:
        """Returns ``[(task_id, return, length, success, env_index), ...]`` for episodes that ended here."""
        self.ret += rewards
        self.len += 1
        done = np.logical_or(terminations, truncations)
        if self.suite.success_rule == "info_success":
            if "success" in infos:
                self.any_success |= np.asarray(infos["success"], dtype=float) > 0
            if done.any() and "final_info" in infos and "success" in infos["final_info"]:
                fin = infos["final_info"]
                self.any_success |= (np.asarray(fin["success"], dtype=float) > 0) & fin.get("_success", done)
        finished = []
        for i in np.flatnonzero(done):
            success = self._success(i, terminations[i], truncations[i])
            finished.append((int(self.task_ids[i]), float(self.ret[i]), int(self.len[i]), success, int(i)))
            self.ret[i], self.len[i], self.any_success[i] = 0.0, 0, False
        return finished

    def _success(self, i, terminated, truncated) -> bool:
        rule = self.suite.success_rule
        if rule == "reached_time_limit":
            return bool(truncated and not terminated)
        if rule == "return_threshold":
            return bool(self.ret[i] >= self.suite.success_threshold)
        return bool(self.any_success[i])
