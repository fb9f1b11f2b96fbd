"""Off2On: offline-to-online RL with balanced replay and a pessimistic Q-ensemble.

Lee, Seo, Lee, Abbeel, Shin. "Offline-to-Online Reinforcement Learning via Balanced Replay and Pessimistic
Q-Ensemble", CoRL 2021 (arXiv 2107.00591). Code followed: shlee94/Off2OnRL @ 6f298fa ([O2O]: rlkit/examples/ours.py,
rlkit/rlkit/torch/sac/ours.py, rlkit/rlkit/core/batch_rl_algorithm.py, .../prioritized_replay_buffer.py); the offline
CQL recipe from tinkoff-ai/CORL algorithms/offline/cql.py ([CORL-CQL]), since [O2O] ships only CQL checkpoints.

E = 5 CQL agents are pretrained independently. Online they become one SAC agent: the 5 actors act as one Gaussian
fused by moment matching, the policy maximises the ensemble mean of each member's min(Q1, Q2), and the critics are
fine-tuned with plain SAC losses (no CQL term) on batches from a balanced replay: one sum-tree over the dataset and the
online data, priorities w(s, a)^(1/T) from a density-ratio network w ~ d_online / d_offline trained with a
Jensen-Shannon f-divergence bound, so online and near-on-policy offline transitions are replayed more.

The offline ensemble is one vectorised agent whose members are independent: member i has its own twin critics
(members 2i and 2i + 1 of one VectorizedCritic of 2E), its own actor weights (one vectorised actor of E), its own log
alpha and its own uniform minibatch (batches are shaped [E, B, ...]). Each member's losses are its single-agent CQL
losses, and the members' losses are summed, so each parameter's gradient is its own member's gradient, and one Adam over
the stacked parameters takes exactly the steps of E separate Adams (Adam acts elementwise). No gradient clipping or
normalisation couples them. Members differ by their initial weights and minibatches (not by seeds i * 4 + seed).

Differences from the authors' code, and which one the default follows:
- Data: D4RL v2 files (MuJoCo) or Minari (Adroit) per o2o-rl's protocol; [O2O] uses D4RL v0.
- Offline phase: not in [O2O] (it loads 5 CQL checkpoints per task); ours is off2on.md section 5: CQL(H) per member
  as [CORL-CQL]'s MuJoCo configs (alpha_cql 10, 10 actions per sampler, importance-sampled logsumexp over uniform,
  pi(s) and pi(s') actions scored at s, no Lagrange, actor and temperature lr 3e-5, critic lr 3e-4, log alpha from 0,
  no entropy in the target, 1M updates), but with [O2O]'s checkpoint architecture: 2 x hidden critics and rlkit
  tanh-Gaussian actors (a log-std head, clamp [-20, 2]), raw states and rewards, rlkit inits ([CORL-CQL]: 3 critic
  layers, standardised states, orthogonal init, its own actor).
- Init: every hidden weight U(+-1/sqrt(fan_in)), as [O2O]'s ParallelMlp critics; rlkit's nn.Linear layers (actors,
  weight net) draw U(+-1/sqrt(fan_out)) because fanin_init reads size[0] of an [out, in] weight: the same for
  hidden x hidden layers, a narrower first layer there.
- Time-outs: D4RL files lose their time-out steps and the step before one bootstraps from obs[i + 1], as [O2O]
  (qlearning_dataset semantics, the shared data block); Minari and rebuilt data keep a truncated step with its own
  next observation and bootstrap from it (our protocol), where [O2O] would have dropped it. Online, [O2O] runs the
  unwrapped env and cuts paths without a terminal flag, as our truncation does.
- Budget and evaluation per o2o-rl's protocol: 100k (MuJoCo) or 400k (Adroit) online env steps, 10 deterministic
  episodes every 1000 env steps (on epoch boundaries) with Q diagnostics; [O2O]: 251 epochs (about 251k steps), 5000
  evaluation steps per epoch without incomplete paths.
- Adroit: [O2O] has no Adroit config; ours (`DATASET_DEFAULTS`) is an untested extension: the 400k budget, an online
  buffer of 400k (no online transition is evicted, as [O2O]'s 251k steps nearly fit its 250k buffer on MuJoCo), and
  CORL's Adroit CQL weight 1 and actor lr 1e-4 for pretraining (as cql_ft.py).
- One backward over the summed losses of disjoint parameters and one Adam per group (Q1 and Q2 share one; [O2O]: a
  backward and an Adam each): the same steps, since [O2O] computes every loss before any step and Adam is elementwise.
  [O2O]'s actor loss keeps alpha attached, but that gradient is cleared before the temperature uses it: alpha is
  detached here.
- Prioritised sampling: a stratified draw that a rounding error sends into an empty subtree descends into the
  non-empty sibling; [O2O] redraws the whole batch if any leaf has priority 0. Sum-tree in float64 on the device.
- The weight-net loss is mean_offline - mean_online of the f-divergence terms ([O2O]: the mean of their difference,
  the same for equal batch sizes, as here).
- `--interleave` (not in [O2O]): updates after every env step instead of after each epoch's collection.
Like [O2O]: fresh Adam states and alpha = 1 online, target critics copied from the critics at the switch, online
episodes cut at epoch boundaries (rlkit's path collector starts new paths every epoch), no warm-up, priorities from
the weight net before its step, the online buffer a FIFO of 250k, the balanced buffer a ring of 2^ceil(log2(|D| +
250k)).

Data, evaluation and outputs follow o2o-rl's protocol (`--help`; README.md): D4RL v2 files evaluate on the
Gymnasium v4 environments, rebuilt and Minari data on v5, Adroit on `AdroitHand*-v1`.
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

ALGO = "off2on"


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
    """offline gradient steps / online env steps between checkpoints (online: at the next epoch end)"""
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
    # ---- Off2On online ([O2O] rlkit/examples/ours.py)
    ensemble_size: int = 5
    """E, CQL agents pretrained independently and fused online ([O2O] --ensemble_size; the paper's N = 5 on MuJoCo)"""
    batch_size: int = 256
    """each member's offline batch; the online prioritised RL batch ([O2O] batch_size)"""
    weight_net_batch_size: int = 256
    """the density-ratio network's offline and online batches ([O2O] --weight_net_batch_size)"""
    policy_lr: float = 3e-4
    """online actor and temperature learning rate ([O2O] --policy_lr, alpha_lr = policy_lr)"""
    qf_lr: float = 3e-4
    """critic learning rate, offline and online ([O2O] --lr; [CORL-CQL] qf_lr)"""
    weight_net_lr: float = 3e-4
    """density-ratio network learning rate ([O2O] --weight_net_lr)"""
    gamma: float = 0.99
    """discount ([O2O] trainer_kwargs; [CORL-CQL])"""
    tau: float = 5e-3
    """Polyak rate of the target critics, after every update ([O2O] soft_target_tau; [CORL-CQL])"""
    temperature: float = 5.0
    """T, priorities are w(s, a)^(1/T) over the offline batch's mean ([O2O] --temperature)"""
    init_online_fraction: float = 0.5
    """f, the running max priority starts at M f / ((1 - f) 1000) ([O2O] --init_online_fraction; README demo 0.75)"""
    online_buffer_size: int = 250_000
    """FIFO capacity of the online buffer ([O2O] --online_buffer_size)"""
    first_epoch_multiplier: int = 10
    """updates per env step in the first epoch ([O2O] --first_epoch_multiplier; its README demo 5)"""
    epoch_steps: int = 1_000
    """env steps collected, then as many updates made, per epoch ([O2O] num_expl_steps = num_trains_per_train_loop)"""
    interleave: bool = False
    """update after every env step instead of after each epoch's collection (ours; see the docstring)"""
    # ---- offline CQL per member (off2on.md section 5: [CORL-CQL] MuJoCo configs)
    cql_alpha: float = 10.0
    """alpha_cql, weight of each critic's conservative penalty offline ([CORL-CQL] cql_alpha)"""
    cql_n_actions: int = 10
    """K, actions per state from each of U(-1, 1), pi_i(.|s) and pi_i(.|s') for the penalty ([CORL-CQL])"""
    cql_policy_lr: float = 3e-5
    """offline actor and temperature learning rate ([CORL-CQL] policy_lr)"""


# Only what differs from Args; a task id wins over its family. [O2O] has no Adroit config: ours is untested.
ADROIT = dict(
    online_steps=400_000,  # protocol (SO2 "Evaluation on Adroit")
    online_buffer_size=400_000,  # ours: keep every online step, as [O2O]'s 251k steps nearly fit its 250k on MuJoCo
    cql_alpha=1.0,  # CORL configs/finetune/cql/{pen,door}/*_v1.yaml (as cql_ft.py)
    cql_policy_lr=1e-4,  # same CORL Adroit configs
)
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {"pen": ADROIT, "door": ADROIT}


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


# ---- balanced replay
class SumTree:
    """Priorities of `capacity` (a power of 2) leaves and the sum of every subtree, one float64 tensor per level
    (levels[0] the root, levels[-1] the leaves), on the run's device. Updates and draws handle a whole batch at once,
    one level at a time; nothing leaves the device. `max` is the running max priority, which never decreases."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        if capacity < 1 or capacity & (capacity - 1):
            raise RunError(f"a sum-tree needs a power-of-2 capacity, got {capacity}")
        depth = capacity.bit_length() - 1
        self.levels = [torch.zeros(2 ** d, dtype=torch.float64, device=device) for d in range(depth + 1)]
        self.max = torch.ones((), dtype=torch.float64, device=device)

    def update(self, idx: torch.Tensor, priority: torch.Tensor) -> None:
        """Set the leaves idx [n] to priority [n] and recompute their ancestors from their children (a repeated index
        must carry one value, as a batch's repeated transition does)."""
        priority = priority.to(torch.float64)
        self.levels[-1][idx] = priority
        for level, children in zip(reversed(self.levels[:-1]), reversed(self.levels[1:])):
            idx = idx // 2
            level[idx] = children[2 * idx] + children[2 * idx + 1]
        torch.maximum(self.max, priority.max(), out=self.max)

    def total(self) -> torch.Tensor:
        return self.levels[0][0]

    def find(self, u: torch.Tensor) -> torch.Tensor:
        """The leaf whose prefix-sum interval holds each u [n] in [0, total]. A subtree of sum 0 is never entered, so a
        rounding error cannot return an empty leaf ([O2O] redraws the batch instead)."""
        idx = torch.zeros(u.shape, dtype=torch.long, device=u.device)
        for children in self.levels[1:]:
            left, right = children[2 * idx], children[2 * idx + 1]
            go_right = ((u > left) & (right > 0)) | (left <= 0)
            u = torch.where(go_right, u - left, u)
            idx = 2 * idx + go_right.long()
        return idx

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n leaves drawn with probability priority / total, stratified: draw j is uniform in the j-th of n equal
        segments of [0, total] ([O2O] _get_samples_from_segments)."""
        device = self.levels[0].device
        u = torch.rand(n, dtype=torch.float64, device=device, generator=generator)
        return self.find((torch.arange(n, dtype=torch.float64, device=device) + u) * (self.total() / n))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"leaves": self.levels[-1].cpu(), "max": self.max.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.levels[-1].copy_(state["leaves"])
        for level, children in zip(reversed(self.levels[:-1]), reversed(self.levels[1:])):
            level.copy_(children.view(-1, 2).sum(dim=1))
        self.max.copy_(state["max"])


class BalancedReplay(ReplayBuffer):
    """[O2O]'s PriorityReplayBuffer: one ring buffer of the dataset (priority 1) and then the online transitions (the
    running max priority when written), sampled in proportion to priority through a sum-tree over its rows."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device, seed: int) -> None:
        super().__init__(capacity, obs_dim, act_dim, device, seed)
        self.tree = SumTree(capacity, device)

    def load_dataset(self, data: dict[str, np.ndarray]) -> None:
        super().load_dataset(data)
        self.tree.update(torch.arange(self.size, device=self.device), torch.ones(self.size, device=self.device))

    def add_rows(self, rows: list[tuple]) -> None:
        """Transitions (obs, action, reward, next_obs, terminated, truncated), written with the running max priority."""
        batch = {k: np.asarray(v, dtype=np.float32).reshape(len(rows), -1) for k, v in zip(TRANSITION_KEYS, zip(*rows))}
        idx = (self.ptr + torch.arange(len(rows), device=self.device)) % self.capacity
        self._write(self._rows(batch))
        self.n_added += len(rows)
        self.tree.update(idx, self.tree.max.expand(len(rows)))

    def sample_prioritized(self, batch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = self.tree.sample(batch_size, self.generator)
        rows = self.storage[idx]
        return {k: rows[:, s].squeeze(-1) if k in ("rewards", "terminated", "truncated") else rows[:, s]
                for k, s in self.slices.items()}, idx

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tree": self.tree.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tree.load_state_dict(state["tree"])


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
def tanh_gaussian(mu: torch.Tensor, std: torch.Tensor, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """a = tanh(mu + sigma eps) and its log-density (rlkit's TanhNormal, exact tanh correction); [..., A] -> [...]."""
    eps = torch.zeros_like(mu) if deterministic else torch.randn_like(mu)
    u = mu + std * eps
    log_prob = (-0.5 * eps.pow(2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), exact where tanh saturates
    log_prob = log_prob - (2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)
    return torch.tanh(u), log_prob


def moment_match(mu: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gaussian with the members' mixture mean and variance ([O2O] ParallelTanhGaussianPolicy): mu = mean_i mu_i,
    var = mean_i (mu_i^2 + sigma_i^2) - mu^2, sigma clamped to [e^-20, e^2]. mu, std [E, ..., A] -> [..., A]."""
    mean = mu.mean(dim=0)
    var = (mu.pow(2) + std.pow(2)).mean(dim=0) - mean.pow(2)
    # var >= e^-40 is sigma >= e^-20, but never takes the root of a rounding error below 0
    return mean, var.clamp(min=math.exp(-40.0)).sqrt().clamp(max=math.exp(2.0))


class EnsembleActor(nn.Module):
    """E rlkit TanhGaussianPolicy actors (hidden ReLU layers, a mean head and a log-std head, log_std clamped to
    [-20, 2]) as one vectorised module. Offline each member samples on its own; online they act as one Gaussian."""

    def __init__(self, obs_dim: int, act_dim: int, n: int, hidden: int = 256, n_layers: int = 2) -> None:
        super().__init__()
        dims = [obs_dim] + [hidden] * n_layers
        self.trunk = nn.ModuleList(VectorizedLinear(i, o, n) for i, o in zip(dims[:-1], dims[1:]))
        self.mu, self.log_std = VectorizedLinear(hidden, act_dim, n), VectorizedLinear(hidden, act_dim, n)
        self.n = n
        with torch.no_grad():  # rlkit: hidden biases 0, heads U(-1e-3, 1e-3) except the mean head's bias (0)
            for layer in self.trunk:
                layer.bias.zero_()
            self.mu.weight.uniform_(-1e-3, 1e-3)
            self.mu.bias.zero_()
            self.log_std.weight.uniform_(-1e-3, 1e-3)
            self.log_std.bias.uniform_(-1e-3, 1e-3)

    def gaussians(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and log_sigma [E, B, A] of every member, for obs [B, D] (shared) or [E, B, D] (one batch each)."""
        x = obs if obs.dim() == 3 else obs.unsqueeze(0).expand(self.n, -1, -1)
        for layer in self.trunk:
            x = torch.relu(layer(x))
        return self.mu(x), self.log_std(x).clamp(-20.0, 2.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's own sample and log-density (offline CQL): [E, B, A], [E, B]."""
        mu, log_std = self.gaussians(obs)
        return tanh_gaussian(mu, log_std.exp(), deterministic=False)

    def sample(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused policy's sample and log-density (online): obs [B, D] -> [B, A], [B]."""
        mu, log_std = self.gaussians(obs)
        return tanh_gaussian(*moment_match(mu, log_std.exp()), deterministic)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.mu.weight.device).unsqueeze(0)
        return self.sample(obs_t, deterministic)[0][0].cpu().numpy()


class DensityRatio(nn.Module):
    """w(s, a) = ReLU(f(s, a)) ~ d_online / d_offline: rlkit's ConcatMlp, hidden biases 0, output weights
    U(-3e-3, 3e-3) and output bias 1, so w starts near 1 ([O2O] ours.py)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, n_layers: int = 2) -> None:
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden] * n_layers
        self.net = nn.Sequential(*[m for i, o in zip(dims[:-1], dims[1:]) for m in (nn.Linear(i, o), nn.ReLU())],
                                 nn.Linear(hidden, 1))
        with torch.no_grad():
            for m in self.net[:-1]:
                if isinstance(m, nn.Linear):
                    m.bias.zero_()
            self.net[-1].weight.uniform_(-3e-3, 3e-3)
            self.net[-1].bias.fill_(1.0)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net(torch.cat([obs, action], dim=-1))).squeeze(-1)


@torch.no_grad()
def init_critic(critic: VectorizedCritic) -> None:
    """[O2O] ParallelMlp: hidden weights U(+-1/sqrt(fan_in)) (VectorizedLinear's draw), biases 0, output
    U(-3e-3, 3e-3)."""
    for layer in critic.layers:
        layer.bias.zero_()
    critic.layers[-1].weight.uniform_(-3e-3, 3e-3)


@dataclass
class Agent:
    actor: EnsembleActor
    critic: VectorizedCritic  # 2E members: member i's twins are 2i and 2i + 1
    critic_target: VectorizedCritic
    log_alpha: torch.Tensor  # [E] offline temperatures, one per CQL member
    online_log_alpha: torch.Tensor  # [] the fused policy's temperature; alpha starts at 1 ([O2O] init_alpha)
    weight_net: DensityRatio


OFFLINE_PARTS = ("actor", "critic", "critic_target", "log_alpha")  # what pretraining trains and offline.pt holds


def pairs(x: torch.Tensor) -> torch.Tensor:
    """Member tensors [E, ...] -> [2E, ...], member i's rows for critics 2i and 2i + 1."""
    return x.repeat_interleave(2, dim=0)


def twin_min(q: torch.Tensor) -> torch.Tensor:
    """min(Q1_i, Q2_i) of every member: [2E, ...] -> [E, ...]."""
    return q.unflatten(0, (-1, 2)).min(dim=1).values


def pessimistic_q(critic: VectorizedCritic, obs: torch.Tensor, action: torch.Tensor, detach: bool = False
                  ) -> torch.Tensor:
    """The ensemble mean of each member's twin minimum, the value the fused policy maximises: [B]."""
    return twin_min(critic(obs, action, detach)).mean(dim=0)


# ---- losses and updates
@torch.no_grad()
def polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def density_ratio_loss(w_off: torch.Tensor, w_on: torch.Tensor) -> torch.Tensor:
    """The Jensen-Shannon variational bound of [O2O] ours.py: mean_off[-log(2 / (w + 1))] - mean_on[log(2w / (w + 1))]
    (+1e-10 inside each log); pointwise its minimiser is w = d_online / d_offline."""
    return (-torch.log(2.0 / (w_off + 1.0) + 1e-10).mean()
            - torch.log(2.0 * w_on / (w_on + 1.0) + 1e-10).mean())


@torch.no_grad()
def rl_priorities(weight_net: DensityRatio, obs: torch.Tensor, actions: torch.Tensor, w_off: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """w^(1/T) of the RL batch over the offline batch's mean w^(1/T), clamped to [0.001, 1000] ([O2O]): [B]."""
    scale = w_off.pow(1.0 / temperature).mean() + 1e-10
    return (weight_net(obs, actions).pow(1.0 / temperature) / scale).clamp(1e-3, 1e3)


def member_q_of_samples(critic: VectorizedCritic, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Q of K actions per state, each member's critics on its own states: obs [E, B, D], actions [E, B, K, A] ->
    [2E, B, K]."""
    e, b, k, _ = actions.shape
    obs = obs.unsqueeze(2).expand(-1, -1, k, -1).reshape(e, b * k, -1)
    return critic(pairs(obs), pairs(actions.reshape(e, b * k, -1))).view(2 * e, b, k)


def ensemble_cql_penalty(q_data: torch.Tensor, q_rand: torch.Tensor, q_next: torch.Tensor, q_cur: torch.Tensor,
                         log_pi_next: torch.Tensor, log_pi_cur: torch.Tensor, act_dim: int) -> torch.Tensor:
    """CQL(H) with importance sampling per critic (cql_ft.py's `cql_penalty` at temperature 1 without clipping, with
    each critic's own log-densities): mean over states of logsumexp over the 3K entries Q(s, a_rand) - log U(a_rand)
    (U = 0.5^|A|), Q(s, a_next) - log pi(a_next|s'), Q(s, a_cur) - log pi(a_cur|s), minus Q(s, a_data).
    q_data [N, B]; q_*, log_pi_* [N, B, K] -> [N]."""
    x = torch.cat([q_rand - act_dim * math.log(0.5), q_next - log_pi_next, q_cur - log_pi_cur], dim=-1)
    return (torch.logsumexp(x, dim=-1) - q_data).mean(dim=1)


@torch.no_grad()
def penalty_actions(actor: EnsembleActor, obs: torch.Tensor, next_obs: torch.Tensor, k: int, act_dim: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each member's penalty actions [E, B, 3K, A] (K uniform, K from pi_i(.|s), K from pi_i(.|s')) and the
    log-densities [E, B, K] of the last two; detached, as [CORL-CQL]."""
    e, b, _ = obs.shape
    a_rand = torch.rand(e, b, k, act_dim, device=obs.device) * 2 - 1
    a_cur, log_pi_cur = actor(obs.unsqueeze(2).expand(-1, -1, k, -1).reshape(e, b * k, -1))
    a_next, log_pi_next = actor(next_obs.unsqueeze(2).expand(-1, -1, k, -1).reshape(e, b * k, -1))
    actions = torch.cat([a_rand, a_cur.view(e, b, k, -1), a_next.view(e, b, k, -1)], dim=2)
    return actions, log_pi_cur.view(e, b, k), log_pi_next.view(e, b, k)


@torch.no_grad()
def cql_target(agent: Agent, batch: dict[str, torch.Tensor], gamma: float) -> torch.Tensor:
    """y_i = r + gamma (1 - terminated) min(Q1'_i, Q2'_i)(s', a'), a' ~ pi_i(.|s'), on member i's own batch; no
    entropy term ([CORL-CQL] backup_entropy False): [E, B]."""
    next_obs = batch["next_observations"]
    next_action, _ = agent.actor(next_obs)
    q_next = twin_min(agent.critic_target(pairs(next_obs), pairs(next_action)))
    return batch["rewards"] + gamma * (1.0 - batch["terminated"]) * q_next


@torch.no_grad()
def online_target(agent: Agent, batch: dict[str, torch.Tensor], alpha: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_i = r + gamma (1 - terminated) [min(Q1'_i, Q2'_i)(s', a') - alpha log pi(a'|s')], one a' ~ pi(.|s') of the
    fused policy shared by all members ([O2O]): [E, B]."""
    next_action, next_log_pi = agent.actor.sample(batch["next_observations"])
    q_next = twin_min(agent.critic_target(batch["next_observations"], next_action))
    return batch["rewards"] + gamma * (1.0 - batch["terminated"]) * (q_next - alpha * next_log_pi)


def make_update_fns(agent: Agent, args: Args, act_dim: int
                    ) -> tuple[Callable[..., dict[str, torch.Tensor]],
                               Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]],
                               dict[str, Any], dict[str, Any]]:
    """The offline update (E CQL agents, one batch each) and the online update (weight net + SAC on the pessimistic
    ensemble), each with its own optimisers: [O2O] starts fresh Adam states online. Each computes every loss from the
    parameters before the step, then steps every optimiser and Polyak-averages the target critics."""
    offline_optims = {"actor_optim": torch.optim.Adam(agent.actor.parameters(), lr=args.cql_policy_lr),
                      "critic_optim": torch.optim.Adam(agent.critic.parameters(), lr=args.qf_lr),
                      "alpha_optim": torch.optim.Adam([agent.log_alpha], lr=args.cql_policy_lr)}
    online_optims = {"actor_optim": torch.optim.Adam(agent.actor.parameters(), lr=args.policy_lr),
                     "critic_optim": torch.optim.Adam(agent.critic.parameters(), lr=args.qf_lr),
                     "alpha_optim": torch.optim.Adam([agent.online_log_alpha], lr=args.policy_lr),
                     "weight_optim": torch.optim.Adam(agent.weight_net.parameters(), lr=args.weight_net_lr)}
    gamma, tau, k, cql_alpha, temperature = args.gamma, args.tau, args.cql_n_actions, args.cql_alpha, args.temperature
    target_entropy = -float(act_dim)

    def step(optims: dict[str, Any], loss: torch.Tensor) -> None:
        # The losses touch disjoint parameters (actor losses see the critics detached, critic losses see detached
        # policy samples), so one backward gives each optimiser exactly its own loss's gradient.
        for optim in optims.values():
            optim.zero_grad(set_to_none=True)
        loss.backward()
        for optim in optims.values():
            optim.step()
        polyak(agent.critic_target, agent.critic, tau)

    def offline_update(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """E independent CQL updates; every batch tensor is [E, B, ...], member i's losses see only its own rows."""
        obs = batch["observations"]
        action, log_pi = agent.actor(obs)  # [E, B, A], [E, B]
        alpha_loss = -(agent.log_alpha.unsqueeze(1) * (log_pi.detach() + target_entropy)).mean(dim=1).sum()
        alpha = agent.log_alpha.detach().exp().unsqueeze(1)  # [E, 1]
        q_pi = twin_min(agent.critic(pairs(obs), pairs(action), detach=True))  # [E, B]
        actor_loss = (alpha * log_pi - q_pi).mean(dim=1).sum()

        y = cql_target(agent, batch, gamma)  # [E, B]
        q = agent.critic(pairs(obs), pairs(batch["actions"]))  # [2E, B]
        td_loss = (q - pairs(y)).pow(2).mean(dim=1).sum()
        ood_actions, log_pi_cur, log_pi_next = penalty_actions(agent.actor, obs, batch["next_observations"], k,
                                                               act_dim)
        q_rand, q_cur, q_next = member_q_of_samples(agent.critic, obs, ood_actions).split(k, dim=-1)
        diff = ensemble_cql_penalty(q, q_rand, q_next, q_cur, pairs(log_pi_next), pairs(log_pi_cur), act_dim)
        critic_loss = td_loss + cql_alpha * diff.sum()
        step(offline_optims, alpha_loss + actor_loss + critic_loss)
        return {"loss/critic": critic_loss.detach(), "loss/td": td_loss.detach(), "loss/cql_diff": diff.detach().mean(),
                "loss/actor": actor_loss.detach(), "loss/alpha": alpha_loss.detach(), "alpha": alpha.mean(),
                "entropy": -log_pi.detach().mean(), "q/mean": q.detach().mean()}

    def online_update(offline: dict[str, torch.Tensor], online: dict[str, torch.Tensor], rl: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The weight net on the uniform offline and online batches, SAC on the prioritised RL batch; returns the
        metrics and the RL batch's new priorities."""
        w_off = agent.weight_net(offline["observations"], offline["actions"])
        w_on = agent.weight_net(online["observations"], online["actions"])
        weight_loss = density_ratio_loss(w_off, w_on)

        obs = rl["observations"]
        action, log_pi = agent.actor.sample(obs)
        alpha_loss = -(agent.online_log_alpha * (log_pi.detach() + target_entropy)).mean()
        alpha = agent.online_log_alpha.detach().exp()
        actor_loss = (alpha * log_pi - pessimistic_q(agent.critic, obs, action, detach=True)).mean()
        y = online_target(agent, rl, alpha, gamma)  # [E, B]
        q = agent.critic(obs, rl["actions"])  # [2E, B]
        critic_loss = (q - pairs(y)).pow(2).mean(dim=1).sum()  # [O2O]: L_Q1 + L_Q2, each summed over members
        priority = rl_priorities(agent.weight_net, obs, rl["actions"], w_off.detach(), temperature)
        step(online_optims, weight_loss + alpha_loss + actor_loss + critic_loss)
        return {"loss/critic": critic_loss.detach(), "loss/actor": actor_loss.detach(),
                "loss/alpha": alpha_loss.detach(), "loss/weight": weight_loss.detach(), "alpha": alpha,
                "entropy": -log_pi.detach().mean(), "q/mean": q.detach().mean(), "w/offline": w_off.detach().mean(),
                "w/online": w_on.detach().mean(), "priority/mean": priority.mean()}, priority

    return offline_update, online_update, offline_optims, online_optims


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
def member_batches(buffer: ReplayBuffer, n: int, batch_size: int) -> dict[str, torch.Tensor]:
    """n independent uniform minibatches, one per member: every tensor [n, B, ...]."""
    return {k: v.unflatten(0, (n, batch_size)) for k, v in buffer.sample(n * batch_size).items()}


def online_buffers(args: Args, data: dict[str, np.ndarray], obs_dim: int, act_dim: int, device: torch.device
                   ) -> dict[str, ReplayBuffer]:
    """[O2O]'s three buffers: the dataset (uniform, for the weight net), the online FIFO (uniform, for the weight net)
    and the balanced buffer over both (prioritised, for SAC), of capacity 2^ceil(log2(M + online buffer)). Its running
    max priority starts at M f / ((1 - f) 1000), so the first epoch's 1000 online rows carry about f of the mass."""
    m = len(data["rewards"])
    buffers = {"offline": ReplayBuffer(m, obs_dim, act_dim, device, args.seed + 2),
               "online": ReplayBuffer(args.online_buffer_size, obs_dim, act_dim, device, args.seed + 1),
               "balanced": BalancedReplay(2 ** math.ceil(math.log2(m + args.online_buffer_size)), obs_dim, act_dim,
                                          device, args.seed + 3)}
    buffers["offline"].load_dataset(data)
    buffers["balanced"].load_dataset(data)
    f = args.init_online_fraction
    buffers["balanced"].tree.max.fill_(m * f / ((1.0 - f) * 1000))
    return buffers


def train_offline(args: Args, agent: Agent, buffer: ReplayBuffer, update: Callable, optims: dict[str, Any],
                  ctx: dict[str, Any], logger: Logger, start: int) -> None:
    run_dir, evaluate_now = ctx["run_dir"], ctx["evaluate"]
    logger.progress(args.offline_steps, start, "offline")
    for step in range(start + 1, args.offline_steps + 1):
        logger.accumulate(update(member_batches(buffer, args.ensemble_size, args.batch_size)))
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
    # Only the pretrained parts: online, [O2O] starts fresh optimisers, temperature and weight net.
    save_checkpoint(run_dir / "offline.pt", {"agent": state_of({k: getattr(agent, k) for k in OFFLINE_PARTS}),
                                              "env_id": args.env_id, "dataset": ctx["dataset_info"]})


def train_online(args: Args, agent: Agent, buffers: dict[str, ReplayBuffer], update: Callable,
                 optims: dict[str, Any], ctx: dict[str, Any], logger: Logger, resume: dict[str, Any] | None
                 ) -> None:
    """[O2O]'s epochs: evaluate, collect --epoch-steps env steps with the stochastic fused policy from a fresh episode,
    then as many updates (x --first-epoch-multiplier in the first epoch); --interleave updates after every step."""
    env, run_dir, evaluate_now = ctx["env"], ctx["run_dir"], ctx["evaluate"]
    env_step, grad_step = (resume["env_step"], resume["grad_step"]) if resume else (0, ctx["offline_grad_steps"])
    env.reset(seed=args.seed)
    if resume:  # checkpoints are taken at epoch ends, where episodes end, so the env only needs its generator back
        env.unwrapped.np_random.bit_generator.state = resume["env_rng"]
    next_checkpoint = (env_step // args.checkpoint_every + 1) * args.checkpoint_every
    logger.progress(args.online_steps, env_step, "online")

    def updates(n: int) -> None:
        nonlocal grad_step
        for _ in range(n):
            rl, idx = buffers["balanced"].sample_prioritized(args.batch_size)
            metrics, priority = update(buffers["offline"].sample(args.weight_net_batch_size),
                                       buffers["online"].sample(args.weight_net_batch_size), rl)
            buffers["balanced"].tree.update(idx, priority)
            logger.accumulate(metrics)
            grad_step += 1

    while env_step < args.online_steps:
        if env_step % args.eval_every == 0:
            logger.eval_row({"phase": "online", "env_step": env_step, "grad_step": grad_step, **evaluate_now()})
        n = min(args.epoch_steps, args.online_steps - env_step)
        per_step = args.first_epoch_multiplier if env_step < args.epoch_steps else 1
        obs, _ = env.reset()  # rlkit's path collector starts new paths every epoch
        staged = []
        for t in range(n):
            action = agent.actor.act(obs, deterministic=False)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            truncated = truncated or (t == n - 1 and not terminated)  # the epoch's end cuts the episode
            row = (obs, action, float(reward), next_obs, terminated, truncated)
            buffers["online"].add(*row)
            staged.append(row)
            env_step += 1
            if args.interleave:
                buffers["balanced"].add_rows(staged)
                staged = []
                updates(per_step)
            if (terminated or truncated) and t < n - 1:
                next_obs, _ = env.reset()
            obs = next_obs
            logger.bar.update(1)
        if not args.interleave:
            buffers["balanced"].add_rows(staged)
            updates(n * per_step)
        if env_step // args.log_every > (env_step - n) // args.log_every:
            logger.flush(env_step)
        if env_step >= next_checkpoint and env_step < args.online_steps:
            logger.flush(env_step)
            save_checkpoint(run_dir / "checkpoint.pt", {
                "phase": "online", "env_step": env_step, "grad_step": grad_step, "n_eval_rows": logger.n_eval_rows,
                "rng": rng_state(), "env_rng": env.unwrapped.np_random.bit_generator.state,
                "agent": state_of(vars(agent)), "optims": state_of(optims),
                "buffers": {k: b.state_dict() for k, b in buffers.items()}})
            next_checkpoint = (env_step // args.checkpoint_every + 1) * args.checkpoint_every
    logger.flush(env_step)
    logger.eval_row({"phase": "online", "env_step": env_step, "grad_step": grad_step, **evaluate_now()})
    save_checkpoint(run_dir / "checkpoint.pt", {
        "phase": "done", "env_step": env_step, "grad_step": grad_step, "n_eval_rows": logger.n_eval_rows,
        "agent": state_of(vars(agent)), "optims": state_of(optims)})


def main(args: Args) -> Path:
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir:
        args = resumed_args(Args, resume_dir)
    if args.ensemble_size < 1 or args.epoch_steps < 1 or args.first_epoch_multiplier < 1:
        raise RunError("--ensemble-size, --epoch-steps and --first-epoch-multiplier must be at least 1")
    if not 0.0 < args.init_online_fraction < 1.0:
        raise RunError("--init-online-fraction must lie strictly between 0 and 1")
    if args.temperature <= 0.0:
        raise RunError("--temperature must be positive")
    if args.eval_every % args.epoch_steps:
        raise RunError(f"--eval-every {args.eval_every} must be a multiple of --epoch-steps {args.epoch_steps}: "
                       f"evaluations fall on epoch boundaries")
    task = resolve_task(args.env_id, args.data, args.dataset)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    seed_everything(args.seed, args.deterministic)
    env = make_env(task)
    data, dataset_info = load_dataset(task, args.dataset)
    check_spaces(data, env, dataset_info["dataset"])
    eval_env = make_env(task, q_horizon(args.gamma) if args.q_diag_extend_steps is None else args.q_diag_extend_steps)

    obs_dim, act_dim, e = env.observation_space.shape[0], env.action_space.shape[0], args.ensemble_size
    critic = VectorizedCritic(obs_dim, act_dim, 2 * e, args.hidden_dim, n_layers=2, edac_init=False).to(device)
    init_critic(critic)
    target = VectorizedCritic(obs_dim, act_dim, 2 * e, args.hidden_dim, n_layers=2, edac_init=False).to(device)
    target.load_state_dict(critic.state_dict())
    agent = Agent(EnsembleActor(obs_dim, act_dim, e, args.hidden_dim).to(device), critic, target,
                  torch.zeros(e, device=device, requires_grad=True), torch.zeros((), device=device, requires_grad=True),
                  DensityRatio(obs_dim, act_dim, args.hidden_dim).to(device))
    offline_update, online_update, offline_optims, online_optims = make_update_fns(agent, args, act_dim)
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
    ctx = {"run_dir": run_dir, "env": env, "dataset_info": dataset_info,
           "evaluate": lambda: {**evaluate(eval_env, agent.actor, lambda s, a: pessimistic_q(agent.critic, s, a),
                                           args.eval_episodes, 100_000 * (args.seed + 1), task.max_episode_steps,
                                           task.family, args.gamma, horizon, lambda r: r),
                                "wall_time": time.time()}}
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
            restore(offline_optims, ckpt["optims"])
            buffer.load_state_dict(ckpt["buffer"])
            start = ckpt["grad_step"]
        train_offline(args, agent, buffer, compile_fn(offline_update), offline_optims, ctx, logger, start)
        ckpt = None
    elif args.offline_checkpoint and not ckpt:
        offline = load_checkpoint(Path(args.offline_checkpoint), device)
        try:
            restore({k: getattr(agent, k) for k in OFFLINE_PARTS}, offline["agent"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise RunError(f"{args.offline_checkpoint} does not fit these networks ({err}); pass the "
                           f"--ensemble-size and --hidden-dim it was trained with") from None

    ctx["offline_grad_steps"] = 0 if args.offline_checkpoint else args.offline_steps
    buffers = online_buffers(args, data, obs_dim, act_dim, device)
    if ckpt:
        restore(vars(agent), ckpt["agent"])
        restore(online_optims, ckpt["optims"])
        for k, b in buffers.items():
            b.load_state_dict(ckpt["buffers"][k])
    else:  # [O2O] starts the online targets as copies of the pretrained critics
        agent.critic_target.load_state_dict(agent.critic.state_dict())
    train_online(args, agent, buffers, compile_fn(online_update), online_optims, ctx, logger, ckpt)
    logger.close()
    return run_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except RunError as e:
        sys.exit(f"error: {e}")
