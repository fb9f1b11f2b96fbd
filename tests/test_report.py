"""benchmark/report.py on hand-made run directories whose numbers are known: means and stds per cell, a missing and
a partial run shown as missing, averages only over complete methods, the online phase's area and seeds above start,
each seed's own cell, rliable's IQM as rliable computes it, the Q difference relative to SAC, the figures, the
sources, and a hand-written reading kept across rewrites."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmark" / "report.py")
report = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = report
spec.loader.exec_module(report)

TASKS, SEEDS, STEPS = ("hopper-medium", "halfcheetah-random"), (0, 1, 2), 100


def offline(algo, task, seed):
    return 10.0 * (algo == "so2") + 3.0 * seed + (5.0 if task == "hopper-medium" else 0.0)


def final(algo, task, seed):
    return {"so2": 60.0, "edac": 40.0, "sac": 30.0}[algo] + 7.0 * seed + (task == "hopper-medium") * 2.0


def write_run(root: Path, algo: str, task: str, seed: int, last_step: int = STEPS, online_steps: int = STEPS,
              q_diff: float = 0.5):
    run = root / f"{algo}__{task}__{seed}__{1000 + seed}"
    run.mkdir(parents=True)
    run.joinpath("config.json").write_text(json.dumps({"algo": algo, "device_name": "test CPU", "args": {
        "env_id": task, "seed": seed, "online_steps": online_steps}}))
    rows = [{"phase": "offline", "env_step": 0, "grad_step": 10, "normalized_score": -99.0}]
    for step in range(0, last_step + 1, 50):
        w = step / STEPS
        rows.append({"phase": "online", "env_step": step, "grad_step": 10 + step,
                     "normalized_score": (1 - w) * offline(algo, task, seed) + w * final(algo, task, seed),
                     "q_normalized_difference": q_diff + 0.1 * seed, "q_kendall_tau": 0.2 + 0.1 * seed})
    run.joinpath("eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "cpu"
    root.mkdir()
    root.joinpath("preset.json").write_text(json.dumps({"reduces": "everything (a test)", "tasks": list(TASKS),
                                                         "seeds": list(SEEDS), "algos": ["so2", "edac", "sac"]}))
    for task in TASKS:
        for seed in SEEDS:
            write_run(root / "finetune/so2" / task / f"seed{seed}", "so2", task, seed, q_diff=0.9)
            if not (task == "hopper-medium" and seed == 2):
                write_run(root / "finetune/edac" / task / f"seed{seed}", "edac", task, seed)
        write_run(root / "pretrain/so2" / task / "seed0", "so2", task, 0, online_steps=0)  # ignored
    write_run(root / "finetune/edac/hopper-medium/seed2", "edac", "hopper-medium", 2, last_step=50)  # partial
    for seed in SEEDS:  # SAC once per environment: hopper serves hopper-medium
        write_run(root / "online/sac/hopper" / f"seed{seed}", "sac", "hopper-medium", seed, q_diff=0.25)
    return root


def make(grid, tmp_path):
    return report.Report(grid, tmp_path / "out", "cpu", json.loads((grid / "preset.json").read_text()),
                         report.read_runs(grid), reps=200)


def test_cells_are_means_and_stds_over_seeds(grid, tmp_path):
    r = make(grid, tmp_path)
    start = [offline("so2", "hopper-medium", s) for s in SEEDS]
    end = [final("so2", "hopper-medium", s) for s in SEEDS]
    assert r.cell("so2", "hopper-medium") == \
        f"{np.mean(start):.1f} +- {np.std(start):.1f} -> {np.mean(end):.1f} +- {np.std(end):.1f}"
    end2 = [final("edac", "hopper-medium", s) for s in (0, 1)]
    assert r.cell("edac", "hopper-medium").endswith(f"{np.mean(end2):.1f} +- {np.std(end2):.1f} (2/3 seeds)")
    assert r.cell("sac", "halfcheetah-random") == "missing"  # no SAC run on halfcheetah
    sac = [final("sac", "hopper-medium", s) for s in SEEDS]
    assert r.cell("sac", "hopper-medium") == f"{np.mean(sac):.1f} +- {np.std(sac):.1f}"
    table = "\n".join(r.table())
    average = [line for line in r.table() if line.startswith("| average")][0].split(" | ")
    assert average[2] == "incomplete" and average[3].startswith("incomplete")  # edac misses a seed, SAC a task
    so2_end = np.mean([np.mean([final("so2", t, s) for s in SEEDS]) for t in TASKS])
    assert f"-> {so2_end:.1f}" in average[1]
    assert "-99" not in table  # offline-phase rows and pretraining runs are not online scores


def test_partial_and_missing_runs_are_never_numbers(grid, tmp_path):
    for run in (grid / "finetune/edac/hopper-medium").rglob("edac__*"):
        if not run.name.endswith("1002"):
            for f in run.iterdir():
                f.unlink()
            run.rmdir()
    r = make(grid, tmp_path)
    assert r.cell("edac", "hopper-medium") == "missing (1 partial)"
    assert r.online_cell("edac", "hopper-medium") == "missing (1 partial)"


def test_online_phase_area_and_seeds_above_start(grid, tmp_path):
    run = next((grid / "finetune/so2/hopper-medium/seed1").glob("so2__*")) / "eval.jsonl"
    rows = [json.loads(ln) for ln in run.read_text().splitlines()]
    rows[-1]["normalized_score"] = -5.0  # this seed ends below its offline start
    run.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = make(grid, tmp_path)
    areas = []
    for s in SEEDS:
        start, end = offline("so2", "hopper-medium", s), final("so2", "hopper-medium", s)
        areas.append(np.mean([(start + end) / 2, -5.0 if s == 1 else end]))  # evaluations at 50 and 100, not at 0
    assert r.online_cell("so2", "hopper-medium") == f"{np.mean(areas):.1f} +- {np.std(areas):.1f}; 2/3 above start"
    assert r.online_cell("edac", "hopper-medium").endswith("; 2/2 above start (2/3 seeds)")
    assert r.online_cell("edac", "halfcheetah-random").endswith("; 3/3 above start")
    sac = [np.mean([(offline("sac", "hopper-medium", s) + final("sac", "hopper-medium", s)) / 2,
                    final("sac", "hopper-medium", s)]) for s in SEEDS]
    assert r.online_cell("sac", "hopper-medium") == f"{np.mean(sac):.1f} +- {np.std(sac):.1f}"
    assert r.online_cell("sac", "halfcheetah-random") == "missing"
    assert "| hopper-medium | " + r.online_cell("so2", "hopper-medium") in "\n".join(r.online_table())


def test_per_seed_cells_are_that_seeds_run(grid, tmp_path):
    r = make(grid, tmp_path)
    rows = {tuple(ln.split(" | ")[:2]): ln.split(" | ")[2:] for ln in r.seed_table()[2:]}
    assert r.seed_table()[0] == "| dataset | method | seed 0 | seed 1 | seed 2 |"
    for s in SEEDS:
        start, end = offline("so2", "hopper-medium", s), final("so2", "hopper-medium", s)
        mean = np.mean([(start + end) / 2, end])  # evaluations at 50 and 100 steps
        assert rows[("| hopper-medium", "SO2")][s].rstrip(" |") == f"{start:.1f} -> {end:.1f} ({mean:.1f})"
    assert rows[("| hopper-medium", "EDAC")][2].rstrip(" |") == "partial"
    assert [c.rstrip(" |") for c in rows[("| halfcheetah-random", "SAC (scratch)")]] == ["missing"] * 3
    start, end = offline("sac", "hopper-medium", 1), final("sac", "hopper-medium", 1)
    sac = rows[("| hopper-medium", "SAC (scratch)")][1].rstrip(" |")
    assert sac == f"{end:.1f} ({np.mean([(start + end) / 2, end]):.1f})"  # no offline start


def test_rliable_iqm_is_rliables_own(grid, tmp_path):
    from rliable import metrics

    r = make(grid, tmp_path)
    matrix = r.score_matrix("so2")
    expected = np.array([[final("so2", t, s) for t in TASKS] for s in SEEDS]) / 100
    np.testing.assert_allclose(matrix, expected)
    iqm = metrics.aggregate_iqm(expected) * 100
    line = next(ln for ln in r.rliable(reps=200) if ln.startswith("| SO2 |"))
    assert f"| {iqm:.1f} [" in line
    assert r.score_matrix("sac") is None  # SAC has no halfcheetah run: left out, not averaged over what it has
    assert any(ln.startswith("| EDAC |") and "| 2 x 2 |" in ln for ln in r.rliable(reps=200))


def test_q_difference_relative_to_sac_and_files(grid, tmp_path):
    r = make(grid, tmp_path)
    q = r.q_table()
    so2_row = next(ln for ln in q if ln.startswith("| hopper-medium | SO2 |"))
    so2 = np.mean([0.9 + 0.1 * s for s in SEEDS])
    sac = np.mean([0.25 + 0.1 * s for s in SEEDS])
    assert f"| {so2:.3f} | {so2 - sac:+.3f} |" in so2_row
    path = r.write("python benchmark/report.py (test)")
    text = path.read_text()
    assert "everything (a test)" in text and "test CPU" in text
    assert (tmp_path / "out" / "curves_hopper-medium.png").stat().st_size > 1000
    assert (tmp_path / "out" / "q_hopper-medium.png").stat().st_size > 1000
    assert "`finetune/edac/hopper-medium/seed2/edac__hopper-medium__2__1002` | no |" in text
    path.write_text(text + "\n## Reading\n\nSO2 wins here, by construction.\n")
    make(grid, tmp_path).write("again")
    assert path.read_text().endswith("## Reading\n\nSO2 wins here, by construction.\n")


def test_q_over_the_online_phase_is_a_median_per_run(grid, tmp_path):
    """One evaluation whose episodes all fall early has a tiny true Q and a huge normalised difference; the median
    over a run's online evaluations must not be dragged by it, nor count the evaluation before any online step."""
    run = next((grid / "finetune/so2/hopper-medium/seed0").glob("so2__*")) / "eval.jsonl"
    rows = [json.loads(ln) for ln in run.read_text().splitlines() if json.loads(ln)["phase"] == "offline"]
    for step, diff, tau in ((0, 100.0, 0.9), (25, 1.0, 0.1), (50, 2.0, 0.2), (100, 30.0, 0.6)):
        rows.append({"phase": "online", "env_step": step, "grad_step": 10 + step, "normalized_score": 1.0,
                     "q_normalized_difference": diff, "q_kendall_tau": tau})
    run.write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = next(ln for ln in make(grid, tmp_path).q_table() if ln.startswith("| hopper-medium | SO2 |"))
    diff, tau = np.mean([2.0, 1.0, 1.1]), np.mean([0.2, 0.3, 0.4])  # seeds 1 and 2 are constant: 0.9 + 0.1 s
    assert row.endswith(f"| {diff:.3f}, {tau:.3f} |")


def test_runs_started_with_other_settings_are_flagged(grid, tmp_path, capsys):
    r = make(grid, tmp_path)
    assert r.mixed == []
    config = grid / "finetune/so2/hopper-medium/seed1" / "so2__hopper-medium__1__1001" / "config.json"
    saved = json.loads(config.read_text())
    saved["args"]["hidden_dim"] = 256  # say, a run left from an older preset; the others never set it
    config.write_text(json.dumps(saved))
    r = make(grid, tmp_path)
    assert r.mixed == ["so2 on hopper-medium: its runs differ in hidden_dim (see their config.json)"]
    assert "warning: so2 on hopper-medium: its runs differ in hidden_dim" in capsys.readouterr().out
    text = r.write("test").read_text()
    assert "**Warning: runs with different settings are averaged together.** so2 on hopper-medium: its runs " \
        "differ in hidden_dim" in text
    assert not list(r.out.glob("*.tmp"))
    # a setting that differs between datasets only (a file's per-dataset default) is not a mix
    for run in (grid / "finetune/edac/halfcheetah-random").rglob("config.json"):
        saved = json.loads(run.read_text())
        saved["args"]["normalize_reward"] = True
        run.write_text(json.dumps(saved))
    assert not [line for line in make(grid, tmp_path).mixed if line.startswith("edac")]


def test_copy_logs_carries_text_outputs_not_checkpoints(grid, tmp_path):
    run = next((grid / "finetune/so2/hopper-medium/seed0").glob("so2__*"))
    (run / "checkpoint.pt").write_bytes(b"weights")
    (run.parent / "log.txt").write_text("the job's log\n")
    out = tmp_path / "results"
    report.main(["--runs-dir", str(grid), "--out", str(out), "--copy-logs"])
    copied = out / "runs" / run.relative_to(grid)
    assert (copied / "eval.jsonl").read_text() == (run / "eval.jsonl").read_text()
    assert (copied / "config.json").is_file() and (copied.parent / "log.txt").read_text() == "the job's log\n"
    assert (out / "runs" / "preset.json").is_file() and not list((out / "runs").rglob("*.pt"))
    assert (out / "README.md").is_file()
    assert not (out / "runs" / "pretrain").exists()  # no fine-tuning run here started from those


def test_algos_and_tasks_narrow_the_report_and_the_copy(grid, tmp_path):
    out = tmp_path / "narrow"
    report.main(["--runs-dir", str(grid), "--out", str(out), "--algos", "so2", "sac", "--tasks", "hopper-medium",
                 "--copy-logs"])
    text = (out / "README.md").read_text()
    assert "| SO2 |" in text and "EDAC" not in text and "halfcheetah-random" not in text
    copied = {p.relative_to(out / "runs").parts[:3] for p in (out / "runs").rglob("eval.jsonl")}
    assert copied == {("finetune", "so2", "hopper-medium"), ("online", "sac", "hopper")}
    with pytest.raises(SystemExit, match="for these --algos / --tasks"):
        report.main(["--runs-dir", str(grid), "--out", str(out), "--algos", "aca"])


def test_offline_curves_come_from_the_pretraining_run_even_when_the_grid_moved(grid, tmp_path):
    pre = next((grid / "pretrain/so2/hopper-medium/seed0").glob("so2__*"))
    with open(pre / "eval.jsonl", "a") as f:
        f.write(json.dumps({"phase": "offline", "env_step": 0, "grad_step": 20, "normalized_score": 7.0}) + "\n")
    where_it_ran = Path("/gone/benchmark") / grid.name / pre.relative_to(grid) / "offline.pt"
    for seed in SEEDS:
        config = next((grid / "finetune/so2/hopper-medium" / f"seed{seed}").glob("so2__*")) / "config.json"
        saved = json.loads(config.read_text())
        saved["args"]["offline_checkpoint"] = str(where_it_ran)
        config.write_text(json.dumps(saved))
    r = make(grid, tmp_path)
    so2 = r.complete("so2", "hopper-medium")
    assert [[(row["grad_step"], row["normalized_score"]) for row in run.offline] for run in so2] == \
        [[(10, -99.0), (20, 7.0)]] * 3
    # a run that pretrained in its own process keeps its own offline rows
    assert [[row["grad_step"] for row in run.offline] for run in r.complete("edac", "hopper-medium")] == [[10]] * 2
    r.write("test")
    assert (r.out / "offline_online_hopper-medium.png").stat().st_size > 1000
    report.copy_logs(grid, so2, tmp_path / "copy")
    assert (tmp_path / "copy" / pre.relative_to(grid) / "eval.jsonl").read_text() == (pre / "eval.jsonl").read_text()


def test_copied_logs_are_not_ignored_by_git():
    """`--copy-logs` writes results/<preset>/runs/; a .gitignore pattern that catches it would leave the committed
    report without the logs its numbers came from."""
    import shutil
    import subprocess

    if shutil.which("git") is None or subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    for path in ("results/cpu/runs/finetune/so2/hopper-medium/seed0/log.txt", "results/x/runs/preset.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
        assert not ignored, f"{path} is ignored by git: check .gitignore"
