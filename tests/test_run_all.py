"""benchmark/run_all.py: the grid, shared pretraining, skipping finished runs, resuming killed ones, reporting and
retrying failed ones -- on stand-in algorithm files that take seconds -- then the smoke preset on the real files,
locally and through SLURM where `sbatch` exists."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "benchmark" / "run_all.py")
run_all = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = run_all
spec.loader.exec_module(run_all)

# A stand-in for an algorithm file: the protocol's command line, a run directory with config.json, eval.jsonl,
# checkpoint.pt (JSON here) written at every one of 10 steps, offline.pt after a pretraining, --resume and
# --offline-checkpoint. FAKE_FAIL=<algo>:<kind> makes that run fail; FAKE_HANG=<algo> stops it after 3 steps.
FAKE = r'''
import argparse, json, os, sys, time
from pathlib import Path
p = argparse.ArgumentParser()
for flag in ("--env-id", "--output-dir", "--resume", "--offline-checkpoint", "--data"):
    p.add_argument(flag)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--online-steps", type=int, default=100)
args, _ = p.parse_known_args()
name = Path(__file__).stem
if args.resume:
    run = Path(args.resume)
    config = json.loads((run / "config.json").read_text())
    state = json.loads((run / "checkpoint.pt").read_text())
else:
    run = Path(args.output_dir) / f"{name}__{args.env_id}__{args.seed}__{time.time_ns()}"
    run.mkdir(parents=True)
    config = {"algo": name, "args": vars(args), "command": " ".join(sys.argv)}
    (run / "config.json").write_text(json.dumps(config))
    state = {"step": 0}
kind = "pretrain" if config["args"]["online_steps"] == 0 else "finetune"
if os.environ.get("FAKE_FAIL") == f"{name}:{kind}":
    sys.exit(f"error: {name} {kind} failed on purpose")
if config["args"]["offline_checkpoint"] and not Path(config["args"]["offline_checkpoint"]).is_file():
    sys.exit("error: no offline.pt")
for step in range(state["step"], 10):
    if os.environ.get("FAKE_HANG") == name and step == 3:
        print("hanging", flush=True)
        time.sleep(600)
    (run / "checkpoint.pt").write_text(json.dumps({"step": step + 1}))
    with open(run / "eval.jsonl", "a") as f:
        f.write(json.dumps({"phase": "online", "env_step": step + 1}) + "\n")
if kind == "pretrain":
    (run / "offline.pt").write_text("{}")
print(f"{name} finished", flush=True)
'''


@pytest.fixture
def fakes(tmp_path):
    folder = tmp_path / "algorithms"
    folder.mkdir()
    for algo in ("so2", "edac", "td3bc_ft", "sac"):
        (folder / f"{algo}.py").write_text(FAKE)
    return folder


@pytest.fixture
def no_data_build(monkeypatch):
    monkeypatch.setitem(run_all.PRESETS, "smoke", dataclasses.replace(run_all.PRESETS["smoke"], build_data=()))
    monkeypatch.setattr(run_all, "data_problems", lambda preset, tasks: "")  # the fakes read no data


def test_paper_preset_leaves_each_task_to_its_data_source_and_cpu_uses_the_rebuilt_data():
    paper = run_all.make_jobs(run_all.PRESETS["paper"], ["td3bc_ft"], ("hopper-medium", "pen-human"), (0,))
    assert all("--data" not in job.flags for job in paper)  # d4rl for MuJoCo, minari for Adroit: the files' defaults
    cpu = run_all.make_jobs(run_all.PRESETS["cpu"], ["td3bc_ft", "sac"], ("hopper-medium",), (0,))
    assert all(job.flags[job.flags.index("--data") + 1] == "rebuilt" for job in cpu)


def built(root: Path, dataset: str, steps: int | None = None) -> None:
    """A dataset folder as make_datasets.py leaves it (only build.json matters to the check)."""
    folder = root / dataset
    folder.mkdir(parents=True)
    (folder / "build.json").write_text(json.dumps({"settings": {"steps": steps, "seed": 0}}))


def test_rebuilt_datasets_not_ready_stop_the_runner_with_what_to_do(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    built(root, "o2o-rl/hopper/medium-v0")
    built(root, "o2o-rl/walker2d/random-v0", steps=500)  # a quick look, not the preset's data
    (root / "o2o-rl/halfcheetah/random-v0/data").mkdir(parents=True)  # a folder make_datasets.py did not make
    tasks = ["hopper-medium", "walker2d-random", "halfcheetah-random", "hopper-medium-replay", "pen-human", "hopper"]
    with pytest.raises(SystemExit) as stop:
        run_all.main(["--preset", "cpu", "--runs-dir", str(tmp_path / "runs"), "--tasks", *tasks])
    message = str(stop.value)
    assert message.startswith("error: the cpu preset runs on datasets rebuilt on this machine")
    lines = message.splitlines()[1:]
    assert len(lines) == 5 and not any(line.startswith("hopper-medium ") for line in lines)  # hopper-medium is ready
    assert "walker2d-random is a scaled-down build (--steps 500): python benchmark/make_datasets.py --env-id " \
        "walker2d-random --force" in lines
    assert any("halfcheetah/random-v0 was not made by this script" in line for line in lines)
    assert any(line.startswith("hopper-medium-replay is not built. It is the replay buffer of the SAC run")
               and "--sac-run RUN_DIR" in line for line in lines)
    assert any("pen-human cannot be rebuilt here" in line for line in lines)
    assert any("unknown --env-id 'hopper'" in line for line in lines)
    assert not list((tmp_path / "runs").rglob("log.txt")), "no run may start"

    for dataset in ("walker2d/random-v0", "halfcheetah/random-v0"):
        shutil.rmtree(root / "o2o-rl" / dataset)
        built(root, f"o2o-rl/{dataset}")
    assert run_all.data_problems(run_all.PRESETS["cpu"], ("hopper-medium", "walker2d-random", "halfcheetah-random")) \
        == ""
    assert run_all.data_problems(run_all.PRESETS["paper"], ("hopper-medium-replay",)) == ""  # D4RL: downloaded


def test_a_relative_minari_root_reaches_the_runs_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the runs themselves start in the repository root
    monkeypatch.setenv("MINARI_DATASETS_PATH", "data/minari")
    assert run_all.main(["--preset", "cpu", "--runs-dir", str(tmp_path / "runs"), "--list"]) == 0
    assert os.environ["MINARI_DATASETS_PATH"] == str(tmp_path.resolve() / "data" / "minari")


def test_failure_tail_keeps_both_ends_of_a_long_line(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("start\nerror: the cause " + "x" * 2000 + " Build it with: the advice\n")
    tail = run_all.tail(log)
    assert "    start" in tail and "error: the cause" in tail and tail.endswith("Build it with: the advice")
    assert "[...]" in tail and max(len(line) for line in tail.splitlines()) < 620


def grid(fakes, tmp_path, *extra):
    return ["--preset", "smoke", "--algorithms-dir", str(fakes), "--runs-dir", str(tmp_path / "runs"), "--jobs", "2",
            *extra]


def states(tmp_path):
    return {str(p.parent.relative_to(tmp_path / "runs" / "smoke")): json.loads(p.read_text())["state"]
            for p in (tmp_path / "runs" / "smoke").rglob("status.json")}


def commands(job_dir: Path) -> list[str]:
    return [line for line in (job_dir / "log.txt").read_text().splitlines() if line.startswith("==== ")]


def test_grid_shares_one_pretraining_per_file_task_and_seed():
    preset = run_all.PRESETS["smoke"]
    jobs = run_all.make_jobs(preset, ["so2", "edac", "cql_ft", "cal_ql", "sac"], ("hopper-random", "hopper-medium"),
                             (0, 1))
    by_kind = {k: [j for j in jobs if j.kind == k] for k in ("pretrain", "finetune", "online")}
    assert len(by_kind["pretrain"]) == 3 * 2 * 2  # so2 (serves edac too), cql_ft, cal_ql
    assert len(by_kind["finetune"]) == 4 * 2 * 2
    assert len(by_kind["online"]) == 1 * 2  # SAC: one environment (hopper), two seeds
    edac = next(j for j in by_kind["finetune"] if j.algo == "edac" and j.seed == 1 and j.task == "hopper-medium")
    assert edac.needs == "pretrain/so2/hopper-medium/seed1"
    assert all(j.needs in {p.dir for p in by_kind["pretrain"]} for j in by_kind["finetune"])
    pre = next(j for j in by_kind["pretrain"] if j.algo == "so2")
    assert pre.flags[-2:] == ["--online-steps", "0"] and "--threads" in pre.flags
    assert "--offline-steps" not in by_kind["online"][0].flags  # sac.py has no offline phase


def test_local_grid_runs_then_skips_finished_runs(fakes, tmp_path, no_data_build, capsys):
    assert run_all.main(grid(fakes, tmp_path)) == 0
    assert set(states(tmp_path).values()) == {"done"} and len(states(tmp_path)) == 2 + 3 + 1
    job = tmp_path / "runs/smoke/finetune/edac/hopper-random/seed0"
    config = json.loads(next(job.glob("edac__*/config.json")).read_text())
    assert "/pretrain/so2/hopper-random/seed0/so2__" in config["args"]["offline_checkpoint"]
    assert "[run_all] 6/6 done, 0 running, 0 failed" in capsys.readouterr().out
    logs = {p: p.read_text() for p in (tmp_path / "runs").rglob("log.txt")}
    assert run_all.main(grid(fakes, tmp_path)) == 0
    assert {p: p.read_text() for p in (tmp_path / "runs").rglob("log.txt")} == logs, "a finished run was started again"


def test_runs_of_an_edited_preset_are_named_not_mixed_silently(fakes, tmp_path, no_data_build, monkeypatch, capsys):
    assert run_all.main(grid(fakes, tmp_path)) == 0
    assert "warning" not in capsys.readouterr().out
    smoke = run_all.PRESETS["smoke"]
    monkeypatch.setitem(run_all.PRESETS, "smoke", dataclasses.replace(smoke, common=(*smoke.common, "--tau", "0.01")))
    logs = {p: p.read_text() for p in (tmp_path / "runs").rglob("log.txt")}
    assert run_all.main(grid(fakes, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "warning: 6 runs were started with other flags than the preset gives now" in out
    assert "finetune/edac/hopper-random/seed0" in out and "online/sac/hopper/seed0" in out
    assert {p: p.read_text() for p in (tmp_path / "runs").rglob("log.txt")} == logs, "kept, not rerun"


def test_failed_run_is_reported_and_retried(fakes, tmp_path, no_data_build, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_FAIL", "td3bc_ft:pretrain")
    assert run_all.main(grid(fakes, tmp_path)) == 1
    out = capsys.readouterr().out
    assert "(td3bc_ft pretraining, hopper-random, seed 0) FAILED (exit 1)" in out
    assert "error: td3bc_ft pretrain failed on purpose" in out  # the log's last lines
    assert "(td3bc_ft, hopper-random, seed 0) not started: its pretraining failed" in out
    s = states(tmp_path)
    assert s["pretrain/td3bc_ft/hopper-random/seed0"] == "failed"
    assert "finetune/td3bc_ft/hopper-random/seed0" not in s and s["finetune/so2/hopper-random/seed0"] == "done"
    monkeypatch.delenv("FAKE_FAIL")
    done_logs = {p: p.read_text() for p in (tmp_path / "runs").rglob("log.txt") if "td3bc_ft" not in str(p)}
    assert run_all.main(grid(fakes, tmp_path)) == 0
    assert set(states(tmp_path).values()) == {"done"}
    assert {p: p.read_text() for p in done_logs} == done_logs, "only the failed and blocked runs may run again"
    status = json.loads((tmp_path / "runs/smoke/pretrain/td3bc_ft/hopper-random/seed0/status.json").read_text())
    assert status["attempts"] == 2


def test_killed_runner_resumes_its_runs_from_their_checkpoints(fakes, tmp_path):
    env = {**os.environ, "FAKE_HANG": "so2"}
    args = [sys.executable, str(ROOT / "benchmark" / "run_all.py"), *grid(fakes, tmp_path), "--algos", "so2"]
    runner = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = tmp_path / "runs/smoke/pretrain/so2/hopper-random/seed0"
    deadline = time.time() + 120
    while not list(job.glob("so2__*/checkpoint.pt")) and time.time() < deadline and runner.poll() is None:
        time.sleep(0.2)
    assert list(job.glob("so2__*/checkpoint.pt")), runner.communicate()[0] if runner.poll() is not None else ""
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 128 + signal.SIGTERM and "resume from their checkpoints" in out
    assert not (job / "status.json").exists()
    step = json.loads(next(job.glob("so2__*/checkpoint.pt")).read_text())["step"]
    assert 1 <= step < 10
    env.pop("FAKE_HANG")
    assert subprocess.run(args, env=env, capture_output=True, text=True).returncode == 0
    assert "--resume" in commands(job)[-1] and len(list(job.glob("so2__*"))) == 1
    rows = (next(job.glob("so2__*")) / "eval.jsonl").read_text().splitlines()
    assert len(rows) == 10, "the resumed run continued from its checkpoint"


# ---------------------------------------------------------------- the real files
def check_real_grid(preset_dir: Path, algos: list[str]) -> None:
    for job in preset_dir.rglob("status.json"):
        assert json.loads(job.read_text())["state"] == "done", (job, (job.parent / "log.txt").read_text()[-3000:])
    for algo in algos:
        kind = "online" if algo == "sac" else "finetune"
        runs = list((preset_dir / kind / algo).rglob(f"{algo}__*/eval.jsonl"))
        assert runs, f"no {algo} run"
        rows = [json.loads(line) for line in runs[0].read_text().splitlines()]
        assert rows[-1]["phase"] == "online" and rows[-1]["env_step"] == 200
        widths = set()

        def walk(x):
            if hasattr(x, "shape"):
                widths.update(x.shape)
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)

        walk(torch.load(runs[0].parent / "checkpoint.pt", weights_only=False)["agent"])
        assert 16 in widths and 256 not in widths, f"{algo}: --hidden-dim 16 did not set the networks' width"


def test_smoke_preset_on_the_real_files(tmp_path):
    algos = ["so2", "edac", "td3bc_ft", "sac"]
    out = subprocess.run([str(ROOT / "benchmark" / "run_all.sh"), "--preset", "smoke", "--algos", *algos,
                          "--runs-dir", str(tmp_path), "--jobs", "2"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    check_real_grid(tmp_path / "smoke", algos)


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="SLURM is not installed here (.ci/run starts one)")
def test_smoke_preset_through_slurm(tmp_path):
    algos = ["td3bc_ft", "sac"]
    out = subprocess.run([str(ROOT / "benchmark" / "run_all.sh"), "--preset", "smoke", "--algos", *algos,
                          "--runs-dir", str(tmp_path), "--jobs", "2", "--slurm", "--wait"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "as SLURM array" in out.stdout and "ends)" in out.stdout  # fine-tuning waited for pretraining
    check_real_grid(tmp_path / "smoke", algos)
    assert list((tmp_path / "smoke" / "slurm").glob("pretrain-*_0.log"))


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="SLURM is not installed here (.ci/run starts one)")
def test_slurm_failed_pretraining_blocks_only_its_own_fine_tuning(fakes, tmp_path, no_data_build, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "td3bc_ft:pretrain")  # sbatch passes the environment on to the tasks
    assert run_all.main(grid(fakes, tmp_path, "--slurm", "--wait")) == 1
    s = states(tmp_path)
    assert s["pretrain/td3bc_ft/hopper-random/seed0"] == "failed"
    assert s["finetune/td3bc_ft/hopper-random/seed0"] == "failed"  # blocked by its own pretraining only
    assert s["finetune/so2/hopper-random/seed0"] == s["finetune/edac/hopper-random/seed0"] == "done"
    assert s["online/sac/hopper/seed0"] == "done"
    monkeypatch.delenv("FAKE_FAIL")
    assert run_all.main(grid(fakes, tmp_path, "--slurm", "--wait")) == 0  # a rerun retries only those two
    assert set(states(tmp_path).values()) == {"done"}
    assert len(list((tmp_path / "runs/smoke/slurm").glob("pretrain-*.json"))) == 2  # one manifest per submission


@pytest.mark.parametrize("preset", sorted(run_all.PRESETS))
def test_every_preset_flag_is_an_argument_of_its_file(preset):
    """A flag a file does not know fails every run of the grid: check them all without running anything."""
    import ast

    def fields(algo):
        tree = ast.parse((ROOT / "algorithms" / f"{algo}.py").read_text())
        args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
        return {n.target.id for n in args.body if isinstance(n, ast.AnnAssign)}

    algos = run_all.available_algos()
    for job in run_all.make_jobs(run_all.PRESETS[preset], algos, run_all.PRESETS[preset].tasks[:1], (0,)):
        flags = {f[2:].replace("-", "_") for f in job.flags if f.startswith("--")}
        assert flags <= fields(job.algo), f"{preset}: {job.algo} lacks {sorted(flags - fields(job.algo))}"
