"""so2.py and sac.py run end to end on a tiny dataset with a real MuJoCo environment, write the protocol's outputs,
and a run killed part-way and resumed ends with exactly the parameters of one that was never interrupted."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_killed, write_hopper_d4rl

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("phase", "env_step", "grad_step", "return_mean", "return_std", "normalized_score",
             "q_normalized_difference", "q_kendall_tau", "wall_time")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"e2e_{name}", ROOT / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


so2, sac = load("so2"), load("sac")


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory) -> Path:
    """600 steps of random actions in Hopper-v4, in D4RL's layout, episodes cut at 100 steps by time-outs."""
    return write_hopper_d4rl(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5", steps=600, limit=100)


def so2_args(tmp: Path, data: Path, **kw):
    base = dict(env_id="hopper-medium", dataset=str(data), device="cpu", output_dir=str(tmp), n_critics=3,
                batch_size=16, offline_steps=40, offline_eval_every=20, online_steps=260, warmup_steps=60,
                eval_every=100, eval_episodes=1, q_diag_extend_steps=5, checkpoint_every=20, log_every=20,
                utd_ratio=2, actor_updates_per_step=2, online_batch_size=32)
    base.update(kw)
    return so2.Args(**base)


def sac_args(tmp: Path, **kw):
    base = dict(env_id="Hopper-v5", device="cpu", output_dir=str(tmp), online_steps=400, learning_starts=100,
                batch_size=32, eval_every=100, eval_episodes=1, q_diag_extend_steps=5, checkpoint_every=50,
                log_every=50, save_policy_every=200, save_buffer=True)
    base.update(kw)
    return sac.Args(**base)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def check_outputs(run_dir: Path, algo: str) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == algo and config["eval_env_id"]
    for key in ("args", "device", "packages", "dataset_sha256", "max_episode_steps"):
        assert key in config
    rows = read_rows(run_dir)
    assert rows
    for row in rows:
        for key in EVAL_KEYS:
            assert key in row, key
            if key != "phase":
                assert math.isfinite(row[key]), (key, row)
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoint.pt").is_file()


def test_so2_end_to_end(tmp_path, hopper_file):
    run_dir = so2.main(so2_args(tmp_path, hopper_file))
    check_outputs(run_dir, "so2")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["eval_env_id"] == "Hopper-v4" and len(config["dataset_sha256"]) == 64
    rows = read_rows(run_dir)
    assert [r["grad_step"] for r in rows if r["phase"] == "offline"] == [20, 40]
    online = [r for r in rows if r["phase"] == "online"]
    assert [r["env_step"] for r in online] == [0, 100, 200, 260]
    # utd_ratio updates per env step after the warm-up
    assert online[-1]["grad_step"] == 40 + 2 * (260 - 60)
    assert (run_dir / "offline.pt").is_file()


def test_so2_from_offline_checkpoint(tmp_path, hopper_file):
    first = so2.main(so2_args(tmp_path, hopper_file, online_steps=0))
    run_dir = so2.main(so2_args(tmp_path / "b", hopper_file, offline_checkpoint=str(first / "offline.pt"),
                                n_critics=2, online_steps=80, warmup_steps=40))
    rows = read_rows(run_dir)
    assert {r["phase"] for r in rows} == {"online"} and rows[-1]["grad_step"] == 2 * 40
    with pytest.raises(so2.RunError, match="fewer than"):
        so2.main(so2_args(tmp_path / "c", hopper_file, offline_checkpoint=str(first / "offline.pt"), n_critics=5))


def test_sac_end_to_end(tmp_path):
    run_dir = sac.main(sac_args(tmp_path))
    check_outputs(run_dir, "sac")
    rows = read_rows(run_dir)
    assert [r["env_step"] for r in rows] == [0, 100, 200, 300, 400]
    assert rows[-1]["grad_step"] == 400 - 100
    assert [r.get("policy") for r in rows if "policy" in r] == ["policies/actor_00000000.pt",
                                                                  "policies/actor_00000200.pt"]
    snapshot = torch.load(run_dir / "policies/actor_00000200.pt")
    assert snapshot["env_step"] == 200 and "mu.weight" in snapshot["actor"]
    buffer = np.load(run_dir / "replay_buffer.npz")
    assert len(buffer["rewards"]) == 400 and buffer["observations"].shape == (400, 11)
    ends = np.flatnonzero(buffer["terminated"] + buffer["truncated"])
    # within an episode, each next observation is the following observation
    inside = np.setdiff1d(np.arange(399), ends)
    np.testing.assert_array_equal(buffer["next_observations"][inside], buffer["observations"][inside + 1])


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    agent = torch.load(run_dir / "checkpoint.pt", weights_only=False)["agent"]
    return {f"{m}.{k}": v for m, sd in agent.items() if isinstance(sd, dict) for k, v in sd.items()}


def same_rows(a: Path, b: Path) -> None:
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(read_rows(a)) == strip(read_rows(b))


@pytest.mark.parametrize("kill_at", [1, 3])  # 1: in the offline phase; 3: in the online phase
def test_so2_resume_matches_uninterrupted(tmp_path, hopper_file, kill_at):
    torch.set_num_threads(1)
    full = so2.main(so2_args(tmp_path / "full", hopper_file))
    killed = run_killed(so2, so2_args(tmp_path / "killed", hopper_file), kill_at)
    phase = torch.load(killed / "checkpoint.pt", weights_only=False)["phase"]
    assert phase == ("offline" if kill_at == 1 else "online")
    resumed = so2.main(so2.Args(resume=str(killed)))
    a, b = final_params(full), final_params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    same_rows(full, resumed)


def test_sac_resume_matches_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    full = sac.main(sac_args(tmp_path / "full"))
    killed = run_killed(sac, sac_args(tmp_path / "killed"), 3)
    resumed = sac.main(sac.Args(resume=str(killed)))
    a, b = final_params(full), final_params(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    same_rows(full, resumed)
    np.testing.assert_array_equal(np.load(full / "replay_buffer.npz")["observations"],
                                  np.load(resumed / "replay_buffer.npz")["observations"])


def test_non_finite_loss_stops_the_run(tmp_path, hopper_file, monkeypatch):
    real = so2.make_online_update

    def poisoned(agent, args):
        update, optims = real(agent, args)
        return (lambda batch: {**update(batch), "loss/critic": torch.tensor(float("nan"))}), optims

    monkeypatch.setattr(so2, "make_online_update", poisoned)
    with pytest.raises(so2.RunError, match="non-finite loss/critic"):
        so2.main(so2_args(tmp_path, hopper_file))
    run_dir = next(tmp_path.iterdir())
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    # the poisoned loss is first seen at the flush of env step 80 (updates start after the 60-step warm-up)
    assert ckpt["phase"] == "offline" or ckpt["env_step"] <= 80
    for module in ("actor", "critic", "critic_target"):
        assert all(torch.isfinite(v).all() for v in ckpt["agent"][module].values())
    assert not list(run_dir.glob("*.tmp"))


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "algorithms/so2.py", "--env-id", "hopper-medium", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--env-id", "--data", "--dataset", "--seed", "--device", "--offline-steps", "--online-steps",
                 "--eval-every", "--eval-episodes", "--output-dir", "--offline-checkpoint", "--resume", "--compile",
                 "--n-critics", "--eta", "--utd-ratio", "--target-noise", "--target-noise-clip", "--target-q",
                 "--actor-updates-per-step", "--critic-reduction", "--batch-mode"):
        assert flag in out, flag
    assert "50" in out.split("--n-critics")[1].split("\n")[0] + out.split("--n-critics")[1][:300]
    out = subprocess.run([sys.executable, "algorithms/sac.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--env-id", "--save-policy-every", "--save-buffer", "--resume", "--compile"):
        assert flag in out, flag
