"""benchmark/speed.py's plain references compute what the algorithm files' updates compute: from the same weights,
batch and seed, two updates of each give the same losses and weights. Only then is a speed ratio between them a
statement about the code rather than about different maths."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "benchmark" / "speed.py")
speed = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = speed
spec.loader.exec_module(speed)

# Small enough for a 2-core CPU: cql_ft/cal_ql and td3bc_ft fix their critics' width at 256, so there only the
# batch and the number of penalty samples shrink. off2on.py's ensemble is E = n_critics = 3 agents.
# aca-online: w's step at the file's interpolation (1/40000) and its floor would not show in two updates, hence
# 0.2 a step onto a floor of 0.9 (w 1, then 0.9). Adam divides out a gradient's scale, so the file's grad-norm clip
# of 0.25 moves the weights by only ~0.4% of a step; it shows plainly where it brings the gradient near Adam's eps
# (1e-8), hence a clip of 1e-7. At beta 7 the soft clip's floor lies >= 25 nats below log pi_0 of every action
# here, where softplus(x) = x in float32 and the floor drops out; at beta 0.5 it binds for some.
TINY = dict(obs_dim=5, act_dim=2, n_critics=3, hidden=32, batch=16)
OVERRIDES = {"so2": {"utd_ratio": 2, "actor_updates_per_step": 2}, "cql_ft.py": {"cql_n_actions": 3},
             "cal_ql.py": {"cql_n_actions": 3}, "off2on.py": {"cql_n_actions": 3},
             "aca-online": {"interpolation": (1.0, 0.005, 0.9), "actor_grad_clip": 1e-7, "beta": 0.5}}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(workload):
    return speed.build(workload, speed.Spec(**TINY, overrides=OVERRIDES.get(workload, {})))


@pytest.mark.parametrize("workload", speed.WORKLOADS)
def test_plain_reference_matches_the_file(workload):
    # a second update also runs through Adam's moments and the moved targets
    check = speed.checks(tiny(workload), seed=0, updates=2)
    losses = {k: v for k, v in check.items() if k.startswith("rel d ")}
    assert len(losses) >= 2, check
    assert max(losses.values()) < 1e-5, check
    assert check["rel dW"] < 1e-3, check
    assert check["max |dW| after"] < 1e-5, check
    assert speed.check_failed(check) == ""


@pytest.mark.parametrize("workload", speed.WORKLOADS)
def test_check_tells_a_different_update_apart(workload):
    """The comparison has teeth: a reference that sees other rewards fails it."""
    setup = tiny(workload)
    plain = setup.plain
    setup.plain = lambda batch: plain({**batch, "rewards": batch["rewards"] + 1.0})
    assert speed.check_failed(speed.checks(setup, seed=0, updates=2))


@pytest.mark.parametrize("workload", speed.WORKLOADS)
def test_check_sees_a_missing_polyak_step(workload, monkeypatch):
    """Targets move by only tau x a step, yet a reference that never updates them fails the check."""
    setup = tiny(workload)
    assert any(name.endswith("target") for name, _, _ in setup.nets)
    monkeypatch.setattr(speed, "plain_polyak", lambda target, source, tau: None)
    check = speed.checks(setup, seed=0, updates=2)
    assert "rel dW target" in speed.check_failed(check), check
