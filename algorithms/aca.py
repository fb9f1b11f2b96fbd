"""ACA: offline SAC+ML with a state baseline Z(s), then online SAC on a critic aligned with the offline actor.

Yu and Zhang. "Actor-Critic Alignment for Offline-to-Online Reinforcement Learning", ICML 2023 (PMLR 202:40452-40474).
Official code: ZishunYu/Actor-Critic-Alignment @ 3a082bd ([ACA]: `run_sacml.py`, `sacml_agent/sacml_impl.py`,
`run_aca.py`, `aca_agent/aca.py`, `aca_agent/aca_impl.py`, `utility.py`, `configs/online/*.yaml`), built on d3rlpy
v1.1.0 ([d3rlpy]).

What ACA changes relative to SAC: offline it trains SAC plus a maximum-likelihood term, lam * SAC actor loss
- log pi(a_data|s) with lam = alpha_ML / mean|min Q|, and a twin baseline Z_k(s) such that log pi(a|s) + Z(s) obeys
pi's soft Bellman equation. At the switch the offline critics are discarded: R_k(s, a) is built from Z_k with zero
action weights (R = Z exactly), alpha is reset to 1 and pi_0 is a frozen copy of the offline actor, so the critic
Q = R + C(log pi_0), C the soft clip below, has pi_0 as its Boltzmann policy at temperature 1 and the first online
updates do not chase the offline critic's errors on unseen actions. Online it is SAC on that Q, the weight w of
C(log pi_0) = w (softplus(log pi_0 - clip_at) + clip_at) annealed after each update, with either no offline data in
the buffer (random, medium: the paper's point that ACA needs none) or the top-50 offline episodes.

Differences from the authors' code, and which one the default follows:
- Framework: plain torch, not d3rlpy v1.1.0 / gym 0.23 / torch 1.11. The networks are d3rlpy's defaults (2 x 256
  ReLU, PyTorch's default init, log_std clamped to [-20, 2], tanh squashing with the exact Jacobian
  2 (log 2 - u - softplus(-2u)), a given action scored at atanh(clamp(a, +-0.999999))). The twin critics and the twin
  baselines are each one vectorised layer (d3rlpy loops over a ModuleList); Z's layers have R's shapes but for the
  action rows of the first, which alignment zeroes.
- Order and sampling as [d3rlpy]: offline temperature -> critic -> baseline -> actor -> Polyak, online temperature
  -> critic -> actor (gradient norm clipped to 0.25) -> Polyak -> anneal w; each loss draws its own policy sample.
- Optimiser states: d3rlpy's `load_model` restores the optimisers with the networks, so online Adam continues the
  offline states of actor, critic (now holding R) and temperature; here the same optimisers run through both phases
  and `offline.pt` carries them.
- Updates start once the online buffer holds more than `--batch-size` transitions (d3rlpy's `fit_online`, with
  `update_start_step=0`): from the first env step with the top-k episodes loaded, after 256 steps of acting with
  pi_0 without any offline data.
- Top-k episodes ([ACA] `utility.py::buffer_init`): ranked by the sum of the stored rewards; the D4RL loader drops
  each time-out step (d4rl's `qlearning_dataset`; d3rlpy keeps it), so a timed-out episode's return lacks its last
  reward. Ties keep the earlier episode (the code's `np.argsort` leaves their order unspecified); the chosen episodes
  enter the buffer in dataset order (the code: ascending return), which uniform sampling cannot tell apart, and the
  1e6-row FIFO never evicts within the protocol's budgets.
- w is a float64 device tensor annealed in place (the code: a Python float); the values are the same.
- Budgets and evaluation follow o2o-rl's protocol: 500k offline updates (code) evaluated every 10k (code: every
  1000), 100k online env steps on MuJoCo (code) and 400k on Adroit, 10 deterministic episodes every 1000 env steps
  (code: the same, on gym 0.23's mujoco-py environments); D4RL v2 files evaluate on Gymnasium v4, Minari Adroit data
  on `AdroitHand*-v1`. `truncated` bootstraps, `terminated` does not (d3rlpy's `timelimit_aware=True`).
- Adroit has no authors' configuration: our untested extension takes the medium-replay settings (beta 7,
  interpolation (1, 40, 0.5), top-50 episodes) with every demonstration of the human datasets in the buffer
  (`--n-trajs -1`), alpha_ML 30.
- Not implemented: antmaze (non-squashed policy, reward - 1), which is not an o2o-rl task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import math
import os
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import tyro
from tqdm import tqdm

ALGO = "aca"


@dataclass
class Args:
    # ---- protocol: the same fields, in the same order, in every algorithm file
    env_id: str = "hopper-medium"
    """task id, e.g. walker2d-random or door-human (an unknown id prints the list)"""
    data: Literal["d4rl", "minari", "rebuilt"] | None = None
    """data source; default d4rl for MuJoCo, minari for Adroit; rebuilt = benchmark/make_datasets.py output"""
    dataset: str | None = None
    """a D4RL-layout HDF5 file or a Minari dataset id; overrides --data's dataset (not its evaluation env)"""
    seed: int = 0
    """seed of everything; evaluation episode i always starts from seed 100000 * (seed + 1) + i"""
    offline_steps: int = 500_000
    """gradient steps of offline pretraining"""
    online_steps: int = 100_000
    """online environment steps, warm-up included"""
    offline_eval_every: int = 10_000
    """gradient steps between offline evaluations"""
    eval_every: int = 1_000
    """online environment steps between evaluations"""
    eval_episodes: int = 10
    """deterministic episodes per evaluation"""
    q_diag_extend_steps: int | None = None
    """steps an evaluation episode runs past its time limit for the Q-value tails (unset: 459 at gamma 0.99; 0 = off)"""
    output_dir: str = "runs"
    """where the run directory <algo>__<env-id>__<seed>__<unix-time> is made"""
    checkpoint_every: int = 10_000
    """offline gradient steps / online env steps between checkpoints (online: at the next episode end)"""
    log_every: int = 1_000
    """steps between TensorBoard scalars (losses are summed on the device in between)"""
    offline_checkpoint: str | None = None
    """an offline.pt to start from; skips pretraining"""
    resume: str | None = None
    """a run directory whose checkpoint.pt to continue from (its config.json wins over other flags)"""
    device: str = "auto"
    """torch device; auto = cuda if available, else cpu"""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default"""
    compile: bool = False
    """torch.compile the update functions"""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (slower on GPU)"""
    hidden_dim: int = 256
    """width of every hidden layer of every network (256 in the papers; benchmark presets may use less)"""
    # ---- ACA ([ACA] run_sacml.py, run_aca.py, configs/*/mjc_*.yaml)
    batch_size: int = 256
    """batch size, offline and online"""
    actor_lr: float = 3e-4
    """actor learning rate, both phases"""
    critic_lr: float = 3e-4
    """critic learning rate (Q offline, R online)"""
    alpha_lr: float = 3e-4
    """temperature learning rate; log alpha starts at 0 offline and is reset to 0 online, target entropy -|A|"""
    baseline_lr: float = 3e-4
    """learning rate of the baseline Z(s) (offline)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics, after every update"""
    alpha_ml: float = 30.0
    """alpha_ML: offline actor loss = alpha_ML / mean|min Q| * SAC actor loss - mean log pi(a_data|s)"""
    beta: float = 7.0
    """beta: the soft clip's floor is log pi_0 at pi_0's pre-tanh mean +- beta standard deviations"""
    interpolation: tuple[float, float, float] = (1.0, 40.0, 0.5)
    """(i0, i1, i2): w starts at i0 and after every online update becomes max(w - i0 / (i1 * 1000), i2)"""
    n_trajs: int = 0
    """K, highest-return dataset episodes in the online buffer (0 = no offline data online; -1 = every episode)"""
    actor_grad_clip: float = 0.25
    """online: the actor's gradient norm is clipped to this"""
    buffer_size: int = 1_000_000
    """capacity of the online FIFO buffer (top-K episodes + online transitions)"""


# Only what differs from Args (the medium settings); a task id wins over its family. [ACA] configs/online/mjc_*.yaml.
_BY_DATASET: dict[str, dict[str, Any]] = {
    "random": dict(interpolation=(1.0, 10.0, 0.0)),  # mjc_r.yaml: beta 7, n_trajs 0
    "medium-replay": dict(n_trajs=50),  # mjc_mr.yaml: beta 7, (1, 40, 0.5)
    "medium-expert": dict(beta=15.0, interpolation=(1.0, 100.0, 1.0), n_trajs=50),  # mjc_me.yaml
    "expert": dict(beta=15.0, interpolation=(1.0, 100.0, 1.0), n_trajs=50),  # mjc_e.yaml (aca.md section 6)
}
# Adroit: no authors' config; our untested extension (aca.md "Defaults for o2o-rl"): medium-replay settings, every
# human demonstration online, the protocol's 400k online steps.
_ADROIT = dict(n_trajs=50, online_steps=400_000)
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    **{f"{family}-{name}": v for family in ("halfcheetah", "hopper", "walker2d") for name, v in _BY_DATASET.items()},
    "pen": _ADROIT,
    "door": _ADROIT,
    "pen-human": dict(n_trajs=-1),  # all 25 demonstrations
    "door-human": dict(n_trajs=-1),  # all 25 demonstrations
}


def parse_args(argv: list[str] | None = None) -> Args:
    """Apply the per-dataset defaults of --env-id first, so that explicit flags win and --help shows them."""
    argv = sys.argv[1:] if argv is None else argv
    env_id = Args.env_id
    for i, token in enumerate(argv):
        if token.startswith("--env-id=") or token.startswith("--env_id="):
            env_id = token.split("=", 1)[1]
        elif token in ("--env-id", "--env_id") and i + 1 < len(argv):
            env_id = argv[i + 1]
    overrides = {**DATASET_DEFAULTS.get(env_id.split("-")[0], {}), **DATASET_DEFAULTS.get(env_id, {})}
    return tyro.cli(Args, args=argv, default=dataclasses.replace(Args(), **overrides))


# >>> shared: tasks
class RunError(Exception):
    """Bad input or a failed run: the message says what to do, and is printed without a traceback."""


MUJOCO_FAMILIES = ("halfcheetah", "hopper", "walker2d")
ADROIT_FAMILIES = ("pen", "door")
MUJOCO_DATASETS = ("random", "medium", "medium-replay", "medium-expert", "expert")
ADROIT_DATASETS = ("human", "cloned", "expert")
TASK_IDS = tuple(f"{f}-{d}" for f in MUJOCO_FAMILIES for d in MUJOCO_DATASETS) + tuple(
    f"{f}-{d}" for f in ADROIT_FAMILIES for d in ADROIT_DATASETS
)
GYM_NAMES = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d",
             "pen": "AdroitHandPen", "door": "AdroitHandDoor"}
# D4RL's episode limits (pen 100 as in D4RL and Minari, although gymnasium-robotics registers 200).
EPISODE_LIMITS = {"halfcheetah": 1000, "hopper": 1000, "walker2d": 1000, "pen": 100, "door": 200}
# D4RL's reference returns (d4rl/infos.py), used for every data source so that scores compare across sources.
REF_RETURNS = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
}


@dataclass(frozen=True)
class Task:
    env_id: str  # as given on the command line
    family: str | None  # halfcheetah ... door; None for a Gymnasium id of another environment
    dataset: str | None  # random ... expert; None for a plain Gymnasium id
    source: str | None  # d4rl, minari or rebuilt; None for a plain Gymnasium id
    eval_env_id: str
    max_episode_steps: int


def resolve_task(env_id: str, data: str | None, dataset: str | None = None, allow_gym_id: bool = False) -> Task:
    """Map a task id (or, where allowed, a Gymnasium id) to its data source and evaluation environment.

    D4RL v2 files were collected on the mujoco-py v2 environments, whose dynamics the Gymnasium v4 ones keep; v5
    changes Walker2d's foot friction and the healthy reward. So d4rl data evaluate on v4, everything else on v5.
    """
    if env_id in TASK_IDS:
        family, name = env_id.split("-", 1)
        adroit = family in ADROIT_FAMILIES
        if data is None:
            data = "minari" if adroit or (dataset is not None and not dataset.endswith((".hdf5", ".h5"))) else "d4rl"
        if data not in ("d4rl", "minari", "rebuilt"):
            raise RunError(f"unknown data source {data!r}: use d4rl, minari or rebuilt")
        version = "v1" if adroit else ("v4" if data == "d4rl" else "v5")
        return Task(env_id, family, name, data, f"{GYM_NAMES[family]}-{version}", EPISODE_LIMITS[family])
    if allow_gym_id and env_id in gym.registry:
        family = next((f for f, g in GYM_NAMES.items() if env_id.startswith(g + "-")), None)
        limit = gym.registry[env_id].max_episode_steps or 1000
        return Task(env_id, family, None, None, env_id, EPISODE_LIMITS.get(family, limit))
    also = " or any registered Gymnasium id (e.g. Hopper-v5)" if allow_gym_id else ""
    raise RunError(f"unknown --env-id {env_id!r}. Valid task ids{also}:\n  " + "\n  ".join(TASK_IDS))


def make_env(task: Task, extend_steps: int = 0) -> gym.Env:
    """The task's environment with its episode limit, optionally running `extend_steps` past it."""
    if task.family in ADROIT_FAMILIES:
        import gymnasium_robotics  # registers the Adroit environments; imported here because it prints a warning

        gym.register_envs(gymnasium_robotics)
    env = gym.make(task.eval_env_id, max_episode_steps=task.max_episode_steps + extend_steps)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise RunError(f"{task.eval_env_id} has a {type(env.action_space).__name__} action space; a Box is needed")
    if np.any(env.action_space.low != -1.0) or np.any(env.action_space.high != 1.0):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)  # the actor's tanh works in [-1, 1]
    return env
# <<< shared: tasks


# >>> shared: data
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"


def d4rl_url(family: str, dataset: str) -> str:
    if family in MUJOCO_FAMILIES:
        return f"{D4RL_URL}/gym_mujoco_v2/{family}_{dataset.replace('-', '_')}-v2.hdf5"
    return f"{D4RL_URL}/hand_dapg_v1/{family}-{dataset}-v1.hdf5"


def d4rl_dir() -> Path:
    return Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


def download(url: str, path: Path) -> Path:
    """Download into `path.part` and rename only once complete, so that a cut-off download is never used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {path.name}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise OSError(f"got {part.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise RunError(
            f"could not download {url} ({e}).\nThe file is expected at {path} (set $D4RL_DATASET_DIR to use "
            f"another folder); put it there by hand, or train on data that needs no download: --data rebuilt "
            f"(built here by benchmark/make_datasets.py) or --dataset PATH_OR_ID."
        ) from None
    os.replace(part, path)
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_d4rl_file(path: Path) -> dict[str, np.ndarray]:
    """Transitions of a D4RL-layout HDF5 file with the semantics of d4rl's `qlearning_dataset`.

    Transition i uses observations[i + 1] as its next observation (the files' `next_observations` are ignored, as
    `qlearning_dataset` does), so time-out steps, whose successor starts a new episode, and the file's last step are
    dropped. `terminated` = `terminals`; `truncated` marks the last kept step of an episode that did not terminate.
    """
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise RunError(f"{path} is not a readable HDF5 file ({e}). It was kept as it is; delete it to download "
                       f"it again, or pass another file with --dataset.") from None
    with f:
        missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
        if missing:
            raise RunError(f"{path} lacks the D4RL keys {missing} (it has {sorted(f.keys())}); the file was kept.")
        try:
            raw = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals")}
            raw["timeouts"] = f["timeouts"][()] if "timeouts" in f else np.zeros(len(raw["rewards"]), dtype=bool)
        except (OSError, KeyError) as e:
            raise RunError(f"{path} is truncated or corrupt ({e}); the file was kept.") from None
    n = len(raw["observations"])
    lengths = {k: len(v) for k, v in raw.items()}
    if n < 2 or any(v != n for v in lengths.values()) or raw["observations"].ndim != 2 or raw["actions"].ndim != 2:
        raise RunError(f"{path} has inconsistent D4RL arrays (lengths {lengths}, observations "
                       f"{raw['observations'].shape}, actions {raw['actions'].shape}); the file was kept.")
    timeouts = raw["timeouts"].astype(bool)
    keep = np.flatnonzero(~timeouts[:-1])
    terminated = raw["terminals"][keep].astype(bool)
    next_is_gone = np.append(timeouts[1:-1], True)[keep]  # step i + 1 is a time-out or the dropped last step
    return {
        "observations": raw["observations"][keep],
        "actions": raw["actions"][keep],
        "rewards": raw["rewards"][keep],
        "next_observations": raw["observations"][keep + 1],
        "terminated": terminated,
        "truncated": next_is_gone & ~terminated,
    }


def load_minari(dataset_id: str, download_missing: bool, hint: str = "") -> tuple[dict[str, np.ndarray], Path]:
    """Transitions of a Minari dataset: `terminations` end bootstrapping, `truncations` do not."""
    import minari

    try:
        ds = minari.load_dataset(dataset_id, download=download_missing)
    except Exception as e:  # minari raises bare Exceptions/ValueErrors for missing ids and failed downloads
        root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        raise RunError(f"could not load the Minari dataset {dataset_id!r} from {root} ({e}). {hint}") from None
    parts: dict[str, list[np.ndarray]] = {k: [] for k in TRANSITION_KEYS}
    for ep in ds.iterate_episodes():
        if not isinstance(ep.observations, np.ndarray) or not isinstance(ep.actions, np.ndarray):
            raise RunError(f"{dataset_id}: only flat Box observations and actions are supported")
        parts["observations"].append(ep.observations[:-1])
        parts["next_observations"].append(ep.observations[1:])
        parts["actions"].append(ep.actions)
        parts["rewards"].append(ep.rewards)
        parts["terminated"].append(ep.terminations)
        truncated = np.asarray(ep.truncations, dtype=bool).copy()
        truncated[-1] |= not ep.terminations[-1]  # an episode's last step ends it either way
        parts["truncated"].append(truncated)
    if not parts["rewards"]:
        raise RunError(f"the Minari dataset {dataset_id!r} has no episodes")
    return {k: np.concatenate(v) for k, v in parts.items()}, Path(ds.spec.data_path) / "main_data.hdf5"


def load_dataset(task: Task, dataset: str | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The task's offline data as float32 transitions, and where it came from (id, path, sha256)."""
    if dataset is not None and Path(dataset).expanduser().is_file():
        path = Path(dataset).expanduser()
        data, ident = load_d4rl_file(path), str(path)
    elif dataset is not None and dataset.endswith((".hdf5", ".h5")):
        raise RunError(f"--dataset {dataset}: no such file (give a D4RL-layout HDF5 file or a Minari dataset id)")
    elif dataset is not None:
        data, path = load_minari(dataset, download_missing=True)
        ident = dataset
    elif task.source == "d4rl":
        url = d4rl_url(task.family, task.dataset)
        path = d4rl_dir() / url.rsplit("/", 1)[1]
        if not path.is_file():
            download(url, path)
        data, ident = load_d4rl_file(path), url
    elif task.source == "minari":
        ident = f"D4RL/{task.family}/{task.dataset}-v2" if task.family in ADROIT_FAMILIES else None
        if ident is None:
            raise RunError(f"Minari has no D4RL {task.env_id} data (its MuJoCo sets are new v5 data): use --data "
                           f"d4rl, --data rebuilt, or --dataset with a Minari id such as mujoco/hopper/medium-v0")
        data, path = load_minari(ident, download_missing=True)
    else:
        ident = f"o2o-rl/{task.family}/{task.dataset}-v0"
        hint = (f"Build it with: python benchmark/make_datasets.py --env-id {task.env_id}"
                if task.env_id != "pen-human" else "pen-human cannot be rebuilt here: use --data minari.")
        data, path = load_minari(ident, download_missing=False, hint=hint)
    data = {k: np.asarray(v, dtype=np.float32).reshape(len(v), -1) for k, v in data.items()}
    for k, v in data.items():
        if not np.all(np.isfinite(v)):
            raise RunError(f"{path}: {k} holds non-finite values; the file was kept.")
    return data, {"dataset": ident, "dataset_path": str(path), "dataset_sha256": sha256(path)}


def check_spaces(data: dict[str, np.ndarray], env: gym.Env, name: str) -> None:
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if data["observations"].shape[1] != obs_dim or data["actions"].shape[1] != act_dim:
        raise RunError(f"the dataset {name} has observations of size {data['observations'].shape[1]} and actions "
                       f"of size {data['actions'].shape[1]}, but {env.spec.id} has {obs_dim} and {act_dim}: "
                       f"pick the dataset of this task, or the task of this dataset.")
# <<< shared: data


# >>> shared: normalization
def normalized_score(family: str | None, returns: np.ndarray | float) -> np.ndarray | float:
    """D4RL's normalised score, x100; NaN for environments without reference returns."""
    if family not in REF_RETURNS:
        return np.full_like(np.asarray(returns, dtype=np.float64), np.nan)
    lo, hi = REF_RETURNS[family]
    return 100.0 * (np.asarray(returns, dtype=np.float64) - lo) / (hi - lo)


def moments(x: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std along the first axis, for standardising observations or rewards."""
    return x.mean(axis=0), x.std(axis=0) + eps
# <<< shared: normalization


# >>> shared: replay_buffer
TRANSITION_KEYS = ("observations", "actions", "rewards", "next_observations", "terminated", "truncated")


class ReplayBuffer:
    """Transitions as one preallocated [capacity, width] float tensor on the run's device: a ring buffer.

    The offline dataset goes in first with `load_dataset`; online transitions follow with `add` and, once the buffer
    is full, overwrite the oldest rows. Sampling uses the buffer's own device generator. `state_dict` holds only the
    rows added after the dataset (and where they went), so a checkpoint stays small and `load_state_dict`, applied
    after the same dataset is loaded again, restores the buffer exactly.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device, seed: int) -> None:
        widths = {"observations": obs_dim, "actions": act_dim, "rewards": 1, "next_observations": obs_dim,
                  "terminated": 1, "truncated": 1}
        self.slices, start = {}, 0
        for key in TRANSITION_KEYS:
            self.slices[key] = slice(start, start + widths[key])
            start += widths[key]
        self.storage = torch.zeros((capacity, start), dtype=torch.float32, device=device)
        self.capacity, self.device = capacity, device
        self.ptr = self.size = self.n_added = self.start_ptr = 0
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def _write(self, rows: torch.Tensor) -> None:
        idx = (self.ptr + torch.arange(len(rows), device=self.device)) % self.capacity
        self.storage[idx] = rows
        self.ptr = (self.ptr + len(rows)) % self.capacity
        self.size = min(self.capacity, self.size + len(rows))

    def _rows(self, batch: dict[str, np.ndarray | torch.Tensor]) -> torch.Tensor:
        cols = [torch.as_tensor(batch[k], dtype=torch.float32).reshape(len(batch["rewards"]), -1)
                for k in TRANSITION_KEYS]
        return torch.cat(cols, dim=1).to(self.device)

    def load_dataset(self, data: dict[str, np.ndarray]) -> None:
        if len(data["rewards"]) > self.capacity:
            raise RunError(f"{len(data['rewards'])} offline transitions do not fit a buffer of {self.capacity}")
        self._write(self._rows(data))
        self.start_ptr = self.ptr

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray,
            terminated: bool, truncated: bool) -> None:
        row = np.concatenate([obs, action, [reward], next_obs, [float(terminated)], [float(truncated)]])
        self._write(torch.as_tensor(row, dtype=torch.float32).to(self.device).unsqueeze(0))
        self.n_added += 1

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (batch_size,), device=self.device, generator=self.generator)
        rows = self.storage[idx]
        return {k: rows[:, s].squeeze(-1) if k in ("rewards", "terminated", "truncated") else rows[:, s]
                for k, s in self.slices.items()}

    def added(self) -> dict[str, np.ndarray]:
        """The rows added after the dataset that are still held, oldest first, as numpy arrays."""
        m = min(self.n_added, self.capacity)
        idx = (self.start_ptr + torch.arange(self.n_added - m, self.n_added, device=self.device)) % self.capacity
        rows = self.storage[idx].cpu().numpy()
        return {k: rows[:, s].squeeze(-1) if k in ("rewards", "terminated", "truncated") else rows[:, s]
                for k, s in self.slices.items()}

    def state_dict(self) -> dict[str, Any]:
        m = min(self.n_added, self.capacity)
        idx = (self.start_ptr + torch.arange(self.n_added - m, self.n_added, device=self.device)) % self.capacity
        return {"rows": self.storage[idx].cpu(), "n_added": self.n_added, "start_ptr": self.start_ptr,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["start_ptr"] != self.start_ptr:
            raise RunError("the checkpoint's replay buffer was made with a different dataset")
        rows, n = state["rows"].to(self.device), state["n_added"]
        idx = (self.start_ptr + torch.arange(n - len(rows), n, device=self.device)) % self.capacity
        self.storage[idx] = rows
        self.n_added, self.ptr = n, (self.start_ptr + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.generator.set_state(state["generator"])
# <<< shared: replay_buffer


# >>> shared: ensemble
class VectorizedLinear(nn.Module):
    """N independent linear layers as one batched matmul: weight [N, in, out], bias [N, 1, out]."""

    def __init__(self, in_features: int, out_features: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default, drawn for every member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        w, b = (self.weight.detach(), self.bias.detach()) if detach else (self.weight, self.bias)
        return torch.baddbmm(b, x, w)  # [N, B, in] -> [N, B, out]


class VectorizedCritic(nn.Module):
    """An ensemble of N Q-networks on concat(s, a), evaluated in one pass; returns Q of shape [N, B]."""

    def __init__(self, obs_dim: int, act_dim: int, n_critics: int, hidden: int = 256, n_layers: int = 3,
                 edac_init: bool = True) -> None:
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden] * n_layers + [1]
        self.layers = nn.ModuleList(VectorizedLinear(i, o, n_critics) for i, o in zip(dims[:-1], dims[1:]))
        self.n_critics = n_critics
        if edac_init:  # EDAC/rlkit: hidden biases 0.1, last layer U(-3e-3, 3e-3)
            for layer in self.layers[:-1]:
                nn.init.constant_(layer.bias, 0.1)
            nn.init.uniform_(self.layers[-1].weight, -3e-3, 3e-3)
            nn.init.uniform_(self.layers[-1].bias, -3e-3, 3e-3)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, detach: bool = False) -> torch.Tensor:
        """`detach` keeps the critic's weights out of the graph (actor losses need no critic gradients)."""
        x = torch.cat([obs, action], dim=-1)
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.n_critics, -1, -1)  # [N, B, in]
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x, detach))
        return self.layers[-1](x, detach).squeeze(-1)
# <<< shared: ensemble


# ---- networks
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # [d3rlpy] SquashedNormalPolicy
ATANH_CLIP = 0.999999  # [d3rlpy] SquashedGaussianDistribution.log_prob


def squashed_log_prob(mu: torch.Tensor, log_std: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """log-density of a = tanh(u), u ~ N(mu, sigma^2), summed over action dimensions: [..., A] -> [...]."""
    z = (u - mu) / log_std.exp()
    jacobian = 2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))  # log(1 - tanh(u)^2), stable
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi) - jacobian).sum(-1)


class SquashedGaussianActor(nn.Module):
    """d3rlpy's squashed normal policy: pi(a|s) = tanh(N(mu(s), sigma(s)^2)), log sigma clamped to [-20, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, n_layers: int = 2) -> None:
        super().__init__()
        dims = [obs_dim] + [hidden] * n_layers
        self.trunk = nn.Sequential(*[m for i, o in zip(dims[:-1], dims[1:]) for m in (nn.Linear(i, o), nn.ReLU())])
        self.mu = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

    def dist(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-tanh mean and log-std."""
        h = self.trunk(obs)
        return self.mu(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action in [-1, 1] and its log-probability."""
        mu, log_std = self.dist(obs)
        u = mu if deterministic else mu + log_std.exp() * torch.randn_like(mu)
        return torch.tanh(u), squashed_log_prob(mu, log_std, u)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) of given actions, differentiable in both."""
        mu, log_std = self.dist(obs)
        return squashed_log_prob(mu, log_std, torch.atanh(actions.clamp(-ATANH_CLIP, ATANH_CLIP)))

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        action, _ = self(torch.as_tensor(obs, dtype=torch.float32, device=self.mu.weight.device).unsqueeze(0),
                         deterministic)
        return action[0].cpu().numpy()


class VectorizedBaseline(nn.Module):
    """Z_k(s), k = 1..N, in one pass: [N, B]. Its layers have the critic's shapes except the first, which lacks the
    action rows, so that `align` can build R_k from Z_k by copying."""

    def __init__(self, obs_dim: int, n: int, hidden: int = 256, n_layers: int = 2) -> None:
        super().__init__()
        dims = [obs_dim] + [hidden] * n_layers + [1]
        self.layers = nn.ModuleList(VectorizedLinear(i, o, n) for i, o in zip(dims[:-1], dims[1:]))
        self.n = n

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.unsqueeze(0).expand(self.n, -1, -1)  # [N, B, D]
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x).squeeze(-1)


@dataclass
class Agent:
    actor: SquashedGaussianActor
    critic: VectorizedCritic  # Q_k offline, R_k online
    critic_target: VectorizedCritic
    baseline: VectorizedBaseline  # Z_k, trained offline
    reference: SquashedGaussianActor  # pi_0, the frozen offline actor (set by `align`)
    log_alpha: torch.Tensor  # [] temperature, learned in both phases
    w: torch.Tensor  # [1] float64, the weight of C(log pi_0), annealed online


def make_agent(obs_dim: int, act_dim: int, hidden: int, device: torch.device) -> Agent:
    """Twin critics and twin baselines ([ACA]: n_critics=2), 2 hidden layers each, PyTorch's default init."""
    critic = VectorizedCritic(obs_dim, act_dim, 2, hidden, n_layers=2, edac_init=False).to(device)
    target = VectorizedCritic(obs_dim, act_dim, 2, hidden, n_layers=2, edac_init=False).to(device)
    target.load_state_dict(critic.state_dict())
    reference = SquashedGaussianActor(obs_dim, act_dim, hidden).to(device).requires_grad_(False)
    # w is [1], not 0-d: torch.compile (torch 2.x) loses in-place updates of a 0-d float64 tensor; float64, since
    # float32 drifts by 5e-4 over 20k annealing steps.
    return Agent(SquashedGaussianActor(obs_dim, act_dim, hidden).to(device), critic, target,
                 VectorizedBaseline(obs_dim, 2, hidden).to(device), reference,
                 torch.zeros((), device=device, requires_grad=True), torch.ones(1, dtype=torch.float64, device=device))


@torch.no_grad()
def align(agent: Agent, w0: float) -> None:
    """The alignment step between the phases ([ACA] run_aca.py, utility.py::critic_init): R_k <- Z_k with zero action
    weights in the first layer (R_k(s, a) = Z_k(s)), targets = R, log alpha = 0, pi_0 = the offline actor, w = i0.
    The offline SAC critics are overwritten: nothing of them survives."""
    obs_dim = agent.baseline.layers[0].weight.shape[1]
    first = agent.critic.layers[0]
    first.weight[:, :obs_dim].copy_(agent.baseline.layers[0].weight)
    first.weight[:, obs_dim:].zero_()
    first.bias.copy_(agent.baseline.layers[0].bias)
    for r_layer, z_layer in zip(agent.critic.layers[1:], agent.baseline.layers[1:]):
        r_layer.weight.copy_(z_layer.weight)
        r_layer.bias.copy_(z_layer.bias)
    agent.critic_target.load_state_dict(agent.critic.state_dict())
    agent.log_alpha.zero_()
    agent.reference.load_state_dict(agent.actor.state_dict())
    agent.w.fill_(w0)


# ---- losses and updates
@torch.no_grad()
def polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def temperature_loss(log_alpha: torch.Tensor, log_pi: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """-mean[log alpha (log pi(a~|s) + H_target)], H_target = -|A|."""
    return -(log_alpha * (log_pi.detach() + target_entropy)).mean()


def soft_clip(reference: SquashedGaussianActor, obs: torch.Tensor, actions: torch.Tensor, beta: float,
              w: torch.Tensor) -> torch.Tensor:
    """C = w (softplus(log pi_0(a|s) - clip_at) + clip_at), a smooth floor at clip_at(s) = the smaller log pi_0 of
    the pre-tanh points mu_0 - beta sigma_0 and mu_0 + beta sigma_0 ([ACA] aca_impl.py::clip_log_pi). Differentiable
    in the actions; clip_at carries no gradient. [B]"""
    mu, log_std = reference.dist(obs)
    log_pi0 = squashed_log_prob(mu, log_std, torch.atanh(actions.clamp(-ATANH_CLIP, ATANH_CLIP)))
    with torch.no_grad():
        spread = beta * log_std.exp()
        clip_at = torch.minimum(squashed_log_prob(mu, log_std, mu - spread),
                                squashed_log_prob(mu, log_std, mu + spread))
    return w.to(log_pi0.dtype) * (nn.functional.softplus(log_pi0 - clip_at) + clip_at)


@torch.no_grad()
def anneal(w: torch.Tensor, interpolation: tuple[float, float, float]) -> None:
    """w <- max(w - i0 / (i1 * 1000), i2) in place, after every online update ([ACA] aca.py::_update_interpolation)."""
    i0, i1, i2 = interpolation
    w.copy_(torch.clamp(w - i0 / (i1 * 1000), min=i2))


def aligned_q(agent: Agent, obs: torch.Tensor, actions: torch.Tensor, beta: float) -> torch.Tensor:
    """Q(s, a) = min_k R_k(s, a) + C(log pi_0(a|s)): the online critic, the value the online actor maximises."""
    return agent.critic(obs, actions).min(dim=0).values + soft_clip(agent.reference, obs, actions, beta, agent.w)


@torch.no_grad()
def sac_target(agent: Agent, batch: dict[str, torch.Tensor], alpha: torch.Tensor, gamma: float) -> torch.Tensor:
    """Offline y = r + gamma (1 - terminated) [min_k Q'_k(s', a') - alpha log pi(a'|s')], a' ~ pi(s'). [B]"""
    next_action, next_log_pi = agent.actor(batch["next_observations"])
    q_next = agent.critic_target(batch["next_observations"], next_action).min(dim=0).values
    return batch["rewards"] + gamma * (1.0 - batch["terminated"]) * (q_next - alpha * next_log_pi)


@torch.no_grad()
def baseline_target(agent: Agent, batch: dict[str, torch.Tensor], alpha: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_Z = r + gamma (1 - terminated) [log pi(a'|s') + min_k Z_k(s') - alpha log pi(a'|s')], a' ~ pi(s'), with the
    online Z (there is no target baseline). [B]"""
    _, next_log_pi = agent.actor(batch["next_observations"])
    z_next = agent.baseline(batch["next_observations"]).min(dim=0).values
    return batch["rewards"] + gamma * (1.0 - batch["terminated"]) * (next_log_pi + z_next - alpha * next_log_pi)


@torch.no_grad()
def aligned_target(agent: Agent, batch: dict[str, torch.Tensor], alpha: torch.Tensor, gamma: float, beta: float
                   ) -> torch.Tensor:
    """Online y = r + gamma (1 - terminated) [min_k R'_k(s', a') + C(log pi_0(a'|s')) - alpha log pi(a'|s')]. [B]"""
    next_obs = batch["next_observations"]
    next_action, next_log_pi = agent.actor(next_obs)
    q_next = agent.critic_target(next_obs, next_action).min(dim=0).values
    q_next = q_next + soft_clip(agent.reference, next_obs, next_action, beta, agent.w)
    return batch["rewards"] + gamma * (1.0 - batch["terminated"]) * (q_next - alpha * next_log_pi)


def make_update_fns(agent: Agent, args: Args, act_dim: int
                    ) -> tuple[Callable[..., dict[str, torch.Tensor]], Callable[..., dict[str, torch.Tensor]],
                               dict[str, Any]]:
    """The offline (SAC+ML + baseline) and the online (aligned SAC) update on a [B] batch, sharing the optimisers, as
    d3rlpy's `load_model` carries them over. Each optimiser steps on its own loss right after computing it."""
    optims = {"actor_optim": torch.optim.Adam(agent.actor.parameters(), lr=args.actor_lr),
              "critic_optim": torch.optim.Adam(agent.critic.parameters(), lr=args.critic_lr),
              "alpha_optim": torch.optim.Adam([agent.log_alpha], lr=args.alpha_lr),
              "baseline_optim": torch.optim.Adam(agent.baseline.parameters(), lr=args.baseline_lr)}
    gamma, tau, alpha_ml, beta, target_entropy = args.gamma, args.tau, args.alpha_ml, args.beta, -float(act_dim)
    interpolation, actor_grad_clip = tuple(args.interpolation), args.actor_grad_clip

    def step(name: str, loss: torch.Tensor) -> None:
        optims[name].zero_grad(set_to_none=True)
        loss.backward()
        optims[name].step()

    def temperature_step(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # its own policy sample ([d3rlpy] update_temp)
            _, log_pi = agent.actor(obs)
        alpha_loss = temperature_loss(agent.log_alpha, log_pi, target_entropy)
        step("alpha_optim", alpha_loss)
        return alpha_loss.detach(), agent.log_alpha.detach().exp(), -log_pi.mean()

    def offline_update(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        obs, actions = batch["observations"], batch["actions"]
        alpha_loss, alpha, entropy = temperature_step(obs)

        y = sac_target(agent, batch, alpha, gamma)
        q = agent.critic(obs, actions)  # [2, B]
        critic_loss = (q - y).pow(2).mean(dim=1).sum()
        step("critic_optim", critic_loss)

        y_z = baseline_target(agent, batch, alpha, gamma)
        with torch.no_grad():
            log_pi_data = agent.actor.log_prob(obs, actions)
        z = agent.baseline(obs)  # [2, B]
        baseline_loss = (log_pi_data + z - y_z).pow(2).mean(dim=1).sum()
        step("baseline_optim", baseline_loss)

        action, log_pi = agent.actor(obs)
        q_pi = agent.critic(obs, action, detach=True).min(dim=0).values
        lam = alpha_ml / q_pi.abs().mean().detach()  # TD3+BC's scaling of the RL part
        # computed again, with its graph: one graph shared with the baseline's loss breaks under torch.compile
        log_likelihood = agent.actor.log_prob(obs, actions).mean()
        actor_loss = lam * (alpha * log_pi - q_pi).mean() - log_likelihood
        step("actor_optim", actor_loss)
        polyak(agent.critic_target, agent.critic, tau)
        return {"loss/critic": critic_loss.detach(), "loss/baseline": baseline_loss.detach(),
                "loss/actor": actor_loss.detach(), "loss/alpha": alpha_loss, "alpha": alpha, "entropy": entropy,
                "lam": lam, "log_likelihood": log_likelihood.detach(), "q/mean": q.detach().mean(),
                "z/mean": z.detach().mean()}

    def online_update(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        obs, actions = batch["observations"], batch["actions"]
        alpha_loss, alpha, entropy = temperature_step(obs)

        y = aligned_target(agent, batch, alpha, gamma, beta)
        with torch.no_grad():
            c_data = soft_clip(agent.reference, obs, actions, beta, agent.w)
        r = agent.critic(obs, actions)  # [2, B]
        critic_loss = (r + c_data - y).pow(2).mean(dim=1).sum()
        step("critic_optim", critic_loss)

        action, log_pi = agent.actor(obs)
        # The gradient reaches the actor through R and through C's log pi_0(a~|s) ([ACA] keep_grad=True).
        q_pi = agent.critic(obs, action, detach=True).min(dim=0).values
        q_pi = q_pi + soft_clip(agent.reference, obs, action, beta, agent.w)
        actor_loss = (alpha * log_pi - q_pi).mean()
        optims["actor_optim"].zero_grad(set_to_none=True)
        actor_loss.backward()
        nn.utils.clip_grad_norm_(agent.actor.parameters(), actor_grad_clip)
        optims["actor_optim"].step()
        polyak(agent.critic_target, agent.critic, tau)
        w = agent.w.detach().squeeze(0).clone()
        anneal(agent.w, interpolation)
        return {"loss/critic": critic_loss.detach(), "loss/actor": actor_loss.detach(), "loss/alpha": alpha_loss,
                "alpha": alpha, "entropy": entropy, "w": w, "q/mean": (r.detach().min(dim=0).values + c_data).mean(),
                "c/mean": c_data.mean()}

    return offline_update, online_update, optims


# >>> shared: q_diagnostics
def q_horizon(gamma: float) -> int:
    """H, the smallest number of steps with gamma^H < 0.01: the tail a Monte-Carlo Q needs (459 at 0.99)."""
    return math.ceil(math.log(0.01) / math.log(gamma))


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    out, running = np.zeros(len(rewards), dtype=np.float64), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def windowed_kendall_tau(q_est: np.ndarray, q_true: np.ndarray, window: int = 10) -> np.ndarray:
    """Kendall's tau-b (scipy.stats.kendalltau's default) of every `window` consecutive pairs, stride 1, at once;
    NaN where it is undefined (all values in a window tied)."""
    if len(q_est) < window:
        return np.zeros(0)
    x = np.lib.stride_tricks.sliding_window_view(q_est, window)  # [W, window]
    y = np.lib.stride_tricks.sliding_window_view(q_true, window)
    i, j = np.triu_indices(window, k=1)
    sx, sy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    n_pairs = len(i)
    denom = np.sqrt((n_pairs - (sx == 0).sum(1)) * (n_pairs - (sy == 0).sum(1)).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (sx * sy).sum(1) / denom, np.nan)


def q_diagnostics(episodes: list[dict[str, np.ndarray]], limit: int, horizon: int, gamma: float,
                  window: int = 10) -> dict[str, float]:
    """Normalised difference and windowed Kendall's tau of Q_est against Monte-Carlo Q_true.

    Each episode holds `q_est`, `rewards` (as the critic sees them) and `terminated`. Step t < limit is scored if the
    episode terminated or at least `horizon` rewards follow from t on (T - t >= horizon), so Q_true's missing tail
    weighs less than 1%. normalised difference = mean of (Q_est - Q_true) / |Q_true| over scored steps with
    |Q_true| >= 1e-3; tau = mean over windows of `window` consecutive scored steps of all episodes.
    """
    diffs, taus, scored_steps = [], [], 0
    for ep in episodes:
        q_true = discounted_returns(ep["rewards"], gamma)
        t = np.arange(len(q_true))
        scored = (t < limit) & (bool(ep["terminated"]) | (len(q_true) - t >= horizon))
        q_est, q_true = ep["q_est"][scored].astype(np.float64), q_true[scored]
        scored_steps += int(scored.sum())
        ok = np.abs(q_true) >= 1e-3
        diffs.append((q_est[ok] - q_true[ok]) / np.abs(q_true[ok]))
        taus.append(windowed_kendall_tau(q_est, q_true, window))
    diffs, taus = np.concatenate(diffs), np.concatenate(taus)
    taus = taus[~np.isnan(taus)]
    return {"q_normalized_difference": float(diffs.mean()) if len(diffs) else float("nan"),
            "q_kendall_tau": float(taus.mean()) if len(taus) else float("nan"),
            "q_scored_steps": scored_steps}
# <<< shared: q_diagnostics


# >>> shared: evaluation
@torch.no_grad()
def evaluate(env: gym.Env, actor: nn.Module, q_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             n_episodes: int, seed: int, limit: int, family: str | None, gamma: float, horizon: int,
             reward_fn: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    """Deterministic episodes (episode i starts from `seed + i`), their returns over the first `limit` steps, the
    normalised score, and the Q diagnostics on every step, with episodes run on past `limit` when `env` allows."""
    returns, episodes = [], []
    device = next(actor.parameters()).device
    for i in range(n_episodes):
        obs, _ = env.reset(seed=seed + i)
        observations, actions, rewards, terminated, truncated = [], [], [], False, False
        while not (terminated or truncated):
            action = actor.act(obs, deterministic=True)
            observations.append(obs)
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(reward)
        rewards = np.asarray(rewards, dtype=np.float64)
        returns.append(rewards[:limit].sum())
        obs_t = torch.as_tensor(np.asarray(observations), dtype=torch.float32, device=device)
        act_t = torch.as_tensor(np.asarray(actions), dtype=torch.float32, device=device)
        episodes.append({"q_est": q_fn(obs_t, act_t).cpu().numpy(), "rewards": reward_fn(rewards),
                         "terminated": terminated})
    returns = np.asarray(returns)
    return {"return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "normalized_score": float(normalized_score(family, returns.mean())),
            **q_diagnostics(episodes, limit, horizon, gamma)}
# <<< shared: evaluation


# >>> shared: logging
def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise RunError(f"cannot use --device {name} ({e}); try --device cpu") from None
    return device


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "numpy", "gymnasium", "mujoco", "gymnasium-robotics", "minari", "h5py", "tyro"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Logger:
    """TensorBoard scalars, `eval.jsonl` rows and a progress bar.

    Training metrics are 0-d device tensors summed on the device; `flush` moves them to the host once per
    `log_every` steps and stops the run if any is not finite, before a checkpoint could store the damage.
    """

    def __init__(self, run_dir: Path, n_eval_rows: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.writer = run_dir, SummaryWriter(str(run_dir))
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # per metric: update functions may run at different rates
        self.n_eval_rows, self.last_step, self.last_time = n_eval_rows, 0, time.perf_counter()
        self.bar: tqdm | None = None
        self.phase = "train"
        path = run_dir / "eval.jsonl"
        if path.exists():  # on resume, drop rows written after the checkpoint the run continues from
            rows = path.read_text().splitlines()[:n_eval_rows]
            path.write_text("".join(r + "\n" for r in rows))

    def progress(self, total: int, initial: int, desc: str) -> None:
        """Start the progress bar of a phase; `desc` (offline/online) also prefixes its TensorBoard tags."""
        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=2.0)
        self.phase, self.last_step, self.last_time = desc, initial, time.perf_counter()

    def accumulate(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.detach().clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self, step: int) -> None:
        if not self.sums:
            return
        keys = list(self.sums)
        values = torch.stack([self.sums[k].float() for k in keys]).cpu().numpy() / [self.counts[k] for k in keys]
        bad = [k for k, v in zip(keys, values) if not np.isfinite(v)]
        if bad:
            raise RunError(f"non-finite {', '.join(bad)} before step {step}; the run stopped. The last "
                           f"checkpoint.pt in {self.run_dir} is from before this and can be resumed with other "
                           f"settings (e.g. a lower learning rate).")
        for k, v in zip(keys, values):  # offline steps count gradient steps, online ones env steps
            self.writer.add_scalar(f"{self.phase}/{k}", v, step)
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.writer.add_scalar(f"{self.phase}/steps_per_second", rate, step)
        self.sums, self.counts, self.last_step, self.last_time = {}, {}, step, now

    def eval_row(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.n_eval_rows += 1
        step = row["grad_step"] if row["phase"] == "offline" else row["env_step"]
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("env_step", "grad_step"):
                self.writer.add_scalar(f"eval_{row['phase']}/{k}", v, step)
        line = (f"[{row['phase']}] env_step {row['env_step']} grad_step {row['grad_step']}: return "
                f"{row['return_mean']:.1f} +- {row['return_std']:.1f}, score {row['normalized_score']:.1f}, "
                f"Q diff {row['q_normalized_difference']:.3f}, tau {row['q_kendall_tau']:.3f}")
        if self.bar is not None:
            self.bar.set_postfix(score=f"{row['normalized_score']:.1f}")
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
# <<< shared: logging


# >>> shared: checkpoint
def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_of(objects: dict[str, Any]) -> dict[str, Any]:
    """Everything with a `state_dict` is saved through it, tensors and plain values as they are."""
    return {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in objects.items()}


def restore(objects: dict[str, Any], saved: dict[str, Any]) -> None:
    for k, v in objects.items():
        if hasattr(v, "load_state_dict"):
            v.load_state_dict(saved[k])
        elif isinstance(v, torch.Tensor):
            with torch.no_grad():
                v.copy_(saved[k])


def restore_optimizers(optims: dict[str, Any], saved: dict[str, Any]) -> None:
    """Adam's states from another run (an offline.pt) under this run's learning rates: an optimiser's state_dict
    carries the learning rate it was saved with, which would silently override this run's flags."""
    lrs = {name: [group["lr"] for group in optim.param_groups] for name, optim in optims.items()
           if hasattr(optim, "param_groups")}
    restore(optims, saved)
    for name, groups in lrs.items():
        for group, lr in zip(optims[name].param_groups, groups):
            group["lr"] = lr


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file and rename, so that a run killed while saving keeps its previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise RunError(f"{path} is not a readable checkpoint ({e}); it was kept as it is.") from None


def new_run_dir(output_dir: str, algo: str, env_id: str, seed: int) -> Path:
    name = f"{algo}__{env_id.replace('/', '_')}__{seed}__{int(time.time())}"
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    for suffix in ("", *(f"-{i}" for i in range(1, 100))):  # two runs started in the same second
        try:
            (Path(output_dir) / (name + suffix)).mkdir()
            return Path(output_dir) / (name + suffix)
        except FileExistsError:
            continue
    raise RunError(f"could not make a new run directory {name} in {output_dir}")


def resumed_args(cls: type, run_dir: Path) -> Any:
    """The arguments a run was started with, from its config.json."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunError(f"--resume {run_dir}: no config.json there; pass a run directory made by this script")
    saved = json.loads(path.read_text())["args"]
    return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})
# <<< shared: checkpoint


# ---- the online buffer and the training loops
def top_episodes(data: dict[str, np.ndarray], k: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The k dataset episodes of highest return (sum of rewards), whole and in dataset order, and their indices.

    An episode ends at a terminated or truncated row (the data block flags every episode's last row; rows after the
    last flag count as one more episode). Ties go to the earlier episode; k = -1 or k >= the number of episodes
    takes them all, k = 0 none."""
    n = len(data["rewards"])
    ends = np.flatnonzero((data["terminated"] + data["truncated"]).ravel() > 0)
    if not len(ends) or ends[-1] != n - 1:
        ends = np.append(ends, n - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    returns = np.add.reduceat(data["rewards"].ravel().astype(np.float64), starts)
    chosen = np.sort(np.argsort(-returns, kind="stable")[: len(returns) if k < 0 else k])
    keep = np.repeat(np.isin(np.arange(len(returns)), chosen), ends - starts + 1)
    return {key: v[keep] for key, v in data.items()}, chosen


def online_buffer(args: Args, data: dict[str, np.ndarray], obs_dim: int, act_dim: int, device: torch.device
                  ) -> ReplayBuffer:
    """A FIFO buffer of --buffer-size rows (no more than can ever be filled) holding the top --n-trajs episodes, then
    the online transitions ([ACA] run_aca.py, utility.py::buffer_init), with a seed of its own."""
    top, _ = top_episodes(data, args.n_trajs)
    n_top = len(top["rewards"])
    buffer = ReplayBuffer(min(args.buffer_size, n_top + args.online_steps), obs_dim, act_dim, device, args.seed + 1)
    if n_top:
        buffer.load_dataset(top)
    return buffer


def train_offline(args: Args, agent: Agent, buffer: ReplayBuffer, update: Callable, optims: dict[str, Any],
                  ctx: dict[str, Any], logger: Logger, start: int) -> None:
    run_dir, evaluate_now = ctx["run_dir"], ctx["evaluate"]
    logger.progress(args.offline_steps, start, "offline")
    for step in range(start + 1, args.offline_steps + 1):
        logger.accumulate(update(buffer.sample(args.batch_size)))
        if step % args.log_every == 0 or step == args.offline_steps:
            logger.flush(step)
        if step % args.offline_eval_every == 0 or step == args.offline_steps:
            logger.eval_row({"phase": "offline", "env_step": 0, "grad_step": step, **evaluate_now()})
        if step % args.checkpoint_every == 0 and step < args.offline_steps:
            logger.flush(step)
            save_checkpoint(run_dir / "checkpoint.pt", {
                "phase": "offline", "grad_step": step, "n_eval_rows": logger.n_eval_rows, "rng": rng_state(),
                "agent": state_of(vars(agent)), "optims": state_of(optims), "buffer": buffer.state_dict()})
        logger.bar.update(1)
    # The optimiser states travel too: the online phase continues them, as d3rlpy's load_model does.
    save_checkpoint(run_dir / "offline.pt", {"agent": state_of(vars(agent)), "optims": state_of(optims),
                                              "env_id": args.env_id, "dataset": ctx["dataset_info"]})


def train_online(args: Args, agent: Agent, buffer: ReplayBuffer, update: Callable, optims: dict[str, Any],
                 ctx: dict[str, Any], logger: Logger, resume: dict[str, Any] | None) -> None:
    """One env step with the stochastic policy, then one update once the buffer holds more than a batch
    ([d3rlpy] fit_online with update_start_step=0)."""
    env, run_dir, evaluate_now = ctx["env"], ctx["run_dir"], ctx["evaluate"]
    env_step, grad_step = (resume["env_step"], resume["grad_step"]) if resume else (0, ctx["offline_grad_steps"])
    env.reset(seed=args.seed)
    if resume:  # checkpoints are taken at episode ends, so the env only needs its generator back
        env.unwrapped.np_random.bit_generator.state = resume["env_rng"]
    obs, _ = env.reset()
    next_checkpoint = (env_step // args.checkpoint_every + 1) * args.checkpoint_every
    logger.progress(args.online_steps, env_step, "online")
    while env_step < args.online_steps:
        if env_step % args.eval_every == 0:
            logger.eval_row({"phase": "online", "env_step": env_step, "grad_step": grad_step, **evaluate_now()})
        action = agent.actor.act(obs, deterministic=False)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, action, float(reward), next_obs, terminated, truncated)
        env_step += 1
        if buffer.size > args.batch_size:
            logger.accumulate(update(buffer.sample(args.batch_size)))
            grad_step += 1
        if env_step % args.log_every == 0:
            logger.flush(env_step)
        obs = next_obs
        if terminated or truncated:
            if env_step >= next_checkpoint:
                logger.flush(env_step)
                save_checkpoint(run_dir / "checkpoint.pt", {
                    "phase": "online", "env_step": env_step, "grad_step": grad_step,
                    "n_eval_rows": logger.n_eval_rows, "rng": rng_state(),
                    "env_rng": env.unwrapped.np_random.bit_generator.state, "agent": state_of(vars(agent)),
                    "optims": state_of(optims), "buffer": buffer.state_dict()})
                next_checkpoint = (env_step // args.checkpoint_every + 1) * args.checkpoint_every
            obs, _ = env.reset()
        logger.bar.update(1)
    logger.flush(env_step)
    logger.eval_row({"phase": "online", "env_step": env_step, "grad_step": grad_step, **evaluate_now()})
    save_checkpoint(run_dir / "checkpoint.pt", {
        "phase": "done", "env_step": env_step, "grad_step": grad_step, "n_eval_rows": logger.n_eval_rows,
        "agent": state_of(vars(agent)), "optims": state_of(optims)})


def main(args: Args) -> Path:
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir:
        args = resumed_args(Args, resume_dir)
    i0, i1, _ = args.interpolation
    if i0 <= 0 or i1 <= 0:
        raise RunError(f"--interpolation {args.interpolation}: i0 and i1 must be positive ([ACA] asserts it)")
    if args.n_trajs < -1:
        raise RunError(f"--n-trajs {args.n_trajs}: give a count >= 0, or -1 for every episode")
    if args.buffer_size < 1:
        raise RunError(f"--buffer-size {args.buffer_size}: the online buffer needs room for at least one transition")
    task = resolve_task(args.env_id, args.data, args.dataset)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    seed_everything(args.seed, args.deterministic)
    env = make_env(task)
    data, dataset_info = load_dataset(task, args.dataset)
    check_spaces(data, env, dataset_info["dataset"])
    eval_env = make_env(task, q_horizon(args.gamma) if args.q_diag_extend_steps is None else args.q_diag_extend_steps)

    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = make_agent(obs_dim, act_dim, args.hidden_dim, device)
    offline_update, online_update, optims = make_update_fns(agent, args, act_dim)
    n_data = len(data["rewards"])

    if resume_dir:
        run_dir, ckpt = resume_dir, load_checkpoint(resume_dir / "checkpoint.pt", device)
        set_rng_state(ckpt["rng"]) if "rng" in ckpt else None
    else:
        ckpt = None
        run_dir = new_run_dir(args.output_dir, ALGO, args.env_id, args.seed)
        write_json(run_dir / "config.json", {
            "algo": ALGO, "args": dataclasses.asdict(args), **dataset_info, "eval_env_id": task.eval_env_id,
            "max_episode_steps": task.max_episode_steps, "device": str(device), "device_name": device_name(device),
            "packages": package_versions(), "command": " ".join(sys.argv)})
    if ckpt is not None and ckpt["phase"] == "done":
        print(f"{run_dir} has already finished")
        return run_dir
    logger = Logger(run_dir, ckpt["n_eval_rows"] if ckpt else 0)
    horizon = q_horizon(args.gamma)
    # Q_est: min(Q1, Q2) offline, the aligned min R + C online (design/q_diagnostics.md)
    ctx = {"run_dir": run_dir, "env": env, "dataset_info": dataset_info,
           "q_fn": lambda s, a: agent.critic(s, a).min(dim=0).values}
    ctx["evaluate"] = lambda: {**evaluate(eval_env, agent.actor, ctx["q_fn"], args.eval_episodes,
                                          100_000 * (args.seed + 1), task.max_episode_steps, task.family, args.gamma,
                                          horizon, lambda r: r),
                               "wall_time": time.time()}
    compile_fn = torch.compile if args.compile else (lambda f: f)
    print(f"{ALGO} on {task.env_id}: {n_data} transitions from {dataset_info['dataset']}, evaluated on "
          f"{task.eval_env_id}, device {device}; run directory {run_dir}")

    phase = ckpt["phase"] if ckpt else ("online" if args.offline_checkpoint else "offline")
    if phase == "offline":
        buffer = ReplayBuffer(n_data, obs_dim, act_dim, device, args.seed)
        buffer.load_dataset(data)
        start = 0
        if ckpt:
            restore(vars(agent), ckpt["agent"])
            restore(optims, ckpt["optims"])
            buffer.load_state_dict(ckpt["buffer"])
            start = ckpt["grad_step"]
        train_offline(args, agent, buffer, compile_fn(offline_update), optims, ctx, logger, start)
        ckpt = None
    elif args.offline_checkpoint and not ckpt:
        offline = load_checkpoint(Path(args.offline_checkpoint), device)
        try:
            restore(vars(agent), offline["agent"])
            restore_optimizers(optims, offline["optims"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise RunError(f"{args.offline_checkpoint} does not fit these networks ({e}); pass the --hidden-dim it "
                           f"was trained with") from None

    if ckpt is None:
        align(agent, args.interpolation[0])
    ctx["q_fn"] = lambda s, a: aligned_q(agent, s, a, args.beta)
    ctx["offline_grad_steps"] = 0 if args.offline_checkpoint else args.offline_steps
    buffer = online_buffer(args, data, obs_dim, act_dim, device)
    n_top = buffer.size
    print(f"online buffer: {n_top} transitions of the dataset's top episodes (--n-trajs {args.n_trajs})" if n_top
          else "online buffer: no offline data (--n-trajs 0)")
    if ckpt:
        restore(vars(agent), ckpt["agent"])
        restore(optims, ckpt["optims"])
        buffer.load_state_dict(ckpt["buffer"])
    train_online(args, agent, buffer, compile_fn(online_update), optims, ctx, logger, ckpt)
    logger.close()
    return run_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except RunError as e:
        sys.exit(f"error: {e}")
