"""iql_ft.py's update against a direct computation written out here: the value and the gradient of the expectile,
actor and critic losses, the Adam step of each optimiser and the Polyak step, for both update orders, both actor
types, with and without dropout, on tiny batches that hold terminated and truncated rows; the switch to online; the
data as the critics see it (clipped actions, scaled rewards, a scalar online reward); the Q estimate of the
diagnostics; the networks main builds; and the documented defaults pinned to design/iql_ft.md."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_algo

iql = load_algo("iql_ft")
OBS, ACT, B = 4, 2, 12


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_agent(dropout=0.0, seed=0, hidden=8):
    """Small networks with a target twin that differs from the online twin and Q differences large enough that the
    weight clip binds."""
    torch.manual_seed(seed)
    agent = iql.Agent(iql.GaussianActor(OBS, ACT, hidden=hidden, dropout=dropout), iql.TwinQ(OBS, ACT, hidden),
                      iql.TwinQ(OBS, ACT, hidden), iql.ValueNet(OBS, hidden))
    for net in vars(agent).values():
        iql.orthogonal_init(net)
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for critic in (agent.critic, agent.critic_target):
            critic.q.layers[-1].weight.mul_(3.0)
        agent.actor.log_std.copy_(torch.tensor([-7.0, 0.4]))  # -7 is clamped to -5
        # on the test batch: each twin is the smaller one on some rows, and u = Q' - V takes both signs
        obs, act = marked_batch()["observations"], marked_batch()["actions"]
        for critic in (agent.critic, agent.critic_target):
            q = critic(obs, act)
            critic.q.layers[-1].bias[0].sub_((q[0] - q[1]).median())
        u = twin_min(agent.critic_target(obs, act)) - agent.value(obs)
        agent.value.net[-1].bias.add_(u.median())
    return agent


def marked_batch(seed=1):
    """Rows 0-2 terminated, rows 3-5 truncated (bootstrap), the rest neither."""
    g = torch.Generator().manual_seed(seed)
    terminated, truncated = torch.zeros(B), torch.zeros(B)
    terminated[:3], truncated[3:6] = 1.0, 1.0
    return {"observations": torch.randn(B, OBS, generator=g), "actions": torch.rand(B, ACT, generator=g) * 2 - 1,
            "rewards": torch.randn(B, generator=g), "next_observations": torch.randn(B, OBS, generator=g),
            "terminated": terminated, "truncated": truncated}


def adam_first_step(p, g, lr, eps=1e-8):
    """torch's Adam after one step from zero moments: m_hat = g, v_hat = g^2."""
    return p - lr * g / (g.abs() + eps)


def twin_min(q):
    return torch.minimum(q[0], q[1])


def actor_forward(actor, obs, p):
    """The actor's mean and log-std with dropout p after each hidden ReLU, written out."""
    h = obs
    for layer in actor.hidden:
        h = F.dropout(torch.relu(h @ layer.weight.T + layer.bias), p, training=p > 0)
    return torch.tanh(h @ actor.mu.weight.T + actor.mu.bias), actor.log_std.clamp(-5.0, 2.0)


CASES = {
    "iql-mujoco": dict(),
    "iql-adroit-dropout": dict(beta=0.5, actor_dropout=0.1),
    "corl-order": dict(update_order="corl", lr_schedule="corl"),
    "corl-adroit": dict(update_order="corl", expectile=0.8, beta=3.0, actor_dropout=0.1),
    "corl-hopper-deterministic": dict(update_order="corl", actor_type="deterministic"),
    "deterministic-iql-order-clip-binds": dict(actor_type="deterministic", weight_max=2.0, beta=1.0),
    "expectile-0.9": dict(expectile=0.9, beta=1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_update_vs_direct(case):
    a = iql.Args(**{**dict(gamma=0.9, tau=0.1, actor_lr=1e-3, critic_lr=2e-3, value_lr=3e-3), **CASES[case]})
    agent, batch = tiny_agent(dropout=a.actor_dropout), marked_batch()
    old = copy.deepcopy(agent)
    update, _ = iql.make_update(agent, a)
    torch.manual_seed(5)
    out = update(batch)
    obs, act, nobs, r = batch["observations"], batch["actions"], batch["next_observations"], batch["rewards"]

    # 1. V: expectile regression on min(Q1', Q2') of the target twin, at V before its step
    with torch.no_grad():
        q_both = old.critic_target(obs, act)
        q_t = twin_min(q_both)
    assert (q_both[0] < q_both[1]).any() and (q_both[0] > q_both[1]).any(), "test setup: one twin is always the min"
    u = q_t - old.value(obs)
    assert (u > 0).any() and (u < 0).any(), "test setup: u has one sign only"
    value_loss = torch.mean(torch.where(u > 0, a.expectile, 1 - a.expectile) * u ** 2)
    torch.testing.assert_close(out["loss/value"], value_loss.detach(),
                               msg="value loss: mean(|tau - 1(u < 0)| u^2), u = min Q'(s, a) - V(s)")
    g_value = torch.autograd.grad(value_loss, list(old.value.parameters()))
    v_new = copy.deepcopy(old.value)
    with torch.no_grad():
        for (name, p), p0, g in zip(agent.value.named_parameters(), old.value.parameters(), g_value):
            torch.testing.assert_close(p.grad, g, msg=f"value gradient of {name}")
            torch.testing.assert_close(p, adam_first_step(p0, g, a.value_lr), msg=f"V's Adam step (value_lr) {name}")
        for p_new, p0, g in zip(v_new.parameters(), old.value.parameters(), g_value):
            p_new.copy_(adam_first_step(p0, g, a.value_lr))

    # 2. advantage and target from V after its step ([IQL]) or before it ([CORL])
    v_used = v_new if a.update_order == "iql" else old.value
    with torch.no_grad():
        adv = q_t - v_used(obs)
        y = r + a.gamma * (1 - batch["terminated"]) * v_used(nobs)
        w = torch.minimum(torch.exp(a.beta * adv), torch.tensor(a.weight_max))
    if a.beta >= 3 or a.weight_max < 100:
        assert (w == a.weight_max).any() and (w < a.weight_max).any(), "test setup: the weight clip is idle"
    torch.testing.assert_close(out["adv/mean"], adv.mean(), msg=f"advantage min Q' - V, V {a.update_order} order")
    torch.testing.assert_close(out["weights/mean"], w.mean(), msg="weights min(exp(beta adv), weight_max)")

    # 3. actor: weighted log-likelihood (Gaussian) or weighted squared error (deterministic), dropout on
    torch.manual_seed(5)
    mean, log_std = actor_forward(old.actor, obs, a.actor_dropout)
    if a.actor_type == "gaussian":
        log_pi = (-0.5 * ((act - mean) / torch.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        actor_loss = -(w * log_pi).mean()
    else:
        actor_loss = (w * ((mean - act) ** 2).sum(-1)).mean()
    torch.testing.assert_close(out["loss/actor"], actor_loss.detach(), msg=f"{a.actor_type} actor loss")
    g_actor = torch.autograd.grad(actor_loss, list(old.actor.parameters()), allow_unused=True)
    for (name, p), p0, g in zip(agent.actor.named_parameters(), old.actor.parameters(), g_actor):
        if g is None:  # the deterministic actor's log-std
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, g, msg=f"actor gradient of {name}")
        torch.testing.assert_close(p, adam_first_step(p0, g, a.actor_lr), msg=f"actor Adam step (actor_lr) {name}")

    # 4. Q: TD on r + gamma (1 - terminated) V(s'), the sum of the two MSEs ([IQL])
    q = old.critic(obs, act)
    critic_loss = ((q[0] - y) ** 2).mean() + ((q[1] - y) ** 2).mean()
    torch.testing.assert_close(out["loss/critic"], critic_loss.detach(),
                               msg="critic loss MSE(Q1, y) + MSE(Q2, y), y = r + gamma (1 - term) V(s')")
    g_critic = torch.autograd.grad(critic_loss, list(old.critic.parameters()))
    for (name, p), p0, g in zip(agent.critic.named_parameters(), old.critic.parameters(), g_critic):
        torch.testing.assert_close(p.grad, g, msg=f"critic gradient of {name}")
        torch.testing.assert_close(p, adam_first_step(p0, g, a.critic_lr), msg=f"Q's Adam step (critic_lr) {name}")

    # 5. Polyak after the Q step
    for (name, p_t), p0, p in zip(agent.critic_target.named_parameters(), old.critic_target.parameters(),
                                  agent.critic.parameters()):
        torch.testing.assert_close(p_t, p0 + a.tau * (p - p0), msg=f"Polyak step of target {name}")


def test_value_target_bootstraps_truncated_rows_only():
    agent, batch = tiny_agent(), marked_batch()
    with torch.no_grad():
        q_t = twin_min(agent.critic_target(batch["observations"], batch["actions"]))
        _, y = iql.advantage_and_target(agent, batch, q_t, 0.9)
        v_next = agent.value(batch["next_observations"])
    r = batch["rewards"]
    torch.testing.assert_close(y[:3], r[:3], msg="terminated rows: y = r")
    torch.testing.assert_close(y[3:6], r[3:6] + 0.9 * v_next[3:6], msg="truncated rows must bootstrap")
    torch.testing.assert_close(y[6:], r[6:] + 0.9 * v_next[6:])


def test_q_estimate_is_min_of_target_twin():
    """design/q_diagnostics.md: IQL's Q_est is min(Q1', Q2') of the target twin."""
    agent, batch = tiny_agent(), marked_batch()
    obs, act = batch["observations"], batch["actions"]
    with torch.no_grad():
        q, q_t = agent.critic(obs, act), agent.critic_target(obs, act)
    assert not torch.allclose(twin_min(q), twin_min(q_t))
    torch.testing.assert_close(iql.q_estimate(agent, obs, act), twin_min(q_t),
                               msg="Q_est must be min(Q1', Q2') of the target twin")


# ---- the switch to online

@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("schedule", ["iql", "corl"])
def test_switch_to_online(schedule):
    a = iql.Args(offline_steps=4, actor_lr=1e-3, lr_schedule=schedule)
    agent = tiny_agent(dropout=0.1)
    update, optims = iql.make_update(agent, a)
    for _ in range(a.offline_steps):
        update(marked_batch())
        optims["actor_schedule"].step()
    lr_offline = float(optims["actor_optim"].param_groups[0]["lr"])
    assert lr_offline < 1e-12, "the cosine reaches 0 at the end of the offline phase"
    before = {k: copy.deepcopy(o.state_dict()["state"]) for k, o in optims.items() if k != "actor_schedule"}
    iql.switch_to_online(a, optims)
    lr = float(optims["actor_optim"].param_groups[0]["lr"])
    if schedule == "iql":
        assert lr == pytest.approx(a.actor_lr), "[IQL] fine-tunes at a constant --actor-lr"
    else:
        assert lr == lr_offline, "[CORL]: the cosine goes on from where it is"
    for k, state in before.items():
        for i, st in state.items():
            for name, v in st.items():
                torch.testing.assert_close(optims[k].state_dict()["state"][i][name], v,
                                           msg=f"{k} state is kept at the switch")
    assert agent.actor.dropout == 0.1, "dropout stays in the actor loss online"


# ---- data as the critics see it

def test_prepare_data_clips_actions_scales_rewards_and_keeps_online_rewards_scalar():
    rng = np.random.default_rng(0)
    n = 30
    data = {"observations": rng.standard_normal((n, OBS)).astype(np.float32),
            "actions": np.clip(rng.uniform(-1.3, 1.3, (n, ACT)), -1, 1).astype(np.float32),
            "rewards": rng.standard_normal((n, 1)).astype(np.float32),
            "next_observations": rng.standard_normal((n, OBS)).astype(np.float32),
            "terminated": np.zeros((n, 1), np.float32), "truncated": np.zeros((n, 1), np.float32)}
    data["terminated"][[9, 19]] = 1
    data["truncated"][[14]] = 1
    assert (np.abs(data["actions"]) == 1).any()
    scale = iql.return_range_scale(data)
    for normalize in (True, False):
        out, reward_fn, factor = iql.prepare_data(iql.Args(normalize_reward=normalize), data)
        assert factor == (scale if normalize else 1.0), "reward factor: 1000 / return range, or 1 without scaling"
        assert np.array_equal(out["actions"], np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)), \
            "[IQL] clips dataset actions to +-(1 - 1e-5)"
        assert np.allclose(out["rewards"], data["rewards"] * factor, rtol=1e-6, atol=0), \
            "dataset rewards times the return-range factor"
        assert out["rewards"].dtype == np.float32 and out["rewards"].shape == (n, 1)
        online = reward_fn(np.float64(0.75))
        assert np.ndim(online) == 0 and online == pytest.approx(0.75 * factor), \
            "an online reward gets the same factor and stays a scalar"
        buffer = iql.ReplayBuffer(4, OBS, ACT, torch.device("cpu"), 0)
        buffer.add(np.zeros(OBS), np.zeros(ACT), online, np.zeros(OBS), False, True)  # what the online loop does
        assert buffer.added()["rewards"][0] == pytest.approx(0.75 * factor)
        np.testing.assert_allclose(reward_fn(np.array([1.0, 2.0])), [factor, 2 * factor])  # Q_true's rewards


def test_make_buffer_holds_the_dataset_with_room_for_every_online_step():
    n = 30
    data = {"observations": -np.arange(n * OBS, dtype=np.float32).reshape(n, OBS),
            "actions": np.zeros((n, ACT), np.float32), "rewards": np.arange(n, dtype=np.float32)[:, None],
            "next_observations": np.ones((n, OBS), np.float32), "terminated": np.zeros((n, 1), np.float32),
            "truncated": np.zeros((n, 1), np.float32)}
    buffer = iql.make_buffer(iql.Args(online_steps=17), data, torch.device("cpu"))
    assert (buffer.capacity, buffer.size, buffer.start_ptr) == (n + 17, n, n), \
        "one buffer: the dataset first, with room for every online step (capacity, size, start)"
    np.testing.assert_array_equal(buffer.storage[:n, buffer.slices["rewards"]].numpy(), data["rewards"])


def test_make_agent_networks_and_init():
    for argv in (["--env-id", "hopper-medium"], ["--env-id", "pen-human"], ["--env-id", "pen-human", "--preset",
                                                                           "corl"]):
        a = iql.parse_args(argv)
        mean, std = torch.arange(11.0), torch.full((11,), 2.0)
        torch.manual_seed(0)
        agent = iql.make_agent(a, 11, 24, (mean, std), torch.device("cpu"))
        assert [tuple(layer.weight.shape) for layer in agent.actor.hidden] == [(256, 11), (256, 256)]
        assert [tuple(layer.weight.shape) for layer in agent.critic.q.layers] == [(2, 35, 256), (2, 256, 256),
                                                                                   (2, 256, 1)]
        assert [tuple(m.weight.shape) for m in agent.value.net if isinstance(m, torch.nn.Linear)] == [
            (256, 11), (256, 256), (1, 256)]
        assert (agent.actor.log_std_min, agent.actor.log_std_max, agent.actor.sigmoid_log_std) == (-5.0, 2.0, False)
        assert agent.actor.dropout == a.actor_dropout, f"actor dropout is not --actor-dropout ({argv})"
        for k, v in agent.critic.state_dict().items():
            torch.testing.assert_close(agent.critic_target.state_dict()[k], v, msg=f"target starts as a copy: {k}")
        for net in vars(agent).values():
            expected = (mean, std) if a.normalize_obs else (torch.zeros(11), torch.ones(11))
            torch.testing.assert_close((net.norm.mean, net.norm.std), expected, msg="observation moments")
            for m in net.modules():  # [IQL] default_init: orthogonal, gain sqrt(2); zero biases
                if isinstance(m, (torch.nn.Linear, iql.VectorizedLinear)):
                    for w in m.weight.detach().view(-1, *m.weight.shape[-2:]):
                        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
                        torch.testing.assert_close(small, 2 * torch.eye(len(small)), atol=1e-4, rtol=0,
                                                   msg="[IQL] init: orthogonal weights with gain sqrt(2)")
                    assert not m.bias.any()


# ---- documented defaults (design/iql_ft.md "Defaults for o2o-rl"; [IQL] configs; CORL finetune/iql.py, yamls)

ARGS_DEFAULTS = dict(
    offline_steps=1_000_000, online_steps=100_000, offline_eval_every=10_000, eval_every=1_000, eval_episodes=10,
    preset="iql", batch_size=256, actor_lr=3e-4, critic_lr=3e-4, value_lr=3e-4, gamma=0.99, tau=0.005,
    expectile=0.7, beta=3.0, weight_max=100.0, actor_dropout=0.0, normalize_reward=True, normalize_obs=False,
    update_order="iql", lr_schedule="iql", actor_type="gaussian", expl_noise=0.03)
DATASET_DEFAULTS = {
    "pen": dict(beta=0.5, actor_dropout=0.1, normalize_reward=False, online_steps=400_000),
    "door": dict(beta=0.5, actor_dropout=0.1, normalize_reward=False, online_steps=400_000),
}
PRESETS = {"iql": {}, "corl": {
    "*": dict(normalize_obs=True, update_order="corl", lr_schedule="corl", normalize_reward=False),
    "pen": dict(expectile=0.8, beta=3.0),
    "door": dict(expectile=0.8, beta=3.0),
    "hopper-medium": dict(actor_type="deterministic", normalize_reward=True),
    "hopper-medium-replay": dict(actor_type="deterministic", normalize_reward=True),
    "hopper-medium-expert": dict(expectile=0.5, beta=6.0),
}}


def same(a, b):
    return type(a) is type(b) and a == b


def test_args_defaults_match_the_design():
    got = dataclasses.asdict(iql.Args())
    for k, v in ARGS_DEFAULTS.items():
        assert same(got[k], v), f"Args.{k} is {got[k]!r}; design/iql_ft.md gives {v!r}"


def test_dataset_defaults_and_presets_match_the_design():
    assert iql.DATASET_DEFAULTS.keys() == DATASET_DEFAULTS.keys()
    for fam, expected in DATASET_DEFAULTS.items():
        assert iql.DATASET_DEFAULTS[fam].keys() == expected.keys(), f"DATASET_DEFAULTS[{fam!r}]: fields"
        for k, v in expected.items():
            assert same(iql.DATASET_DEFAULTS[fam][k], v), \
                f"DATASET_DEFAULTS[{fam!r}][{k!r}] is {iql.DATASET_DEFAULTS[fam][k]!r}; design gives {v!r}"
    assert iql.PRESETS.keys() == PRESETS.keys()
    for name, table in PRESETS.items():
        assert iql.PRESETS[name].keys() == table.keys(), f"preset {name}: keys"
        for key, expected in table.items():
            assert iql.PRESETS[name][key].keys() == expected.keys(), \
                f"preset {name}[{key}]: fields {sorted(iql.PRESETS[name][key].keys() ^ expected.keys())} differ"
            for k, v in expected.items():
                assert same(iql.PRESETS[name][key][k], v), \
                    f"PRESETS[{name!r}][{key!r}][{k!r}] is {iql.PRESETS[name][key][k]!r}; design gives {v!r}"


@pytest.mark.parametrize("argv, expected", [
    (["--env-id", "halfcheetah-medium-replay"], dict(expectile=0.7, beta=3.0, normalize_reward=True,
                                                     actor_dropout=0.0, update_order="iql")),
    (["--env-id", "door-expert"], dict(expectile=0.7, beta=0.5, actor_dropout=0.1, normalize_reward=False,
                                       online_steps=400_000)),
    (["--env-id", "door-cloned", "--preset", "corl"], dict(expectile=0.8, beta=3.0, actor_dropout=0.1,
                                                           normalize_obs=True, lr_schedule="corl")),
    (["--env-id", "hopper-medium-replay", "--preset", "corl"], dict(actor_type="deterministic",
                                                                    normalize_reward=True, expectile=0.7)),
    (["--env-id", "hopper-medium-expert", "--preset", "corl"], dict(expectile=0.5, beta=6.0,
                                                                    normalize_reward=False)),
    (["--env-id", "walker2d-medium", "--preset", "corl"], dict(normalize_reward=False, actor_type="gaussian")),
])
def test_resolved_arguments(argv, expected):
    a = iql.parse_args(argv)
    for k, v in expected.items():
        assert getattr(a, k) == v, (argv, k, getattr(a, k))
