"""Rebuild the D4RL datasets on Gymnasium (`--data rebuilt`): Minari datasets `o2o-rl/{family}/{name}-v0`.

D4RL's recipe (Fu et al. 2020; code `scripts/generation/mujoco/collect_data.py`, `stitch_dataset.py` in
Farama-Foundation/D4RL), redone on the Gymnasium environments the algorithm files evaluate `rebuilt` data on
(`{HalfCheetah,Hopper,Walker2d}-v5`, `AdroitHand{Door,Pen}-v1`); see ../shared/design/datasets.md, sections 3-4.

| dataset | what | size (full) |
|---|---|---|
| `{family}/random-v0` | uniform random actions (`action_space.sample()`, as D4RL's code) | 1,000,000 steps |
| `{family}/medium-v0` | the medium SAC policy (see below), sampled stochastically | 1,000,000 steps |
| `{family}/medium-replay-v0` | every transition the SAC run collected until that policy's snapshot, in order, including the uniform-random warm-up | the snapshot's env step |
| `{family}/expert-v0` | the TQC expert actor (`<data-dir>/mujoco/tqc_{family}_expert_actor.npz`), tanh(mean + std * noise) | 1,000,000 steps |
| `{family}/medium-expert-v0` | medium-v0 cut after its last complete episode, then expert-v0, capped at 2,000,000 steps (`stitch_dataset.py`) | 2,000,000 steps |
| `door/human-v0` | the 25 DAPG human demonstrations (`<data-dir>/adroit/door_human_demos.npz`) replayed in AdroitHandDoor-v1 from their recorded initial states; replayed observations and rewards, recorded actions (as Minari made `D4RL/door/human-v2`) | 6,729 steps |
| `door/expert-v0`, `pen/expert-v0` | the DAPG expert policies (`<data-dir>/adroit/dapg_{door,pen}_expert_policy.npz`), mean + std * noise, clipped to [-1, 1]; 200 / 100-step episodes | 1,000,000 / 500,000 steps |

Not rebuilt: `pen/human` (no pen demonstrations here; use `--data minari`, i.e. Minari `D4RL/pen/human-v2`) and the
`cloned` datasets (out of scope).

Episodes: MuJoCo episodes end at termination or at the 1000-step limit (`truncations`); Adroit episodes at 100
(pen) / 200 (door) steps. The episode that the dataset's step budget cuts off is kept with neither flag set, as
D4RL kept it (its `terminals` and `timeouts` are both False there); medium-expert drops medium's one.

The medium policy. `algorithms/sac.py` trained on the v5 environment, e.g.

    python algorithms/sac.py --env-id hopper-medium --data rebuilt --save-policy-every 5000 --eval-every 5000 \\
        --save-buffer --threads 1 --output-dir runs

writes `eval.jsonl` (deterministic evaluations, 10 episodes), actor snapshots `policies/actor_XXXXXXXX.pt` and
`replay_buffer.npz` (every collected transition in order; written at checkpoints and at the end). The medium policy
is the first snapshot after step 0 whose evaluated normalised score reaches the level of the D4RL v2 medium dataset:
40 halfcheetah, 44 hopper, 62 walker2d (normalised x100 with D4RL's REF returns). Source: issue #4 and
../shared/design/datasets.md section 4, where these levels are marked unverified; D4RL's own wording is "about 1/3
of expert" (normalised about 33), and BC trained on the D4RL v2 medium data scores 40.8 / 36.9 / 66.4 (robomimic's
D4RL table, robomimic.github.io/docs/v0.2/datasets/d4rl.html), consistent with these levels. `--medium-score`
overrides the level. Note the level is checked on *deterministic* evaluation returns while the dataset is sampled
stochastically, so the data's own mean return is usually somewhat lower.
The chosen actor is written to `benchmark/policies/{family}_medium_actor.npz` (weights and where they came from), so
medium and medium-expert can be rebuilt without the run; medium-replay needs the run (`--sac-run DIR`) for its
buffer. Cost on a 2-core CPU, single-threaded: SAC runs at about 35-55 env steps/s; the runs behind the committed
policies reached medium at 55k env steps (halfcheetah), 105k (hopper) and 135k (walker2d): about 20 min, 45 min, 1 h,
fewer than the 100-200k / 300-500k that datasets.md section 4 expected (seed 0 only: another seed may take
longer). Building a 1M-step dataset took 10-25 min here (2-core CPU shared with a SAC run; simulation, one
small-MLP forward a step, and Minari's writing, which takes minutes for the 45k-episode random hopper and walker2d);
results/datasets.md lists each build's wall time.

Usage:

    python benchmark/make_datasets.py --env-id hopper-medium-replay --sac-run runs/sac__hopper-medium__0__...
    python benchmark/make_datasets.py --all --sac-run RUN_HALFCHEETAH RUN_HOPPER RUN_WALKER2D
    python benchmark/make_datasets.py --env-id door-human --steps 500     # a quick look
    python benchmark/make_datasets.py --report                            # only rewrite results/datasets.md
    python benchmark/make_datasets.py --check hopper-medium hopper-medium-replay   # built? if not, how

A dataset is built with whatever it needs first (medium-expert builds medium and expert). A dataset that is already
built with the same settings (steps, seed) is skipped; one built with other settings is an error unless `--force`
(a new medium policy is not a setting: rebuild medium* with `--force`).
Datasets are built in a hidden folder `<root>/.o2o-rl-building/` and renamed into place when complete (with a
`build.json` next to `data/` holding the settings, input checksums, statistics and wall time), so a killed build never
leaves a dataset that looks complete; leftovers of killed builds are removed on the next run.

Determinism: the same command gives the same `main_data.hdf5` bytes on the same machine. Seeds: the environment's
first reset and its action space take `--seed`, and the policy noise comes from torch's generator seeded with
`--seed` (one thread). h5py writes no timestamps (its `track_times` defaults to False for files, groups and datasets;
checked with h5py 3.16), Minari's metadata.json holds none either; the wall time goes to `build.json` only.
Storage note: Minari's HDF5 layout costs about 16 KB per episode, so the random hopper and walker2d datasets (tens of
thousands of short episodes) are several hundred MB and take a minute or more to load.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import tyro
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]


def _load_algo(name: str):
    """algorithms/<name>.py as module `algo_<name>` (the name the tests use, so it is imported once)."""
    mod_name = f"algo_{name}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, ROOT / "algorithms" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[mod_name]
            raise
    return sys.modules[mod_name]


sac = _load_algo("sac")  # shared blocks: tasks (ids, envs, REF returns), normalization, actor

NAMESPACE = "o2o-rl"
MUJOCO_NAMES = ("random", "medium", "medium-replay", "expert", "medium-expert")
BUILDABLE = tuple(f"{f}-{n}" for f in sac.MUJOCO_FAMILIES for n in MUJOCO_NAMES) + (
    "door-human", "door-expert", "pen-expert")
MEDIUM_LEVELS = {"halfcheetah": 40.0, "hopper": 44.0, "walker2d": 62.0}  # D4RL v2 medium data, normalised (see above)
FULL_STEPS = {"random": 1_000_000, "medium": 1_000_000, "expert": 1_000_000, "door-expert": 1_000_000,
              "pen-expert": 500_000}
BUILD_DIR = ".o2o-rl-building"
DEFAULT_DATA_DIR = os.environ.get("O2O_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

# D4RL v2 / Minari figures for the same names: (transitions, episodes, mean normalised score, source).
_DS = "datasets.md"
D4RL_FIGURES: dict[str, tuple[str, str, str, str]] = {
    **{f"{f}-random": ("about 1M", "", "", f"{_DS} s.2 (unverified)") for f in sac.MUJOCO_FAMILIES},
    **{f"{f}-expert": ("about 1M", e, "", f"{_DS} s.2, episodes from the HF decision_transformer_gym_replay viewer")
       for f, e in (("halfcheetah", "1,000"), ("hopper", "1,027 (1.03k)"), ("walker2d", "1,000"))},
    **{f"{f}-medium": ("about 1M", e, s, f"{_DS} s.2 (episodes); score: issue #4 / {_DS} s.4 (unverified)")
       for f, e, s in (("halfcheetah", "1,000", "about 40"), ("hopper", "2,186 (2.19k)", "about 44"),
                       ("walker2d", "1,191 (1.19k)", "about 62"))},
    **{f"{f}-medium-replay": (n, e, "", f"{_DS} s.2 (sizes unverified; episodes from the HF viewer)")
       for f, n, e in (("halfcheetah", "about 202k", "202"), ("hopper", "about 402k", "2,041 (2.04k)"),
                       ("walker2d", "about 302k", "1,093 (1.09k)"))},
    **{f"{f}-medium-expert": ("about 2M", "", "", f"{_DS} s.2-3 (stitch_dataset.py --maxlen 2000000)")
       for f in sac.MUJOCO_FAMILIES},
    "door-human": ("6,729", "25", "", f"Minari D4RL/door/human-v2 ({_DS} s.1.1)"),
    "door-expert": ("1,000,000", "5,000", "", f"Minari D4RL/door/expert-v2 ({_DS} s.1.1)"),
    "pen-expert": ("499,206", "4,958", "", f"Minari D4RL/pen/expert-v2 ({_DS} s.1.1)"),
}


class BuildError(Exception):
    """Bad input or a missing prerequisite: printed as `error: ...` without a traceback."""


@dataclass
class Args:
    env_id: str | None = None
    """dataset to build, e.g. hopper-medium-replay (and whatever it needs first); see --all"""
    all: bool = False
    """build every dataset that can be built (medium* only for families with a medium policy or --sac-run)"""
    steps: int | None = None
    """scale a dataset down to this many steps (medium-expert: twice this; medium-replay: at most this many)"""
    seed: int = 0
    """seed of the environment's first reset, its action space and the policy noise"""
    sac_run: tuple[str, ...] = ()
    """algorithms/sac.py run directories (one per family) for medium, medium-replay and medium-expert"""
    medium_score: float | None = None
    """normalised score (x100) the medium snapshot must reach (default 40 / 44 / 62); used when choosing a policy"""
    data_dir: str = DEFAULT_DATA_DIR
    """folder with mujoco/tqc_*_expert_actor.npz, adroit/door_human_demos.npz, adroit/dapg_*_expert_policy.npz"""
    policies_dir: str = "benchmark/policies"
    """where the chosen medium policies are written and read (relative to the repository root)"""
    report: bool = False
    """only rewrite the report from the built datasets (a report is also written after every build)"""
    report_path: str = "results/datasets.md"
    """the report (relative to the repository root); empty = none"""
    force: bool = False
    """rebuild the requested dataset even if it is already built (its prerequisites are kept)"""
    check: tuple[str, ...] = ()
    """build nothing: say which of these datasets are not ready (missing, scaled down with --steps, not made by this
    script, not rebuildable) and how to build each; exit status 1 if any (benchmark/run_all.py asks first)"""


# ---- paths, checksums, inputs

def minari_root() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path("~/.minari/datasets").expanduser())


def dataset_id(name: str) -> str:
    family, kind = name.split("-", 1)
    return f"{NAMESPACE}/{family}/{kind}-v0"


def repo_path(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else ROOT / path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_npz(path: Path, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise BuildError(f"missing input file {path} ({what}); set --data-dir (or $O2O_DATA_DIR) to the folder that "
                         f"holds it")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise BuildError(f"{path} ({what}) lacks the arrays {missing}; it has {sorted(f.files)}")
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise BuildError(f"{path} ({what}) is not a readable npz file ({e})") from None


def git_commit() -> str:
    """HEAD, marked when this script differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "benchmark/make_datasets.py"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        return (head.stdout.strip() or "unknown") + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_ARGV: list[str] = []  # the arguments cli() was given


def command_line() -> str:
    return shlex.join(["python", "benchmark/make_datasets.py", *_ARGV])


# ---- collection

Episode = dict[str, Any]  # observations (T+1), actions, rewards, terminations, truncations; seed, options


def new_episode(obs: np.ndarray, seed: int | None = None, options: dict | None = None) -> Episode:
    return {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": [],
            "seed": seed, "options": options}


def close_episode(ep: Episode) -> Episode:
    return {"observations": np.asarray(ep["observations"], dtype=np.float64),
            "actions": np.asarray(ep["actions"], dtype=np.float32),
            "rewards": np.asarray(ep["rewards"], dtype=np.float64),
            "terminations": np.asarray(ep["terminations"], dtype=bool),
            "truncations": np.asarray(ep["truncations"], dtype=bool),
            "seed": ep["seed"], "options": ep["options"]}


def complete(ep: Episode) -> bool:
    """Ended by a termination or a time limit (not cut off by the end of the data)."""
    return bool(ep["terminations"][-1] or ep["truncations"][-1])


def rollout(env, policy: Callable[[np.ndarray], np.ndarray], n_steps: int, seed: int, desc: str) -> list[Episode]:
    """`n_steps` steps of `policy` in `env` (whose TimeLimit sets the episode length); the last episode may be cut."""
    episodes = []
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    ep = new_episode(obs, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in tqdm(range(n_steps), desc=desc, unit="step", mininterval=2.0, dynamic_ncols=True):
            action = np.asarray(policy(obs), dtype=np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            ep["actions"].append(action)
            ep["rewards"].append(reward)
            ep["terminations"].append(terminated)
            ep["truncations"].append(truncated and not terminated)
            ep["observations"].append(obs)
            if terminated or truncated:
                episodes.append(close_episode(ep))
                obs, _ = env.reset()
                ep = new_episode(obs)
    if ep["actions"]:
        episodes.append(close_episode(ep))  # cut off by the step budget: neither flag set
    return episodes


# ---- policies (all sample from torch's global generator, seeded by rollout)

def tqc_policy(params: dict[str, np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """SB3 TQC actor: relu MLP, mean and clipped log_std heads, tanh(mean + std * noise) (data/README.md)."""
    p = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in params.items()}

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        h = torch.as_tensor(obs, dtype=torch.float32)
        h = torch.relu(p["latent_pi_0_weight"] @ h + p["latent_pi_0_bias"])
        h = torch.relu(p["latent_pi_2_weight"] @ h + p["latent_pi_2_bias"])
        mean = p["mu_weight"] @ h + p["mu_bias"]
        log_std = (p["log_std_weight"] @ h + p["log_std_bias"]).clamp(-20.0, 2.0)
        return torch.tanh(mean + log_std.exp() * torch.randn(mean.shape)).numpy()

    return act


def dapg_policy(params: dict[str, np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """DAPG Gaussian MLP (data/README.md): tanh layers on the shifted, scaled input; mean + std * noise, clipped."""
    p = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in params.items()}
    std = p["log_std"].exp()

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        h = (torch.as_tensor(obs, dtype=torch.float32) - p["in_shift"]) / (p["in_scale"] + 1e-8)
        h = torch.tanh(p["w0"] @ h + p["b0"])
        h = torch.tanh(p["w1"] @ h + p["b1"])
        mean = (p["w2"] @ h + p["b2"]) * p["out_scale"] + p["out_shift"]
        return (mean + std * torch.randn(mean.shape)).clamp(-1.0, 1.0).numpy()

    return act


def sac_policy(actor: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    return lambda obs: actor.act(obs, deterministic=False)


TQC_KEYS = ("latent_pi_0_weight", "latent_pi_0_bias", "latent_pi_2_weight", "latent_pi_2_bias", "mu_weight",
            "mu_bias", "log_std_weight", "log_std_bias")
DAPG_KEYS = ("in_shift", "in_scale", "out_shift", "out_scale", "log_std", "w0", "b0", "w1", "b1", "w2", "b2")
DEMO_KEYS = ("observations", "actions", "rewards", "episode_lengths", "init_qpos", "init_qvel", "init_door_body_pos")


# ---- the medium policy: chosen from a SAC run, kept in benchmark/policies/

def run_family(run_dir: Path) -> tuple[str, dict[str, Any]]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise BuildError(f"--sac-run {run_dir}: no config.json there; pass a run directory of algorithms/sac.py")
    config = json.loads(path.read_text())
    env_id = config.get("eval_env_id", "")
    family = next((f for f, g in sac.GYM_NAMES.items() if env_id.startswith(g + "-")), None)
    if config.get("algo") != "sac" or family not in sac.MUJOCO_FAMILIES:
        raise BuildError(f"--sac-run {run_dir}: not an algorithms/sac.py run on a MuJoCo task ({env_id or 'no env'})")
    if not env_id.endswith("-v5"):
        raise BuildError(f"--sac-run {run_dir} trained on {env_id}; rebuilt data are collected on v5: train with "
                         f"--data rebuilt (or --env-id {sac.GYM_NAMES[family]}-v5)")
    return family, config


def find_run(args: Args, family: str) -> Path | None:
    found = [Path(d).expanduser() for d in args.sac_run if run_family(Path(d).expanduser())[0] == family]
    if len(found) > 1:
        raise BuildError(f"several --sac-run directories train {family}: {', '.join(map(str, found))}; pass one")
    return found[0] if found else None


def choose_snapshot(run_dir: Path, level: float) -> dict[str, Any]:
    """The first saved snapshot after step 0 whose evaluated normalised score reaches `level`."""
    path = run_dir / "eval.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    snaps = sorted((r for r in rows if r.get("policy") and r["env_step"] > 0), key=lambda r: r["env_step"])
    if not snaps:
        raise BuildError(f"{run_dir} has no actor snapshots yet (eval.jsonl rows with 'policy'); train with "
                         f"--save-policy-every")
    for row in snaps:
        if row["normalized_score"] >= level:
            return row
    best = max(snaps, key=lambda r: r["normalized_score"])
    raise BuildError(f"no snapshot of {run_dir} reaches the medium level {level:g} yet (best "
                     f"{best['normalized_score']:.1f} at env step {best['env_step']}, last {snaps[-1]['env_step']}); "
                     f"let the run go on, or pass --medium-score")


def make_actor(obs_dim: int, act_dim: int, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    actor = sac.TanhGaussianActor(obs_dim, act_dim, n_layers=2, squash_log_std=True, edac_init=False)
    actor.load_state_dict(state)
    return actor.eval()


def medium_policy(args: Args, family: str) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """The medium actor and its record: from benchmark/policies/ if there, else chosen from --sac-run and saved."""
    path = repo_path(args.policies_dir) / f"{family}_medium_actor.npz"
    run_dir = find_run(args, family)
    if path.is_file():
        arrays = load_npz(path, ("meta",), f"the {family} medium policy")
        meta = json.loads(str(arrays.pop("meta")))
        if run_dir is not None and run_dir.resolve().name != meta["run"]:
            raise BuildError(f"{path} was chosen from the SAC run {meta['run']}, but --sac-run is {run_dir}: move "
                             f"that file away to choose the medium policy from {run_dir.name} (medium and "
                             f"medium-replay must come from one run)")
        state = {k.removeprefix("actor/"): torch.as_tensor(v) for k, v in arrays.items() if k.startswith("actor/")}
        return make_actor(meta["obs_dim"], meta["act_dim"], state), meta, path
    if run_dir is None:
        raise BuildError(f"{family} medium data need the medium policy: {path} does not exist and no --sac-run trains "
                         f"{family}. Train one (python algorithms/sac.py --env-id {family}-medium --data rebuilt "
                         f"--save-policy-every 5000 --eval-every 5000 --save-buffer) and pass --sac-run RUN_DIR")
    _, config = run_family(run_dir)
    level = MEDIUM_LEVELS[family] if args.medium_score is None else args.medium_score
    row = choose_snapshot(run_dir, level)
    snap_path = run_dir / row["policy"]
    if not snap_path.is_file():
        raise BuildError(f"missing input file {snap_path} (the snapshot eval.jsonl names at env step "
                         f"{row['env_step']})")
    snap = torch.load(snap_path, map_location="cpu", weights_only=True)
    state = snap["actor"]
    obs_dim, act_dim = state["trunk.0.weight"].shape[1], state["mu.weight"].shape[0]
    meta = {"family": family, "env_id": config["eval_env_id"], "run": run_dir.resolve().name,
            "run_command": config.get("command", ""), "snapshot": row["policy"], "snapshot_sha256": sha256(snap_path),
            "env_step": int(row["env_step"]), "eval_return_mean": row["return_mean"],
            "eval_return_std": row["return_std"], "eval_normalized_score": row["normalized_score"],
            "eval_episodes": config["args"].get("eval_episodes"), "level": level, "obs_dim": int(obs_dim),
            "act_dim": int(act_dim),
            "actor": "TanhGaussianActor(obs_dim, act_dim, hidden=256, n_layers=2, squash_log_std=True)"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta, sort_keys=True)),
             **{f"actor/{k}": v.cpu().numpy() for k, v in state.items()})
    os.replace(tmp, path)
    print(f"medium policy for {family}: {row['policy']} of {run_dir.name} (env step {row['env_step']}, evaluated "
          f"score {row['normalized_score']:.1f} >= {level:g}); saved to {path}")
    return make_actor(obs_dim, act_dim, state), meta, path


def buffer_episodes(run_dir: Path, n_rows: int) -> list[Episode]:
    """The first `n_rows` transitions of the run's replay_buffer.npz, split at terminated / truncated."""
    path = run_dir / "replay_buffer.npz"
    keys = ("observations", "actions", "rewards", "next_observations", "terminated", "truncated")
    buf = load_npz(path, keys, "the SAC run's replay buffer")
    if len(buf["rewards"]) < n_rows:
        raise BuildError(f"{path} holds {len(buf['rewards'])} transitions, fewer than the {n_rows} medium-replay "
                         f"needs (the buffer is written at checkpoints and at the end: wait for the next one)")
    b = {k: v[:n_rows].reshape(n_rows, -1) if k in keys[:2] + keys[3:4] else v[:n_rows].reshape(-1)
         for k, v in buf.items() if k in keys}
    ends = np.flatnonzero((b["terminated"] > 0.5) | (b["truncated"] > 0.5))
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends + 1, [n_rows]])
    episodes = []
    for s, e in zip(starts, stops):
        if e <= s:
            continue
        if not np.array_equal(b["next_observations"][s:e - 1], b["observations"][s + 1:e]):
            raise BuildError(f"{path}: rows {s}..{e - 1} are not one episode (an observation does not follow on); "
                             f"was the buffer's capacity exceeded?")
        episodes.append({
            "observations": np.concatenate([b["observations"][s:e], b["next_observations"][e - 1:e]]
                                           ).astype(np.float64),
            "actions": b["actions"][s:e].astype(np.float32),
            "rewards": b["rewards"][s:e].astype(np.float64),
            "terminations": b["terminated"][s:e] > 0.5,
            "truncations": b["truncated"][s:e] > 0.5,
            "seed": None, "options": None})
    return episodes


# ---- one dataset

def task_env(name: str):
    family = name.split("-", 1)[0]
    if family in sac.ADROIT_FAMILIES:
        with warnings.catch_warnings():  # gymnasium-robotics warns about Adroit reward changes on import
            warnings.simplefilter("ignore")
            import gymnasium_robotics  # noqa: F401
    return sac.make_env(sac.resolve_task(name, "rebuilt"))


def stats(episodes: list[Episode], family: str) -> dict[str, Any]:
    returns = np.array([ep["rewards"].sum() for ep in episodes if complete(ep)])
    mean = float(returns.mean()) if len(returns) else float("nan")
    return {"transitions": int(sum(len(ep["rewards"]) for ep in episodes)), "episodes": len(episodes),
            "complete_episodes": int(len(returns)), "return_mean": mean,
            "return_std": float(returns.std()) if len(returns) else float("nan"),
            "normalized_score": float(sac.normalized_score(family, mean))}


def collect(args: Args, name: str) -> tuple[list[Episode], dict[str, Any]]:
    """Episodes of one dataset, plus what made them: behaviour policy, input files, env specs."""
    family, kind = name.split("-", 1)
    data_dir = Path(args.data_dir).expanduser()
    steps = args.steps
    info: dict[str, Any] = {"inputs": {}}
    if kind in ("random", "expert", "medium"):
        n = steps or FULL_STEPS.get(name, FULL_STEPS.get(kind))
        if kind == "expert" and family in sac.ADROIT_FAMILIES:
            path = data_dir / "adroit" / f"dapg_{family}_expert_policy.npz"
            policy = dapg_policy(load_npz(path, DAPG_KEYS, f"the DAPG {family} expert policy"))
            info["policy"] = ("DAPG expert policy (aravindr93/hand_dapg, the behaviour policy of D4RL "
                              f"{family}-expert), mean + exp(log_std) * noise, clipped to [-1, 1]")
            info["inputs"][str(path)] = sha256(path)
        elif kind == "expert":
            path = data_dir / "mujoco" / f"tqc_{family}_expert_actor.npz"
            policy = tqc_policy(load_npz(path, TQC_KEYS, f"the TQC {family} expert actor"))
            info["policy"] = ("SB3 TQC expert actor (DLR-RM/rl-trained-agents, 1M steps on Gym v3), "
                              "stochastic: tanh(mean + std * noise)")
            info["inputs"][str(path)] = sha256(path)
        elif kind == "medium":
            actor, meta, path = medium_policy(args, family)
            policy = sac_policy(actor)
            info["policy"] = (f"SAC (algorithms/sac.py) snapshot at env step {meta['env_step']} of run {meta['run']}, "
                              f"deterministic evaluation score {meta['eval_normalized_score']:.1f} "
                              f"(level {meta['level']:g}), sampled stochastically")
            info["inputs"][str(path)] = sha256(path)
            info["medium_policy"] = meta
        env = task_env(name)
        if kind == "random":
            policy = lambda obs: env.action_space.sample()  # noqa: E731
            info["policy"] = "uniform random actions (env.action_space.sample(), as D4RL's collect_data.py --random)"
        episodes = rollout(env, policy, n, args.seed, name)
        info["env"], info["eval_env"] = env, env
    elif kind == "medium-replay":
        run_dir = find_run(args, family)
        if run_dir is None:
            raise BuildError(f"{name} needs the SAC run that made the {family} medium policy: pass --sac-run RUN_DIR "
                             f"(python algorithms/sac.py --env-id {family}-medium --data rebuilt --save-policy-every "
                             f"5000 --eval-every 5000 --save-buffer)")
        _, meta, path = medium_policy(args, family)
        n = meta["env_step"] if steps is None else min(steps, meta["env_step"])
        episodes = buffer_episodes(run_dir, n)
        info["policy"] = (f"SAC (algorithms/sac.py) replay buffer of run {meta['run']}: its first {n} transitions "
                          f"(the medium snapshot is at env step {meta['env_step']}), uniform-random warm-up included")
        info["inputs"][str(run_dir / "replay_buffer.npz")] = sha256(run_dir / "replay_buffer.npz")
        info["inputs"][str(path)] = sha256(path)
        info["medium_policy"] = meta
        env = task_env(name)
        info["env"], info["eval_env"] = env, env
    elif kind == "medium-expert":
        import minari

        parts = []
        for part in ("medium", "expert"):
            ds = minari.load_dataset(dataset_id(f"{family}-{part}"), download=False)
            eps = [{"observations": np.asarray(ep.observations, dtype=np.float64),
                    "actions": np.asarray(ep.actions, dtype=np.float32),
                    "rewards": np.asarray(ep.rewards, dtype=np.float64),
                    "terminations": np.asarray(ep.terminations, dtype=bool),
                    "truncations": np.asarray(ep.truncations, dtype=bool), "seed": None, "options": None}
                   for ep in tqdm(ds.iterate_episodes(), total=ds.total_episodes, desc=f"read {part}", unit="ep",
                                  mininterval=2.0)]
            parts.append(eps)
            path = Path(ds.spec.data_path) / "main_data.hdf5"
            info["inputs"][dataset_id(f"{family}-{part}")] = sha256(path)
        medium = parts[0][:-1] if parts[0] and not complete(parts[0][-1]) else parts[0]
        cap = 2 * (steps or FULL_STEPS["medium"])
        episodes, total = [], 0
        for ep in medium + parts[1]:
            if total >= cap:
                break
            t = len(ep["rewards"])
            if total + t > cap:  # cut by the cap: neither flag set
                k = cap - total
                ep = {**ep, "observations": ep["observations"][:k + 1], "actions": ep["actions"][:k],
                      "rewards": ep["rewards"][:k], "terminations": np.zeros(k, dtype=bool),
                      "truncations": np.zeros(k, dtype=bool)}
                t = k
            episodes.append(ep)
            total += t
        info["policy"] = (f"{dataset_id(family + '-medium')} cut after its last complete episode, then "
                          f"{dataset_id(family + '-expert')}, capped at {cap} steps (D4RL stitch_dataset.py)")
        env = task_env(name)
        info["env"], info["eval_env"] = env, env
    elif kind == "human":
        path = data_dir / "adroit" / "door_human_demos.npz"
        demos = load_npz(path, DEMO_KEYS, "the door human demonstrations")
        info["inputs"][str(path)] = sha256(path)
        episodes = replay_demos(demos, args.seed, steps)
        info["replay_check"] = replay_check(demos, episodes)
        info["policy"] = ("human demonstrations (DAPG project, door-v0_demos) replayed in AdroitHandDoor-v1 from their "
                          "recorded initial states: replayed observations and rewards, recorded actions")
        eval_env = task_env(name)
        info["env"] = replay_env(int(max(demos["episode_lengths"])))
        info["eval_env"] = eval_env
    else:
        raise BuildError(f"cannot build {name}")
    return episodes, info


def replay_env(longest: int):
    """AdroitHandDoor-v1 with room for the longest demonstration (Minari used 300 steps for door-human)."""
    task_env("door-human")  # registers the Adroit environments
    task = sac.Task("door-human", "door", "human", "rebuilt", "AdroitHandDoor-v1", max(300, longest))
    return sac.make_env(task)


def replay_demos(demos: dict[str, np.ndarray], seed: int, steps: int | None) -> list[Episode]:
    """Each demonstration's actions (as float32, as stored) applied from its recorded initial state."""
    lengths = demos["episode_lengths"].astype(int)
    env = replay_env(int(lengths.max()))
    budget = int(lengths.sum()) if steps is None else min(steps, int(lengths.sum()))
    episodes, start, done = [], 0, 0
    bar = tqdm(total=budget, desc="door-human replay", unit="step", mininterval=2.0)
    for i, length in enumerate(lengths):
        if done >= budget:
            break
        state = {"qpos": demos["init_qpos"][i].astype(np.float64), "qvel": demos["init_qvel"][i].astype(np.float64),
                 "door_body_pos": demos["init_door_body_pos"][i].astype(np.float64)}
        obs, _ = env.reset(seed=seed if i == 0 else None, options={"initial_state_dict": state})
        ep = new_episode(obs, seed if i == 0 else None, {"initial_state_dict": state})
        n = min(length, budget - done)
        for t in range(n):
            action = demos["actions"][start + t].astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            ep["actions"].append(action)
            ep["rewards"].append(reward)
            ep["observations"].append(obs)
            ep["terminations"].append(terminated)
            ep["truncations"].append(truncated or (t == length - 1 and not terminated))  # the demonstration ended
            if terminated or truncated:
                break
        episodes.append(close_episode(ep))
        done += len(ep["rewards"])
        bar.update(len(ep["rewards"]))
        start += length
    bar.close()
    return episodes


def replay_check(demos: dict[str, np.ndarray], episodes: list[Episode]) -> dict[str, float]:
    """How far the replay is from the recording: returns, and observations step by step (max over dimensions)."""
    starts = np.concatenate([[0], np.cumsum(demos["episode_lengths"])[:-1]]).astype(int)
    recorded, diffs = [], []
    for ep, s in zip(episodes, starts):
        t = len(ep["rewards"])
        recorded.append(demos["rewards"][s:s + t].sum())
        diffs.append(np.abs(ep["observations"][:-1] - demos["observations"][s:s + t]).max(axis=1))
    diffs = np.concatenate(diffs)
    return {"recorded_return_mean": float(np.mean(recorded)),
            "replayed_return_mean": float(np.mean([ep["rewards"].sum() for ep in episodes])),
            "obs_diff_median": float(np.median(diffs)), "obs_diff_max": float(diffs.max())}


def write_dataset(name: str, episodes: list[Episode], info: dict[str, Any], args: Args, build_root: Path
                  ) -> dict[str, Any]:
    """The Minari dataset under `build_root` (a stand-in Minari root); returns the record for its build.json."""
    import minari
    from minari.data_collector import EpisodeBuffer
    from minari.namespace import create_namespace, list_local_namespaces

    family = name.split("-", 1)[0]
    st = stats(episodes, family)
    lo, hi = sac.REF_RETURNS[family]
    description = "\n".join([
        f"o2o-rl rebuild of D4RL {name} on {info['env'].spec.id} (D4RL recipe; benchmark/make_datasets.py).",
        f"Behaviour policy: {info['policy']}.",
        f"Mean return over the {st['complete_episodes']} complete episodes: {st['return_mean']:.1f} +- "
        f"{st['return_std']:.1f}; D4RL normalised score {st['normalized_score']:.1f} (REF {lo} / {hi}).",
        f"Seed: {args.seed}. Steps: {st['transitions']} in {st['episodes']} episodes.",
        f"Command: {command_line()}",
        "Inputs (sha256): " + ", ".join(f"{k} {v}" for k, v in info["inputs"].items()) if info["inputs"] else
        "Inputs: none",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in sac.package_versions().items()),
    ])
    buffers = [EpisodeBuffer(observations=ep["observations"], actions=ep["actions"], rewards=ep["rewards"],
                             terminations=ep["terminations"], truncations=ep["truncations"], seed=ep["seed"],
                             options=ep["options"]) for ep in episodes]
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(build_root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if NAMESPACE not in list_local_namespaces():
                create_namespace(NAMESPACE, description="D4RL datasets rebuilt on Gymnasium by o2o-rl "
                                                               "(benchmark/make_datasets.py)")
            minari.create_dataset_from_buffers(
                dataset_id(name), buffers, env=info["env"], eval_env=info["eval_env"],
                algorithm_name=info["policy"], author="o2o-rl benchmark/make_datasets.py",
                code_permalink=f"o2o-rl@{git_commit()}:benchmark/make_datasets.py", ref_min_score=lo,
                ref_max_score=hi, description=description)
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
    ds_dir = build_root / dataset_id(name)
    record = {"dataset_id": dataset_id(name), "name": name, "settings": settings(args, name), **st,
              "policy": info["policy"], "inputs": info["inputs"], "medium_policy": info.get("medium_policy"),
              "replay_check": info.get("replay_check"),
              "env_id": info["env"].spec.id, "max_episode_steps": info["env"].spec.max_episode_steps,
              "eval_max_episode_steps": info["eval_env"].spec.max_episode_steps,
              "main_data_sha256": sha256(ds_dir / "data" / "main_data.hdf5"),
              "built_at": datetime.datetime.now().isoformat(timespec="seconds"), "command": command_line(),
              "machine": sac.device_name(torch.device("cpu")), "packages": sac.package_versions()}
    return record


def settings(args: Args, name: str) -> dict[str, Any]:
    """What makes a build different: a dataset built with other settings is not reused."""
    return {"steps": args.steps, "seed": args.seed}


def built_record(name: str) -> dict[str, Any] | None:
    path = minari_root() / dataset_id(name) / "build.json"
    return json.loads(path.read_text()) if path.is_file() else None


def clean_leftovers() -> None:
    """Remove the build folders of killed builds (named after their process id)."""
    base = minari_root() / BUILD_DIR
    if not base.is_dir():
        return
    for d in base.iterdir():
        pid = int(d.name.rsplit("-", 1)[-1]) if d.name.rsplit("-", 1)[-1].isdigit() else None
        alive = False
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


def build(args: Args, name: str, force: bool = False, built: set[str] | None = None) -> dict[str, Any]:
    """Build `name` (and its prerequisites) unless it is already built with the same settings."""
    built = set() if built is None else built
    root = minari_root()
    final = root / dataset_id(name)
    record = built_record(name)
    if final.exists() and not force:
        if record is None:
            raise BuildError(f"{final} exists but was not made by this script (no build.json); delete it or pass "
                             f"--force")
        if record["settings"] != settings(args, name):
            raise BuildError(f"{dataset_id(name)} is already built with other settings ({record['settings']}); pass "
                             f"--force to rebuild it with {settings(args, name)}")
        if name not in built:
            print(f"{dataset_id(name)}: already built ({record['transitions']} steps), skipped")
        built.add(name)
        return record
    family, kind = name.split("-", 1)
    if kind == "medium-expert":
        for part in ("medium", "expert"):
            build(args, f"{family}-{part}", built=built)
    print(f"building {dataset_id(name)}" + (f" ({args.steps} steps)" if args.steps else ""))
    t0 = time.perf_counter()
    episodes, info = collect(args, name)
    if not episodes:
        raise BuildError(f"{name}: no steps to write")
    build_root = root / BUILD_DIR / f"{name}-{os.getpid()}"
    print(f"writing {len(episodes)} episodes ({sum(len(ep['rewards']) for ep in episodes)} steps) with Minari",
          flush=True)
    shutil.rmtree(build_root, ignore_errors=True)
    try:
        record = write_dataset(name, episodes, info, args, build_root)
        record["wall_time_s"] = round(time.perf_counter() - t0, 1)
        (build_root / dataset_id(name) / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        for ns in (NAMESPACE, f"{NAMESPACE}/{family}"):  # namespace metadata Minari expects at each level
            src, dst = build_root / ns / "namespace_metadata.json", root / ns / "namespace_metadata.json"
            if src.is_file() and not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(build_root / dataset_id(name), final)
    finally:
        shutil.rmtree(build_root, ignore_errors=True)
        with contextlib.suppress(OSError):
            build_root.parent.rmdir()  # only when empty
    built.add(name)
    print(f"{dataset_id(name)}: {record['transitions']} steps, {record['episodes']} episodes, return "
          f"{record['return_mean']:.1f} +- {record['return_std']:.1f}, score {record['normalized_score']:.1f}, "
          f"{record['wall_time_s']:.0f} s")
    return record


# ---- report

def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def write_report(path: Path) -> None:
    """Rows of the datasets built here, plus the rows recorded earlier (in the .json beside the report) of datasets
    this Minari root lacks, so that a report written on a machine that holds only some datasets keeps the others;
    each row names the machine that built it."""
    saved_path = path.with_suffix(".json")
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    rows = [(name, built_record(name) or saved.get(name)) for name in BUILDABLE]
    rows = [(n, r) for n, r in rows if r is not None]
    lines = [
        "# Rebuilt datasets (`--data rebuilt`)",
        "",
        f"Generated by `python benchmark/make_datasets.py --report` from the datasets in the Minari root "
        f"(`$MINARI_DATASETS_PATH`, default `~/.minari/datasets`), namespace `{NAMESPACE}/`. Recipe and sources: the "
        f"docstring of `benchmark/make_datasets.py` and `../shared/design/datasets.md` sections 3-4.",
        "",
        "Returns are over the complete episodes (those that ended by termination or time limit; the episode cut off "
        "by the step budget is left out). Normalised score = 100 (return - REF_MIN) / (REF_MAX - REF_MIN) with "
        "D4RL's REF returns. Wall time: the whole build of that dataset (collection and writing), single-threaded, "
        "on the machine named in the last column, with other jobs sharing the CPU. A dataset rebuilt on another CPU "
        "can differ (a SAC run's trajectory, hence its medium snapshot, depends on floating-point details).",
        "",
        "| dataset | env | transitions | episodes | return (mean +- std) | norm. score | D4RL v2 / Minari: "
        "transitions | episodes | score | source of the D4RL figures | build wall time | steps setting | built on |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        d = D4RL_FIGURES.get(name, ("", "", "", ""))
        lines.append(
            f"| {dataset_id(name)} | {r['env_id']} | {r['transitions']:,} | {r['episodes']:,} | "
            f"{r['return_mean']:.1f} +- {r['return_std']:.1f} | {r['normalized_score']:.1f} | {d[0] or 'n/a'} | "
            f"{d[1] or 'n/a'} | {d[2] or 'n/a'} | {d[3] or ''} | {duration(r['wall_time_s'])} | "
            f"{r['settings']['steps'] or 'full'} | {r['machine']} |")
    if not rows:
        lines.append("| (none built yet) | | | | | | | | | | | | |")
    lines += ["", "Behaviour policies:", ""]
    lines += [f"- `{dataset_id(n)}`: {r['policy']}." for n, r in rows]
    missing = [n for n in BUILDABLE if n not in dict(rows)]
    lines += ["", ("Not built yet: " + ", ".join(f"`{n}`" for n in missing) + ". " if missing else
                   "Every dataset that can be rebuilt here is built. ")
              + "Not rebuilt at all: `pen-human` (no pen demonstrations here; Minari `D4RL/pen/human-v2`), the "
              "`cloned` datasets."]
    lines += ["", "Notes:", "",
              "- D4RL's figures come from the old mujoco-py v2 environments (Walker2d-v5 changes foot friction and "
              "the healthy reward; datasets.md s.5) and, for door, from gymnasium-robotics' earlier reward (a v1.2.1 "
              "change), so returns compare only roughly.",
              "- The D4RL medium levels (about 40 / 44 / 62) are the issue's figures, marked unverified in "
              "datasets.md; no per-dataset return table of the D4RL v2 files could be checked offline.",
              "- medium-replay sizes depend on when the SAC run reached the medium level, not on a fixed budget."]
    check = dict(rows).get("door-human", {}).get("replay_check")
    if check:
        lines.append(f"- door-human replay: the recorded rewards sum to {check['recorded_return_mean']:.1f} per "
                     f"episode on average, the replayed ones to {check['replayed_return_mean']:.1f}; replayed "
                     f"observations differ from the recorded ones by a median of {check['obs_diff_median']:.3f} "
                     f"(max {check['obs_diff_max']:.2f}; per step, largest dimension).")
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((saved_path, json.dumps(dict(rows), indent=1) + "\n"), (path, "\n".join(lines) + "\n")):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    print(f"report written to {path}")


# ---- main

def targets(args: Args) -> list[str]:
    if args.all:
        return list(BUILDABLE)
    name = args.env_id
    if name in BUILDABLE:
        return [name]
    if name == "pen-human":
        raise BuildError("pen-human cannot be rebuilt here (no pen demonstrations): use --data minari "
                         "(Minari D4RL/pen/human-v2)")
    if name in sac.TASK_IDS:
        raise BuildError(f"{name} is not rebuilt (the cloned datasets are out of scope): use --data minari")
    raise BuildError(f"unknown --env-id {name!r}; buildable: {', '.join(BUILDABLE)}")


def not_ready(args: Args, name: str) -> str | None:
    """None if `name` is built at full size in the Minari root, else what is wrong and the command that builds it."""
    try:
        targets(replace(args, env_id=name, all=False))
    except BuildError as e:
        return str(e)
    command = f"python benchmark/make_datasets.py --env-id {name}"
    record = built_record(name)
    if record is not None:
        steps = record.get("settings", {}).get("steps")
        return None if steps is None else f"{name} is a scaled-down build (--steps {steps}): {command} --force"
    final = minari_root() / dataset_id(name)
    if final.exists():
        return f"{final} was not made by this script (no build.json): move it away, then {command}"
    family, kind = name.split("-", 1)
    if kind != "medium-replay" or find_run(args, family) is not None:
        return f"{name} is not built: {command}"
    # medium-replay is the replay buffer of the very run the medium policy came from, which a clone does not hold
    policy = repo_path(args.policies_dir) / f"{family}_medium_actor.npz"
    run = json.loads(str(load_npz(policy, ("meta",), "the medium policy")["meta"]))["run"] if policy.is_file() else None
    return (f"{name} is not built. It is the replay buffer of the SAC run that made the {family} medium policy"
            + (f" ({run}, named in {policy})" if run else "") + f": {command} --sac-run RUN_DIR. Without that run, "
            f"train one (python algorithms/sac.py --env-id {family}-medium --data rebuilt --save-policy-every 5000 "
            f"--eval-every 5000 --save-buffer), move {policy} away, build {family}-medium again from it (--force "
            f"--sac-run RUN_DIR), then {name} (README.md, Data)")


def main(args: Args) -> None:
    torch.set_num_threads(1)
    if args.check:
        problems = [p for name in args.check if (p := not_ready(args, name))]
        print("\n".join(problems) if problems else f"ready in {minari_root()}: {', '.join(args.check)}")
        sys.exit(1 if problems else 0)
    if not (args.env_id or args.all or args.report):
        raise BuildError("say what to build: --env-id NAME, --all, or --report")
    if args.steps is not None and args.steps < 1:
        raise BuildError("--steps must be at least 1")
    for d in args.sac_run:
        run_family(Path(d).expanduser())  # fail early on a wrong directory
    names = targets(args) if (args.env_id or args.all) else []
    clean_leftovers()
    built: set[str] = set()
    skipped = []
    for name in names:
        family, kind = name.split("-", 1)
        if args.all and kind.startswith("medium"):
            has_policy = (repo_path(args.policies_dir) / f"{family}_medium_actor.npz").is_file()
            has_run = find_run(args, family) is not None
            if not has_run and (kind == "medium-replay" or not has_policy):
                skipped.append(name)
                continue
        build(args, name, force=args.force, built=built)
        if args.report_path:
            write_report(repo_path(args.report_path))
    if skipped:
        print("skipped (they need a SAC run, --sac-run): " + ", ".join(skipped))
    if args.report and args.report_path:
        write_report(repo_path(args.report_path))


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    _ARGV[:] = argv
    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    try:
        main(args)
    except (BuildError, sac.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
