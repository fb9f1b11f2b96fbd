"""Tables, curves, rliable statistics and Q-value figures from the run directories of a benchmark grid.

    python benchmark/report.py --preset paper                # runs/benchmark/paper -> results/paper/
    python benchmark/report.py --runs-dir DIR --out results/mine --title "my sweep"

Reads only run directories (`config.json`, `eval.jsonl`: wherever they sit below `--runs-dir`) and the grid's
`preset.json` if there is one (what the preset reduces, repeated next to every number). Pretraining runs
(`--online-steps 0`) are left out: every fine-tuning run's first online evaluation, taken before its first online
step, is its offline score. For each method, task and seed the complete run is used (its last evaluation reached
its `--online-steps`); a missing or partial run is shown as missing, never as a number. SAC from scratch serves every
task of its environment.

Writes into `--out`:
- `README.md`: the SO2 paper's table layout (offline score -> online score, mean +- std over seeds, per dataset, and
  averaged over the datasets for the methods that completed every dataset with every seed), the paper's published
  numbers beside ours, rliable's IQM and optimality gap with 95% stratified-bootstrap intervals and the probability
  that SO2 improves on each method, the Q diagnostics (at the last evaluation, and each run's median over its online
  evaluations), and the run directories behind every cell. A hand-written section starting with `## Reading` is kept
  when the report is rewritten. The online phase also gets its own table: the mean score over the online evaluations
  (an area under the curve, which says who got good sooner) and how many seeds ended above their offline score; and
  a per-seed table shows each run's own numbers, which a mean +- std over three seeds can hide.
- `curves_<task>.png`: normalised score against online env steps, mean over seeds with a 95% bootstrap band.
- `offline_online_<task>.png`: the same runs' pretraining (score against gradient steps, from the evaluations of the
  run whose `offline.pt` each fine-tuning run started from) beside their online curves.
- `q_<task>.png`: the SO2 paper's Figure 1 panels: normalised Q difference relative to SAC (the method's minus SAC's
  at the same env step, SAC averaged over seeds and interpolated) and Kendall's tau, against online env steps.
- with `--copy-logs`: `runs/`, the text outputs of the runs in the report and of the runs they were pretrained in
  (each run directory's `config.json`, `eval.jsonl` and TensorBoard events; each job folder's `log.txt` and
  `status.json`), in the same folders, so that the committed report carries the logs it came from (checkpoints are
  left). `--algos` and `--tasks` narrow the report (and the copy) to some methods and datasets.
Std is numpy's (ddof 0) over seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
READING = "## Reading"
METHOD_NAMES = {"so2": "SO2", "edac": "EDAC", "cql_ft": "CQL", "cal_ql": "Cal-QL", "td3bc_ft": "TD3+BC",
                "awac": "AWAC", "iql_ft": "IQL", "off2on": "Off2On", "aca": "ACA", "sac": "SAC (scratch)"}
# SO2 paper, Table 1 (../shared/design/published_results.md): D4RL v2, 100k online steps, 4 seeds; start -> end.
PUBLISHED = {
    "awac": {"halfcheetah-random": (6.5, 35.0), "hopper-random": (6.7, 21.1), "walker2d-random": (5.9, 6.3),
             "halfcheetah-medium-replay": (40.5, 41.2), "hopper-medium-replay": (37.7, 60.1),
             "walker2d-medium-replay": (24.5, 79.8), "halfcheetah-medium": (43.0, 42.4), "hopper-medium": (57.8, 55.1),
             "walker2d-medium": (35.9, 72.1), "halfcheetah-medium-expert": (65.2, 93.0),
             "hopper-medium-expert": (55.5, 81.3), "walker2d-medium-expert": (108.3, 108.7)},
    "iql_ft": {"halfcheetah-random": (13.4, 27.3), "hopper-random": (7.6, 9.3), "walker2d-random": (6.8, 9.9),
               "halfcheetah-medium-replay": (42.7, 36.7), "hopper-medium-replay": (75.8, 68.5),
               "walker2d-medium-replay": (75.6, 64.9), "halfcheetah-medium": (46.7, 46.5),
               "hopper-medium": (73.4, 61.9), "walker2d-medium": (84.7, 78.8),
               "halfcheetah-medium-expert": (88.2, 59.6), "hopper-medium-expert": (52.8, 65.0),
               "walker2d-medium-expert": (110.8, 110.4)},
    "off2on": {"halfcheetah-random": (27.7, 87.2), "hopper-random": (10.5, 80.4), "walker2d-random": (10.3, 49.4),
               "halfcheetah-medium-replay": (42.1, 60.0), "hopper-medium-replay": (28.2, 79.5),
               "walker2d-medium-replay": (17.7, 89.2), "halfcheetah-medium": (39.3, 59.6),
               "hopper-medium": (97.5, 80.2), "walker2d-medium": (66.2, 72.4),
               "halfcheetah-medium-expert": (56.7, 99.3), "hopper-medium-expert": (112.0, 60.2),
               "walker2d-medium-expert": (102.1, 93.3)},
    "so2": {"halfcheetah-random": (37.7, 95.6), "hopper-random": (9.2, 79.9), "walker2d-random": (6.9, 62.9),
            "halfcheetah-medium-replay": (62.5, 89.4), "hopper-medium-replay": (97.0, 101.0),
            "walker2d-medium-replay": (80.9, 98.2), "halfcheetah-medium": (73.3, 98.9), "hopper-medium": (77.6, 101.2),
            "walker2d-medium": (76.4, 107.6), "halfcheetah-medium-expert": (87.1, 130.2),
            "hopper-medium-expert": (67.2, 109.1), "walker2d-medium-expert": (109.5, 112.9)},
}


@dataclass
class Run:
    path: Path
    algo: str
    task: str
    seed: int
    online_steps: int
    rows: list[dict] = field(default_factory=list)
    args: dict = field(default_factory=dict)
    pretraining_dir: Path | None = None  # the run its --offline-checkpoint came from
    pretraining: list[dict] = field(default_factory=list)  # that run's offline evaluations

    @property
    def offline(self) -> list[dict]:
        return self.pretraining or [r for r in self.rows if r.get("phase") == "offline"]

    @property
    def online(self) -> list[dict]:
        return [r for r in self.rows if r.get("phase") == "online"]

    @property
    def complete(self) -> bool:
        return bool(self.online) and self.online[-1]["env_step"] >= self.online_steps

    @property
    def offline_score(self) -> float | None:
        first = self.online[0] if self.online else None
        return first["normalized_score"] if first and first["env_step"] == 0 else None

    @property
    def final_score(self) -> float:
        return self.online[-1]["normalized_score"]

    @property
    def online_mean(self) -> float:
        """Mean score over the online evaluations after the first online step: a discrete area under the curve."""
        return float(np.mean([r["normalized_score"] for r in self.online if r["env_step"] > 0]))


def read_runs(runs_dir: Path) -> list[Run]:
    runs = []
    for config_path in sorted(runs_dir.rglob("config.json")):
        try:
            config = json.loads(config_path.read_text())
            args = config["args"]
            rows_path = config_path.parent / "eval.jsonl"
            rows = [json.loads(ln) for ln in rows_path.read_text().splitlines() if ln.strip()] \
                if rows_path.is_file() else []
        except (json.JSONDecodeError, KeyError, OSError) as e:
            print(f"skipped {config_path.parent}: unreadable ({e})")
            continue
        if args.get("online_steps", 0) == 0:  # a pretraining run
            continue
        pre = pretraining_dir(runs_dir, args.get("offline_checkpoint"))
        runs.append(Run(config_path.parent, config["algo"], args["env_id"], int(args["seed"]),
                        int(args["online_steps"]), rows, args, pre, offline_rows(pre) if pre else []))
    return runs


def pretraining_dir(runs_dir: Path, checkpoint: str | None) -> Path | None:
    """The run whose offline.pt a fine-tuning run started from. The path was written where the grid ran; if the grid
    was moved (or copied into results/), the same path below `runs_dir` is tried."""
    if not checkpoint:
        return None
    run_dir = Path(checkpoint).parent
    if not run_dir.is_dir() and runs_dir.name in run_dir.parts:
        run_dir = runs_dir.joinpath(*run_dir.parts[len(run_dir.parts) - run_dir.parts[::-1].index(runs_dir.name):])
    return run_dir if run_dir.is_dir() else None


def offline_rows(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "eval.jsonl").read_text().splitlines()
        return [row for ln in lines if ln.strip() and (row := json.loads(ln)).get("phase") == "offline"]
    except (OSError, json.JSONDecodeError):
        return []


def family(task: str) -> str:
    return task.split("-")[0]


def pick(runs: list[Run], tasks: list[str]) -> dict[tuple[str, str, int], Run]:
    """One run per (method, task, seed): a complete one if there is, else the newest; SAC per environment."""
    chosen: dict[tuple[str, str, int], Run] = {}
    for run in sorted(runs, key=lambda r: (r.complete, r.path.name.rsplit("__", 1)[-1])):
        targets = [t for t in tasks if family(t) == family(run.task)] if run.algo == "sac" else [run.task]
        for task in targets:
            chosen[(run.algo, task, run.seed)] = run
    return chosen


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.1f} +- {np.std(values):.1f}"


def bootstrap_band(curves: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile bootstrap interval of the mean over seeds (rows), at every step (column)."""
    if len(curves) < 2:
        return curves[0], curves[0]
    rng = np.random.default_rng(seed)
    means = curves[rng.integers(0, len(curves), (reps, len(curves)))].mean(axis=1)
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def aligned(runs: list[Run], key: str) -> tuple[np.ndarray, np.ndarray]:
    """env steps and [n_runs, n_steps] values of `key` at the evaluation steps all runs share."""
    steps = sorted(set.intersection(*(set(r["env_step"] for r in run.online) for run in runs)))
    values = np.array([[next(r[key] for r in run.online if r["env_step"] == s) for s in steps] for run in runs],
                      dtype=float)
    return np.asarray(steps), values


@dataclass
class Report:
    runs_dir: Path
    out: Path
    title: str
    preset: dict
    runs: list[Run]
    reps: int = 2000  # bootstrap resamples of the rliable intervals

    def __post_init__(self) -> None:
        tasks = self.preset.get("tasks") or sorted({r.task for r in self.runs if r.algo != "sac"})
        self.tasks = list(tasks)
        self.seeds = list(self.preset.get("seeds") or sorted({r.seed for r in self.runs}))
        order = list(METHOD_NAMES)
        found = {r.algo for r in self.runs} | set(self.preset.get("algos", []))
        self.methods = sorted(found, key=lambda a: order.index(a) if a in order else len(order))
        self.chosen = pick(self.runs, self.tasks)
        self.mixed = self.mixed_settings()
        for line in self.mixed:
            print(f"warning: {line}")

    def complete(self, method: str, task: str) -> list[Run]:
        return [r for s in self.seeds if (r := self.chosen.get((method, task, s))) is not None and r.complete]

    # ---- the table
    def cell(self, method: str, task: str) -> str:
        runs = self.complete(method, task)
        if not runs:
            partial = [r for s in self.seeds if (r := self.chosen.get((method, task, s)))]
            return "missing" + (f" ({len(partial)} partial)" if partial else "")
        n = f" ({len(runs)}/{len(self.seeds)} seeds)" if len(runs) < len(self.seeds) else ""
        offline = [r.offline_score for r in runs]
        final = fmt([r.final_score for r in runs])
        start = fmt(offline) if all(o is not None for o in offline) else "n/a"
        return (f"{final}{n}" if method == "sac" else f"{start} -> {final}{n}")

    def table(self) -> list[str]:
        head = "| dataset | " + " | ".join(METHOD_NAMES.get(m, m) for m in self.methods) + " |"
        lines = [head, "|---|" + "---|" * len(self.methods)]
        for task in self.tasks:
            lines.append(f"| {task} | " + " | ".join(self.cell(m, task) for m in self.methods) + " |")
        averages = []
        for m in self.methods:
            per_task = [self.complete(m, t) for t in self.tasks]
            if not all(len(runs) == len(self.seeds) for runs in per_task):
                averages.append("incomplete")
                continue
            final = np.mean([np.mean([r.final_score for r in runs]) for runs in per_task])
            if m == "sac" or any(r.offline_score is None for runs in per_task for r in runs):
                averages.append(f"{final:.1f}")
            else:
                start = np.mean([np.mean([r.offline_score for r in runs]) for runs in per_task])
                averages.append(f"{start:.1f} -> {final:.1f}")
        lines.append("| average | " + " | ".join(averages) + " |")
        return lines

    def online_cell(self, method: str, task: str) -> str:
        runs = self.complete(method, task)
        if not runs:
            return self.cell(method, task)  # missing, with the partial runs counted
        n = f" ({len(runs)}/{len(self.seeds)} seeds)" if len(runs) < len(self.seeds) else ""
        area = fmt([run.online_mean for run in runs])
        if method == "sac" or any(r.offline_score is None for r in runs):
            return f"{area}{n}"
        return f"{area}; {sum(r.final_score > r.offline_score for r in runs)}/{len(runs)} above start{n}"

    def online_table(self) -> list[str]:
        lines = ["| dataset | " + " | ".join(METHOD_NAMES.get(m, m) for m in self.methods) + " |",
                 "|---|" + "---|" * len(self.methods)]
        for task in self.tasks:
            lines.append(f"| {task} | " + " | ".join(self.online_cell(m, task) for m in self.methods) + " |")
        return lines

    def seed_table(self) -> list[str]:
        lines = ["| dataset | method | " + " | ".join(f"seed {s}" for s in self.seeds) + " |",
                 "|---|---|" + "---|" * len(self.seeds)]
        for task in self.tasks:
            for m in self.methods:
                cells = []
                for s in self.seeds:
                    run = self.chosen.get((m, task, s))
                    if run is None or not run.complete:
                        cells.append("missing" if run is None else "partial")
                    elif run.offline_score is None or m == "sac":
                        cells.append(f"{run.final_score:.1f} ({run.online_mean:.1f})")
                    else:
                        cells.append(f"{run.offline_score:.1f} -> {run.final_score:.1f} ({run.online_mean:.1f})")
                lines.append(f"| {task} | {METHOD_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
        return lines

    def published(self) -> list[str]:
        methods = [m for m in self.methods if m in PUBLISHED]
        if not methods:
            return []
        lines = ["| dataset | " + " | ".join(f"{METHOD_NAMES[m]}: ours | {METHOD_NAMES[m]}: SO2 paper"
                                               for m in methods) + " |",
                 "|---|" + "---|---|" * len(methods)]
        for task in self.tasks:
            cells = []
            for m in methods:
                paper = PUBLISHED[m].get(task)
                cells += [self.cell(m, task), f"{paper[0]} -> {paper[1]}" if paper else "not reported"]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        return lines

    # ---- rliable
    def score_matrix(self, method: str) -> np.ndarray | None:
        """[seeds, tasks] final normalised scores / 100 over the seeds every task has; None if a task has none."""
        per_task = [{r.seed: r.final_score for r in self.complete(method, t)} for t in self.tasks]
        seeds = sorted(set.intersection(*(set(d) for d in per_task))) if per_task else []
        if not seeds:
            return None
        return np.array([[d[s] for d in per_task] for s in seeds]) / 100.0

    def rliable(self, reps: int = 2000) -> list[str]:
        from rliable import library as rly
        from rliable import metrics

        scores = {m: s for m in self.methods if (s := self.score_matrix(m)) is not None}
        if not scores:
            return ["No method has a complete run on every task yet."]

        def aggregates(x):
            return np.array([metrics.aggregate_iqm(x), metrics.aggregate_optimality_gap(x)])

        points, intervals = rly.get_interval_estimates(scores, aggregates, reps=reps)
        lines = ["| method | runs x tasks | IQM (normalised score) [95% CI] | optimality gap [95% CI] |",
                 "|---|---|---|---|"]
        for m, p in points.items():
            ci = intervals[m] * 100
            lines.append(f"| {METHOD_NAMES.get(m, m)} | {scores[m].shape[0]} x {scores[m].shape[1]} | "
                         f"{p[0] * 100:.1f} [{ci[0, 0]:.1f}, {ci[1, 0]:.1f}] | "
                         f"{p[1] * 100:.1f} [{ci[0, 1]:.1f}, {ci[1, 1]:.1f}] |")
        if "so2" in scores and len(scores) > 1:
            pairs = {f"so2,{m}": (scores["so2"], scores[m]) for m in scores if m != "so2"}
            prob, prob_ci = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=reps)
            lines += ["", "| P(SO2 > method) | estimate [95% CI] |", "|---|---|"]
            for pair, p in prob.items():
                m = pair.split(",")[1]
                lo, hi = np.ravel(prob_ci[pair])
                lines.append(f"| {METHOD_NAMES.get(m, m)} | {np.ravel(p)[0]:.2f} [{lo:.2f}, {hi:.2f}] |")
        return lines

    # ---- Q diagnostics
    def sac_curve(self, task: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        runs = self.complete("sac", task)
        if not runs:
            return None
        steps, values = aligned(runs, key)
        return steps, np.nanmean(values, axis=0)

    def q_table(self) -> list[str]:
        lines = ["| dataset | method | Q normalised difference | minus SAC's | Kendall tau | over the online phase: "
                 "difference, tau |", "|---|---|---|---|---|---|"]
        for task in self.tasks:
            sac = self.sac_curve(task, "q_normalized_difference")
            for m in self.methods:
                runs = self.complete(m, task)
                if not runs:
                    continue
                diff = [r.online[-1]["q_normalized_difference"] for r in runs]
                tau = [r.online[-1]["q_kendall_tau"] for r in runs]
                rel = "n/a" if sac is None or m == "sac" else \
                    f"{np.nanmean(diff) - np.interp(runs[0].online[-1]['env_step'], *sac):+.3f}"
                # The last evaluation is one snapshot of the policy; the median over a run's online evaluations is
                # less at the mercy of one episode set that falls early (which shrinks the true Q).
                phase = [[np.nanmedian([e[k] for e in r.online if e["env_step"] > 0]) for r in runs]
                         for k in ("q_normalized_difference", "q_kendall_tau")]
                lines.append(f"| {task} | {METHOD_NAMES.get(m, m)} | {np.nanmean(diff):.3f} | {rel} | "
                             f"{np.nanmean(tau):.3f} | {np.nanmean(phase[0]):.3f}, {np.nanmean(phase[1]):.3f} |")
        return lines

    # ---- figures
    def plot(self) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        for task in self.tasks:
            have = {m: self.complete(m, task) for m in self.methods}
            have = {m: runs for m, runs in have.items() if runs}
            if not have:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for m, runs in have.items():
                steps, values = aligned(runs, "normalized_score")
                lo, hi = bootstrap_band(values)
                ax.plot(steps, values.mean(axis=0), label=f"{METHOD_NAMES.get(m, m)} ({len(runs)})")
                ax.fill_between(steps, lo, hi, alpha=0.2)
            ax.set(xlabel="online env steps", ylabel="normalised score", title=f"{task} ({self.title})")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(self.out / f"curves_{task}.png", dpi=110)
            plt.close(fig)
            written.append(f"curves_{task}.png")

            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
            sac = self.sac_curve(task, "q_normalized_difference")
            for m, runs in have.items():
                steps, diff = aligned(runs, "q_normalized_difference")
                _, tau = aligned(runs, "q_kendall_tau")
                if sac is not None and m != "sac":
                    ax1.plot(steps, np.nanmean(diff, axis=0) - np.interp(steps, *sac), label=METHOD_NAMES.get(m, m))
                ax2.plot(steps, np.nanmean(tau, axis=0), label=METHOD_NAMES.get(m, m))
            ax1.axhline(0.0, color="grey", lw=0.5)
            ax1.set(xlabel="online env steps", ylabel="normalised Q difference minus SAC's",
                    title="over-estimation relative to SAC" + (" (no SAC runs)" if sac is None else ""))
            ax2.set(xlabel="online env steps", ylabel="Kendall tau (windows of 10)", title="ranking of Q")
            ax2.legend(fontsize=7)
            fig.suptitle(task)
            fig.tight_layout()
            fig.savefig(self.out / f"q_{task}.png", dpi=110)
            plt.close(fig)
            written.append(f"q_{task}.png")

            pretrained = {m: runs for m, runs in have.items() if all(r.offline for r in runs)}
            if pretrained:
                fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
                for m, runs in have.items():
                    line = None
                    if m in pretrained:
                        steps = sorted(set.intersection(*({r["grad_step"] for r in run.offline} for run in runs)))
                        values = np.array([[next(r["normalized_score"] for r in run.offline if r["grad_step"] == g)
                                            for g in steps] for run in runs], dtype=float)
                        lo, hi = bootstrap_band(values)
                        (line,) = ax1.plot(steps, values.mean(axis=0), label=METHOD_NAMES.get(m, m))
                        ax1.fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())
                    steps, values = aligned(runs, "normalized_score")
                    lo, hi = bootstrap_band(values)
                    color = None if line is None else line.get_color()
                    (line,) = ax2.plot(steps, values.mean(axis=0), color=color,
                                       label=f"{METHOD_NAMES.get(m, m)} ({len(runs)})")
                    ax2.fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())
                ax1.set(xlabel="offline gradient steps", ylabel="normalised score", title="offline (pretraining)")
                ax2.set(xlabel="online env steps", title="online (fine-tuning)")
                ax2.legend(fontsize=7)
                fig.suptitle(f"{task} ({self.title}): mean over seeds, 95% bootstrap band")
                fig.tight_layout()
                fig.savefig(self.out / f"offline_online_{task}.png", dpi=110)
                plt.close(fig)
                written.append(f"offline_online_{task}.png")
        return written

    # Flags that may differ between the runs of one method without making them different experiments.
    PER_RUN = ("env_id", "seed", "output_dir", "offline_checkpoint", "resume", "device", "threads", "dataset")

    def mixed_settings(self) -> list[str]:
        """(method, dataset) cells whose runs were started with different settings (say, runs of an older preset),
        which a mean over seeds would silently mix. Settings may differ between datasets: the files' per-dataset
        defaults set them (CQL's reward normalisation, ACA's online buffer)."""
        lines = []
        for method in self.methods:
            for task in self.tasks:
                runs = [r for (m, t, _), r in self.chosen.items() if m == method and t == task]
                keys = sorted({k for r in runs for k in r.args if k not in self.PER_RUN})
                differ = [k for k in keys if len({json.dumps(r.args.get(k)) for r in runs}) > 1]
                if differ:
                    lines.append(f"{method} on {task}: its runs differ in {', '.join(differ)} (see their config.json)")
        return lines

    # ---- sources
    def sources(self) -> list[str]:
        lines = ["| method | dataset | seed | run directory | complete |", "|---|---|---|---|---|"]
        for (m, task, seed), run in sorted(self.chosen.items()):
            if task in self.tasks:
                rel = run.path.relative_to(self.runs_dir) if run.path.is_relative_to(self.runs_dir) else run.path
                lines.append(f"| {m} | {task} | {seed} | `{rel}` | {'yes' if run.complete else 'no'} |")
        return lines

    def write(self, command: str) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        figures = self.plot()
        path = self.out / "README.md"
        reading = ""
        if path.is_file() and READING in path.read_text():
            reading = path.read_text()[path.read_text().index(READING):]
        reduced = self.preset.get("reduces", "not stated (no preset.json in the runs folder)")
        devices = sorted({json.loads((r.path / "config.json").read_text()).get("device_name", "?")
                          for r in self.chosen.values()})
        text = [f"# Offline-to-online results: {self.title}", "",
                f"Written by `{command}` on {datetime.date.today()} from the run directories in `{self.runs_dir}` "
                f"(listed under Sources). Budgets reduced relative to the protocol: {reduced}. Devices: "
                f"{'; '.join(devices) or 'none'}. Seeds: {', '.join(map(str, self.seeds))}. Cells: offline score (the "
                f"first online evaluation, before any online step) -> score after the online budget, D4RL-normalised, "
                f"mean +- std (numpy, ddof 0) over seeds; `missing` = no complete run.", "",
                "## Offline -> online", "", *self.table(), "",
                "## The online phase", "",
                "Mean score over the online evaluations after the first online step (a discrete area under the online "
                "curve: higher = good sooner, less sensitive to one noisy last evaluation than the table above), "
                "mean +- std over the complete seeds; then how many of those seeds ended above their offline score.",
                "", *self.online_table(), "",
                "## Per seed", "",
                "Each seed's offline score -> score after the online budget, and in brackets its mean over the online "
                "evaluations; `partial` = the run has not finished its online budget.", "", *self.seed_table(), "",
                "## Beside the SO2 paper's Table 1", "",
                "The paper's numbers are D4RL v2 data with the full budgets (100k online steps, 4 seeds); ours carry "
                "the reductions above, so only directions compare.", "", *self.published(), "",
                "## rliable: final scores over all datasets", "",
                "Interquartile mean and optimality gap (threshold 100) over every run x dataset of the seeds each "
                f"method completed on all datasets, 95% stratified-bootstrap intervals (rliable, {self.reps:,} "
                "resamples); probability of improvement of SO2 over each method.", "", *self.rliable(self.reps), "",
                "## Q diagnostics", "",
                "Normalised difference (Q_est - Q_true) / |Q_true| and windowed Kendall tau "
                "(../shared/design/q_diagnostics.md) at the last evaluation, mean over seeds; 'minus SAC's' subtracts "
                "SAC-from-scratch's value at the same env step (positive: more over-estimation than SAC); the last "
                "column takes each run's median over its online evaluations after the first online step, then the "
                "mean over seeds.", "", *self.q_table(), "",
                "## Figures", "", *(f"![{f}]({f})" for f in figures), "",
                "## Sources", "", *self.sources(), ""]
        if self.mixed:
            text[2:2] = ["**Warning: runs with different settings are averaged together.** " + "; ".join(self.mixed)
                         + ".", ""]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(text) + ("\n" + reading if reading else ""))
        os.replace(tmp, path)
        return path


LOG_FILES = ("config.json", "eval.jsonl", "log.txt", "status.json", "preset.json")


def copy_logs(runs_dir: Path, runs: list[Run], dest: Path) -> int:
    """Copy the text outputs (not the checkpoints) of these runs, of the runs they were pretrained in and of their job
    folders below `dest`, keeping their paths relative to `runs_dir`."""
    folders = {runs_dir}
    for run in runs:
        for d in (run.path, run.pretraining_dir):
            if d is not None and d.is_relative_to(runs_dir):
                folders |= {d, d.parent}
    n = 0
    for folder in sorted(folders):
        for src in sorted(folder.iterdir()):
            if src.is_file() and (src.name in LOG_FILES or src.name.startswith("events.out.tfevents.")):
                target = dest / src.relative_to(runs_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
                n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="the grid's preset: reads <runs-root>/<preset>")
    parser.add_argument("--runs-root", default="runs/benchmark", help="benchmark/run_all.py's --runs-dir")
    parser.add_argument("--runs-dir", help="read this folder instead of <runs-root>/<preset>")
    parser.add_argument("--out", help="output folder (default results/<preset>)")
    parser.add_argument("--title", help="report title (default: the preset's name)")
    parser.add_argument("--copy-logs", action="store_true", help="copy the runs' text outputs into <out>/runs/")
    parser.add_argument("--algos", nargs="+", help="only these methods (sac included only if named)")
    parser.add_argument("--tasks", nargs="+", help="only these tasks")
    args = parser.parse_args(argv)
    if not args.preset and not args.runs_dir:
        parser.error("give --preset (a benchmark/run_all.py grid) or --runs-dir")
    runs_dir = Path(args.runs_dir or Path(args.runs_root) / args.preset).resolve()
    if not runs_dir.is_dir():
        raise SystemExit(f"error: {runs_dir} does not exist; run benchmark/run_all.sh --preset {args.preset or '...'} "
                         f"first, or pass --runs-dir")
    preset_file = runs_dir / "preset.json"
    preset = json.loads(preset_file.read_text()) if preset_file.is_file() else {}
    runs = read_runs(runs_dir)
    if args.algos:
        runs = [r for r in runs if r.algo in args.algos]
        preset["algos"] = [a for a in preset.get("algos", args.algos) if a in args.algos]
    if args.tasks:
        runs = [r for r in runs if r.task in args.tasks or (r.algo == "sac" and
                                                             family(r.task) in {family(t) for t in args.tasks})]
        preset["tasks"] = list(args.tasks)
    if not runs:
        raise SystemExit(f"error: no fine-tuning or SAC run directories below {runs_dir}"
                         + (" for these --algos / --tasks" if args.algos or args.tasks else ""))
    name = args.preset or runs_dir.name
    out = Path(args.out or ROOT / "results" / name)
    report = Report(runs_dir, out, args.title or name, preset, runs)
    command = "python benchmark/report.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"wrote {report.write(command.strip())}")
    if args.copy_logs:
        print(f"copied {copy_logs(runs_dir, runs, out / 'runs')} log files into {out / 'runs'}")


if __name__ == "__main__":
    main()
