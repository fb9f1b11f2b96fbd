"""IQL: implicit Q-learning offline, then online fine-tuning with the same update.

Kostrikov, Nair, Levine. "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022 (arXiv 2110.06169).
Official code: ikostrikov/implicit_q_learning (JAX, [IQL] below); `train_finetune.py` fine-tunes.

What IQL changes relative to SAC: no loss ever evaluates an action outside the data. V(s) fits an upper expectile
(tau) of the target twin's min Q'(s, a) over dataset actions, Q(s, a) regresses on r + gamma V(s'), and the actor is
extracted by advantage-weighted regression: the log-likelihood of buffer actions weighted by
min(exp(beta (min Q'(s, a) - V(s))), 100). There is no entropy term. Fine-tuning runs the same update on one buffer
holding the dataset and the online transitions, acting with samples of the Gaussian policy.

Differences from the authors' code ([IQL] @ 09d70024; [CORL] = corl-team/CORL `algorithms/finetune/iql.py`), and
which one the default follows:
- Online actor learning rate: [IQL]'s D4RL runs decay it with a cosine over the 1M offline updates (`learner.py`),
  its fine-tuning config keeps it constant (`configs/antmaze_finetune_config.py`, which does not decay offline
  either). We decay offline and use `--actor-lr` again online (default). [CORL] keeps stepping an unclamped
  `CosineAnnealingLR`, so the rate climbs back towards 3e-4 over the next 1M steps (`--lr-schedule corl`).
- Update order: [IQL] steps V, then takes the advantage and the Q target from the updated V (default); [CORL] takes
  both from V before its step (`--update-order corl`). The actor and Q steps do not depend on each other within an
  update, so [CORL]'s Q-before-actor order changes nothing else.
- Reward scaling: [IQL] multiplies MuJoCo rewards by 1000 / (max - min episode return in the dataset) at load time
  but inserts online rewards raw (`train_finetune.py`, only ever run on AntMaze); we scale online rewards too, so
  that both phases share the critic's units (default, `--no-normalize-reward` turns it off).
- Adroit: [IQL]'s `kitchen_config.py` values (tau 0.7, beta 0.5, actor dropout 0.1, no reward scaling; default);
  [CORL]'s yamls use tau 0.8 and beta 3.0 (`--preset corl`).
- `--preset corl` also standardises observations, uses CORL's update order and learning-rate schedule, scales
  rewards only on hopper-medium(-replay), where its actor is deterministic (weighted squared error, exploration noise
  N(0, 0.03^2) clipped to 0.5), and uses tau 0.5 / beta 6 on hopper-medium-expert (CORL `configs/offline/iql`). It
  keeps [IQL]'s orthogonal init, log_std range [-5, 2], dataset actions clipped to +-(1 - 1e-5) and dropout-free
  acting; [CORL] uses PyTorch's init, [-20, 2], no clipping, and explores with dropout on.
- Critic loss: [IQL] `critic.update_q` minimises mean((Q1 - y)^2 + (Q2 - y)^2) = MSE1 + MSE2 (default); [CORL]
  minimises (MSE1 + MSE2) / 2. The value and actor losses are the same means in both. A constant factor c on a loss
  scales Adam's m by c and sqrt(v) by |c|, so the step m / (sqrt(v) + eps) equals the unscaled one with eps / |c|:
  [CORL]'s halving is our update with eps 2e-8 instead of 1e-8, the same only where gradients are far above eps.
- Budget: 1M offline updates, then o2o-rl's 100k online env steps (400k on Adroit) with one update per env step from
  the first; [IQL] fine-tunes for 1M steps. The SO2 paper's IQL-ft numbers come from rlkit's port, whose MuJoCo
  values (tau 0.7, beta 3, clip 100, return-range scaling) agree with [IQL].

Data, evaluation and outputs follow o2o-rl's protocol (`--help`; README.md).
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

ALGO = "iql_ft"


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
    offline_steps: int = 1_000_000
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
    # ---- IQL
    preset: Literal["iql", "corl"] = "iql"
    """per-dataset values: iql = the authors' code, corl = CORL's (see PRESETS and the docstring); other flags win"""
    batch_size: int = 256
    """batch size"""
    actor_lr: float = 3e-4
    """actor learning rate (offline: cosine-decayed to 0 over --offline-steps, see --lr-schedule)"""
    critic_lr: float = 3e-4
    """learning rate of the twin Q"""
    value_lr: float = 3e-4
    """learning rate of V"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target twin Q, after every Q step"""
    expectile: float = 0.7
    """tau of the expectile loss: V(s) fits the tau-expectile of min Q'(s, a) over buffer actions"""
    beta: float = 3.0
    """inverse temperature of the advantage weights exp(beta (Q - V)) ([IQL]'s `temperature`)"""
    weight_max: float = 100.0
    """the advantage weights are clipped at this value ([IQL] EXP_ADV_MAX)"""
    actor_dropout: float = 0.0
    """dropout rate after each hidden layer of the actor, in its loss only"""
    normalize_reward: bool = True
    """multiply rewards by 1000 / (max - min episode return of the dataset), offline and online"""
    normalize_obs: bool = False
    """standardise observations with the dataset's mean and std (kept inside every network)"""
    update_order: Literal["iql", "corl"] = "iql"
    """iql: advantage and Q target from V after its step; corl: from V before its step (see the docstring)"""
    lr_schedule: Literal["iql", "corl"] = "iql"
    """iql: cosine decay offline, constant online; corl: the cosine keeps going online (see the docstring)"""
    actor_type: Literal["gaussian", "deterministic"] = "gaussian"
    """gaussian: weighted log-likelihood; deterministic: weighted squared error of the mean (CORL)"""
    expl_noise: float = 0.03
    """std of the exploration noise of a deterministic actor, clipped to [-0.5, 0.5] (CORL)"""


# Only what differs from Args; a task id wins over its family.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # [IQL] configs/kitchen_config.py (its README uses it for Adroit); Adroit budget, SO2 "Evaluation on Adroit"
    "pen": dict(beta=0.5, actor_dropout=0.1, normalize_reward=False, online_steps=400_000),
    "door": dict(beta=0.5, actor_dropout=0.1, normalize_reward=False, online_steps=400_000),
}
# --preset corl: "*" applies to every task, then the family, then the task id.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {"iql": {}, "corl": {
    "*": dict(normalize_obs=True, update_order="corl", lr_schedule="corl", normalize_reward=False),  # finetune/iql.py
    "pen": dict(expectile=0.8, beta=3.0),  # CORL configs/finetune/iql/pen/cloned_v1.yaml
    "door": dict(expectile=0.8, beta=3.0),  # CORL configs/finetune/iql/door/cloned_v1.yaml
    "hopper-medium": dict(actor_type="deterministic", normalize_reward=True),  # configs/offline/iql/hopper/medium_v2
    "hopper-medium-replay": dict(actor_type="deterministic", normalize_reward=True),  # .../medium_replay_v2
    "hopper-medium-expert": dict(expectile=0.5, beta=6.0),  # configs/offline/iql/hopper/medium_expert_v2.yaml
}}


def parse_args(argv: list[str] | None = None) -> Args:
    """Apply the per-dataset defaults of --env-id (and --preset) first, so that explicit flags win and --help shows
    them."""
    argv = sys.argv[1:] if argv is None else argv
    given = {"env_id": Args.env_id, "preset": Args.preset}
    for i, token in enumerate(argv):
        for name in given:
            flags = (f"--{name.replace('_', '-')}", f"--{name}")
            if token.startswith(tuple(f + "=" for f in flags)):
                given[name] = token.split("=", 1)[1]
            elif token in flags and i + 1 < len(argv):
                given[name] = argv[i + 1]
    env_id, family = given["env_id"], given["env_id"].split("-")[0]
    overrides = {**DATASET_DEFAULTS.get(family, {}), **DATASET_DEFAULTS.get(env_id, {})}
    for key in ("*", family, env_id):
        overrides.update(PRESETS.get(given["preset"], {}).get(key, {}))
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
# >>> shared: gaussian_policy
class ObsNorm(nn.Module):
    """(s - mean) / std with the dataset's moments as buffers, so that act(), Q_est and checkpoints carry them
    (identity unless set)."""

    def __init__(self, obs_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("std", torch.ones(obs_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean) / self.std


class GaussianActor(nn.Module):
    """pi(a|s) = N(tanh(mu(s)), diag(sigma^2)) with a state-independent sigma. Samples are not squashed, so every
    buffer action has a finite log-likelihood ([IQL] `NormalTanhPolicy(tanh_squash_distribution=False)`, rlkit
    `GaussianPolicy(std_architecture="values")`). log_sigma is clamped to [log_std_min, log_std_max] ([IQL]) or,
    with `sigmoid_log_std`, mapped into it by a sigmoid (rlkit). Dropout follows each hidden layer when asked for."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, n_layers: int = 2, log_std_min: float = -5.0,
                 log_std_max: float = 2.0, sigmoid_log_std: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = ObsNorm(obs_dim)
        dims = [obs_dim] + [hidden] * n_layers
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.mu = nn.Linear(hidden, act_dim)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.log_std_min, self.log_std_max, self.sigmoid_log_std = log_std_min, log_std_max, sigmoid_log_std
        self.dropout = dropout

    def forward(self, obs: torch.Tensor, dropout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of the action distribution; `dropout` switches the dropout layers on (losses only)."""
        h = self.norm(obs)
        for layer in self.hidden:
            h = nn.functional.dropout(torch.relu(layer(h)), self.dropout, training=dropout and self.dropout > 0)
        mean = torch.tanh(self.mu(h))
        if self.sigmoid_log_std:
            log_std = self.log_std_min + torch.sigmoid(self.log_std) * (self.log_std_max - self.log_std_min)
        else:
            log_std = self.log_std.clamp(self.log_std_min, self.log_std_max)
        return mean, log_std.expand_as(mean)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor, dropout: bool = False) -> torch.Tensor:
        mean, log_std = self(obs, dropout)
        z = (actions - mean) / log_std.exp()
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        mean, log_std = self(torch.as_tensor(obs, dtype=torch.float32, device=self.mu.weight.device).unsqueeze(0))
        action = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        return action[0].clamp(-1.0, 1.0).cpu().numpy()


class TwinQ(nn.Module):
    """Q1, Q2 on (normalised s, a) as one vectorised pair: [2, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, n_layers: int = 2) -> None:
        super().__init__()
        self.norm = ObsNorm(obs_dim)
        self.q = VectorizedCritic(obs_dim, act_dim, 2, hidden, n_layers, edac_init=False)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, detach: bool = False) -> torch.Tensor:
        return self.q(self.norm(obs), action, detach)
# <<< shared: gaussian_policy


class ValueNet(nn.Module):
    """V(s): s -> hidden -> hidden -> 1."""

    def __init__(self, obs_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = ObsNorm(obs_dim)
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(obs)).squeeze(-1)


@torch.no_grad()
def orthogonal_init(module: nn.Module) -> None:
    """[IQL]'s `default_init`: orthogonal weights with gain sqrt(2) in every layer, output layers included; zero
    biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, VectorizedLinear)):
            for w in m.weight.view(-1, *m.weight.shape[-2:]):  # one matrix per ensemble member
                nn.init.orthogonal_(w, gain=math.sqrt(2))
            nn.init.zeros_(m.bias)


# ---- losses and updates
def return_range_scale(data: dict[str, np.ndarray]) -> float:
    """1000 / (max - min undiscounted episode return), episodes split where `terminated` or `truncated` is set
    ([IQL] `train_finetune.normalize`; the file's cut-off last episode counts as one)."""
    rewards = data["rewards"].ravel().astype(np.float64)
    ends = np.flatnonzero((data["terminated"].ravel() > 0) | (data["truncated"].ravel() > 0))
    starts = np.concatenate([[0], ends + 1])
    returns = np.add.reduceat(rewards, starts[starts < len(rewards)])
    if len(returns) < 2 or returns.max() == returns.min():
        raise RunError("the dataset's episode returns have no range to scale rewards by: pass --no-normalize-reward")
    return 1000.0 / float(returns.max() - returns.min())


def prepare_data(args: Args, data: dict[str, np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], Callable[[Any], Any], float]:
    """The dataset as the critics see it, the reward transform for online rewards and Q_true, and its factor.

    Actions are clipped to +-(1 - 1e-5) ([IQL] `D4RLDataset(clip_to_eps=True)`) so that the tanh mean can reach
    them. The factor is a Python float, so a scalar online reward stays a scalar for ReplayBuffer.add."""
    scale = return_range_scale(data) if args.normalize_reward else 1.0
    reward_fn = lambda r: r * scale  # noqa: E731
    data = {**data, "actions": np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5),
            "rewards": reward_fn(data["rewards"]).astype(np.float32)}
    return data, reward_fn, scale


def expectile_loss(u: torch.Tensor, expectile: float) -> torch.Tensor:
    """mean(|tau - 1(u < 0)| u^2) for u = Q - V: the asymmetric L2 whose minimiser V is the tau-expectile of Q."""
    return ((expectile - (u < 0).to(u.dtype)).abs() * u.pow(2)).mean()


def awr_weights(adv: torch.Tensor, beta: float, weight_max: float) -> torch.Tensor:
    """exp(beta adv), clipped at weight_max."""
    return torch.exp(beta * adv).clamp(max=weight_max)


def awr_actor_loss(actor: GaussianActor, obs: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor,
                   deterministic: bool) -> torch.Tensor:
    """-mean(w log pi(a|s)); a deterministic actor regresses its mean instead: mean(w ||mu(s) - a||^2) (CORL)."""
    if deterministic:
        mean, _ = actor(obs, dropout=True)
        return (weights * (mean - actions).pow(2).sum(-1)).mean()
    return -(weights * actor.log_prob(obs, actions, dropout=True)).mean()


def critic_loss(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE(Q1, y) + MSE(Q2, y) for q: [2, B] ([IQL]; CORL halves it, see the docstring)."""
    return (q - y).pow(2).mean(dim=1).sum()


@torch.no_grad()
def polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


@dataclass
class Agent:
    actor: GaussianActor
    critic: TwinQ
    critic_target: TwinQ
    value: ValueNet


def make_agent(args: Args, obs_dim: int, act_dim: int, obs_moments: tuple[torch.Tensor, torch.Tensor],
               device: torch.device) -> Agent:
    """Actor, twin Q, its target copy and V, 2 hidden layers of --hidden-dim each with [IQL]'s orthogonal init; the
    dataset's observation moments go into every network when --normalize-obs is set."""
    width = args.hidden_dim
    agent = Agent(GaussianActor(obs_dim, act_dim, width, dropout=args.actor_dropout), TwinQ(obs_dim, act_dim, width),
                  TwinQ(obs_dim, act_dim, width), ValueNet(obs_dim, width))
    for net in vars(agent).values():
        orthogonal_init(net)
        if args.normalize_obs:
            net.norm.mean.copy_(obs_moments[0])
            net.norm.std.copy_(obs_moments[1])
        net.to(device)
    agent.critic_target.load_state_dict(agent.critic.state_dict())
    return agent


@torch.no_grad()
def advantage_and_target(agent: Agent, batch: dict[str, torch.Tensor], q_target: torch.Tensor, gamma: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """adv = min Q'(s, a) - V(s) and y = r + gamma (1 - terminated) V(s'), with V as it is now. A truncated row
    bootstraps: the time limit is not part of the state."""
    adv = q_target - agent.value(batch["observations"])
    y = batch["rewards"] + gamma * (1.0 - batch["terminated"]) * agent.value(batch["next_observations"])
    return adv, y


@torch.no_grad()
def q_estimate(agent: Agent, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Q_est of the Q diagnostics: min(Q1', Q2') of the target twin, the value V and the advantage are fitted to."""
    return agent.critic_target(obs, actions).min(dim=0).values


def make_update(agent: Agent, args: Args
                ) -> tuple[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], dict[str, Any]]:
    """One IQL step on a [B] batch, the same offline and online: V (expectile), actor (AWR), Q (TD on V(s')),
    Polyak. The actor's cosine schedule is stepped by the loops, outside the (compilable) update."""
    # A (CPU) tensor learning rate lets the schedule change it in place, without recompiling a compiled update.
    actor_optim = torch.optim.Adam(agent.actor.parameters(), lr=torch.tensor(args.actor_lr))
    critic_optim = torch.optim.Adam(agent.critic.parameters(), lr=args.critic_lr)
    value_optim = torch.optim.Adam(agent.value.parameters(), lr=args.value_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(actor_optim, T_max=max(args.offline_steps, 1))
    gamma, tau, expectile, beta, weight_max = args.gamma, args.tau, args.expectile, args.beta, args.weight_max
    v_before_step, deterministic = args.update_order == "corl", args.actor_type == "deterministic"

    def update(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        obs, actions = batch["observations"], batch["actions"]
        q_target = agent.critic_target(obs, actions, detach=True).min(dim=0).values
        if v_before_step:
            adv, y = advantage_and_target(agent, batch, q_target, gamma)
        v = agent.value(obs)
        value_loss = expectile_loss(q_target - v, expectile)
        value_optim.zero_grad(set_to_none=True)
        value_loss.backward()
        value_optim.step()
        if not v_before_step:
            adv, y = advantage_and_target(agent, batch, q_target, gamma)

        weights = awr_weights(adv, beta, weight_max)
        actor_loss = awr_actor_loss(agent.actor, obs, actions, weights, deterministic)
        actor_optim.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_optim.step()

        q = agent.critic(obs, actions)  # [2, B]
        loss_q = critic_loss(q, y)
        critic_optim.zero_grad(set_to_none=True)
        loss_q.backward()
        critic_optim.step()
        polyak(agent.critic_target, agent.critic, tau)
        return {"loss/value": value_loss.detach(), "loss/actor": actor_loss.detach(),
                "loss/critic": loss_q.detach(), "q/mean": q.detach().mean(), "v/mean": v.detach().mean(),
                "adv/mean": adv.mean(), "weights/mean": weights.mean(),
                "weights/clipped": (weights >= weight_max).float().mean()}

    return update, {"actor_optim": actor_optim, "critic_optim": critic_optim, "value_optim": value_optim,
                    "actor_schedule": schedule}


def switch_to_online(args: Args, optims: dict[str, Any]) -> None:
    """What changes when fine-tuning starts. --lr-schedule iql: the actor's rate goes back to --actor-lr and stays
    there ([IQL]'s fine-tuning config); corl: the cosine goes on (the online loop steps it). The optimiser states,
    dropout in the actor loss and the buffer, which already holds the dataset, carry over unchanged."""
    if args.lr_schedule == "iql":
        optims["actor_optim"].param_groups[0]["lr"].fill_(args.actor_lr)


def make_buffer(args: Args, data: dict[str, np.ndarray], device: torch.device) -> ReplayBuffer:
    """One buffer for both phases: the dataset, then the online transitions, sampled uniformly over all of it. It
    has room for every online step, so that no dataset row is ever overwritten."""
    n_data, obs_dim, act_dim = len(data["rewards"]), data["observations"].shape[1], data["actions"].shape[1]
    buffer = ReplayBuffer(n_data + args.online_steps, obs_dim, act_dim, device, args.seed)
    buffer.load_dataset(data)
    return buffer


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


# ---- training loops
def train_offline(args: Args, agent: Agent, buffer: ReplayBuffer, update: Callable, optims: dict[str, Any],
                  ctx: dict[str, Any], logger: Logger, start: int) -> None:
    run_dir, evaluate_now = ctx["run_dir"], ctx["evaluate"]
    logger.progress(args.offline_steps, start, "offline")
    for step in range(start + 1, args.offline_steps + 1):
        logger.accumulate(update(buffer.sample(args.batch_size)))
        optims["actor_schedule"].step()
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
    save_checkpoint(run_dir / "offline.pt", {"agent": state_of(vars(agent)), "optims": state_of(optims),
                                              "env_id": args.env_id, "dataset": ctx["dataset_info"]})


def train_online(args: Args, agent: Agent, buffer: ReplayBuffer, update: Callable, optims: dict[str, Any],
                 ctx: dict[str, Any], logger: Logger, resume: dict[str, Any] | None) -> None:
    env, run_dir, evaluate_now, reward_fn = ctx["env"], ctx["run_dir"], ctx["evaluate"], ctx["reward_fn"]
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
        if args.actor_type == "deterministic":  # CORL: Gaussian noise on the mean action
            noise = (torch.randn(env.action_space.shape) * args.expl_noise).clamp(-0.5, 0.5).numpy()
            action = np.clip(agent.actor.act(obs, deterministic=True) + noise, -1.0, 1.0)
        else:
            action = agent.actor.act(obs, deterministic=False)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, action, reward_fn(np.float64(reward)), next_obs, terminated, truncated)
        env_step += 1
        logger.accumulate(update(buffer.sample(args.batch_size)))
        if args.lr_schedule == "corl":
            optims["actor_schedule"].step()
        grad_step += 1
        if env_step % args.log_every == 0:
            logger.flush(env_step)
        obs = next_obs
        if terminated or truncated:
            if env_step >= next_checkpoint or env_step == args.online_steps:
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
    task = resolve_task(args.env_id, args.data, args.dataset)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    seed_everything(args.seed, args.deterministic)
    env = make_env(task)
    data, dataset_info = load_dataset(task, args.dataset)
    check_spaces(data, env, dataset_info["dataset"])
    eval_env = make_env(task, q_horizon(args.gamma) if args.q_diag_extend_steps is None else args.q_diag_extend_steps)

    data, reward_fn, scale = prepare_data(args, data)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    obs_moments = tuple(torch.as_tensor(x) for x in moments(data["observations"]))
    agent = make_agent(args, obs_dim, act_dim, obs_moments, device)
    n_data = len(data["rewards"])

    if resume_dir:
        run_dir, ckpt = resume_dir, load_checkpoint(resume_dir / "checkpoint.pt", device)
        set_rng_state(ckpt["rng"]) if "rng" in ckpt else None
    else:
        ckpt = None
        run_dir = new_run_dir(args.output_dir, ALGO, args.env_id, args.seed)
        write_json(run_dir / "config.json", {
            "algo": ALGO, "args": dataclasses.asdict(args), **dataset_info, "reward_scale": scale,
            "eval_env_id": task.eval_env_id, "max_episode_steps": task.max_episode_steps, "device": str(device),
            "device_name": device_name(device), "packages": package_versions(), "command": " ".join(sys.argv)})
    if ckpt is not None and ckpt["phase"] == "done":
        print(f"{run_dir} has already finished")
        return run_dir
    logger = Logger(run_dir, ckpt["n_eval_rows"] if ckpt else 0)
    horizon = q_horizon(args.gamma)
    ctx = {"run_dir": run_dir, "env": env, "reward_fn": reward_fn, "dataset_info": dataset_info,
           "evaluate": lambda: {**evaluate(eval_env, agent.actor,
                                           lambda s, a: q_estimate(agent, s, a),
                                           args.eval_episodes, 100_000 * (args.seed + 1), task.max_episode_steps,
                                           task.family, args.gamma, horizon, reward_fn),
                                "wall_time": time.time()}}
    compile_fn = torch.compile if args.compile else (lambda f: f)
    print(f"{ALGO} ({args.preset} preset) on {task.env_id}: {n_data} transitions from {dataset_info['dataset']}, "
          f"evaluated on {task.eval_env_id}, reward scale {scale:.4g}, device {device}; run directory {run_dir}")

    buffer = make_buffer(args, data, device)
    update, optims = make_update(agent, args)
    update = compile_fn(update)
    phase = ckpt["phase"] if ckpt else ("online" if args.offline_checkpoint else "offline")
    if ckpt:
        restore(vars(agent), ckpt["agent"])
        restore(optims, ckpt["optims"])
        buffer.load_state_dict(ckpt["buffer"])
    if phase == "offline":
        train_offline(args, agent, buffer, update, optims, ctx, logger, ckpt["grad_step"] if ckpt else 0)
        ckpt = None
    elif not ckpt:
        offline = load_checkpoint(Path(args.offline_checkpoint), device)
        restore(vars(agent), offline["agent"])
        # The actor keeps offline.pt's learning rate (--lr-schedule corl continues the cosine where pretraining left
        # it; switch_to_online resets it for iql); the critics take this run's flags.
        restore({k: optims[k] for k in ("actor_optim", "actor_schedule")}, offline["optims"])
        restore_optimizers({k: optims[k] for k in ("critic_optim", "value_optim")}, offline["optims"])

    if not ckpt:  # a resumed online run has its learning rate in the checkpoint
        switch_to_online(args, optims)
    ctx["offline_grad_steps"] = 0 if args.offline_checkpoint else args.offline_steps
    train_online(args, agent, buffer, update, optims, ctx, logger, ckpt)
    logger.close()
    return run_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except RunError as e:
        sys.exit(f"error: {e}")
