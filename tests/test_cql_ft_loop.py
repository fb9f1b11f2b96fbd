"""algorithms/cql_ft.py around the update: what the online loop stores and samples (a scripted env whose episodes
terminate, time out or run into the budget; buffers whose rows are marked by provenance), and what main hands to the
online phase (the same agent, temperature and optimiser state, the online update, the buffers with the dataset where
it belongs, reward scaling as a scalar function, min(Q1, Q2) of the online critics for the Q diagnostics)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_algo, write_hopper_d4rl
from loop_harness import (SCALE, ScriptedEnv, assert_rows, assert_same_state, check_initial_agent,
                          check_q_diagnostics, cql_args, dataset, direct_reward_scale, expected_online_rows,
                          make_cql_agent, run_to_switch)

cql = load_algo("cql_ft")
torch.set_num_threads(1)  # the tiny networks are slower with threads on a shared machine


@pytest.mark.parametrize("buffer_mode", ["single", "mixed"])
def test_online_loop_stores_and_samples(tmp_path, buffer_mode):
    online_steps, batch_size, ratio = 12, 8, 0.25
    args = cql.Args(online_steps=online_steps, eval_every=5, batch_size=batch_size, buffer_mode=buffer_mode,
                    mixing_ratio=ratio, checkpoint_every=10**6, log_every=10**6)
    agent, data, device = make_cql_agent(cql), dataset(), torch.device("cpu")
    n_data = len(data["rewards"])
    if buffer_mode == "single":
        buffers = {"online": cql.ReplayBuffer(n_data + online_steps, 3, 2, device, 1)}
        buffers["online"].load_dataset(data)
    else:
        buffers = {"online": cql.ReplayBuffer(online_steps, 3, 2, device, 1),
                   "offline": cql.ReplayBuffer(n_data, 3, 2, device, 2)}
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
    logger = cql.Logger(tmp_path)
    cql.train_online(args, agent, buffers, update, {}, ctx, logger, None)
    logger.close()

    # one update per env step, after that step's transition is stored; no warm-up
    assert [c["n_online"] for c in calls] == list(range(1, online_steps + 1)), \
        "each update must follow the env step whose transition it can already sample"
    assert evaluations == [0, 5, 10, 12], "evaluations at env steps 0, 5, 10 and at the end"

    stored = buffers["online"].added()
    want = expected_online_rows(online_steps)
    assert len(stored["rewards"]) == online_steps
    for i, row in enumerate(want):
        assert_rows(stored["observations"][i], row["obs"], f"online row {i}: observation")
        assert_rows(stored["next_observations"][i], row["next_obs"],
                    f"online row {i}: next observation (the real one, not the reset's)")
        assert stored["rewards"][i] == pytest.approx(row["reward"]), \
            f"online row {i}: reward must be the env reward through reward_fn (x{SCALE})"
        assert stored["terminated"][i] == row["terminated"] and stored["truncated"][i] == row["truncated"], \
            (f"online row {i}: stored terminated/truncated {stored['terminated'][i]}/{stored['truncated'][i]}, env "
             f"said {row['terminated']}/{row['truncated']} (a time-out is not a termination)")
    # stochastic actions: no stored action is the deterministic tanh(mean)
    with torch.no_grad():
        mean_action = agent.actor(torch.as_tensor(stored["observations"]), deterministic=True)[0].numpy()
    assert np.all(np.abs(stored["actions"]) <= 1) and np.abs(stored["actions"] - mean_action).min() > 1e-4, \
        "online actions must be sampled from the policy, not its deterministic mean"

    n_offline = int(batch_size * ratio)
    for j, c in enumerate(calls):
        obs = c["batch"]["observations"]
        assert len(obs) == batch_size, f"update {j + 1}: batch of {len(obs)} rows, want {batch_size}"
        seen = {(float(o[0]), float(o[1])) for o in stored["observations"][:c["n_online"]]}
        online_rows = [tuple(float(x) for x in o[:2]) for o in obs if o[2] > 0]
        assert all(r in seen for r in online_rows), f"update {j + 1}: an online row that was not stored yet"
        if buffer_mode == "mixed":
            n_data_rows = int((obs[:, 2] == -1).sum())  # the rows' order inside a batch does not matter
            assert n_data_rows == n_offline, \
                (f"update {j + 1}: mixed batch must hold {n_offline} dataset rows (mixing_ratio {ratio}) and "
                 f"{batch_size - n_offline} online rows, has {n_data_rows} and {batch_size - n_data_rows}")
    if buffer_mode == "single":
        prov = torch.cat([c["batch"]["observations"][:, 2] for c in calls])
        assert (prov == -1).any() and (prov == 1).any(), "single buffer: batches draw on dataset and online rows"


# ---------------------------------------------------------------- main at the switch to online
@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory) -> Path:
    """300 steps of random actions in Hopper-v4, in D4RL's layout; time-outs at 30 steps."""
    return write_hopper_d4rl(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5", steps=300, limit=30)


def tiny_args(tmp: Path, data: Path, **kw):
    return cql_args(cql, tmp, data, **kw)


@pytest.mark.parametrize("buffer_mode", ["single", "mixed"])
def test_switch_to_online(tmp_path, hopper_file, monkeypatch, buffer_mode):
    args = tiny_args(tmp_path, hopper_file, buffer_mode=buffer_mode, mixing_ratio=0.25, normalize_reward=True)
    seen = run_to_switch(cql, monkeypatch, args)
    off, on = seen["offline"], seen["online"]
    data, _ = cql.load_dataset(cql.resolve_task(args.env_id, None, args.dataset), args.dataset)
    n_data = len(data["rewards"])
    scale = direct_reward_scale(hopper_file)

    check_initial_agent(seen["initial"], data)
    assert off["update"] is seen["fns"][0] and on["update"] is seen["fns"][1], \
        "offline phase gets the offline update, online phase the online one (--online-mode, --cql-alpha-online)"
    assert on["agent"] is off["agent"] and on["optims"] is off["optims"], \
        "fine-tuning continues the pretrained networks, temperature and optimisers"
    saved = torch.load(seen["run_dir"] / "offline.pt", weights_only=False)
    assert_same_state(on["agent_state"], saved["agent"], "agent at the switch vs offline.pt")
    assert_same_state(on["optims_state"], saved["optims"], "optimisers at the switch vs offline.pt")
    assert on["optims_state"]["actor_optim"]["state"][0]["step"] == args.offline_steps, "Adam state kept"
    lrs = {k: [g["lr"] for g in o.param_groups] for k, o in on["optims"].items()}
    assert lrs == {"actor_optim": [args.policy_lr], "critic_optim": [args.qf_lr], "alpha_optim": [args.policy_lr]}, \
        f"online learning rates {lrs}: the offline ones, unchanged (CORL)"
    assert on["ctx"]["offline_grad_steps"] == args.offline_steps

    # reward scaling: one scalar factor, a scalar in gives a scalar out (ReplayBuffer.add takes a float)
    reward = on["ctx"]["reward_fn"](np.float64(2.0))
    assert np.ndim(reward) == 0 and float(reward) == pytest.approx(2.0 * scale, rel=1e-6), \
        f"online reward_fn(2.0) = {reward!r}, want the scalar {2.0 * scale}"
    assert seen["evaluate"]["reward_fn"] is on["ctx"]["reward_fn"], "Q diagnostics see the critic's rewards"
    assert seen["evaluate"]["seed"] == 100_000 * (args.seed + 1) and seen["evaluate"]["gamma"] == args.gamma
    check_q_diagnostics(seen)

    # the offline phase samples the dataset, rewards scaled
    buf = off["buffer"]
    assert buf.size == n_data and buf.generator.initial_seed() == args.seed
    rows = buf.storage[:n_data]
    assert_rows(rows[:, buf.slices["rewards"]].numpy(), data["rewards"] * scale,
                f"offline buffer rewards: the dataset's times the scale {scale:.4g}", rtol=1e-5)
    assert_rows(rows[:, buf.slices["observations"]].numpy(), data["observations"], "offline buffer observations")

    bufs = on["buffers"]
    if buffer_mode == "single":
        assert set(bufs) == {"online"}, "--buffer-mode single: one buffer"
        b = bufs["online"]
        assert b.capacity == n_data + args.online_steps and b.size == n_data and b.n_added == 0, \
            "single buffer: the whole dataset, then room for every online step (CORL: nothing evicted)"
        assert b.generator.initial_seed() == args.seed + 1
        assert_rows(b.storage[:n_data].numpy(), buf.storage[:n_data].numpy(),
                    "single buffer: its first rows must be the (scaled) dataset the offline phase used")
    else:
        assert set(bufs) == {"online", "offline"}, "--buffer-mode mixed: a dataset buffer and an online buffer"
        assert bufs["offline"].size == bufs["offline"].capacity == n_data
        assert_rows(bufs["offline"].storage.numpy(), buf.storage[:n_data].numpy(),
                    "online phase's dataset buffer: the (scaled) dataset the offline phase used")
        assert bufs["online"].size == 0 and bufs["online"].capacity == args.online_steps
        seeds = (bufs["online"].generator.initial_seed(), bufs["offline"].generator.initial_seed())
        assert seeds == (args.seed + 1, args.seed + 2), f"buffer seeds {seeds}: two independent streams"


def test_switch_from_offline_checkpoint(tmp_path, hopper_file, monkeypatch):
    first = run_to_switch(cql, monkeypatch, tiny_args(tmp_path / "a", hopper_file))
    path = first["run_dir"] / "offline.pt"
    saved = torch.load(path, weights_only=False)
    assert float(saved["agent"]["log_alpha"].detach()) != 0.0
    seen = run_to_switch(cql, monkeypatch, tiny_args(tmp_path / "b", hopper_file, offline_checkpoint=str(path)))
    assert "offline" not in seen, "--offline-checkpoint skips pretraining"
    on = seen["online"]
    assert_same_state(on["agent_state"], saved["agent"], "agent from offline.pt (temperature included)")
    assert_same_state(on["optims_state"], saved["optims"], "optimisers from offline.pt (Adam moments kept)")
    assert on["update"] is seen["fns"][1] and on["ctx"]["offline_grad_steps"] == 0
    assert math.isfinite(float(on["agent"].log_alpha.detach()))
