"""SAC from scratch, online: the baseline of o2o-rl and the trainer of the behaviour policies for datasets.

Haarnoja, Zhou, Abbeel, Levine. "Soft Actor-Critic: Off-Policy Maximum Entropy Deep Reinforcement Learning with a
Stochastic Actor", ICML 2018 (arXiv 1801.01290). Modelled on CleanRL's `sac_continuous_action.py` (fe8d8a0).

A tanh-Gaussian actor maximises min(Q1, Q2) plus alpha times its entropy; the two critics regress on a soft Bellman
target built from Polyak-averaged target critics and the current policy's next action; alpha is tuned towards the
target entropy -|A|. As in CleanRL, the actor and temperature are updated `policy_frequency` times every
`policy_frequency` env steps, on the same batch, with delayed compensation.

Differences from CleanRL, and why:
- The twin critics are one vectorised ensemble layer (N = 2), not two modules; Polyak is one fused lerp.
- Uniform-random actions before `learning_starts` come from torch's generator (so a resumed run repeats them), not
  `env.action_space.sample()`.
- A single environment, no vector env: on `terminated or truncated` the true next observation is stored and the
  env is reset; only `terminated` stops bootstrapping (CleanRL does the same through `final_observation`).
- Added: deterministic evaluation with D4RL-normalised scores and Q diagnostics every `eval_every` env steps,
  checkpoints and `--resume`, policy snapshots (`--save-policy-every`) and the replay buffer as `replay_buffer.npz`
  (`--save-buffer`), which benchmark/make_datasets.py turns into medium and medium-replay datasets.
- Network sizes (2 x 256), learning rates, init (PyTorch's defaults) and log_std squashing to [-5, 2] are
  CleanRL's. The SO2 paper's own SAC baseline used DI-engine's defaults, which differ and are not recorded here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from tqdm import tqdm

ALGO = "sac"


@dataclass
class Args:
    # ---- protocol: the same fields, in the same order, in every algorithm file
    env_id: str = "hopper-medium"
    """task id (trains on its evaluation env, e.g. hopper-medium) or a Gymnasium id such as Hopper-v5"""
    data: Literal["d4rl", "minari", "rebuilt"] | None = None
    """data source whose environment a task id uses: d4rl = MuJoCo v4, rebuilt/minari = v5 (no data is loaded)"""
    seed: int = 0
    """seed of everything; evaluation episode i always starts from seed 100000 * (seed + 1) + i"""
    online_steps: int = 1_000_000
    """online environment steps"""
    eval_every: int = 1_000
    """online environment steps between evaluations"""
    eval_episodes: int = 10
    """deterministic episodes per evaluation"""
    q_diag_extend_steps: int | None = None
    """steps an evaluation episode runs past its time limit for the Q-value tails (unset: 459 at gamma 0.99; 0 = off)"""
    output_dir: str = "runs"
    """where the run directory <algo>__<env-id>__<seed>__<unix-time> is made"""
    checkpoint_every: int = 10_000
    """online env steps between checkpoints (taken at the next episode end)"""
    log_every: int = 1_000
    """steps between TensorBoard scalars (losses are summed on the device in between)"""
    resume: str | None = None
    """a run directory whose checkpoint.pt to continue from (its config.json wins over other flags)"""
    device: str = "auto"
    """torch device; auto = cuda if available, else cpu"""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default"""
    compile: bool = False
    """torch.compile the update functions"""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (slower on GPU)"""
    hidden_dim: int = 256
    """width of every hidden layer of every network (256 in the papers; benchmark presets may use less)"""
    # ---- SAC (CleanRL's defaults)
    buffer_size: int = 1_000_000
    """replay buffer capacity"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics, after every critic step"""
    batch_size: int = 256
    """batch size"""
    learning_starts: int = 5_000
    """env steps of uniform-random actions before the first update"""
    policy_lr: float = 3e-4
    """actor learning rate"""
    q_lr: float = 1e-3
    """critic and temperature learning rate"""
    policy_frequency: int = 2
    """env steps between actor updates; each time the actor is updated this many times (delayed, compensated)"""
    alpha: float = 0.2
    """temperature when --no-autotune"""
    autotune: bool = True
    """tune alpha towards the target entropy -|A|, starting from alpha = 1"""
    save_policy_every: int = 0
    """env steps between actor snapshots in <run>/policies/ (a multiple of eval_every; 0 = none)"""
    save_buffer: bool = False
    """write every collected transition to <run>/replay_buffer.npz at each checkpoint and at the end"""


def parse_args(argv: list[str] | None = None) -> Args:
    return tyro.cli(Args, args=sys.argv[1:] if argv is None else argv)


# >>> shared: tasks
class RunError(Exception):
    """Bad input or a failed run: the message says what to do, and is printed without a traceback."""


MUJOCO_FAMILIES = ("halfcheetah", "hopper", "walker2d")
ADROIT_FAMILIES = ("pen", "door")
MUJOCO_DATASETS = ("random", "medium", "medium-replay", "medium-expert", "expert")
ADROIT_DATASETS = ("human", "cloned", "expert")
TASK_IDS = tuple(f"{f}-{d}" for f in MUJOCO_FAMILIES for d in MUJOCO_DATASETS) + tuple(
    f"{f}-{d}" for f in ADROIT_FAMILIES for d in ADROIT_DATASETS
)
GYM_NAMES = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d",
             "pen": "AdroitHandPen", "door": "AdroitHandDoor"}
# D4RL's episode limits (pen 100 as in D4RL and Minari, although gymnasium-robotics registers 200).
EPISODE_LIMITS = {"halfcheetah": 1000, "hopper": 1000, "walker2d": 1000, "pen": 100, "door": 200}
# D4RL's reference returns (d4rl/infos.py), used for every data source so that scores compare across sources.
REF_RETURNS = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
}


@dataclass(frozen=True)
class Task:
    env_id: str  # as given on the command line
    family: str | None  # halfcheetah ... door; None for a Gymnasium id of another environment
    dataset: str | None  # random ... expert; None for a plain Gymnasium id
    source: str | None  # d4rl, minari or rebuilt; None for a plain Gymnasium id
    eval_env_id: str
    max_episode_steps: int


def resolve_task(env_id: str, data: str | None, dataset: str | None = None, allow_gym_id: bool = False) -> Task:
    """Map a task id (or, where allowed, a Gymnasium id) to its data source and evaluation environment.

    D4RL v2 files were collected on the mujoco-py v2 environments, whose dynamics the Gymnasium v4 ones keep; v5
    changes Walker2d's foot friction and the healthy reward. So d4rl data evaluate on v4, everything else on v5.
    """
    if env_id in TASK_IDS:
        family, name = env_id.split("-", 1)
        adroit = family in ADROIT_FAMILIES
        if data is None:
            data = "minari" if adroit or (dataset is not None and not dataset.endswith((".hdf5", ".h5"))) else "d4rl"
        if data not in ("d4rl", "minari", "rebuilt"):
            raise RunError(f"unknown data source {data!r}: use d4rl, minari or rebuilt")
        version = "v1" if adroit else ("v4" if data == "d4rl" else "v5")
        return Task(env_id, family, name, data, f"{GYM_NAMES[family]}-{version}", EPISODE_LIMITS[family])
    if allow_gym_id and env_id in gym.registry:
        family = next((f for f, g in GYM_NAMES.items() if env_id.startswith(g + "-")), None)
        limit = gym.registry[env_id].max_episode_steps or 1000
        return Task(env_id, family, None, None, env_id, EPISODE_LIMITS.get(family, limit))
    also = " or any registered Gymnasium id (e.g. Hopper-v5)" if allow_gym_id else ""
    raise RunError(f"unknown --env-id {env_id!r}. Valid task ids{also}:\n  " + "\n  ".join(TASK_IDS))


def make_env(task: Task, extend_steps: int = 0) -> gym.Env:
    """The task's environment with its episode limit, optionally running `extend_steps` past it."""
    if task.family in ADROIT_FAMILIES:
        import gymnasium_robotics  # registers the Adroit environments; imported here because it prints a warning

        gym.register_envs(gymnasium_robotics)
    env = gym.make(task.eval_env_id, max_episode_steps=task.max_episode_steps + extend_steps)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise RunError(f"{task.eval_env_id} has a {type(env.action_space).__name__} action space; a Box is needed")
    if np.any(env.action_space.low != -1.0) or np.any(env.action_space.high != 1.0):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)  # the actor's tanh works in [-1, 1]
    return env
# <<< shared: tasks


# >>> shared: normalization
def normalized_score(family: str | None, returns: np.ndarray | float) -> np.ndarray | float:
    """D4RL's normalised score, x100; NaN for environments without reference returns."""
    if family not in REF_RETURNS:
        return np.full_like(np.asarray(returns, dtype=np.float64), np.nan)
    lo, hi = REF_RETURNS[family]
    return 100.0 * (np.asarray(returns, dtype=np.float64) - lo) / (hi - lo)


def moments(x: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std along the first axis, for standardising observations or rewards."""
    return x.mean(axis=0), x.std(axis=0) + eps
# <<< shared: normalization


# >>> shared: replay_buffer
TRANSITION_KEYS = ("observations", "actions", "rewards", "next_observations", "terminated", "truncated")


class ReplayBuffer:
    """Transitions as one preallocated [capacity, width] float tensor on the run's device: a ring buffer.

    The offline dataset goes in first with `load_dataset`; online transitions follow with `add` and, once the buffer
    is full, overwrite the oldest rows. Sampling uses the buffer's own device generator. `state_dict` holds only the
    rows added after the dataset (and where they went), so a checkpoint stays small and `load_state_dict`, applied
    after the same dataset is loaded again, restores the buffer exactly.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device, seed: int) -> None:
        widths = {"observations": obs_dim, "actions": act_dim, "rewards": 1, "next_observations": obs_dim,
                  "terminated": 1, "truncated": 1}
        self.slices, start = {}, 0
        for key in TRANSITION_KEYS:
            self.slices[key] = slice(start, start + widths[key])
            start += widths[key]
        self.storage = torch.zeros((capacity, start), dtype=torch.float32, device=device)
        self.capacity, self.device = capacity, device
        self.ptr = self.size = self.n_added = self.start_ptr = 0
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def _write(self, rows: torch.Tensor) -> None:
        idx = (self.ptr + torch.arange(len(rows), device=self.device)) % self.capacity
        self.storage[idx] = rows
        self.ptr = (self.ptr + len(rows)) % self.capacity
        self.size = min(self.capacity, self.size + len(rows))

    def _rows(self, batch: dict[str, np.ndarray | torch.Tensor]) -> torch.Tensor:
        cols = [torch.as_tensor(batch[k], dtype=torch.float32).reshape(len(batch["rewards"]), -1)
                for k in TRANSITION_KEYS]
        return torch.cat(cols, dim=1).to(self.device)

    def load_dataset(self, data: dict[str, np.ndarray]) -> None:
        if len(data["rewards"]) > self.capacity:
            raise RunError(f"{len(data['rewards'])} offline transitions do not fit a buffer of {self.capacity}")
        self._write(self._rows(data))
        self.start_ptr = self.ptr

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray,
            terminated: bool, truncated: bool) -> None:
        row = np.concatenate([obs, action, [reward], next_obs, [float(terminated)], [float(truncated)]])
        self._write(torch.as_tensor(row, dtype=torch.float32).to(self.device).unsqueeze(0))
        self.n_added += 1

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (batch_size,), device=self.device, generator=self.generator)
        rows = self.storage[idx]
        return {k: rows[:, s].squeeze(-1) if k in ("rewards", "terminated", "truncated") else rows[:, s]
                for k, s in self.slices.items()}

    def added(self) -> dict[str, np.ndarray]:
        """The rows added after the dataset that are still held, oldest first, as numpy arrays."""
        m = min(self.n_added, self.capacity)
        idx = (self.start_ptr + torch.arange(self.n_added - m, self.n_added, device=self.device)) % self.capacity
        rows = self.storage[idx].cpu().numpy()
        return {k: rows[:, s].squeeze(-1) if k in ("rewards", "terminated", "truncated") else rows[:, s]
                for k, s in self.slices.items()}

    def state_dict(self) -> dict[str, Any]:
        m = min(self.n_added, self.capacity)
        idx = (self.start_ptr + torch.arange(self.n_added - m, self.n_added, device=self.device)) % self.capacity
        return {"rows": self.storage[idx].cpu(), "n_added": self.n_added, "start_ptr": self.start_ptr,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["start_ptr"] != self.start_ptr:
            raise RunError("the checkpoint's replay buffer was made with a different dataset")
        rows, n = state["rows"].to(self.device), state["n_added"]
        idx = (self.start_ptr + torch.arange(n - len(rows), n, device=self.device)) % self.capacity
        self.storage[idx] = rows
        self.n_added, self.ptr = n, (self.start_ptr + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.generator.set_state(state["generator"])
# <<< shared: replay_buffer


# >>> shared: ensemble
class VectorizedLinear(nn.Module):
    """N independent linear layers as one batched matmul: weight [N, in, out], bias [N, 1, out]."""

    def __init__(self, in_features: int, out_features: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default, drawn for every member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        w, b = (self.weight.detach(), self.bias.detach()) if detach else (self.weight, self.bias)
        return torch.baddbmm(b, x, w)  # [N, B, in] -> [N, B, out]


class VectorizedCritic(nn.Module):
    """An ensemble of N Q-networks on concat(s, a), evaluated in one pass; returns Q of shape [N, B]."""

    def __init__(self, obs_dim: int, act_dim: int, n_critics: int, hidden: int = 256, n_layers: int = 3,
                 edac_init: bool = True) -> None:
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden] * n_layers + [1]
        self.layers = nn.ModuleList(VectorizedLinear(i, o, n_critics) for i, o in zip(dims[:-1], dims[1:]))
        self.n_critics = n_critics
        if edac_init:  # EDAC/rlkit: hidden biases 0.1, last layer U(-3e-3, 3e-3)
            for layer in self.layers[:-1]:
                nn.init.constant_(layer.bias, 0.1)
            nn.init.uniform_(self.layers[-1].weight, -3e-3, 3e-3)
            nn.init.uniform_(self.layers[-1].bias, -3e-3, 3e-3)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, detach: bool = False) -> torch.Tensor:
        """`detach` keeps the critic's weights out of the graph (actor losses need no critic gradients)."""
        x = torch.cat([obs, action], dim=-1)
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.n_critics, -1, -1)  # [N, B, in]
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x, detach))
        return self.layers[-1](x, detach).squeeze(-1)
# <<< shared: ensemble


# >>> shared: actor
class TanhGaussianActor(nn.Module):
    """pi(a|s) = tanh(Normal(mu(s), sigma(s))) with log_sigma bounded to [log_std_min, log_std_max].

    `squash_log_std` maps log_sigma into the bounds with a tanh (CleanRL) instead of clamping it (EDAC, SO2).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, n_layers: int = 3,
                 log_std_min: float = -5.0, log_std_max: float = 2.0, squash_log_std: bool = False,
                 edac_init: bool = True) -> None:
        super().__init__()
        dims = [obs_dim] + [hidden] * n_layers
        self.trunk = nn.Sequential(*[m for i, o in zip(dims[:-1], dims[1:]) for m in (nn.Linear(i, o), nn.ReLU())])
        self.mu = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)
        self.log_std_min, self.log_std_max, self.squash_log_std = log_std_min, log_std_max, squash_log_std
        if edac_init:  # EDAC: hidden biases 0.1, both heads U(-1e-3, 1e-3)
            for m in self.trunk:
                if isinstance(m, nn.Linear):
                    nn.init.constant_(m.bias, 0.1)
            for head in (self.mu, self.log_std):
                nn.init.uniform_(head.weight, -1e-3, 1e-3)
                nn.init.uniform_(head.bias, -1e-3, 1e-3)

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """An action in [-1, 1] and its log-probability (the tanh-corrected density of the pre-tanh sample)."""
        h = self.trunk(obs)
        mu, log_std = self.mu(h), self.log_std(h)
        if self.squash_log_std:
            log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(log_std) + 1)
        else:
            log_std = log_std.clamp(self.log_std_min, self.log_std_max)
        eps = torch.zeros_like(mu) if deterministic else torch.randn_like(mu)
        action = torch.tanh(mu + log_std.exp() * eps)
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - torch.log(1 - action.pow(2) + 1e-6).sum(-1)
        return action, log_prob

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        device = self.mu.weight.device
        action, _ = self(torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0), deterministic)
        return action[0].cpu().numpy()
# <<< shared: actor


# ---- losses and updates
@torch.no_grad()
def polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


@dataclass
class Agent:
    actor: TanhGaussianActor
    critic: VectorizedCritic  # the twin critics, N = 2
    critic_target: VectorizedCritic
    log_alpha: torch.Tensor  # []


def make_update_fns(agent: Agent, args: Args, target_entropy: float
                    ) -> tuple[Callable[..., dict[str, torch.Tensor]], Callable[..., dict[str, torch.Tensor]],
                               dict[str, Any]]:
    """The critic step (soft TD on both critics, then Polyak) and the actor step (`policy_frequency` actor and
    temperature steps on one batch), as CleanRL orders them."""
    actor_optim = torch.optim.Adam(agent.actor.parameters(), lr=args.policy_lr)
    critic_optim = torch.optim.Adam(agent.critic.parameters(), lr=args.q_lr)
    alpha_optim = torch.optim.Adam([agent.log_alpha], lr=args.q_lr)
    gamma, tau, autotune, repeats = args.gamma, args.tau, args.autotune, args.policy_frequency

    def update_critic(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        alpha = agent.log_alpha.detach().exp()
        with torch.no_grad():
            next_action, next_log_pi = agent.actor(batch["next_observations"])
            q_next = agent.critic_target(batch["next_observations"], next_action).min(dim=0).values
            y = batch["rewards"] + gamma * (1.0 - batch["terminated"]) * (q_next - alpha * next_log_pi)
        q = agent.critic(batch["observations"], batch["actions"])  # [2, B]
        loss = (q - y).pow(2).mean(dim=1).sum()
        critic_optim.zero_grad(set_to_none=True)
        loss.backward()
        critic_optim.step()
        polyak(agent.critic_target, agent.critic, tau)
        return {"loss/critic": loss.detach(), "q/mean": q.detach().mean()}

    def update_actor(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        obs = batch["observations"]
        actor_loss = alpha_loss = torch.zeros((), device=obs.device)
        for _ in range(repeats):
            alpha = agent.log_alpha.detach().exp()
            action, log_pi = agent.actor(obs)
            loss = (alpha * log_pi - agent.critic(obs, action, detach=True).min(dim=0).values).mean()
            actor_optim.zero_grad(set_to_none=True)
            loss.backward()
            actor_optim.step()
            actor_loss = actor_loss + loss.detach() / repeats
            if autotune:  # CleanRL multiplies by alpha, not log_alpha, and uses fresh log-probs
                with torch.no_grad():
                    _, log_pi = agent.actor(obs)
                a_loss = (-agent.log_alpha.exp() * (log_pi + target_entropy)).mean()
                alpha_optim.zero_grad(set_to_none=True)
                a_loss.backward()
                alpha_optim.step()
                alpha_loss = alpha_loss + a_loss.detach() / repeats
        return {"loss/actor": actor_loss, "loss/alpha": alpha_loss, "alpha": agent.log_alpha.detach().exp(),
                "entropy": -log_pi.detach().mean()}

    return update_critic, update_actor, {"actor_optim": actor_optim, "critic_optim": critic_optim,
                                         "alpha_optim": alpha_optim}


# >>> shared: q_diagnostics
def q_horizon(gamma: float) -> int:
    """H, the smallest number of steps with gamma^H < 0.01: the tail a Monte-Carlo Q needs (459 at 0.99)."""
    return math.ceil(math.log(0.01) / math.log(gamma))


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    out, running = np.zeros(len(rewards), dtype=np.float64), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def windowed_kendall_tau(q_est: np.ndarray, q_true: np.ndarray, window: int = 10) -> np.ndarray:
    """Kendall's tau-b (scipy.stats.kendalltau's default) of every `window` consecutive pairs, stride 1, at once;
    NaN where it is undefined (all values in a window tied)."""
    if len(q_est) < window:
        return np.zeros(0)
    x = np.lib.stride_tricks.sliding_window_view(q_est, window)  # [W, window]
    y = np.lib.stride_tricks.sliding_window_view(q_true, window)
    i, j = np.triu_indices(window, k=1)
    sx, sy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    n_pairs = len(i)
    denom = np.sqrt((n_pairs - (sx == 0).sum(1)) * (n_pairs - (sy == 0).sum(1)).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (sx * sy).sum(1) / denom, np.nan)


def q_diagnostics(episodes: list[dict[str, np.ndarray]], limit: int, horizon: int, gamma: float,
                  window: int = 10) -> dict[str, float]:
    """Normalised difference and windowed Kendall's tau of Q_est against Monte-Carlo Q_true.

    Each episode holds `q_est`, `rewards` (as the critic sees them) and `terminated`. Step t < limit is scored if the
    episode terminated or at least `horizon` rewards follow from t on (T - t >= horizon), so Q_true's missing tail
    weighs less than 1%. normalised difference = mean of (Q_est - Q_true) / |Q_true| over scored steps with
    |Q_true| >= 1e-3; tau = mean over windows of `window` consecutive scored steps of all episodes.
    """
    diffs, taus, scored_steps = [], [], 0
    for ep in episodes:
        q_true = discounted_returns(ep["rewards"], gamma)
        t = np.arange(len(q_true))
        scored = (t < limit) & (bool(ep["terminated"]) | (len(q_true) - t >= horizon))
        q_est, q_true = ep["q_est"][scored].astype(np.float64), q_true[scored]
        scored_steps += int(scored.sum())
        ok = np.abs(q_true) >= 1e-3
        diffs.append((q_est[ok] - q_true[ok]) / np.abs(q_true[ok]))
        taus.append(windowed_kendall_tau(q_est, q_true, window))
    diffs, taus = np.concatenate(diffs), np.concatenate(taus)
    taus = taus[~np.isnan(taus)]
    return {"q_normalized_difference": float(diffs.mean()) if len(diffs) else float("nan"),
            "q_kendall_tau": float(taus.mean()) if len(taus) else float("nan"),
            "q_scored_steps": scored_steps}
# <<< shared: q_diagnostics


# >>> shared: evaluation
@torch.no_grad()
def evaluate(env: gym.Env, actor: nn.Module, q_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             n_episodes: int, seed: int, limit: int, family: str | None, gamma: float, horizon: int,
             reward_fn: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    """Deterministic episodes (episode i starts from `seed + i`), their returns over the first `limit` steps, the
    normalised score, and the Q diagnostics on every step, with episodes run on past `limit` when `env` allows."""
    returns, episodes = [], []
    device = next(actor.parameters()).device
    for i in range(n_episodes):
        obs, _ = env.reset(seed=seed + i)
        observations, actions, rewards, terminated, truncated = [], [], [], False, False
        while not (terminated or truncated):
            action = actor.act(obs, deterministic=True)
            observations.append(obs)
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(reward)
        rewards = np.asarray(rewards, dtype=np.float64)
        returns.append(rewards[:limit].sum())
        obs_t = torch.as_tensor(np.asarray(observations), dtype=torch.float32, device=device)
        act_t = torch.as_tensor(np.asarray(actions), dtype=torch.float32, device=device)
        episodes.append({"q_est": q_fn(obs_t, act_t).cpu().numpy(), "rewards": reward_fn(rewards),
                         "terminated": terminated})
    returns = np.asarray(returns)
    return {"return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "normalized_score": float(normalized_score(family, returns.mean())),
            **q_diagnostics(episodes, limit, horizon, gamma)}
# <<< shared: evaluation


# >>> shared: logging
def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise RunError(f"cannot use --device {name} ({e}); try --device cpu") from None
    return device


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "numpy", "gymnasium", "mujoco", "gymnasium-robotics", "minari", "h5py", "tyro"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Logger:
    """TensorBoard scalars, `eval.jsonl` rows and a progress bar.

    Training metrics are 0-d device tensors summed on the device; `flush` moves them to the host once per
    `log_every` steps and stops the run if any is not finite, before a checkpoint could store the damage.
    """

    def __init__(self, run_dir: Path, n_eval_rows: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.writer = run_dir, SummaryWriter(str(run_dir))
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # per metric: update functions may run at different rates
        self.n_eval_rows, self.last_step, self.last_time = n_eval_rows, 0, time.perf_counter()
        self.bar: tqdm | None = None
        self.phase = "train"
        path = run_dir / "eval.jsonl"
        if path.exists():  # on resume, drop rows written after the checkpoint the run continues from
            rows = path.read_text().splitlines()[:n_eval_rows]
            path.write_text("".join(r + "\n" for r in rows))

    def progress(self, total: int, initial: int, desc: str) -> None:
        """Start the progress bar of a phase; `desc` (offline/online) also prefixes its TensorBoard tags."""
        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=2.0)
        self.phase, self.last_step, self.last_time = desc, initial, time.perf_counter()

    def accumulate(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.detach().clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self, step: int) -> None:
        if not self.sums:
            return
        keys = list(self.sums)
        values = torch.stack([self.sums[k].float() for k in keys]).cpu().numpy() / [self.counts[k] for k in keys]
        bad = [k for k, v in zip(keys, values) if not np.isfinite(v)]
        if bad:
            raise RunError(f"non-finite {', '.join(bad)} before step {step}; the run stopped. The last "
                           f"checkpoint.pt in {self.run_dir} is from before this and can be resumed with other "
                           f"settings (e.g. a lower learning rate).")
        for k, v in zip(keys, values):  # offline steps count gradient steps, online ones env steps
            self.writer.add_scalar(f"{self.phase}/{k}", v, step)
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.writer.add_scalar(f"{self.phase}/steps_per_second", rate, step)
        self.sums, self.counts, self.last_step, self.last_time = {}, {}, step, now

    def eval_row(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.n_eval_rows += 1
        step = row["grad_step"] if row["phase"] == "offline" else row["env_step"]
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("env_step", "grad_step"):
                self.writer.add_scalar(f"eval_{row['phase']}/{k}", v, step)
        line = (f"[{row['phase']}] env_step {row['env_step']} grad_step {row['grad_step']}: return "
                f"{row['return_mean']:.1f} +- {row['return_std']:.1f}, score {row['normalized_score']:.1f}, "
                f"Q diff {row['q_normalized_difference']:.3f}, tau {row['q_kendall_tau']:.3f}")
        if self.bar is not None:
            self.bar.set_postfix(score=f"{row['normalized_score']:.1f}")
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
# <<< shared: logging


# >>> shared: checkpoint
def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_of(objects: dict[str, Any]) -> dict[str, Any]:
    """Everything with a `state_dict` is saved through it, tensors and plain values as they are."""
    return {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in objects.items()}


def restore(objects: dict[str, Any], saved: dict[str, Any]) -> None:
    for k, v in objects.items():
        if hasattr(v, "load_state_dict"):
            v.load_state_dict(saved[k])
        elif isinstance(v, torch.Tensor):
            with torch.no_grad():
                v.copy_(saved[k])


def restore_optimizers(optims: dict[str, Any], saved: dict[str, Any]) -> None:
    """Adam's states from another run (an offline.pt) under this run's learning rates: an optimiser's state_dict
    carries the learning rate it was saved with, which would silently override this run's flags."""
    lrs = {name: [group["lr"] for group in optim.param_groups] for name, optim in optims.items()
           if hasattr(optim, "param_groups")}
    restore(optims, saved)
    for name, groups in lrs.items():
        for group, lr in zip(optims[name].param_groups, groups):
            group["lr"] = lr


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file and rename, so that a run killed while saving keeps its previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise RunError(f"{path} is not a readable checkpoint ({e}); it was kept as it is.") from None


def new_run_dir(output_dir: str, algo: str, env_id: str, seed: int) -> Path:
    name = f"{algo}__{env_id.replace('/', '_')}__{seed}__{int(time.time())}"
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    for suffix in ("", *(f"-{i}" for i in range(1, 100))):  # two runs started in the same second
        try:
            (Path(output_dir) / (name + suffix)).mkdir()
            return Path(output_dir) / (name + suffix)
        except FileExistsError:
            continue
    raise RunError(f"could not make a new run directory {name} in {output_dir}")


def resumed_args(cls: type, run_dir: Path) -> Any:
    """The arguments a run was started with, from its config.json."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunError(f"--resume {run_dir}: no config.json there; pass a run directory made by this script")
    saved = json.loads(path.read_text())["args"]
    return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})
# <<< shared: checkpoint


# ---- training loop
def save_buffer(run_dir: Path, buffer: ReplayBuffer) -> None:
    """Every transition collected so far, in collection order (`terminated`/`truncated` mark episode ends)."""
    tmp = run_dir / "replay_buffer.tmp.npz"
    np.savez(tmp, **buffer.added())
    os.replace(tmp, run_dir / "replay_buffer.npz")


def train(args: Args, agent: Agent, buffer: ReplayBuffer, update_critic: Callable, update_actor: Callable,
          optims: dict[str, Any], ctx: dict[str, Any], logger: Logger, resume: dict[str, Any] | None) -> None:
    env, run_dir, evaluate_now = ctx["env"], ctx["run_dir"], ctx["evaluate"]
    act_dim = env.action_space.shape[0]
    env_step, grad_step = (resume["env_step"], resume["grad_step"]) if resume else (0, 0)
    env.reset(seed=args.seed)
    if resume:  # checkpoints are taken at episode ends, so the env only needs its generator back
        env.unwrapped.np_random.bit_generator.state = resume["env_rng"]
    obs, _ = env.reset()
    next_checkpoint = (env_step // args.checkpoint_every + 1) * args.checkpoint_every
    logger.progress(args.online_steps, env_step, "online")

    def checkpoint(phase: str) -> None:
        logger.flush(env_step)
        save_checkpoint(run_dir / "checkpoint.pt", {
            "phase": phase, "env_step": env_step, "grad_step": grad_step, "n_eval_rows": logger.n_eval_rows,
            "rng": rng_state(), "env_rng": env.unwrapped.np_random.bit_generator.state,
            "agent": state_of(vars(agent)), "optims": state_of(optims), "buffer": buffer.state_dict()})
        if args.save_buffer:
            save_buffer(run_dir, buffer)

    while env_step < args.online_steps:
        if env_step % args.eval_every == 0:
            row = {"phase": "online", "env_step": env_step, "grad_step": grad_step, **evaluate_now()}
            if args.save_policy_every and env_step % args.save_policy_every == 0:
                row["policy"] = f"policies/actor_{env_step:08d}.pt"
                (run_dir / "policies").mkdir(exist_ok=True)
                save_checkpoint(run_dir / row["policy"], {"actor": agent.actor.state_dict(), "env_step": env_step})
            logger.eval_row(row)
        if env_step < args.learning_starts:
            action = (torch.rand(act_dim) * 2 - 1).numpy()
        else:
            action = agent.actor.act(obs, deterministic=False)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, action, reward, next_obs, terminated, truncated)
        env_step += 1
        if env_step > args.learning_starts:
            batch = buffer.sample(args.batch_size)
            logger.accumulate(update_critic(batch))
            grad_step += 1
            if env_step % args.policy_frequency == 0:
                logger.accumulate(update_actor(batch))
        if env_step % args.log_every == 0:
            logger.flush(env_step)
        obs = next_obs
        if terminated or truncated:
            if env_step >= next_checkpoint:
                checkpoint("online")
                next_checkpoint = (env_step // args.checkpoint_every + 1) * args.checkpoint_every
            obs, _ = env.reset()
        logger.bar.update(1)
    logger.eval_row({"phase": "online", "env_step": env_step, "grad_step": grad_step, **evaluate_now()})
    checkpoint("done")


def main(args: Args) -> Path:
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir:
        args = resumed_args(Args, resume_dir)
    if args.save_policy_every % args.eval_every:
        raise RunError("--save-policy-every must be a multiple of --eval-every, so that every snapshot is evaluated")
    task = resolve_task(args.env_id, args.data, allow_gym_id=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    seed_everything(args.seed, args.deterministic)
    env = make_env(task)
    eval_env = make_env(task, q_horizon(args.gamma) if args.q_diag_extend_steps is None else args.q_diag_extend_steps)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    width = args.hidden_dim
    actor = TanhGaussianActor(obs_dim, act_dim, width, n_layers=2, squash_log_std=True, edac_init=False).to(device)
    critic = VectorizedCritic(obs_dim, act_dim, 2, width, n_layers=2, edac_init=False).to(device)
    agent = Agent(actor, critic, VectorizedCritic(obs_dim, act_dim, 2, width, n_layers=2, edac_init=False).to(device),
                  torch.tensor(0.0 if args.autotune else math.log(args.alpha), device=device,
                               requires_grad=args.autotune))
    agent.critic_target.load_state_dict(critic.state_dict())
    buffer = ReplayBuffer(min(args.buffer_size, args.online_steps), obs_dim, act_dim, device, args.seed)
    update_critic, update_actor, optims = make_update_fns(agent, args, target_entropy=-float(act_dim))

    ckpt = None
    if resume_dir:
        run_dir, ckpt = resume_dir, load_checkpoint(resume_dir / "checkpoint.pt", device)
        if ckpt["phase"] == "done":
            print(f"{run_dir} has already finished")
            return run_dir
        set_rng_state(ckpt["rng"])
        restore(vars(agent), ckpt["agent"])
        restore(optims, ckpt["optims"])
        buffer.load_state_dict(ckpt["buffer"])
    else:
        run_dir = new_run_dir(args.output_dir, ALGO, args.env_id, args.seed)
        write_json(run_dir / "config.json", {
            "algo": ALGO, "args": dataclasses.asdict(args), "dataset": None, "dataset_sha256": None,
            "eval_env_id": task.eval_env_id, "max_episode_steps": task.max_episode_steps, "device": str(device),
            "device_name": device_name(device), "packages": package_versions(), "command": " ".join(sys.argv)})
    logger = Logger(run_dir, ckpt["n_eval_rows"] if ckpt else 0)
    horizon = q_horizon(args.gamma)
    ctx = {"run_dir": run_dir, "env": env,
           "evaluate": lambda: {**evaluate(eval_env, agent.actor, lambda s, a: agent.critic(s, a).min(0).values,
                                           args.eval_episodes, 100_000 * (args.seed + 1), task.max_episode_steps,
                                           task.family, args.gamma, horizon, lambda r: r),
                                "wall_time": time.time()}}
    compile_fn = torch.compile if args.compile else (lambda f: f)
    print(f"{ALGO} on {task.eval_env_id}, device {device}; run directory {run_dir}")
    train(args, agent, buffer, compile_fn(update_critic), compile_fn(update_actor), optims, ctx, logger, ckpt)
    logger.close()
    return run_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except RunError as e:
        sys.exit(f"error: {e}")
