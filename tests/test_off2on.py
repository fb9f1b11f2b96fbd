"""algorithms/off2on.py around the updates: the online epochs (collect, then updates, the first epoch multiplied,
evaluations on epoch boundaries, --interleave), what each batch is drawn from and where online transitions go (a
scripted env, rows marked by provenance), the priorities written back; what main hands from pretraining to
fine-tuning (targets copied, fresh temperature and optimisers); end-to-end runs on a tiny Hopper dataset,
--offline-checkpoint, and a killed run resumed with identical results."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_algo, run_killed, write_hopper_d4rl
from loop_harness import ScriptedEnv, dataset, run_to_switch

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("phase", "env_step", "grad_step", "return_mean", "return_std", "normalized_score",
             "q_normalized_difference", "q_kendall_tau", "wall_time")
o2o = load_algo("off2on")
torch.set_num_threads(1)  # the tiny networks are slower with threads on a shared machine
CPU = torch.device("cpu")

# episode 0 terminates, episode 1 times out, the rest run past every epoch (the epoch's end cuts them)
SCRIPT = ((3, "terminated"), (4, "truncated")) + ((100, "none"),) * 5


def expected_rows(epoch_steps: int, n_steps: int) -> list[dict]:
    """Every epoch starts a new episode; the step that ends an epoch is stored as truncated."""
    rows, ep, t = [], 0, 0
    for step in range(n_steps):
        if step and step % epoch_steps == 0 and t:  # the epoch's reset
            ep, t = ep + 1, 0
        length, end = SCRIPT[ep]
        t += 1
        done = t == length
        cut = (step + 1) % epoch_steps == 0 or step + 1 == n_steps
        rows.append({"obs": [ep, t - 1, 1.0], "next_obs": [ep, t, 1.0], "reward": 10.0 * ep + t,
                     "terminated": float(done and end == "terminated"),
                     "truncated": float((done and end == "truncated") or (cut and not (done and end == "terminated")))})
        if done:
            ep, t = ep + 1, 0
    return rows


def small_agent(obs_dim: int = 3, act_dim: int = 2, e: int = 2):
    torch.manual_seed(0)
    critic = o2o.VectorizedCritic(obs_dim, act_dim, 2 * e, 16, n_layers=2, edac_init=False)
    return o2o.Agent(o2o.EnsembleActor(obs_dim, act_dim, e, 16), critic,
                     o2o.VectorizedCritic(obs_dim, act_dim, 2 * e, 16, n_layers=2, edac_init=False),
                     torch.zeros(e, requires_grad=True), torch.zeros((), requires_grad=True),
                     o2o.DensityRatio(obs_dim, act_dim, 16))


def row_index(storage: torch.Tensor, obs: torch.Tensor) -> int:
    hits = torch.nonzero((storage[:, :3] == obs).all(dim=1)).flatten()
    assert len(hits) == 1, f"observation {obs.tolist()} is held {len(hits)} times"
    return int(hits[0])


@pytest.mark.parametrize("interleave", [False, True])
def test_online_epochs_batches_and_priorities(tmp_path, interleave):
    epoch_steps, online_steps, mult, b, wb = 10, 25, 3, 6, 4
    args = o2o.Args(online_steps=online_steps, epoch_steps=epoch_steps, first_epoch_multiplier=mult, eval_every=10,
                    batch_size=b, weight_net_batch_size=wb, interleave=interleave, checkpoint_every=10**6,
                    log_every=10**6)
    agent, data = small_agent(), dataset()
    buffers = o2o.online_buffers(args, data, 3, 2, CPU)
    calls, evaluations = [], []

    def update(off, on, rl):
        calls.append({"n_online": buffers["online"].n_added, "n_balanced": buffers["balanced"].n_added,
                      "off": off["observations"].clone(), "on": on["observations"].clone(),
                      "rl": rl["observations"].clone(), "rl_rewards": rl["rewards"].clone()})
        return {"loss/x": torch.zeros(())}, rl["rewards"].abs() + 100.0  # distinct priorities per row

    ctx = {"env": ScriptedEnv(SCRIPT), "run_dir": tmp_path, "offline_grad_steps": 40,
           "evaluate": lambda: evaluations.append(len(calls)) or {
               "return_mean": 0.0, "return_std": 0.0, "normalized_score": 0.0, "q_normalized_difference": 0.0,
               "q_kendall_tau": 0.0}}
    logger = o2o.Logger(tmp_path)
    o2o.train_online(args, agent, buffers, update, {}, ctx, logger, None)
    logger.close()

    if interleave:  # after every step: 3 updates in the first epoch, then 1
        want = [t for t in range(1, 11) for _ in range(mult)] + list(range(11, 26))
    else:  # an epoch's steps first, then its updates: 30 after the first 10 steps, then 10 and 5
        want = [10] * 30 + [20] * 10 + [25] * 5
    assert [c["n_online"] for c in calls] == want, "updates at the wrong points of the epochs (--interleave, x mult)"
    assert [c["n_balanced"] for c in calls] == want, "online rows must reach the balanced buffer before updates"
    assert evaluations == [0, 30, 40, 45], "evaluations at env steps 0, 10, 20 (epoch boundaries) and at the end"
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(r["env_step"], r["grad_step"]) for r in rows] == [(0, 40), (10, 70), (20, 80), (25, 85)]

    stored = buffers["online"].added()
    m = len(data["rewards"])
    balanced = buffers["balanced"].storage[m:m + online_steps].numpy()
    for i, row in enumerate(expected_rows(epoch_steps, online_steps)):
        got = [stored["observations"][i], stored["next_observations"][i], stored["rewards"][i],
               stored["terminated"][i], stored["truncated"][i]]
        want_row = [row["obs"], row["next_obs"], row["reward"], row["terminated"], row["truncated"]]
        for g, w, what in zip(got, want_row, ("obs", "next_obs", "reward", "terminated", "truncated")):
            np.testing.assert_allclose(g, w, err_msg=f"online row {i}: {what}")
        np.testing.assert_allclose(balanced[i], buffers["online"].storage[i].numpy(),
                                   err_msg=f"online row {i} differs between the online and the balanced buffer")

    for j, c in enumerate(calls):
        assert len(c["off"]) == wb and (c["off"][:, 2] == -1).all(), f"update {j}: weight-net offline batch"
        assert len(c["on"]) == wb and (c["on"][:, 2] == 1).all(), f"update {j}: weight-net online batch"
        held = {tuple(o[:2]) for o in stored["observations"][:c["n_online"]].tolist()}
        assert all(tuple(o[:2]) in held for o in c["on"].tolist()), f"update {j}: an online row not stored yet"
        assert len(c["rl"]) == b, f"update {j}: the RL batch has {len(c['rl'])} rows"
    rl_rows = torch.cat([c["rl"] for c in calls])
    assert (rl_rows[:, 2] == -1).any() and (rl_rows[:, 2] == 1).any(), "RL batches draw on dataset and online rows"
    # the last RL batch's priorities were written back at the rows drawn
    leaves = buffers["balanced"].tree.levels[-1]
    for obs, r in zip(calls[-1]["rl"], calls[-1]["rl_rewards"]):
        i = row_index(buffers["balanced"].storage, obs)
        assert float(leaves[i]) == pytest.approx(abs(float(r)) + 100.0), f"row {i}: priority not written back"


def test_first_rl_batches_follow_the_priorities(tmp_path):
    """The RL batch comes from the sum-tree: with the dataset at 1 and 10 online rows at the running max
    M f / ((1 - f) 1000) = 100, about 1000 / 1020 of the rows drawn are online."""
    args = o2o.Args(online_steps=10, epoch_steps=10, first_epoch_multiplier=20, eval_every=10, batch_size=50,
                    weight_net_batch_size=2, init_online_fraction=0.5, checkpoint_every=10**6, log_every=10**6)
    data = dataset(20)
    buffers = o2o.online_buffers(args, data, 3, 2, CPU)
    buffers["balanced"].tree.max.fill_(100.0)
    shares = []

    def update(off, on, rl):
        shares.append(float((rl["observations"][:, 2] == 1).float().mean()))
        return {}, torch.full((50,), 1.0)

    ctx = {"env": ScriptedEnv(SCRIPT), "run_dir": tmp_path, "offline_grad_steps": 0, "evaluate": lambda: {
        "return_mean": 0.0, "return_std": 0.0, "normalized_score": 0.0, "q_normalized_difference": 0.0,
        "q_kendall_tau": 0.0}}
    logger = o2o.Logger(tmp_path)
    o2o.train_online(args, small_agent(), buffers, update, {}, ctx, logger, None)
    logger.close()
    assert shares[0] == pytest.approx(1000 / 1020, abs=0.03), "the first RL batch is not drawn by priority"


def test_member_batches_are_independent_draws():
    """Offline, each member draws its own uniform minibatch from the dataset: [E, B, ...], rows of the buffer."""
    buf = o2o.ReplayBuffer(200, 3, 2, CPU, seed=0)
    buf.load_dataset(dataset(200))
    batch = o2o.member_batches(buf, 3, 50)
    assert batch["observations"].shape == (3, 50, 3) and batch["rewards"].shape == (3, 50)
    rows = batch["observations"][..., 0].long()  # the dataset row each draw came from
    for k, v in batch.items():
        want = buf.storage[rows.flatten(), buf.slices[k]].view(3, 50, -1)
        torch.testing.assert_close(v.reshape(3, 50, -1), want, rtol=0, atol=0, msg=k)
    for i in range(3):
        for j in range(i):
            assert (rows[i] != rows[j]).float().mean() > 0.8, f"members {i} and {j} share their minibatch"


# ---------------------------------------------------------------- main at the switch to online
@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory) -> Path:
    """300 steps of random actions in Hopper-v4, in D4RL's layout; time-outs at 30 steps."""
    return write_hopper_d4rl(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5", steps=300, limit=30)


def tiny_args(tmp: Path, data: Path, **kw):
    base = dict(env_id="hopper-medium", dataset=str(data), device="cpu", output_dir=str(tmp), ensemble_size=2,
                hidden_dim=16, batch_size=16, weight_net_batch_size=16, cql_n_actions=2, offline_steps=20,
                offline_eval_every=10, online_steps=100, epoch_steps=25, eval_every=50, first_epoch_multiplier=2,
                eval_episodes=1, q_diag_extend_steps=5, checkpoint_every=10, log_every=10, seed=3)
    base.update(kw)
    return o2o.Args(**base)


def check_online_start(seen: dict, args) -> None:
    on = seen["online"]
    agent = on["agent"]
    for p, t in zip(agent.critic.parameters(), agent.critic_target.parameters()):
        assert torch.equal(p, t), "[O2O]: the online targets start as copies of the pretrained critics"
    assert float(agent.online_log_alpha.detach()) == 0.0, "[O2O]: alpha starts at 1 online"
    lrs = {k: [g["lr"] for g in o.param_groups] for k, o in on["optims"].items()}
    assert lrs == {"actor_optim": [args.policy_lr], "critic_optim": [args.qf_lr], "alpha_optim": [args.policy_lr],
                   "weight_optim": [args.weight_net_lr]}, f"online learning rates {lrs}"
    assert all(not o.state for o in on["optims"].values()), "[O2O] starts fresh Adam states online"
    assert on["optims"]["alpha_optim"].param_groups[0]["params"][0] is agent.online_log_alpha
    assert on["optims"]["weight_optim"].param_groups[0]["params"][0] is next(agent.weight_net.parameters())
    assert set(on["buffers"]) == {"offline", "online", "balanced"}
    on["ctx"]["evaluate"]()
    s, a = torch.randn(5, 11), torch.rand(5, 3) * 2 - 1
    with torch.no_grad():
        q = agent.critic(s, a)
        want = torch.stack([torch.minimum(q[2 * i], q[2 * i + 1]) for i in range(args.ensemble_size)]).mean(0)
        torch.testing.assert_close(seen["evaluate"]["q_fn"](s, a), want, rtol=0, atol=0,
                                   msg="Q diagnostics: the ensemble mean of the members' twin minima")
    assert seen["evaluate"]["actor"] is agent.actor


def test_switch_to_online(tmp_path, hopper_file, monkeypatch):
    args = tiny_args(tmp_path, hopper_file)
    seen = run_to_switch(o2o, monkeypatch, args)
    check_online_start(seen, args)
    off, on = seen["offline"], seen["online"]
    lrs = {k: [g["lr"] for g in o.param_groups] for k, o in off["optims"].items()}
    assert lrs == {"actor_optim": [args.cql_policy_lr], "critic_optim": [args.qf_lr],
                   "alpha_optim": [args.cql_policy_lr]}, f"offline learning rates {lrs}"
    assert off["buffer"].generator.initial_seed() == args.seed
    assert any(not torch.equal(t, p) for t, p in zip(off["target"], on["agent"].critic.parameters())), \
        "after pretraining the CQL targets lag the critics (so copying them at the switch is visible)"
    assert (on["agent"].log_alpha.detach() != 0).all(), "the offline temperatures were trained"
    assert on["ctx"]["offline_grad_steps"] == args.offline_steps
    saved = torch.load(seen["run_dir"] / "offline.pt", weights_only=False)
    assert set(saved["agent"]) == set(o2o.OFFLINE_PARTS)


def test_switch_from_offline_checkpoint(tmp_path, hopper_file, monkeypatch):
    first = run_to_switch(o2o, monkeypatch, tiny_args(tmp_path / "a", hopper_file))
    saved = torch.load(first["run_dir"] / "offline.pt", weights_only=False)
    args = tiny_args(tmp_path / "b", hopper_file, offline_checkpoint=str(first["run_dir"] / "offline.pt"), seed=5)
    seen = run_to_switch(o2o, monkeypatch, args)
    assert "offline" not in seen, "--offline-checkpoint skips pretraining"
    agent = seen["online"]["agent"]
    for part in ("actor", "critic"):
        for k, v in getattr(agent, part).state_dict().items():
            torch.testing.assert_close(v, saved["agent"][part][k], rtol=0, atol=0, msg=f"{part}.{k}")
    torch.testing.assert_close(agent.log_alpha, saved["agent"]["log_alpha"], rtol=0, atol=0)
    check_online_start(seen, args)
    assert seen["online"]["ctx"]["offline_grad_steps"] == 0
    with pytest.raises(o2o.RunError, match="does not fit"):
        o2o.main(tiny_args(tmp_path / "c", hopper_file, offline_checkpoint=str(first["run_dir"] / "offline.pt"),
                           ensemble_size=3))


@pytest.mark.parametrize("bad,match", [(dict(eval_every=30), "multiple of --epoch-steps"),
                                       (dict(init_online_fraction=1.0), "init-online-fraction"),
                                       (dict(temperature=0.0), "temperature"),
                                       (dict(ensemble_size=0), "at least 1")])
def test_bad_settings_are_clear_errors(tmp_path, hopper_file, bad, match):
    with pytest.raises(o2o.RunError, match=match):
        o2o.main(tiny_args(tmp_path, hopper_file, **bad))


# ---------------------------------------------------------------- end to end
def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, hopper_file) -> Path:
    return o2o.main(tiny_args(tmp_path_factory.mktemp("full"), hopper_file))


def test_end_to_end(full_run):
    config = json.loads((full_run / "config.json").read_text())
    assert config["algo"] == "off2on" and config["eval_env_id"] == "Hopper-v4" and len(config["dataset_sha256"]) == 64
    assert config["args"]["ensemble_size"] == 2 and config["args"]["interleave"] is False
    rows = read_rows(full_run)
    for row in rows:
        for key in EVAL_KEYS:
            assert key in row and (key == "phase" or math.isfinite(row[key])), (key, row)
    assert [r["grad_step"] for r in rows if r["phase"] == "offline"] == [10, 20]
    online = [(r["env_step"], r["grad_step"]) for r in rows if r["phase"] == "online"]
    # epochs of 25 steps: 50 updates after the first (x2), then 25 each
    assert online == [(0, 20), (50, 20 + 50 + 25), (100, 20 + 50 + 75)]
    assert list(full_run.glob("events.out.tfevents.*"))
    assert (full_run / "offline.pt").is_file()
    ckpt = torch.load(full_run / "checkpoint.pt", weights_only=False)
    assert ckpt["phase"] == "done" and ckpt["agent"]["critic"]["layers.0.weight"].shape[0] == 4


def test_from_offline_checkpoint_interleaved(tmp_path, full_run, hopper_file):
    run_dir = o2o.main(tiny_args(tmp_path, hopper_file, offline_checkpoint=str(full_run / "offline.pt"),
                                 interleave=True))
    rows = read_rows(run_dir)
    assert {r["phase"] for r in rows} == {"online"}
    assert [(r["env_step"], r["grad_step"]) for r in rows] == [(0, 0), (50, 75), (100, 125)]


@pytest.mark.parametrize("kill_at", [1, 3])  # 1: in the offline phase; 3: in the online phase (env step 50)
def test_resume_matches_uninterrupted(tmp_path, full_run, hopper_file, kill_at):
    killed = run_killed(o2o, tiny_args(tmp_path, hopper_file), kill_at)
    phase = torch.load(killed / "checkpoint.pt", weights_only=False)["phase"]
    assert phase == ("offline" if kill_at == 1 else "online")
    resumed = o2o.main(o2o.Args(resume=str(killed)))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["agent"] for d in (full_run, resumed))
    for module in ("actor", "critic", "critic_target", "weight_net"):
        for k in a[module]:
            torch.testing.assert_close(a[module][k], b[module][k], rtol=0, atol=0, msg=f"{module}.{k}")
    for k in ("log_alpha", "online_log_alpha"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(read_rows(full_run)) == strip(read_rows(resumed))


def test_help_and_dataset_defaults():
    out = subprocess.run([sys.executable, "algorithms/off2on.py", "--env-id", "pen-human", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--ensemble-size", "--temperature", "--init-online-fraction", "--online-buffer-size",
                 "--first-epoch-multiplier", "--interleave", "--weight-net-lr", "--offline-checkpoint", "--resume"):
        assert flag in out, flag
    assert "400000" in out
