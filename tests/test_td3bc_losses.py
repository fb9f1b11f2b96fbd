"""td3bc_ft.py, checked piece by piece against plain computations written here: the critic step's value, gradient and
target (twin min, clipped smoothing noise, `terminated` vs `truncated`), the actor loss's value and gradient in both
online modes, the switch to online (BC kept or dropped, optimiser moments kept or emptied, learning rates kept), the
online loop on a marked toy environment (what is stored, which rows a batch comes from, exploration noise, delayed
actor steps), and the documented defaults (td3bc_ft.md) to the digit."""

from __future__ import annotations

import copy
import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import load_algo

td3bc = load_algo("td3bc_ft")
torch.set_num_threads(1)

OBS_DIM, ACT_DIM = 4, 2


# ---------------------------------------------------------------- plain reference computations
def plain_q(critic, obs, act, i):
    """Q_i(s, a): member i's weights used one matmul at a time on [(s - mean) / std, a]: [B]."""
    h = torch.cat([(obs - critic.obs_mean) / critic.obs_std, act], dim=-1)
    n = len(critic.layers)
    for k, layer in enumerate(critic.layers):
        h = h @ layer.weight[i] + layer.bias[i, 0]
        if k < n - 1:
            h = torch.relu(h)
    return h[:, 0]


def plain_pi(actor, obs):
    lin = [m for m in actor.net if isinstance(m, torch.nn.Linear)]
    h = (obs - actor.obs_mean) / actor.obs_std
    for k, m in enumerate(lin):
        h = h @ m.weight.T + m.bias
        h = torch.relu(h) if k < len(lin) - 1 else torch.tanh(h)
    return h


def make_agent(seed=0, hidden=16, saturate_target=False):
    torch.manual_seed(seed)
    mean, std = torch.randn(OBS_DIM), torch.rand(OBS_DIM) + 0.5
    actor = td3bc.DeterministicActor(OBS_DIM, ACT_DIM, mean, std, 0.1, hidden=hidden)
    critic = td3bc.TwinCritic(OBS_DIM, ACT_DIM, mean, std)
    agent = td3bc.Agent(actor, copy.deepcopy(actor), critic, copy.deepcopy(critic))
    with torch.no_grad():
        for p in list(agent.actor_target.parameters()) + list(agent.critic_target.parameters()):
            p.add_(0.1 * torch.randn_like(p))
        if saturate_target:  # pi'(s') near +-1, so that only the final clip keeps a' inside [-1, 1]
            agent.actor_target.net[4].weight.mul_(30.0)
    optims = {"actor_optim": torch.optim.Adam(actor.parameters(), lr=3e-4),
              "critic_optim": torch.optim.Adam(critic.parameters(), lr=3e-4)}
    return agent, optims


def make_batch(b=24, seed=0):
    """Rows 0-5 terminated, rows 6-13 truncated (time limit, must bootstrap), the rest neither."""
    g = torch.Generator().manual_seed(seed)
    terminated, truncated = torch.zeros(b), torch.zeros(b)
    terminated[:6], truncated[6:14] = 1.0, 1.0
    return {"observations": torch.randn(b, OBS_DIM, generator=g) * 3,
            "actions": torch.rand(b, ACT_DIM, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g),
            "next_observations": torch.randn(b, OBS_DIM, generator=g) * 3,
            "terminated": terminated, "truncated": truncated}


def close(actual, expected, what, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def same(actual, expected, msg, rtol=0.0):
    """np.testing's comparison with `msg` on the first line, where pytest's failure summary shows it."""
    try:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0)
    except AssertionError as e:
        raise AssertionError(f"{msg}\n{e}") from None


# ---------------------------------------------------------------- critic step
def test_critic_step_value_gradient_and_target():
    """y = r + gamma (1 - terminated) min(Q1', Q2')(s', clip(pi'(s') + clip(sigma eps, -c, c), -1, 1)); loss
    MSE(Q1, y) + MSE(Q2, y); gradients on both critics; truncated rows bootstrap; no Polyak in the critic step."""
    agent, optims = make_agent(seed=2, saturate_target=True)
    ref = copy.deepcopy(agent)
    args = td3bc.Args(gamma=0.9, target_noise=0.4, target_noise_clip=0.3)
    update_critic, _ = td3bc.make_update_fns(agent, optims, args, bc=True)
    batch = make_batch(b=48, seed=2)
    torch.manual_seed(5)
    out = update_critic(batch)

    torch.manual_seed(5)
    with torch.no_grad():
        s2 = batch["next_observations"]
        pi_next = plain_pi(ref.actor_target, s2)
        close(ref.actor_target(s2), pi_next, "the actor must see the standardised observation (s - mean) / std")
        eps = torch.randn(pi_next.shape) * 0.4
        assert (eps.abs() > 0.3).any() and (eps.abs() < 0.3).any()
        a_next = (pi_next + eps.clamp(-0.3, 0.3)).clamp(-1, 1)
        assert ((pi_next + eps.clamp(-0.3, 0.3)).abs() > 1).any()  # the final clip matters in this batch
        q1n, q2n = plain_q(ref.critic_target, s2, a_next, 0), plain_q(ref.critic_target, s2, a_next, 1)
        assert (q1n < q2n).any() and (q1n > q2n).any()  # each twin is the min on some rows
        y = batch["rewards"] + 0.9 * (1 - batch["terminated"]) * torch.minimum(q1n, q2n)
    q1 = plain_q(ref.critic, batch["observations"], batch["actions"], 0)
    q2 = plain_q(ref.critic, batch["observations"], batch["actions"], 1)
    close(ref.critic(batch["observations"], batch["actions"]), torch.stack([q1, q2]).detach(),
          "the critics must see the standardised observation (s - mean) / std")
    # The target on its own, per row: terminated rows are r, truncated rows r + gamma min Q'.
    torch.manual_seed(5)
    y_file = td3bc.td3_target(ref.actor_target, ref.critic_target, batch, 0.9, 0.4, 0.3)
    close(y_file[:6], batch["rewards"][:6], "terminated rows must not bootstrap (y = r)")
    assert ((y_file[6:14] - batch["rewards"][6:14]).abs() > 1e-4).all(), \
        "truncated rows (time limit) must bootstrap: y = r + gamma min Q', not r"
    close(y_file, y, "td3_target = r + gamma (1 - terminated) min(Q1', Q2')(s', a') at "
                     "a' = clip(pi'(s') + clip(sigma eps, -c, c), -1, 1)")
    loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    close(out["loss/critic"], loss.detach(), "critic loss = MSE(Q1, y) + MSE(Q2, y)")
    loss.backward()
    for (name, p), p_ref in zip(agent.critic.named_parameters(), ref.critic.parameters()):
        close(p.grad, p_ref.grad, f"critic gradient of {name}", atol=1e-6, rtol=1e-4)
    for m in ("actor", "actor_target", "critic_target"):
        for p, p0 in zip(getattr(agent, m).parameters(), getattr(ref, m).parameters()):
            assert torch.equal(p, p0), f"the critic step changed {m}: targets move only after actor steps"


# ---------------------------------------------------------------- actor loss
def test_bc_actor_loss_value_and_gradient():
    """-lambda mean Q + mean (pi - a)^2 with lambda = alpha / mean|Q| a constant; Q of both signs, so that
    mean|Q| and |mean Q| differ."""
    b, alpha = 8, 2.5
    q = torch.tensor([30.0, -12.0, 5.0, -40.0, 22.0, 1.0, -3.0, 8.0], requires_grad=True)
    pi = (torch.linspace(-0.9, 0.9, b * ACT_DIM).reshape(b, ACT_DIM)).requires_grad_(True)
    a = torch.linspace(0.8, -0.7, b * ACT_DIM).reshape(b, ACT_DIM)
    loss, lmbda = td3bc.td3bc_actor_loss(q, pi, a, alpha)
    mean_abs = sum(abs(v) for v in q.tolist()) / b
    lam = alpha / mean_abs
    bc = sum((x - y) ** 2 for x, y in zip(pi.flatten().tolist(), a.flatten().tolist())) / (b * ACT_DIM)
    assert lmbda.item() == pytest.approx(lam, rel=1e-6), "lambda must be alpha / mean|Q1(s, pi(s))|"
    assert loss.item() == pytest.approx(-lam * sum(q.tolist()) / b + bc, rel=1e-6), \
        "TD3+BC actor loss must be -lambda mean(Q1) + mean((pi - a)^2)"
    loss.backward()
    close(q.grad, torch.full((b,), -lam / b), "dL/dQ: lambda is a constant (detached), so -lambda / B")
    close(pi.grad, 2 * (pi - a).detach() / (b * ACT_DIM), "dL/dpi = 2 (pi - a) / (B |A|) from the BC term")


@pytest.mark.parametrize("mode", ["original", "loose"])
def test_online_actor_step_per_mode(mode):
    """The actor step the online phase uses: original = TD3+BC on Q1 (online critic), loose = -mean Q1 without
    lambda or BC; then Polyak of both targets with tau."""
    agent, optims = make_agent(seed=3)
    ref = copy.deepcopy(agent)
    args = td3bc.Args(online_mode=mode, alpha=1.7, tau=0.01)
    _, update_actor = td3bc.online_update_fns(agent, optims, args, switching=True)
    batch = make_batch(seed=3)
    out = update_actor(batch)
    obs = batch["observations"]
    pi = plain_pi(ref.actor, obs)
    q1 = plain_q(ref.critic, obs, pi, 0)
    if mode == "original":
        lam = 1.7 / q1.abs().mean().detach()
        expected = -lam * q1.mean() + ((pi - batch["actions"]) ** 2).mean()
    else:
        expected = -q1.mean()
        assert "lambda" not in out and "loss/bc" not in out, "loose mode must not compute the BC term"
    close(out["loss/actor"], expected.detach(), f"{mode} actor loss on Q1 of the online critic at pi(s)")
    expected.backward()
    for (name, p), p_ref in zip(agent.actor.named_parameters(), ref.actor.parameters()):
        close(p.grad, p_ref.grad, f"{mode} actor gradient of {name}", atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in agent.critic.parameters()), "the actor loss must not give critic gradients"
    for target, target0, source in ((agent.actor_target, ref.actor_target, agent.actor),
                                    (agent.critic_target, ref.critic_target, agent.critic)):
        for t, t0, s in zip(target.parameters(), target0.parameters(), source.parameters()):
            close(t, t0 + 0.01 * (s - t0), "Polyak after the actor step: target + tau (online - target)",
                  atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------- exploration
def test_exploration_noise_is_clipped_then_the_action():
    """act(s, deterministic=False) = clip(pi(s) + clip(N(0, sigma^2), -0.5, 0.5), -1, 1), one draw per call."""
    agent, _ = make_agent(seed=7)
    actor = agent.actor
    actor.expl_noise = 0.8  # about half the draws exceed 0.5
    obs = np.zeros(OBS_DIM)
    pi = plain_pi(actor, torch.zeros(1, OBS_DIM))[0].detach()
    assert (pi.abs() < 0.4).all()  # pi +- 0.5 stays inside [-1, 1], so only the noise clip can bound the change
    torch.manual_seed(8)
    noisy = torch.as_tensor(np.stack([actor.act(obs, deterministic=False) for _ in range(40)]))
    torch.manual_seed(8)
    eps = torch.stack([torch.randn(ACT_DIM) for _ in range(40)]) * 0.8  # one draw per call, as act draws
    assert (eps.abs() > 0.5).any() and (eps.abs() < 0.5).any()
    close(noisy, pi + eps.clamp(-0.5, 0.5), "exploration noise: N(0, expl_noise^2) clipped to +-0.5, added to pi(s)",
          atol=1e-6, rtol=0)
    close(torch.as_tensor(actor.act(obs, deterministic=True)), pi, "deterministic act = pi(s)", atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the switch to online
def adam_state(optims):
    return {k: len(o.state) for k, o in optims.items()}


@pytest.mark.parametrize("reset", [False, True])
def test_switch_to_online_optimizer_state_and_learning_rates(reset):
    agent, _ = make_agent(seed=4)
    args = td3bc.Args(actor_lr=2e-4, critic_lr=7e-4, reset_optimizers=reset)
    optims = {"actor_optim": torch.optim.Adam(agent.actor.parameters(), lr=args.actor_lr),
              "critic_optim": torch.optim.Adam(agent.critic.parameters(), lr=args.critic_lr)}
    offline = td3bc.make_update_fns(agent, optims, args, bc=True)
    for _ in range(2):
        offline[0](make_batch())
    offline[1](make_batch())
    moments = {k: {id(p): {n: v.clone() for n, v in s.items()} for p, s in o.state.items()} for k, o in optims.items()}
    td3bc.online_update_fns(agent, optims, args, switching=True)
    if reset:
        assert adam_state(optims) == {"actor_optim": 0, "critic_optim": 0}, \
            "--reset-optimizers must empty the Adam moments at the switch"
    else:
        for k, o in optims.items():
            for p, s in o.state.items():
                assert all(torch.equal(v, moments[k][id(p)][n]) for n, v in s.items()), \
                    f"without --reset-optimizers the {k} moments must carry over"
            assert len(o.state) == len(moments[k]), f"{k}: moments lost at the switch"
    assert [g["lr"] for g in optims["actor_optim"].param_groups] == [2e-4], "the switch must keep the actor lr"
    assert [g["lr"] for g in optims["critic_optim"].param_groups] == [7e-4], "the switch must keep the critic lr"
    # A resumed online phase is not a switch: its saved moments stay, even with --reset-optimizers.
    offline[0](make_batch())
    n = adam_state(optims)
    td3bc.online_update_fns(agent, optims, args, switching=False)
    assert adam_state(optims) == n, "resuming an online phase must not reset the optimisers"


# ---------------------------------------------------------------- the online loop on a marked environment
class MarkedEnv(gym.Env):
    """Episodes alternately terminate after 5 steps and are truncated (time limit) after 4. The observation
    holds 1000 + a global step counter, the episode's step and the episode index; reward = 0.5 + step."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
        self.count, self.episode, self.t = 0, -1, 0

    def _obs(self):
        return np.array([1000.0 + self.count, self.t, self.episode, 1.0])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        self.count += 1
        return self._obs(), {}

    def step(self, action):
        assert np.all(np.abs(action) <= 1.0)
        self.t += 1
        self.count += 1
        reward = 0.5 + self.t
        terminated = self.episode % 2 == 0 and self.t == 5
        truncated = self.episode % 2 == 1 and self.t == 4
        return self._obs(), reward, terminated, truncated, {}


class NullLogger:
    def __init__(self):
        self.n_eval_rows = 0
        self.bar = type("Bar", (), {"update": lambda self, n: None})()

    def progress(self, *a):
        pass

    def accumulate(self, metrics):
        pass

    def flush(self, step):
        pass

    def eval_row(self, row):
        pass


def dataset_rows(n=40):
    """Offline rows marked by observations in [0, 1) (the online ones are >= 1000)."""
    rng = np.random.default_rng(0)
    return {"observations": rng.uniform(0, 1, (n, OBS_DIM)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, ACT_DIM)).astype(np.float32),
            "rewards": rng.standard_normal(n).astype(np.float32),
            "next_observations": rng.uniform(0, 1, (n, OBS_DIM)).astype(np.float32),
            "terminated": np.zeros(n, np.float32), "truncated": np.zeros(n, np.float32)}


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    """train_online for 30 env steps on MarkedEnv after 7 offline gradient steps, recording every act call, every
    batch and every update."""
    data = dataset_rows()
    agent, optims = make_agent(seed=6)
    buffer = td3bc.ReplayBuffer(len(data["rewards"]) + 30, OBS_DIM, ACT_DIM, torch.device("cpu"), 0)
    buffer.load_dataset(data)
    args = td3bc.Args(online_steps=30, batch_size=8, eval_every=1000, checkpoint_every=1000, log_every=1000)
    record = {"act": [], "critic": [], "actor": [], "added_before": []}
    real_act = agent.actor.act

    def act(obs, deterministic):
        record["act"].append((np.array(obs), deterministic, agent.actor.expl_noise))
        return real_act(obs, deterministic)

    agent.actor.act = act
    critic_fn, actor_fn = td3bc.make_update_fns(agent, optims, args, bc=True)

    def update_critic(batch):
        record["critic"].append({k: v.clone() for k, v in batch.items()})
        record["added_before"].append(buffer.n_added)
        record["last"] = batch
        return critic_fn(batch)

    def update_actor(batch):
        record["actor"].append(len(record["critic"]))
        assert batch is record["last"], "the actor step must use the critic step's batch"
        return actor_fn(batch)

    env = MarkedEnv()
    ctx = {"env": env, "run_dir": tmp_path_factory.mktemp("online"), "evaluate": lambda: {},
           "offline_grad_steps": 7}
    td3bc.train_online(args, agent, buffer, (update_critic, update_actor), optims, ctx, NullLogger(), None)
    return {"record": record, "buffer": buffer, "data": data, "agent": agent}


def test_online_loop_explores_with_the_noisy_policy(online_run):
    calls = online_run["record"]["act"]
    assert len(calls) == 30, "one action per online env step"
    assert all(not det for _, det, _ in calls), "online actions must come from act(obs, deterministic=False)"
    assert all(noise == 0.1 for _, _, noise in calls)


def test_online_loop_stores_true_transitions(online_run):
    """Every env step goes into the buffer after the dataset: the observation acted on, the action taken, the raw
    reward, the true next observation (not the reset one), `terminated` only where the env terminated and
    `truncated` where the time limit cut the episode (such rows keep terminated = 0, so they bootstrap)."""
    added = online_run["buffer"].added()
    assert len(added["rewards"]) == 30
    acted = np.stack([o for o, _, _ in online_run["record"]["act"]])
    same(added["observations"], acted, msg="stored s is not the observation acted on")
    t_next = added["next_observations"][:, 1]
    ep = added["next_observations"][:, 2]
    same(added["next_observations"][:, 0], added["observations"][:, 0] + 1,
         msg="stored s' is not the step's own next observation")
    same(added["rewards"], 0.5 + t_next, msg="stored rewards must be the env's, raw")
    term = (ep % 2 == 0) & (t_next == 5)
    trunc = (ep % 2 == 1) & (t_next == 4)
    assert trunc.sum() >= 3 and term.sum() >= 3
    same(added["terminated"], term.astype(np.float32),
         msg="terminated must be set only at terminations (a time-out is not one)")
    same(added["truncated"], trunc.astype(np.float32),
         msg="truncated must mark the time-limit ends")
    same(online_run["buffer"].storage[:40, 0].numpy(), online_run["data"]["observations"][:, 0],
         "the dataset must stay in the buffer online")


def test_online_batches_are_uniform_over_dataset_and_online_rows(online_run):
    rec = online_run["record"]
    assert len(rec["critic"]) == 30, "one critic step per env step (UTD 1)"
    seen_offline = seen_online = 0
    for batch, n_added in zip(rec["critic"], rec["added_before"]):
        assert batch["observations"].shape == (8, OBS_DIM), "online batches hold batch_size rows"
        marks = batch["observations"][:, 0]
        online = marks >= 1000
        seen_online += int(online.sum())
        seen_offline += int((~online).sum())
        # rows the loop has already added, never a future or empty row
        assert (marks[~online] < 1).all() and (marks[online] >= 1000).all()
        assert n_added >= 1, "the update must come after the step's transition is stored"
    assert seen_online > 10 and seen_offline > 100, \
        "online batches must mix dataset rows and online rows (one buffer, uniform over both)"
    # Delayed actor: after critic steps 8, 10, ... (the gradient step count goes on from the 7 offline steps).
    assert rec["actor"] == [k for k in range(1, 31) if (7 + k) % 2 == 0], \
        "actor steps must come every policy_freq gradient steps, counted across both phases"


def test_online_keeps_the_offline_observation_statistics(online_run):
    agent = online_run["agent"]
    ref, _ = make_agent(seed=6)
    for net in ("actor", "actor_target", "critic", "critic_target"):
        for k in ("obs_mean", "obs_std"):
            assert torch.equal(getattr(getattr(agent, net), k), getattr(getattr(ref, net), k)), \
                f"{net}.{k} changed online; the dataset's statistics stay fixed"


# ---------------------------------------------------------------- defaults (td3bc_ft.md, "Defaults for o2o-rl")
DOC_DEFAULTS = dict(alpha=2.5, batch_size=256, actor_lr=3e-4, critic_lr=3e-4, gamma=0.99, tau=0.005,
                    target_noise=0.2, target_noise_clip=0.5, policy_freq=2, expl_noise=0.1, online_mode="original",
                    reset_optimizers=False, offline_eval_every=10_000, eval_every=1_000, eval_episodes=10)


def test_args_defaults_match_the_design_doc():
    args = td3bc.Args()
    for k, v in DOC_DEFAULTS.items():
        assert getattr(args, k) == v and type(getattr(args, k)) is type(v), \
            f"Args.{k} = {getattr(args, k)!r}, td3bc_ft.md says {v!r}"


@pytest.mark.parametrize("env_id", td3bc.TASK_IDS)
def test_per_dataset_defaults_match_the_design_doc(env_id):
    args = td3bc.parse_args(["--env-id", env_id])
    adroit = env_id.split("-")[0] in ("pen", "door")
    assert args.offline_steps == 1_000_000, f"{env_id}: TD3+BC pretrains for 1M updates (CORL, authors)"
    assert args.online_steps == (400_000 if adroit else 100_000), f"{env_id}: protocol online budget"
    for k, v in DOC_DEFAULTS.items():
        assert getattr(args, k) == v, f"{env_id}: {k} = {getattr(args, k)!r}, td3bc_ft.md says {v!r} (no overrides)"
    for key, table in td3bc.DATASET_DEFAULTS.items():
        assert key in td3bc.TASK_IDS or key in td3bc.MUJOCO_FAMILIES + td3bc.ADROIT_FAMILIES, key
        assert set(table) <= {f.name for f in dataclasses.fields(td3bc.Args)}, key


def test_network_sizes():
    mean, std = torch.zeros(5), torch.ones(5)
    actor = td3bc.DeterministicActor(5, 3, mean, std, 0.1)
    critic = td3bc.TwinCritic(5, 3, mean, std)
    assert [tuple(m.weight.shape) for m in actor.net if isinstance(m, torch.nn.Linear)] == [(256, 5), (256, 256),
                                                                                          (3, 256)]
    assert isinstance(actor.net[-1], torch.nn.Tanh)
    assert [tuple(layer.weight.shape) for layer in critic.layers] == [(2, 8, 256), (2, 256, 256), (2, 256, 1)]
