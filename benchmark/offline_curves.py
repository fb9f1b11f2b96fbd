"""Offline learning curves of every method on one dataset, next to the behaviour policy's score.

Runs `algorithms/<method>.py --online-steps 0` for each method and seed (one process at a time, single-threaded by
default, so it can run in the background of a 2-core machine), then writes a Markdown table and a PNG of normalised
score against gradient steps. Each method gets its own step budget (`BUDGETS`, or `--steps METHOD=N`): the methods
cost from a few ms (TD3+BC) to most of a second (EDAC at hopper's N = 50) per update on a CPU, so equal steps would
mean unequal hours. The report says what each run got, in steps and in wall time, and the behaviour policy's score is
the mean normalised return of the dataset's episodes.

    python benchmark/offline_curves.py --env-id hopper-medium --data rebuilt            # run what is missing, report
    python benchmark/offline_curves.py --report-only                                   # only rewrite the report
    python benchmark/offline_curves.py --methods iql_ft td3bc_ft --steps iql_ft=100000

A run that is already complete (its eval.jsonl reaches its offline budget) is skipped; one that was killed is
continued with the algorithm's own `--resume`. Runs live in `--runs-dir`, one directory per method and seed as the
algorithms name them.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("td3bc_ft", "iql_ft", "awac", "cql_ft", "cal_ql", "edac")
# Gradient-step budgets of 10-22 min each on hopper-medium, single-threaded, on the 2-core development CPU while other
# jobs shared it (measured: TD3+BC 22 min, IQL 11, AWAC 13, CQL 15, Cal-QL 16, EDAC 10; CQL and Cal-QL make about
# 3 updates/s, their 10 sampled actions x 3 action sets multiply the critic's batch by 30; EDAC at N = 50 about 1.3/s).
BUDGETS = {"td3bc_ft": 40_000, "iql_ft": 30_000, "awac": 30_000, "cql_ft": 2_500, "cal_ql": 2_500, "edac": 800}


@dataclass
class Args:
    env_id: str = "hopper-medium"  # task id, as the algorithms take it
    data: str = "rebuilt"  # data source passed to every algorithm (d4rl, minari, rebuilt)
    dataset: str | None = None  # a D4RL-layout HDF5 file or Minari id instead (passed on as --dataset)
    methods: tuple[str, ...] = METHODS  # algorithm files to run, without .py
    steps: tuple[str, ...] = ()  # budget overrides as METHOD=STEPS, e.g. iql_ft=100000
    seeds: tuple[int, ...] = (0,)  # one run per method and seed
    evals: int = 10  # evaluations per run, evenly spaced over its budget
    eval_episodes: int = 10  # episodes per evaluation
    threads: int = 1  # torch threads of each run
    runs_dir: str = "runs/offline_curves"  # where the runs' directories go (relative to the current directory)
    out: str = "results/offline_curves"  # report prefix: <out>_<env-id>.md and .png
    report_only: bool = False  # do not run anything, only rewrite the report from the runs there are
    extra: tuple[str, ...] = field(default_factory=tuple)  # further flags for every algorithm, e.g. --device cuda


def budgets(args: Args) -> dict[str, int]:
    out = {m: BUDGETS.get(m, 10_000) for m in args.methods}
    for item in args.steps:
        method, _, n = item.partition("=")
        if method not in out or not n.isdigit():
            raise SystemExit(f"--steps {item}: expected METHOD=STEPS with METHOD one of {', '.join(out)}")
        out[method] = int(n)
    for m in out:
        if not (ROOT / "algorithms" / f"{m}.py").is_file():
            raise SystemExit(f"--methods {m}: there is no algorithms/{m}.py")
    return out


def read_rows(run: Path) -> list[dict]:
    path = run / "eval.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_run(args: Args, method: str, seed: int, steps: int) -> Path | None:
    """The newest run of this method, task, seed and budget in runs_dir (other budgets are other experiments)."""
    found = []
    for d in Path(args.runs_dir).glob(f"{method}__{args.env_id}__{seed}__*"):
        try:
            config = json.loads((d / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a run killed before it wrote its config has nothing to resume
        a = config.get("args", {})
        if (a.get("offline_steps"), a.get("data"), a.get("dataset"), a.get("online_steps")) == (
                steps, args.data, args.dataset, 0):
            found.append(d)
    # a complete run first, then the latest started (the directory name ends with the start time)
    return max(found, key=lambda d: (complete(d, steps), d.name.split("__")[-1])) if found else None


def complete(run: Path, steps: int) -> bool:
    return any(r["phase"] == "offline" and r["grad_step"] >= steps for r in read_rows(run))


def run_all(args: Args, budget: dict[str, int]) -> None:
    for method, steps in budget.items():
        for seed in args.seeds:
            run = find_run(args, method, seed, steps)
            if run is not None and complete(run, steps):
                print(f"{method} seed {seed}: complete in {run}")
                continue
            every = max(1, math.ceil(steps / args.evals))
            if run is not None and (run / "checkpoint.pt").is_file():
                cmd = [sys.executable, f"algorithms/{method}.py", "--resume", str(run)]
            else:
                cmd = [sys.executable, f"algorithms/{method}.py", "--env-id", args.env_id, "--data", args.data,
                       "--seed", str(seed), "--offline-steps", str(steps), "--online-steps", "0",
                       "--offline-eval-every", str(every), "--checkpoint-every", str(every),
                       "--eval-episodes", str(args.eval_episodes), "--threads", str(args.threads),
                       "--output-dir", args.runs_dir, *(("--dataset", args.dataset) if args.dataset else ()),
                       *args.extra]
            print(f"{method} seed {seed}: {' '.join(cmd[1:])}", flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                raise SystemExit(f"{method} seed {seed} failed (its output is above); rerun to continue it")


def behaviour_score(args: Args) -> tuple[float, float, int]:
    """Mean and std of the normalised return of the dataset's episodes as so2.py's data block delimits them (ended by
    `terminated` or `truncated`; a D4RL-layout file's cut-off last episode counts too, as its loader truncates it)."""
    if "algo_so2" not in sys.modules:  # the name the tests import it under, so it is loaded once
        spec = importlib.util.spec_from_file_location("algo_so2", ROOT / "algorithms" / "so2.py")
        sys.modules["algo_so2"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["algo_so2"])
    so2 = sys.modules["algo_so2"]
    try:
        task = so2.resolve_task(args.env_id, args.data, args.dataset)
        data, _ = so2.load_dataset(task, args.dataset)
    except so2.RunError as e:  # the data block's own message says what to do
        raise SystemExit(str(e)) from None
    ends = np.flatnonzero((data["terminated"] + data["truncated"]).reshape(-1) > 0)
    returns = [seg.sum() for seg in np.split(data["rewards"].reshape(-1), ends + 1)[: len(ends)]]
    scores = np.asarray(so2.normalized_score(task.family, np.asarray(returns)))
    return float(scores.mean()), float(scores.std()), len(scores)


READING = "## Reading"  # a hand-written section that starts with this heading is kept when the report is rewritten


def report(args: Args, budget: dict[str, int]) -> None:
    runs = {(m, s): find_run(args, m, s, n) for m, n in budget.items() for s in args.seeds}
    if not any(runs.values()):  # rather than overwrite a report with a table of "not run"
        raise SystemExit(f"no runs of {', '.join(budget)} on {args.env_id} in {args.runs_dir} (with these budgets); "
                         f"pass the --runs-dir (and --steps) they were made with")
    mean, std, n_eps = behaviour_score(args)
    curves, lines = {}, []
    for (method, seed), run in runs.items():
        if run is None:
            lines.append(f"| {method} | {seed} | {budget[method]:,} | not run | | | | | |")
            continue
        rows = [r for r in read_rows(run) if r["phase"] == "offline"]
        config = json.loads((run / "config.json").read_text())
        start = int(run.name.split("__")[-1].split("-")[0])  # the run directory carries its start time
        wall = (rows[-1]["wall_time"] - start) / 60 if rows else float("nan")
        done = f"{rows[-1]['grad_step']:,}" if rows else "0"
        curves[(method, seed)] = [(r["grad_step"], r["normalized_score"]) for r in rows]
        keep = ROOT / f"{args.out}_{args.env_id}" / run.name  # the logs the table comes from, next to it
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "eval.jsonl"):
            shutil.copy2(run / name, keep / name)
        series = ", ".join(f"{r['normalized_score']:.1f}" for r in rows)
        final = f"{rows[-1]['normalized_score']:.1f}" if rows else ""
        gap = f"{rows[-1]['normalized_score'] - mean:+.1f}" if rows else ""
        best = f"{max(r['normalized_score'] for r in rows):.1f}" if rows else ""
        lines.append(f"| {method} | {seed} | {done} / {budget[method]:,} | {wall:.0f} min | {final} | {gap} | {best} | "
                     f"{series} | `{run.name}`, {config.get('device_name', '')} |")
    out = ROOT / f"{args.out}_{args.env_id}"
    plot(curves, mean, out.with_suffix(".png"), args.env_id)
    text = [
        f"# Offline learning curves on {args.env_id} ("
        + (f"`--dataset {args.dataset}`)" if args.dataset else f"`--data {args.data}`)"), "",
        f"Written by `python benchmark/offline_curves.py {' '.join(sys.argv[1:])}` on "
        f"{datetime.date.today().isoformat()}. Each run is `algorithms/<method>.py --online-steps 0` with its own "
        f"defaults for this dataset, {args.eval_episodes} deterministic evaluation episodes every budget / "
        f"{args.evals} gradient steps, {args.threads} torch thread(s). Wall time runs from the run's start (data "
        f"loading included) to its last evaluation (a resumed run's includes the time it was stopped). Each run's "
        f"`config.json` and `eval.jsonl` are copied to `{out.name}/<run>/`.", "",
        f"Behaviour policy (the dataset's {n_eps:,} episodes): normalised score {mean:.1f} +- {std:.1f}.", "",
        f"![curves]({out.with_suffix('.png').name})", "",
        "| method | seed | gradient steps (done / budget) | wall time | final score | final - behaviour | best score | "
        "score at each evaluation | run, device |", "|---|---|---|---|---|---|---|---|---|", *lines, ""]
    md = out.with_suffix(".md")
    old = md.read_text() if md.is_file() else ""
    if READING in old:  # what a person wrote about the numbers survives a rewrite of the numbers
        text.append(old[old.index(READING):].rstrip("\n") + "\n")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(text))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png').name}")


def plot(curves: dict, behaviour: float, path: Path, env_id: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (method, seed), pts in sorted(curves.items()):
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=f"{method} (seed {seed})")
    ax.axhline(behaviour, color="k", linestyle="--", linewidth=1, label="behaviour policy")
    ax.set_xscale("log")  # budgets span 800 (EDAC) to 40k steps
    ax.set_xlabel("offline gradient steps")
    ax.set_ylabel("normalised score")
    ax.set_title(f"{env_id}: offline training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: Args) -> None:
    budget = budgets(args)
    # paths are relative to where the command runs (a dataset id is not a path), the algorithms run from the root
    args.runs_dir, args.out = str(Path(args.runs_dir).resolve()), str(Path(args.out).resolve())
    if args.dataset and Path(args.dataset).exists():
        args.dataset = str(Path(args.dataset).resolve())
    os.chdir(ROOT)
    if not args.report_only:
        run_all(args, budget)
    report(args, budget)


if __name__ == "__main__":
    main(tyro.cli(Args))
