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


def test_compiled_offline_update_matches_eager(monkeypatch):
    """EDAC's step: the diversity term stays eager, the rest compiles; two steps so Adam's state is exercised."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch.manual_seed(0)
    obs_dim, act_dim, n, b = 5, 2, 3, 32  # batch >= 16: AOTAutograd donates buffers there
    actor = so2.TanhGaussianActor(obs_dim, act_dim, hidden=32)
    critic = so2.VectorizedCritic(obs_dim, act_dim, n, hidden=32)
    agents = [so2.Agent(copy.deepcopy(actor), copy.deepcopy(critic), copy.deepcopy(critic),
                        torch.zeros((), requires_grad=True)) for _ in range(2)]
    batch = {"observations": torch.randn(b, obs_dim), "actions": torch.rand(b, act_dim) * 2 - 1,
             "rewards": torch.randn(b), "next_observations": torch.randn(b, obs_dim), "terminated": torch.zeros(b),
             "truncated": torch.zeros(b)}
    args = so2.Args(n_critics=n, eta=1.0)
    eager, _ = so2.make_offline_update(agents[0], args, target_entropy=-2.0)
    compiled, _ = so2.make_offline_update(agents[1], args, target_entropy=-2.0)
    compiled = torch.compile(compiled)
    for step in range(2):
        torch.manual_seed(step)
        out_eager = eager(batch)
        torch.manual_seed(step)
        out_compiled = compiled(batch)
    for k in out_eager:
        torch.testing.assert_close(out_compiled[k], out_eager[k], rtol=1e-4, atol=1e-5, msg=k)
    for module in ("actor", "critic", "critic_target"):
        for a, c in zip(getattr(agents[0], module).parameters(), getattr(agents[1], module).parameters()):
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(agents[1].log_alpha, agents[0].log_alpha)
