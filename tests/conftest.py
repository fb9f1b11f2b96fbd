"""Shared helpers for the algorithm tests: loading an algorithm file, tiny D4RL files, tiny Minari datasets, a run
killed at a checkpoint, a local HTTP server, and a guard that keeps tests off the network (only 127.0.0.1 is
allowed)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_algo(name: str):
    """Import algorithms/<name>.py as module `algo_<name>` (once per test session)."""
    mod_name = f"algo_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, ROOT / "algorithms" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return mod


@pytest.fixture(scope="session")
def so2():
    return load_algo("so2")


# ---- plain computations for the update tests: a loss written out member by member, and its gradients
def member_q(critic, obs, act, i, detach=False):
    """Q_i(s, a) of member i with plain matmuls."""
    h = torch.cat([obs, act], dim=-1)
    for k, layer in enumerate(critic.layers):
        w, b = (layer.weight[i], layer.bias[i, 0])
        if detach:
            w, b = w.detach(), b.detach()
        h = h @ w + b
        if k < len(critic.layers) - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


def all_q(critic, obs, act, detach=False):
    return torch.stack([member_q(critic, obs, act, i, detach) for i in range(critic.n_critics)])


def policy_sample(actor, obs, eps, log_std_bounds):
    """tanh(mu + sigma eps) and its log-probability, with log_std clamped to the given bounds."""
    h = actor.trunk(obs)
    mu, log_std = actor.mu(h), actor.log_std(h).clamp(*log_std_bounds)
    u = mu + log_std.exp() * eps
    log_prob = torch.distributions.Normal(mu, log_std.exp()).log_prob(u).sum(-1)
    return torch.tanh(u), log_prob - torch.log(1 - torch.tanh(u) ** 2 + 1e-6).sum(-1)


def grads(module):
    """The `.grad` an update left on every parameter of `module` (its last backward pass)."""
    return [p.grad.clone() if p.grad is not None else None for p in module.parameters()]


def assert_grads_close(got, expected, what):
    for k, (g, e) in enumerate(zip(got, expected)):
        assert g is not None, f"{what}: parameter {k} has no gradient"
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}, parameter {k}: {m}")


# ---- a run killed at a checkpoint

class Killed(Exception):
    """Raised right after a run writes its n-th checkpoint.pt, so the run stops as if killed there."""


def run_killed(module, args, n: int) -> Path:
    """`module.main(args)` killed right after its n-th write of checkpoint.pt; the killed run's directory."""
    real, count = module.save_checkpoint, {"n": 0}

    def save(path, payload):
        real(path, payload)
        if path.name == "checkpoint.pt":
            count["n"] += 1
            if count["n"] == n:
                raise Killed

    out = Path(args.output_dir)
    before = set(out.iterdir()) if out.is_dir() else set()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(module, "save_checkpoint", save)
        with pytest.raises(Killed):
            module.main(args)
    new = set(out.iterdir()) - before
    assert len(new) == 1, f"the killed run should have made one run directory in {out}, made {sorted(new)}"
    return new.pop()


# ---- network guard

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@pytest.fixture
def no_network(monkeypatch):
    """Refuse every socket connection that is not to 127.0.0.1, and make urllib ignore proxies."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    real_connect = socket.socket.connect
    real_create = socket.create_connection

    def check(address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in _LOCAL_HOSTS and not host.startswith("/"):
            raise ConnectionRefusedError(f"test network guard: connection to {address!r} refused")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def create_connection(address, *args, **kwargs):
        check(address)
        return real_create(address, *args, **kwargs)

    def getaddrinfo(host, *args, **kwargs):
        check((host,))
        return real_getaddrinfo(host, *args, **kwargs)

    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# ---- tiny D4RL-layout files

# (length, how it ends): 7 episodes, 300 steps; the last one is cut off by the end of the file.
D4RL_EPISODES = ((50, "timeout"), (37, "terminal"), (50, "timeout"), (45, "terminal"), (50, "timeout"),
                 (50, "timeout"), (18, "none"))


def make_d4rl_arrays(episodes=D4RL_EPISODES, obs_dim: int = 11, act_dim: int = 3, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Raw D4RL arrays (observations, actions, rewards, terminals, timeouts) for episodes of given lengths/ends."""
    rng = np.random.default_rng(seed)
    n = sum(length for length, _ in episodes)
    terminals = np.zeros(n, dtype=bool)
    timeouts = np.zeros(n, dtype=bool)
    end = 0
    for length, kind in episodes:
        end += length
        if kind == "terminal":
            terminals[end - 1] = True
        elif kind == "timeout":
            timeouts[end - 1] = True
    return {
        # distinct rows, so that a shifted or misaligned row is always detected
        "observations": (np.arange(n, dtype=np.float32)[:, None] * 100
                         + rng.standard_normal((n, obs_dim)).astype(np.float32)),
        "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        "rewards": rng.standard_normal(n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }


def write_d4rl_file(path: Path, arrays: dict[str, np.ndarray] | None = None, **kwargs) -> dict[str, np.ndarray]:
    """Write a D4RL-layout HDF5 file (one dataset per key) and return the arrays written.

    `arrays` defaults to make_d4rl_arrays(**kwargs); keys whose value is None are left out of the file."""
    import h5py

    arrays = make_d4rl_arrays(**kwargs) if arrays is None else arrays
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f.create_dataset(key, data=value)
    return {k: v for k, v in arrays.items() if v is not None}


def qlearning_reference(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """d4rl.qlearning_dataset (terminate_on_end=False) written as a plain loop, plus `truncated`:
    True at a kept step whose next raw step is a time-out or the file's last step (which qlearning_dataset drops),
    and that did not terminate."""
    n = len(raw["observations"])
    timeouts = raw.get("timeouts", np.zeros(n, dtype=bool))
    out = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminated", "truncated")}
    for i in range(n - 1):
        if timeouts[i]:
            continue
        term = bool(raw["terminals"][i])
        out["observations"].append(raw["observations"][i])
        out["actions"].append(raw["actions"][i])
        out["rewards"].append(raw["rewards"][i])
        out["next_observations"].append(raw["observations"][i + 1])
        out["terminated"].append(term)
        out["truncated"].append((i + 1 >= n - 1 or bool(timeouts[i + 1])) and not term)
    return {k: np.asarray(v) for k, v in out.items()}


def write_hopper_d4rl(path: Path, steps: int, limit: int) -> Path:
    """`steps` uniform-random steps of Hopper-v4 (seed 0) in D4RL's layout, episodes cut by time-outs at `limit`."""
    import gymnasium as gym

    env, rng = gym.make("Hopper-v4"), np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    rows: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    t = 0
    for _ in range(steps):
        action = rng.uniform(-1, 1, 3).astype(np.float32)
        next_obs, reward, terminated, _, _ = env.step(action)
        t += 1
        for k, v in zip(rows, (obs, action, reward, terminated, t >= limit and not terminated)):
            rows[k].append(v)
        obs = next_obs
        if terminated or t >= limit:
            obs, t = env.reset()[0], 0
    arrays = {k: np.asarray(v, dtype=bool if k in ("terminals", "timeouts") else np.float32) for k, v in rows.items()}
    write_d4rl_file(path, arrays)
    return path


# ---- tiny Minari datasets

def make_episodes(lengths_and_ends=((6, "terminal"), (9, "truncated"), (5, "none")), obs_dim: int = 11,
                  act_dim: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Episode dicts (observations T+1 rows, actions/rewards/terminations/truncations T rows)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for j, (t, kind) in enumerate(lengths_and_ends):
        terminations = np.zeros(t, dtype=bool)
        truncations = np.zeros(t, dtype=bool)
        if kind == "terminal":
            terminations[-1] = True
        elif kind == "truncated":
            truncations[-1] = True
        episodes.append({
            "observations": (1000 * j + np.arange(t + 1)[:, None]
                             + rng.uniform(0, 0.5, (t + 1, obs_dim))).astype(np.float32),
            "actions": rng.uniform(-1, 1, (t, act_dim)).astype(np.float32),
            "rewards": rng.standard_normal(t).astype(np.float32),
            "terminations": terminations,
            "truncations": truncations,
        })
    return episodes


def write_minari_dataset(dataset_id: str, env, episodes: list[dict[str, np.ndarray]] | None = None):
    """Create `dataset_id` under $MINARI_DATASETS_PATH from episode dicts (default make_episodes() sized to `env`).

    `env` is a gym.Env (or id); set MINARI_DATASETS_PATH first (see the minari_root fixture)."""
    import warnings

    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    if isinstance(env, str):
        env = gym.make(env)
    if episodes is None:
        episodes = make_episodes(obs_dim=env.observation_space.shape[0], act_dim=env.action_space.shape[0])
    buffers = [EpisodeBuffer(observations=ep["observations"], actions=ep["actions"], rewards=ep["rewards"],
                             terminations=ep["terminations"], truncations=ep["truncations"], seed=i)
               for i, ep in enumerate(episodes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env, algorithm_name="test", author="tests",
                                           author_email="tests@example.invalid",
                                           code_permalink="https://example.invalid/tests",
                                           description="tiny test dataset")
    return episodes


@pytest.fixture
def minari_root(tmp_path, monkeypatch) -> Path:
    """An empty Minari datasets folder for this test ($MINARI_DATASETS_PATH)."""
    root = tmp_path / "minari"
    root.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


# ---- a local HTTP server

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from `directory`; counts GET requests in the server's `requests` list."""

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@contextlib.contextmanager
def http_server(directory: Path, handler: type = QuietHandler) -> Iterator[tuple[str, list[str]]]:
    """Serve `directory` on 127.0.0.1 (free port) in a thread; yields (base URL, list of requested paths)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    server.daemon_threads = True
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
