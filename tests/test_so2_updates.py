"""so2.py's updates, switch and buffers against plain computations that would tell a wrong version apart.

Each check is set up so that the plausible mistake changes the number it compares: critics whose members disagree by
O(1) (mean vs min over the ensemble), a target critic unlike the critic (critic vs target in the actor loss), a
log_std head below -5 (the offline clamp vs the online [-20, 2]), batches with truncated rows (time-outs must
bootstrap), marked rows in each buffer (which buffer a batch row came from). Losses are compared as values and as the
gradients the update leaves in `.grad`: with the learning rates at 0 the networks stay where they are, so one plain
computation from the same weights and the same random draws gives both. Adam's first step is sign(g) times lr
whatever g's size, so comparing weights after a step would miss most of these mistakes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import all_q, assert_grads_close, grads, load_algo, policy_sample, write_hopper_d4rl

ROOT = Path(__file__).resolve().parents[1]
so2 = load_algo("so2")
OBS, ACT, N, B = 4, 2, 3, 12
ONLINE_ALPHA, ONLINE_LOG_STD = 0.2, (-20.0, 2.0)  # SO2 code: fixed alpha 0.2, ReparameterizationHead clamp


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diverse_agent(seed=0, log_alpha=0.0):
    """Members that disagree by O(1), a target unlike the critic, and a log_std head below -5 on one dimension."""
    torch.manual_seed(seed)
    actor = so2.TanhGaussianActor(OBS, ACT, hidden=16)
    critic = so2.VectorizedCritic(OBS, ACT, N, hidden=16)
    target = so2.VectorizedCritic(OBS, ACT, N, hidden=16)
    with torch.no_grad():
        for net in (critic, target):
            net.layers[-1].weight.normal_(0.0, 1.0)
            net.layers[-1].bias.normal_(0.0, 1.0)
        actor.log_std.bias.copy_(torch.tensor([-8.0, 0.3]))
        actor.mu.weight.normal_(0.0, 0.5)
    return so2.Agent(actor, critic, target, torch.tensor(log_alpha, requires_grad=True))


def batch_with_ends(lead=(), seed=1):
    """Rows 0-2 terminated, rows 3-5 truncated (time-outs), the rest neither."""
    g = torch.Generator().manual_seed(seed)
    terminated, truncated = torch.zeros(*lead, B), torch.zeros(*lead, B)
    terminated[..., :3], truncated[..., 3:6] = 1.0, 1.0
    return {"observations": torch.randn(*lead, B, OBS, generator=g),
            "actions": torch.rand(*lead, B, ACT, generator=g) * 2 - 1,
            "rewards": torch.randn(*lead, B, generator=g) * 3,
            "next_observations": torch.randn(*lead, B, OBS, generator=g),
            "terminated": terminated, "truncated": truncated}


# ---------------------------------------------------------------- the online block
@pytest.mark.parametrize("target_q", ["member", "min"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_online_losses_and_gradients(target_q, reduction):
    """One critic step and one actor step of SO2 from the switched state, value and gradient, against the paper's
    losses written out: PVU target per member (or min), TD loss over members, actor loss with min over the online
    critics, fixed alpha 0.2 and log_std clamped to [-20, 2]; time-outs bootstrap."""
    agent = diverse_agent()
    # sigma > c, so that the clip of the PVU noise changes most rows (the defaults are pinned further down)
    args = so2.Args(utd_ratio=1, actor_updates_per_step=1, online_lr=0.0, target_q=target_q,
                    critic_reduction=reduction, target_noise=0.5, target_noise_clip=0.4)
    so2.switch_to_online(agent, args)
    ref = copy.deepcopy(agent)
    update, _ = so2.make_online_update(agent, args)
    batch = batch_with_ends(lead=(1,))
    torch.manual_seed(7)
    out = update(batch)

    torch.manual_seed(7)
    b = {k: v[0] for k, v in batch.items()}
    eps_next, noise, eps_pi = torch.randn(B, ACT), torch.randn(B, ACT), torch.randn(B, ACT)
    with torch.no_grad():
        a_next, logp_next = policy_sample(ref.actor, b["next_observations"], eps_next, ONLINE_LOG_STD)
        a_next = (a_next + (0.5 * noise).clamp(-0.4, 0.4)).clamp(-1.0, 1.0)  # PVU after the tanh
        q_next = all_q(ref.critic_target, b["next_observations"], a_next)
        if target_q == "min":
            q_next = q_next.min(0).values
        y = b["rewards"] + 0.99 * (1 - b["terminated"]) * (q_next - ONLINE_ALPHA * logp_next)
    per_member = ((all_q(ref.critic, b["observations"], b["actions"]) - y) ** 2).mean(dim=1)
    critic_loss = per_member.mean() if reduction == "mean" else per_member.sum()
    expected_critic = torch.autograd.grad(critic_loss, list(ref.critic.parameters()))
    torch.testing.assert_close(out["loss/critic"], critic_loss.detach(), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"online critic loss: {m}")
    assert_grads_close(grads(agent.critic), expected_critic, "online critic loss gradient")

    a, logp = policy_sample(ref.actor, b["observations"], eps_pi, ONLINE_LOG_STD)
    actor_loss = (ONLINE_ALPHA * logp - all_q(ref.critic, b["observations"], a, detach=True).min(0).values).mean()
    torch.testing.assert_close(out["loss/actor"], actor_loss.detach(), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"online actor loss (min over the online critics, alpha 0.2): {m}")
    assert_grads_close(grads(agent.actor), torch.autograd.grad(actor_loss, list(ref.actor.parameters())),
                       "online actor loss gradient")
    assert all(p.grad is None or not p.grad.any() for p in agent.critic_target.parameters())


def test_online_block_order_and_counts():
    """utd_ratio critic steps, each followed by Polyak; actor steps after critic steps k, 2k, ... on that step's
    rows. The critic's gradient after the block is that of the last critic step (rows of batch[-1])."""
    agent = diverse_agent()
    args = so2.Args(utd_ratio=4, actor_updates_per_step=2, online_lr=0.0)
    so2.switch_to_online(agent, args)
    update, optims = so2.make_online_update(agent, args)
    calls = []
    for name, opt in optims.items():
        opt.step = (lambda f, n: (lambda *a, **k: (calls.append(n), f(*a, **k))[1]))(opt.step, name)
    target0 = [p.detach().clone() for p in agent.critic_target.parameters()]
    update(batch_with_ends(lead=(4,)))
    assert calls == ["critic_optim", "critic_optim", "actor_optim"] * 2, calls
    # lr 0: the critic stays, so four Polyak steps of tau 0.005 give target = critic + (1 - tau)^4 (target0 - critic)
    for t0, c, t in zip(target0, agent.critic.parameters(), agent.critic_target.parameters()):
        torch.testing.assert_close(t, c + (1 - 0.005) ** 4 * (t0 - c), atol=1e-6, rtol=1e-5,
                                   msg=lambda m: f"target critics after 4 Polyak steps of tau 0.005: {m}")


@pytest.mark.parametrize("utd,given,expected", [(10, None, 10), (2, None, 2), (5, None, 5), (10, 1, 1), (4, 2, 2)])
def test_actor_updates_follow_the_utd_ratio(utd, given, expected):
    assert so2.actor_updates(so2.Args(utd_ratio=utd, actor_updates_per_step=given)) == expected
    assert so2.parse_args(["--utd-ratio", str(utd)]).actor_updates_per_step is None


def test_actor_updates_that_do_not_divide_are_refused_with_a_message():
    with pytest.raises(so2.RunError, match="multiple of --actor-updates-per-step"):
        so2.actor_updates(so2.Args(utd_ratio=10, actor_updates_per_step=3))
    proc = subprocess.run([sys.executable, str(ROOT / "algorithms" / "so2.py"), "--utd-ratio", "10",
                           "--actor-updates-per-step", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.endswith("\n"), proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- the offline step
@pytest.mark.parametrize("eta", [0.0, 2.0])
def test_offline_losses_and_gradients(eta):
    """EDAC's step, value and gradient: temperature loss and actor loss on one shared policy sample (log_std in
    [-5, 2]), min-over-members target with entropy, TD loss summed over members plus eta x the pairwise cosine
    similarity of the members' action gradients."""
    log_alpha0 = math.log(0.5)
    agent = diverse_agent(log_alpha=log_alpha0)
    args = so2.Args(n_critics=N, eta=eta, actor_lr=0.0, critic_lr=0.0, alpha_lr=0.0)
    ref = copy.deepcopy(agent)
    update, _ = so2.make_offline_update(agent, args, target_entropy=-float(ACT))
    batch = batch_with_ends()
    torch.manual_seed(3)
    out = update(batch)

    torch.manual_seed(3)
    eps_pi, eps_next = torch.randn(B, ACT), torch.randn(B, ACT)
    obs = batch["observations"]
    a, logp = policy_sample(ref.actor, obs, eps_pi, (-5.0, 2.0))
    alpha_loss = -(ref.log_alpha * (logp.detach() - ACT)).mean()
    torch.testing.assert_close(out["loss/alpha"], alpha_loss.detach(), msg=lambda m: f"temperature loss: {m}")
    torch.testing.assert_close(agent.log_alpha.grad, torch.autograd.grad(alpha_loss, ref.log_alpha)[0],
                               msg=lambda m: f"temperature loss gradient: {m}")
    alpha = math.exp(log_alpha0)
    actor_loss = (alpha * logp - all_q(ref.critic, obs, a, detach=True).min(0).values).mean()
    torch.testing.assert_close(out["loss/actor"], actor_loss.detach(), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"offline actor loss: {m}")
    assert_grads_close(grads(agent.actor), torch.autograd.grad(actor_loss, list(ref.actor.parameters())),
                       "offline actor loss gradient")
    with torch.no_grad():
        a_next, logp_next = policy_sample(ref.actor, batch["next_observations"], eps_next, (-5.0, 2.0))
        q_next = all_q(ref.critic_target, batch["next_observations"], a_next).min(0).values
        y = batch["rewards"] + 0.99 * (1 - batch["terminated"]) * (q_next - alpha * logp_next)
    act = batch["actions"].clone().requires_grad_(True)
    q = all_q(ref.critic, obs, act)
    loss = ((q - y) ** 2).mean(dim=1).sum()
    if eta > 0:
        g = [torch.autograd.grad(q[i].sum(), act, create_graph=True)[0] for i in range(N)]
        g = [gi / (gi.norm(dim=-1, keepdim=True) + 1e-10) for gi in g]
        similarity = sum((g[i] * g[j]).sum(-1) for i in range(N) for j in range(N) if i != j) / (N - 1)
        assert similarity.abs().mean() > 0.05  # the term is not negligible here
        loss = loss + eta * similarity.mean()
    torch.testing.assert_close(out["loss/critic"], loss.detach(), atol=1e-4, rtol=1e-5,
                               msg=lambda m: f"offline critic loss (eta {eta}): {m}")
    assert_grads_close(grads(agent.critic), torch.autograd.grad(loss, list(ref.critic.parameters())),
                       f"offline critic loss gradient (eta {eta})")


# ---------------------------------------------------------------- the switch to online
def test_switch_applies_the_so2_settings():
    agent = diverse_agent()
    offline_update, offline_optims = so2.make_offline_update(agent, so2.Args(n_critics=N), -float(ACT))
    offline_update(batch_with_ends())  # Adam states exist now; online must not inherit them
    assert agent.actor.log_std_min == -5.0 and agent.log_alpha.requires_grad
    args = so2.Args()
    so2.switch_to_online(agent, args)
    assert (agent.actor.log_std_min, agent.actor.log_std_max) == ONLINE_LOG_STD, "log_std clamp not widened online"
    assert math.isclose(agent.log_alpha.exp().item(), ONLINE_ALPHA, rel_tol=1e-6), "alpha not reset to 0.2"
    assert not agent.log_alpha.requires_grad, "the temperature must stay fixed online"
    _, optims = so2.make_online_update(agent, args)
    assert set(optims) == {"actor_optim", "critic_optim"}, "no temperature optimiser online"
    for name, net in (("actor_optim", agent.actor), ("critic_optim", agent.critic)):
        opt = optims[name]
        assert [g["lr"] for g in opt.param_groups] == [1e-3], f"{name}: online lr must be 1e-3 (SO2 code)"
        assert not opt.state, f"{name}: online Adam states must start fresh"
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in net.parameters()}
        assert opt is not offline_optims[name]


def test_q_estimate_is_the_min_over_the_ensemble():
    agent = diverse_agent()
    b = batch_with_ends()
    q = all_q(agent.critic, b["observations"], b["actions"]).detach()
    assert (q.max(0).values - q.min(0).values).mean() > 0.5  # members disagree
    torch.testing.assert_close(so2.q_estimate(agent.critic, b["observations"], b["actions"]), q.min(0).values,
                               msg=lambda m: f"Q diagnostics must score min_i Q_i: {m}")


# ---------------------------------------------------------------- buffers and batches
def marked_data(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return {"observations": rng.standard_normal((n, OBS)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
            "rewards": (np.arange(n, dtype=np.float32) + 1000.0)[:, None],  # offline rows: reward >= 1000
            "next_observations": rng.standard_normal((n, OBS)).astype(np.float32),
            "terminated": np.zeros((n, 1), np.float32), "truncated": np.zeros((n, 1), np.float32)}


def online_transition(k):
    return (np.full(OBS, k, np.float32), np.zeros(ACT, np.float32), -1.0 - k, np.zeros(OBS, np.float32), False, True)


def test_offline_fifo_buffer_holds_the_dataset_shuffled_with_the_seed():
    data = marked_data()
    args = so2.Args(online_steps=30, seed=4)
    buffers = so2.make_online_buffers(data, args, OBS, ACT, torch.device("cpu"))
    offline = buffers["offline"].storage[:, buffers["offline"].slices["rewards"]].squeeze(-1).numpy()
    assert sorted(offline) == sorted(data["rewards"][:, 0]), "the offline buffer must hold every dataset row"
    order = np.random.default_rng(4).permutation(50)
    np.testing.assert_array_equal(offline, data["rewards"][order, 0], err_msg="not the seed's shuffle")
    assert buffers["online"].size == 0 and buffers["online"].capacity == 30
    other = so2.make_online_buffers(data, dataclasses.replace(args, seed=5), OBS, ACT, torch.device("cpu"))
    assert not torch.equal(other["offline"].storage, buffers["offline"].storage)
    # The first online row after the warm-up replaces a random dataset row, not the file's first one.
    so2.store_transition(buffers, online_transition(0), warm=False, args=args)
    assert buffers["offline"].storage[0, buffers["offline"].slices["rewards"]].item() == -1.0


def test_uniform_mode_keeps_one_buffer_of_dataset_and_online_data():
    data = marked_data()
    args = so2.Args(online_steps=30, batch_mode="uniform")
    buffers = so2.make_online_buffers(data, args, OBS, ACT, torch.device("cpu"))
    assert set(buffers) == {"online"} and buffers["online"].capacity == 80 and buffers["online"].size == 50
    so2.store_transition(buffers, online_transition(0), warm=False, args=args)
    assert buffers["online"].size == 51


def test_warm_up_transitions_reach_the_online_buffer_only():
    args = so2.Args(online_steps=30)
    buffers = so2.make_online_buffers(marked_data(), args, OBS, ACT, torch.device("cpu"))
    before = buffers["offline"].storage.clone()
    so2.store_transition(buffers, online_transition(0), warm=True, args=args)
    assert torch.equal(buffers["offline"].storage, before), "a warm-up transition went into the offline buffer"
    assert buffers["online"].size == 1
    so2.store_transition(buffers, online_transition(1), warm=False, args=args)
    assert buffers["online"].size == 2 and buffers["offline"].n_added == 1


def test_mixed_batch_rows_come_from_their_buffers():
    """10% of each of the utd_ratio batches from the online buffer (negative rewards), the rest offline (>= 1000)."""
    args = so2.Args(online_steps=30, utd_ratio=3, online_batch_size=40, online_fraction=0.1)
    buffers = so2.make_online_buffers(marked_data(), args, OBS, ACT, torch.device("cpu"))
    for k in range(5):
        so2.store_transition(buffers, online_transition(k), warm=True, args=args)
    batch = so2.sample_online_batch(buffers, args)
    assert batch["rewards"].shape == (3, 40) and batch["observations"].shape == (3, 40, OBS)
    assert (batch["rewards"][:, :4] < 0).all(), "the first 4 rows of each batch must come from the online buffer"
    assert (batch["rewards"][:, 4:] >= 1000).all(), "the other 36 rows must come from the offline buffer"
    assert (batch["truncated"][:, :4] == 1).all() and (batch["truncated"][:, 4:] == 0).all()
    uniform = so2.Args(online_steps=30, utd_ratio=3, online_batch_size=40, batch_mode="uniform")
    flat = so2.sample_online_batch(so2.make_online_buffers(marked_data(), uniform, OBS, ACT, torch.device("cpu")),
                                   uniform)
    assert flat["rewards"].shape == (3, 40) and (flat["rewards"] >= 1000).all()


@pytest.mark.parametrize("mode,family,flags,expected", [
    ("bootstrap", "hopper", (False, True), (False, True)),
    ("bootstrap", "hopper", (True, False), (True, False)),
    ("terminal", "hopper", (False, True), (True, False)),
    ("terminal", "walker2d", (False, True), (True, False)),
    ("terminal", "halfcheetah", (False, True), (False, True)),
    ("terminal", "hopper", (True, False), (True, False)),
    ("terminal", "hopper", (False, False), (False, False)),
    ("terminal", "pen", (False, True), (False, True)),
])
def test_stored_flags(mode, family, flags, expected):
    assert so2.stored_flags(*flags, so2.Args(timeouts=mode), family) == expected


# ---------------------------------------------------------------- hyperparameters
def test_defaults_are_the_documented_ones():
    """so2.md section 5 and edac_sacn.md section 4: a default off by a few percent fails here."""
    a = so2.Args()
    assert (a.gamma, a.tau, a.online_lr, a.online_alpha, a.utd_ratio, a.actor_updates_per_step) == \
        (0.99, 0.005, 1e-3, 0.2, 10, None)
    assert (a.target_noise, a.target_noise_clip, a.online_batch_size, a.online_fraction, a.warmup_steps) == \
        (0.3, 0.6, 2560, 0.1, 5000)
    assert (a.target_q, a.critic_reduction, a.batch_mode, a.timeouts) == ("member", "mean", "mixed", "bootstrap")
    assert (a.offline_steps, a.online_steps, a.batch_size, a.actor_lr, a.critic_lr, a.alpha_lr, a.eta,
            a.n_critics) == (3_000_000, 100_000, 256, 3e-4, 3e-4, 3e-4, 1.0, 10)
    assert (a.eval_every, a.eval_episodes, a.offline_eval_every) == (1000, 10, 10_000)
    expected = {  # env id -> (N, eta, offline steps, actor lr, alpha lr, reward standardised, online steps)
        "halfcheetah-random": (10, 1.0, 3_000_000, 3e-4, 3e-4, False, 100_000),
        "hopper-medium": (50, 1.0, 3_000_000, 3e-4, 3e-4, False, 100_000),
        "walker2d-medium-replay": (10, 1.0, 3_000_000, 3e-4, 3e-4, False, 100_000),
        "halfcheetah-medium-expert": (10, 5.0, 3_000_000, 3e-4, 3e-4, False, 100_000),
        "walker2d-medium-expert": (10, 5.0, 3_000_000, 3e-4, 3e-4, False, 100_000),
        "hopper-medium-expert": (50, 1.0, 3_000_000, 3e-4, 3e-4, False, 100_000),
        "pen-human": (20, 1000.0, 200_000, 3e-5, 3e-5, True, 400_000),
        "pen-cloned": (20, 10.0, 3_000_000, 3e-4, 3e-4, False, 400_000),
        "pen-expert": (20, 10.0, 3_000_000, 3e-4, 3e-4, False, 400_000),
        "door-human": (50, 200.0, 3_000_000, 3e-4, 3e-4, False, 400_000),
        "door-cloned": (50, 200.0, 3_000_000, 3e-4, 3e-4, False, 400_000),
        "door-expert": (50, 200.0, 3_000_000, 3e-4, 3e-4, False, 400_000),
    }
    for env_id, values in expected.items():
        p = so2.parse_args(["--env-id", env_id])
        got = (p.n_critics, p.eta, p.offline_steps, p.actor_lr, p.alpha_lr, p.normalize_reward, p.online_steps)
        assert got == values, f"{env_id}: {got} != documented {values}"
    assert so2.parse_args(["--env-id", "pen-human", "--alpha-lr", "1e-4"]).alpha_lr == 1e-4  # a flag wins


# ---------------------------------------------------------------- end to end: what main wires together
@pytest.fixture(scope="module")
def hopper_tiny(tmp_path_factory):
    """400 random steps of Hopper-v4 in D4RL's layout, time-outs every 30 steps."""
    return write_hopper_d4rl(tmp_path_factory.mktemp("so2data") / "hopper.hdf5", steps=400, limit=30)


@pytest.mark.parametrize("timeouts", ["bootstrap", "terminal"])
def test_main_wires_switch_buffers_flags_and_diagnostics(tmp_path, hopper_tiny, monkeypatch, timeouts):
    """A tiny run with reward standardisation on reaches the online phase (it crashed at the first online step),
    applies the switch once, routes the warm-up to the online buffer only, stores time-outs as the --timeouts mode
    says, scores the diagnostics with q_estimate and stores scalar standardised rewards."""
    monkeypatch.setitem(so2.EPISODE_LIMITS, "hopper", 10)  # online episodes hit the time limit
    seen = {"switch": 0, "q": 0, "stored": []}
    real_switch, real_store, real_q = so2.switch_to_online, so2.store_transition, so2.q_estimate

    def switch(agent, args):
        seen["switch"] += 1
        real_switch(agent, args)

    def store(buffers, transition, warm, args):
        seen["stored"].append((warm, np.ndim(transition[2]), transition[4], transition[5]))
        real_store(buffers, transition, warm, args)

    def q(critic, obs, action):
        seen["q"] += 1
        return real_q(critic, obs, action)

    real_offline = so2.make_offline_update

    def offline(agent, args, target_entropy):
        seen["offline_log_std"] = (agent.actor.log_std_min, agent.actor.log_std_max, agent.log_alpha.item())
        return real_offline(agent, args, target_entropy)

    monkeypatch.setattr(so2, "make_offline_update", offline)
    monkeypatch.setattr(so2, "switch_to_online", switch)
    monkeypatch.setattr(so2, "store_transition", store)
    monkeypatch.setattr(so2, "q_estimate", q)
    args = so2.Args(env_id="hopper-medium", dataset=str(hopper_tiny), device="cpu", output_dir=str(tmp_path),
                    n_critics=2, batch_size=8, offline_steps=4, offline_eval_every=4, online_steps=60,
                    warmup_steps=20, eval_every=1000, eval_episodes=1, q_diag_extend_steps=3, checkpoint_every=1000,
                    log_every=1000, utd_ratio=1, online_batch_size=10, normalize_reward=True, timeouts=timeouts)
    so2.main(args)
    assert seen["offline_log_std"] == (-5.0, 2.0, 0.0), "EDAC pretrains with log_std in [-5, 2] and alpha 1"
    assert seen["switch"] == 1 and seen["q"] >= 2
    warm = [w for w, *_ in seen["stored"]]
    assert warm == [True] * 20 + [False] * 40, "the first --warmup-steps transitions are the warm-up"
    assert all(ndim == 0 for _, ndim, _, _ in seen["stored"]), "online rewards must stay scalars"
    truncated = [tr for *_, tr in seen["stored"]]
    terminated = [te for *_, te, _ in seen["stored"]]
    if timeouts == "bootstrap":
        assert any(truncated), "time-outs must be stored as truncated"
    else:
        assert not any(truncated) and any(terminated), "--timeouts terminal stores time-outs as terminal"


def test_each_offline_optimiser_takes_its_own_learning_rate():
    agent = diverse_agent()
    _, optims = so2.make_offline_update(agent, so2.Args(n_critics=N, actor_lr=1e-4, critic_lr=2e-4, alpha_lr=3e-5),
                                        -float(ACT))
    lrs = {k: [g["lr"] for g in o.param_groups] for k, o in optims.items()}
    assert lrs == {"actor_optim": [1e-4], "critic_optim": [2e-4], "alpha_optim": [3e-5]}, lrs
