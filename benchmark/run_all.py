"""Run the benchmark grid {algorithm} x {task} x {seed}, locally or on SLURM, resuming whatever was started before.

    benchmark/run_all.sh --preset smoke                        # seconds per run, on tiny rebuilt data (CI)
    benchmark/run_all.sh --preset cpu --jobs 2                 # reduced budgets for a 2-core CPU (rebuilt data)
    benchmark/run_all.sh --preset paper --slurm --jobs 32      # the protocol, as SLURM job arrays
    benchmark/run_all.sh --preset paper --algos so2 edac --tasks hopper-medium --seeds 0 1 --jobs 2

Jobs. Each offline-to-online method needs an offline pretraining; runs that can share one do: a `pretrain` job runs
the pretraining file with `--online-steps 0` and keeps its `offline.pt`, and every `finetune` job starts from it with
`--offline-checkpoint` (SO2 and EDAC fine-tune from one EDAC pretraining: so2.py's offline phase is EDAC with EDAC's
settings; EDAC's Adam states then start fresh, since so2.py's offline.pt holds none). SAC from scratch, the online
baseline, runs once per environment and seed (`online` jobs) and serves every task of that environment. Only the
algorithm files that exist take part.

Where things go: `<runs-dir>/<preset>/<kind>/<algo>/<task or env>/seed<k>/` holds the algorithm's own run directory
(`<algo>__<task>__<seed>__<time>/`, made by the file), `log.txt` (every attempt's output, appended) and `status.json`
(written by this runner when the file exits). A job whose status says `done` is skipped; any other job is started
again, with the file's own `--resume` when its run directory has a checkpoint, so a killed run continues where its
last checkpoint left it and a failed one is retried. `benchmark/report.py` reads only the run directories.

Data. `smoke` builds its tiny dataset in its own Minari root; `cpu` runs on datasets rebuilt on this machine by
benchmark/make_datasets.py, and the runner asks it first (`--check`): if one is missing, scaled down or cannot be
rebuilt, it stops before starting anything and prints what to build and how; `paper` leaves each file to download
its D4RL (MuJoCo) or Minari (Adroit) data.

Locally at most `--jobs` runs go at once, one torch thread each; a progress line says how many are done, running,
failed and pending, and about how long is left; a lock keeps a second runner off the same preset folder. `--slurm`
submits one `sbatch --array` each for pretraining, SAC and fine-tuning (`%` limits each to `--jobs` at once); the
fine-tuning array waits for the pretraining array to end (`--dependency=afterany`), and each of its tasks starts
only if its own pretraining finished, so one failed pretraining blocks only its own fine-tuning runs. Each array task
runs `run_all.py --run-one MANIFEST INDEX` (one manifest per submission), the same code the local runner uses, and
logs to `<runs-dir>/<preset>/slurm/<stage>-<array job>_<task>.log`; jobs still queued from an earlier submission
are not submitted again. `--wait` waits for the arrays and prints the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ROOT / "algorithms"  # --algorithms-dir: the tests point it at stand-ins
# Fine-tuning method -> the file whose offline phase it starts from.
PRETRAINED_BY = {"so2": "so2", "edac": "so2", "cql_ft": "cql_ft", "cal_ql": "cal_ql", "td3bc_ft": "td3bc_ft",
                 "awac": "awac", "iql_ft": "iql_ft", "off2on": "off2on", "aca": "aca"}
ONLINE_ONLY = ("sac",)


@dataclass(frozen=True)
class Preset:
    """Budgets of one grid. `flags` are passed to every run of a file, `common` to every run; what they reduce
    relative to the protocol is said in `reduces`, which the report states in its header."""
    name: str
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    data: str | None  # --data for every run; None leaves each task to its file's default (d4rl MuJoCo, minari Adroit)
    reduces: str
    common: tuple[str, ...] = ()
    flags: dict[str, tuple[str, ...]] = field(default_factory=dict)
    build_data: tuple[str, ...] = ()  # make_datasets.py flags for a private Minari root (smoke only)


_SMALL_EVAL = ("--eval-episodes", "1", "--q-diag-extend-steps", "5")
PRESETS = {
    "smoke": Preset(
        name="smoke", tasks=("hopper-random",), seeds=(0,), data="rebuilt",
        reduces="everything: a 2,000-step uniform-random hopper dataset built for the run, 20 offline gradient steps, "
                "200 online env steps, width-16 networks, N = 2 critics (Off2On: 2 agents, 100-step epochs), batches "
                "of 16, 1 evaluation episode",
        common=("--offline-steps", "20", "--online-steps", "200", "--offline-eval-every", "10", "--eval-every",
                "100", *_SMALL_EVAL, "--checkpoint-every", "50", "--log-every", "50", "--hidden-dim", "16"),
        flags={"so2": ("--n-critics", "2", "--batch-size", "16", "--online-batch-size", "32", "--warmup-steps", "50",
                       "--utd-ratio", "2"),
               "edac": ("--n-critics", "2", "--batch-size", "16"),
               "cql_ft": ("--batch-size", "16", "--cql-n-actions", "2"),
               "cal_ql": ("--batch-size", "16", "--cql-n-actions", "2"),
               "td3bc_ft": ("--batch-size", "16"),
               "awac": ("--batch-size", "16", "--offline-batch-size", "16", "--warmup-steps", "50"),
               "iql_ft": ("--batch-size", "16"),
               "off2on": ("--ensemble-size", "2", "--batch-size", "16", "--weight-net-batch-size", "16",
                          "--cql-n-actions", "2", "--epoch-steps", "100", "--first-epoch-multiplier", "2"),
               "aca": ("--batch-size", "16"),
               "sac": ("--batch-size", "16", "--learning-starts", "50")},
        build_data=("--steps", "2000")),
    # Budgets from per-step rates measured on 2026-12-03 (2-core Intel Xeon, 1 thread, a SAC run on the other core;
    # width 64, rebuilt hopper-medium, one short run per file):
    # offline steps/s so2 (EDAC, N 10) 34, cql_ft 20, cal_ql 12, td3bc_ft 167, iql_ft 102, awac 113; online env
    # steps/s so2 (UTD 10, batch 256) 6.8, edac 34, cql_ft 18, cal_ql 9, td3bc_ft 142, iql_ft 88, awac 65. That
    # puts the grid near 12 core-hours with evaluation and loading: a first calibration, to be measured whole.
    # off2on.py (5 CQL agents) measured 4.5-5 offline steps/s and aca.py 37-39 under a heavier load (2 grid runs and
    # tests beside it): five agents would cost about 5 core-hours on their own, so the grid pretrains 2.
    "cpu": Preset(
        name="cpu", tasks=("hopper-medium", "hopper-medium-replay", "halfcheetah-random"), seeds=(0, 1, 2),
        data="rebuilt",
        reduces="10,000 offline gradient steps (protocol: 1M-3M), 5,000 online env steps (100,000), width-64 networks "
                "(256), N = 10 critics for SO2 and EDAC (hopper: 50), SO2's online batch 256 (2,560) and warm-up 1,000 "
                "(5,000), SAC's learning start 1,000 (5,000), Off2On's ensemble of 2 CQL agents (5), 5 evaluation "
                "episodes (10) every 2,500 offline gradient steps (10,000) and every 1,000 online env steps; datasets "
                "rebuilt on this machine",
        common=("--offline-steps", "10000", "--online-steps", "5000", "--offline-eval-every", "2500", "--eval-every",
                "1000", "--eval-episodes", "5", "--checkpoint-every", "2500", "--log-every", "500", "--hidden-dim",
                "64"),
        flags={"so2": ("--n-critics", "10", "--online-batch-size", "256", "--warmup-steps", "1000"),
               "edac": ("--n-critics", "10"),
               "off2on": ("--ensemble-size", "2"),
               "sac": ("--learning-starts", "1000")}),
    "paper": Preset(
        name="paper", seeds=(0, 1, 2, 3), data=None,
        tasks=tuple(f"{f}-{d}" for f in ("halfcheetah", "hopper", "walker2d")
                    for d in ("random", "medium", "medium-replay", "medium-expert")) + ("pen-human", "door-human"),
        reduces="nothing: the protocol (the SO2 paper's budgets; each file's per-dataset defaults; D4RL v2 files "
                "for MuJoCo, Minari's D4RL sets for Adroit)"),
}


@dataclass
class Job:
    kind: str  # pretrain, finetune or online
    algo: str  # the algorithm file that runs, without .py
    task: str  # task id (online jobs: the first task of the environment)
    seed: int
    flags: list[str]  # every flag but --output-dir / --offline-checkpoint / --resume
    dir: str  # the job's folder, relative to the preset's folder
    needs: str | None = None  # the pretraining job's folder whose offline.pt a fine-tuning job starts from

    @property
    def label(self) -> str:
        return f"({self.algo}{' pretraining' if self.kind == 'pretrain' else ''}, {self.task}, seed {self.seed})"


def available_algos() -> list[str]:
    return [a for a in (*PRETRAINED_BY, *ONLINE_ONLY) if (ALGORITHMS / f"{a}.py").is_file()]


def make_jobs(preset: Preset, algos: list[str], tasks: tuple[str, ...], seeds: tuple[int, ...]) -> list[Job]:
    """Pretraining jobs first (one per file, task and seed that a chosen fine-tuning method needs), then
    fine-tuning, then SAC once per environment and seed."""
    jobs: list[Job] = []
    base = [*(("--data", preset.data) if preset.data else ()), "--threads", "1", *preset.common]
    finetuners = [a for a in algos if a in PRETRAINED_BY]
    for seed in seeds:
        for task in tasks:
            for pre in dict.fromkeys(PRETRAINED_BY[a] for a in finetuners):
                jobs.append(Job("pretrain", pre, task, seed, [*base, "--env-id", task, "--seed", str(seed),
                                *preset.flags.get(pre, ()), "--online-steps", "0"],
                                f"pretrain/{pre}/{task}/seed{seed}"))
            for algo in finetuners:
                jobs.append(Job("finetune", algo, task, seed, [*base, "--env-id", task, "--seed", str(seed),
                                *preset.flags.get(algo, ())], f"finetune/{algo}/{task}/seed{seed}",
                                needs=f"pretrain/{PRETRAINED_BY[algo]}/{task}/seed{seed}"))
        for algo in (a for a in algos if a in ONLINE_ONLY):
            for env, task in {t.split("-")[0]: t for t in reversed(tasks)}.items():
                flags = drop_flags(base, ("--offline-steps", "--offline-eval-every"))  # sac.py has no offline phase
                jobs.append(Job("online", algo, task, seed, [*flags, "--env-id", task, "--seed", str(seed),
                                *preset.flags.get(algo, ())], f"online/{algo}/{env}/seed{seed}"))
    return jobs


def drop_flags(flags: list[str], names: tuple[str, ...]) -> list[str]:
    """`flags` without the named flags and their values (for files that lack them)."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in names:
            skip = True
        else:
            out.append(f)
    return out


# ---- one job: status, resume, run
def status(job_dir: Path) -> dict:
    path = job_dir / "status.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def run_dirs(job_dir: Path) -> list[Path]:
    """The algorithm's run directories in a job folder, oldest first."""
    return sorted((p for p in job_dir.glob("*__*__*__*") if p.is_dir()), key=lambda p: p.name.rsplit("__", 1)[-1])


def resumable(job_dir: Path) -> Path | None:
    """The newest run directory with a checkpoint to continue from (a run killed before its first checkpoint has
    none and starts again in a new directory; the old one is left as it is)."""
    return next((p for p in reversed(run_dirs(job_dir)) if (p / "checkpoint.pt").is_file()), None)


def started_with_other_flags(job: Job, job_dir: Path) -> bool:
    """Whether the job's newest run directory was started with other flags than the preset gives now (the preset
    was edited since): such a run is skipped when done and continued with its own settings when resumed, so the
    runner says so instead of mixing settings silently. Paths (--output-dir, --offline-checkpoint) are not compared."""
    dirs = run_dirs(job_dir)
    try:
        tokens = json.loads((dirs[-1] / "config.json").read_text())["command"].split()[1:] if dirs else None
    except (OSError, KeyError, json.JSONDecodeError):
        return False
    if tokens is None:
        return False
    flags = [t for i, t in enumerate(tokens) if t not in ("--output-dir", "--offline-checkpoint")
             and (i == 0 or tokens[i - 1] not in ("--output-dir", "--offline-checkpoint"))]
    return flags != job.flags


def command(job: Job, job_dir: Path, preset_dir: Path) -> list[str]:
    script = [sys.executable, str(ALGORITHMS / f"{job.algo}.py")]
    previous = resumable(job_dir)
    if previous is not None:
        return [*script, "--resume", str(previous)]
    extra = []
    if job.needs:
        offline = [p / "offline.pt" for p in run_dirs(preset_dir / job.needs) if (p / "offline.pt").is_file()]
        if not offline:
            raise RuntimeError(f"{job.needs} has no offline.pt")
        extra = ["--offline-checkpoint", str(offline[-1])]
    return [*script, *job.flags, *extra, "--output-dir", str(job_dir)]


def start(job: Job, preset_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, object]:
    job_dir = preset_dir / job.dir
    job_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(job, job_dir, preset_dir)
    log = open(job_dir / "log.txt", "a")
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                            env={**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return proc, log


def finish(job: Job, preset_dir: Path, rc: int, seconds: float) -> None:
    job_dir = preset_dir / job.dir
    previous = status(job_dir)
    record = {"state": "done" if rc == 0 else "failed", "exit_code": rc, "label": job.label, "kind": job.kind,
              "algo": job.algo, "task": job.task, "seed": job.seed,
              "run_dir": str(run_dirs(job_dir)[-1].name) if run_dirs(job_dir) else None,
              "attempts": previous.get("attempts", 0) + 1,
              "wall_s": round(previous.get("wall_s", 0.0) + seconds, 1), "finished": time.time()}
    write_status(job_dir, record)


def write_status(job_dir: Path, record: dict) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / "status.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, job_dir / "status.json")


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    # a long line keeps both ends: the error usually opens it and the advice closes it
    return "\n".join("    " + (line if len(line) <= 600 else f"{line[:200]} [...] {line[-400:]}")
                     for line in lines[-n:])


def run_one(job: Job, preset_dir: Path) -> int:
    """Run one job in the foreground (a SLURM array task). The fine-tuning array starts once the whole pretraining
    array has ended (afterany), so a task whose own pretraining failed stops here, and only that task."""
    t0 = time.time()
    if job.needs and status(preset_dir / job.needs).get("state") != "done":
        print(f"[run_all] {job.label} not started: its pretraining {job.needs} did not finish", flush=True)
        finish(job, preset_dir, 1, 0.0)
        return 1
    proc, log = start(job, preset_dir, dict(os.environ))
    rc = proc.wait()
    log.close()
    finish(job, preset_dir, rc, time.time() - t0)
    return rc


# ---- many jobs, locally
def eta(seconds_done: list[float], left: int, jobs: int) -> str:
    if not seconds_done or not left:
        return "unknown" if left else "0 min"
    minutes = sum(seconds_done) / len(seconds_done) * left / max(jobs, 1) / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def run_local(jobs: list[Job], preset_dir: Path, n_parallel: int) -> list[Job]:
    """Run every job that is not done, at most `n_parallel` at once; returns the jobs that failed or could not
    start because their pretraining failed."""
    todo = [j for j in jobs if status(preset_dir / j.dir).get("state") != "done"]
    done_before = len(jobs) - len(todo)
    running: dict[str, tuple[Job, subprocess.Popen, object, float]] = {}
    failed, blocked, seconds = [], [], []
    env = dict(os.environ)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    last_line = ""

    def progress(force: bool = False) -> None:
        nonlocal last_line
        n_done = done_before + len(seconds)
        left = eta(seconds, len(todo) + len(running), n_parallel)
        line = (f"[run_all] {n_done}/{len(jobs)} done, {len(running)} running, {len(failed)} failed, "
                f"{len(blocked)} blocked, {len(todo)} pending; about {left} left")
        if force or line != last_line:
            print(line, flush=True)
            last_line = line

    try:
        last_print = time.time()
        while (todo or running) and stop["signal"] is None:
            for job in list(todo):
                if len(running) >= n_parallel:
                    break
                if job.needs and job.needs in {j.dir for j in failed + blocked}:
                    todo.remove(job)
                    blocked.append(job)
                    print(f"[run_all] {job.label} not started: its pretraining failed", flush=True)
                    continue
                if job.needs and status(preset_dir / job.needs).get("state") != "done":
                    continue
                todo.remove(job)
                try:
                    proc, log = start(job, preset_dir, env)
                except (OSError, RuntimeError) as e:
                    finish(job, preset_dir, 1, 0.0)
                    failed.append(job)
                    print(f"[run_all] {job.label} FAILED to start: {e}", flush=True)
                    continue
                running[job.dir] = (job, proc, log, time.time())
            for key, (job, proc, log, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[key]
                finish(job, preset_dir, rc, time.time() - t0)
                if rc == 0:
                    seconds.append(time.time() - t0)
                else:
                    failed.append(job)
                    print(f"[run_all] {job.label} FAILED (exit {rc}); last lines of {preset_dir / job.dir / 'log.txt'}:"
                          f"\n{tail(preset_dir / job.dir / 'log.txt')}", flush=True)
            if not running and todo and all(j.needs and status(preset_dir / j.needs).get("state") != "done"
                                            and j.needs not in {k.dir for k in failed + blocked} for j in todo):
                raise RuntimeError("jobs wait for pretraining that is not in this grid")
            progress(force=time.time() - last_print > 60)
            if time.time() - last_print > 60:
                last_print = time.time()
            time.sleep(0.2)
    finally:
        for job, proc, log, _ in running.values():  # killed runs continue from their checkpoints next time
            proc.terminate()
        for job, proc, log, _ in running.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    if stop["signal"] is not None:
        print(f"[run_all] stopped by signal {stop['signal']}; started runs resume from their checkpoints on the next "
              f"start", flush=True)
        raise SystemExit(128 + stop["signal"])
    progress()
    return failed + blocked


# ---- many jobs, on SLURM
def write_manifest(path: Path, jobs: list[Job], preset_dir: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"preset_dir": str(preset_dir), "jobs": [dataclasses.asdict(j) for j in jobs]},
                               indent=1) + "\n")


def submit(stage: str, jobs: list[Job], preset_dir: Path, n_parallel: int, after: str | None,
           sbatch_args: list[str]) -> str:
    """One array job for `jobs`; returns its SLURM job id."""
    slurm_dir = preset_dir / "slurm"
    # one manifest per submission: tasks still queued from an earlier one keep reading theirs
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"
    manifest = slurm_dir / f"{stage}-{stamp}.json"
    write_manifest(manifest, jobs, preset_dir)
    script = slurm_dir / f"{stage}-{stamp}.sbatch"
    script.write_text("\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=o2o-{preset_dir.name}-{stage}",
        f"#SBATCH --array=0-{len(jobs) - 1}%{n_parallel}",
        "#SBATCH --cpus-per-task=1",
        f"#SBATCH --output={slurm_dir}/{stage}-%A_%a.log",
        f"cd {shlex.quote(str(ROOT))}",
        f"exec {shlex.quote(sys.executable)} benchmark/run_all.py --algorithms-dir {shlex.quote(str(ALGORITHMS))} "
        f"--run-one {shlex.quote(str(manifest))} \"$SLURM_ARRAY_TASK_ID\"", ""]))
    cmd = ["sbatch", "--parsable", *(["--dependency", f"afterany:{after}"] if after else []), *sbatch_args,
           str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: {shlex.join(cmd)} failed: {out.stderr.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    for i, job in enumerate(jobs):
        write_status(preset_dir / job.dir, {**status(preset_dir / job.dir), "state": "queued",
                                            "slurm_job": f"{job_id}_{i}"})
    print(f"[run_all] submitted {len(jobs)} {stage} runs as SLURM array {job_id}"
          + (f" (after {after} ends)" if after else ""), flush=True)
    return job_id


def squeue(job_ids: list[str]) -> list[str] | None:
    """squeue's lines for these jobs; None when squeue itself failed (e.g. slurmctld briefly away)."""
    out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True, text=True)
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    return [ln for ln in out.stdout.splitlines() if ln.strip()]


def run_slurm(jobs: list[Job], preset_dir: Path, n_parallel: int, wait: bool, sbatch_args: list[str]) -> list[Job]:
    if shutil.which("sbatch") is None:
        raise SystemExit("error: --slurm needs sbatch on PATH (run on a SLURM login node, or drop --slurm)")
    todo = []
    for job in jobs:
        state = status(preset_dir / job.dir)
        if state.get("state") == "done":
            continue
        if state.get("state") == "queued" and squeue([state["slurm_job"]]):  # still queued or running
            print(f"[run_all] {job.label} is already {state['slurm_job']} on SLURM", flush=True)
            continue
        todo.append(job)
    pre, online = [j for j in todo if j.kind == "pretrain"], [j for j in todo if j.kind == "online"]
    fine = [j for j in todo if j.kind == "finetune"]
    ids = []
    pre_id = submit("pretrain", pre, preset_dir, n_parallel, None, sbatch_args) if pre else None
    ids += [pre_id] if pre_id else []
    if online:
        ids.append(submit("online", online, preset_dir, n_parallel, None, sbatch_args))
    if fine:
        ids.append(submit("finetune", fine, preset_dir, n_parallel, pre_id, sbatch_args))
    if not ids:
        print("[run_all] nothing to submit", flush=True)
    if not wait or not ids:
        return []
    failures = 0
    while True:
        lines = squeue(ids)
        if lines is None:
            failures += 1
            if failures > 30:
                raise SystemExit("error: squeue kept failing; the arrays were left as they are")
        elif not lines:
            break
        time.sleep(2)
    failed = [j for j in todo if status(preset_dir / j.dir).get("state") != "done"]
    for job in failed:
        print(f"[run_all] {job.label} did not finish; last lines of {preset_dir / job.dir / 'log.txt'}:\n"
              f"{tail(preset_dir / job.dir / 'log.txt')}", flush=True)
    return failed


# ---- the smoke preset's private data
def build_data(preset: Preset, preset_dir: Path, tasks: tuple[str, ...]) -> dict[str, str]:
    """The smoke preset builds tiny datasets in its own Minari root, so that it needs nothing but the checkout."""
    if not preset.build_data:
        return {}
    root = preset_dir / "minari"
    env = {**os.environ, "MINARI_DATASETS_PATH": str(root)}
    for task in tasks:
        cmd = [sys.executable, str(ROOT / "benchmark" / "make_datasets.py"), "--env-id", task, *preset.build_data,
               "--report-path", str(preset_dir / "datasets.md")]
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"error: could not build the {preset.name} preset's {task} data:\n{out.stdout[-2000:]}"
                             f"{out.stderr[-2000:]}")
    return {"MINARI_DATASETS_PATH": str(root)}


def data_problems(preset: Preset, tasks: tuple[str, ...]) -> str:
    """What keeps the preset's rebuilt datasets from being used, in make_datasets.py's words (missing, scaled down,
    not rebuildable, unknown task; each with the command that builds it); empty when all are ready or the preset
    reads D4RL / Minari data or builds its own."""
    if preset.data != "rebuilt" or preset.build_data:
        return ""
    out = subprocess.run([sys.executable, str(ROOT / "benchmark" / "make_datasets.py"), "--check", *tasks],
                         cwd=ROOT, capture_output=True, text=True)
    return "" if out.returncode == 0 else (out.stdout + out.stderr).strip()


def write_preset(preset_dir: Path, preset: Preset, algos: list[str], tasks: tuple[str, ...],
                 seeds: tuple[int, ...]) -> None:
    """preset.json, which the report reads: the union of every invocation's algorithms, tasks and seeds."""
    path = preset_dir / "preset.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    union = {k: list(dict.fromkeys([*old.get(k, []), *new])) for k, new in (("algos", algos), ("tasks", tasks),
                                                                            ("seeds", seeds))}
    path.write_text(json.dumps({**dataclasses.asdict(preset), **union}, indent=1) + "\n")


# ---- command line
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke", help="budgets of the grid")
    parser.add_argument("--algos", nargs="+", help="algorithm files (default: every one there is)")
    parser.add_argument("--tasks", nargs="+", help="task ids (default: the preset's)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the preset's)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)), help="runs at once")
    parser.add_argument("--runs-dir", default="runs/benchmark", help="where <preset>/ goes")
    parser.add_argument("--slurm", action="store_true", help="submit SLURM job arrays instead of running here")
    parser.add_argument("--wait", action="store_true", help="with --slurm: wait for the arrays and report failures")
    parser.add_argument("--sbatch-args", default="", help="extra sbatch flags, e.g. '--partition gpu --time 24:00:00'")
    parser.add_argument("--list", action="store_true", help="print the jobs and their state, run nothing")
    parser.add_argument("--algorithms-dir", default=str(ALGORITHMS), help="folder of the algorithm files")
    parser.add_argument("--run-one", nargs=2, metavar=("MANIFEST", "INDEX"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global ALGORITHMS
    args = parse(argv)
    ALGORITHMS = Path(args.algorithms_dir).resolve()
    if args.run_one:
        manifest = json.loads(Path(args.run_one[0]).read_text())
        job = Job(**manifest["jobs"][int(args.run_one[1])])
        return run_one(job, Path(manifest["preset_dir"]))
    preset = PRESETS[args.preset]
    if os.environ.get("MINARI_DATASETS_PATH"):  # the runs start in the repository root, not here
        os.environ["MINARI_DATASETS_PATH"] = str(Path(os.environ["MINARI_DATASETS_PATH"]).expanduser().resolve())
    known = available_algos()
    algos = args.algos or known
    unknown = [a for a in algos if a not in known]
    if unknown:
        raise SystemExit(f"error: no algorithm file for {unknown}; choose from {known}")
    tasks, seeds = tuple(args.tasks or preset.tasks), tuple(args.seeds if args.seeds is not None else preset.seeds)
    preset_dir = (Path(args.runs_dir) / preset.name).resolve()
    preset_dir.mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(preset, algos, tasks, seeds)
    if args.list:
        for job in jobs:
            print(f"{status(preset_dir / job.dir).get('state', 'pending'):8s} {job.dir}")
        return 0
    if args.jobs < 1:
        raise SystemExit("error: --jobs must be at least 1")
    if not args.slurm:
        lock = open(preset_dir / ".run_all.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: another benchmark/run_all.py is running the grid in {preset_dir}; wait for it "
                             f"or stop it (its runs resume on the next start)") from None
    os.environ.update(build_data(preset, preset_dir, tasks))
    problems = data_problems(preset, tasks)
    if problems:
        raise SystemExit(f"error: the {preset.name} preset runs on datasets rebuilt on this machine (README.md, "
                         f"Data), and they are not ready; nothing was started:\n{problems}")
    write_preset(preset_dir, preset, algos, tasks, seeds)
    print(f"[run_all] preset {preset.name}: {len(jobs)} runs ({', '.join(algos)} x {len(tasks)} tasks x {len(seeds)} "
          f"seeds) in {preset_dir}; reduced: {preset.reduces}", flush=True)
    stale = [job.dir for job in jobs if started_with_other_flags(job, preset_dir / job.dir)]
    if stale:
        print(f"[run_all] warning: {len(stale)} runs were started with other flags than the preset gives now; they "
              f"keep their own settings (done runs are skipped, killed ones resume as they were). Move their folders "
              f"away to rerun them: {', '.join(stale)}", flush=True)
    if args.slurm:
        failed = run_slurm(jobs, preset_dir, args.jobs, args.wait, shlex.split(args.sbatch_args))
    else:
        failed = run_local(jobs, preset_dir, args.jobs)
    if failed:
        print(f"[run_all] {len(failed)} runs did not finish: " + "; ".join(j.label for j in failed)
              + ". Start the same command again to retry them (finished runs are skipped).", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
