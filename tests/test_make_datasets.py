"""benchmark/make_datasets.py: tiny builds of every kind of rebuilt dataset from fake inputs made here (TQC and DAPG
policies with random weights, two door demonstrations recorded in AdroitHandDoor-v1, a 300-step SAC run), written
in a temporary $MINARI_DATASETS_PATH and loaded through so2.py's data block. Nothing here reads /work/shared or the
network."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import ROOT, load_algo

DEMO_LENGTHS = (12, 9)


def load_builder():
    if "make_datasets" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_datasets", ROOT / "benchmark" / "make_datasets.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_datasets"] = module
        spec.loader.exec_module(module)
    return sys.modules["make_datasets"]


mk = load_builder()
sac = load_algo("sac")


@pytest.fixture(autouse=True)
def _offline(no_network):
    """Every test here runs with connections off 127.0.0.1 refused."""


def sha_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def data_file(root: Path, name: str) -> Path:
    return root / mk.dataset_id(name) / "data" / "main_data.hdf5"


def door_env(limit: int = 300):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
    return gym.make("AdroitHandDoor-v1", max_episode_steps=limit)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict]:
    """A fake --data-dir: TQC hopper actor, DAPG door/pen policies (random weights) and two door demonstrations.

    The demonstrations are random actions (some outside [-1, 1], as in the real ones) recorded from known initial
    states; returns the folder and what was recorded, including each episode's final observation."""
    d = tmp_path_factory.mktemp("data")
    (d / "mujoco").mkdir()
    (d / "adroit").mkdir()
    rng = np.random.default_rng(0)

    def w(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    np.savez(d / "mujoco" / "tqc_hopper_expert_actor.npz", latent_pi_0_weight=w(16, 11), latent_pi_0_bias=w(16),
             latent_pi_2_weight=w(16, 16), latent_pi_2_bias=w(16), mu_weight=w(3, 16), mu_bias=w(3),
             log_std_weight=w(3, 16), log_std_bias=w(3) - 1.0)
    for family, obs_dim, act_dim in (("door", 39, 28), ("pen", 45, 24)):
        np.savez(d / "adroit" / f"dapg_{family}_expert_policy.npz", in_shift=w(obs_dim),
                 in_scale=np.abs(w(obs_dim)) + 1.0, out_shift=w(act_dim), out_scale=np.abs(w(act_dim)) + 0.5,
                 log_std=np.full(act_dim, -1.0, np.float32), w0=w(8, obs_dim), b0=w(8), w1=w(8, 8), b1=w(8),
                 w2=w(act_dim, 8), b2=w(act_dim))
    env = door_env()
    rec = {k: [] for k in ("observations", "actions", "rewards", "init_qpos", "init_qvel", "init_door_body_pos",
                           "final_obs")}
    for i, length in enumerate(DEMO_LENGTHS):
        obs, _ = env.reset(seed=10 + i)
        state = env.unwrapped.get_env_state()
        for k in ("qpos", "qvel", "door_body_pos"):
            rec[f"init_{k}"].append(state[k])
        for _ in range(length):
            # float32-representable, so that the replay (float32 actions, as stored) repeats the recording exactly
            action = rng.uniform(-1.2, 1.2, 28).astype(np.float32).astype(np.float64)
            rec["observations"].append(obs)
            rec["actions"].append(action)
            obs, reward, _, _, _ = env.step(action)
            rec["rewards"].append(reward)
        rec["final_obs"].append(obs)
    rec = {k: np.asarray(v) for k, v in rec.items()}
    np.savez(d / "adroit" / "door_human_demos.npz", episode_lengths=np.asarray(DEMO_LENGTHS),
             **{k: v for k, v in rec.items() if k != "final_obs"})
    return d, rec


@pytest.fixture(scope="module")
def sac_run(tmp_path_factory) -> Path:
    """A 300-step algorithms/sac.py run on Hopper-v5 with snapshots every 100 steps and its replay buffer."""
    out = tmp_path_factory.mktemp("runs")
    return sac.main(sac.Args(env_id="Hopper-v5", online_steps=300, eval_every=100, save_policy_every=100,
                             save_buffer=True, eval_episodes=1, q_diag_extend_steps=0, learning_starts=50,
                             batch_size=32, checkpoint_every=100, log_every=100, output_dir=str(out), threads=1,
                             device="cpu"))


def build(*argv: str, data_dir: Path | None = None, tmp: Path | None = None) -> None:
    extra = ["--report-path", ""] if "--report-path" not in argv else []
    extra += ["--data-dir", str(data_dir)] if data_dir is not None else []
    extra += ["--policies-dir", str(tmp / "policies")] if tmp is not None else []
    mk.cli([*argv, *extra])


def error_of(*argv: str, **kw) -> str:
    with pytest.raises(SystemExit) as e:
        build(*argv, **kw)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    return e.value.code


def episodes(name: str):
    import minari

    return list(minari.load_dataset(mk.dataset_id(name), download=False).iterate_episodes())


def test_random_loads_through_so2_same_bytes_skip_and_settings(so2, minari_root, tmp_path, monkeypatch, capsys):
    report = tmp_path / "report.md"
    build("--env-id", "hopper-random", "--steps", "300", "--report-path", str(report))
    data, info = so2.load_dataset(so2.resolve_task("hopper-random", "rebuilt"), None)
    assert info["dataset"] == "o2o-rl/hopper/random-v0"
    assert data["observations"].shape == (300, 11) and data["actions"].shape == (300, 3)
    assert np.all(np.abs(data["actions"]) <= 1)
    eps = episodes("hopper-random")
    assert sum(len(ep.rewards) for ep in eps) == 300
    for ep in eps[:-1]:  # every episode but the cut-off last one ends by termination or the time limit
        assert ep.terminations[-1] or ep.truncations[-1]
        assert not ep.terminations[:-1].any() and not ep.truncations[:-1].any()
    assert not eps[-1].terminations[-1] and not eps[-1].truncations[-1]  # cut by the budget, as D4RL leaves it
    meta = json.loads((minari_root / "o2o-rl/hopper/random-v0/data/metadata.json").read_text())
    assert (meta["ref_min_score"], meta["ref_max_score"]) == sac.REF_RETURNS["hopper"]
    assert "Seed: 0" in meta["description"] and "--env-id hopper-random" in meta["description"]
    assert "uniform random" in meta["algorithm_name"]
    record = json.loads((minari_root / "o2o-rl/hopper/random-v0/build.json").read_text())
    assert record["transitions"] == 300 and record["settings"] == {"steps": 300, "seed": 0}
    assert "o2o-rl/hopper/random-v0" in report.read_text()
    assert not (minari_root / mk.BUILD_DIR).exists()

    # a report written where only some datasets exist keeps the rows recorded for the others, with their machine
    saved = json.loads(report.with_suffix(".json").read_text())
    assert set(saved) == {"hopper-random"}
    elsewhere = {**record, "machine": "Another CPU", "env_id": "Walker2d-v5", "policy": "recorded elsewhere"}
    report.with_suffix(".json").write_text(json.dumps({"walker2d-random": elsewhere, **saved}))
    mk.write_report(report)
    text = report.read_text()
    assert "| o2o-rl/walker2d/random-v0 | Walker2d-v5 |" in text and "| Another CPU |" in text
    assert "| o2o-rl/hopper/random-v0 | Hopper-v5 |" in text and f"| {record['machine']} |" in text
    assert set(json.loads(report.with_suffix(".json").read_text())) == {"hopper-random", "walker2d-random"}

    # the same command in another root gives the same bytes
    first = sha_of(data_file(minari_root, "hopper-random"))
    other = tmp_path / "other"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(other))
    build("--env-id", "hopper-random", "--steps", "300")
    assert sha_of(data_file(other, "hopper-random")) == first


def test_rebuild_rules(minari_root, tmp_path, capsys):
    build("--env-id", "hopper-random", "--steps", "200")
    path = data_file(minari_root, "hopper-random")
    stamp = path.stat().st_mtime_ns
    capsys.readouterr()
    build("--env-id", "hopper-random", "--steps", "200")
    assert "already built" in capsys.readouterr().out and path.stat().st_mtime_ns == stamp
    assert "--force" in error_of("--env-id", "hopper-random", "--steps", "100")  # other settings: not reused
    assert "--force" in error_of("--env-id", "hopper-random", "--steps", "200", "--seed", "1")
    build("--env-id", "hopper-random", "--steps", "100", "--force")
    assert sum(len(ep.rewards) for ep in episodes("hopper-random")) == 100


def test_killed_build_leaves_no_dataset(minari_root, monkeypatch):
    stale = minari_root / mk.BUILD_DIR / "hopper-random-999999999" / "o2o-rl"
    stale.mkdir(parents=True)  # a killed build's folder (no such process)
    real = mk.write_dataset

    def killed(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(mk, "write_dataset", killed)
    with pytest.raises(KeyboardInterrupt):
        build("--env-id", "hopper-random", "--steps", "50")
    assert not (minari_root / "o2o-rl/hopper/random-v0").exists()
    assert not (minari_root / mk.BUILD_DIR).exists()  # the stale folder went too


@pytest.mark.parametrize("name, limit", [("hopper-expert", 1000), ("door-expert", 200), ("pen-expert", 100)])
def test_expert_policies(so2, minari_root, inputs, name, limit):
    data_dir, _ = inputs
    build("--env-id", name, "--steps", "250", data_dir=data_dir)
    family = name.split("-")[0]
    data, _ = so2.load_dataset(so2.resolve_task(name, "rebuilt"), None)
    assert len(data["rewards"]) == 250 and np.all(np.abs(data["actions"]) <= 1)
    eps = episodes(name)
    assert all(len(ep.rewards) <= limit for ep in eps)
    if family != "hopper":  # Adroit episodes never terminate: full-length episodes, then the cut-off rest
        assert [len(ep.rewards) for ep in eps] == [limit] * (250 // limit) + [250 % limit]
        assert all(ep.truncations[-1] for ep in eps[:-1])
    # the first action is the documented formula applied to the first observation with torch's seed-0 noise
    obs0 = torch.as_tensor(eps[0].observations[0], dtype=torch.float32)
    p = {k: torch.as_tensor(v) for k, v in np.load(
        data_dir / ("mujoco/tqc_hopper_expert_actor.npz" if family == "hopper"
                    else f"adroit/dapg_{family}_expert_policy.npz")).items()}
    noise = torch.randn(len(eps[0].actions[0]), generator=torch.Generator().manual_seed(0))
    if family == "hopper":
        h = torch.relu(p["latent_pi_0_weight"] @ obs0 + p["latent_pi_0_bias"])
        h = torch.relu(p["latent_pi_2_weight"] @ h + p["latent_pi_2_bias"])
        log_std = (p["log_std_weight"] @ h + p["log_std_bias"]).clamp(-20, 2)
        want = torch.tanh(p["mu_weight"] @ h + p["mu_bias"] + log_std.exp() * noise)
    else:
        h = (obs0 - p["in_shift"]) / (p["in_scale"] + 1e-8)
        h = torch.tanh(p["w1"] @ torch.tanh(p["w0"] @ h + p["b0"]) + p["b1"])
        want = ((p["w2"] @ h + p["b2"]) * p["out_scale"] + p["out_shift"] + p["log_std"].exp() * noise).clamp(-1, 1)
    np.testing.assert_allclose(eps[0].actions[0], want.numpy(), atol=1e-5)


def test_expert_same_bytes(minari_root, inputs, tmp_path, monkeypatch):
    data_dir, _ = inputs
    build("--env-id", "door-expert", "--steps", "150", data_dir=data_dir)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "other"))
    build("--env-id", "door-expert", "--steps", "150", data_dir=data_dir)
    assert sha_of(data_file(minari_root, "door-expert")) == sha_of(data_file(tmp_path / "other", "door-expert"))


def test_door_human_replay(so2, minari_root, inputs):
    data_dir, rec = inputs
    build("--env-id", "door-human", data_dir=data_dir)
    eps = episodes("door-human")
    assert [len(ep.rewards) for ep in eps] == list(DEMO_LENGTHS)
    start = 0
    for i, (ep, length) in enumerate(zip(eps, DEMO_LENGTHS)):
        rows = slice(start, start + length)
        np.testing.assert_array_equal(ep.actions, rec["actions"][rows].astype(np.float32))  # the recorded actions
        np.testing.assert_allclose(ep.observations[:-1], rec["observations"][rows], atol=1e-6)
        np.testing.assert_allclose(ep.observations[-1], rec["final_obs"][i], atol=1e-6)  # ends where it ended
        np.testing.assert_allclose(ep.rewards, rec["rewards"][rows], atol=1e-6)
        assert ep.truncations[-1] and not ep.truncations[:-1].any() and not ep.terminations.any()
        start += length
    import minari

    ds = minari.load_dataset("o2o-rl/door/human-v0")
    assert ds.spec.env_spec.max_episode_steps == 300  # room for the demonstrations, as Minari's door-human
    assert json.loads(ds.storage.metadata["eval_env_spec"])["max_episode_steps"] == 200  # the evaluation limit
    data, _ = so2.load_dataset(so2.resolve_task("door-human", "rebuilt"), None)
    assert len(data["rewards"]) == sum(DEMO_LENGTHS)


def test_choose_snapshot(tmp_path):
    rows = [{"env_step": 0, "normalized_score": 50.0, "policy": "p0"},
            {"env_step": 100, "normalized_score": 10.0, "policy": "p100"},
            {"env_step": 150, "normalized_score": 60.0},  # evaluated, no snapshot
            {"env_step": 200, "normalized_score": 45.0, "policy": "p200"},
            {"env_step": 300, "normalized_score": 70.0, "policy": "p300"}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert mk.choose_snapshot(tmp_path, 44.0)["env_step"] == 200  # step 0 and unsaved evaluations do not count
    assert mk.choose_snapshot(tmp_path, 65.0)["env_step"] == 300
    with pytest.raises(mk.BuildError, match="best 70.0"):
        mk.choose_snapshot(tmp_path, 80.0)


def test_medium_replay_medium_and_medium_expert(so2, minari_root, inputs, sac_run, tmp_path):
    data_dir, _ = inputs
    build("--env-id", "hopper-medium-replay", "--sac-run", str(sac_run), "--medium-score", "-1000",
          data_dir=data_dir, tmp=tmp_path)
    policy = tmp_path / "policies" / "hopper_medium_actor.npz"
    meta = json.loads(str(np.load(policy)["meta"]))
    assert meta["env_step"] == 100 and meta["run"] == sac_run.name  # the first snapshot after step 0
    buf = dict(np.load(sac_run / "replay_buffer.npz"))
    data, _ = so2.load_dataset(so2.resolve_task("hopper-medium-replay", "rebuilt"), None)
    n = len(data["rewards"])
    assert n == 100  # every transition collected before the snapshot, in order
    for key in ("observations", "actions", "rewards", "next_observations", "terminated"):
        np.testing.assert_array_equal(data[key], buf[key][:n].reshape(n, -1))
    np.testing.assert_array_equal(data["truncated"][:-1], buf["truncated"][:n - 1].reshape(n - 1, -1))

    # medium and medium-expert from the saved policy alone (no --sac-run)
    build("--env-id", "hopper-medium-expert", "--steps", "300", data_dir=data_dir, tmp=tmp_path)
    medium, expert, mixed = episodes("hopper-medium"), episodes("hopper-expert"), episodes("hopper-medium-expert")
    assert sum(len(ep.rewards) for ep in medium) == 300
    kept = medium[:-1] if not (medium[-1].terminations[-1] or medium[-1].truncations[-1]) else medium
    want = kept + expert
    assert len(mixed) == len(want) and sum(len(ep.rewards) for ep in mixed) <= 600
    for got, ref in zip(mixed, want):
        np.testing.assert_array_equal(got.observations, ref.observations)
        np.testing.assert_array_equal(got.actions, ref.actions)
    record = json.loads((minari_root / "o2o-rl/hopper/medium-v0/build.json").read_text())
    assert record["medium_policy"]["env_step"] == 100
    # a run other than the policy's is refused (medium and medium-replay must come from one run)
    other = sac_run.parent / "sac__other"
    other.mkdir()
    (other / "config.json").write_text((sac_run / "config.json").read_text())
    assert "one run" in error_of("--env-id", "hopper-medium-replay", "--sac-run", str(other), "--force",
                                 data_dir=data_dir, tmp=tmp_path)


def test_medium_needs_a_policy_or_run(minari_root, inputs, tmp_path):
    data_dir, _ = inputs
    msg = error_of("--env-id", "walker2d-medium", data_dir=data_dir, tmp=tmp_path)
    assert "--sac-run" in msg and "walker2d_medium_actor.npz" in msg
    assert "--sac-run" in error_of("--env-id", "hopper-medium-replay", data_dir=data_dir, tmp=tmp_path)
    assert "pen-human cannot be rebuilt" in error_of("--env-id", "pen-human")


def test_missing_input_file(minari_root, tmp_path):
    missing = tmp_path / "nothing"
    msg = error_of("--env-id", "hopper-expert", data_dir=missing)
    assert str(missing / "mujoco" / "tqc_hopper_expert_actor.npz") in msg
    assert "door_human_demos.npz" in error_of("--env-id", "door-human", data_dir=missing)
    assert not (minari_root / "o2o-rl/hopper/expert-v0").exists()
    # the command line prints one line, no traceback
    out = subprocess.run([sys.executable, str(ROOT / "benchmark" / "make_datasets.py"), "--env-id", "pen-expert",
                          "--data-dir", str(missing), "--report-path", ""], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "dapg_pen_expert_policy.npz" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: missing input file")
