"""iql_ft.py: the expectile loss, the clipped advantage weights, the actor loss, the return-range reward scaling and
the learning-rate schedules against direct computations; the update order; presets; an end-to-end run; and a
resume that ends bit-identical to an uninterrupted run."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import load_algo, run_killed
from test_end_to_end import check_outputs, final_params, hopper_file, read_rows, same_rows

iql = load_algo("iql_ft")
_ = hopper_file  # the module-scoped fixture, imported for the tests below


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: faster on a shared CPU, and the resume test needs a fixed reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_agent(obs_dim=5, act_dim=2, hidden=16, dropout=0.0):
    torch.manual_seed(0)
    agent = iql.Agent(iql.GaussianActor(obs_dim, act_dim, hidden=hidden, dropout=dropout),
                      iql.TwinQ(obs_dim, act_dim, hidden), iql.TwinQ(obs_dim, act_dim, hidden),
                      iql.ValueNet(obs_dim, hidden))
    for net in vars(agent).values():
        iql.orthogonal_init(net)
    agent.critic_target.load_state_dict(agent.critic.state_dict())
    return agent


def make_batch(b=8, obs_dim=5, act_dim=2):
    g = torch.Generator().manual_seed(1)
    return {"observations": torch.randn(b, obs_dim, generator=g),
            "actions": torch.rand(b, act_dim, generator=g) * 2 - 1, "rewards": torch.randn(b, generator=g),
            "next_observations": torch.randn(b, obs_dim, generator=g),
            "terminated": (torch.rand(b, generator=g) < 0.3).float(), "truncated": torch.zeros(b)}


# ---- the method's terms against direct computations

def test_expectile_loss_matches_direct():
    u = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5, 4.0], dtype=torch.float64)
    for tau in (0.5, 0.7, 0.9):
        direct = np.mean([(tau if x > 0 else 1 - tau) * x * x for x in u.tolist()])
        assert iql.expectile_loss(u, tau).item() == pytest.approx(direct, rel=1e-12)
    # its minimiser over a constant V is the tau-expectile e:
    # tau sum_{q > e} (q - e) = (1 - tau) sum_{q < e} (e - q)
    # for q = (0, 0, 0, 10) and tau 0.9, 0.9 (10 - e) = 0.1 * 3 e, e = 7.5 (the mean is 2.5)
    q = torch.tensor([0.0, 0.0, 0.0, 10.0], dtype=torch.float64)
    v = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    iql.expectile_loss(q - v, 0.9).backward()
    assert abs(v.grad.item()) < 1e-12


def test_awr_weights_are_clipped_exponentials():
    adv = torch.tensor([-3.0, -0.1, 0.0, 0.2, 1.0, 1.6, 50.0, 1e4])
    w = iql.awr_weights(adv, beta=3.0, weight_max=100.0)
    direct = [min(math.exp(3.0 * a), 100.0) if 3.0 * a < 700 else 100.0 for a in adv.tolist()]
    np.testing.assert_allclose(w.numpy(), direct, rtol=1e-6)
    assert w[-3:].eq(100.0).all() and torch.isfinite(w).all()


def test_actor_loss_is_weighted_gaussian_log_likelihood():
    agent, batch = make_agent(), make_batch()
    with torch.no_grad():
        agent.actor.log_std.copy_(torch.tensor([-7.0, 0.5]))  # -7 is clamped to -5
    w = torch.rand(8)
    loss = iql.awr_actor_loss(agent.actor, batch["observations"], batch["actions"], w, deterministic=False)
    h = batch["observations"]
    for layer in agent.actor.hidden:
        h = torch.relu(h @ layer.weight.T + layer.bias)
    mean = torch.tanh(h @ agent.actor.mu.weight.T + agent.actor.mu.bias)
    dist = torch.distributions.Normal(mean, torch.tensor([math.exp(-5.0), math.exp(0.5)]))
    direct = -(w * dist.log_prob(batch["actions"]).sum(-1)).mean()
    torch.testing.assert_close(loss, direct)
    det = iql.awr_actor_loss(agent.actor, batch["observations"], batch["actions"], w, deterministic=True)
    torch.testing.assert_close(det, (w * ((mean - batch["actions"]) ** 2).sum(-1)).mean())


def test_actor_dropout_only_in_losses():
    agent = make_agent(dropout=0.5)
    obs = torch.randn(64, 5)
    mean, _ = agent.actor(obs)
    torch.testing.assert_close(agent.actor(obs)[0], mean)  # no dropout by default: acting and evaluation
    assert not torch.allclose(agent.actor(obs, dropout=True)[0], mean)
    a = agent.actor.act(obs[0].numpy(), deterministic=True)
    np.testing.assert_allclose(a, mean[0].detach().numpy(), rtol=1e-6)


def test_return_range_scale_matches_direct():
    rng = np.random.default_rng(0)
    n = 40
    data = {"rewards": rng.standard_normal((n, 1)).astype(np.float32), "terminated": np.zeros((n, 1), np.float32),
            "truncated": np.zeros((n, 1), np.float32)}
    data["terminated"][[6, 20]] = 1
    data["truncated"][[12, 33]] = 1  # the rows 34..39 are the file's cut-off last episode
    returns, current = [], 0.0
    for i in range(n):
        current += float(data["rewards"][i, 0])
        if data["terminated"][i, 0] or data["truncated"][i, 0] or i == n - 1:
            returns.append(current)
            current = 0.0
    assert len(returns) == 5
    assert iql.return_range_scale(data) == pytest.approx(1000.0 / (max(returns) - min(returns)), rel=1e-9)
    one = {k: v[:7] for k, v in data.items()}
    with pytest.raises(iql.RunError, match="no-normalize-reward"):
        iql.return_range_scale(one)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_actor_lr_schedule_cosine_offline_then_iql_or_corl():
    agent = make_agent()
    update, optims = iql.make_update(agent, iql.Args(offline_steps=10, actor_lr=3e-4))
    lrs = []
    for _ in range(15):
        lrs.append(float(optims["actor_optim"].param_groups[0]["lr"]))
        optims["actor_schedule"].step()
    # optax.cosine_decay_schedule(lr, T) for t <= T; CORL's CosineAnnealingLR goes on past T (the rate rises again)
    direct = [3e-4 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(15)]
    np.testing.assert_allclose(lrs, direct, atol=1e-10)
    assert lrs[10] < 1e-10 and lrs[14] > lrs[11]


def test_update_order_sets_which_v_the_advantage_uses():
    batch, results = make_batch(), {}
    for order in ("iql", "corl"):
        agent = make_agent()
        old = copy.deepcopy(agent)
        update, _ = iql.make_update(agent, iql.Args(update_order=order, beta=1.0, gamma=0.9))
        out = update(batch)
        q_target = old.critic_target(batch["observations"], batch["actions"]).min(0).values
        v_used = (agent if order == "iql" else old).value
        with torch.no_grad():
            adv = q_target - v_used(batch["observations"])
            y = batch["rewards"] + 0.9 * (1 - batch["terminated"]) * v_used(batch["next_observations"])
            q_old = old.critic(batch["observations"], batch["actions"])
        torch.testing.assert_close(out["adv/mean"], adv.mean())
        torch.testing.assert_close(out["loss/critic"], ((q_old - y) ** 2).mean(1).sum())
        torch.testing.assert_close(out["loss/value"], iql.expectile_loss(q_target - old.value(batch["observations"]),
                                                                         0.7).detach())
        # Polyak after the Q step: Q' <- Q' + tau (Q - Q')
        for p_t, p_old, p in zip(agent.critic_target.parameters(), old.critic_target.parameters(),
                                 agent.critic.parameters()):
            torch.testing.assert_close(p_t, p_old + 0.005 * (p - p_old))
        results[order] = {k: v.detach().clone() for k, v in agent.value.state_dict().items()}
    for k in results["iql"]:  # the V step itself is the same in both orders
        torch.testing.assert_close(results["iql"][k], results["corl"][k])


def test_presets_and_dataset_defaults():
    a = iql.parse_args(["--env-id", "pen-human"])
    assert (a.expectile, a.beta, a.actor_dropout, a.normalize_reward, a.online_steps) == (0.7, 0.5, 0.1, False, 400_000)
    a = iql.parse_args(["--env-id=pen-cloned", "--preset=corl"])
    assert (a.expectile, a.beta, a.normalize_obs, a.update_order, a.lr_schedule) == (0.8, 3.0, True, "corl", "corl")
    a = iql.parse_args(["--env-id", "hopper-medium", "--preset", "corl", "--actor-type", "gaussian"])
    assert (a.actor_type, a.normalize_reward, a.preset) == ("gaussian", True, "corl")  # explicit flags win
    a = iql.parse_args(["--env-id", "walker2d-medium"])
    assert (a.expectile, a.beta, a.normalize_reward, a.actor_type, a.offline_steps) == (0.7, 3.0, True, "gaussian",
                                                                                        1_000_000)
    for table in iql.PRESETS.values():
        for key, overrides in table.items():
            assert key == "*" or key in iql.TASK_IDS or key in iql.MUJOCO_FAMILIES + iql.ADROIT_FAMILIES, key
            assert set(overrides) <= {f.name for f in iql.dataclasses.fields(iql.Args)}


# ---- end to end

def iql_args(tmp, data, **kw):
    base = dict(env_id="hopper-medium", dataset=str(data), device="cpu", threads=1, output_dir=str(tmp),
                batch_size=16, offline_steps=40, offline_eval_every=20, online_steps=200, eval_every=100,
                eval_episodes=1, q_diag_extend_steps=5, checkpoint_every=20, log_every=20)
    base.update(kw)
    return iql.Args(**base)


def test_iql_end_to_end(tmp_path, hopper_file, monkeypatch):
    """Also: online rewards reach the buffer scaled like the dataset's, as scalars (--normalize-reward is on by
    default), and evaluation's Q_est is min(Q1', Q2') of the target twin."""
    probe = (torch.randn(5, 11, generator=torch.Generator().manual_seed(0)),
             torch.rand(5, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    seen, raw_rewards, stored, q_true_rewards = [], [], [], []
    real_evaluate, real_make_env, real_add = iql.evaluate, iql.make_env, iql.ReplayBuffer.add

    def evaluate(env, actor, q_fn, *rest):
        seen.append(q_fn(*probe).detach().clone())
        q_true_rewards.append(rest[-1](np.array([1.0, -2.0])))  # reward_fn: how Q_true sees the env's rewards
        return real_evaluate(env, actor, q_fn, *rest)

    class RecordRewards(iql.gym.Wrapper):
        def step(self, action):
            out = self.env.step(action)
            raw_rewards.append(out[1])
            return out

    made = []

    def make_env(task, extend_steps=0):
        made.append(real_make_env(task, extend_steps))
        return RecordRewards(made[-1]) if len(made) == 1 else made[-1]  # the first env made is the training env

    def add(self, obs, action, reward, *rest):
        stored.append(reward)
        return real_add(self, obs, action, reward, *rest)

    monkeypatch.setattr(iql, "evaluate", evaluate)
    monkeypatch.setattr(iql, "make_env", make_env)
    monkeypatch.setattr(iql.ReplayBuffer, "add", add)
    run_dir = iql.main(iql_args(tmp_path, hopper_file))
    check_outputs(run_dir, "iql_ft")
    rows = read_rows(run_dir)
    assert [r["grad_step"] for r in rows if r["phase"] == "offline"] == [20, 40]
    online = [r for r in rows if r["phase"] == "online"]
    assert [r["env_step"] for r in online] == [0, 100, 200] and online[-1]["grad_step"] == 40 + 200  # UTD 1
    config = json.loads((run_dir / "config.json").read_text())
    data, _ = iql.load_dataset(iql.resolve_task("hopper-medium", None, str(hopper_file)), str(hopper_file))
    assert config["reward_scale"] == pytest.approx(iql.return_range_scale(data))
    offline = torch.load(run_dir / "offline.pt", weights_only=False)
    assert offline["optims"]["actor_schedule"]["last_epoch"] == 40
    assert float(offline["optims"]["actor_optim"]["param_groups"][0]["lr"]) < 1e-12  # decayed to 0 offline
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert float(ckpt["optims"]["actor_optim"]["param_groups"][0]["lr"]) == pytest.approx(3e-4), \
        "--lr-schedule iql: the actor learning rate goes back to --actor-lr online and stays there"
    assert len(stored) == len(raw_rewards) == 200 and all(np.ndim(r) == 0 for r in stored)
    assert config["reward_scale"] != 1.0
    assert q_true_rewards and all(np.allclose(r, [config["reward_scale"], -2 * config["reward_scale"]], rtol=1e-9)
                                  for r in q_true_rewards), "Q_true must see the rewards in the critics' (scaled) units"
    np.testing.assert_allclose(stored, np.asarray(raw_rewards) * config["reward_scale"], rtol=1e-6,
                               err_msg="online rewards must be scaled like the dataset's")
    critic, target = iql.TwinQ(11, 3), iql.TwinQ(11, 3)
    critic.load_state_dict(ckpt["agent"]["critic"])
    target.load_state_dict(ckpt["agent"]["critic_target"])
    with torch.no_grad():
        q, q_t = critic(*probe), target(*probe)
    assert not torch.allclose(torch.minimum(q[0], q[1]), torch.minimum(q_t[0], q_t[1]))
    torch.testing.assert_close(seen[-1], torch.minimum(q_t[0], q_t[1]),
                               msg="evaluation's Q_est must be min(Q1', Q2') of the target twin")


def test_corl_preset_from_offline_checkpoint(tmp_path, hopper_file, monkeypatch):
    args = iql.parse_args(["--env-id", "hopper-medium", "--preset", "corl"])
    assert args.actor_type == "deterministic" and args.normalize_obs
    kw = {k: getattr(args, k) for k in ("normalize_obs", "update_order", "lr_schedule", "actor_type")}
    first = iql.main(iql_args(tmp_path / "a", hopper_file, online_steps=0, **kw))
    steps_at_switch, real_online = [], iql.train_online

    def train_online(args, agent, buffer, update, optims, *rest):
        steps_at_switch.extend(float(st["step"]) for k, o in optims.items() if k != "actor_schedule"
                               for st in o.state_dict()["state"].values())
        return real_online(args, agent, buffer, update, optims, *rest)

    monkeypatch.setattr(iql, "train_online", train_online)
    run_dir = iql.main(iql_args(tmp_path / "b", hopper_file, offline_checkpoint=str(first / "offline.pt"),
                                online_steps=60, eval_every=50, **kw))
    assert steps_at_switch and set(steps_at_switch) == {40.0}, \
        "fine-tuning from offline.pt continues the offline Adam states (40 steps), it does not start fresh ones"
    rows = read_rows(run_dir)
    assert {r["phase"] for r in rows} == {"online"} and rows[-1]["grad_step"] == 60
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert not torch.allclose(ckpt["agent"]["actor"]["norm.std"], torch.ones(11))  # the dataset's moments
    assert ckpt["optims"]["actor_schedule"]["last_epoch"] == 100  # CORL: the cosine keeps going online
    lr = float(ckpt["optims"]["actor_optim"]["param_groups"][0]["lr"])
    assert lr == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 100 / 40)), rel=1e-4)


def test_critic_rates_of_this_run_win_over_offline_pt(tmp_path, hopper_file):
    """offline.pt's Adam states carry the pretraining run's learning rates; --critic-lr and --value-lr of the
    fine-tuning run must still apply (here 0: Q and V stay as pretrained while the actor learns)."""
    first = iql.main(iql_args(tmp_path / "a", hopper_file, online_steps=0))
    run_dir = iql.main(iql_args(tmp_path / "b", hopper_file, offline_checkpoint=str(first / "offline.pt"),
                                online_steps=30, eval_every=30, critic_lr=0.0, value_lr=0.0))
    offline = torch.load(first / "offline.pt", weights_only=False)["agent"]
    now = torch.load(run_dir / "checkpoint.pt", weights_only=False)["agent"]
    for net in ("critic", "value"):
        for k, v in offline[net].items():
            assert torch.equal(now[net][k], v), f"{net} {k} moved at lr 0"
    assert any(not torch.equal(now["actor"][k], v) for k, v in offline["actor"].items())


def test_iql_resume_matches_uninterrupted(tmp_path, hopper_file):
    full = iql.main(iql_args(tmp_path / "full", hopper_file))
    # the first checkpoint is offline (grad step 20), the third online
    killed = run_killed(iql, iql_args(tmp_path / "killed", hopper_file), 3)
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["phase"] == "online"
    resumed = iql.main(iql.Args(resume=str(killed)))
    a, b = final_params(full), final_params(resumed)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    same_rows(full, resumed)
