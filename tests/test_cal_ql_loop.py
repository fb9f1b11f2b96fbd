"""algorithms/cal_ql.py around the update: what the online loop stores and samples (a scripted env whose episodes
terminate, time out or run into the budget; buffers whose rows are marked by provenance): whole episodes with their
Monte-Carlo returns, then as many updates as the episode had steps, on batches of dataset rows then online rows; and
what main hands to the online phase (the same agent, temperature and optimiser state, the online update, the dataset
with returns of the scaled rewards, an empty online buffer, reward scaling as a scalar function, min(Q1, Q2) of the
online critics for the Q diagnostics)."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import load_algo, write_hopper_d4rl
from loop_harness import (SCALE, ScriptedEnv, assert_rows, assert_same_state, check_initial_agent,
                          check_q_diagnostics, cql_args, dataset, direct_reward_scale, expected_online_rows,
                          make_cql_agent, run_to_switch)

cal = load_algo("cal_ql")
torch.set_num_threads(1)  # the tiny networks are slower with threads on a shared machine


DATA_RETURN = -7.0  # the dataset rows' Monte-Carlo return, a marker


def test_online_loop_stores_episodes_and_samples(tmp_path):
    online_steps, batch_size, ratio, gamma = 12, 8, 0.25, 0.9
    args = cal.Args(online_steps=online_steps, eval_every=5, batch_size=batch_size, mixing_ratio=ratio, gamma=gamma,
                    checkpoint_every=10**6, log_every=10**6)
    agent, device = make_cql_agent(cal), torch.device("cpu")
    data = dataset()
    data["mc_returns"] = np.full(len(data["rewards"]), DATA_RETURN)
    buffers = {"online": cal.MCReplayBuffer(online_steps, 3, 2, device, 1),
               "offline": cal.MCReplayBuffer(len(data["rewards"]), 3, 2, device, 2)}
    buffers["offline"].load_dataset(data)
    calls = []

    def update(batch):
        calls.append({"n_online": buffers["online"].n_added, "batch": {k: v.clone() for k, v in batch.items()}})
        return {}

    evaluations = []
    ctx = {"env": ScriptedEnv(), "run_dir": tmp_path, "reward_fn": lambda r: r * SCALE, "offline_grad_steps": 40,
           "evaluate": lambda: evaluations.append(len(calls)) or {
               "return_mean": 0.0, "return_std": 0.0, "normalized_score": 0.0, "q_normalized_difference": 0.0,
               "q_kendall_tau": 0.0}}
    logger = cal.Logger(tmp_path)
    try:
        cal.train_online(args, agent, buffers, update, {}, ctx, logger, None)
    except RuntimeError as e:  # sampling an empty online buffer, say
        pytest.fail(f"the online loop failed after {len(calls)} updates ({e}); updates must only start once the "
                    f"first episode is stored")
    logger.close()

    # a whole episode first (3, 4 and 2 steps, then 3 cut by the budget), then as many updates as it had steps
    lengths = [3, 4, 2, 3]
    ends = np.cumsum(lengths)
    want_n = [int(e) for e, n in zip(ends, lengths) for _ in range(n)]
    assert [c["n_online"] for c in calls] == want_n, \
        "each episode's rows (with their returns) go in when it ends, then one update per step it had"
    assert evaluations == [0, 3, 9, 12], "evaluations at env steps 0, 5, 10 (mid-episode) and at the end"

    stored = buffers["online"].added()
    stored["mc_returns"] = stored["mc_returns"].ravel()  # the shared buffer squeezes only its own scalar columns
    want = expected_online_rows(online_steps)
    assert len(stored["rewards"]) == online_steps
    returns, start = [], 0
    for n in lengths:  # discounted return-to-go inside each episode, nothing past its last step
        r = [row["reward"] for row in want[start:start + n]]
        returns += [sum(gamma ** j * x for j, x in enumerate(r[t:])) for t in range(n)]
        start += n
    for i, row in enumerate(want):
        assert_rows(stored["observations"][i], row["obs"], f"online row {i}: observation")
        assert_rows(stored["next_observations"][i], row["next_obs"],
                    f"online row {i}: next observation (the real one, not the reset's)")
        assert stored["rewards"][i] == pytest.approx(row["reward"]), \
            f"online row {i}: reward must be the env reward through reward_fn (x{SCALE})"
        assert stored["terminated"][i] == row["terminated"] and stored["truncated"][i] == row["truncated"], \
            (f"online row {i}: stored terminated/truncated {stored['terminated'][i]}/{stored['truncated'][i]}, env "
             f"said {row['terminated']}/{row['truncated']} (a time-out is not a termination)")
        assert stored["mc_returns"][i] == pytest.approx(returns[i], rel=1e-5), \
            (f"online row {i}: Monte-Carlo return {stored['mc_returns'][i]}, want {returns[i]}: the discounted "
             f"scaled rewards to the end of its own episode (the bound applies to online episodes)")
    with torch.no_grad():
        mean_action = agent.actor(torch.as_tensor(stored["observations"]), deterministic=True)[0].numpy()
    assert np.all(np.abs(stored["actions"]) <= 1) and np.abs(stored["actions"] - mean_action).min() > 1e-4, \
        "online actions must be sampled from the policy, not its deterministic mean"

    n_offline = int(batch_size * ratio)
    by_step = {(float(o[0]), float(o[1])): float(g) for o, g in zip(stored["observations"], stored["mc_returns"])}
    for j, c in enumerate(calls):
        obs, mc = c["batch"]["observations"], c["batch"]["mc_returns"].view(-1)
        assert len(obs) == batch_size, f"update {j + 1}: batch of {len(obs)} rows, want {batch_size}"
        data_rows = obs[:, 2] == -1  # the rows' order inside a batch does not matter
        n_data_rows = int(data_rows.sum())
        assert n_data_rows == n_offline, \
            (f"update {j + 1}: batch must hold {n_offline} dataset rows (mixing_ratio {ratio}) and "
             f"{batch_size - n_offline} online rows, has {n_data_rows} and {batch_size - n_data_rows}")
        assert (mc[data_rows] == DATA_RETURN).all(), f"update {j + 1}: dataset rows lost their returns"
        seen = {(float(o[0]), float(o[1])) for o in stored["observations"][:c["n_online"]]}
        for o, g in zip(obs[~data_rows], mc[~data_rows]):
            key = (float(o[0]), float(o[1]))
            assert key in seen, f"update {j + 1}: an online row that was not stored yet"
            assert float(g) == pytest.approx(by_step[key]), f"update {j + 1}: a row's return is not its own"


# ---------------------------------------------------------------- main at the switch to online
@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory) -> Path:
    """300 steps of random actions in Hopper-v4, in D4RL's layout; time-outs at 30 steps."""
    return write_hopper_d4rl(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5", steps=300, limit=30)


def tiny_args(tmp: Path, data: Path, **kw):
    return cql_args(cal, tmp, data, **kw)


def direct_dataset_returns(path: Path, scale: float, gamma: float) -> np.ndarray:
    """Discounted return-to-go of every kept row of the raw file on the scaled rewards, each episode on its own."""
    with h5py.File(path, "r") as f:
        r, term, timeout = f["rewards"][()].astype(np.float64), f["terminals"][()], f["timeouts"][()]
    out, episode, n = [], [], len(r)
    for i in range(n - 1):
        if timeout[i]:
            continue
        episode.append(scale * r[i])
        if term[i] or timeout[i + 1] or i + 1 == n - 1:
            out += [sum(gamma ** j * x for j, x in enumerate(episode[t:])) for t in range(len(episode))]
            episode = []
    return np.asarray(out)


@pytest.mark.parametrize("calibrate_online", [True, False])
def test_switch_to_online(tmp_path, hopper_file, monkeypatch, calibrate_online):
    args = tiny_args(tmp_path, hopper_file, mixing_ratio=0.25, normalize_reward=True,
                     calibrate_online=calibrate_online)
    seen = run_to_switch(cal, monkeypatch, args)
    off, on = seen["offline"], seen["online"]
    data, _ = cal.load_dataset(cal.resolve_task(args.env_id, None, args.dataset), args.dataset)
    n_data = len(data["rewards"])
    scale = direct_reward_scale(hopper_file)

    check_initial_agent(seen["initial"], data)
    assert off["update"] is seen["fns"][0] and on["update"] is seen["fns"][1], \
        "offline phase gets the offline update, online phase the online one (--calibrate-online)"
    assert on["agent"] is off["agent"] and on["optims"] is off["optims"], \
        "fine-tuning continues the pretrained networks, temperature and optimisers"
    saved = torch.load(seen["run_dir"] / "offline.pt", weights_only=False)
    assert_same_state(on["agent_state"], saved["agent"], "agent at the switch vs offline.pt")
    assert_same_state(on["optims_state"], saved["optims"], "optimisers at the switch vs offline.pt")
    assert on["optims_state"]["actor_optim"]["state"][0]["step"] == args.offline_steps, "Adam state kept"
    lrs = {k: [g["lr"] for g in o.param_groups] for k, o in on["optims"].items()}
    assert lrs == {"actor_optim": [args.policy_lr], "critic_optim": [args.qf_lr], "alpha_optim": [args.policy_lr]}, \
        f"online learning rates {lrs}: the offline ones, unchanged"
    assert on["ctx"]["offline_grad_steps"] == args.offline_steps

    reward = on["ctx"]["reward_fn"](np.float64(2.0))
    assert np.ndim(reward) == 0 and float(reward) == pytest.approx(2.0 * scale, rel=1e-6), \
        f"online reward_fn(2.0) = {reward!r}, want the scalar {2.0 * scale}"
    assert seen["evaluate"]["reward_fn"] is on["ctx"]["reward_fn"], "Q diagnostics see the critic's rewards"
    assert seen["evaluate"]["seed"] == 100_000 * (args.seed + 1) and seen["evaluate"]["gamma"] == args.gamma
    check_q_diagnostics(seen)

    # the offline phase samples the dataset: rewards scaled, returns computed on the scaled rewards
    buf = off["buffer"]
    assert buf.size == n_data and buf.generator.initial_seed() == args.seed
    rows = buf.storage[:n_data]
    assert_rows(rows[:, buf.slices["rewards"]].numpy(), data["rewards"] * scale,
                f"offline buffer rewards: the dataset's times the scale {scale:.4g}", rtol=1e-5)
    assert_rows(rows[:, buf.slices["observations"]].numpy(), data["observations"], "offline buffer observations")
    want_returns = direct_dataset_returns(hopper_file, scale, args.gamma)
    assert_rows(rows[:, buf.slices["mc_returns"]].numpy().ravel(), want_returns,
                "dataset returns: discounted within each episode (ended by a termination or a time-out), on the "
                "scaled rewards", rtol=1e-5, atol=1e-4)

    bufs = on["buffers"]
    assert set(bufs) == {"online", "offline"}, "online: a dataset buffer and an online buffer"
    assert bufs["offline"].size == bufs["offline"].capacity == n_data
    assert_rows(bufs["offline"].storage.numpy(), buf.storage[:n_data].numpy(),
                "online phase's dataset buffer: the dataset, with returns, the offline phase used")
    assert bufs["online"].size == 0 and bufs["online"].capacity == args.online_steps
    seeds = (bufs["online"].generator.initial_seed(), bufs["offline"].generator.initial_seed())
    assert seeds == (args.seed + 1, args.seed + 2), f"buffer seeds {seeds}: two independent streams"


def test_switch_from_offline_checkpoint(tmp_path, hopper_file, monkeypatch):
    first = run_to_switch(cal, monkeypatch, tiny_args(tmp_path / "a", hopper_file))
    path = first["run_dir"] / "offline.pt"
    saved = torch.load(path, weights_only=False)
    assert float(saved["agent"]["log_alpha"].detach()) != 0.0
    seen = run_to_switch(cal, monkeypatch, tiny_args(tmp_path / "b", hopper_file, offline_checkpoint=str(path)))
    assert "offline" not in seen, "--offline-checkpoint skips pretraining"
    on = seen["online"]
    assert_same_state(on["agent_state"], saved["agent"], "agent from offline.pt (temperature included)")
    assert_same_state(on["optims_state"], saved["optims"], "optimisers from offline.pt (Adam moments kept)")
    assert on["update"] is seen["fns"][1] and on["ctx"]["offline_grad_steps"] == 0
    assert math.isfinite(float(on["agent"].log_alpha.detach()))
