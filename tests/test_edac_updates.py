"""edac.py's offline and online updates against the losses written out, value and gradient, plus what main wires.

As in test_so2_updates.py: members that disagree by O(1), a target critic unlike the critic, batches with truncated
rows, learning rates at 0 so that one plain computation from the same weights and random draws gives every loss and
the gradient each update leaves in `.grad`.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from conftest import all_q, assert_grads_close, grads, load_algo, policy_sample, write_hopper_d4rl

edac = load_algo("edac")
OBS, ACT, N, B = 4, 2, 3, 12


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diverse_agent(seed=0, log_alpha=math.log(0.5)):
    torch.manual_seed(seed)
    actor = edac.TanhGaussianActor(OBS, ACT, hidden=16)
    critic = edac.VectorizedCritic(OBS, ACT, N, hidden=16)
    target = edac.VectorizedCritic(OBS, ACT, N, hidden=16)
    with torch.no_grad():
        for net in (critic, target):
            net.layers[-1].weight.normal_(0.0, 1.0)
            net.layers[-1].bias.normal_(0.0, 1.0)
        actor.log_std.bias.copy_(torch.tensor([-8.0, 0.3]))  # below EDAC's -5 bound on one dimension
        actor.mu.weight.normal_(0.0, 0.5)
    return edac.Agent(actor, critic, target, torch.tensor(log_alpha, requires_grad=True))


def batch_with_ends(seed=1):
    """Rows 0-2 terminated, rows 3-5 truncated (time-outs), the rest neither."""
    g = torch.Generator().manual_seed(seed)
    terminated, truncated = torch.zeros(B), torch.zeros(B)
    terminated[:3], truncated[3:6] = 1.0, 1.0
    return {"observations": torch.randn(B, OBS, generator=g), "actions": torch.rand(B, ACT, generator=g) * 2 - 1,
            "rewards": torch.randn(B, generator=g) * 3, "next_observations": torch.randn(B, OBS, generator=g),
            "terminated": terminated, "truncated": truncated}


def expected_losses(ref, batch, eta, seed, log_alpha0):
    """EDAC's three losses on one batch from `ref`'s weights, with the draws the update makes after seeding."""
    torch.manual_seed(seed)
    eps_pi, eps_next = torch.randn(B, ACT), torch.randn(B, ACT)
    obs = batch["observations"]
    a, logp = policy_sample(ref.actor, obs, eps_pi, (-5.0, 2.0))
    alpha_loss = -(ref.log_alpha * (logp.detach() - ACT)).mean()
    alpha = math.exp(log_alpha0)
    actor_loss = (alpha * logp - all_q(ref.critic, obs, a, detach=True).min(0).values).mean()
    with torch.no_grad():
        a_next, logp_next = policy_sample(ref.actor, batch["next_observations"], eps_next, (-5.0, 2.0))
        q_next = all_q(ref.critic_target, batch["next_observations"], a_next).min(0).values
        y = batch["rewards"] + 0.99 * (1 - batch["terminated"]) * (q_next - alpha * logp_next)
    act = batch["actions"].clone().requires_grad_(True)
    q = all_q(ref.critic, obs, act)
    critic_loss = ((q - y) ** 2).mean(dim=1).sum()
    if eta > 0:
        g = [torch.autograd.grad(q[i].sum(), act, create_graph=True)[0] for i in range(N)]
        g = [gi / (gi.norm(dim=-1, keepdim=True) + 1e-10) for gi in g]
        similarity = sum((g[i] * g[j]).sum(-1) for i in range(N) for j in range(N) if i != j) / (N - 1)
        critic_loss = critic_loss + eta * similarity.mean()
    return alpha_loss, actor_loss, critic_loss


@pytest.mark.parametrize("phase,mode,eta", [("offline", "original", 0.0), ("offline", "loose", 2.0),
                                            ("online", "original", 2.0), ("online", "loose", 2.0)])
def test_losses_and_gradients(phase, mode, eta):
    """Offline both modes keep eta; online, original keeps it and loose drops it (SAC-N). Time-outs bootstrap."""
    log_alpha0 = math.log(0.5)
    agent = diverse_agent(log_alpha=log_alpha0)
    ref = copy.deepcopy(agent)
    args = edac.Args(n_critics=N, eta=eta, online_mode=mode, actor_lr=0.0, critic_lr=0.0, alpha_lr=0.0)
    offline_update, online_update, _ = edac.make_update_fns(agent, args, target_entropy=-float(ACT))
    batch = batch_with_ends()
    torch.manual_seed(3)
    out = (offline_update if phase == "offline" else online_update)(batch)
    used_eta = eta if phase == "offline" or mode == "original" else 0.0
    alpha_loss, actor_loss, critic_loss = expected_losses(ref, batch, used_eta, 3, log_alpha0)
    where = f"{phase} {mode}"
    torch.testing.assert_close(out["loss/alpha"], alpha_loss.detach(), msg=lambda m: f"{where} temperature loss: {m}")
    torch.testing.assert_close(agent.log_alpha.grad, torch.autograd.grad(alpha_loss, ref.log_alpha)[0],
                               msg=lambda m: f"{where} temperature gradient: {m}")
    torch.testing.assert_close(out["loss/actor"], actor_loss.detach(), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{where} actor loss (min over the online critics): {m}")
    assert_grads_close(grads(agent.actor), torch.autograd.grad(actor_loss, list(ref.actor.parameters())),
                       f"{where} actor gradient")
    torch.testing.assert_close(out["loss/critic"], critic_loss.detach(), atol=1e-4, rtol=1e-5,
                               msg=lambda m: f"{where} critic loss (eta {used_eta}): {m}")
    assert_grads_close(grads(agent.critic), torch.autograd.grad(critic_loss, list(ref.critic.parameters())),
                       f"{where} critic gradient")


def test_online_keeps_the_optimisers_and_the_learned_temperature():
    """edac.py has no switch: online reuses the offline Adam states, log_std bounds and learned alpha."""
    agent = diverse_agent()
    args = edac.Args(n_critics=N)
    offline_update, online_update, optims = edac.make_update_fns(agent, args, -float(ACT))
    offline_update(batch_with_ends())
    states = {k: copy.deepcopy(o.state_dict()["state"]) for k, o in optims.items()}
    log_alpha = agent.log_alpha.item()
    online_update(batch_with_ends(seed=2))
    assert agent.actor.log_std_min == -5.0 and agent.log_alpha.requires_grad
    assert agent.log_alpha.item() != log_alpha, "the temperature keeps being tuned online"
    for k, o in optims.items():
        assert o.state_dict()["state"][0]["step"] == states[k][0]["step"] + 1, f"{k}: Adam state not carried over"
        assert [g["lr"] for g in o.param_groups] == [3e-4]


def test_q_estimate_is_the_min_over_the_ensemble():
    agent = diverse_agent()
    b = batch_with_ends()
    q = all_q(agent.critic, b["observations"], b["actions"]).detach()
    assert (q.max(0).values - q.min(0).values).mean() > 0.5
    torch.testing.assert_close(edac.q_estimate(agent.critic, b["observations"], b["actions"]), q.min(0).values)


def test_defaults_are_the_documented_ones():
    """edac_sacn.md section 4 (CORL configs, EDAC README): a default off by a few percent fails here."""
    a = edac.Args()
    assert (a.gamma, a.tau, a.batch_size, a.actor_lr, a.critic_lr, a.alpha_lr, a.eta, a.n_critics) == \
        (0.99, 0.005, 256, 3e-4, 3e-4, 3e-4, 1.0, 10)
    assert (a.offline_steps, a.online_steps, a.online_mode, a.preset) == (3_000_000, 100_000, "original", "edac")
    expected = {  # (preset, env id) -> (N, eta, offline steps, actor lr, alpha lr, reward standardised)
        ("edac", "hopper-medium"): (50, 1.0, 3_000_000, 3e-4, 3e-4, False),
        ("edac", "halfcheetah-medium-expert"): (10, 5.0, 3_000_000, 3e-4, 3e-4, False),
        ("edac", "walker2d-medium-expert"): (10, 5.0, 3_000_000, 3e-4, 3e-4, False),
        ("edac", "pen-human"): (20, 1000.0, 200_000, 3e-5, 3e-5, True),
        ("corl", "pen-human"): (20, 1000.0, 3_000_000, 3e-4, 3e-4, False),
        ("edac", "pen-cloned"): (20, 10.0, 3_000_000, 3e-4, 3e-4, False),
        ("edac", "pen-expert"): (20, 10.0, 3_000_000, 3e-4, 3e-4, False),
        ("edac", "door-human"): (50, 200.0, 3_000_000, 3e-4, 3e-4, False),
        ("edac", "door-cloned"): (50, 200.0, 3_000_000, 3e-4, 3e-4, False),
        ("edac", "door-expert"): (50, 200.0, 3_000_000, 3e-4, 3e-4, False),
    }
    for (preset, env_id), values in expected.items():
        p = edac.parse_args(["--env-id", env_id, "--preset", preset])
        got = (p.n_critics, p.eta, p.offline_steps, p.actor_lr, p.alpha_lr, p.normalize_reward)
        assert got == values, f"{preset} {env_id}: {got} != documented {values}"


# ---------------------------------------------------------------- what main wires together
@pytest.fixture(scope="module")
def hopper_tiny(tmp_path_factory):
    """300 random steps of Hopper-v4 in D4RL's layout, time-outs every 30 steps."""
    return write_hopper_d4rl(tmp_path_factory.mktemp("edacdata") / "hopper.hdf5", steps=300, limit=30)


def test_main_stores_scalar_standardised_rewards_and_time_outs(tmp_path, hopper_tiny, monkeypatch):
    """With --normalize-reward the online phase runs (it crashed at its first step), online rewards go in
    standardised with the dataset's moments, time-outs are stored as truncated, and the diagnostics use q_estimate."""
    monkeypatch.setitem(edac.EPISODE_LIMITS, "hopper", 10)
    added, q_calls = [], []
    real_add, real_q = edac.ReplayBuffer.add, edac.q_estimate

    def add(self, obs, action, reward, next_obs, terminated, truncated):
        added.append((reward, terminated, truncated))
        real_add(self, obs, action, reward, next_obs, terminated, truncated)

    monkeypatch.setattr(edac.ReplayBuffer, "add", add)
    monkeypatch.setattr(edac, "q_estimate", lambda *a: q_calls.append(1) or real_q(*a))
    raw, made = [], []
    real_make_env = edac.make_env

    class Recorded(edac.gym.Wrapper):
        def step(self, action):
            out = self.env.step(action)
            raw.append(float(out[1]))
            return out

    def make_env(task, extend_steps=0):  # main makes the training env first, then the evaluation env
        made.append(extend_steps)
        env = real_make_env(task, extend_steps)
        return Recorded(env) if len(made) == 1 else env

    monkeypatch.setattr(edac, "make_env", make_env)
    args = edac.Args(env_id="hopper-medium", dataset=str(hopper_tiny), device="cpu", output_dir=str(tmp_path),
                     n_critics=2, batch_size=8, offline_steps=2, offline_eval_every=2, online_steps=30,
                     eval_every=1000, eval_episodes=1, q_diag_extend_steps=0, checkpoint_every=1000, log_every=1000,
                     normalize_reward=True)
    edac.main(args)
    assert len(added) == 30 and q_calls
    data = edac.load_d4rl_file(hopper_tiny)["rewards"].astype(np.float64)
    assert all(np.ndim(r) == 0 for r, _, _ in added), "online rewards must stay scalars"
    stored = np.asarray([r for r, _, _ in added], dtype=np.float64)
    np.testing.assert_allclose(stored, (np.asarray(raw) - data.mean()) / data.std(), rtol=1e-4, atol=1e-4,
                               err_msg="online rewards must be standardised with the dataset's moments")
    assert any(tr and not te for _, te, tr in added), "time-outs must be stored as truncated, not terminal"


def test_each_optimiser_takes_its_own_learning_rate():
    agent = diverse_agent()
    _, _, optims = edac.make_update_fns(agent, edac.Args(n_critics=N, actor_lr=1e-4, critic_lr=2e-4, alpha_lr=3e-5),
                                        -float(ACT))
    lrs = {k: [g["lr"] for g in o.param_groups] for k, o in optims.items()}
    assert lrs == {"actor_optim": [1e-4], "critic_optim": [2e-4], "alpha_optim": [3e-5]}, lrs
    assert optims["alpha_optim"].param_groups[0]["params"] == [agent.log_alpha]
