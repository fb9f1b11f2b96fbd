"""algorithms/aca.py end to end on a tiny Hopper-v4 dataset: offline SAC+ML then online ACA with the protocol's
outputs; the switch as main applies it (R built from Z, targets, alpha reset, pi_0 frozen, w = i0, the top-k episodes
or no offline data in the online buffer, updates once the buffer holds more than a batch); --offline-checkpoint;
a killed run resumed bit-exactly; the command line and its errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_algo, run_killed, write_hopper_d4rl

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("phase", "env_step", "grad_step", "return_mean", "return_std", "normalized_score",
             "q_normalized_difference", "q_kendall_tau", "wall_time")
aca = load_algo("aca")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory) -> Path:
    """600 steps of random actions in Hopper-v4, in D4RL's layout, episodes cut at 100 steps by time-outs."""
    return write_hopper_d4rl(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5", 600, 100)


def tiny_args(tmp: Path, data: Path, **kw):
    base = dict(env_id="hopper-medium", dataset=str(data), device="cpu", output_dir=str(tmp), batch_size=16,
                hidden_dim=16, offline_steps=40, offline_eval_every=20, online_steps=150, eval_every=100,
                eval_episodes=1, q_diag_extend_steps=5, checkpoint_every=20, log_every=20, n_trajs=2)
    base.update(kw)
    return aca.Args(**base)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, hopper_file) -> Path:
    """An uninterrupted run with the top-2 episodes online, shared by the tests below."""
    return aca.main(tiny_args(tmp_path_factory.mktemp("full"), hopper_file))


def test_end_to_end(full_run, hopper_file):
    config = json.loads((full_run / "config.json").read_text())
    assert config["algo"] == "aca" and config["eval_env_id"] == "Hopper-v4" and len(config["dataset_sha256"]) == 64
    assert config["args"]["n_trajs"] == 2 and config["args"]["interpolation"] == [1.0, 40.0, 0.5]
    rows = read_rows(full_run)
    for row in rows:
        for key in EVAL_KEYS:
            assert key in row and (key == "phase" or math.isfinite(row[key])), (key, row)
    assert [r["grad_step"] for r in rows if r["phase"] == "offline"] == [20, 40]
    online = [r for r in rows if r["phase"] == "online"]
    assert [r["env_step"] for r in online] == [0, 100, 150]
    # the top-2 episodes (> 16 rows) are there from the start: one update per env step from the first
    assert online[-1]["grad_step"] == 40 + 150
    assert list(full_run.glob("events.out.tfevents.*"))
    offline, done = load(full_run / "offline.pt"), load(full_run / "checkpoint.pt")
    assert done["phase"] == "done" and set(offline["optims"]) == {"actor_optim", "critic_optim", "alpha_optim",
                                                                 "baseline_optim"}
    # pi_0 is the offline actor, frozen through fine-tuning, while the actor moved away from it
    for k, v in offline["agent"]["actor"].items():
        assert torch.equal(done["agent"]["reference"][k], v), f"pi_0 changed online ({k})"
    assert any(not torch.equal(done["agent"]["actor"][k], v) for k, v in offline["agent"]["actor"].items())
    assert float(done["agent"]["w"]) == pytest.approx(1.0 - 150 / 40_000), "w annealed once per update"
    # the online buffer held the top-2 episodes and then the online steps
    data, _ = aca.load_dataset(aca.resolve_task("hopper-medium", None, str(hopper_file)), str(hopper_file))
    top, chosen = aca.top_episodes(data, 2)
    assert len(chosen) == 2 and 16 < len(top["rewards"]) < len(data["rewards"])


def test_q_estimate_is_the_aligned_critic(full_run):
    """At online env step 0 the evaluation scores min R + C = min Z + w C(log pi_0), not the offline critics."""
    rows = read_rows(full_run)
    offline_last, online_first = rows[1], rows[2]
    assert offline_last["return_mean"] == online_first["return_mean"], "the deterministic policy is unchanged"
    assert offline_last["q_normalized_difference"] != online_first["q_normalized_difference"]


def switch_state(run_dir: Path) -> dict:
    return load(run_dir / "checkpoint.pt")["agent"]


def test_offline_checkpoint_and_the_switch(tmp_path, full_run, hopper_file):
    """From offline.pt, with no offline data online and fewer env steps than a batch: no update runs, so the final
    checkpoint holds the agent exactly as main aligned it."""
    run_dir = aca.main(tiny_args(tmp_path / "a", hopper_file, offline_checkpoint=str(full_run / "offline.pt"),
                                 online_steps=12, n_trajs=0, interpolation=(0.8, 40.0, 0.5)))
    rows = read_rows(run_dir)
    assert {r["phase"] for r in rows} == {"online"} and rows[-1]["grad_step"] == 0
    offline, agent = load(full_run / "offline.pt")["agent"], switch_state(run_dir)
    obs_dim = offline["baseline"]["layers.0.weight"].shape[1]
    assert torch.equal(agent["critic"]["layers.0.weight"][:, :obs_dim], offline["baseline"]["layers.0.weight"])
    assert (agent["critic"]["layers.0.weight"][:, obs_dim:] == 0).all(), "action columns zeroed"
    for k, v in offline["baseline"].items():
        if k != "layers.0.weight":
            assert torch.equal(agent["critic"][k], v), f"R's {k} is Z's"
        assert torch.equal(agent["baseline"][k], v)
    for k, v in agent["critic"].items():
        assert torch.equal(agent["critic_target"][k], v), "targets hard-copied from R"
        assert not torch.equal(v, offline["critic"][k]), "the offline critics are discarded"
    for k, v in offline["actor"].items():
        assert torch.equal(agent["reference"][k], v) and torch.equal(agent["actor"][k], v)
    assert offline["log_alpha"].item() != 0.0 and agent["log_alpha"].item() == 0.0, "alpha reset to 1"
    assert float(agent["w"]) == 0.8, "w starts at i0"
    critic = aca.VectorizedCritic(obs_dim, 3, 2, 16, n_layers=2, edac_init=False)
    critic.load_state_dict(agent["critic"])
    baseline = aca.VectorizedBaseline(obs_dim, 2, 16)
    baseline.load_state_dict(offline["baseline"])
    obs, actions = torch.randn(50, obs_dim), torch.rand(50, 3) * 2 - 1
    with torch.no_grad():
        assert torch.equal(critic(obs, actions), baseline(obs)), "R(s, a) = Z(s)"
    # the Adam states continue from offline.pt (d3rlpy's load_model restores the optimisers)
    saved, now = load(full_run / "offline.pt")["optims"], load(run_dir / "checkpoint.pt")["optims"]
    for name in saved:
        for i, state in saved[name]["state"].items():
            for k, v in state.items():
                assert torch.equal(now[name]["state"][i][k], v), f"{name} state {i}.{k}"
    with pytest.raises(aca.RunError, match="does not fit"):
        aca.main(tiny_args(tmp_path / "b", hopper_file, offline_checkpoint=str(full_run / "offline.pt"),
                           hidden_dim=32))


def test_learning_rates_of_this_run_win_over_offline_pt(tmp_path, full_run, hopper_file):
    """offline.pt carries Adam's states and, inside them, the pretraining run's learning rates: a fine-tuning run's
    --actor-lr must still apply (here 0: the actor stays pi_0 while R learns)."""
    run_dir = aca.main(tiny_args(tmp_path, hopper_file, offline_checkpoint=str(full_run / "offline.pt"),
                                 online_steps=40, n_trajs=2, actor_lr=0.0, checkpoint_every=1000))
    agent, offline = switch_state(run_dir), load(full_run / "offline.pt")["agent"]
    assert read_rows(run_dir)[-1]["grad_step"] > 0
    for k, v in offline["actor"].items():
        assert torch.equal(agent["actor"][k], v), f"actor {k} moved at lr 0"
    assert load(run_dir / "checkpoint.pt")["optims"]["actor_optim"]["param_groups"][0]["lr"] == 0.0


def test_no_offline_data_online(tmp_path, full_run, hopper_file):
    """n_trajs 0 (random, medium): the buffer starts empty and updates start once it holds more than a batch."""
    run_dir = aca.main(tiny_args(tmp_path, hopper_file, offline_checkpoint=str(full_run / "offline.pt"),
                                 online_steps=40, n_trajs=0, checkpoint_every=1000))
    assert read_rows(run_dir)[-1]["grad_step"] == 40 - 16
    assert float(switch_state(run_dir)["w"]) == pytest.approx(1.0 - 24 / 40_000)


@pytest.mark.parametrize("kill_at", [1, 3])  # 1: in the offline phase; 3: in the online phase
def test_resume_matches_uninterrupted(tmp_path, full_run, hopper_file, kill_at):
    killed = run_killed(aca, tiny_args(tmp_path, hopper_file), kill_at)
    assert load(killed / "checkpoint.pt")["phase"] == ("offline" if kill_at == 1 else "online")
    resumed = aca.main(aca.Args(resume=str(killed)))
    a, b = switch_state(full_run), switch_state(resumed)
    assert set(a) == {"actor", "critic", "critic_target", "baseline", "reference", "log_alpha", "w"}
    for module in ("actor", "critic", "critic_target", "baseline", "reference"):
        for k in a[module]:
            torch.testing.assert_close(a[module][k], b[module][k], rtol=0, atol=0, msg=f"{module}.{k}")
    for k in ("log_alpha", "w"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(read_rows(full_run)) == strip(read_rows(resumed))


def test_help_and_bad_input(tmp_path, hopper_file):
    out = subprocess.run([sys.executable, "algorithms/aca.py", "--env-id", "pen-human", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--alpha-ml", "--beta", "--interpolation", "--n-trajs", "--actor-grad-clip", "--resume",
                 "--offline-checkpoint"):
        assert flag in out, flag
    args = aca.parse_args(["--env-id", "walker2d-medium-expert", "--interpolation", "1", "20", "0.2"])
    assert (args.beta, args.interpolation, args.n_trajs) == (15.0, (1.0, 20.0, 0.2), 50)
    with pytest.raises(aca.RunError, match="interpolation"):
        aca.main(tiny_args(tmp_path, hopper_file, interpolation=(1.0, 0.0, 0.5)))
    with pytest.raises(aca.RunError, match="n-trajs"):
        aca.main(tiny_args(tmp_path, hopper_file, n_trajs=-2))
    assert not list(tmp_path.iterdir()), "bad input is refused before a run directory is made"

