"""edac.py: the diversity term and the critic loss against direct computations, the offline update against so2.py's,
the online modes (loose drops the diversity term, original keeps it), per-dataset defaults and presets, an end-to-end
run on a tiny Hopper dataset, starting from offline.pt, and a bit-exact resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import load_algo, run_killed, write_hopper_d4rl

edac = load_algo("edac")
so2 = load_algo("so2")
torch.set_num_threads(1)  # tiny networks: one thread is far faster than two on a busy machine

EVAL_KEYS = ("phase", "env_step", "grad_step", "return_mean", "return_std", "normalized_score",
             "q_normalized_difference", "q_kendall_tau", "wall_time")


# ---------------------------------------------------------------- helpers
def member_q(critic, obs, act, i):
    """Q_i(s, a) of member i with plain matmuls over its slice of the stacked weights: [B]."""
    h = torch.cat([obs, act], dim=-1)
    for k, layer in enumerate(critic.layers):
        h = h @ layer.weight[i] + layer.bias[i, 0]
        if k < len(critic.layers) - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


def direct_diversity(critic, obs, actions):
    """(1/(N-1)) mean_b sum_{i != j} cos(grad_a Q_i, grad_a Q_j), one autograd call per member, one pair at a time."""
    n = critic.n_critics
    grads = []
    for i in range(n):
        a = actions.detach().clone().requires_grad_(True)
        grads.append(torch.autograd.grad(member_q(critic, obs, a, i).sum(), a, create_graph=True)[0])  # [B, A]
    total = torch.zeros(obs.shape[0])
    for i in range(n):
        for j in range(n):
            if i != j:
                total = total + (grads[i] * grads[j]).sum(-1) / (grads[i].norm(dim=-1) * grads[j].norm(dim=-1))
    return total.mean() / (n - 1)


def direct_td(critic, obs, actions, y):
    """sum_i mean_b (Q_i(s, a) - y)^2."""
    return sum(((member_q(critic, obs, actions, i) - y) ** 2).mean() for i in range(critic.n_critics))


def make_batch(b=16, obs_dim=3, act_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randn(b, obs_dim, generator=g),
            "actions": torch.rand(b, act_dim, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g),
            "next_observations": torch.randn(b, obs_dim, generator=g),
            "terminated": (torch.rand(b, generator=g) < 0.3).float(),
            "truncated": torch.zeros(b)}


def make_agent(module, n=3, obs_dim=3, act_dim=2, seed=0):
    torch.manual_seed(seed)
    actor = module.TanhGaussianActor(obs_dim, act_dim, hidden=32)
    critic = module.VectorizedCritic(obs_dim, act_dim, n, hidden=32)
    with torch.no_grad():  # larger last layers, so that Q and its action gradients are not all ~0
        critic.layers[-1].weight.normal_(0, 0.3)
    target = copy.deepcopy(critic)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.Agent(actor, critic, target, torch.zeros((), requires_grad=True))


# ---------------------------------------------------------------- critic loss
def test_diversity_term_matches_pairwise_cosines():
    agent = make_agent(edac, n=4)
    b = make_batch()
    obs, actions, y = b["observations"], b["actions"], torch.zeros(16)
    with_div, q = edac.edac_critic_loss(agent.critic, obs, actions, y, 1.0)
    td_only, _ = edac.edac_critic_loss(agent.critic, obs, actions, y, 0.0)
    div = with_div - td_only
    expected = direct_diversity(agent.critic, obs, actions)
    torch.testing.assert_close(div, expected, atol=1e-5, rtol=1e-5)
    assert 1e-3 < abs(expected.item()) < 4 - 1e-3  # neither 0 nor N (identical members)
    torch.testing.assert_close(q, torch.stack([member_q(agent.critic, obs, actions, i) for i in range(4)]))
    # The same gradient in the critic weights (the term is differentiated through grad_a Q).
    def grads():
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in agent.critic.parameters()]

    agent.critic.zero_grad(set_to_none=True)
    div.backward()
    got = grads()
    agent.critic.zero_grad(set_to_none=True)
    expected.backward()
    for g, e in zip(got, grads()):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    assert got[0].abs().sum() > 0


def test_td_term_sums_members_and_eta_scales_diversity():
    agent = make_agent(edac, n=3)
    b = make_batch(seed=1)
    y = torch.randn(16)
    loss, _ = edac.edac_critic_loss(agent.critic, b["observations"], b["actions"], y, 0.0)
    td = direct_td(agent.critic, b["observations"], b["actions"], y)
    torch.testing.assert_close(loss, td, atol=1e-5, rtol=1e-5)
    loss7, _ = edac.edac_critic_loss(agent.critic, b["observations"], b["actions"], y, 7.0)
    div = direct_diversity(agent.critic, b["observations"], b["actions"])
    torch.testing.assert_close(loss7, td + 7.0 * div, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- updates
@pytest.mark.parametrize("eta", [0.0, 2.0])
def test_offline_update_is_so2s(eta):
    """edac.py's offline step is so2.py's EDAC step: the same numbers, bit for bit, over several steps."""
    a_edac, a_so2 = make_agent(edac), make_agent(so2)
    for m in ("actor", "critic", "critic_target"):
        getattr(a_so2, m).load_state_dict(getattr(a_edac, m).state_dict())
    update, _, _ = edac.make_update_fns(a_edac, edac.Args(eta=eta, n_critics=3), target_entropy=-2.0)
    reference, _ = so2.make_offline_update(a_so2, so2.Args(eta=eta, n_critics=3), target_entropy=-2.0)
    for step in range(3):
        batch = make_batch(seed=step)
        torch.manual_seed(10 + step)
        out = update(batch)
        torch.manual_seed(10 + step)
        ref = reference(batch)
        assert out.keys() == ref.keys()
        for k in out:
            assert torch.equal(out[k], ref[k]), k
    for m in ("actor", "critic", "critic_target"):
        for p, r in zip(getattr(a_edac, m).parameters(), getattr(a_so2, m).parameters()):
            assert torch.equal(p, r), m
    assert torch.equal(a_edac.log_alpha, a_so2.log_alpha)


def recompute_critic_loss(agent, batch, seed, target_entropy=-2.0, alpha_lr=3e-4, gamma=0.99):
    """TD part of the first update's critic loss from a copy of the agent, with the same random draws: the
    temperature step, the actor step (it changes the target's next action), then the target."""
    agent = copy.deepcopy(agent)
    torch.manual_seed(seed)
    action, log_pi = agent.actor(batch["observations"])
    alpha_optim = torch.optim.Adam([agent.log_alpha], lr=alpha_lr)
    (-(agent.log_alpha * (log_pi.detach() + target_entropy)).mean()).backward()
    alpha_optim.step()
    alpha = agent.log_alpha.detach().exp()
    actor_optim = torch.optim.Adam(agent.actor.parameters(), lr=3e-4)
    q_pi = torch.stack([member_q(agent.critic, batch["observations"], action, i) for i in range(3)]).min(0).values
    (alpha * log_pi - q_pi).mean().backward()
    actor_optim.step()
    with torch.no_grad():
        next_action, next_log_pi = agent.actor(batch["next_observations"])
        q_next = torch.stack([member_q(agent.critic_target, batch["next_observations"], next_action, i)
                              for i in range(3)]).min(0).values
        y = batch["rewards"] + gamma * (1 - batch["terminated"]) * (q_next - alpha * next_log_pi)
        return direct_td(agent.critic, batch["observations"], batch["actions"], y)


@pytest.mark.parametrize("mode", ["original", "loose"])
def test_online_mode(mode):
    """Online, loose drops the diversity term (eta 0, SAC-N) and original keeps it; offline both have it; the
    temperature keeps being tuned online."""
    eta = 5.0
    agent = make_agent(edac)
    _, online_update, optims = edac.make_update_fns(agent, edac.Args(eta=eta, n_critics=3, online_mode=mode), -2.0)
    assert set(optims) == {"actor_optim", "critic_optim", "alpha_optim"}
    batch = make_batch(seed=3)
    div = direct_diversity(agent.critic, batch["observations"], batch["actions"]).detach()
    assert abs(div.item()) > 1e-3
    td = recompute_critic_loss(agent, batch, seed=4)
    before = copy.deepcopy(agent)
    torch.manual_seed(4)
    out = online_update(batch)
    expected = td + (eta * div if mode == "original" else 0.0)
    torch.testing.assert_close(out["loss/critic"], expected, atol=1e-4, rtol=1e-5)
    assert agent.log_alpha.item() != before.log_alpha.item()
    # The offline update keeps the term in both modes.
    offline_update, _, _ = edac.make_update_fns(before, edac.Args(eta=eta, n_critics=3, online_mode=mode), -2.0)
    torch.manual_seed(4)
    offline_out = offline_update(batch)
    torch.testing.assert_close(offline_out["loss/critic"], td + eta * div, atol=1e-4, rtol=1e-5)


def test_online_loose_never_computes_action_gradients(monkeypatch):
    """In the loose mode the online update calls the critic loss with eta 0 only: no double backward."""
    seen = []
    real = edac.edac_critic_loss
    monkeypatch.setattr(edac, "edac_critic_loss", lambda *a: seen.append(a[-1]) or real(*a))
    agent = make_agent(edac)
    offline_update, online_update, _ = edac.make_update_fns(agent, edac.Args(eta=3.0, n_critics=3,
                                                                             online_mode="loose"), -2.0)
    online_update(make_batch())
    assert seen == [0.0]
    offline_update(make_batch())
    assert seen == [0.0, 3.0]


# ---------------------------------------------------------------- defaults
def test_dataset_defaults_and_presets():
    a = edac.parse_args(["--env-id", "pen-human"])
    assert (a.n_critics, a.eta, a.offline_steps, a.actor_lr, a.normalize_reward, a.online_steps) == \
        (20, 1000.0, 200_000, 3e-5, True, 400_000)
    c = edac.parse_args(["--preset=corl", "--env-id=pen-human"])
    assert (c.preset, c.n_critics, c.eta, c.offline_steps, c.actor_lr, c.normalize_reward) == \
        ("corl", 20, 1000.0, 3_000_000, 3e-4, False)
    assert edac.parse_args(["--env-id", "pen-human", "--preset", "corl", "--actor-lr", "1e-4"]).actor_lr == 1e-4
    h = edac.parse_args(["--env-id", "hopper-medium-expert", "--preset", "corl"])
    assert (h.n_critics, h.eta, h.offline_steps) == (50, 1.0, 3_000_000)
    assert edac.parse_args(["--env-id", "walker2d-medium-expert"]).eta == 5.0
    d = edac.parse_args(["--env-id", "door-human"])
    assert (d.n_critics, d.eta, d.online_steps) == (50, 200.0, 400_000)
    fields = {f.name for f in edac.dataclasses.fields(edac.Args)}
    for name in edac.PRESETS:  # every table is a --preset choice
        assert edac.parse_args(["--preset", name]).preset == name
    for preset in edac.PRESETS.values():
        for key, overrides in preset.items():
            assert key in edac.TASK_IDS or key in edac.MUJOCO_FAMILIES + edac.ADROIT_FAMILIES, key
            assert set(overrides) <= fields


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    """600 steps of random actions in Hopper-v4 in D4RL's layout, episodes cut at 100 steps by time-outs."""
    return write_hopper_d4rl(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5", steps=600, limit=100)


def edac_args(tmp, data, **kw):
    base = dict(env_id="hopper-medium", dataset=str(data), device="cpu", threads=1, output_dir=str(tmp), n_critics=3,
                eta=1.0, batch_size=16, offline_steps=30, offline_eval_every=15, online_steps=150, eval_every=60,
                eval_episodes=1, q_diag_extend_steps=5, checkpoint_every=15, log_every=15)
    base.update(kw)
    return edac.Args(**base)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, hopper_file):
    """One uninterrupted run, shared by the output checks and the resume tests."""
    return edac.main(edac_args(tmp_path_factory.mktemp("full"), hopper_file))


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def test_end_to_end(full_run):
    run_dir = full_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == "edac" and config["eval_env_id"] == "Hopper-v4" and len(config["dataset_sha256"]) == 64
    assert config["args"]["online_mode"] == "original"
    rows = read_rows(run_dir)
    for row in rows:
        for key in EVAL_KEYS:
            assert key in row and (key == "phase" or math.isfinite(row[key])), (key, row)
    assert [r["grad_step"] for r in rows if r["phase"] == "offline"] == [15, 30]
    online = [r for r in rows if r["phase"] == "online"]
    assert [r["env_step"] for r in online] == [0, 60, 120, 150]
    assert [r["grad_step"] for r in online] == [30, 90, 150, 180]  # one update per env step, no warm-up
    assert list(run_dir.glob("events.out.tfevents.*"))
    offline = torch.load(run_dir / "offline.pt", weights_only=False)
    assert offline["n_critics"] == 3 and set(offline["optims"]) == {"actor_optim", "critic_optim", "alpha_optim"}
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert final["phase"] == "done" and final["buffer"]["n_added"] == 150
    assert final["agent"]["log_alpha"].item() != offline["agent"]["log_alpha"].item()  # still tuned online


def test_from_offline_checkpoint(tmp_path, hopper_file):
    first = edac.main(edac_args(tmp_path / "a", hopper_file, online_steps=0))
    run_dir = edac.main(edac_args(tmp_path / "b", hopper_file, offline_checkpoint=str(first / "offline.pt"),
                                  online_mode="loose", online_steps=60, eval_every=30))
    rows = read_rows(run_dir)
    assert {r["phase"] for r in rows} == {"online"} and rows[-1]["grad_step"] == 60
    with pytest.raises(edac.RunError, match="--n-critics 3"):
        edac.main(edac_args(tmp_path / "c", hopper_file, offline_checkpoint=str(first / "offline.pt"), n_critics=2))
    # so2.py's offline.pt (EDAC too, no optimiser states) also serves.
    so2_dir = so2.main(so2.Args(env_id="hopper-medium", dataset=str(hopper_file), device="cpu", threads=1,
                                output_dir=str(tmp_path / "so2"), n_critics=3, batch_size=16, offline_steps=20,
                                offline_eval_every=20, online_steps=0, eval_episodes=1, q_diag_extend_steps=5))
    run_dir = edac.main(edac_args(tmp_path / "d", hopper_file, offline_checkpoint=str(so2_dir / "offline.pt"),
                                  online_steps=30, eval_every=30))
    assert read_rows(run_dir)[-1]["grad_step"] == 30


@pytest.mark.parametrize("kill_at", [1, 3])  # 1: in the offline phase; 3: in the online phase
def test_resume_matches_uninterrupted(tmp_path, hopper_file, full_run, kill_at):
    full = full_run
    killed = run_killed(edac, edac_args(tmp_path / "killed", hopper_file), kill_at)
    phase = torch.load(killed / "checkpoint.pt", weights_only=False)["phase"]
    assert phase == ("offline" if kill_at == 1 else "online")
    resumed = edac.main(edac.Args(resume=str(killed)))
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    for module in ("actor", "critic", "critic_target"):
        for k, v in a["agent"][module].items():
            assert torch.equal(v, b["agent"][module][k]), (module, k)
    assert torch.equal(a["agent"]["log_alpha"], b["agent"]["log_alpha"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(read_rows(full)) == strip(read_rows(resumed))
