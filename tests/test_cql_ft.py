"""algorithms/cql_ft.py: the CQL penalty, the actor's log-density, the max-backup target and one update against
direct computations; the loose variant drops the penalty online; end-to-end runs, offline.pt and bit-exact resume."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_algo, run_killed, write_hopper_d4rl

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("phase", "env_step", "grad_step", "return_mean", "return_std", "normalized_score",
             "q_normalized_difference", "q_kendall_tau", "wall_time")
cql = load_algo("cql_ft")
torch.set_num_threads(1)  # the tiny networks are slower with threads on a shared machine


# ---------------------------------------------------------------- maths
def penalty_loop(q_data, q_rand, q_next, q_cur, lp_next, lp_cur, act_dim, temp, lo, hi):
    """The importance-sampled CQL(H) term of each critic, one state and one entry at a time."""
    n, b, k = q_rand.shape
    out = []
    for i in range(n):
        total = 0.0
        for s in range(b):
            xs = ([float(q_rand[i, s, j]) + act_dim * math.log(2.0) for j in range(k)]
                  + [float(q_next[i, s, j] - lp_next[s, j]) for j in range(k)]
                  + [float(q_cur[i, s, j] - lp_cur[s, j]) for j in range(k)])
            m = max(xs)
            ood = temp * (m / temp + math.log(sum(math.exp((x - m) / temp) for x in xs)))
            total += min(max(ood - float(q_data[i, s]), lo), hi)
        out.append(total / b)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temp,lo,hi", [(1.0, -math.inf, math.inf), (0.5, -1.0, 2.0)])
def test_cql_penalty_matches_loop(temp, lo, hi):
    g = torch.Generator().manual_seed(0)
    n, b, k, a = 2, 5, 4, 3
    q_data = torch.randn(n, b, generator=g) * 3
    q_rand, q_next, q_cur = (torch.randn(n, b, k, generator=g) * 3 for _ in range(3))
    lp_next, lp_cur = (torch.randn(b, k, generator=g) for _ in range(2))
    got = cql.cql_penalty(q_data, q_rand, q_next, q_cur, lp_next, lp_cur, a, temp, lo, hi)
    want = penalty_loop(q_data, q_rand, q_next, q_cur, lp_next, lp_cur, a, temp, lo, hi)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def make_agent(obs_dim=4, act_dim=2, layers=2, init="corl-offline", seed=0):
    torch.manual_seed(seed)
    mean, std = torch.randn(obs_dim) * 0.1, torch.rand(obs_dim) + 0.5
    actor = cql.Actor(obs_dim, act_dim, mean, std)
    critic = cql.Critic(obs_dim, act_dim, layers, mean, std)
    cql.init_weights(actor, critic, init)
    with torch.no_grad():  # a non-degenerate critic: the 1e-2 output layer makes every Q almost 0
        critic.layers[-1].weight.normal_(0, 0.3)
    target = copy.deepcopy(critic)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cql.Agent(actor, critic, target, torch.tensor(math.log(0.3), requires_grad=True))


def make_batch(b=6, obs_dim=4, act_dim=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randn(b, obs_dim, generator=g),
            "actions": torch.rand(b, act_dim, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g), "next_observations": torch.randn(b, obs_dim, generator=g),
            "terminated": (torch.rand(b, generator=g) < 0.3).float(), "truncated": torch.zeros(b)}


def test_actor_log_prob_is_torch_tanh_transform():
    agent = make_agent()
    obs = torch.randn(7, 3, 4)
    torch.manual_seed(3)
    action, log_prob = agent.actor(obs)
    mu, raw = agent.actor.net((obs - agent.actor.obs_mean) / agent.actor.obs_std).chunk(2, dim=-1)
    log_std = (agent.actor.log_std_multiplier * raw + agent.actor.log_std_offset).clamp(-20, 2)
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mu, log_std.exp()),
                                                       torch.distributions.TanhTransform())
    assert action.shape == (7, 3, 2) and log_prob.shape == (7, 3)
    torch.testing.assert_close(log_prob, dist.log_prob(action).sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(agent.actor(obs, deterministic=True)[0], torch.tanh(mu))
    assert agent.actor.act(np.zeros(4), deterministic=True).shape == (2,)


def test_init_schemes():
    offline, finetune = make_agent(init="corl-offline"), make_agent(init="corl-finetune")
    for agent in (offline, finetune):
        w = agent.critic.layers[0].weight[1]  # [in, out], semi-orthogonal with gain sqrt 2
        torch.testing.assert_close(w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T,
                                   2 * torch.eye(min(w.shape)), atol=1e-4, rtol=0)
        assert all((layer.bias == 0).all() for layer in agent.critic.layers)
    assert offline.actor.net[-1].weight.abs().max() < 0.01 < finetune.actor.net[-1].weight.abs().max()


@pytest.mark.parametrize("n_max,backup_entropy", [(0, False), (5, True)])
def test_bellman_target(n_max, backup_entropy):
    agent, batch, alpha, gamma = make_agent(), make_batch(), torch.tensor(0.3), 0.9
    torch.manual_seed(5)
    y = cql.bellman_target(agent, batch, alpha, gamma, n_max, backup_entropy)
    torch.manual_seed(5)
    with torch.no_grad():
        nxt = batch["next_observations"]
        if n_max:
            a, lp = agent.actor(nxt.unsqueeze(1).expand(-1, n_max, -1))
        else:
            a, lp = (x.unsqueeze(1) for x in agent.actor(nxt))
        for s in range(len(nxt)):
            vals = [float(agent.critic_target(nxt[s:s + 1], a[s, j:j + 1]).min()) for j in range(a.shape[1])]
            j = int(np.argmax(vals))
            v = vals[j] - (float(alpha * lp[s, j]) if backup_entropy else 0.0)
            want = float(batch["rewards"][s]) + gamma * (1 - float(batch["terminated"][s])) * v
            assert abs(float(y[s]) - want) < 1e-5


def reference_update(agent, batch, args, act_dim, optims):
    """One CORL update written out: the losses from the current parameters, then alpha, actor and critic steps, each
    with its own backward, then Polyak; penalty by the loop above."""
    obs, k, te = batch["observations"], args.cql_n_actions, -float(act_dim)
    action, log_pi = agent.actor(obs)
    alpha_loss = -(agent.log_alpha * (log_pi + te).detach()).mean()
    alpha = agent.log_alpha.exp()
    policy_loss = (alpha * log_pi - agent.critic(obs, action).min(0).values).mean()
    with torch.no_grad():
        na, nlp = agent.actor(batch["next_observations"])
        y = batch["rewards"] + args.gamma * (1 - batch["terminated"]) * agent.critic_target(
            batch["next_observations"], na).min(0).values
    q = agent.critic(obs, batch["actions"])
    qf_loss = ((q - y) ** 2).mean(1).sum()
    with torch.no_grad():
        rand = torch.rand(len(obs), k, act_dim) * 2 - 1
        cur, lpc = agent.actor(obs.unsqueeze(1).repeat(1, k, 1))
        nxt, lpn = agent.actor(batch["next_observations"].unsqueeze(1).repeat(1, k, 1))
    qs = [torch.stack([agent.critic(obs, acts[:, j]) for j in range(k)], -1) for acts in (rand, cur, nxt)]
    x = [torch.cat([qs[0][i] + act_dim * math.log(2), qs[2][i] - lpn, qs[1][i] - lpc], -1) for i in range(2)]
    diff = [(torch.logsumexp(x[i], -1) - q[i]).mean() for i in range(2)]
    qf_loss = qf_loss + args.cql_alpha * (diff[0] + diff[1])
    for name, loss in (("alpha_optim", alpha_loss), ("actor_optim", policy_loss), ("critic_optim", qf_loss)):
        optims[name].zero_grad()
        loss.backward(retain_graph=True)
        optims[name].step()
    cql.polyak(agent.critic_target, agent.critic, args.tau)


def test_update_matches_corl_order():
    args = cql.Args(cql_n_actions=3, cql_alpha=2.0, policy_lr=1e-3, qf_lr=1e-3)
    agent = make_agent()
    ref = copy.deepcopy(agent)
    update, _, _ = cql.make_update_fns(agent, args, 2)
    ref_optims = {"actor_optim": torch.optim.Adam(ref.actor.parameters(), lr=args.policy_lr),
                  "critic_optim": torch.optim.Adam(ref.critic.parameters(), lr=args.qf_lr),
                  "alpha_optim": torch.optim.Adam([ref.log_alpha], lr=args.policy_lr)}
    for step in range(2):
        batch = make_batch(seed=10 + step)
        torch.manual_seed(step)
        update(batch)
        torch.manual_seed(step)
        reference_update(ref, batch, args, 2, ref_optims)
    for name in ("actor", "critic", "critic_target"):
        for (k, p), r in zip(getattr(agent, name).named_parameters(), getattr(ref, name).parameters()):
            # atol: Adam's first steps are about lr * sign(g), which magnifies rounding where g is near 0
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-5, msg=f"{name}.{k}")
    torch.testing.assert_close(agent.log_alpha, ref.log_alpha)


@pytest.mark.parametrize("mode", ["original", "loose"])
def test_loose_drops_the_penalty_online(monkeypatch, mode):
    calls = {"n": 0}
    real = cql.cql_penalty

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(cql, "cql_penalty", counting)
    args = cql.Args(cql_n_actions=3, cql_alpha=5.0, cql_alpha_online=0.5, online_mode=mode)
    agent = make_agent()
    offline_update, online_update, _ = cql.make_update_fns(agent, args, 2)
    out = offline_update(make_batch())
    assert calls["n"] == 1
    torch.testing.assert_close(out["loss/critic"], out["loss/td"] + 5.0 * 2 * out["loss/cql_diff"])
    out = online_update(make_batch(seed=2))
    if mode == "loose":
        assert calls["n"] == 1 and "loss/cql_diff" not in out
        torch.testing.assert_close(out["loss/critic"], out["loss/td"], rtol=0, atol=0)
    else:
        assert calls["n"] == 2
        torch.testing.assert_close(out["loss/critic"], out["loss/td"] + 0.5 * 2 * out["loss/cql_diff"])


def test_reward_scale():
    rewards = np.array([1, 1, 1, 5, 5, 2, 2, 2, 2], dtype=np.float32)[:, None]
    term = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=np.float32)[:, None]
    trunc = np.array([0, 0, 0, 0, 1, 0, 0, 0, 1], dtype=np.float32)[:, None]  # returns 3, 10, 8
    scale = cql.reward_scale({"rewards": rewards, "terminated": term, "truncated": trunc}, 1000)
    assert scale == pytest.approx(1000 / 7)


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory) -> Path:
    """600 steps of random actions in Hopper-v4, in D4RL's layout, episodes cut at 100 steps by time-outs."""
    return write_hopper_d4rl(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5", steps=600, limit=100)


def tiny_args(tmp: Path, data: Path, **kw):
    base = dict(env_id="hopper-medium", dataset=str(data), device="cpu", output_dir=str(tmp), batch_size=16,
                cql_n_actions=4, offline_steps=40, offline_eval_every=20, online_steps=150, eval_every=100,
                eval_episodes=1, q_diag_extend_steps=5, checkpoint_every=20, log_every=20, normalize_reward=True)
    base.update(kw)
    return cql.Args(**base)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def check_run(run_dir: Path, online_steps: int, **expected_args) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == "cql_ft" and config["eval_env_id"] == "Hopper-v4" and len(config["dataset_sha256"]) == 64
    assert all(config["args"][k] == v for k, v in expected_args.items())
    rows = read_rows(run_dir)
    for row in rows:
        for key in EVAL_KEYS:
            assert key in row and (key == "phase" or math.isfinite(row[key])), (key, row)
    assert [r["grad_step"] for r in rows if r["phase"] == "offline"] == [20, 40]
    online = [r for r in rows if r["phase"] == "online"]
    assert [r["env_step"] for r in online] == [0, 100, online_steps]
    assert online[-1]["grad_step"] == 40 + online_steps  # one update per env step, no warm-up
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "offline.pt").is_file() and (run_dir / "checkpoint.pt").is_file()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["phase"] == "done" and "obs_mean" in ckpt["agent"]["actor"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, hopper_file) -> Path:
    """An uninterrupted run with the defaults' modes (original, single buffer), shared by the tests below."""
    return cql.main(tiny_args(tmp_path_factory.mktemp("full"), hopper_file))


def test_end_to_end(full_run):
    # reward rescaling on through 150 online steps: online rewards go through the same scalar factor (issue 9)
    check_run(full_run, 150, online_mode="original", buffer_mode="single", normalize_reward=True)


def test_end_to_end_loose_mixed_max_backup(tmp_path, hopper_file):
    run_dir = cql.main(tiny_args(tmp_path, hopper_file, online_mode="loose", buffer_mode="mixed",
                                 cql_max_target_backup=True))
    check_run(run_dir, 150, online_mode="loose", buffer_mode="mixed", cql_max_target_backup=True)


def test_from_offline_checkpoint(tmp_path, full_run, hopper_file):
    run_dir = cql.main(tiny_args(tmp_path / "b", hopper_file, offline_checkpoint=str(full_run / "offline.pt"),
                                 online_steps=50))
    rows = read_rows(run_dir)
    assert {r["phase"] for r in rows} == {"online"} and rows[-1]["grad_step"] == 50
    with pytest.raises(cql.RunError, match="does not fit"):
        cql.main(tiny_args(tmp_path / "c", hopper_file, offline_checkpoint=str(full_run / "offline.pt"),
                           q_n_hidden_layers=2))


@pytest.mark.parametrize("kill_at", [1, 3])  # 1: in the offline phase; 3: in the online phase
def test_resume_matches_uninterrupted(tmp_path, full_run, hopper_file, kill_at):
    killed = run_killed(cql, tiny_args(tmp_path, hopper_file), kill_at)
    phase = torch.load(killed / "checkpoint.pt", weights_only=False)["phase"]
    assert phase == ("offline" if kill_at == 1 else "online")
    resumed = cql.main(cql.Args(resume=str(killed)))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["agent"] for d in (full_run, resumed))
    for module in ("actor", "critic", "critic_target"):
        for k in a[module]:
            torch.testing.assert_close(a[module][k], b[module][k], rtol=0, atol=0, msg=f"{module}.{k}")
    torch.testing.assert_close(a["log_alpha"], b["log_alpha"], rtol=0, atol=0)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(read_rows(full_run)) == strip(read_rows(resumed))


def test_help_and_dataset_defaults():
    out = subprocess.run([sys.executable, "algorithms/cql_ft.py", "--env-id", "pen-human", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--cql-alpha", "--online-mode", "--buffer-mode", "--cql-max-target-backup", "--init", "--resume"):
        assert flag in out, flag
    args = cql.parse_args(["--env-id", "pen-human", "--cql-clip-diff-max", "50"])
    assert (args.cql_alpha, args.policy_lr, args.cql_max_target_backup, args.normalize_states,
            args.init) == (1.0, 1e-4, True, False, "corl-finetune")
    assert (args.cql_clip_diff_min, args.cql_clip_diff_max, args.online_steps) == (-200.0, 50.0, 400_000)
    args = cql.parse_args(["--env-id", "hopper-medium"])
    assert args.normalize_reward and args.normalize_states and args.cql_alpha == 10.0 and args.policy_lr == 3e-5
    assert not cql.parse_args(["--env-id", "hopper-expert"]).normalize_reward
