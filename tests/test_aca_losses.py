"""algorithms/aca.py against direct computations written out here from design/aca.md: every loss's value and the
gradient each optimiser receives, offline (temperature -> critic -> baseline -> actor -> Polyak) and online
(temperature -> critic -> actor with the gradient through C and the norm clip -> Polyak -> anneal w), replayed with
our own Adam steps in that order, so a step out of order shows; the soft clip, the annealing, the alignment (R = Z
exactly, and the aligned Q's Boltzmann policy at alpha 1 is pi_0), the top-k episodes and the online buffer, and the
documented defaults."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import load_algo, member_q

aca = load_algo("aca")
OBS, ACT, B = 4, 2, 8
F = torch.nn.functional


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- direct computations
def dist(actor, obs):
    h = actor.trunk(obs)
    return actor.mu(h), actor.log_std(h).clamp(-20.0, 2.0)


def log_density(mu, log_std, u):
    """log pi of a = tanh(u), by torch.distributions (Normal + TanhTransform's Jacobian), summed over dimensions."""
    tanh = torch.distributions.transforms.TanhTransform()
    return (torch.distributions.Normal(mu, log_std.exp()).log_prob(u)
            - tanh.log_abs_det_jacobian(u, torch.tanh(u))).sum(-1)


def sample(actor, obs, eps):
    mu, log_std = dist(actor, obs)
    u = mu + log_std.exp() * eps
    return torch.tanh(u), log_density(mu, log_std, u)


def log_prob_of(actor, obs, actions):
    mu, log_std = dist(actor, obs)
    return log_density(mu, log_std, torch.atanh(actions.clamp(-0.999999, 0.999999)))


def member_z(baseline, obs, i):
    h = obs
    for k, layer in enumerate(baseline.layers):
        h = h @ layer.weight[i] + layer.bias[i, 0]
        if k < len(baseline.layers) - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


def min_q(critic, obs, act, detach=False):
    return torch.minimum(member_q(critic, obs, act, 0, detach), member_q(critic, obs, act, 1, detach))


def c_direct(reference, obs, actions, beta, w):
    """C = w (softplus(log pi_0(a|s) - clip_at) + clip_at), clip_at = min of log pi_0 at the pre-tanh mu_0 -+ beta
    sigma_0 (aca.md section 4)."""
    mu, log_std = dist(reference, obs)
    log_pi0 = log_density(mu, log_std, torch.atanh(actions.clamp(-0.999999, 0.999999)))
    with torch.no_grad():
        lo = log_density(mu, log_std, mu - beta * log_std.exp())
        hi = log_density(mu, log_std, mu + beta * log_std.exp())
        clip_at = torch.minimum(lo, hi)
    return w * (torch.logaddexp(log_pi0 - clip_at, torch.zeros(())) + clip_at)  # softplus


# ---------------------------------------------------------------- agents and batches
def make_agent(seed=0, hidden=16):
    torch.manual_seed(seed)
    agent = aca.make_agent(OBS, ACT, hidden, torch.device("cpu"))
    with torch.no_grad():  # spread the outputs; a target that differs from the critics, so mixing them up shows
        for net in (agent.critic, agent.baseline):
            net.layers[-1].weight.normal_(0, 0.5)
        agent.actor.log_std.bias.fill_(-0.5)
        for p in agent.critic_target.parameters():
            p.add_(0.2 * torch.randn_like(p))
        agent.log_alpha.fill_(math.log(0.4))
    return agent


# rows 0 and 3 terminated (3 also truncated), rows 1 and 4 truncated; row 6 holds a dataset action at the bound 1.0
TERMINATED = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
TRUNCATED = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    actions = torch.rand(B, ACT, generator=g) * 1.8 - 0.9
    actions[6, 0] = 1.0
    return {"observations": torch.randn(B, OBS, generator=g), "actions": actions,
            "rewards": torch.randn(B, generator=g), "next_observations": torch.randn(B, OBS, generator=g),
            "terminated": torch.tensor(TERMINATED), "truncated": torch.tensor(TRUNCATED)}


LRS = dict(actor_lr=1e-2, critic_lr=2e-2, alpha_lr=5e-2, baseline_lr=3e-2)  # distinct, so swapped optimisers show


def reference_optims(ref, args):
    return {"actor": torch.optim.Adam(ref.actor.parameters(), lr=args.actor_lr),
            "critic": torch.optim.Adam(ref.critic.parameters(), lr=args.critic_lr),
            "alpha": torch.optim.Adam([ref.log_alpha], lr=args.alpha_lr),
            "baseline": torch.optim.Adam(ref.baseline.parameters(), lr=args.baseline_lr)}


def step(optim, loss, params, clip=None):
    """Backward and one Adam step; returns the gradients the step used (clipped to norm `clip` if given)."""
    optim.zero_grad()
    loss.backward()
    params = list(params)
    if clip is not None:
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        assert norm > clip, "the test needs a gradient the clip acts on"
        for p in params:
            p.grad.mul_(min(1.0, clip / (float(norm) + 1e-6)))
    got = [p.grad.clone() for p in params]
    optim.step()
    return got


def polyak_direct(ref, tau):
    with torch.no_grad():
        for t, c in zip(ref.critic_target.parameters(), ref.critic.parameters()):
            t.copy_(t + tau * (c - t))


def direct_offline(ref, batch, args, optims, seed):
    """One SAC+ML + baseline step in aca.md section 2's order, each loss from the parameters of that moment; the
    policy draws in the update's order (temperature at s, critic target at s', baseline target at s', actor at s)."""
    torch.manual_seed(seed)
    eps = [torch.randn(B, ACT) for _ in range(4)]
    obs, act, nxt = batch["observations"], batch["actions"], batch["next_observations"]
    r, done, gamma = batch["rewards"], batch["terminated"], args.gamma
    out, grads = {}, {}
    with torch.no_grad():
        _, lp = sample(ref.actor, obs, eps[0])
    out["alpha_loss"] = -(ref.log_alpha * (lp - ACT)).mean()  # target entropy -|A|
    out["entropy"] = -lp.mean()
    grads["log_alpha"] = step(optims["alpha"], out["alpha_loss"], [ref.log_alpha])
    alpha = ref.log_alpha.detach().exp()
    out["alpha"] = alpha

    with torch.no_grad():
        a2, lp2 = sample(ref.actor, nxt, eps[1])
        y = r + gamma * (1 - done) * (min_q(ref.critic_target, nxt, a2) - alpha * lp2)
    out["critic_loss"] = sum(((member_q(ref.critic, obs, act, i) - y) ** 2).mean() for i in (0, 1))
    grads["critic"] = step(optims["critic"], out["critic_loss"], ref.critic.parameters())

    with torch.no_grad():
        _, lp3 = sample(ref.actor, nxt, eps[2])
        z_next = torch.minimum(member_z(ref.baseline, nxt, 0), member_z(ref.baseline, nxt, 1))
        y_z = r + gamma * (1 - done) * (lp3 + z_next - alpha * lp3)  # the online Z, no target network
        lp_data = log_prob_of(ref.actor, obs, act)
    out["baseline_loss"] = sum(((lp_data + member_z(ref.baseline, obs, i) - y_z) ** 2).mean() for i in (0, 1))
    grads["baseline"] = step(optims["baseline"], out["baseline_loss"], ref.baseline.parameters())

    a4, lp4 = sample(ref.actor, obs, eps[3])
    q_pi = min_q(ref.critic, obs, a4, detach=True)
    out["lam"] = args.alpha_ml / q_pi.abs().mean().detach()
    out["log_likelihood"] = log_prob_of(ref.actor, obs, act).mean()
    out["actor_loss"] = out["lam"] * (alpha * lp4 - q_pi).mean() - out["log_likelihood"]
    grads["actor"] = step(optims["actor"], out["actor_loss"], ref.actor.parameters())
    polyak_direct(ref, args.tau)
    return out, grads


def direct_online(ref, batch, args, optims, seed):
    """One aligned-SAC step in aca.md section 4's order; draws: temperature at s, target at s', actor at s."""
    torch.manual_seed(seed)
    eps = [torch.randn(B, ACT) for _ in range(3)]
    obs, act, nxt = batch["observations"], batch["actions"], batch["next_observations"]
    r, done, gamma, beta, w = batch["rewards"], batch["terminated"], args.gamma, args.beta, float(ref.w)
    out, grads = {"w": w}, {}
    with torch.no_grad():
        _, lp = sample(ref.actor, obs, eps[0])
    out["alpha_loss"] = -(ref.log_alpha * (lp - ACT)).mean()
    grads["log_alpha"] = step(optims["alpha"], out["alpha_loss"], [ref.log_alpha])
    alpha = ref.log_alpha.detach().exp()
    out["alpha"] = alpha

    with torch.no_grad():
        a2, lp2 = sample(ref.actor, nxt, eps[1])
        q_next = min_q(ref.critic_target, nxt, a2) + c_direct(ref.reference, nxt, a2, beta, w)
        y = r + gamma * (1 - done) * (q_next - alpha * lp2)
        c_data = c_direct(ref.reference, obs, act, beta, w)
    out["critic_loss"] = sum(((member_q(ref.critic, obs, act, i) + c_data - y) ** 2).mean() for i in (0, 1))
    out["c_data"] = c_data
    grads["critic"] = step(optims["critic"], out["critic_loss"], ref.critic.parameters())

    a3, lp3 = sample(ref.actor, obs, eps[2])
    q_pi = min_q(ref.critic, obs, a3, detach=True) + c_direct(ref.reference, obs, a3, beta, w)
    out["actor_loss"] = (alpha * lp3 - q_pi).mean()
    grads["actor"] = step(optims["actor"], out["actor_loss"], ref.actor.parameters(), clip=args.actor_grad_clip)
    polyak_direct(ref, args.tau)
    i0, i1, i2 = args.interpolation
    with torch.no_grad():
        ref.w.fill_(max(w - i0 / (i1 * 1000), i2))
    return out, grads


def agent_grads(agent):
    return {"log_alpha": [agent.log_alpha.grad], "critic": [p.grad for p in agent.critic.parameters()],
            "baseline": [p.grad for p in agent.baseline.parameters()],
            "actor": [p.grad for p in agent.actor.parameters()]}


def compare_grads(got, want, parts):
    for part in parts:
        for k, (g, e) in enumerate(zip(got[part], want[part])):
            assert g is not None, f"{part} parameter {k} received no gradient"
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"gradient of {part} parameter {k} differs: {m}")


def compare_agents(agent, ref, modules):
    for name in modules:
        for (k, p), q in zip(getattr(agent, name).named_parameters(), getattr(ref, name).parameters()):
            # atol: Adam's first steps are about lr * sign(g), which magnifies rounding where g is near 0
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{name}.{k} after the update")
    torch.testing.assert_close(agent.log_alpha, ref.log_alpha, rtol=1e-6, atol=1e-7)


CLOSE = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- offline
def test_offline_update_against_direct():
    args = aca.Args(**LRS, gamma=0.9, tau=0.1, alpha_ml=2.5)
    agent = make_agent()
    ref = copy.deepcopy(agent)
    offline_update, _, optims = aca.make_update_fns(agent, args, ACT)
    ref_optims = reference_optims(ref, args)
    for k in range(2):  # the second step runs on Adam states and targets that the first one moved
        batch = make_batch(seed=10 + k)
        torch.manual_seed(100 + k)
        out = offline_update(batch)
        want, grads = direct_offline(ref, batch, args, ref_optims, seed=100 + k)
        for key, name in (("loss/alpha", "alpha_loss"), ("loss/critic", "critic_loss"),
                          ("loss/baseline", "baseline_loss"), ("loss/actor", "actor_loss"), ("lam", "lam"),
                          ("log_likelihood", "log_likelihood"), ("entropy", "entropy"), ("alpha", "alpha")):
            torch.testing.assert_close(out[key], want[name].detach(), **CLOSE, msg=f"step {k}: {key}")
        compare_grads(agent_grads(agent), grads, ("log_alpha", "critic", "baseline", "actor"))
        compare_agents(agent, ref, ("actor", "critic", "critic_target", "baseline"))
    assert set(optims) == {"actor_optim", "critic_optim", "alpha_optim", "baseline_optim"}


def test_offline_ml_term_and_lambda():
    """The ML term alone: with alpha_ML -> 0 the actor's gradient is that of -mean log pi(a_data|s)."""
    args = aca.Args(**LRS, alpha_ml=1e-12)
    agent = make_agent()
    before = copy.deepcopy(agent)
    offline_update, _, _ = aca.make_update_fns(agent, args, ACT)
    batch = make_batch()
    offline_update(batch)
    want = torch.autograd.grad(-log_prob_of(before.actor, batch["observations"], batch["actions"]).mean(),
                               list(before.actor.parameters()))
    compare_grads({"actor": [p.grad for p in agent.actor.parameters()]}, {"actor": want}, ("actor",))


def test_log_prob_is_d3rlpy_squashed_normal():
    agent = make_agent()
    obs, actions = torch.randn(5, 3, OBS), torch.rand(5, 3, ACT) * 2 - 1
    actions[0, 0, 1] = -1.0
    torch.testing.assert_close(agent.actor.log_prob(obs, actions), log_prob_of(agent.actor, obs, actions),
                               rtol=1e-5, atol=1e-4)
    torch.manual_seed(0)
    action, lp = agent.actor(obs)
    torch.manual_seed(0)
    want_action, want_lp = sample(agent.actor, obs, torch.randn(5, 3, ACT))
    torch.testing.assert_close(action, want_action)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    mu, log_std = dist(agent.actor, obs)
    torch.testing.assert_close(agent.actor(obs, deterministic=True)[0], torch.tanh(mu))
    assert agent.actor.act(np.zeros(OBS), deterministic=True).shape == (ACT,)
    with torch.no_grad():
        agent.actor.log_std.bias.fill_(-50.0)
    assert (agent.actor.dist(obs)[1] == -20.0).all(), "log_std clamped at -20 (d3rlpy)"


# ---------------------------------------------------------------- online
def aligned_agent(w0=0.9):
    """An aligned agent moved away from the alignment (actor != pi_0, R != Z, targets != R) so every term shows."""
    agent = make_agent()
    aca.align(agent, w0)
    with torch.no_grad():
        for net in (agent.actor, agent.critic):
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        for p in agent.critic_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
        agent.log_alpha.fill_(math.log(0.7))
    return agent


def test_online_update_against_direct():
    args = aca.Args(**LRS, gamma=0.9, tau=0.1, beta=1.0, interpolation=(0.9, 0.004, 0.3))
    agent = aligned_agent(args.interpolation[0])
    ref = copy.deepcopy(agent)
    _, online_update, _ = aca.make_update_fns(agent, args, ACT)
    ref_optims = reference_optims(ref, args)
    active = []
    for k in range(3):  # w: 0.9 -> 0.675 -> 0.45 -> 0.3 (the floor)
        batch = make_batch(seed=20 + k)
        torch.manual_seed(200 + k)
        reference_before = copy.deepcopy(agent.reference.state_dict())
        out = online_update(batch)
        want, grads = direct_online(ref, batch, args, ref_optims, seed=200 + k)
        for key, name in (("loss/alpha", "alpha_loss"), ("loss/critic", "critic_loss"), ("loss/actor", "actor_loss"),
                          ("alpha", "alpha")):
            torch.testing.assert_close(out[key], want[name].detach(), **CLOSE, msg=f"step {k}: {key}")
        torch.testing.assert_close(out["w"].item(), want["w"], msg="C uses w before this update's annealing")
        torch.testing.assert_close(out["c/mean"], want["c_data"].mean(), **CLOSE)
        compare_grads(agent_grads(agent), grads, ("log_alpha", "critic", "actor"))
        compare_agents(agent, ref, ("actor", "critic", "critic_target"))
        torch.testing.assert_close(agent.w, ref.w, rtol=0, atol=1e-12, msg="w after annealing")
        for key, v in agent.reference.state_dict().items():
            assert torch.equal(v, reference_before[key]), f"pi_0 moved online ({key})"
        assert all(p.grad is None for p in agent.baseline.parameters()), "the baseline is not trained online"
        with torch.no_grad():
            mu, log_std = dist(agent.reference, batch["observations"])
            lp0 = log_prob_of(agent.reference, batch["observations"], batch["actions"])
            lo = log_density(mu, log_std, mu - args.beta * log_std.exp())
            active.append(lp0 < torch.minimum(lo, log_density(mu, log_std, mu + args.beta * log_std.exp())))
    active = torch.cat(active)
    assert active.any() and not active.all(), "the batches should hold clipped and unclipped log pi_0"
    assert float(agent.w) == pytest.approx(0.3)


def test_online_actor_gradient_flows_through_c():
    """With R's weights zeroed (and held there, critic and temperature lr 0) the actor's Q-gradient comes from C
    alone; a C detached in the actor loss would leave only the entropy term."""
    args = aca.Args(**{**LRS, "critic_lr": 0.0, "alpha_lr": 0.0}, beta=1.0)
    agent = aligned_agent()
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.zero_()
    before = copy.deepcopy(agent)
    _, online_update, _ = aca.make_update_fns(agent, args, ACT)
    batch = make_batch()
    torch.manual_seed(5)
    online_update(batch)
    torch.manual_seed(5)
    eps = [torch.randn(B, ACT) for _ in range(3)]
    obs = batch["observations"]
    a, lp = sample(before.actor, obs, eps[2])
    loss = (0.7 * lp - c_direct(before.reference, obs, a, args.beta, float(before.w))).mean()
    raw = torch.autograd.grad(loss, list(before.actor.parameters()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in raw))
    assert norm > 0.25
    want = [g * min(1.0, 0.25 / (float(norm) + 1e-6)) for g in raw]
    compare_grads({"actor": [p.grad for p in agent.actor.parameters()]}, {"actor": want}, ("actor",))


# ---------------------------------------------------------------- soft clip and annealing
@pytest.mark.parametrize("beta,w", [(0.5, 1.0), (7.0, 0.6), (15.0, 0.25)])
def test_soft_clip_against_direct(beta, w):
    agent = make_agent()
    obs = torch.randn(64, OBS)
    actions = torch.rand(64, ACT) * 2 - 1
    got = aca.soft_clip(agent.actor, obs, actions, beta, torch.tensor(w, dtype=torch.float64))
    torch.testing.assert_close(got, c_direct(agent.actor, obs, actions, beta, w), rtol=1e-5, atol=1e-5)
    # a smooth floor: never below w clip_at, and w log pi_0 wherever log pi_0 is far above clip_at
    mu, log_std = dist(agent.actor, obs)
    with torch.no_grad():
        clip_at = torch.minimum(log_density(mu, log_std, mu - beta * log_std.exp()),
                                log_density(mu, log_std, mu + beta * log_std.exp()))
        lp0 = log_prob_of(agent.actor, obs, actions)
    assert (got >= w * clip_at - 1e-5).all()
    far = lp0 - clip_at > 30
    torch.testing.assert_close(got[far], w * lp0[far], rtol=1e-5, atol=1e-5)
    # the gradient w.r.t. the action is w sigmoid(log pi_0 - clip_at) d log pi_0 / da
    a = actions.clone().requires_grad_(True)
    g = torch.autograd.grad(aca.soft_clip(agent.actor, obs, a, beta, torch.tensor(w)).sum(), a)[0]
    a2 = actions.clone().requires_grad_(True)
    lp = log_prob_of(agent.actor, obs, a2)
    g_lp = torch.autograd.grad(lp.sum(), a2)[0]
    torch.testing.assert_close(g, w * torch.sigmoid(lp.detach() - clip_at).unsqueeze(-1) * g_lp, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("interpolation,n", [((1.0, 10.0, 0.0), 10_000), ((1.0, 40.0, 0.5), 20_000),
                                             ((1.0, 100.0, 1.0), 50), ((2.0, 0.003, 0.1), 5)])
def test_annealing_against_direct(interpolation, n):
    """aca.md section 6: random reaches 0 after 10k updates, medium and medium-replay 0.5 after 20k, (1, 100, 1)
    stays."""
    w = torch.tensor(float(interpolation[0]), dtype=torch.float64)
    direct = interpolation[0]
    for _ in range(n):
        aca.anneal(w, interpolation)
        direct = max(direct - interpolation[0] / (interpolation[1] * 1000), interpolation[2])
    assert float(w) == pytest.approx(direct, abs=1e-9)
    assert float(w) == pytest.approx(interpolation[2], abs=1e-9)
    aca.anneal(w, interpolation)
    assert float(w) == pytest.approx(interpolation[2], abs=1e-9), "the floor holds"
    w = torch.tensor(float(interpolation[0]), dtype=torch.float64)
    aca.anneal(w, interpolation)
    expected = max(interpolation[0] - interpolation[0] / (interpolation[1] * 1000), interpolation[2])
    assert float(w) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- alignment
def trained_looking_agent():
    agent = make_agent()
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(0.3 * torch.randn_like(p))
        agent.log_alpha.fill_(math.log(0.05))
        agent.w.fill_(0.123)
    return agent


def test_alignment_builds_r_from_z_exactly():
    agent = trained_looking_agent()
    offline = copy.deepcopy(agent)
    aca.align(agent, 1.0)
    obs, actions = torch.randn(64, OBS), torch.rand(64, ACT) * 2 - 1
    with torch.no_grad():
        r, z = agent.critic(obs, actions), agent.baseline(obs)
        assert torch.equal(r, z), "R_k(s, a) = Z_k(s) exactly, for random actions"
        assert torch.equal(agent.critic_target(obs, actions), z), "targets copied from R"
        assert not torch.allclose(offline.critic(obs, actions), r), "the offline critics are discarded"
    assert (agent.critic.layers[0].weight[:, OBS:] == 0).all(), "action rows of R's first layer are zero"
    assert torch.equal(agent.critic.layers[0].weight[:, :OBS], offline.baseline.layers[0].weight)
    for r_layer, z_layer in zip(agent.critic.layers[1:], offline.baseline.layers[1:]):
        assert torch.equal(r_layer.weight, z_layer.weight) and torch.equal(r_layer.bias, z_layer.bias)
    assert agent.log_alpha.item() == 0.0 and agent.log_alpha.requires_grad, "alpha reset to 1, still learned"
    assert agent.w.dtype == torch.float64 and float(agent.w) == 1.0, "w starts at i0"
    for (k, p), q in zip(agent.reference.named_parameters(), offline.actor.parameters()):
        assert torch.equal(p, q), f"pi_0 is the offline actor ({k})"
        assert not p.requires_grad, "pi_0 is frozen"
    with torch.no_grad():
        agent.actor.mu.bias.add_(1.0)
    assert not torch.equal(agent.reference.mu.bias, agent.actor.mu.bias), "pi_0 is a copy, not the actor itself"
    for name in ("actor", "baseline"):
        for p, q in zip(getattr(agent, name).parameters(), getattr(offline, name).parameters()):
            assert name == "actor" or torch.equal(p, q)


def test_aligned_q_boltzmann_policy_is_pi0():
    """Before any online update, with w = 1 and a clip that is not active (beta large), Q(s, a) - log pi_0(a|s) is
    constant in a, so softmax over sampled actions of Q / alpha (alpha = 1) is pi_0's normalised density."""
    agent = trained_looking_agent()
    aca.align(agent, 1.0)
    beta = 20.0
    obs = torch.randn(6, OBS)
    torch.manual_seed(3)
    with torch.no_grad():
        actions, _ = agent.reference(obs.unsqueeze(1).expand(-1, 32, -1))  # [6, 32, A]
        actions = torch.cat([actions, torch.rand(6, 8, ACT) * 1.6 - 0.8], dim=1)  # plus a few off-policy actions
        flat_obs = obs.unsqueeze(1).expand(-1, 40, -1).reshape(-1, OBS)
        q = aca.aligned_q(agent, flat_obs, actions.reshape(-1, ACT), beta).view(6, 40)
        lp0 = log_prob_of(agent.reference, obs.unsqueeze(1).expand(-1, 40, -1), actions)
        alpha = agent.log_alpha.exp()
    torch.testing.assert_close(q - lp0, agent.baseline(obs).min(dim=0).values.unsqueeze(1).expand(-1, 40),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.softmax(q / alpha, dim=1), torch.softmax(lp0, dim=1), rtol=1e-4, atol=1e-6)
    density = lp0.exp()
    torch.testing.assert_close(torch.softmax(q / alpha, dim=1), density / density.sum(1, keepdim=True), rtol=1e-4,
                               atol=1e-6)


# ---------------------------------------------------------------- top-k episodes and the online buffer
def episode_data(returns_and_lengths, ends):
    """Data whose episode j has the given length and return (all of it on the first step, so that ties are exact),
    ended as `ends[j]`."""
    rows = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminated", "truncated")}
    for j, ((ret, length), end) in enumerate(zip(returns_and_lengths, ends)):
        for t in range(length):
            last = t == length - 1
            rows["observations"].append([j, t, 0.0])
            rows["actions"].append([0.1 * j, 0.0])
            rows["rewards"].append([ret if t == 0 else 0.0])
            rows["next_observations"].append([j, t + 1, 0.0])
            rows["terminated"].append([float(last and end == "terminal")])
            rows["truncated"].append([float(last and end == "timeout")])
    return {k: np.asarray(v, dtype=np.float32) for k, v in rows.items()}


EPISODES = [(3.0, 4), (9.0, 3), (5.0, 5), (9.0, 2), (1.0, 6), (7.0, 3)]
ENDS = ["timeout", "terminal", "timeout", "timeout", "terminal", "none"]  # the last one is cut off by the file's end


@pytest.mark.parametrize("k,expected", [(0, []), (1, [1]), (2, [1, 3]), (3, [1, 3, 5]), (4, [1, 2, 3, 5]),
                                        (6, [0, 1, 2, 3, 4, 5]), (50, [0, 1, 2, 3, 4, 5]), (-1, [0, 1, 2, 3, 4, 5])])
def test_top_episodes(k, expected):
    """Highest return first, ties to the earlier episode (1 before 3), whole episodes in dataset order; k larger than
    the number of episodes or -1 takes all; the unflagged tail counts as an episode."""
    data = episode_data(EPISODES, ENDS)
    top, chosen = aca.top_episodes(data, k)
    assert list(chosen) == expected
    starts = np.cumsum([0] + [n for _, n in EPISODES])
    rows = [r for j in expected for r in range(starts[j], starts[j + 1])]
    for key in data:
        np.testing.assert_array_equal(top[key], data[key][rows], err_msg=key)
    assert len(top["rewards"]) == sum(EPISODES[j][1] for j in expected)


def test_top_episodes_tie_at_the_cut():
    data = episode_data([(2.0, 2), (5.0, 2), (5.0, 3), (5.0, 1)], ["timeout"] * 4)
    assert list(aca.top_episodes(data, 2)[1]) == [1, 2], "of three tied episodes the two earliest"


@pytest.mark.parametrize("n_trajs", [0, 2, -1])
def test_online_buffer_holds_only_the_top_episodes(n_trajs):
    data = episode_data(EPISODES, ENDS)
    args = aca.Args(n_trajs=n_trajs, online_steps=10, seed=3)
    buffer = aca.online_buffer(args, data, 3, 2, torch.device("cpu"))
    top, _ = aca.top_episodes(data, n_trajs)
    n_top = len(top["rewards"])
    assert buffer.size == n_top and buffer.capacity == n_top + 10
    if n_top:
        np.testing.assert_array_equal(buffer.storage[:n_top, :3].numpy(), top["observations"])
        np.testing.assert_array_equal(buffer.storage[:n_top, 5:6].numpy(), top["rewards"])
    buffer.add(np.ones(3), np.zeros(2), 1.0, np.ones(3), False, False)
    assert buffer.size == n_top + 1 and buffer.added()["rewards"].tolist() == [1.0]
    small = aca.online_buffer(dataclasses.replace(args, buffer_size=n_top + 2), data, 3, 2, torch.device("cpu"))
    assert small.capacity == n_top + 2, "--buffer-size caps the FIFO"


# ---------------------------------------------------------------- documented defaults
MUJOCO_DEFAULTS = {
    "batch_size": (256, "aca.md section 2/6: batch 256"),
    "actor_lr": (3e-4, "aca.md section 2: lr 3e-4"),
    "critic_lr": (3e-4, "aca.md section 2: lr 3e-4"),
    "alpha_lr": (3e-4, "aca.md section 2/4: temperature lr 3e-4"),
    "baseline_lr": (3e-4, "aca.md section 2: baseline lr 3e-4"),
    "gamma": (0.99, "aca.md section 2: gamma 0.99 (d3rlpy default)"),
    "tau": (0.005, "aca.md section 2: tau 0.005"),
    "alpha_ml": (30.0, "aca.md section 2: configs/offline/mjc_*.yaml alpha 30"),
    "beta": (7.0, "aca.md section 6: medium beta 7"),
    "interpolation": ((1.0, 40.0, 0.5), "aca.md section 6: medium (1, 40, 0.5)"),
    "n_trajs": (0, "aca.md section 6: medium n_trajs 0"),
    "actor_grad_clip": (0.25, "aca.md section 4: actor gradient norm clipped to 0.25"),
    "buffer_size": (1_000_000, "aca.md section 3: FIFO 1e6"),
    "offline_steps": (500_000, "aca.md section 2: 500,000 steps"),
    "online_steps": (100_000, "aca.md section 6 / protocol: 100k online env steps"),
    "eval_every": (1_000, "protocol: every 1,000 online env steps"),
    "offline_eval_every": (10_000, "protocol: every 10,000 gradient steps offline"),
    "eval_episodes": (10, "protocol: 10 deterministic episodes"),
    "hidden_dim": (256, "aca.md section 5: 2 x 256"),
}
BY_DATASET = {
    "random": {"interpolation": ((1.0, 10.0, 0.0), "section 6: random (1, 10, 0)")},
    "medium": {},
    "medium-replay": {"n_trajs": (50, "section 6: medium-replay n_trajs 50")},
    "medium-expert": {"beta": (15.0, "section 6"), "interpolation": ((1.0, 100.0, 1.0), "section 6"),
                      "n_trajs": (50, "section 6")},
    "expert": {"beta": (15.0, "section 6"), "interpolation": ((1.0, 100.0, 1.0), "section 6"),
               "n_trajs": (50, "section 6")},
    # Adroit: "Defaults for o2o-rl": medium-replay settings, every human demonstration, 400k online steps
    "human": {"n_trajs": (-1, "every demonstration"), "online_steps": (400_000, "protocol: Adroit 400k")},
    "cloned": {"n_trajs": (50, "medium-replay's"), "online_steps": (400_000, "protocol: Adroit 400k")},
}
BY_DATASET["expert-adroit"] = {"n_trajs": (50, "medium-replay's"), "online_steps": (400_000, "protocol")}


def test_args_defaults_are_the_documented_ones():
    args = aca.Args()
    fields = [f.name for f in dataclasses.fields(aca.Args)]
    method_fields = fields[fields.index("batch_size"):]
    assert not [f for f in method_fields if f not in MUJOCO_DEFAULTS], "a method field without a documented default"
    for name, (value, source) in MUJOCO_DEFAULTS.items():
        got = getattr(args, name)
        assert got == value and type(got) is type(value), f"Args.{name} = {got!r}, documented {value!r} ({source})"


@pytest.mark.parametrize("env_id", aca.TASK_IDS)
def test_per_dataset_defaults(env_id):
    family, name = env_id.split("-", 1)
    expected = dict(MUJOCO_DEFAULTS)
    key = f"{name}-adroit" if family in aca.ADROIT_FAMILIES and name == "expert" else name
    expected.update(BY_DATASET[key])
    args = aca.parse_args(["--env-id", env_id])
    for field, (value, source) in expected.items():
        assert getattr(args, field) == value, f"{env_id}: {field} = {getattr(args, field)!r}, documented {value!r}"
    assert aca.parse_args(["--env-id", env_id, "--n-trajs", "7"]).n_trajs == 7, "an explicit flag wins"
