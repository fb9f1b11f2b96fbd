"""Unit tests of the maths in algorithms/so2.py, each checked against an independent direct computation."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def load_algo(name):
    """Import algorithms/<name>.py as `algo_<name>`, sharing the module other test files already loaded."""
    if f"algo_{name}" in sys.modules:
        return sys.modules[f"algo_{name}"]
    spec = importlib.util.spec_from_file_location(f"algo_{name}", ROOT / "algorithms" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


so2 = load_algo("so2")

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers
def member_forward(critic, obs, act, i):
    """Q_i(s, a) of member i, layer by layer with plain matmuls: [B]."""
    h = torch.cat([obs, act], dim=-1)
    layers = list(critic.layers)
    for k, layer in enumerate(layers):
        h = h @ layer.weight[i] + layer.bias[i, 0]
        if k < len(layers) - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


def actor_parts(actor, obs):
    """mu and the bounded log_std of the actor, recomputed from its layers."""
    h = actor.trunk(obs)
    mu, raw = actor.mu(h), actor.log_std(h)
    if actor.squash_log_std:
        log_std = actor.log_std_min + 0.5 * (actor.log_std_max - actor.log_std_min) * (torch.tanh(raw) + 1)
    else:
        log_std = raw.clamp(actor.log_std_min, actor.log_std_max)
    return mu, log_std


def tanh_gaussian_log_prob(mu, std, u):
    base = torch.distributions.Normal(mu, std).log_prob(u).sum(-1)
    return base - torch.log(1 - torch.tanh(u) ** 2 + 1e-6).sum(-1)


def make_batch(b, obs_dim, act_dim, lead=(), seed=0, terminated=None):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "observations": torch.randn(*lead, b, obs_dim, generator=g),
        "actions": torch.rand(*lead, b, act_dim, generator=g) * 2 - 1,
        "rewards": torch.randn(*lead, b, generator=g),
        "next_observations": torch.randn(*lead, b, obs_dim, generator=g),
        "terminated": (torch.rand(*lead, b, generator=g) < 0.3).float() if terminated is None else terminated,
        "truncated": torch.zeros(*lead, b),
    }
    return batch


def make_agent(obs_dim=3, act_dim=2, n=2, log_alpha=math.log(0.2), alpha_grad=False, seed=0):
    torch.manual_seed(seed)
    actor = so2.TanhGaussianActor(obs_dim, act_dim)
    critic = so2.VectorizedCritic(obs_dim, act_dim, n)
    target = so2.VectorizedCritic(obs_dim, act_dim, n)
    target.load_state_dict(critic.state_dict())
    # Make the target differ from the critic so that Polyak moves it visibly.
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return so2.Agent(actor, critic, target, torch.tensor(log_alpha, requires_grad=alpha_grad))


def count_steps(monkeypatch, optims, events):
    """Wrap every optimizer's `step` so that each call appends its name to `events`."""
    for name, opt in optims.items():
        original = opt.step

        def wrapped(*a, _name=name, _orig=original, **k):
            events.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(opt, "step", wrapped)


# ---------------------------------------------------------------- 1. ensemble
def test_vectorized_linear_matches_separate_linears():
    torch.manual_seed(0)
    n, b, d_in, d_out = 4, 5, 3, 6
    layer = so2.VectorizedLinear(d_in, d_out, n)
    assert layer.weight.shape == (n, d_in, d_out) and layer.bias.shape == (n, 1, d_out)
    x2 = torch.randn(b, d_in)
    out = layer(x2.unsqueeze(0).expand(n, -1, -1))
    x3 = torch.randn(n, b, d_in)
    out3 = layer(x3)
    assert out.shape == out3.shape == (n, b, d_out)
    for i in range(n):
        torch.testing.assert_close(out[i], F.linear(x2, layer.weight[i].T, layer.bias[i, 0]), atol=1e-6, rtol=0)
        torch.testing.assert_close(out3[i], F.linear(x3[i], layer.weight[i].T, layer.bias[i, 0]), atol=1e-6, rtol=0)


def test_vectorized_critic_matches_member_loop_and_detach():
    torch.manual_seed(1)
    n, b = 3, 7
    critic = so2.VectorizedCritic(5, 2, n, hidden=8, n_layers=3)
    assert len(critic.layers) == 4
    # EDAC init: hidden biases 0.1, last layer in [-3e-3, 3e-3].
    for layer in critic.layers[:-1]:
        assert torch.all(layer.bias == 0.1)
    assert critic.layers[-1].weight.abs().max() <= 3e-3 and critic.layers[-1].bias.abs().max() <= 3e-3
    with torch.no_grad():  # larger last layer so that the values are not all ~0
        critic.layers[-1].weight.normal_()
    obs, act = torch.randn(b, 5), torch.randn(b, 2)
    q = critic(obs, act)
    assert q.shape == (n, b)
    expected = torch.stack([member_forward(critic, obs, act, i) for i in range(n)])
    torch.testing.assert_close(q, expected, atol=1e-6, rtol=0)
    # [N, B, in] input: member i sees its own slice.
    obs3, act3 = torch.randn(n, b, 5), torch.randn(n, b, 2)
    q3 = critic(obs3, act3)
    expected3 = torch.stack([member_forward(critic, obs3[i], act3[i], i) for i in range(n)])
    torch.testing.assert_close(q3, expected3, atol=1e-6, rtol=0)

    # detach: same values, gradient to the input but none to the critic's weights.
    act_g = act.clone().requires_grad_(True)
    qd = critic(obs, act_g, detach=True)
    torch.testing.assert_close(qd, expected, atol=1e-6, rtol=0)
    critic.zero_grad(set_to_none=True)
    qd.sum().backward()
    assert all(p.grad is None for p in critic.parameters())
    assert act_g.grad is not None and act_g.grad.abs().sum() > 0
    # Without detach the weights do get gradients.
    critic(obs, act).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())


# ---------------------------------------------------------------- 2. EDAC diversity
def direct_diversity(critic, obs, actions):
    n, b = critic.n_critics, obs.shape[0]
    grads = []
    for i in range(n):
        a = actions.detach().clone().requires_grad_(True)
        qi = critic(obs, a)[i]
        g = torch.autograd.grad(qi.sum(), a, create_graph=True)[0]  # [B, A]
        grads.append(g / (g.norm(dim=-1, keepdim=True) + 1e-10))
    total = torch.zeros(b)
    for i in range(n):
        for j in range(n):
            if i != j:
                total = total + (grads[i] * grads[j]).sum(-1)
    return (total / (n - 1)).mean()


def so2_diversity(critic, obs, actions):
    """The diversity term of so2.edac_critic_loss alone: loss(eta=1) - loss(eta=0) on the same target."""
    y = torch.zeros(obs.shape[0])
    return so2.edac_critic_loss(critic, obs, actions, y, 1.0)[0] - so2.edac_critic_loss(critic, obs, actions, y, 0.0)[0]


def test_edac_diversity_loss_matches_direct_computation():
    torch.manual_seed(2)
    n, b = 4, 6
    critic = so2.VectorizedCritic(3, 2, n, hidden=16, n_layers=2, edac_init=False)
    obs, actions = torch.randn(b, 3), torch.rand(b, 2) * 2 - 1
    loss = so2_diversity(critic, obs, actions)
    expected = direct_diversity(critic, obs, actions)
    assert loss.shape == ()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    # Not trivially 0 or the N(N-1)/(N-1) = N of identical members.
    assert abs(loss.item()) > 1e-3 and abs(loss.item() - n) > 1e-3

    # Differentiable in the critic weights, with the same gradient as the direct computation.
    critic.zero_grad(set_to_none=True)
    loss.backward()
    # (The last bias does not move dQ/da, so it gets no gradient.)
    grad = lambda p: torch.zeros_like(p) if p.grad is None else p.grad.clone()  # noqa: E731
    got = {k: grad(p) for k, p in critic.named_parameters()}
    critic.zero_grad(set_to_none=True)
    direct_diversity(critic, obs, actions).backward()
    for k, p in critic.named_parameters():
        torch.testing.assert_close(got[k], grad(p), atol=1e-6, rtol=1e-4)
    for layer_name in ("layers.0.weight", "layers.1.weight", "layers.2.weight"):  # biases act via ReLU masks only
        assert got[layer_name].abs().sum() > 0, layer_name


def test_edac_diversity_identical_members_gives_n():
    # All members equal -> every cosine is 1 -> sum_{i != j} 1 / (N - 1) = N.
    torch.manual_seed(3)
    n = 3
    critic = so2.VectorizedCritic(3, 2, n, hidden=8, n_layers=2, edac_init=False)
    with torch.no_grad():
        for p in critic.parameters():
            p.copy_(p[:1].expand_as(p))
    loss = so2_diversity(critic, torch.randn(5, 3), torch.rand(5, 2) * 2 - 1)
    assert loss.item() == pytest.approx(n, abs=1e-5)


# ---------------------------------------------------------------- 3. Bellman target
class Recorder(torch.nn.Module):
    def __init__(self, critic):
        super().__init__()
        self.critic, self.actions = critic, []

    def forward(self, obs, action, detach=False):
        self.actions.append(action.clone())
        return self.critic(obs, action, detach)


def _target_setup(seed=4, b=64, n=3):
    torch.manual_seed(seed)
    actor = so2.TanhGaussianActor(3, 2, hidden=16)
    critic = so2.VectorizedCritic(3, 2, n, hidden=16, n_layers=2, edac_init=False)
    batch = make_batch(b, 3, 2, seed=seed)
    batch["terminated"][:5] = 1.0
    batch["terminated"][5:10] = 0.0
    return actor, critic, batch


@pytest.mark.parametrize("per_member", [True, False])
def test_bellman_target_values(per_member):
    actor, critic, batch = _target_setup()
    rec = Recorder(critic)
    alpha, gamma, sigma, clip = torch.tensor(0.3), 0.9, 0.3, 0.6
    torch.manual_seed(123)
    y = so2.bellman_target(actor, rec, batch, alpha, gamma, sigma, clip, per_member)

    # Recompute: the actor draws eps first, then the PVU noise.
    torch.manual_seed(123)
    with torch.no_grad():
        mu, log_std = actor_parts(actor, batch["next_observations"])
        eps = torch.randn(mu.shape)
        noise = torch.randn(mu.shape)
        u = mu + log_std.exp() * eps
        clean = torch.tanh(u)
        log_pi = tanh_gaussian_log_prob(mu, log_std.exp(), u)
        a_next = (clean + (sigma * noise).clamp(-clip, clip)).clamp(-1, 1)
        q_next = torch.stack([member_forward(critic, batch["next_observations"], a_next, i) for i in range(3)])
    assert len(rec.actions) == 1
    torch.testing.assert_close(rec.actions[0], a_next, atol=1e-6, rtol=0)
    assert not torch.allclose(a_next, clean)  # the noise was applied
    if not per_member:
        q_next = q_next.min(dim=0).values
    expected = batch["rewards"] + gamma * (1 - batch["terminated"]) * (q_next - alpha * log_pi)
    assert y.shape == ((3, 64) if per_member else (64,))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # Terminated rows: y = r exactly, for every member.
    term = batch["terminated"] == 1
    assert torch.equal(y[..., term], batch["rewards"][term].expand_as(y[..., term]))
    assert not torch.allclose(y[..., ~term], batch["rewards"][~term].expand_as(y[..., ~term]))
    assert not y.requires_grad


def test_bellman_target_noise_is_clipped_then_action_clipped():
    actor, critic, batch = _target_setup(b=256)
    rec = Recorder(critic)
    clip = 0.6
    torch.manual_seed(7)
    so2.bellman_target(actor, rec, batch, torch.tensor(0.2), 0.99, 1e4, clip, True)
    torch.manual_seed(7)
    with torch.no_grad():
        mu, log_std = actor_parts(actor, batch["next_observations"])
        eps = torch.randn(mu.shape)
        noise = torch.randn(mu.shape)
        clean = torch.tanh(mu + log_std.exp() * eps)
    assert (noise.abs() * 1e4 > clip).all()  # with sigma 1e4 every coordinate of the noise is clipped
    a = rec.actions[0]
    assert a.min() >= -1 and a.max() <= 1
    inside = a.abs() < 1
    assert inside.any() and (~inside).any()  # both cases occur
    # Where the action was not clipped to [-1, 1], the perturbation is exactly +-c, with eps's sign.
    delta = (a - clean)[inside]
    torch.testing.assert_close(delta, clip * torch.sign(noise[inside]), atol=1e-6, rtol=0)
    # Where it was, clean + sign(eps) c lies outside [-1, 1].
    pre = clean + clip * torch.sign(noise)
    assert torch.equal(a[~inside], torch.sign(pre[~inside]))
    assert (pre[~inside].abs() >= 1).all()


def test_bellman_target_no_noise_uses_clean_action_and_one_draw():
    actor, critic, batch = _target_setup()
    rec = Recorder(critic)
    torch.manual_seed(11)
    so2.bellman_target(actor, rec, batch, torch.tensor(0.2), 0.99, 0.0, 0.5, False)
    after = torch.randn(3)
    torch.manual_seed(11)
    with torch.no_grad():
        mu, log_std = actor_parts(actor, batch["next_observations"])
        clean = torch.tanh(mu + log_std.exp() * torch.randn(mu.shape))
    torch.testing.assert_close(rec.actions[0], clean, atol=1e-6, rtol=0)
    torch.testing.assert_close(after, torch.randn(3))  # exactly one draw was consumed


# ---------------------------------------------------------------- 4. online update
def _online(monkeypatch, utd, apu, **kw):
    args = so2.Args(utd_ratio=utd, actor_updates_per_step=apu, **kw)
    agent = make_agent()
    update, optims = so2.make_online_update(agent, args)
    assert set(optims) == {"actor_optim", "critic_optim"}
    events = []
    count_steps(monkeypatch, {"actor": optims["actor_optim"], "critic": optims["critic_optim"]}, events)
    return args, agent, update, events


@pytest.mark.parametrize("utd,apu,order", [
    (4, 2, ["critic", "critic", "actor", "critic", "critic", "actor"]),
    (4, 1, ["critic", "critic", "critic", "critic", "actor"]),
    (10, 10, ["critic", "actor"] * 10),
])
def test_online_update_counts(monkeypatch, utd, apu, order):
    args, agent, update, events = _online(monkeypatch, utd, apu)
    polyak_calls = []
    original_polyak = so2.polyak

    def checked_polyak(target, source, tau):
        before = [p.detach().clone() for p in target.parameters()]
        src = [p.detach().clone() for p in source.parameters()]
        original_polyak(target, source, tau)
        for t0, s, t1 in zip(before, src, target.parameters()):
            torch.testing.assert_close(t1, t0 + tau * (s - t0), atol=1e-7, rtol=1e-6)
        polyak_calls.append((target, source, tau))

    monkeypatch.setattr(so2, "polyak", checked_polyak)
    target0 = copy.deepcopy(agent.critic_target.state_dict())
    critic0 = copy.deepcopy(agent.critic.state_dict())
    batch = make_batch(8, 3, 2, lead=(utd,))
    out = update(batch)
    assert events.count("critic") == utd and events.count("actor") == apu
    assert events == order
    assert len(polyak_calls) == utd
    assert all(t is agent.critic_target and s is agent.critic and tau == args.tau for t, s, tau in polyak_calls)
    assert any(not torch.equal(target0[k], v) for k, v in agent.critic_target.state_dict().items())
    assert any(not torch.equal(critic0[k], v) for k, v in agent.critic.state_dict().items())
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("target_q", ["member", "min"])
def test_online_update_critic_loss_value(monkeypatch, reduction, target_q):
    """With utd 1, the reported critic loss is the member-reduced TD loss of the PVU target on the initial nets."""
    args, agent, update, _ = _online(monkeypatch, 1, 1, critic_reduction=reduction, target_q=target_q)
    ref = copy.deepcopy(agent)
    batch = make_batch(16, 3, 2, lead=(1,))
    torch.manual_seed(5)
    out = update(batch)
    torch.manual_seed(5)
    b = {k: v[0] for k, v in batch.items()}
    alpha = ref.log_alpha.exp()
    with torch.no_grad():
        mu, log_std = actor_parts(ref.actor, b["next_observations"])
        eps, noise = torch.randn(mu.shape), torch.randn(mu.shape)
        u = mu + log_std.exp() * eps
        a_next = (torch.tanh(u) + (args.target_noise * noise).clamp(-args.target_noise_clip, args.target_noise_clip)
                  ).clamp(-1, 1)
        log_pi = tanh_gaussian_log_prob(mu, log_std.exp(), u)
        q_next = torch.stack([member_forward(ref.critic_target, b["next_observations"], a_next, i) for i in range(2)])
        if target_q == "min":
            q_next = q_next.min(0).values
        y = b["rewards"] + args.gamma * (1 - b["terminated"]) * (q_next - alpha * log_pi)
        q = torch.stack([member_forward(ref.critic, b["observations"], b["actions"], i) for i in range(2)])
        per_member = ((q - y) ** 2).mean(dim=1)
        expected = per_member.mean() if reduction == "mean" else per_member.sum()
    torch.testing.assert_close(out["loss/critic"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["q/mean"], q.mean(), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- 5. offline update
def _offline(monkeypatch, eta, seed=0):
    args = so2.Args(eta=eta, n_critics=3)
    agent = make_agent(n=3, log_alpha=0.0, alpha_grad=True, seed=seed)
    update, optims = so2.make_offline_update(agent, args, target_entropy=-2.0)
    events = []
    count_steps(monkeypatch, {"alpha": optims["alpha_optim"], "actor": optims["actor_optim"],
                              "critic": optims["critic_optim"]}, events)
    return args, agent, update, events


def test_offline_update_steps_and_losses(monkeypatch):
    args, agent, update, events = _offline(monkeypatch, eta=0.0)
    ref = copy.deepcopy(agent)
    batch = make_batch(16, 3, 2)
    torch.manual_seed(9)
    out = update(batch)
    assert events == ["alpha", "actor", "critic"]
    assert all(torch.isfinite(v) for v in out.values())

    # Recompute with the same random draws: one sample shared by the alpha and actor losses, then the target's.
    torch.manual_seed(9)
    obs = batch["observations"]
    with torch.no_grad():
        mu0, ls0 = actor_parts(ref.actor, obs)
        e1 = torch.randn(mu0.shape)
        u1 = mu0 + ls0.exp() * e1
        log_pi1 = tanh_gaussian_log_prob(mu0, ls0.exp(), u1)
        alpha_loss = -(ref.log_alpha * (log_pi1 - 2.0)).mean()
        alpha = agent.log_alpha.detach().exp()  # after the temperature step
        # The target uses the actor after its step (the critic step does not change it).
        mu, ls = actor_parts(agent.actor, batch["next_observations"])
        u = mu + ls.exp() * torch.randn(mu.shape)
        log_pi = tanh_gaussian_log_prob(mu, ls.exp(), u)
        q_next = torch.stack([member_forward(ref.critic_target, batch["next_observations"], torch.tanh(u), i)
                              for i in range(3)]).min(0).values
        y = batch["rewards"] + args.gamma * (1 - batch["terminated"]) * (q_next - alpha * log_pi)
        q = torch.stack([member_forward(ref.critic, obs, batch["actions"], i) for i in range(3)])
        td = ((q - y) ** 2).mean(dim=1).sum()
    torch.testing.assert_close(out["loss/alpha"], alpha_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["alpha"], alpha)
    assert agent.log_alpha.item() != ref.log_alpha.item()
    torch.testing.assert_close(out["loss/critic"], td, atol=1e-5, rtol=1e-5)
    # Polyak after the critic step: target = target0 + tau (critic1 - target0).
    for t0, c1, t1 in zip(ref.critic_target.parameters(), agent.critic.parameters(), agent.critic_target.parameters()):
        torch.testing.assert_close(t1, t0 + args.tau * (c1 - t0), atol=1e-7, rtol=1e-6)


def test_offline_update_eta_adds_diversity(monkeypatch):
    batch = make_batch(16, 3, 2)
    _, agent0, update0, _ = _offline(monkeypatch, eta=0.0)
    args5, agent5, update5, events5 = _offline(monkeypatch, eta=5.0)
    critic_before = copy.deepcopy(agent5.critic)
    torch.manual_seed(3)
    out0 = update0(batch)
    torch.manual_seed(3)
    out5 = update5(batch)
    assert events5 == ["alpha", "actor", "critic"]
    div = so2_diversity(critic_before, batch["observations"], batch["actions"]).detach()
    assert abs(div.item()) > 1e-4
    assert not torch.allclose(out0["loss/critic"], out5["loss/critic"])
    torch.testing.assert_close(out5["loss/critic"] - out0["loss/critic"], 5.0 * div, atol=1e-5, rtol=1e-4)
    # The same TD part: actor and temperature steps are identical.
    torch.testing.assert_close(out5["loss/actor"], out0["loss/actor"])
    for p0, p5 in zip(agent0.actor.parameters(), agent5.actor.parameters()):
        torch.testing.assert_close(p0, p5)


# ---------------------------------------------------------------- 6. normalised score
def test_normalized_score():
    assert so2.normalized_score("hopper", 3234.3) == pytest.approx(100.0)
    assert so2.normalized_score("hopper", -20.272305) == pytest.approx(0.0, abs=1e-9)
    lo, hi = -280.178953, 12135.0
    mid = lo + 0.37 * (hi - lo)
    assert so2.normalized_score("halfcheetah", mid) == pytest.approx(37.0)
    arr = so2.normalized_score("walker2d", np.array([1.629008, 4592.3]))
    np.testing.assert_allclose(arr, [0.0, 100.0], atol=1e-9)
    assert np.isnan(so2.normalized_score("ant", 1000.0))
    assert np.isnan(so2.normalized_score(None, 1000.0))
    out = so2.normalized_score(None, np.array([1.0, 2.0]))
    assert out.shape == (2,) and np.all(np.isnan(out))


# ---------------------------------------------------------------- 7. Q diagnostics
def test_discounted_returns_and_horizon():
    np.testing.assert_allclose(so2.discounted_returns(np.array([1.0, 1.0, 1.0]), 0.5), [1.75, 1.5, 1.0])
    np.testing.assert_allclose(so2.discounted_returns(np.array([2.0, 0.0, 4.0]), 0.9), [2 + 0.81 * 4, 3.6, 4.0])
    assert so2.q_horizon(0.99) == 459
    assert 0.99 ** 459 < 0.01 <= 0.99 ** 458
    assert so2.q_horizon(0.9) == 44 and 0.9 ** 44 < 0.01 <= 0.9 ** 43


def scipy_windows(x, y, window):
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in range(len(x) - window + 1):
            out.append(scipy.stats.kendalltau(x[s:s + window], y[s:s + window]).statistic)
    return np.array(out, dtype=np.float64)


def test_windowed_kendall_tau_matches_scipy():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=60), 0)
    y = np.round(x + rng.normal(size=60), 0)
    x[20:32] = 1.0  # an all-tied window in x -> NaN
    y[45:50] = 0.0
    for window in (10, 5):
        got = so2.windowed_kendall_tau(x, y, window)
        want = scipy_windows(x, y, window)
        assert got.shape == want.shape == (60 - window + 1,)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert np.isnan(want).any() and (~np.isnan(want)).sum() > 20
        np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], atol=1e-12)
    assert so2.windowed_kendall_tau(x[:9], y[:9], 10).shape == (0,)


def test_q_diagnostics_terminated_episode():
    gamma = 0.9
    rewards = np.ones(30)
    q_true = so2.discounted_returns(rewards, gamma)
    ep = {"q_est": (q_true * 1.1).astype(np.float32), "rewards": rewards, "terminated": True}
    d = so2.q_diagnostics([ep], limit=1000, horizon=459, gamma=gamma)
    assert d["q_normalized_difference"] == pytest.approx(0.1, abs=1e-6)
    assert d["q_kendall_tau"] == pytest.approx(1.0)
    assert d["q_scored_steps"] == 30
    rev = {**ep, "q_est": (q_true[::-1] * 1.1).copy()}
    assert so2.q_diagnostics([rev], 1000, 459, gamma)["q_kendall_tau"] == pytest.approx(-1.0)
    # Under-estimation by 20 %.
    low = {**ep, "q_est": q_true * 0.8}
    assert so2.q_diagnostics([low], 1000, 459, gamma)["q_normalized_difference"] == pytest.approx(-0.2)


@pytest.mark.parametrize("T,L,H", [(50, 40, 20), (50, 25, 20), (60, 100, 10), (30, 30, 1)])
def test_q_diagnostics_scored_steps_non_terminated(T, L, H):
    gamma = 0.9
    rng = np.random.default_rng(T + L + H)
    rewards = rng.uniform(0.5, 1.5, size=T)
    q_true = so2.discounted_returns(rewards, gamma)
    noise = rng.uniform(0.0, 0.5, size=T)
    ep = {"q_est": q_true * (1 + noise), "rewards": rewards, "terminated": False}
    d = so2.q_diagnostics([ep], limit=L, horizon=H, gamma=gamma, window=5)
    scored = [t for t in range(T) if t < L and T - t >= H]
    assert d["q_scored_steps"] == len(scored)
    assert d["q_normalized_difference"] == pytest.approx(noise[scored].mean())
    tau = scipy_windows(ep["q_est"][scored], q_true[scored], 5)
    assert d["q_kendall_tau"] == pytest.approx(np.nanmean(tau))


def test_q_diagnostics_small_q_true_excluded_from_difference_only():
    gamma = 0.9
    rewards = np.array([1.0] * 15 + [0.0] * 5)
    q_true = so2.discounted_returns(rewards, gamma)
    assert np.all(q_true[15:] == 0) and np.all(np.abs(q_true[:15]) >= 1e-3)
    q_est = q_true * 1.1
    q_est[15:] = 100.0 + np.arange(5)  # would wreck the difference if it were counted
    ep = {"q_est": q_est, "rewards": rewards, "terminated": True}
    d = so2.q_diagnostics([ep], limit=1000, horizon=459, gamma=gamma)
    assert d["q_scored_steps"] == 20
    assert d["q_normalized_difference"] == pytest.approx(0.1)
    want = scipy_windows(q_est, q_true, 10)
    assert d["q_kendall_tau"] == pytest.approx(np.nanmean(want))
    assert d["q_kendall_tau"] < 0.99  # the windows over the zero tail count


def test_q_diagnostics_multiple_episodes_and_nothing_scored():
    gamma = 0.9
    # Windows never straddle episodes: two monotone episodes give tau 1 even though the pair is not monotone.
    r = np.ones(12)
    q = so2.discounted_returns(r, gamma)
    eps = [{"q_est": q * 1.1, "rewards": r, "terminated": True},
           {"q_est": q * 1.1 + 50.0, "rewards": r, "terminated": True}]
    d = so2.q_diagnostics(eps, 1000, 459, gamma)
    assert d["q_kendall_tau"] == pytest.approx(1.0) and d["q_scored_steps"] == 24
    # Short non-terminated episode: nothing scored.
    ep = {"q_est": np.ones(5), "rewards": np.ones(5), "terminated": False}
    d = so2.q_diagnostics([ep], limit=1000, horizon=10, gamma=gamma)
    assert d["q_scored_steps"] == 0
    assert math.isnan(d["q_normalized_difference"]) and math.isnan(d["q_kendall_tau"])


# ---------------------------------------------------------------- 8. replay buffer
def dataset_rows(n, offset=0.0):
    """obs_dim 2, act_dim 2; every column a function of the row index."""
    i = np.arange(n, dtype=np.float32) + offset
    return {"observations": np.stack([i, i + 0.5], 1), "actions": np.stack([-i, i + 0.25], 1),
            "rewards": i * 10, "next_observations": np.stack([i + 1, i + 1.5], 1),
            "terminated": (i % 2 == 0).astype(np.float32), "truncated": (i % 3 == 0).astype(np.float32)}


def row_of(d, k):
    return np.concatenate([d["observations"][k], d["actions"][k], [d["rewards"][k]], d["next_observations"][k],
                           [d["terminated"][k]], [d["truncated"][k]]]).astype(np.float32)


def online_rows(n):
    return dataset_rows(n, offset=100.0)


def fill(buf, online, n):
    for k in range(n):
        buf.add(online["observations"][k], online["actions"][k], float(online["rewards"][k]),
                online["next_observations"][k], bool(online["terminated"][k]), bool(online["truncated"][k]))


def test_replay_buffer_fifo_and_added():
    data, online = dataset_rows(6), online_rows(7)
    buf = so2.ReplayBuffer(10, 2, 2, torch.device("cpu"), seed=0)
    buf.load_dataset(data)
    assert buf.size == 6
    fill(buf, online, 7)
    assert buf.size == 10
    storage = buf.storage.numpy()
    # Slots 0-2 (dataset rows 0-2, the oldest) hold online rows 4-6; 3-5 keep dataset rows 3-5; 6-9 online 0-3.
    expected = ([row_of(online, k) for k in (4, 5, 6)] + [row_of(data, k) for k in (3, 4, 5)]
                + [row_of(online, k) for k in (0, 1, 2, 3)])
    np.testing.assert_array_equal(storage, np.stack(expected))
    added = buf.added()
    assert added["observations"].shape == (7, 2) and added["actions"].shape == (7, 2)
    for key in so2.TRANSITION_KEYS:
        np.testing.assert_array_equal(added[key].reshape(7, -1), online[key].reshape(7, -1))
    # More online rows than the capacity: added() holds the last 10, oldest first.
    fill(buf, online_rows(7), 7)
    added = buf.added()
    np.testing.assert_array_equal(added["rewards"].reshape(-1),
                                  np.concatenate([online["rewards"][4:], online["rewards"]]))
    np.testing.assert_array_equal(added["actions"], np.concatenate([online["actions"][4:], online["actions"]]))


def test_replay_buffer_sample_shapes_and_state_dict():
    data, online = dataset_rows(6), online_rows(7)
    for capacity, n_online in ((10, 7), (20, 3)):
        buf = so2.ReplayBuffer(capacity, 2, 2, torch.device("cpu"), seed=0)
        buf.load_dataset(data)
        fill(buf, online, n_online)
        s = buf.sample(5)
        assert s["rewards"].shape == (5,) and s["terminated"].shape == (5,) and s["truncated"].shape == (5,)
        assert s["observations"].shape == (5, 2) and s["next_observations"].shape == (5, 2)
        assert s["actions"].shape == (5, 2)
        # Sampled rows are consistent rows of the storage.
        np.testing.assert_array_equal(s["observations"][:, 1].numpy(), s["observations"][:, 0].numpy() + 0.5)
        np.testing.assert_array_equal(s["rewards"].numpy(), s["observations"][:, 0].numpy() * 10)

        state = buf.state_dict()
        fresh = so2.ReplayBuffer(capacity, 2, 2, torch.device("cpu"), seed=123)
        fresh.load_dataset(data)
        fresh.load_state_dict(state)
        assert torch.equal(fresh.storage, buf.storage)
        assert (fresh.size, fresh.ptr, fresh.n_added) == (buf.size, buf.ptr, buf.n_added)
        a, b = buf.sample(8), fresh.sample(8)
        assert all(torch.equal(a[k], b[k]) for k in a)
        fill(buf, online, 2)
        fill(fresh, online, 2)
        assert torch.equal(fresh.storage, buf.storage)


# ---------------------------------------------------------------- 9. actor
def test_actor_deterministic_and_log_prob():
    torch.manual_seed(6)
    actor = so2.TanhGaussianActor(4, 3, hidden=16, edac_init=False)
    obs = torch.randn(9, 4)
    with torch.no_grad():
        mu, log_std = actor_parts(actor, obs)
        a_det, lp_det = actor(obs, deterministic=True)
    torch.testing.assert_close(a_det, torch.tanh(mu))
    torch.testing.assert_close(lp_det, tanh_gaussian_log_prob(mu, log_std.exp(), mu), atol=1e-5, rtol=1e-5)

    torch.manual_seed(42)
    a, lp = actor(obs)
    torch.manual_seed(42)
    u = mu + log_std.exp() * torch.randn(mu.shape)
    torch.testing.assert_close(a.detach(), torch.tanh(u))
    torch.testing.assert_close(lp.detach(), tanh_gaussian_log_prob(mu, log_std.exp(), u), atol=1e-5, rtol=1e-5)
    assert a.shape == (9, 3) and lp.shape == (9,)
    # The sample is reparameterised.
    lp.sum().backward()
    assert actor.mu.weight.grad is not None and actor.mu.weight.grad.abs().sum() > 0
    # act(): one numpy action in [-1, 1].
    out = actor.act(np.zeros(4, dtype=np.float32), deterministic=True)
    assert isinstance(out, np.ndarray) and out.shape == (3,) and np.all(np.abs(out) <= 1)


@pytest.mark.parametrize("bias,expected", [(10.0, 2.0), (-10.0, -5.0), (0.7, 0.7)])
def test_actor_log_std_clamped(bias, expected):
    torch.manual_seed(8)
    actor = so2.TanhGaussianActor(4, 2, hidden=16, log_std_min=-5.0, log_std_max=2.0)
    with torch.no_grad():
        actor.log_std.weight.zero_()
        actor.log_std.bias.fill_(bias)
        actor.mu.weight.zero_()
        actor.mu.bias.zero_()
    obs = torch.randn(3, 4)
    with torch.no_grad():
        _, lp = actor(obs, deterministic=True)
    # mu = 0, eps = 0: log_prob = sum over dims of (-log_std - 0.5 log 2 pi) - log(1 + 1e-6).
    want = 2 * (-expected - 0.5 * math.log(2 * math.pi)) - 2 * math.log(1 + 1e-6)
    torch.testing.assert_close(lp, torch.full((3,), want), atol=1e-5, rtol=1e-6)
    # Sampled actions have the clamped spread.
    torch.manual_seed(0)
    with torch.no_grad():
        a, _ = actor(obs)
        torch.manual_seed(0)
        eps = torch.randn(3, 2)
    torch.testing.assert_close(a, torch.tanh(math.exp(expected) * eps))


@pytest.mark.parametrize("bias", [-50.0, -0.3, 0.0, 0.4, 50.0])
def test_actor_squashed_log_std(bias):
    lo, hi = -20.0, 2.0
    actor = so2.TanhGaussianActor(4, 2, hidden=16, log_std_min=lo, log_std_max=hi, squash_log_std=True)
    with torch.no_grad():
        actor.log_std.weight.zero_()
        actor.log_std.bias.fill_(bias)
        actor.mu.weight.zero_()
        actor.mu.bias.zero_()
    expected = lo + 0.5 * (hi - lo) * (math.tanh(bias) + 1)
    assert lo <= expected <= hi
    with torch.no_grad():
        _, lp = actor(torch.randn(3, 4), deterministic=True)
    want = 2 * (-expected - 0.5 * math.log(2 * math.pi)) - 2 * math.log(1 + 1e-6)
    torch.testing.assert_close(lp, torch.full((3,), want), atol=1e-4, rtol=1e-6)


def test_replay_buffer_one_dimensional_action_keeps_its_column():
    buf = so2.ReplayBuffer(8, 3, 1, torch.device("cpu"), seed=0)
    buf.load_dataset({"observations": np.zeros((4, 3)), "actions": np.ones((4, 1)), "rewards": np.zeros(4),
                      "next_observations": np.zeros((4, 3)), "terminated": np.zeros(4), "truncated": np.zeros(4)})
    buf.add(np.zeros(3), np.ones(1), 0.0, np.zeros(3), False, False)
    s = buf.sample(5)
    assert s["rewards"].shape == (5,)
    assert s["actions"].shape == (5, 1)
    assert buf.added()["actions"].shape == (1, 1)


def test_logger_averages_each_metric_over_its_own_updates(tmp_path):
    """The critic runs every step and the actor every other step: each mean is over that metric's own calls."""
    logger = so2.Logger(tmp_path)
    logged = {}
    logger.writer.add_scalar = lambda tag, value, step: logged.__setitem__(tag, float(value))
    for step in range(4):
        logger.accumulate({"loss/critic": torch.tensor(float(step))})
        if step % 2:
            logger.accumulate({"loss/actor": torch.tensor(10.0 * step)})
    logger.flush(4)
    assert logged["train/loss/critic"] == pytest.approx(1.5)
    assert logged["train/loss/actor"] == pytest.approx(20.0)
    logger.accumulate({"loss/critic": torch.tensor(float("nan"))})
    with pytest.raises(so2.RunError, match="non-finite loss/critic"):
        logger.flush(5)
    logger.close()


def test_restore_optimizers_keeps_this_runs_learning_rates(so2):
    """An offline.pt's Adam states come back, its learning rates do not (a fine-tuning run's flags win)."""
    w = torch.nn.Parameter(torch.ones(3))
    before = torch.optim.Adam([w], lr=1e-3)
    w.grad = torch.full((3,), 0.5)
    before.step()
    saved = {"actor_optim": before.state_dict()}
    now = {"actor_optim": torch.optim.Adam([w], lr=0.0)}
    so2.restore_optimizers(now, saved)
    assert now["actor_optim"].param_groups[0]["lr"] == 0.0
    assert torch.equal(now["actor_optim"].state[w]["exp_avg"], before.state[w]["exp_avg"])
    so2.restore(now, saved)  # a resumed run's own checkpoint, by contrast, brings its rate back
    assert now["actor_optim"].param_groups[0]["lr"] == 1e-3
