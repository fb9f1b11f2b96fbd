"""algorithms/cal_ql.py: Monte-Carlo returns (hand-made episodes, a D4RL-layout file, online episodes), the lower
bound max(Q, V_mu) on policy actions inside the CQL penalty, the buffer's return column, end-to-end runs and
bit-exact resume."""

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

from conftest import D4RL_EPISODES, load_algo, make_d4rl_arrays, run_killed, write_d4rl_file, write_hopper_d4rl

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("phase", "env_step", "grad_step", "return_mean", "return_std", "normalized_score",
             "q_normalized_difference", "q_kendall_tau", "wall_time")
cal = load_algo("cal_ql")
torch.set_num_threads(1)  # the tiny networks are slower with threads on a shared machine


def discounted(rewards, gamma):
    """sum_k gamma^k r_{t+k} to the end of the list, for every t, by direct sums."""
    return [sum(gamma ** j * r for j, r in enumerate(rewards[t:])) for t in range(len(rewards))]


# ---------------------------------------------------------------- Monte-Carlo returns
def test_mc_returns_hand_made_episodes():
    gamma = 0.9
    # a terminated episode (3 steps), a time-out (2 steps), then one cut off by the end of the data (2 steps)
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0, -1.0, 4.0])
    terminated = np.array([0, 0, 1, 0, 0, 0, 0], dtype=bool)
    truncated = np.array([0, 0, 0, 0, 1, 0, 0], dtype=bool)
    want = discounted([1.0, 2.0, 3.0], gamma) + discounted([10.0, 20.0], gamma) + discounted([-1.0, 4.0], gamma)
    np.testing.assert_allclose(cal.dataset_mc_returns({"rewards": rewards[:, None], "terminated": terminated[:, None],
                                                       "truncated": truncated[:, None]}, gamma), want)
    assert want[2] == 3.0 and want[4] == 20.0  # nothing is bootstrapped past an episode's last step
    # a time-out is not a termination, but the tail after it is unknown: the same numbers either way
    ends = terminated | truncated
    ends[-1] = True
    np.testing.assert_allclose(cal.mc_returns(rewards, np.zeros(7, dtype=bool), ends, gamma), want)
    # a termination inside a segment still stops the sum
    np.testing.assert_allclose(cal.mc_returns([1.0, 2.0, 3.0], [False, True, False], [False, False, True], 0.5),
                               [2.0, 2.0, 3.0])


def test_mc_returns_of_a_d4rl_file(tmp_path):
    raw = write_d4rl_file(tmp_path / "tiny.hdf5", make_d4rl_arrays())
    data = cal.load_d4rl_file(tmp_path / "tiny.hdf5")
    got = cal.dataset_mc_returns(data, 0.99)
    want, start = [], 0
    for i, (length, kind) in enumerate(D4RL_EPISODES):
        # qlearning_dataset drops a time-out's last step and the file's last step
        kept = length - (kind == "timeout" or i == len(D4RL_EPISODES) - 1)
        want += discounted(list(raw["rewards"][start:start + kept].astype(np.float64)), 0.99)
        start += length
    assert len(got) == len(want) == len(data["rewards"])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_episode_rows_of_an_online_episode():
    steps = [(np.zeros(2), np.zeros(1), r, np.ones(2), False, t == 2) for t, r in enumerate([1.0, 1.0, 2.0])]
    rows = cal.episode_rows(steps, 0.5)
    np.testing.assert_allclose(rows["mc_returns"], [2.0, 2.0, 2.0])
    assert rows["observations"].shape == (3, 2) and list(rows["truncated"]) == [0, 0, 1]
    # an episode cut by the end of the budget (neither flag) ends at its last step too
    np.testing.assert_allclose(cal.episode_rows(steps[:2], 0.5)["mc_returns"], [1.5, 1.0])


def test_mc_buffer_keeps_returns_with_their_rows():
    buf = cal.MCReplayBuffer(10, 2, 1, torch.device("cpu"), 0)
    n = 4
    data = {"observations": np.arange(n * 2, dtype=np.float32).reshape(n, 2), "actions": np.zeros((n, 1)),
            "rewards": np.arange(n, dtype=np.float32)[:, None], "next_observations": np.zeros((n, 2)),
            "terminated": np.zeros((n, 1)), "truncated": np.zeros((n, 1)), "mc_returns": 10.0 * np.arange(n)}
    buf.load_dataset(data)
    buf.add_episode({**{k: v[:3] for k, v in data.items()}, "rewards": np.array([7.0, 8.0, 9.0]),
                     "mc_returns": np.array([70.0, 80.0, 90.0])})
    batch = buf.sample(64)
    assert batch["mc_returns"].shape == (64, 1)
    torch.testing.assert_close(batch["mc_returns"].view(-1), 10.0 * batch["rewards"])
    other = cal.MCReplayBuffer(10, 2, 1, torch.device("cpu"), 0)
    other.load_dataset(data)
    other.load_state_dict(buf.state_dict())
    torch.testing.assert_close(other.storage, buf.storage)
    assert list(buf.added()["mc_returns"].ravel()) == [70.0, 80.0, 90.0]


# ---------------------------------------------------------------- the lower bound
def test_calibrate_is_max_of_q_and_return():
    g = torch.Generator().manual_seed(0)
    q, mc = torch.randn(2, 5, 3, generator=g), torch.randn(5, generator=g)
    got = cal.calibrate(q, mc)
    for i in range(2):
        for b in range(5):
            for k in range(3):
                assert float(got[i, b, k]) == max(float(q[i, b, k]), float(mc[b]))


def make_agent(obs_dim=4, act_dim=2, seed=0):
    torch.manual_seed(seed)
    mean, std = torch.zeros(obs_dim), torch.ones(obs_dim)
    actor, critic = cal.Actor(obs_dim, act_dim, mean, std), cal.Critic(obs_dim, act_dim, 2, mean, std)
    cal.init_weights(actor, critic, "corl-offline")
    with torch.no_grad():  # a non-degenerate critic: the 1e-2 output layer makes every Q almost 0
        critic.layers[-1].weight.normal_(0, 0.3)
    return cal.Agent(actor, critic, copy.deepcopy(critic), torch.tensor(math.log(0.3), requires_grad=True))


def make_batch(agent, b=6, obs_dim=4, act_dim=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(b, obs_dim, generator=g)
    with torch.no_grad():  # returns around the policy's Q-values, so that the bound is active for some entries only
        q_pi = agent.critic(obs, agent.actor(obs, deterministic=True)[0]).mean(0)
    return {"observations": obs, "actions": torch.rand(b, act_dim, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g), "next_observations": torch.randn(b, obs_dim, generator=g),
            "terminated": torch.zeros(b), "truncated": torch.zeros(b),
            "mc_returns": (q_pi + 0.3 * torch.randn(b, generator=g)).unsqueeze(1)}


def direct_penalty(agent, batch, k, act_dim, calibrated, seed):
    """sum over critics of mean_s [logsumexp of the 3K importance-weighted entries - Q(s, a_data)], recomputed by a
    loop over states with the update's random draws; policy entries use max(Q, G(s)) when calibrated."""
    torch.manual_seed(seed)
    obs, nxt = batch["observations"], batch["next_observations"]
    with torch.no_grad():
        agent.actor(obs)  # the update draws the actor's sample, then the target's next action, then the penalty's
        agent.actor(nxt)
        rand = torch.rand(len(obs), k, act_dim) * 2 - 1
        cur, lp_cur = agent.actor(obs.unsqueeze(1).expand(-1, k, -1))
        nx, lp_nxt = agent.actor(nxt.unsqueeze(1).expand(-1, k, -1))
        total = 0.0
        for i in range(2):
            diffs = []
            for s in range(len(obs)):
                g = float(batch["mc_returns"][s])
                q = lambda a: float(agent.critic(obs[s:s + 1], a.view(1, -1))[i, 0])  # noqa: E731
                bound = (lambda v: max(v, g)) if calibrated else (lambda v: v)
                xs = ([q(rand[s, j]) + act_dim * math.log(2.0) for j in range(k)]
                      + [bound(q(nx[s, j])) - float(lp_nxt[s, j]) for j in range(k)]
                      + [bound(q(cur[s, j])) - float(lp_cur[s, j]) for j in range(k)])
                m = max(xs)
                diffs.append(m + math.log(sum(math.exp(x - m) for x in xs)) - q(batch["actions"][s]))
            total += sum(diffs) / len(diffs)
    return total


@pytest.mark.parametrize("calibrate_online", [True, False])
def test_update_uses_the_bound(calibrate_online):
    k, alpha_cql = 3, 2.0
    args = cal.Args(cql_n_actions=k, cql_alpha=alpha_cql, calibrate_online=calibrate_online)
    agent = make_agent()
    batch = make_batch(agent)
    want_cal = direct_penalty(copy.deepcopy(agent), batch, k, 2, True, seed=3)
    want_raw = direct_penalty(copy.deepcopy(agent), batch, k, 2, False, seed=3)
    assert abs(want_cal - want_raw) > 1e-3  # the bound is active somewhere
    offline_update, _, _ = cal.make_update_fns(copy.deepcopy(agent), args, 2)
    _, online_update, _ = cal.make_update_fns(copy.deepcopy(agent), args, 2)
    torch.manual_seed(3)
    out = offline_update(batch)
    assert 0 < float(out["q/bound_rate"]) < 1
    assert float(out["loss/critic"] - out["loss/td"]) == pytest.approx(alpha_cql * want_cal, rel=1e-4, abs=1e-4)
    torch.manual_seed(3)
    out = online_update(batch)
    want = want_cal if calibrate_online else want_raw
    assert float(out["loss/critic"] - out["loss/td"]) == pytest.approx(alpha_cql * want, rel=1e-4, abs=1e-4)


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
    return cal.Args(**base)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, hopper_file) -> tuple[Path, list[dict]]:
    """An uninterrupted run, shared by the tests below, and the payloads of every checkpoint it wrote."""
    saved, real = [], cal.save_checkpoint
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cal, "save_checkpoint", lambda path, payload: (saved.append(payload), real(path, payload)))
        run_dir = cal.main(tiny_args(tmp_path_factory.mktemp("full"), hopper_file))
    return run_dir, saved


def test_end_to_end(full_run):
    run_dir, saved = full_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == "cal_ql" and config["eval_env_id"] == "Hopper-v4" and len(config["dataset_sha256"]) == 64
    assert config["args"]["normalize_reward"], "reward rescaling stays on through the online steps (issue 9)"
    rows = read_rows(run_dir)
    for row in rows:
        for key in EVAL_KEYS:
            assert key in row and (key == "phase" or math.isfinite(row[key])), (key, row)
    assert [r["grad_step"] for r in rows if r["phase"] == "offline"] == [20, 40]
    online = [r for r in rows if r["phase"] == "online"]
    assert [r["env_step"] for r in online] == [0, 100, 150]
    assert online[-1]["grad_step"] == 40 + 150  # as many updates as env steps, the last episode cut by the budget
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "offline.pt").is_file() and (run_dir / "checkpoint.pt").is_file()
    # the online rows of the last online checkpoint (taken when the budget ran out, a cut episode included) carry the
    # returns of their episodes
    last = [p for p in saved if p.get("phase") == "online"][-1]
    buf = cal.MCReplayBuffer(1, 11, 3, torch.device("cpu"), 0)
    table = last["buffers"]["online"]["rows"].numpy()
    col = {k: table[:, s].astype(np.float64) for k, s in buf.slices.items()}
    assert len(table) == last["env_step"] == 150
    ends = np.union1d(np.flatnonzero(col["terminated"] + col["truncated"]), [len(table) - 1])
    assert len(ends) > 2
    want, start = [], 0
    for end in ends:
        want += discounted(list(col["rewards"][start:end + 1]), 0.99)
        start = end + 1
    np.testing.assert_allclose(col["mc_returns"], want, rtol=1e-5, atol=1e-4)


def test_from_offline_checkpoint(tmp_path, full_run, hopper_file):
    run_dir = cal.main(tiny_args(tmp_path, hopper_file, offline_checkpoint=str(full_run[0] / "offline.pt"),
                                 online_steps=50))
    rows = read_rows(run_dir)
    assert {r["phase"] for r in rows} == {"online"} and rows[-1]["grad_step"] == 50


@pytest.mark.parametrize("kill_at", [1, 3])  # 1: in the offline phase; 3: in the online phase
def test_resume_matches_uninterrupted(tmp_path, full_run, hopper_file, kill_at):
    killed = run_killed(cal, tiny_args(tmp_path, hopper_file), kill_at)
    phase = torch.load(killed / "checkpoint.pt", weights_only=False)["phase"]
    assert phase == ("offline" if kill_at == 1 else "online")
    resumed = cal.main(cal.Args(resume=str(killed)))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["agent"] for d in (full_run[0], resumed))
    for module in ("actor", "critic", "critic_target"):
        for k in a[module]:
            torch.testing.assert_close(a[module][k], b[module][k], rtol=0, atol=0, msg=f"{module}.{k}")
    torch.testing.assert_close(a["log_alpha"], b["log_alpha"], rtol=0, atol=0)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(read_rows(full_run[0])) == strip(read_rows(resumed))


def test_help_and_dataset_defaults():
    out = subprocess.run([sys.executable, "algorithms/cal_ql.py", "--env-id", "door-human", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--cql-alpha", "--calibrate-online", "--mixing-ratio", "--cql-max-target-backup", "--resume"):
        assert flag in out, flag
    args = cal.parse_args(["--env-id", "door-human"])
    assert (args.cql_alpha, args.policy_lr, args.cql_max_target_backup, args.normalize_states, args.init,
            args.cql_clip_diff_min, args.online_steps) == (1.0, 1e-4, True, False, "corl-finetune", -200.0, 400_000)
    args = cal.parse_args(["--env-id", "walker2d-medium", "--no-calibrate-online"])
    assert not args.calibrate_online and not args.normalize_reward and args.cql_alpha == 10.0
