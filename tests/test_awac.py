"""awac.py: the advantage weights (batch softmax and clipped exp), the advantage and the update against direct
computations; rlkit's init; presets; an end-to-end run; and a resume that ends bit-identical to an uninterrupted
run."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import load_algo, run_killed
from test_end_to_end import check_outputs, final_params, hopper_file, read_rows, same_rows

awac = load_algo("awac")
_ = hopper_file  # the module-scoped fixture, imported for the tests below


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: faster on a shared CPU, and the resume test needs a fixed reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_agent(obs_dim=5, act_dim=2, hidden=16):
    torch.manual_seed(0)
    agent = awac.Agent(awac.GaussianActor(obs_dim, act_dim, hidden, 3, -6.0, 0.0, sigmoid_log_std=True),
                       awac.TwinQ(obs_dim, act_dim, hidden), awac.TwinQ(obs_dim, act_dim, hidden))
    with torch.no_grad():  # non-trivial targets and log-stds
        for p in agent.critic_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
        agent.actor.log_std.copy_(torch.tensor([-1.0, 0.5]))
    return agent


def make_batch(b=8, obs_dim=5, act_dim=2):
    g = torch.Generator().manual_seed(1)
    return {"observations": torch.randn(b, obs_dim, generator=g),
            "actions": torch.rand(b, act_dim, generator=g) * 2 - 1, "rewards": torch.randn(b, generator=g),
            "next_observations": torch.randn(b, obs_dim, generator=g),
            "terminated": (torch.rand(b, generator=g) < 0.3).float(), "truncated": torch.zeros(b)}


# ---- the method's terms against direct computations

def test_softmax_weights_match_direct():
    adv = torch.tensor([-3.0, -0.5, 0.0, 0.4, 2.0, 30.0], dtype=torch.float64)
    for beta in (0.5, 2.0):
        e = np.exp(adv.numpy() / beta - (adv.numpy() / beta).max())
        direct = len(e) * e / e.sum()
        w = awac.awac_weights(adv, beta, "softmax", 100.0)
        np.testing.assert_allclose(w.numpy(), direct, rtol=1e-12)
        assert w.mean().item() == pytest.approx(1.0)  # B softmax: mean 1, and no clip (30 / 0.5 gives ~6 here)
    big = awac.awac_weights(torch.tensor([0.0, 1000.0]), 1.0, "softmax", 100.0)
    assert torch.isfinite(big).all() and big[1].item() == pytest.approx(2.0)


def test_exp_weights_are_clipped():
    adv = torch.tensor([-3.0, 0.0, 0.3, 1.5, 50.0])
    w = awac.awac_weights(adv, 1 / 3, "exp", 100.0)
    np.testing.assert_allclose(w.numpy(), [min(math.exp(3 * a), 100.0) for a in adv.tolist()], rtol=1e-5)


def test_advantage_matches_direct():
    agent, batch = make_agent(), make_batch()
    obs, actions = batch["observations"], batch["actions"]
    with torch.no_grad():
        mean, log_std = agent.actor(obs)
        q = agent.critic(obs, actions).min(0).values
        v_mean = agent.critic(obs, mean).min(0).values
        torch.testing.assert_close(awac.advantage(agent, obs, actions, True, None, False), q - v_mean)
        torch.testing.assert_close(awac.advantage(agent, obs, actions, True, 0.01, False), (q - v_mean).clamp(max=0.01))
        torch.manual_seed(5)
        a_pi = mean + log_std.exp() * torch.randn(8, 2)
        torch.manual_seed(5)
        torch.testing.assert_close(awac.advantage(agent, obs, actions, False, None, False),
                                   q - agent.critic(obs, a_pi).min(0).values)


def test_update_uses_the_networks_before_the_step():
    """rlkit: weights and target from the networks before this step; Adam with the actor's weight decay."""
    batch = make_batch()
    agent = make_agent()
    old = copy.deepcopy(agent)
    args = awac.Args(beta=0.5, clip_score=0.5, v_from_mean=True, gamma=0.9)
    update, optims = awac.make_update(agent, args)
    assert optims["actor_optim"].param_groups[0]["weight_decay"] == 1e-4
    torch.manual_seed(3)
    out = update(batch)
    obs, actions = batch["observations"], batch["actions"]
    with torch.no_grad():
        adv = (old.critic(obs, actions).min(0).values - old.critic(obs, old.actor(obs)[0]).min(0).values)
        w = torch.softmax(adv.clamp(max=0.5) / 0.5, 0) * 8
        mean, log_std = old.actor(obs)
        log_pi = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
        torch.manual_seed(3)  # the only draw: a' for the target
        next_mean, next_log_std = old.actor(batch["next_observations"])
        a_next = next_mean + next_log_std.exp() * torch.randn(8, 2)
        y = batch["rewards"] + 0.9 * (1 - batch["terminated"]) * old.critic_target(
            batch["next_observations"], a_next).min(0).values
        critic_loss = ((old.critic(obs, actions) - y) ** 2).mean(1).sum()
    torch.testing.assert_close(out["loss/actor"], -(w * log_pi).mean())
    torch.testing.assert_close(out["loss/critic"], critic_loss)


def test_rlkit_init_and_log_std():
    actor = awac.GaussianActor(11, 3, n_layers=4, log_std_min=-6.0, log_std_max=0.0, sigmoid_log_std=True)
    critic = awac.TwinQ(11, 3)
    awac.rlkit_init([*actor.hidden, actor.mu], last_bound=1e-3)
    awac.rlkit_init(list(critic.q.layers), last_bound=3e-3)
    for layer in actor.hidden:
        assert layer.weight.abs().max() <= 1 / 16 and layer.weight.abs().max() > 0.9 / 16 and not layer.bias.any()
    assert actor.mu.weight.abs().max() <= 1e-3 and critic.q.layers[-1].weight.abs().max() <= 3e-3
    assert critic.q.layers[0].weight.abs().max() <= 1 / 16 and not critic.q.layers[0].bias.any()
    _, log_std = actor(torch.zeros(1, 11))
    torch.testing.assert_close(log_std, torch.full((1, 3), -3.0))  # sigmoid(0) in [-6, 0]


def test_presets_and_dataset_defaults():
    a = awac.parse_args(["--env-id", "door-human"])
    assert (a.beta, a.clip_score, a.v_from_mean, a.actor_layers, a.offline_steps, a.online_steps) == \
        (0.5, 0.5, True, 2, 25_000, 400_000)
    a = awac.parse_args(["--env-id", "hopper-medium"])
    assert (a.beta, a.weighting, a.batch_size, a.offline_batch_size, a.actor_layers, a.offline_steps) == \
        (2.0, "softmax", 1024, 128, 4, 50_000)
    a = awac.parse_args(["--env-id=pen-human", "--preset=corl"])
    assert (a.weighting, a.beta, a.clip_score, a.v_from_mean, a.actor_layers, a.batch_size, a.normalize_obs,
            a.offline_steps, a.online_steps) == ("exp", 0.1, None, False, 3, 256, True, 1_000_000, 400_000)
    a = awac.parse_args(["--preset", "corl", "--beta", "2"])
    assert (a.beta, a.weighting) == (2.0, "exp")  # explicit flags win
    for table in awac.PRESETS.values():
        for key, overrides in table.items():
            assert key == "*" or key in awac.TASK_IDS or key in awac.MUJOCO_FAMILIES + awac.ADROIT_FAMILIES, key
            assert set(overrides) <= {f.name for f in awac.dataclasses.fields(awac.Args)}


# ---- end to end

def awac_args(tmp, data, **kw):
    base = dict(env_id="hopper-medium", dataset=str(data), device="cpu", threads=1, output_dir=str(tmp),
                batch_size=32, offline_batch_size=16, offline_steps=40, offline_eval_every=20, online_steps=200,
                warmup_steps=50, eval_every=100, eval_episodes=1, q_diag_extend_steps=5, checkpoint_every=20,
                log_every=20)
    base.update(kw)
    return awac.Args(**base)


def record_q_estimates(monkeypatch, module):
    """Wrap `evaluate` to keep Q_est, as main wires it, on fixed probe pairs at every evaluation."""
    probe = (torch.randn(5, 11, generator=torch.Generator().manual_seed(0)),
             torch.rand(5, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    seen, real = [], module.evaluate

    def evaluate(env, actor, q_fn, *rest):
        seen.append(q_fn(*probe).detach().clone())
        return real(env, actor, q_fn, *rest)

    monkeypatch.setattr(module, "evaluate", evaluate)
    return probe, seen


def test_awac_end_to_end(tmp_path, hopper_file, monkeypatch):
    probe, seen = record_q_estimates(monkeypatch, awac)
    run_dir = awac.main(awac_args(tmp_path, hopper_file))
    check_outputs(run_dir, "awac")
    rows = read_rows(run_dir)
    assert [r["grad_step"] for r in rows if r["phase"] == "offline"] == [20, 40]
    online = [r for r in rows if r["phase"] == "online"]
    assert [r["env_step"] for r in online] == [0, 100, 200]
    assert online[-1]["grad_step"] == 40 + 200 - 50, "one update per env step after the warm-up"
    assert (run_dir / "offline.pt").is_file()
    # design/q_diagnostics.md: Q_est = min(Q1, Q2) of the online critics (the last evaluation sees the final ones)
    agent = torch.load(run_dir / "checkpoint.pt", weights_only=False)["agent"]
    critic, target = awac.TwinQ(11, 3), awac.TwinQ(11, 3)
    critic.load_state_dict(agent["critic"])
    target.load_state_dict(agent["critic_target"])
    with torch.no_grad():
        q, q_t = critic(*probe), target(*probe)
    assert not torch.allclose(torch.minimum(q[0], q[1]), torch.minimum(q_t[0], q_t[1]))
    torch.testing.assert_close(seen[-1], torch.minimum(q[0], q[1]),
                               msg="evaluation's Q_est must be min(Q1, Q2) of the online critics")


def test_corl_preset_from_offline_checkpoint(tmp_path, hopper_file, monkeypatch):
    a = awac.parse_args(["--preset", "corl"])
    kw = {k: getattr(a, k) for k in ("weighting", "beta", "actor_layers", "critic_layers", "normalize_obs",
                                     "actor_weight_decay", "warmup_steps", "clip_samples")}
    first = awac.main(awac_args(tmp_path / "a", hopper_file, online_steps=0, **kw))
    steps_at_switch, real_online = [], awac.train_online

    def train_online(args, agent, buffer, update, optims, *rest):
        steps_at_switch.extend(float(st["step"]) for o in optims.values() for st in o.state_dict()["state"].values())
        return real_online(args, agent, buffer, update, optims, *rest)

    monkeypatch.setattr(awac, "train_online", train_online)
    run_dir = awac.main(awac_args(tmp_path / "b", hopper_file, offline_checkpoint=str(first / "offline.pt"),
                                  online_steps=60, eval_every=50, **kw))
    assert steps_at_switch and set(steps_at_switch) == {40.0}, \
        "fine-tuning from offline.pt continues the offline Adam states (40 steps), it does not start fresh ones"
    rows = read_rows(run_dir)
    assert {r["phase"] for r in rows} == {"online"} and rows[-1]["grad_step"] == 60  # no warm-up
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert not torch.allclose(ckpt["agent"]["critic"]["norm.std"], torch.ones(11))  # the dataset's moments
    assert "hidden.2.weight" in ckpt["agent"]["actor"] and "q.layers.3.weight" in ckpt["agent"]["critic"]


def test_awac_resume_matches_uninterrupted(tmp_path, hopper_file):
    full = awac.main(awac_args(tmp_path / "full", hopper_file))
    # the first checkpoint is offline (grad step 20), the second online
    killed = run_killed(awac, awac_args(tmp_path / "killed", hopper_file), 2)
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["phase"] == "online"
    resumed = awac.main(awac.Args(resume=str(killed)))
    a, b = final_params(full), final_params(resumed)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    same_rows(full, resumed)
