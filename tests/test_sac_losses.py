"""sac.py, checked piece by piece against plain computations written here: the soft Bellman target (twin min of the
target critics, entropy term, `terminated` vs `truncated`) and the critic step's value, gradient and Polyak update;
the actor and temperature losses' values and gradients (fresh log-probs, alpha rather than log alpha), the
`policy_frequency` repeats, autotune off; the loop on a marked toy environment (uniform-random warm-up of
`learning_starts` steps without updates, what is stored, batch sizes, delayed actor steps); what `main` builds
(initial temperature, target entropy, networks, buffer, the Q diagnostics' min(Q1, Q2)); the documented defaults."""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import load_algo

sac = load_algo("sac")
torch.set_num_threads(1)

OBS_DIM, ACT_DIM = 4, 2


# ---------------------------------------------------------------- plain reference computations
def plain_q(critic, obs, act, i):
    h = torch.cat([obs, act], dim=-1)
    n = len(critic.layers)
    for k, layer in enumerate(critic.layers):
        h = h @ layer.weight[i] + layer.bias[i, 0]
        if k < n - 1:
            h = torch.relu(h)
    return h[:, 0]


def plain_min_q(critic, obs, act):
    return torch.minimum(plain_q(critic, obs, act, 0), plain_q(critic, obs, act, 1))


def plain_sample(actor, obs, eps):
    """CleanRL's tanh-Gaussian: log_std = -5 + 3.5 (tanh(raw) + 1); a = tanh(mu + std eps);
    log pi = sum log N(u; mu, std) - sum log(1 - a^2 + 1e-6)."""
    lin = [m for m in actor.trunk if isinstance(m, torch.nn.Linear)]
    h = obs
    for m in lin:
        h = torch.relu(h @ m.weight.T + m.bias)
    mu = h @ actor.mu.weight.T + actor.mu.bias
    log_std = -5.0 + 0.5 * 7.0 * (torch.tanh(h @ actor.log_std.weight.T + actor.log_std.bias) + 1.0)
    u = mu + log_std.exp() * eps
    a = torch.tanh(u)
    log_pi = torch.distributions.Normal(mu, log_std.exp()).log_prob(u).sum(-1) - torch.log(1 - a ** 2 + 1e-6).sum(-1)
    return a, log_pi


def make_agent(seed=0, alpha=0.3, autotune=True):
    torch.manual_seed(seed)
    actor = sac.TanhGaussianActor(OBS_DIM, ACT_DIM, hidden=16, n_layers=2, squash_log_std=True, edac_init=False)
    with torch.no_grad():  # a wider policy than the default init's, so that log-probs vary visibly
        actor.log_std.bias.add_(1.0)
    critic = sac.VectorizedCritic(OBS_DIM, ACT_DIM, 2, hidden=16, n_layers=2, edac_init=False)
    with torch.no_grad():  # Q1 and Q2 of similar level and larger spread, so that each is the min on some rows
        critic.layers[-1].weight.mul_(4.0)
        critic.layers[-1].bias.zero_()
    target = copy.deepcopy(critic)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    log_alpha = torch.tensor(math.log(alpha), requires_grad=autotune)
    return sac.Agent(actor, critic, target, log_alpha)


def make_batch(b=24, seed=0):
    """Rows 0-5 terminated, rows 6-13 truncated (time limit: they must bootstrap), the rest neither."""
    g = torch.Generator().manual_seed(seed)
    terminated, truncated = torch.zeros(b), torch.zeros(b)
    terminated[:6], truncated[6:14] = 1.0, 1.0
    return {"observations": torch.randn(b, OBS_DIM, generator=g),
            "actions": torch.rand(b, ACT_DIM, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g),
            "next_observations": torch.randn(b, OBS_DIM, generator=g),
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
def test_terminated_not_truncated_stops_bootstrapping():
    """Swap the flags of one batch: the target must change exactly on the rows whose `terminated` changed."""
    agent = make_agent(seed=2)
    batch = make_batch(seed=2)
    swapped = {**batch, "terminated": batch["truncated"], "truncated": batch["terminated"]}
    update_critic, _, _ = sac.make_update_fns(copy.deepcopy(agent), sac.Args(), target_entropy=-2.0)
    update_critic_b, _, _ = sac.make_update_fns(copy.deepcopy(agent), sac.Args(), target_entropy=-2.0)
    torch.manual_seed(0)
    a = update_critic(batch)["loss/critic"]
    torch.manual_seed(0)
    b = update_critic_b(swapped)["loss/critic"]
    assert not torch.allclose(a, b), "the critic loss must depend on `terminated`, not on `truncated`"
    same = {**batch, "truncated": torch.ones(24)}
    update_critic_c, _, _ = sac.make_update_fns(copy.deepcopy(agent), sac.Args(), target_entropy=-2.0)
    torch.manual_seed(0)
    c = update_critic_c(same)["loss/critic"]
    assert torch.equal(a, c), "`truncated` must not enter the Bellman target (time-outs bootstrap)"


def test_critic_step_value_gradient_target_and_polyak():
    agent = make_agent(seed=1)
    ref = copy.deepcopy(agent)
    args = sac.Args(gamma=0.9, tau=0.02)
    update_critic, _, optims = sac.make_update_fns(agent, args, target_entropy=-2.0)
    batch = make_batch(b=32, seed=1)
    torch.manual_seed(11)
    out = update_critic(batch)

    torch.manual_seed(11)
    with torch.no_grad():
        s2 = batch["next_observations"]
        a2, log_pi2 = plain_sample(ref.actor, s2, torch.randn(32, ACT_DIM))
        q1n, q2n = plain_q(ref.critic_target, s2, a2, 0), plain_q(ref.critic_target, s2, a2, 1)
        assert (q1n < q2n).any() and (q1n > q2n).any() and log_pi2.std() > 0.1  # both twins are the min somewhere
        soft = torch.minimum(q1n, q2n) - 0.3 * log_pi2
        y = batch["rewards"] + 0.9 * (1 - batch["terminated"]) * soft
    q1 = plain_q(ref.critic, batch["observations"], batch["actions"], 0)
    q2 = plain_q(ref.critic, batch["observations"], batch["actions"], 1)
    loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    close(out["loss/critic"], loss.detach(),
          "critic loss = sum of MSE(Q_i, y), y = r + gamma (1 - terminated) (min(Q1', Q2')(s', a') - alpha log pi)")
    # The same target row by row: terminated rows are r alone, truncated rows bootstrap.
    per_row = ((q1 - y) ** 2 + (q2 - y) ** 2).detach()
    with torch.no_grad():
        y_term_bootstrapped = batch["rewards"] + 0.9 * soft
    assert not torch.allclose(y[:6], y_term_bootstrapped[:6]) and torch.equal(y[6:14], y_term_bootstrapped[6:14])
    assert per_row.shape == (32,)
    loss.backward()
    for (name, p), p_ref in zip(agent.critic.named_parameters(), ref.critic.parameters()):
        close(p.grad, p_ref.grad, f"critic gradient of {name}", atol=1e-6, rtol=1e-4)
    for t, t0, s in zip(agent.critic_target.parameters(), ref.critic_target.parameters(), agent.critic.parameters()):
        close(t, t0 + 0.02 * (s - t0), "Polyak after every critic step: target + tau (critic - target)",
              atol=1e-7, rtol=1e-6)
    for p, p0 in zip(agent.actor.parameters(), ref.actor.parameters()):
        assert torch.equal(p, p0), "the critic step must not move the actor"
    assert agent.log_alpha.item() == ref.log_alpha.item(), "the critic step must not move the temperature"
    assert optims["critic_optim"].param_groups[0]["lr"] == args.q_lr


# ---------------------------------------------------------------- actor and temperature
def test_actor_and_temperature_step_values_and_gradients():
    """policy_frequency 1: L_pi = mean(alpha log pi(a~|s) - min(Q1, Q2)(s, a~)); then, with fresh log-probs from the
    updated actor, L_alpha = mean(-exp(log alpha) (log pi + H_target))."""
    agent = make_agent(seed=3, alpha=0.3)
    ref = copy.deepcopy(agent)
    args = sac.Args(policy_frequency=1, policy_lr=2e-3, q_lr=5e-3)
    _, update_actor, optims = sac.make_update_fns(agent, args, target_entropy=-2.0)
    assert optims["actor_optim"].param_groups[0]["lr"] == 2e-3, "the actor's Adam uses --policy-lr"
    assert optims["alpha_optim"].param_groups[0]["lr"] == 5e-3, "the temperature's Adam uses --q-lr (CleanRL)"
    batch = make_batch(seed=3)
    obs = batch["observations"]
    torch.manual_seed(21)
    out = update_actor(batch)

    torch.manual_seed(21)
    a, log_pi = plain_sample(ref.actor, obs, torch.randn(24, ACT_DIM))
    q_min = plain_min_q(ref.critic, obs, a)
    q1 = plain_q(ref.critic, obs, a, 0)
    assert (q1 == q_min).any() and (q1 != q_min).any(), "test setup: each twin must be the min on some rows"
    loss = (0.3 * log_pi - q_min).mean()
    close(out["loss/actor"], loss.detach(), "actor loss = mean(alpha log pi - min(Q1, Q2)) at the online critic")
    loss.backward()
    for (name, p), p_ref in zip(agent.actor.named_parameters(), ref.actor.parameters()):
        close(p.grad, p_ref.grad, f"actor gradient of {name}", atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in agent.critic.parameters()), "the actor loss must not give critic gradients"
    with torch.no_grad():
        _, fresh = plain_sample(agent.actor, obs, torch.randn(24, ACT_DIM))  # the updated actor, a new draw
    expected = (-0.3 * (fresh + (-2.0))).mean()
    close(out["loss/alpha"], expected, "temperature loss = mean(-alpha (log pi + H_target)), fresh log-probs")
    close(agent.log_alpha.grad, expected, "d L_alpha / d log alpha = mean(-alpha (log pi + H_target))")
    assert agent.log_alpha.item() != ref.log_alpha.item()
    assert (agent.log_alpha.item() < ref.log_alpha.item()) == (expected.item() > 0), "Adam moves log alpha downhill"
    for p, p0 in zip(agent.critic_target.parameters(), ref.critic_target.parameters()):
        assert torch.equal(p, p0), "the actor step must not move the target critics"


def test_policy_frequency_repeats_on_the_same_batch():
    """policy_frequency 3: three actor + temperature steps on one batch, written out with plain Adam steps."""
    agent = make_agent(seed=4, alpha=0.5)
    ref = copy.deepcopy(agent)
    args = sac.Args(policy_frequency=3, policy_lr=1e-2, q_lr=1e-2)
    _, update_actor, _ = sac.make_update_fns(agent, args, target_entropy=-2.0)
    batch = make_batch(seed=4)
    obs = batch["observations"]
    torch.manual_seed(31)
    out = update_actor(batch)

    actor_opt = torch.optim.Adam(ref.actor.parameters(), lr=1e-2)
    alpha_opt = torch.optim.Adam([ref.log_alpha], lr=1e-2)
    torch.manual_seed(31)
    losses = []
    for _ in range(3):
        alpha = ref.log_alpha.detach().exp()
        a, log_pi = plain_sample(ref.actor, obs, torch.randn(24, ACT_DIM))
        loss = (alpha * log_pi - plain_min_q(ref.critic, obs, a)).mean()
        actor_opt.zero_grad()
        loss.backward()
        actor_opt.step()
        losses.append(loss.item())
        with torch.no_grad():
            _, log_pi = plain_sample(ref.actor, obs, torch.randn(24, ACT_DIM))
        a_loss = (-ref.log_alpha.exp() * (log_pi - 2.0)).mean()
        alpha_opt.zero_grad()
        a_loss.backward()
        alpha_opt.step()
    assert out["loss/actor"].item() == pytest.approx(sum(losses) / 3, rel=1e-4), "mean actor loss of the repeats"
    for (name, p), p_ref in zip(agent.actor.named_parameters(), ref.actor.parameters()):
        close(p, p_ref.detach(), f"actor {name} after policy_frequency = 3 repeated steps", atol=1e-6, rtol=1e-5)
    close(agent.log_alpha.detach(), ref.log_alpha.detach(), "log alpha after 3 temperature steps", atol=1e-6, rtol=1e-5)


def test_autotune_off_keeps_alpha_fixed():
    agent = make_agent(seed=5, alpha=0.2, autotune=False)
    ref = copy.deepcopy(agent)
    update_critic, update_actor, _ = sac.make_update_fns(agent, sac.Args(autotune=False, policy_frequency=1),
                                                         target_entropy=-2.0)
    batch = make_batch(seed=5)
    torch.manual_seed(41)
    out = update_actor(batch)
    torch.manual_seed(41)
    a, log_pi = plain_sample(ref.actor, batch["observations"], torch.randn(24, ACT_DIM))
    expected = (0.2 * log_pi - plain_min_q(ref.critic, batch["observations"], a)).mean()
    close(out["loss/actor"], expected.detach(), "with --no-autotune the actor loss uses the fixed alpha 0.2")
    assert agent.log_alpha.item() == pytest.approx(math.log(0.2)) and out["loss/alpha"].item() == 0.0, \
        "with --no-autotune the temperature must not be trained"
    assert not out["entropy"].requires_grad
    update_critic(batch)
    assert agent.log_alpha.item() == pytest.approx(math.log(0.2))


# ---------------------------------------------------------------- the loop on a marked environment
class MarkedEnv(gym.Env):
    """Episodes alternately terminate after 5 steps and are truncated (time limit) after 4; observation =
    (1000 + global counter, step in episode, episode index, 1); reward = 0.5 + step. Records the actions."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
        self.count, self.episode, self.t, self.actions = 0, -1, 0, []

    def _obs(self):
        return np.array([1000.0 + self.count, self.t, self.episode, 1.0])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        self.count += 1
        return self._obs(), {}

    def step(self, action):
        self.actions.append(np.array(action))
        self.t += 1
        self.count += 1
        terminated = self.episode % 2 == 0 and self.t == 5
        truncated = self.episode % 2 == 1 and self.t == 4
        return self._obs(), 0.5 + self.t, terminated, truncated, {}


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


N_STEPS, LEARNING_STARTS = 30, 10


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    agent = make_agent(seed=6)
    args = sac.Args(online_steps=N_STEPS, learning_starts=LEARNING_STARTS, batch_size=8, policy_frequency=2,
                    eval_every=1000, checkpoint_every=1000, log_every=1000)
    buffer = sac.ReplayBuffer(N_STEPS, OBS_DIM, ACT_DIM, torch.device("cpu"), 0)
    critic_fn, actor_fn, optims = sac.make_update_fns(agent, args, target_entropy=-2.0)
    rec = {"act": [], "critic": [], "actor": []}
    real_act = agent.actor.act

    def act(obs, deterministic):
        rec["act"].append((buffer.n_added, deterministic))
        return real_act(obs, deterministic)

    agent.actor.act = act

    def update_critic(batch):
        rec["critic"].append((buffer.n_added, {k: v.clone() for k, v in batch.items()}))
        rec["last"] = batch
        return critic_fn(batch)

    def update_actor(batch):
        assert batch is rec["last"], "the actor step must use the critic step's batch"
        rec["actor"].append(buffer.n_added)
        return actor_fn(batch)

    env = MarkedEnv()
    ctx = {"env": env, "run_dir": tmp_path_factory.mktemp("sac_loop"), "evaluate": lambda: {}}
    torch.manual_seed(3)
    sac.train(args, agent, buffer, update_critic, update_actor, optims, ctx, NullLogger(), None)
    return {"rec": rec, "env": env, "buffer": buffer}


def test_warm_up_is_uniform_random_without_updates(loop_run):
    rec, env = loop_run["rec"], loop_run["env"]
    assert [n for n, _ in rec["act"]] == list(range(LEARNING_STARTS, N_STEPS)), \
        "the policy must act only from env step learning_starts on (uniform-random actions before)"
    assert all(not det for _, det in rec["act"]), "SAC collects with the stochastic policy"
    assert [n for n, _ in rec["critic"]] == list(range(LEARNING_STARTS + 1, N_STEPS + 1)), \
        "one critic step per env step once more than learning_starts transitions are stored, none before"
    torch.manual_seed(3)
    expected = np.stack([(torch.rand(ACT_DIM) * 2 - 1).numpy() for _ in range(LEARNING_STARTS)])
    same(np.stack(env.actions[:LEARNING_STARTS]), expected,
         "warm-up actions must be uniform on [-1, 1] from torch's generator")


def test_batches_and_delayed_actor_steps(loop_run):
    rec = loop_run["rec"]
    for n_added, batch in rec["critic"]:
        assert batch["observations"].shape == (8, OBS_DIM) and batch["rewards"].shape == (8,), "batch_size rows"
        marks = batch["observations"][:, 0]
        assert (marks >= 1000).all(), "a batch row that was never stored"
    assert rec["actor"] == [n for n in range(LEARNING_STARTS + 1, N_STEPS + 1) if n % 2 == 0], \
        "actor steps every policy_frequency env steps after learning_starts"


def test_loop_stores_true_transitions(loop_run):
    added = loop_run["buffer"].added()
    assert len(added["rewards"]) == N_STEPS
    same(added["actions"], np.stack(loop_run["env"].actions).astype(np.float32),
         "stored actions must be the ones taken")
    same(added["next_observations"][:, 0], added["observations"][:, 0] + 1,
         msg="stored s' must be the step's own next observation, not the reset one")
    t_next, ep = added["next_observations"][:, 1], added["next_observations"][:, 2]
    same(added["rewards"], 0.5 + t_next, msg="rewards must be stored raw")
    term, trunc = (ep % 2 == 0) & (t_next == 5), (ep % 2 == 1) & (t_next == 4)
    assert term.sum() >= 3 and trunc.sum() >= 3
    same(added["terminated"], term.astype(np.float32),
         msg="terminated must be set only at terminations (a time-out is not one)")
    same(added["truncated"], trunc.astype(np.float32), "truncated must mark the time-limit ends")


# ---------------------------------------------------------------- what main builds
@pytest.fixture(scope="module")
def main_runs(tmp_path_factory):
    """Two short runs on Pendulum-v1 (autotune on and off), recording what main hands to make_update_fns, the buffer
    it builds and the Q_est function at each evaluation."""
    out = {}
    for autotune in (True, False):
        seen = {"q": []}
        real_make, real_eval, real_buffer = sac.make_update_fns, sac.evaluate, sac.ReplayBuffer

        def make(agent, args, target_entropy, seen=seen):
            seen.update(agent=agent, args=args, target_entropy=target_entropy,
                        log_alpha0=agent.log_alpha.detach().clone(), requires_grad=agent.log_alpha.requires_grad)
            return real_make(agent, args, target_entropy)

        def evaluate(env, actor, q_fn, *a, seen=seen, **k):
            g = torch.Generator().manual_seed(len(seen["q"]))
            obs, act = torch.randn(6, 3, generator=g), torch.rand(6, 1, generator=g) * 2 - 1
            c = seen["agent"].critic
            seen["q"].append((q_fn(obs, act).detach(), plain_q(c, obs, act, 0).detach(),
                              plain_q(c, obs, act, 1).detach()))
            return real_eval(env, actor, q_fn, *a, **k)

        class Buffer(real_buffer):
            def __init__(self, *a, seen=seen, **k):
                super().__init__(*a, **k)
                seen["buffer"] = self

        with pytest.MonkeyPatch.context() as m:
            m.setattr(sac, "make_update_fns", make)
            m.setattr(sac, "evaluate", evaluate)
            m.setattr(sac, "ReplayBuffer", Buffer)
            sac.main(sac.Args(env_id="Pendulum-v1", device="cpu", threads=1, autotune=autotune,
                              output_dir=str(tmp_path_factory.mktemp("sac_main")), online_steps=24,
                              learning_starts=12, batch_size=4, eval_every=12, eval_episodes=1,
                              q_diag_extend_steps=0, checkpoint_every=1000, log_every=1000))
        out[autotune] = seen
    return out


def test_main_temperature_and_target_entropy(main_runs):
    on, off = main_runs[True], main_runs[False]
    assert on["log_alpha0"].item() == 0.0 and on["requires_grad"], "autotune starts from alpha = 1 (log alpha 0)"
    assert off["log_alpha0"].item() == pytest.approx(math.log(0.2)) and not off["requires_grad"], \
        "--no-autotune fixes alpha at --alpha"
    assert on["target_entropy"] == -1.0, "target entropy = -|A| (Pendulum: |A| = 1)"


def test_main_networks_and_buffer(main_runs):
    seen = main_runs[True]
    actor, critic = seen["agent"].actor, seen["agent"].critic
    assert [tuple(m.weight.shape) for m in actor.trunk if isinstance(m, torch.nn.Linear)] == [(256, 3), (256, 256)]
    assert actor.squash_log_std and (actor.log_std_min, actor.log_std_max) == (-5.0, 2.0)
    assert [tuple(layer.weight.shape) for layer in critic.layers] == [(2, 4, 256), (2, 256, 256), (2, 256, 1)]
    for p, t in zip(critic.parameters(), seen["agent"].critic_target.parameters()):
        assert p.shape == t.shape
    assert seen["buffer"].capacity == 24 and seen["buffer"].n_added == 24, "buffer = min(buffer_size, online_steps)"


def test_main_diagnostics_use_min_of_the_twins(main_runs):
    """q_diagnostics.md: SAC's Q_est is min(Q1, Q2) of the online critics."""
    for seen in main_runs.values():
        assert len(seen["q"]) == 3
        for q_est, q1, q2 in seen["q"]:
            assert not torch.allclose(q1, q2)
            torch.testing.assert_close(q_est, torch.minimum(q1, q2),
                                       msg="the Q diagnostics must evaluate min(Q1, Q2) of the online critic")


# ---------------------------------------------------------------- defaults (sac.md, section 4)
DOC_DEFAULTS = dict(buffer_size=1_000_000, gamma=0.99, tau=0.005, batch_size=256, learning_starts=5_000,
                    policy_lr=3e-4, q_lr=1e-3, policy_frequency=2, alpha=0.2, autotune=True, online_steps=1_000_000,
                    eval_every=1_000, eval_episodes=10)


def test_args_defaults_match_the_design_doc():
    for args in (sac.Args(), sac.parse_args([]), sac.parse_args(["--env-id", "walker2d-medium"])):
        for k, v in DOC_DEFAULTS.items():
            assert getattr(args, k) == v and type(getattr(args, k)) is type(v), \
                f"Args.{k} = {getattr(args, k)!r}, sac.md says {v!r}"
