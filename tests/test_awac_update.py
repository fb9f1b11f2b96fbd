"""awac.py's update against a direct computation written out here: the value and the gradient of each loss, the
Adam step each optimiser takes, the Polyak step, for each weighting, V estimate and preset, on tiny batches that hold
terminated and truncated rows; the Q estimate of the diagnostics; the networks main builds; and the documented
defaults (Args, the per-dataset table and the presets) pinned to design/awac.md."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import load_algo

awac = load_algo("awac")
OBS, ACT, B = 4, 2, 12


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_agent(seed=0, hidden=8, scale_q=4.0):
    """Small networks with distinct online and target critics, large enough Q differences that clip_score and the exp
    clip bind, and a wide policy whose samples leave [-1, 1]."""
    torch.manual_seed(seed)
    agent = awac.Agent(awac.GaussianActor(OBS, ACT, hidden, 2, -6.0, 0.0, sigmoid_log_std=True),
                       awac.TwinQ(OBS, ACT, hidden), awac.TwinQ(OBS, ACT, hidden))
    with torch.no_grad():
        for critic in (agent.critic, agent.critic_target):
            for p in critic.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
            critic.q.layers[-1].weight.mul_(scale_q)
            q = critic(*(marked_batch()[k] for k in ("observations", "actions")))
            critic.q.layers[-1].bias[0].sub_((q[0] - q[1]).median())  # each twin is the min on some test rows
        agent.actor.log_std.copy_(torch.tensor([3.0, 1.0]))  # sigma about 0.95 and 0.73
    return agent


def marked_batch(seed=1):
    """Rows 0-2 terminated, rows 3-5 truncated (bootstrap), the rest neither."""
    g = torch.Generator().manual_seed(seed)
    terminated, truncated = torch.zeros(B), torch.zeros(B)
    terminated[:3], truncated[3:6] = 1.0, 1.0
    return {"observations": torch.randn(B, OBS, generator=g), "actions": torch.rand(B, ACT, generator=g) * 2 - 1,
            "rewards": torch.randn(B, generator=g), "next_observations": torch.randn(B, OBS, generator=g),
            "terminated": terminated, "truncated": truncated}


def log_normal(a, mean, log_std):
    """sum_j log N(a_j; mean_j, exp(log_std_j)^2), written out."""
    return (-0.5 * ((a - mean) / torch.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def adam_first_step(p, g, lr, weight_decay=0.0, eps=1e-8):
    """torch's Adam after one step from zero moments: g' = g + wd p, m_hat = g', v_hat = g'^2."""
    g = g + weight_decay * p
    return p - lr * g / (g.abs() + eps)


def direct(old, batch, a, seed):
    """Losses of one AWAC step, from the networks before it (rlkit), with the draws update() makes: eps for the V
    sample (unless V uses the mean), then eps' for the target action."""
    obs, act, nobs = batch["observations"], batch["actions"], batch["next_observations"]
    torch.manual_seed(seed)
    eps_v = None if a.v_from_mean else torch.randn(B, ACT)
    eps_next = torch.randn(B, ACT)
    with torch.no_grad():
        mean, log_std = old.actor(obs)
        a_pi = mean if a.v_from_mean else mean + torch.exp(log_std) * eps_v
        if a.clip_samples and not a.v_from_mean:
            a_pi = a_pi.clamp(-1, 1)
        q_data, q_pi = old.critic(obs, act), old.critic(obs, a_pi)
        for q in (q_data, q_pi, old.critic_target(obs, act)):
            assert (q[0] < q[1]).any() and (q[0] > q[1]).any(), "test setup: one twin is always the min"
        adv = torch.minimum(q_data[0], q_data[1]) - torch.minimum(q_pi[0], q_pi[1])
        if a.clip_score is not None:
            adv = torch.minimum(adv, torch.tensor(a.clip_score))
        if a.weighting == "softmax":
            e = torch.exp((adv - adv.max()) / a.beta)
            w = B * e / e.sum()
        else:
            w = torch.minimum(torch.exp(adv / a.beta), torch.tensor(a.weight_max))
        n_mean, n_log_std = old.actor(nobs)
        a_next = n_mean + torch.exp(n_log_std) * eps_next
        if a.clip_samples:
            a_next = a_next.clamp(-1, 1)
        q_next = old.critic_target(nobs, a_next)
        y = batch["rewards"] + a.gamma * (1 - batch["terminated"]) * torch.minimum(q_next[0], q_next[1])
    q = old.critic(obs, act)
    critic_loss = ((q[0] - y) ** 2).mean() + ((q[1] - y) ** 2).mean()
    mean, log_std = old.actor(obs)
    actor_loss = -(w * log_normal(act, mean, log_std)).mean()
    return {"adv": adv, "w": w, "y": y, "critic_loss": critic_loss, "actor_loss": actor_loss, "a_pi": a_pi,
            "a_next": a_next}


CASES = {
    "rlkit-mujoco": dict(),
    "rlkit-hand": dict(beta=0.5, clip_score=0.5, v_from_mean=True),
    "corl": dict(weighting="exp", beta=1 / 3, clip_samples=True, actor_weight_decay=0.0),
    "corl-clip-binds": dict(weighting="exp", beta=1.0, weight_max=1.5, clip_samples=True),
    "softmax-clip-score-sampled-v": dict(beta=3.0, clip_score=0.2),
}


@pytest.mark.parametrize("case", CASES)
def test_update_vs_direct(case):
    a = awac.Args(**{**dict(gamma=0.9, tau=0.1, actor_lr=1e-3, critic_lr=2e-3, actor_weight_decay=0.01),
                     **CASES[case]})
    agent, batch = tiny_agent(), marked_batch()
    old = copy.deepcopy(agent)
    update, optims = awac.make_update(agent, a)
    torch.manual_seed(7)
    out = update(batch)
    d = direct(old, batch, a, 7)

    # the case exercises what it names
    if a.clip_samples:
        assert (d["a_next"].abs() == 1).any(), "test setup: no target action was clipped"
    if a.clip_score is not None:
        assert (d["adv"] == a.clip_score).any() and (d["adv"] < a.clip_score).any(), "test setup: clip_score idle"
    if a.weighting == "exp" and a.weight_max < 100:
        assert (d["w"] == a.weight_max).any() and (d["w"] < a.weight_max).any(), "test setup: weight clip idle"

    torch.testing.assert_close(out["adv/mean"], d["adv"].mean(), msg="advantage: min Q(s,a) - min Q(s,a_pi) of the "
                               "online critics before their step, clamped at clip_score")
    torch.testing.assert_close(out["weights/max"], d["w"].max(),
                               msg="advantage weights: B softmax(A / beta) or min(exp(A / beta), weight_max)")
    torch.testing.assert_close(out["loss/critic"], d["critic_loss"].detach(),
                               msg="critic loss: MSE(Q1, y) + MSE(Q2, y), y = r + gamma (1 - term) min Q'(s', a')")
    torch.testing.assert_close(out["loss/actor"], d["actor_loss"].detach(), msg="actor loss -mean(w log pi(a|s))")

    old_critic, old_actor = list(old.critic.parameters()), list(old.actor.parameters())
    g_critic = torch.autograd.grad(d["critic_loss"], old_critic)
    g_actor = torch.autograd.grad(d["actor_loss"], old_actor)
    for name, p, g in zip(dict(agent.critic.named_parameters()), agent.critic.parameters(), g_critic):
        torch.testing.assert_close(p.grad, g, msg=f"critic gradient of {name}")
    for name, p, g in zip(dict(agent.actor.named_parameters()), agent.actor.parameters(), g_actor):
        torch.testing.assert_close(p.grad, g, msg=f"actor gradient of {name} (weights must be constants)")

    # Adam steps: the critics with critic_lr, the actor with actor_lr and its weight decay
    for name, p, p0, g in zip(dict(agent.critic.named_parameters()), agent.critic.parameters(), old_critic, g_critic):
        torch.testing.assert_close(p, adam_first_step(p0, g, a.critic_lr), msg=f"critic Adam step of {name}")
    for name, p, p0, g in zip(dict(agent.actor.named_parameters()), agent.actor.parameters(), old_actor, g_actor):
        torch.testing.assert_close(p, adam_first_step(p0, g, a.actor_lr, a.actor_weight_decay),
                                   msg=f"actor Adam step of {name} (lr {a.actor_lr}, weight decay)")
    # Polyak after the critic step: Q' <- Q' + tau (Q - Q')
    for name, p_t, p0, p in zip(dict(agent.critic_target.named_parameters()), agent.critic_target.parameters(),
                                old.critic_target.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(p_t, p0 + a.tau * (p - p0), msg=f"Polyak step of target {name}")
    assert optims["actor_optim"].param_groups[0]["weight_decay"] == a.actor_weight_decay


def test_truncated_rows_bootstrap_terminated_rows_do_not():
    agent, batch = tiny_agent(), marked_batch()
    torch.manual_seed(3)
    y = awac.bellman_target(agent, batch, 0.9, clip_samples=False)
    torch.manual_seed(3)
    mean, log_std = agent.actor(batch["next_observations"])
    a_next = mean + torch.exp(log_std) * torch.randn(B, ACT)
    q_next = agent.critic_target(batch["next_observations"], a_next)
    q_next = torch.minimum(q_next[0], q_next[1]).detach()
    r = batch["rewards"]
    torch.testing.assert_close(y[:3], r[:3], msg="terminated rows: y = r")
    torch.testing.assert_close(y[3:6], r[3:6] + 0.9 * q_next[3:6], msg="truncated rows must bootstrap")
    torch.testing.assert_close(y[6:], r[6:] + 0.9 * q_next[6:])


def test_clip_samples_clamps_v_and_target_actions():
    """CORL's Actor.forward clamps its rsample: V(s) and the target action see actions in [-1, 1]."""
    agent, batch = tiny_agent(), marked_batch()
    obs = batch["observations"]
    for clip in (False, True):
        torch.manual_seed(4)
        adv = awac.advantage(agent, obs, batch["actions"], False, None, clip)
        torch.manual_seed(4)
        mean, log_std = agent.actor(obs)
        a_pi = (mean + torch.exp(log_std) * torch.randn(B, ACT)).detach()
        assert (a_pi.abs() > 1).any(), "test setup: every sample already in [-1, 1]"
        if clip:
            a_pi = a_pi.clamp(-1, 1)
        with torch.no_grad():
            q, qv = agent.critic(obs, batch["actions"]), agent.critic(obs, a_pi)
        torch.testing.assert_close(adv, torch.minimum(q[0], q[1]) - torch.minimum(qv[0], qv[1]),
                                   msg=f"V(s) with clip_samples={clip}")
    torch.manual_seed(4)
    sampled = awac.sample(agent.actor, obs, clip=True)
    assert sampled.abs().max() <= 1.0 and (sampled.abs() == 1).any()


def test_q_estimate_is_min_of_online_twin():
    """design/q_diagnostics.md: AWAC's Q_est is min(Q1, Q2) of the online critics."""
    agent, batch = tiny_agent(), marked_batch()
    obs, act = batch["observations"], batch["actions"]
    with torch.no_grad():
        q, q_t = agent.critic(obs, act), agent.critic_target(obs, act)
    est = awac.q_estimate(agent, obs, act)
    assert not torch.allclose(torch.minimum(q[0], q[1]), torch.minimum(q_t[0], q_t[1]))
    torch.testing.assert_close(est, torch.minimum(q[0], q[1]), msg="Q_est must be min(Q1, Q2) of the online critics")


# ---- what main builds

def test_make_agent_networks_and_init():
    for a, actor_layers, critic_layers in ((awac.parse_args(["--env-id", "hopper-medium"]), 4, 2),
                                           (awac.parse_args(["--env-id", "door-human"]), 2, 2),
                                           (awac.parse_args(["--preset", "corl"]), 3, 3)):
        mean, std = torch.arange(11.0), torch.full((11,), 2.0)
        torch.manual_seed(0)
        agent = awac.make_agent(a, 11, 3, (mean, std), torch.device("cpu"))
        assert [tuple(layer.weight.shape) for layer in agent.actor.hidden] == [(256, 11)] + [(256, 256)] * (
            actor_layers - 1), "actor: hidden layers of 256"
        assert len(agent.critic.q.layers) == critic_layers + 1 and agent.critic.q.layers[0].weight.shape[-1] == 256
        assert (agent.actor.log_std_min, agent.actor.log_std_max, agent.actor.sigmoid_log_std) == (-6.0, 0.0, True)
        for k, v in agent.critic.state_dict().items():
            torch.testing.assert_close(agent.critic_target.state_dict()[k], v, msg=f"target starts as a copy: {k}")
        for net in vars(agent).values():
            expected = (mean, std) if a.normalize_obs else (torch.zeros(11), torch.ones(11))
            torch.testing.assert_close((net.norm.mean, net.norm.std), expected, msg="observation moments")
        assert agent.actor.mu.weight.abs().max() <= 1e-3 and agent.critic.q.layers[-1].weight.abs().max() <= 3e-3


def test_make_buffer_holds_the_dataset_with_room_for_every_online_step():
    n = 30
    data = {"observations": -np.arange(n * OBS, dtype=np.float32).reshape(n, OBS),
            "actions": np.zeros((n, ACT), np.float32), "rewards": np.arange(n, dtype=np.float32)[:, None],
            "next_observations": np.ones((n, OBS), np.float32), "terminated": np.zeros((n, 1), np.float32),
            "truncated": np.zeros((n, 1), np.float32)}
    buffer = awac.make_buffer(awac.Args(online_steps=17), data, torch.device("cpu"))
    assert (buffer.capacity, buffer.size, buffer.start_ptr) == (n + 17, n, n), \
        "one buffer: the dataset first, with room for every online step (capacity, size, start)"
    np.testing.assert_array_equal(buffer.storage[:n, buffer.slices["observations"]].numpy(), data["observations"])


# ---- documented defaults (design/awac.md "Defaults for o2o-rl"; rlkit examples/awac; CORL finetune/awac.py)

ARGS_DEFAULTS = dict(
    offline_steps=50_000, online_steps=100_000, offline_eval_every=10_000, eval_every=1_000, eval_episodes=10,
    preset="rlkit", batch_size=1024, offline_batch_size=128, actor_lr=3e-4, critic_lr=3e-4, actor_weight_decay=1e-4,
    gamma=0.99, tau=0.005, beta=2.0, weighting="softmax", weight_max=100.0, clip_score=None, v_from_mean=False,
    clip_samples=False, actor_layers=4, critic_layers=2, normalize_obs=False, warmup_steps=1_000)
DATASET_DEFAULTS = {
    "pen": dict(beta=0.5, clip_score=0.5, v_from_mean=True, actor_layers=2, offline_steps=25_000,
                online_steps=400_000),
    "door": dict(beta=0.5, clip_score=0.5, v_from_mean=True, actor_layers=2, offline_steps=25_000,
                 online_steps=400_000),
}
PRESETS = {"rlkit": {}, "corl": {
    "*": dict(weighting="exp", beta=1 / 3, clip_score=None, v_from_mean=False, actor_layers=3, critic_layers=3,
              batch_size=256, offline_batch_size=256, actor_weight_decay=0.0, normalize_obs=True, warmup_steps=0,
              clip_samples=True, offline_steps=1_000_000),
    "pen": dict(beta=0.1), "door": dict(beta=0.1)}}


def same(a, b):
    return type(a) is type(b) and a == b


def test_args_defaults_match_the_design():
    got = dataclasses.asdict(awac.Args())
    for k, v in ARGS_DEFAULTS.items():
        assert same(got[k], v), f"Args.{k} is {got[k]!r}; design/awac.md gives {v!r}"


def test_dataset_defaults_and_presets_match_the_design():
    for fam, expected in DATASET_DEFAULTS.items():
        for k, v in expected.items():
            assert same(awac.DATASET_DEFAULTS[fam].get(k), v), \
                f"DATASET_DEFAULTS[{fam!r}][{k!r}] is {awac.DATASET_DEFAULTS[fam].get(k)!r}; design gives {v!r}"
    assert awac.DATASET_DEFAULTS.keys() == DATASET_DEFAULTS.keys()
    assert awac.PRESETS.keys() == PRESETS.keys()
    for name, table in PRESETS.items():
        assert awac.PRESETS[name].keys() == table.keys(), f"preset {name}: keys"
        for key, expected in table.items():
            assert awac.PRESETS[name][key].keys() == expected.keys(), \
                f"preset {name}[{key}]: fields {sorted(awac.PRESETS[name][key].keys() ^ expected.keys())} differ"
            for k, v in expected.items():
                assert same(awac.PRESETS[name][key][k], v), \
                    f"PRESETS[{name!r}][{key!r}][{k!r}] is {awac.PRESETS[name][key][k]!r}; design gives {v!r}"


@pytest.mark.parametrize("argv, expected", [
    (["--env-id", "walker2d-medium"], dict(beta=2.0, weighting="softmax", batch_size=1024, clip_samples=False)),
    (["--env-id", "pen-human"], dict(beta=0.5, clip_score=0.5, v_from_mean=True, actor_layers=2,
                                     offline_steps=25_000, online_steps=400_000)),
    (["--env-id", "hopper-medium", "--preset", "corl"], dict(beta=1 / 3, weighting="exp", clip_samples=True,
                                                             batch_size=256, offline_steps=1_000_000)),
    (["--env-id", "door-cloned", "--preset", "corl"], dict(beta=0.1, clip_score=None, v_from_mean=False,
                                                           online_steps=400_000, clip_samples=True)),
])
def test_resolved_arguments(argv, expected):
    a = awac.parse_args(argv)
    for k, v in expected.items():
        assert getattr(a, k) == pytest.approx(v) if isinstance(v, float) else getattr(a, k) == v, (argv, k)
