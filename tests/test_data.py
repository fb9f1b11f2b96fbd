"""Data loading of algorithms/so2.py ("shared: tasks" and "shared: data"): task table, D4RL download and cache,
D4RL file semantics (d4rl's qlearning_dataset), corrupt input, Minari and rebuilt datasets, and the CLI's errors.

Everything runs offline: D4RL downloads come from a local http.server on 127.0.0.1, Minari datasets are built in a
temporary $MINARI_DATASETS_PATH, and every other connection is refused by the `no_network` guard."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import (D4RL_EPISODES, ROOT, QuietHandler, http_server, make_d4rl_arrays, make_episodes,
                      qlearning_reference, write_d4rl_file, write_minari_dataset)

HOPPER_FILE = "hopper_medium-v2.hdf5"
HOPPER_REL = f"gym_mujoco_v2/{HOPPER_FILE}"
CLOSED_URL = "http://127.0.0.1:1"  # nothing listens on port 1


@pytest.fixture(autouse=True)
def _offline(no_network):
    """Every test here runs with connections off 127.0.0.1 refused."""


@pytest.fixture
def d4rl_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "d4rl_cache"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    return cache


@pytest.fixture
def served(tmp_path):
    """A folder laid out like the D4RL server, holding a tiny hopper_medium-v2.hdf5; returns (root, raw arrays)."""
    root = tmp_path / "server"
    raw = make_d4rl_arrays()
    # Real v2 files carry next_observations too; qlearning_dataset ignores them, so make them obviously wrong.
    write_d4rl_file(root / HOPPER_REL, {**raw, "next_observations": raw["observations"] - 1e4})
    return root, raw


def sha_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def col(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).reshape(len(x), -1)


def assert_transitions(data: dict, expected: dict) -> None:
    assert set(data) == set(expected)
    n = len(expected["rewards"])
    for key, want in expected.items():
        assert data[key].dtype == np.float32, key
        assert data[key].shape == col(want).shape, key
        np.testing.assert_array_equal(data[key], col(want), err_msg=key)
    assert len(data["rewards"]) == n
    assert not np.any((data["terminated"] > 0) & (data["truncated"] > 0)), "a step both terminated and truncated"


# ---- 6. task table


def test_resolve_task_table(so2):
    t = so2.resolve_task("walker2d-random", None)
    assert (t.family, t.dataset, t.source, t.eval_env_id, t.max_episode_steps) == (
        "walker2d", "random", "d4rl", "Walker2d-v4", 1000)
    t = so2.resolve_task("walker2d-random", "rebuilt")
    assert (t.source, t.eval_env_id) == ("rebuilt", "Walker2d-v5")
    t = so2.resolve_task("halfcheetah-medium-replay", "minari")
    assert (t.family, t.dataset, t.source, t.eval_env_id) == ("halfcheetah", "medium-replay", "minari",
                                                               "HalfCheetah-v5")
    t = so2.resolve_task("pen-human", None)
    assert (t.family, t.source, t.eval_env_id, t.max_episode_steps) == ("pen", "minari", "AdroitHandPen-v1", 100)
    t = so2.resolve_task("door-expert", None)
    assert (t.source, t.eval_env_id, t.max_episode_steps) == ("minari", "AdroitHandDoor-v1", 200)
    # a D4RL file given as --dataset keeps the d4rl (v4) evaluation; a Minari id switches to v5
    assert so2.resolve_task("hopper-medium", None, dataset="/x/y.hdf5").eval_env_id == "Hopper-v4"
    t = so2.resolve_task("hopper-medium", None, dataset="mujoco/hopper/medium-v0")
    assert (t.source, t.eval_env_id) == ("minari", "Hopper-v5")

    assert len(so2.TASK_IDS) == 21 and len(set(so2.TASK_IDS)) == 21
    with pytest.raises(so2.RunError) as e:
        so2.resolve_task("hopper-mediocre", None)
    assert "hopper-mediocre" in str(e.value)
    for task_id in so2.TASK_IDS:
        assert task_id in str(e.value)
    with pytest.raises(so2.RunError, match="rebuilt"):
        so2.resolve_task("hopper-medium", "d5rl")
    # a plain Gymnasium id only where allowed
    with pytest.raises(so2.RunError):
        so2.resolve_task("Hopper-v5", None)
    t = so2.resolve_task("Hopper-v5", None, allow_gym_id=True)
    assert (t.family, t.dataset, t.source, t.eval_env_id, t.max_episode_steps) == (
        "hopper", None, None, "Hopper-v5", 1000)
    t = so2.resolve_task("Pendulum-v1", None, allow_gym_id=True)
    assert (t.family, t.eval_env_id, t.max_episode_steps) == (None, "Pendulum-v1", 200)


def test_d4rl_urls_and_dir(so2, monkeypatch):
    base = so2.D4RL_URL
    assert so2.d4rl_url("hopper", "medium") == f"{base}/gym_mujoco_v2/hopper_medium-v2.hdf5"
    assert so2.d4rl_url("halfcheetah", "medium-replay") == f"{base}/gym_mujoco_v2/halfcheetah_medium_replay-v2.hdf5"
    assert so2.d4rl_url("walker2d", "medium-expert") == f"{base}/gym_mujoco_v2/walker2d_medium_expert-v2.hdf5"
    assert so2.d4rl_url("pen", "human") == f"{base}/hand_dapg_v1/pen-human-v1.hdf5"
    monkeypatch.delenv("D4RL_DATASET_DIR", raising=False)
    assert so2.d4rl_dir() == Path.home() / ".d4rl" / "datasets"
    monkeypatch.setenv("D4RL_DATASET_DIR", "/some/where")
    assert so2.d4rl_dir() == Path("/some/where")


# ---- 7. spaces


def test_check_spaces(so2):
    import gymnasium as gym

    hopper_data = {"observations": np.zeros((4, 11), np.float32), "actions": np.zeros((4, 3), np.float32)}
    walker = gym.make("Walker2d-v4")
    with pytest.raises(so2.RunError) as e:
        so2.check_spaces(hopper_data, walker, "hopper_medium-v2.hdf5")
    msg = str(e.value)
    for part in ("hopper_medium-v2.hdf5", "Walker2d-v4", "11", "17", "6"):
        assert part in msg, part
    so2.check_spaces(hopper_data, gym.make("Hopper-v4"), "hopper_medium-v2.hdf5")  # matching sizes pass


# ---- 1. D4RL download, cache and qlearning_dataset semantics


def test_d4rl_download_cache_and_transitions(so2, served, d4rl_cache, monkeypatch):
    root, raw = served
    n = len(raw["rewards"])
    assert n == 300 and raw["timeouts"].sum() == 4 and raw["terminals"].sum() == 2
    with http_server(root) as (base, requests):
        monkeypatch.setattr(so2, "D4RL_URL", base)
        task = so2.resolve_task("hopper-medium", None)
        data, info = so2.load_dataset(task, None)
        assert requests == [f"/{HOPPER_REL}"]

        cached = d4rl_cache / HOPPER_FILE
        assert cached.is_file()
        assert cached.read_bytes() == (root / HOPPER_REL).read_bytes()
        assert list(d4rl_cache.glob("*.part")) == []
        assert info == {"dataset": f"{base}/{HOPPER_REL}", "dataset_path": str(cached),
                        "dataset_sha256": sha_of(root / HOPPER_REL)}

        expected = qlearning_reference(raw)
        assert len(expected["rewards"]) == n - 1 - int(raw["timeouts"][: n - 1].sum()) == 295
        assert_transitions(data, expected)
        # spelled out once more on the raw arrays
        keep = np.array([i for i in range(n - 1) if not raw["timeouts"][i]])
        np.testing.assert_array_equal(data["next_observations"], raw["observations"][keep + 1])
        assert data["terminated"].sum() == 2 and data["truncated"].sum() == 5  # 4 time-outs + the end of the file
        # the step before each time-out is the last kept step of its episode, and it is truncated
        for t_out in np.flatnonzero(raw["timeouts"]):
            row = int(np.searchsorted(keep, t_out - 1))
            assert keep[row] == t_out - 1 and data["truncated"][row, 0] == 1

        # a second call reads the cache and does not touch the server
        data2, info2 = so2.load_dataset(task, None)
        assert requests == [f"/{HOPPER_REL}"]
        assert info2 == info
        for key in data:
            np.testing.assert_array_equal(data2[key], data[key])


def test_d4rl_file_given_as_dataset(so2, tmp_path, monkeypatch):
    monkeypatch.setattr(so2, "D4RL_URL", CLOSED_URL)
    path = tmp_path / "my data" / "hopper.hdf5"
    # a terminal step right before a one-step time-out episode, and a file that ends on a time-out
    raw = write_d4rl_file(path, episodes=((30, "terminal"), (1, "timeout"), (39, "timeout"), (30, "timeout")))
    task = so2.resolve_task("hopper-medium", None, dataset=str(path))
    data, info = so2.load_dataset(task, str(path))
    assert info == {"dataset": str(path), "dataset_path": str(path), "dataset_sha256": sha_of(path)}
    # steps 30, 69 and 99 dropped; step 98 (next = 99, a time-out) truncated; step 29 terminated, not truncated
    expected = qlearning_reference(raw)
    assert len(expected["rewards"]) == 97
    assert_transitions(data, expected)
    assert data["truncated"][-1, 0] == 1
    assert data["terminated"][29, 0] == 1 and data["truncated"][29, 0] == 0
    np.testing.assert_array_equal(data["observations"][30], raw["observations"][31])


def test_d4rl_file_without_timeouts(so2, tmp_path):
    path = tmp_path / "old.hdf5"
    raw = write_d4rl_file(path, {**make_d4rl_arrays(), "timeouts": None})
    assert "timeouts" not in raw
    data, _ = so2.load_dataset(so2.resolve_task("hopper-medium", None, dataset=str(path)), str(path))
    assert_transitions(data, qlearning_reference(raw))
    assert len(data["rewards"]) == 299 and data["truncated"].sum() == 1  # only the end of the file


# ---- 2./3. failed downloads


class CutOffHandler(QuietHandler):
    """Announces the whole file but sends only half of it, then closes the connection."""

    def do_GET(self):
        self.server.requests.append(self.path)
        body = Path(self.directory, self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


class CutOffChunkedHandler(QuietHandler):
    """HTTP/1.1 chunked transfer that stops in the middle of its only chunk."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.requests.append(self.path)
        body = Path(self.directory, self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(f"{len(body):x}\r\n".encode() + body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


def assert_download_error(so2, excinfo, url: str, path: Path) -> None:
    msg = str(excinfo.value)
    for part in (url, str(path), "--data rebuilt", "--dataset"):
        assert part in msg, part
    assert not path.exists()  # a cut-off download never becomes the dataset (a .part may remain)


def test_interrupted_download_then_retry(so2, served, d4rl_cache, monkeypatch):
    root, raw = served
    full = (root / HOPPER_REL).read_bytes()
    task = so2.resolve_task("hopper-medium", None)
    cached = d4rl_cache / HOPPER_FILE
    with http_server(root, CutOffHandler) as (base, requests):
        monkeypatch.setattr(so2, "D4RL_URL", base)
        with pytest.raises(so2.RunError) as e:
            so2.load_dataset(task, None)
        assert requests == [f"/{HOPPER_REL}"]
    assert_download_error(so2, e, f"{base}/{HOPPER_REL}", cached)
    assert str(len(full) // 2) in str(e.value) and str(len(full)) in str(e.value)  # "got X of Y bytes"
    part = d4rl_cache / (HOPPER_FILE + ".part")
    if part.exists():
        assert part.read_bytes() != full

    with http_server(root) as (base, requests):
        monkeypatch.setattr(so2, "D4RL_URL", base)
        data, info = so2.load_dataset(task, None)
        assert requests == [f"/{HOPPER_REL}"]
    assert cached.read_bytes() == full
    assert not part.exists()
    assert info["dataset_sha256"] == hashlib.sha256(full).hexdigest()
    assert_transitions(data, qlearning_reference(raw))


def test_interrupted_chunked_download(so2, served, d4rl_cache, monkeypatch):
    root, _ = served
    with http_server(root, CutOffChunkedHandler) as (base, _requests):
        monkeypatch.setattr(so2, "D4RL_URL", base)
        with pytest.raises(so2.RunError) as e:
            so2.load_dataset(so2.resolve_task("hopper-medium", None), None)
    assert_download_error(so2, e, f"{base}/{HOPPER_REL}", d4rl_cache / HOPPER_FILE)


def test_download_without_network(so2, d4rl_cache, monkeypatch):
    monkeypatch.setattr(so2, "D4RL_URL", CLOSED_URL)
    with pytest.raises(so2.RunError) as e:
        so2.load_dataset(so2.resolve_task("walker2d-medium-replay", None), None)
    path = d4rl_cache / "walker2d_medium_replay-v2.hdf5"
    assert_download_error(so2, e, f"{CLOSED_URL}/gym_mujoco_v2/walker2d_medium_replay-v2.hdf5", path)
    assert "D4RL_DATASET_DIR" in str(e.value)


def test_download_404(so2, tmp_path, d4rl_cache, monkeypatch):
    (tmp_path / "empty").mkdir()
    with http_server(tmp_path / "empty") as (base, requests):
        monkeypatch.setattr(so2, "D4RL_URL", base)
        with pytest.raises(so2.RunError) as e:
            so2.load_dataset(so2.resolve_task("hopper-medium", None), None)
        assert requests == [f"/{HOPPER_REL}"]
    assert "404" in str(e.value)
    assert_download_error(so2, e, f"{base}/{HOPPER_REL}", d4rl_cache / HOPPER_FILE)


# ---- 4. corrupt or inconsistent files


def _truncated_file(path: Path) -> None:
    write_d4rl_file(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).bytes(5000))


def _corrupt_chunk_file(path: Path) -> None:
    """A file that opens, whose gzip-compressed `rewards` chunk is zeroed: reading it fails with OSError."""
    import h5py

    raw = make_d4rl_arrays()
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in raw.items():
            f.create_dataset(key, data=value, **({"compression": "gzip"} if key == "rewards" else {}))
    with h5py.File(path, "r") as f:
        chunk = f["rewards"].id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset: chunk.byte_offset + chunk.size] = bytes(chunk.size)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("spoil", [_truncated_file, _random_file, _corrupt_chunk_file],
                         ids=["truncated", "random-bytes", "corrupt-chunk"])
def test_corrupt_cached_file_is_reported_and_kept(so2, d4rl_cache, monkeypatch, spoil):
    monkeypatch.setattr(so2, "D4RL_URL", CLOSED_URL)  # a download attempt would fail with another message
    path = d4rl_cache / HOPPER_FILE
    spoil(path)
    before = path.read_bytes()
    task = so2.resolve_task("hopper-medium", None)
    for dataset in (None, str(path)):  # from the cache, and as --dataset
        with pytest.raises(so2.RunError) as e:
            so2.load_dataset(task, dataset)
        msg = str(e.value)
        assert str(path) in msg
        assert CLOSED_URL not in msg  # the file was read, not downloaded again
        assert path.read_bytes() == before


@pytest.mark.parametrize("case", ["missing-actions", "short-rewards", "nan-reward", "inf-last-observation",
                                  "1d-observations"])
def test_inconsistent_d4rl_file(so2, tmp_path, case):
    raw = make_d4rl_arrays()
    if case == "missing-actions":
        raw["actions"] = None
    elif case == "short-rewards":
        raw["rewards"] = raw["rewards"][:-7]
    elif case == "nan-reward":
        raw["rewards"][5] = np.nan
    elif case == "inf-last-observation":  # only ever used as the next observation of step N - 2
        raw["observations"][-1, 2] = np.inf
    elif case == "1d-observations":
        raw["observations"] = raw["observations"][:, 0]
    path = tmp_path / f"{case}.hdf5"
    write_d4rl_file(path, raw)
    before = path.read_bytes()
    with pytest.raises(so2.RunError) as e:
        so2.load_dataset(so2.resolve_task("hopper-medium", None, dataset=str(path)), str(path))
    msg = str(e.value)
    assert str(path) in msg
    want = {"missing-actions": ["actions", "lacks"], "short-rewards": ["rewards", "293", "300"],
            "nan-reward": ["rewards", "non-finite"], "inf-last-observation": ["next_observations", "non-finite"],
            "1d-observations": ["observations", "(300,)"]}[case]
    for part in want:
        assert part in msg, part
    assert path.read_bytes() == before


def test_missing_dataset_file(so2, tmp_path, minari_root):
    path = tmp_path / "nowhere" / "hopper.hdf5"
    with pytest.raises(so2.RunError) as e:
        so2.load_dataset(so2.resolve_task("hopper-medium", None, dataset=str(path)), str(path))
    msg = str(e.value).lower()
    assert str(path).lower() in msg
    assert any(s in msg for s in ("not found", "no such file", "does not exist", "not a file")), msg


# ---- 5. Minari


def minari_expected(episodes: list[dict]) -> dict[str, np.ndarray]:
    out = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminated", "truncated")}
    for ep in episodes:
        t = len(ep["rewards"])
        out["observations"].append(ep["observations"][:t])
        out["next_observations"].append(ep["observations"][1:])
        out["actions"].append(ep["actions"])
        out["rewards"].append(ep["rewards"])
        out["terminated"].append(ep["terminations"])
        truncated = ep["truncations"].copy()
        truncated[-1] = not ep["terminations"][-1]  # the last step ends the episode either way
        out["truncated"].append(truncated)
    return {k: np.concatenate(v) for k, v in out.items()}


def test_minari_id_as_dataset(so2, minari_root):
    import gymnasium as gym

    dataset_id = "tests/hopper/tiny-v0"
    episodes = write_minari_dataset(dataset_id, gym.make("Hopper-v5"))
    assert [len(ep["rewards"]) for ep in episodes] == [6, 9, 5]
    task = so2.resolve_task("hopper-medium", None, dataset=dataset_id)
    assert (task.source, task.eval_env_id, task.max_episode_steps) == ("minari", "Hopper-v5", 1000)
    data, info = so2.load_dataset(task, dataset_id)
    main = minari_root / "tests" / "hopper" / "tiny-v0" / "data" / "main_data.hdf5"
    assert info == {"dataset": dataset_id, "dataset_path": str(main), "dataset_sha256": sha_of(main)}
    assert len(data["rewards"]) == 20
    expected = minari_expected(episodes)
    assert_transitions(data, expected)
    # episode ends: terminated at 5, truncated at 14 (a truncation) and 19 (the unfinished last episode)
    assert np.flatnonzero(data["terminated"][:, 0]).tolist() == [5]
    assert np.flatnonzero(data["truncated"][:, 0]).tolist() == [14, 19]
    # no row of one episode is paired with the next episode's first observation
    np.testing.assert_array_equal(data["next_observations"][5], episodes[0]["observations"][6])
    so2.check_spaces(data, so2.make_env(task), dataset_id)


def test_rebuilt_dataset(so2, minari_root):
    import gymnasium as gym

    task = so2.resolve_task("hopper-medium", "rebuilt")
    assert (task.source, task.eval_env_id) == ("rebuilt", "Hopper-v5")
    with pytest.raises(so2.RunError) as e:
        so2.load_dataset(task, None)
    msg = str(e.value)
    assert "o2o-rl/hopper/medium-v0" in msg and "benchmark/make_datasets.py" in msg and "hopper-medium" in msg
    assert not (minari_root / "o2o-rl" / "hopper" / "medium-v0").exists()  # nothing half-made or downloaded

    episodes = write_minari_dataset("o2o-rl/hopper/medium-v0", gym.make("Hopper-v5"),
                                    make_episodes(((4, "truncated"), (3, "terminal")), seed=3))
    data, info = so2.load_dataset(task, None)
    main = minari_root / "o2o-rl" / "hopper" / "medium-v0" / "data" / "main_data.hdf5"
    assert info == {"dataset": "o2o-rl/hopper/medium-v0", "dataset_path": str(main), "dataset_sha256": sha_of(main)}
    assert_transitions(data, minari_expected(episodes))
    assert data["truncated"][:, 0].tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert data["terminated"][:, 0].tolist() == [0, 0, 0, 0, 0, 0, 1]


def test_rebuilt_pen_human_hint(so2, minari_root):
    with pytest.raises(so2.RunError) as e:
        so2.load_dataset(so2.resolve_task("pen-human", "rebuilt"), None)
    assert "o2o-rl/pen/human-v0" in str(e.value) and "--data minari" in str(e.value)


def test_minari_mujoco_default_is_refused(so2, minari_root):
    with pytest.raises(so2.RunError) as e:
        so2.load_dataset(so2.resolve_task("hopper-medium", "minari"), None)
    assert "--data d4rl" in str(e.value) and "mujoco/hopper/medium-v0" in str(e.value)


def test_minari_door_human(so2, minari_root):
    import gymnasium as gym
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    env = gym.make("AdroitHandDoor-v1")
    assert env.observation_space.shape == (39,) and env.action_space.shape == (28,)
    episodes = write_minari_dataset("D4RL/door/human-v2", env)
    task = so2.resolve_task("door-human", None)
    assert (task.source, task.eval_env_id, task.max_episode_steps) == ("minari", "AdroitHandDoor-v1", 200)
    data, info = so2.load_dataset(task, None)
    main = minari_root / "D4RL" / "door" / "human-v2" / "data" / "main_data.hdf5"
    assert info == {"dataset": "D4RL/door/human-v2", "dataset_path": str(main), "dataset_sha256": sha_of(main)}
    assert data["observations"].shape == (20, 39) and data["actions"].shape == (20, 28)
    assert_transitions(data, minari_expected(episodes))
    eval_env = so2.make_env(task)
    assert eval_env.spec.max_episode_steps == 200
    so2.check_spaces(data, eval_env, info["dataset"])


# ---- 8. the command line


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(D4RL_DATASET_DIR=str(tmp_path / "d4rl"), MINARI_DATASETS_PATH=str(tmp_path / "minari"),
               no_proxy="*", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "algorithms/so2.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_unknown_task(tmp_path):
    r = run_cli(["--env-id", "nope", "--output-dir", str(tmp_path / "runs")], tmp_path)
    assert r.returncode != 0
    assert "error:" in r.stderr and "'nope'" in r.stderr and "walker2d-random" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "runs").exists()


def test_cli_corrupt_dataset(tmp_path):
    path = tmp_path / "x" / "corrupt.hdf5"
    _truncated_file(path)
    before = path.read_bytes()
    r = run_cli(["--env-id", "hopper-medium", "--dataset", str(path), "--output-dir", str(tmp_path / "runs")],
                tmp_path)
    assert r.returncode != 0
    assert "error:" in r.stderr and str(path) in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert path.read_bytes() == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_dataset_of_another_environment(tmp_path):
    path = tmp_path / "walker.hdf5"
    write_d4rl_file(path, obs_dim=17, act_dim=6)
    r = run_cli(["--env-id", "hopper-medium", "--dataset", str(path), "--output-dir", str(tmp_path / "runs")],
                tmp_path)
    assert r.returncode != 0
    assert "error:" in r.stderr and str(path) in r.stderr and "17" in r.stderr and "11" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
