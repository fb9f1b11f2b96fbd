"""One SO2 online block run eagerly and one run under torch.compile, from the same weights, batch and seed, agree."""

import copy
import importlib.util
import sys
from pathlib import Path

import torch
import torch._inductor.config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compile_so2", ROOT / "algorithms" / "so2.py")
so2 = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = so2
spec.loader.exec_module(so2)


def test_compiled_online_update_matches_eager(monkeypatch):
    # inductor draws its own random numbers unless told to use eager's generator
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch.manual_seed(0)
    obs_dim, act_dim, n, utd, b = 5, 2, 3, 1, 8
    actor = so2.TanhGaussianActor(obs_dim, act_dim, hidden=32)
    critic = so2.VectorizedCritic(obs_dim, act_dim, n, hidden=32)
    agents = []
    for _ in range(2):
        agent = so2.Agent(copy.deepcopy(actor), copy.deepcopy(critic), copy.deepcopy(critic),
                          torch.tensor(-1.6))
        agents.append(agent)
    batch = {"observations": torch.randn(utd, b, obs_dim), "actions": torch.rand(utd, b, act_dim) * 2 - 1,
             "rewards": torch.randn(utd, b), "next_observations": torch.randn(utd, b, obs_dim),
             "terminated": (torch.rand(utd, b) < 0.2).float(), "truncated": torch.zeros(utd, b)}
    args = so2.Args(utd_ratio=utd, actor_updates_per_step=utd)
    eager, _ = so2.make_online_update(agents[0], args)
    compiled, _ = so2.make_online_update(agents[1], args)
    compiled = torch.compile(compiled)
    torch.manual_seed(1)
    out_eager = eager(batch)
    torch.manual_seed(1)
    out_compiled = compiled(batch)
    for k in out_eager:
        torch.testing.assert_close(out_compiled[k], out_eager[k], rtol=1e-4, atol=1e-5, msg=k)
    for a, c in zip(agents[0].critic.parameters(), agents[1].critic.parameters()):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
    for a, c in zip(agents[0].actor.parameters(), agents[1].actor.parameters()):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
