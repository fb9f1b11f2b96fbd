"""td3bc_ft.py: lambda and the actor loss against direct computations, the loose mode's TD3 actor loss (no BC), the
critic step with target policy smoothing, the exploration noise of `act`, the observation statistics inside the
networks, an end-to-end run on a tiny Hopper dataset (delayed actor steps counted), starting from offline.pt with and
without fresh optimiser states, and a bit-exact resume; in that run, the Q diagnostics' Q1, the buffer (dataset kept
under the online data) and the observation statistics. test_td3bc_losses.py checks the pieces one by one."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from conftest import load_algo, run_killed, write_hopper_d4rl

td3bc = load_algo("td3bc_ft")
torch.set_num_threads(1)  # tiny networks: one thread is far faster than two on a busy machine

EVAL_KEYS = ("phase", "env_step", "grad_step", "return_mean", "return_std", "normalized_score",
             "q_normalized_difference", "q_kendall_tau", "wall_time")
OBS_DIM, ACT_DIM = 4, 2


# ---------------------------------------------------------------- helpers
def member_q(critic, obs, act, i):
    """Q_i(s, a) from the stacked weights with plain matmuls, on the standardised observation: [B]."""
    h = torch.cat([(obs - critic.obs_mean) / critic.obs_std, act], dim=-1)
    for k, layer in enumerate(critic.layers):
        h = h @ layer.weight[i] + layer.bias[i, 0]
        if k < len(critic.layers) - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


def direct_pi(actor, obs):
    """tanh(W3 relu(W2 relu(W1 s~ + b1) + b2) + b3), s~ the standardised observation."""
    l1, l2, l3 = (m for m in actor.net if isinstance(m, torch.nn.Linear))
    h = (obs - actor.obs_mean) / actor.obs_std
    h = torch.relu(h @ l1.weight.T + l1.bias)
    h = torch.relu(h @ l2.weight.T + l2.bias)
    return torch.tanh(h @ l3.weight.T + l3.bias)


def make_agent(seed=0, expl_noise=0.1):
    torch.manual_seed(seed)
    mean, std = torch.randn(OBS_DIM), torch.rand(OBS_DIM) + 0.5
    actor = td3bc.DeterministicActor(OBS_DIM, ACT_DIM, mean, std, expl_noise, hidden=32)
    critic = td3bc.TwinCritic(OBS_DIM, ACT_DIM, mean, std)
    agent = td3bc.Agent(actor, copy.deepcopy(actor), critic, copy.deepcopy(critic))
    with torch.no_grad():  # targets that differ from the online networks, so that Polyak moves them visibly
        for p in list(agent.actor_target.parameters()) + list(agent.critic_target.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    optims = {"actor_optim": torch.optim.Adam(actor.parameters(), lr=3e-4),
              "critic_optim": torch.optim.Adam(critic.parameters(), lr=3e-4)}
    return agent, optims


def make_batch(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randn(b, OBS_DIM, generator=g) * 3,
            "actions": torch.rand(b, ACT_DIM, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g),
            "next_observations": torch.randn(b, OBS_DIM, generator=g) * 3,
            "terminated": (torch.rand(b, generator=g) < 0.3).float(),
            "truncated": torch.zeros(b)}


def grads(module):
    return [p.grad.clone() for p in module.parameters()]


def same(actual, expected, msg, rtol=0.0):
    """np.testing's comparison with `msg` on the first line, where pytest's failure summary shows it."""
    try:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0)
    except AssertionError as e:
        raise AssertionError(f"{msg}\n{e}") from None


# ---------------------------------------------------------------- losses
def test_lambda_and_actor_loss_match_direct_computation():
    torch.manual_seed(1)
    b, alpha = 8, 2.5
    q1 = (torch.randn(b) * 40 + 10).requires_grad_(True)
    pi = (torch.rand(b, ACT_DIM) * 2 - 1).requires_grad_(True)
    actions = torch.rand(b, ACT_DIM) * 2 - 1
    loss, lmbda = td3bc.td3bc_actor_loss(q1, pi, actions, alpha)
    lam = alpha / (sum(abs(q1[i].item()) for i in range(b)) / b)
    bc = sum((pi[i, j].item() - actions[i, j].item()) ** 2 for i in range(b) for j in range(ACT_DIM)) / (b * ACT_DIM)
    assert lmbda.item() == pytest.approx(lam, rel=1e-6) and not lmbda.requires_grad
    assert loss.item() == pytest.approx(-lam * q1.mean().item() + bc, rel=1e-5)
    loss.backward()
    # lambda is a constant: dL/dQ1_i = -lambda / B for every i, dL/dpi = 2 (pi - a) / (B |A|).
    torch.testing.assert_close(q1.grad, torch.full((b,), -lam / b))
    torch.testing.assert_close(pi.grad, 2 * (pi - actions).detach() / (b * ACT_DIM))


@pytest.mark.parametrize("bc", [True, False])
def test_actor_step(bc):
    """TD3+BC's actor step (bc) and TD3's (loose: -mean Q1, no BC, no lambda) against the direct formula, with the
    Polyak update of both targets after it."""
    agent, optims = make_agent()
    ref = copy.deepcopy(agent)
    _, update_actor = td3bc.make_update_fns(agent, optims, td3bc.Args(), bc=bc)
    batch = make_batch()
    out = update_actor(batch)
    obs = batch["observations"]
    pi = direct_pi(ref.actor, obs)
    q1 = member_q(ref.critic, obs, pi, 0)
    if bc:
        lam = 2.5 / q1.abs().mean().item()
        expected = -lam * q1.mean() + ((pi - batch["actions"]) ** 2).mean()
        assert out["lambda"].item() == pytest.approx(lam, rel=1e-5)
        assert out["loss/bc"].item() == pytest.approx(((pi - batch["actions"]) ** 2).mean().item(), rel=1e-5)
    else:
        expected = -q1.mean()
        assert set(out) == {"loss/actor"}
    torch.testing.assert_close(out["loss/actor"], expected.detach(), atol=1e-5, rtol=1e-5)
    expected.backward()
    for g, e in zip(grads(agent.actor), grads(ref.actor)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in agent.critic.parameters())  # detach=True: no critic weight gradients
    for target, source, target0 in ((agent.actor_target, agent.actor, ref.actor_target),
                                    (agent.critic_target, agent.critic, ref.critic_target)):
        for t, s, t0 in zip(target.parameters(), source.parameters(), target0.parameters()):
            torch.testing.assert_close(t, t0 + 0.005 * (s - t0), atol=1e-7, rtol=1e-6)
    for p, p0 in zip(agent.critic.parameters(), ref.critic.parameters()):
        assert torch.equal(p, p0)


def test_loose_actor_step_never_uses_the_bc_loss(monkeypatch):
    def refuse(*_):
        raise AssertionError("td3bc_actor_loss called")

    monkeypatch.setattr(td3bc, "td3bc_actor_loss", refuse)
    agent, optims = make_agent()
    _, loose = td3bc.make_update_fns(agent, optims, td3bc.Args(), bc=False)
    loose(make_batch())
    _, original = td3bc.make_update_fns(agent, optims, td3bc.Args(), bc=True)
    with pytest.raises(AssertionError, match="td3bc_actor_loss called"):
        original(make_batch())


def test_critic_step_with_target_policy_smoothing():
    agent, optims = make_agent(seed=2)
    ref = copy.deepcopy(agent)
    args = td3bc.Args(gamma=0.9, target_noise=0.4, target_noise_clip=0.3)
    update_critic, _ = td3bc.make_update_fns(agent, optims, args, bc=True)
    batch = make_batch(b=64, seed=2)
    torch.manual_seed(5)
    out = update_critic(batch)
    torch.manual_seed(5)
    with torch.no_grad():
        pi_next = direct_pi(ref.actor_target, batch["next_observations"])
        eps = torch.randn(pi_next.shape) * 0.4
        assert (eps.abs() > 0.3).any() and (eps.abs() < 0.3).any()  # both clipped and unclipped noise occur
        a_next = (pi_next + eps.clamp(-0.3, 0.3)).clamp(-1, 1)
        q_next = torch.minimum(member_q(ref.critic_target, batch["next_observations"], a_next, 0),
                               member_q(ref.critic_target, batch["next_observations"], a_next, 1))
        y = batch["rewards"] + 0.9 * (1 - batch["terminated"]) * q_next
        q1 = member_q(ref.critic, batch["observations"], batch["actions"], 0)
        q2 = member_q(ref.critic, batch["observations"], batch["actions"], 1)
        expected = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    torch.testing.assert_close(out["loss/critic"], expected, atol=1e-5, rtol=1e-5)
    # The critic moved; the targets and the actor wait for the actor step.
    assert any(not torch.equal(p, p0) for p, p0 in zip(agent.critic.parameters(), ref.critic.parameters()))
    for m in ("actor", "actor_target", "critic_target"):
        for p, p0 in zip(getattr(agent, m).parameters(), getattr(ref, m).parameters()):
            assert torch.equal(p, p0), m


# ---------------------------------------------------------------- networks
def test_act_and_observation_statistics():
    agent, _ = make_agent(seed=3, expl_noise=0.1)
    actor = agent.actor
    obs = np.random.default_rng(0).normal(size=OBS_DIM).astype(np.float32) * 3
    pi = direct_pi(actor, torch.as_tensor(obs)[None])[0].detach()
    np.testing.assert_allclose(actor.act(obs, deterministic=True), pi.numpy(), atol=1e-6)
    torch.manual_seed(7)
    noisy = actor.act(obs, deterministic=False)
    torch.manual_seed(7)
    expected = (pi + (torch.randn(ACT_DIM) * 0.1).clamp(-0.5, 0.5)).clamp(-1, 1)
    np.testing.assert_allclose(noisy, expected.numpy(), atol=1e-6)
    actor.expl_noise = 100.0  # every draw is clipped to +-0.5, then the action to [-1, 1]
    noisy = np.stack([actor.act(obs, deterministic=False) for _ in range(50)])
    assert np.all(np.abs(noisy) <= 1)
    inside = np.abs(noisy) < 1
    np.testing.assert_allclose(np.abs(noisy - pi.numpy())[inside], 0.5, atol=1e-6)
    # The statistics are buffers of both networks (so checkpoints carry them) and are not trained.
    for net in (agent.actor, agent.critic):
        assert {"obs_mean", "obs_std"} <= set(net.state_dict())
        assert all(p is not net.obs_mean and p is not net.obs_std for p in net.parameters())
    q = agent.critic(torch.as_tensor(obs)[None], torch.zeros(1, ACT_DIM))
    assert q.shape == (2, 1)
    torch.testing.assert_close(q[1], member_q(agent.critic, torch.as_tensor(obs)[None], torch.zeros(1, ACT_DIM), 1))


def test_dataset_defaults():
    for env_id in ("hopper-medium", "halfcheetah-random", "pen-human"):
        a = td3bc.parse_args(["--env-id", env_id])
        assert (a.offline_steps, a.alpha, a.policy_freq) == (1_000_000, 2.5, 2)
    assert td3bc.parse_args(["--env-id", "door-cloned"]).online_steps == 400_000
    assert td3bc.parse_args(["--env-id=hopper-medium", "--offline-steps", "5"]).offline_steps == 5


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    """600 steps of random actions in Hopper-v4 in D4RL's layout, episodes cut at 100 steps by time-outs."""
    return write_hopper_d4rl(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5", steps=600, limit=100)


def td3_args(tmp, data, **kw):
    base = dict(env_id="hopper-medium", dataset=str(data), device="cpu", threads=1, output_dir=str(tmp),
                batch_size=16, offline_steps=30, offline_eval_every=15, online_steps=150, eval_every=60,
                eval_episodes=1, q_diag_extend_steps=5, checkpoint_every=15, log_every=15)
    base.update(kw)
    return td3bc.Args(**base)


def counting(monkeypatch, calls):
    """Wrap make_update_fns so that `calls` records each build's `bc` and how often each function runs."""
    real = td3bc.make_update_fns

    def make(agent, optims, args, bc):
        update_critic, update_actor = real(agent, optims, args, bc=bc)
        calls.append({"bc": bc, "critic": 0, "actor": 0})
        entry = calls[-1]

        def critic(batch):
            entry["critic"] += 1
            return update_critic(batch)

        def actor(batch):
            entry["actor"] += 1
            return update_actor(batch)

        return critic, actor

    monkeypatch.setattr(td3bc, "make_update_fns", make)


def recording(monkeypatch, agents, buffers, q_checks):
    """Record the agent (through make_update_fns, after `counting`), the replay buffer main builds, and at every
    evaluation the Q_est function's values next to Q1, Q2 of the online critic, on fixed inputs (own generator, so
    the run's random numbers are untouched)."""
    real_make, real_eval, real_buffer = td3bc.make_update_fns, td3bc.evaluate, td3bc.ReplayBuffer

    def make(agent, optims, args, bc):
        agents.append(agent)
        return real_make(agent, optims, args, bc=bc)

    class Buffer(real_buffer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            buffers.append(self)

    def evaluate(env, actor, q_fn, *a, **k):
        g = torch.Generator().manual_seed(len(q_checks))
        obs, act = torch.randn(6, 11, generator=g) * 2, torch.rand(6, 3, generator=g) * 2 - 1
        critic = agents[-1].critic
        q_checks.append((q_fn(obs, act).detach(), member_q(critic, obs, act, 0).detach(),
                         member_q(critic, obs, act, 1).detach()))
        return real_eval(env, actor, q_fn, *a, **k)

    monkeypatch.setattr(td3bc, "make_update_fns", make)
    monkeypatch.setattr(td3bc, "evaluate", evaluate)
    monkeypatch.setattr(td3bc, "ReplayBuffer", Buffer)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, hopper_file):
    """One uninterrupted run (original mode), shared by the output checks and the resume tests."""
    calls, seen = [], {"agents": [], "buffers": [], "q": []}
    with pytest.MonkeyPatch.context() as m:
        recording(m, seen["agents"], seen["buffers"], seen["q"])
        counting(m, calls)
        run_dir = td3bc.main(td3_args(tmp_path_factory.mktemp("full"), hopper_file))
    full_run_seen.update(seen)
    return run_dir, calls


full_run_seen: dict = {}


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def test_end_to_end(full_run):
    run_dir, calls = full_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == "td3bc_ft" and config["eval_env_id"] == "Hopper-v4" and len(config["dataset_sha256"]) == 64
    rows = read_rows(run_dir)
    for row in rows:
        for key in EVAL_KEYS:
            assert key in row and (key == "phase" or math.isfinite(row[key])), (key, row)
    assert [r["grad_step"] for r in rows if r["phase"] == "offline"] == [15, 30]
    online = [r for r in rows if r["phase"] == "online"]
    assert [r["env_step"] for r in online] == [0, 60, 120, 150]
    assert [r["grad_step"] for r in online] == [30, 90, 150, 180]  # one critic step per env step
    # Offline with BC, online too (original); the actor steps every policy_freq = 2 critic steps.
    assert calls == [{"bc": True, "critic": 30, "actor": 15}, {"bc": True, "critic": 150, "actor": 75}], \
        f"expected BC in both phases and one actor step per policy_freq = 2 critic steps, got {calls}"
    assert list(run_dir.glob("events.out.tfevents.*"))
    offline = torch.load(run_dir / "offline.pt", weights_only=False)
    assert {"obs_mean", "obs_std"} <= set(offline["agent"]["actor"]) and set(offline["optims"]) == {
        "actor_optim", "critic_optim"}
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert final["phase"] == "done" and final["buffer"]["n_added"] == 150
    # Adam's step count goes on across the switch (no --reset-optimizers).
    assert max(s["step"].item() for s in final["optims"]["critic_optim"]["state"].values()) == 180


def test_from_offline_checkpoint_loose_and_reset(tmp_path, hopper_file, monkeypatch):
    calls = []
    counting(monkeypatch, calls)
    first = td3bc.main(td3_args(tmp_path / "a", hopper_file, online_steps=0, online_mode="loose"))
    assert calls[0]["bc"] is True, "pretraining must always use the BC actor loss, whatever --online-mode says"
    calls.clear()
    run_dir = td3bc.main(td3_args(tmp_path / "b", hopper_file, offline_checkpoint=str(first / "offline.pt"),
                                  online_mode="loose", reset_optimizers=True, online_steps=40, eval_every=20))
    assert calls == [{"bc": False, "critic": 40, "actor": 20}]
    rows = read_rows(run_dir)
    assert {r["phase"] for r in rows} == {"online"} and rows[-1]["grad_step"] == 40
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert max(s["step"].item() for s in final["optims"]["critic_optim"]["state"].values()) == 40
    offline = torch.load(first / "offline.pt", weights_only=False)
    for k in ("obs_mean", "obs_std"):
        assert torch.equal(final["agent"]["critic"][k], offline["agent"]["critic"][k])


def test_diagnostics_use_q1_of_the_online_critic(full_run):
    """q_diagnostics.md: TD3+BC's Q_est is Q1, the critic its actor maximises (not the min, not a target)."""
    checks = full_run_seen["q"]
    assert len(checks) == 6  # 2 offline + 4 online evaluations
    for q_est, q1, q2 in checks:
        assert not torch.allclose(q1, q2)
        torch.testing.assert_close(q_est, q1, msg="Q diagnostics must evaluate Q1 of the online critic")


def test_buffer_holds_dataset_and_online_data_and_statistics(full_run, hopper_file):
    """One buffer: the whole dataset first, room for every online step after it (nothing of the dataset is
    overwritten); observation statistics = the dataset's mean and std + 1e-3, in every network, fixed online."""
    run_dir, _ = full_run
    (buffer,) = full_run_seen["buffers"]
    task = td3bc.resolve_task("hopper-medium", None, str(hopper_file))
    data, _ = td3bc.load_dataset(task, str(hopper_file))
    n = len(data["rewards"])
    assert buffer.capacity == n + 150 and buffer.size == n + 150 and buffer.n_added == 150, \
        "the buffer must hold the dataset plus every online transition"
    same(buffer.storage[:n, buffer.slices["observations"]].numpy(), data["observations"],
         msg="the dataset must stay in the buffer through the online phase")
    same(buffer.storage[:n, buffer.slices["terminated"]].numpy(), data["terminated"], "dataset flags in the buffer")
    mean, std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)["agent"]
    for net in ("actor", "actor_target", "critic", "critic_target"):
        same(final[net]["obs_mean"].numpy(), mean, rtol=1e-6, msg=f"{net}.obs_mean")
        same(final[net]["obs_std"].numpy(), std, rtol=1e-6,
             msg=f"{net}.obs_std must be the dataset's std + 1e-3")
    assert full_run_seen["agents"][-1].actor.expl_noise == 0.1, "online exploration noise must be --expl-noise"


@pytest.mark.parametrize("kill_at", [1, 2])  # 1: in the offline phase; 2: in the online phase
def test_resume_matches_uninterrupted(tmp_path, hopper_file, full_run, kill_at):
    full, _ = full_run
    killed = run_killed(td3bc, td3_args(tmp_path / "killed", hopper_file), kill_at)
    phase = torch.load(killed / "checkpoint.pt", weights_only=False)["phase"]
    assert phase == ("offline" if kill_at == 1 else "online")
    resumed = td3bc.main(td3bc.Args(resume=str(killed)))
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    for module in ("actor", "actor_target", "critic", "critic_target"):
        for k, v in a["agent"][module].items():
            assert torch.equal(v, b["agent"][module][k]), (module, k)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(read_rows(full)) == strip(read_rows(resumed))
