"""algorithms/off2on.py, one update at a time against the losses written out member by member from design/off2on.md
sections 2 and 5: offline, E independent CQL(H) agents on their own minibatches (value and gradient of every loss,
one Adam step each at the offline learning rates, Polyak); online, the moment-matched policy, the pessimistic ensemble,
the SAC losses, the density-ratio loss and the RL batch's priorities (value and gradient, the online learning rates,
the offline temperatures untouched). Also: the members stay independent, the density-ratio loss's minimiser is
d_online / d_offline, the moment matching and the penalty against direct computations, and the documented defaults."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import load_algo, member_q

o2o = load_algo("off2on")
cql = load_algo("cql_ft")
torch.set_num_threads(1)  # the tiny networks are slower with threads on a shared machine

OBS, ACT, E, B, K, HID = 4, 2, 3, 5, 2, 16
# rows 0 and 3 terminated (3 also truncated), rows 1 and 4 truncated: only `terminated` stops bootstrapping
TERMINATED = [1.0, 0.0, 0.0, 1.0, 0.0]
TRUNCATED = [0.0, 1.0, 0.0, 1.0, 1.0]


def make_agent(seed: int = 0, e: int = E):
    torch.manual_seed(seed)
    actor = o2o.EnsembleActor(OBS, ACT, e, hidden=HID)
    critic = o2o.VectorizedCritic(OBS, ACT, 2 * e, HID, n_layers=2, edac_init=False)
    o2o.init_critic(critic)
    with torch.no_grad():  # spread Q, the policies and w over states: the small output inits make them near constant
        critic.layers[-1].weight.normal_(0, 0.3)
        actor.mu.weight.normal_(0, 0.5)
        actor.log_std.weight.normal_(0, 0.5)
        actor.log_std.bias.fill_(-0.5)
    target = copy.deepcopy(critic)
    weight_net = o2o.DensityRatio(OBS, ACT, HID)
    with torch.no_grad():  # a target that differs from the critics, so that mixing them up shows
        for p in target.parameters():
            p.add_(0.2 * torch.randn_like(p))
        weight_net.net[-1].weight.normal_(0, 0.5)
    return o2o.Agent(actor, critic, target, torch.log(torch.linspace(0.2, 0.6, e)).requires_grad_(True),
                     torch.tensor(math.log(0.7), requires_grad=True), weight_net)


def make_batch(shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flags = lambda x: torch.tensor(x).expand(*shape[:-1], len(x)) if shape[-1] == len(x) else torch.zeros(shape)  # noqa
    return {"observations": torch.randn(*shape, OBS, generator=g),
            "actions": torch.rand(*shape, ACT, generator=g) * 2 - 1,
            "rewards": torch.randn(*shape, generator=g), "next_observations": torch.randn(*shape, OBS, generator=g),
            "terminated": flags(TERMINATED).clone(), "truncated": flags(TRUNCATED).clone()}


# ---------------------------------------------------------------- plain computations
def member_gaussian(actor, obs, i):
    """mu_i(s), log sigma_i(s) of actor member i with plain matmuls."""
    h = obs
    for layer in actor.trunk:
        h = torch.relu(h @ layer.weight[i] + layer.bias[i, 0])
    mu = h @ actor.mu.weight[i] + actor.mu.bias[i, 0]
    return mu, (h @ actor.log_std.weight[i] + actor.log_std.bias[i, 0]).clamp(-20, 2)


def tanh_sample(mu, std, eps):
    """tanh(mu + sigma eps) and log N(u; mu, sigma) - sum log(1 - tanh(u)^2)."""
    u = mu + std * eps
    log_prob = torch.distributions.Normal(mu, std).log_prob(u).sum(-1)
    return torch.tanh(u), log_prob - torch.log(1 - torch.tanh(u) ** 2).sum(-1)


def weight(net, obs, act):
    h = torch.cat([obs, act], -1)
    linears = [m for m in net.net if isinstance(m, torch.nn.Linear)]
    for lin in linears[:-1]:
        h = torch.relu(h @ lin.weight.T + lin.bias)
    return torch.relu(h @ linears[-1].weight.T + linears[-1].bias).squeeze(-1)


def direct_offline(agent, batch, args, seed):
    """Member by member: member i's CQL losses on its own rows batch[k][i], with the update's random draws in its
    order (actor at s, actor at s', K uniform actions, K policy actions at s, K at s', each drawn for all members)."""
    torch.manual_seed(seed)
    eps_pi, eps_next = torch.randn(E, B, ACT), torch.randn(E, B, ACT)
    a_rand = torch.rand(E, B, K, ACT) * 2 - 1
    eps_cur, eps_nk = torch.randn(E, B * K, ACT).view(E, B, K, ACT), torch.randn(E, B * K, ACT).view(E, B, K, ACT)
    c, t = agent.critic, agent.critic_target
    alpha_loss = actor_loss = td_loss = penalty = 0.0
    for i in range(E):
        obs, act, nxt = batch["observations"][i], batch["actions"][i], batch["next_observations"][i]
        mu, log_std = member_gaussian(agent.actor, obs, i)
        a_pi, log_pi = tanh_sample(mu, log_std.exp(), eps_pi[i])
        alpha_loss = alpha_loss - (agent.log_alpha[i] * (log_pi.detach() - ACT)).mean()  # H_target = -|A|
        alpha_i = float(agent.log_alpha[i].detach().exp())
        q_pi = torch.minimum(member_q(c, obs, a_pi, 2 * i, detach=True), member_q(c, obs, a_pi, 2 * i + 1, detach=True))
        actor_loss = actor_loss + (alpha_i * log_pi - q_pi).mean()
        with torch.no_grad():
            mu_n, ls_n = member_gaussian(agent.actor, nxt, i)
            a_next, _ = tanh_sample(mu_n, ls_n.exp(), eps_next[i])
            q_next = torch.minimum(member_q(t, nxt, a_next, 2 * i), member_q(t, nxt, a_next, 2 * i + 1))
            y = batch["rewards"][i] + args.gamma * (1 - batch["terminated"][i]) * q_next  # no entropy term
            a_cur, lp_cur = tanh_sample(*[x.unsqueeze(1) for x in (mu, log_std.exp())], eps_cur[i])
            mu_s, ls_s = member_gaussian(agent.actor, nxt, i)
            a_nk, lp_nk = tanh_sample(mu_s.unsqueeze(1), ls_s.exp().unsqueeze(1), eps_nk[i])
        for cc in (2 * i, 2 * i + 1):
            q_data = member_q(c, obs, act, cc)
            td_loss = td_loss + ((q_data - y) ** 2).mean()
            per_state = []
            for s in range(B):  # every action scored at s, minus the log of the density it was drawn from
                xs = torch.cat([member_q(c, obs[s].expand(K, -1), a_rand[i, s], cc) + ACT * math.log(2.0),
                                member_q(c, obs[s].expand(K, -1), a_nk[s], cc) - lp_nk[s],
                                member_q(c, obs[s].expand(K, -1), a_cur[s], cc) - lp_cur[s]])
                per_state.append(torch.logsumexp(xs, 0) - q_data[s])
            penalty = penalty + sum(per_state) / B
    critic_loss = td_loss + args.cql_alpha * penalty
    return {"alpha_loss": alpha_loss, "actor_loss": actor_loss, "td_loss": td_loss, "critic_loss": critic_loss,
            "penalty": penalty}


def direct_online(agent, off, on, rl, args, seed):
    """The online losses with plain per-member networks and the fused policy written out."""
    torch.manual_seed(seed)
    eps_pi, eps_next = torch.randn(B, ACT), torch.randn(B, ACT)
    c, t = agent.critic, agent.critic_target

    def fused(obs):
        gs = [member_gaussian(agent.actor, obs, i) for i in range(E)]
        mu = sum(m for m, _ in gs) / E
        var = sum(m ** 2 + ls.exp() ** 2 for m, ls in gs) / E - mu ** 2
        return mu, var.sqrt().clamp(math.exp(-20), math.exp(2))

    w_off, w_on = weight(agent.weight_net, off["observations"], off["actions"]), weight(
        agent.weight_net, on["observations"], on["actions"])
    weight_loss = (-torch.log(2 / (w_off + 1) + 1e-10)).mean() - torch.log(2 * w_on / (w_on + 1) + 1e-10).mean()
    obs, act, nxt = rl["observations"], rl["actions"], rl["next_observations"]
    a_pi, log_pi = tanh_sample(*fused(obs), eps_pi)
    alpha_loss = -(agent.online_log_alpha * (log_pi.detach() - ACT)).mean()
    alpha = float(agent.online_log_alpha.detach().exp())
    q_pi = sum(torch.minimum(member_q(c, obs, a_pi, 2 * i, True), member_q(c, obs, a_pi, 2 * i + 1, True))
               for i in range(E)) / E
    actor_loss = (alpha * log_pi - q_pi).mean()
    critic_loss = 0.0
    with torch.no_grad():
        a_next, lp_next = tanh_sample(*fused(nxt), eps_next)
    for i in range(E):
        with torch.no_grad():
            q_next = torch.minimum(member_q(t, nxt, a_next, 2 * i), member_q(t, nxt, a_next, 2 * i + 1))
            y = rl["rewards"] + args.gamma * (1 - rl["terminated"]) * (q_next - alpha * lp_next)
        for cc in (2 * i, 2 * i + 1):
            critic_loss = critic_loss + ((member_q(c, obs, act, cc) - y) ** 2).mean()
    with torch.no_grad():
        w_rl = weight(agent.weight_net, obs, act)
        priority = (w_rl ** (1 / args.temperature) / ((w_off ** (1 / args.temperature)).mean() + 1e-10))
    return {"weight_loss": weight_loss, "alpha_loss": alpha_loss, "actor_loss": actor_loss,
            "critic_loss": critic_loss, "priority": priority.clamp(1e-3, 1e3), "log_pi": log_pi, "alpha": alpha}


CLOSE = dict(rtol=1e-5, atol=1e-5)


def check_grads_and_steps(before, agent, losses: dict, lrs: dict, tau: float) -> None:
    """Each parameter group's .grad (left by the update's backward) is the gradient of its own loss alone; each group
    then took one Adam step (lr * g / (|g| + eps)) at its learning rate; the targets moved by Polyak with tau."""
    groups = {name: (list(getattr(before, name).parameters()) if isinstance(getattr(before, name), torch.nn.Module)
                     else [getattr(before, name)], list(getattr(agent, name).parameters())
                     if isinstance(getattr(agent, name), torch.nn.Module) else [getattr(agent, name)])
              for name in losses}
    for name, loss in losses.items():
        old, new = groups[name]
        want = torch.autograd.grad(loss, old, retain_graph=True)
        for j, (p0, p1, g) in enumerate(zip(old, new, want)):
            assert p1.grad is not None, f"{name}[{j}] received no gradient"
            torch.testing.assert_close(p1.grad, g, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}[{j}]: gradient is not its own loss's: {m}")
            step = -lrs[name] * p1.grad / (p1.grad.abs() + 1e-8)
            torch.testing.assert_close(p1.detach() - p0.detach(), step, rtol=1e-3, atol=1e-9,
                                       msg=lambda m: f"{name}[{j}]: not one Adam step at lr {lrs[name]}: {m}")
    for t0, t1, c1 in zip(before.critic_target.parameters(), agent.critic_target.parameters(),
                          agent.critic.parameters()):
        torch.testing.assert_close(t1, t0 + tau * (c1 - t0), rtol=1e-5, atol=1e-7,
                                   msg="critic_target: not Polyak with tau toward the stepped critics")


# ---------------------------------------------------------------- offline
def test_offline_update_losses_and_gradients():
    args = o2o.Args(ensemble_size=E, cql_n_actions=K, cql_alpha=2.5, cql_policy_lr=1e-3, qf_lr=2e-3, policy_lr=7e-3,
                    tau=0.1, gamma=0.9)
    agent = make_agent()
    batch = make_batch((E, B), seed=1)
    before = copy.deepcopy(agent)
    offline_update, _, _, _ = o2o.make_update_fns(agent, args, ACT)
    torch.manual_seed(7)
    out = offline_update(batch)
    ref = direct_offline(before, batch, args, seed=7)
    torch.testing.assert_close(out["loss/alpha"], ref["alpha_loss"].detach(), **CLOSE,
                               msg="temperature loss: sum over members of -mean(log alpha_i (log pi_i + H_target))")
    torch.testing.assert_close(out["loss/actor"], ref["actor_loss"].detach(), **CLOSE,
                               msg="actor loss: sum over members of mean(alpha_i log pi_i - min(Q1_i, Q2_i))")
    torch.testing.assert_close(out["loss/td"], ref["td_loss"].detach(), **CLOSE,
                               msg="TD loss: each critic against its own member's target on its own batch")
    torch.testing.assert_close(out["loss/cql_diff"], ref["penalty"].detach() / (2 * E), **CLOSE)
    torch.testing.assert_close(out["loss/critic"], ref["critic_loss"].detach(), **CLOSE,
                               msg="critic loss: TD + alpha_cql * sum of the 2E penalties")
    torch.testing.assert_close(out["alpha"], before.log_alpha.detach().exp().mean())
    check_grads_and_steps(before, agent, {"log_alpha": ref["alpha_loss"], "actor": ref["actor_loss"],
                                          "critic": ref["critic_loss"]},
                          {"log_alpha": args.cql_policy_lr, "actor": args.cql_policy_lr, "critic": args.qf_lr},
                          args.tau)
    assert agent.online_log_alpha.grad is None and torch.equal(agent.online_log_alpha, before.online_log_alpha)
    for p0, p1 in zip(before.weight_net.parameters(), agent.weight_net.parameters()):
        assert torch.equal(p0, p1) and p1.grad is None, "pretraining must leave the weight net alone"


def member_slices(agent, i):
    """Every tensor that belongs to member i: its actor weights, its two critics and targets, its temperature."""
    out = [p[i] for p in agent.actor.parameters()]
    for net in (agent.critic, agent.critic_target):
        out += [p[c] for p in net.parameters() for c in (2 * i, 2 * i + 1)]
    return out + [agent.log_alpha[i]]


def test_members_start_apart_and_stay_independent():
    """Changing only member 1's minibatch changes only member 1's parameters, over several steps (Adam state too)."""
    agent_a = make_agent()
    for i in range(E):
        for j in range(i):
            assert not torch.equal(agent_a.actor.trunk[0].weight[i], agent_a.actor.trunk[0].weight[j])
            assert not torch.equal(agent_a.critic.layers[0].weight[2 * i], agent_a.critic.layers[0].weight[2 * j])
    agent_b = copy.deepcopy(agent_a)
    args = o2o.Args(ensemble_size=E, cql_n_actions=K, cql_policy_lr=1e-2, qf_lr=1e-2)
    upd_a, upd_b = (o2o.make_update_fns(a, args, ACT)[0] for a in (agent_a, agent_b))
    for step in range(3):
        batch_a = make_batch((E, B), seed=10 + step)
        batch_b = {k: v.clone() for k, v in batch_a.items()}
        other = make_batch((E, B), seed=100 + step)
        for k in batch_b:
            batch_b[k][1] = other[k][1]
        for upd, batch in ((upd_a, batch_a), (upd_b, batch_b)):
            torch.manual_seed(step)
            upd(batch)
    for i in (0, 2):
        for x, y in zip(member_slices(agent_a, i), member_slices(agent_b, i)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-7, msg=f"member {i} moved with member 1's batch")
    assert any(not torch.allclose(x, y) for x, y in zip(member_slices(agent_a, 1), member_slices(agent_b, 1)))


def test_penalty_matches_cql_ft_and_a_loop():
    """With one member's log-densities for both critics, the penalty is cql_ft.py's (T = 1, no clipping)."""
    g = torch.Generator().manual_seed(0)
    q_data = torch.randn(2, 6, generator=g) * 3
    q_rand, q_next, q_cur = (torch.randn(2, 6, 4, generator=g) * 3 for _ in range(3))
    lp_next, lp_cur = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    got = o2o.ensemble_cql_penalty(q_data, q_rand, q_next, q_cur, lp_next.expand(2, -1, -1), lp_cur.expand(2, -1, -1),
                                   3)
    want = cql.cql_penalty(q_data, q_rand, q_next, q_cur, lp_next, lp_cur, 3, 1.0, -math.inf, math.inf)
    torch.testing.assert_close(got, want)
    lp_next2 = torch.randn(2, 6, 4, generator=g)  # per-critic log-densities: critic n uses row n
    got = o2o.ensemble_cql_penalty(q_data, q_rand, q_next, q_cur, lp_next2, lp_cur.expand(2, -1, -1), 3)
    for n in range(2):
        torch.testing.assert_close(got[n], cql.cql_penalty(q_data[n:n + 1], q_rand[n:n + 1], q_next[n:n + 1],
                                                           q_cur[n:n + 1], lp_next2[n], lp_cur, 3, 1.0, -math.inf,
                                                           math.inf)[0])


def test_member_q_of_samples_scores_each_members_states():
    agent = make_agent()
    obs, acts = torch.randn(E, B, OBS), torch.rand(E, B, K, ACT) * 2 - 1
    q = o2o.member_q_of_samples(agent.critic, obs, acts)
    assert q.shape == (2 * E, B, K)
    for c in range(2 * E):
        for j in range(K):
            torch.testing.assert_close(q[c, :, j], member_q(agent.critic, obs[c // 2], acts[c // 2, :, j], c))


# ---------------------------------------------------------------- online
def test_online_update_losses_gradients_and_priorities():
    args = o2o.Args(ensemble_size=E, policy_lr=1e-3, qf_lr=2e-3, weight_net_lr=5e-3, cql_policy_lr=7e-3, tau=0.1,
                    gamma=0.9, temperature=3.0)
    agent = make_agent()
    off, on, rl = make_batch((B,), 2), make_batch((B,), 3), make_batch((B,), 4)
    on["observations"] += 1.0  # the two distributions differ
    before = copy.deepcopy(agent)
    _, online_update, _, _ = o2o.make_update_fns(agent, args, ACT)
    torch.manual_seed(5)
    out, priority = online_update(off, on, rl)
    ref = direct_online(before, off, on, rl, args, seed=5)
    torch.testing.assert_close(out["loss/weight"], ref["weight_loss"].detach(), **CLOSE,
                               msg="weight loss: mean_off -log(2/(w+1)) - mean_on log(2w/(w+1))")
    torch.testing.assert_close(out["loss/alpha"], ref["alpha_loss"].detach(), **CLOSE,
                               msg="temperature loss on the fused policy's log pi")
    torch.testing.assert_close(out["loss/actor"], ref["actor_loss"].detach(), **CLOSE,
                               msg="actor loss: mean(alpha log pi - mean over members of min(Q1_i, Q2_i))")
    torch.testing.assert_close(out["loss/critic"], ref["critic_loss"].detach(), **CLOSE,
                               msg="critic loss: sum over 2E critics of MSE to the member's soft target")
    torch.testing.assert_close(out["entropy"], -ref["log_pi"].detach().mean(), **CLOSE)
    torch.testing.assert_close(out["alpha"], torch.tensor(ref["alpha"]))
    torch.testing.assert_close(priority, ref["priority"], **CLOSE,
                               msg="priorities: w^(1/T) over the offline batch's mean w^(1/T), clamped")
    assert "loss/cql_diff" not in out, "no CQL term online"
    check_grads_and_steps(before, agent, {"online_log_alpha": ref["alpha_loss"], "actor": ref["actor_loss"],
                                          "critic": ref["critic_loss"], "weight_net": ref["weight_loss"]},
                          {"online_log_alpha": args.policy_lr, "actor": args.policy_lr, "critic": args.qf_lr,
                           "weight_net": args.weight_net_lr}, args.tau)
    assert agent.log_alpha.grad is None and torch.equal(agent.log_alpha, before.log_alpha), \
        "online, the offline temperatures stay as they are"


def test_priorities_clamp_and_normalise():
    class W(torch.nn.Module):
        def forward(self, obs, act):
            return obs[:, 0]

    w_off = torch.tensor([0.5, 2.0, 1.5])
    obs = torch.tensor([[0.0], [1e-30], [1.0], [3.0], [1e30]])
    got = o2o.rl_priorities(W(), obs, torch.zeros(5, 1), w_off, 2.0)
    want = [min(max(float(w) ** 0.5 / (float((w_off ** 0.5).mean()) + 1e-10), 1e-3), 1e3) for w in obs[:, 0]]
    torch.testing.assert_close(got, torch.tensor(want))
    assert float(got[0]) == pytest.approx(1e-3) and float(got[-1]) == pytest.approx(1e3)


def test_density_ratio_loss_minimiser_is_the_ratio():
    """Per-bin weights w_k = relu(theta_k) trained with the loss on samples of two discrete distributions reach the
    ratio of the samples' frequencies, d_on(k) / d_off(k), close to the true ratio."""
    d_off, d_on = np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.1, 0.2, 0.3, 0.4])
    rng = np.random.default_rng(0)
    bins_off, bins_on = rng.choice(4, 20_000, p=d_off), rng.choice(4, 20_000, p=d_on)
    freq_ratio = (np.bincount(bins_on, minlength=4) / 20_000) / (np.bincount(bins_off, minlength=4) / 20_000)
    theta = torch.ones(4, requires_grad=True)
    optim = torch.optim.Adam([theta], lr=0.05)
    off_t, on_t = torch.as_tensor(bins_off), torch.as_tensor(bins_on)
    for _ in range(600):
        w = torch.relu(theta)
        loss = o2o.density_ratio_loss(w[off_t], w[on_t])
        optim.zero_grad()
        loss.backward()
        optim.step()
    np.testing.assert_allclose(torch.relu(theta).detach().numpy(), freq_ratio, rtol=2e-3)
    np.testing.assert_allclose(freq_ratio, d_on / d_off, rtol=0.1)


def test_density_ratio_loss_value():
    w_off, w_on = torch.tensor([0.0, 0.5, 2.0]), torch.tensor([0.0, 1.0, 3.0, 0.25])
    want = (np.mean([-math.log(2 / (w + 1) + 1e-10) for w in (0.0, 0.5, 2.0)])
            - np.mean([math.log(2 * w / (w + 1) + 1e-10) for w in (0.0, 1.0, 3.0, 0.25)]))
    assert float(o2o.density_ratio_loss(w_off, w_on)) == pytest.approx(want, rel=1e-6)


def test_moment_matching_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    mu, std = torch.randn(E, 6, ACT, generator=g), torch.rand(E, 6, ACT, generator=g) + 0.1
    m, s = o2o.moment_match(mu, std)
    for b in range(6):
        for a in range(ACT):
            mus, stds = mu[:, b, a].double().numpy(), std[:, b, a].double().numpy()
            mean = mus.mean()
            var = np.mean(mus ** 2 + stds ** 2) - mean ** 2
            assert float(m[b, a]) == pytest.approx(mean, abs=1e-6)
            assert float(s[b, a]) == pytest.approx(min(max(math.sqrt(var), math.exp(-20)), math.exp(2)), rel=1e-5)
            # the same as the variance of the equal-weight mixture of the members' Gaussians
            assert var == pytest.approx(np.mean(stds ** 2) + np.var(mus), rel=1e-9)
    big, tiny = o2o.moment_match(torch.full((2, 1, 1), 3.0), torch.full((2, 1, 1), 100.0)), o2o.moment_match(
        torch.full((2, 1, 1), 0.5), torch.full((2, 1, 1), 1e-12))
    assert float(big[1]) == pytest.approx(math.exp(2)) and float(tiny[1]) == pytest.approx(math.exp(-20), rel=1e-3)


def test_actor_samples_and_log_density():
    agent = make_agent()
    obs = torch.randn(7, OBS)
    torch.manual_seed(3)
    a, lp = agent.actor.sample(obs)
    torch.manual_seed(3)
    eps = torch.randn(7, ACT)
    mu, std = o2o.moment_match(*[torch.stack(x) for x in zip(*[(m, ls.exp()) for m, ls in (
        member_gaussian(agent.actor, obs, i) for i in range(E))])])
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mu, std),
                                                       torch.distributions.TanhTransform())
    torch.testing.assert_close(a, torch.tanh(mu + std * eps))
    torch.testing.assert_close(lp, dist.log_prob(a).sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(agent.actor.sample(obs, deterministic=True)[0], torch.tanh(mu))
    torch.testing.assert_close(torch.as_tensor(agent.actor.act(obs[0].numpy(), deterministic=True)), torch.tanh(mu[0]))
    members, _ = agent.actor(obs.expand(E, -1, -1))
    assert members.shape == (E, 7, ACT)


def test_initialisation():
    agent = make_agent()
    actor = o2o.EnsembleActor(OBS, ACT, E, hidden=HID)
    assert all((layer.bias == 0).all() for layer in actor.trunk) and (actor.mu.bias == 0).all()
    assert actor.mu.weight.abs().max() <= 1e-3 and actor.log_std.weight.abs().max() <= 1e-3
    assert 0 < actor.log_std.bias.abs().max() <= 1e-3
    critic = o2o.VectorizedCritic(OBS, ACT, 2 * E, HID, n_layers=2, edac_init=False)
    o2o.init_critic(critic)
    assert all((layer.bias == 0).all() for layer in critic.layers) and critic.layers[-1].weight.abs().max() <= 3e-3
    assert critic.layers[0].weight.abs().max() <= 1 / math.sqrt(OBS + ACT)
    net = o2o.DensityRatio(OBS, ACT, HID)
    w = net(torch.randn(9, OBS), torch.rand(9, ACT))
    assert w.shape == (9,) and torch.allclose(w, torch.ones(9), atol=0.05), "w starts near 1 (output bias 1)"
    w = agent.weight_net(torch.randn(50, OBS) * 10, torch.rand(50, ACT)).detach()
    assert float(w.min()) >= 0, "w = ReLU(f) >= 0"


# ---------------------------------------------------------------- documented defaults
DEFAULTS = {
    "ensemble_size": (5, "[O2O] --ensemble_size 5; paper notes: N = 5 on MuJoCo"),
    "batch_size": (256, "[O2O] batch_size 256"),
    "weight_net_batch_size": (256, "[O2O] --weight_net_batch_size 256"),
    "policy_lr": (3e-4, "[O2O] --policy_lr 3e-4 (alpha_lr = policy_lr)"),
    "qf_lr": (3e-4, "[O2O] --lr 3e-4; [CORL-CQL] qf_lr 3e-4"),
    "weight_net_lr": (3e-4, "[O2O] --weight_net_lr 3e-4"),
    "gamma": (0.99, "[O2O] discount 0.99"),
    "tau": (5e-3, "[O2O] soft_target_tau 5e-3"),
    "temperature": (5.0, "[O2O] --temperature 5.0"),
    "init_online_fraction": (0.5, "[O2O] --init_online_fraction 0.5"),
    "online_buffer_size": (250_000, "[O2O] --online_buffer_size 250000"),
    "first_epoch_multiplier": (10, "[O2O] --first_epoch_multiplier 10"),
    "epoch_steps": (1_000, "[O2O] 1000 expl steps and 1000 trains per loop"),
    "interleave": (False, "off2on.md Defaults: the code's epoch structure"),
    "cql_alpha": (10.0, "off2on.md section 5: alpha 10"),
    "cql_n_actions": (10, "off2on.md section 5: 10 sampled actions"),
    "cql_policy_lr": (3e-5, "off2on.md section 5: policy lr 3e-5"),
    "offline_steps": (1_000_000, "off2on.md section 5: 1M updates"),
    "online_steps": (100_000, "protocol: 100k online env steps on MuJoCo"),
    "eval_every": (1_000, "protocol: every 1,000 online env steps"),
    "hidden_dim": (256, "[O2O] 2 x 256 networks"),
}
ADROIT = {"online_steps": (400_000, "protocol: 400k on Adroit"),
          "online_buffer_size": (400_000, "ours: every online step kept"),
          "cql_alpha": (1.0, "CORL Adroit CQL config"), "cql_policy_lr": (1e-4, "CORL Adroit CQL config")}


def test_args_defaults_are_the_documented_ones():
    fields = [f.name for f in dataclasses.fields(o2o.Args)]
    missing = [f for f in fields[fields.index("ensemble_size"):] if f not in DEFAULTS]
    assert not missing, f"Args fields without a documented default in this test: {missing}"
    args = o2o.Args()
    for name, (value, source) in DEFAULTS.items():
        got = getattr(args, name)
        assert got == value and type(got) is type(value), f"Args.{name} = {got!r}, documented {value!r} ({source})"


@pytest.mark.parametrize("env_id", ["hopper-medium", "halfcheetah-random", "pen-human", "door-expert"])
def test_per_dataset_defaults(env_id):
    expected = dict(DEFAULTS)
    if env_id.split("-")[0] in o2o.ADROIT_FAMILIES:
        expected.update(ADROIT)
    args = o2o.parse_args(["--env-id", env_id])
    for name, (value, source) in expected.items():
        assert getattr(args, name) == value, f"{env_id}: {name} = {getattr(args, name)!r}, documented {value!r}"
    assert o2o.parse_args(["--env-id", env_id, "--online-buffer-size", "7"]).online_buffer_size == 7
