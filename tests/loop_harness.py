"""What the loop tests of the CQL family (test_cql_ft_loop, test_cal_ql_loop, test_off2on) share: a scripted
environment whose rows say where they came from, a dataset marked the same way, a small CQL agent, main stopped at
the switch to online with what each phase received, and the checks of what main builds before the first update."""

from __future__ import annotations

import copy
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import torch

# episode 0 terminates, episode 1 times out, episode 2 terminates, episode 3 runs into the budget
SCRIPT = ((3, "terminated"), (4, "truncated"), (2, "terminated"), (100, "none"))
SCALE = 2.5  # the reward scale the loop tests hand to the online loop


class ScriptedEnv(gym.Env):
    """Episodes of scripted lengths and endings. Observation [episode, t, 1] (1 marks online rows; the dataset's rows
    carry -1), reward 10 * episode + t + 1 at step t."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self, script: tuple[tuple[int, str], ...] = SCRIPT) -> None:
        self.script, self.episode, self.t = script, 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self.t:
            self.episode, self.t = self.episode + 1, 0
        return self.obs(), {}

    def obs(self) -> np.ndarray:
        return np.array([self.episode, self.t, 1.0])

    def step(self, action):
        length, end = self.script[self.episode]
        reward = 10.0 * self.episode + self.t + 1
        self.t += 1
        done = self.t == length
        return self.obs(), reward, done and end == "terminated", done and end == "truncated", {}


def expected_online_rows(n_steps: int) -> list[dict]:
    """The rows the online loop must store from ScriptedEnv(SCRIPT) in its first n_steps, rewards scaled by SCALE."""
    rows = []
    for ep, (length, end) in enumerate(SCRIPT):
        for t in range(length):
            if len(rows) == n_steps:
                return rows
            last = t == length - 1
            rows.append({"obs": [ep, t, 1.0], "next_obs": [ep, t + 1, 1.0], "reward": SCALE * (10.0 * ep + t + 1),
                         "terminated": float(last and end == "terminated"),
                         "truncated": float(last and end == "truncated")})
    return rows


def dataset(n: int = 20) -> dict[str, np.ndarray]:
    """n dataset rows marked [row, 0, -1], random actions and rewards, no episode ends."""
    rng = np.random.default_rng(0)
    obs = np.stack([np.arange(n), np.zeros(n), -np.ones(n)], axis=1).astype(np.float32)
    return {"observations": obs, "actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
            "rewards": rng.standard_normal((n, 1)).astype(np.float32), "next_observations": obs + [0, 1, 0],
            "terminated": np.zeros((n, 1), np.float32), "truncated": np.zeros((n, 1), np.float32)}


def make_cql_agent(algo, obs_dim: int = 3, act_dim: int = 2):
    """cql_ft's or cal_ql's agent (the two share their networks) with CORL's offline init."""
    torch.manual_seed(0)
    mean, std = torch.zeros(obs_dim), torch.ones(obs_dim)
    actor, critic = algo.Actor(obs_dim, act_dim, mean, std, hidden=32), algo.Critic(obs_dim, act_dim, 2, mean, std)
    algo.init_weights(actor, critic, "corl-offline")
    return algo.Agent(actor, critic, copy.deepcopy(critic), torch.zeros((), requires_grad=True))


def cql_args(algo, tmp: Path, data: Path, **kw):
    """cql_ft's or cal_ql's Args for a few steps on a tiny file."""
    base = dict(env_id="hopper-medium", dataset=str(data), device="cpu", output_dir=str(tmp), batch_size=16,
                cql_n_actions=2, q_n_hidden_layers=1, offline_steps=3, offline_eval_every=3, online_steps=50,
                eval_episodes=1, checkpoint_every=1000, log_every=1000, seed=3)
    base.update(kw)
    return algo.Args(**base)


def direct_reward_scale(path: Path, max_episode_steps: int = 1000) -> float:
    """max_episode_steps / (max - min episode return) over the episodes of the raw file, as qlearning_dataset keeps
    them (time-out steps and the file's last step dropped; an episode ends at a terminal or before a time-out)."""
    with h5py.File(path, "r") as f:
        r, term, timeout = f["rewards"][()].astype(np.float64), f["terminals"][()], f["timeouts"][()]
    returns, total, n = [], 0.0, len(r)
    for i in range(n - 1):
        if timeout[i]:
            continue
        total += r[i]
        if term[i] or timeout[i + 1] or i + 1 == n - 1:
            returns.append(total)
            total = 0.0
    return max_episode_steps / (max(returns) - min(returns))


def assert_rows(got, want, what: str, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Arrays equal within tolerance, with a one-line message naming what differs and where first."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    bad = np.argwhere(~np.isclose(got, want, rtol=rtol, atol=atol))
    assert not len(bad), (f"{what}: {len(bad)} entries differ, first at {tuple(bad[0])}: "
                          f"{got[tuple(bad[0])]!r} vs {want[tuple(bad[0])]!r}")


def assert_same_state(a, b, where: str) -> None:
    """Nested dicts / lists of tensors and plain values exactly equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=where)
    else:
        assert a == b, where


def run_to_switch(algo, monkeypatch, args) -> dict:
    """algo.main with the online phase replaced by a recorder and evaluation by a stub; what the phases received:
    `fns` (make_update_fns' result) and `initial` (the agent before any update), `offline` (agent, buffer, update,
    optimisers, and the target critics after pretraining), `online` (agent, buffers, update, optimisers, ctx, and
    copies of the agent's and optimisers' states at the switch), `evaluate` (the last evaluation's arguments)."""
    seen = {}
    real_make, real_offline = algo.make_update_fns, algo.train_offline

    def make_update_fns(agent, a, act_dim):
        seen["fns"] = real_make(agent, a, act_dim)
        seen["initial"] = copy.deepcopy(agent)
        return seen["fns"]

    def train_offline(a, agent, buffer, update, optims, ctx, logger, start):
        seen["offline"] = {"agent": agent, "buffer": buffer, "update": update, "optims": optims}
        real_offline(a, agent, buffer, update, optims, ctx, logger, start)
        seen["offline"]["target"] = [p.clone() for p in agent.critic_target.parameters()]

    def train_online(a, agent, buffers, update, optims, ctx, logger, resume):
        seen["online"] = {"agent": agent, "buffers": buffers, "update": update, "optims": optims, "ctx": ctx,
                          "agent_state": copy.deepcopy(algo.state_of(vars(agent))),
                          "optims_state": copy.deepcopy(algo.state_of(optims))}

    def evaluate(env, actor, q_fn, n_episodes, seed, limit, family, gamma, horizon, reward_fn):
        seen["evaluate"] = {"q_fn": q_fn, "actor": actor, "seed": seed, "gamma": gamma, "reward_fn": reward_fn}
        return {"return_mean": 0.0, "return_std": 0.0, "normalized_score": 0.0, "q_normalized_difference": 0.0,
                "q_kendall_tau": 0.0, "q_scored_steps": 0}

    monkeypatch.setattr(algo, "make_update_fns", make_update_fns)
    monkeypatch.setattr(algo, "train_offline", train_offline)
    monkeypatch.setattr(algo, "train_online", train_online)
    monkeypatch.setattr(algo, "evaluate", evaluate)
    seen["run_dir"] = algo.main(args)
    return seen


def check_initial_agent(agent, data: dict[str, np.ndarray]) -> None:
    """What cql_ft's and cal_ql's main build before the first update: log alpha 0, target critics equal to the
    critics, CORL's offline init (zero critic biases, 1e-2 output layers), dataset observation statistics inside
    both networks."""
    assert float(agent.log_alpha.detach()) == 0.0, "log alpha starts at 0 (CORL)"
    for (name, p), t in zip(agent.critic.named_parameters(), agent.critic_target.parameters()):
        assert torch.equal(p, t), f"critic_target.{name} must start as a copy of the critics"
    layers = [*agent.critic.layers, agent.actor.net[-1]]  # the actor's hidden layers keep PyTorch's init
    assert all((layer.bias == 0).all() for layer in layers), "CORL's offline init: critic and actor output biases 0"
    assert agent.critic.layers[-1].weight.abs().max() < 0.05 and agent.actor.net[-1].weight.abs().max() < 0.05, \
        "--init corl-offline: output layers at gain 1e-2"
    mean, std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    for net in (agent.actor, agent.critic):
        assert_rows(net.obs_mean.numpy(), mean, f"{type(net).__name__} observation mean: the dataset's", rtol=1e-5,
                    atol=1e-6)
        assert_rows(net.obs_std.numpy(), std, f"{type(net).__name__} observation std: the dataset's + 1e-3",
                    rtol=1e-5, atol=1e-6)


def check_q_diagnostics(seen: dict) -> None:
    """The Q diagnostics of cql_ft and cal_ql use min(Q1, Q2) of the online critics, not the targets."""
    agent = seen["online"]["agent"]
    s, a = torch.randn(5, 11), torch.rand(5, 3) * 2 - 1
    with torch.no_grad():
        for p in agent.critic_target.parameters():  # a target far from the critics, so that using it shows
            p.add_(torch.randn_like(p))
        q = agent.critic(s, a)
        assert (q[0] - q[1]).abs().min() > 1e-6
        torch.testing.assert_close(seen["evaluate"]["q_fn"](s, a), q.min(0).values, rtol=0, atol=0,
                                   msg="Q diagnostics must use min(Q1, Q2) of the online critics (q_diagnostics.md)")
