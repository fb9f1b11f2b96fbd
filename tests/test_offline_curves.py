"""benchmark/offline_curves.py: runs each method once, skips complete runs, and reports what the runs logged."""

from __future__ import annotations

import importlib.util
import json
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT

REF_MIN, REF_MAX = -20.272305, 3234.3  # D4RL's hopper reference returns
from test_end_to_end import hopper_file  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def curves():
    spec = importlib.util.spec_from_file_location("offline_curves", ROOT / "benchmark" / "offline_curves.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["offline_curves"] = module
    spec.loader.exec_module(module)
    return module


def test_runs_then_skips_and_reports(tmp_path, hopper_file, curves, capsys):  # noqa: F811
    args = curves.Args(methods=("td3bc_ft", "iql_ft"), steps=("td3bc_ft=30", "iql_ft=20"), evals=2,
                       eval_episodes=1, dataset=str(hopper_file), runs_dir=str(tmp_path / "runs"),
                       out=str(tmp_path / "report"), extra=("--q-diag-extend-steps", "0"))
    curves.main(args)
    runs = {d.name.split("__")[0]: d for d in (tmp_path / "runs").iterdir()}
    assert set(runs) == {"td3bc_ft", "iql_ft"}
    rows = [json.loads(x) for x in (runs["td3bc_ft"] / "eval.jsonl").read_text().splitlines()]
    assert [r["grad_step"] for r in rows if r["phase"] == "offline"] == [15, 30]

    md = (tmp_path / "report_hopper-medium.md").read_text()
    assert (tmp_path / "report_hopper-medium.png").stat().st_size > 0
    for method, run in runs.items():
        assert f"`{run.name}`" in md and (tmp_path / "report_hopper-medium" / run.name / "eval.jsonl").is_file()
    # the behaviour policy: one score per episode the loader delimits: the file's terminals and time-outs, plus its
    # cut-off tail, which qlearning_dataset's semantics end with a truncation; computed here from the raw file
    with h5py.File(hopper_file) as f:
        assert not f["timeouts"][:].any()  # so the loader keeps every raw step but the file's last
        rewards, ends = f["rewards"][:-1], f["terminals"][:-1].astype(bool)
    ends[-1] = True
    returns = [seg.sum() for seg in np.split(rewards, np.flatnonzero(ends) + 1)[:-1]]
    scores = 100 * (np.array(returns) - REF_MIN) / (REF_MAX - REF_MIN)
    mean, std, n = curves.behaviour_score(args)
    assert (n, mean, std) == (len(scores), pytest.approx(scores.mean(), rel=1e-5),
                              pytest.approx(scores.std(), rel=1e-4))
    assert f"{n:,} episodes): normalised score {mean:.1f} +- {std:.1f}" in md

    report = tmp_path / "report_hopper-medium.md"
    report.write_text(md + "\n## Reading\n- written by hand\n")
    capsys.readouterr()
    curves.main(args)  # complete runs are not run again; the hand-written section stays
    assert capsys.readouterr().out.count("complete in") == 2
    assert report.read_text().endswith("## Reading\n- written by hand\n")
    assert {d.name for d in (tmp_path / "runs").iterdir()} == {d.name for d in runs.values()}


def test_bad_steps_say_what_to_write(curves):
    with pytest.raises(SystemExit, match="METHOD=STEPS"):
        curves.budgets(curves.Args(methods=("iql_ft",), steps=("iql=5",)))
