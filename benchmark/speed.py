"""Updates per second of algorithms/so2.py's own update functions against a plain CleanRL/CORL-style reference.

Workloads, at the SO2 paper's sizes: offline EDAC (eta 1) and SAC-N (eta 0) at batch 256, and SO2's online block for
one env step (utd_ratio critic steps + actor_updates_per_step actor steps at batch 2560), for walker2d (obs 17, act 6,
N 10) and hopper (obs 11, act 3, N 50). Each workload times the plain reference (one nn.Sequential per critic, Python
loops over critics and parameters), so2.py eager and so2.py under torch.compile, from the same initial weights, in
round-robin rounds (so load on the shared machine hits all variants alike); the median over rounds is reported.

    python benchmark/speed.py --quick          # a few minutes: walker2d sizes only, 3 short rounds
    python benchmark/speed.py                  # everything, writes results/speed.md
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib.util
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn
import tyro

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("so2", ROOT / "algorithms" / "so2.py")
so2 = importlib.util.module_from_spec(spec)
sys.modules["so2"] = so2
spec.loader.exec_module(so2)

SIZES = {"walker2d-n10": (17, 6, 10), "hopper-n50": (11, 3, 50)}  # obs_dim, act_dim, N


@dataclass
class Config:
    sizes: tuple[Literal["walker2d-n10", "hopper-n50"], ...] = ("walker2d-n10", "hopper-n50")  # problem sizes
    workloads: tuple[Literal["edac", "sac-n", "so2"], ...] = ("edac", "sac-n", "so2")
    """edac / sac-n: one offline update (eta 1 / 0); so2: one online env step's block of 10 + 10 updates"""
    quick: bool = False  # debug run: 3 rounds of >= 0.3 s, 1 warm-up call, hopper-n50 skipped
    skip_n50: bool = False  # drop hopper-n50, the slowest size
    compile: bool = True  # also time torch.compile(update) of so2.py's functions (--no-compile to skip)
    device: str = "cpu"  # cpu or cuda
    threads: int = 0  # torch.set_num_threads; 0 keeps torch's default
    rounds: int = 7  # round-robin rounds; the median over rounds is reported
    workload_seconds: float = 900  # fewer rounds (at least 3) where 'rounds' would take longer than this
    warmup: int = 1  # untimed calls per variant after the check update (compiled variants: at least 3)
    round_seconds: float = 1.0  # minimum time of a variant in a round; calls per round come from the warm-up
    seed: int = 0
    out: str = "results/speed.md"  # Markdown report ('' = none)


# ---- the plain reference, written the CleanRL/CORL way
class PlainCritic(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, n: int, hidden: int = 256) -> None:
        super().__init__()
        self.qs = nn.ModuleList(nn.Sequential(
            nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)) for _ in range(n))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:  # [N, B]
        x = torch.cat([obs, action], dim=-1)
        return torch.stack([q(x).squeeze(-1) for q in self.qs])

    @torch.no_grad()
    def copy_from(self, critic: so2.VectorizedCritic) -> PlainCritic:
        for i, q in enumerate(self.qs):
            for lin, layer in zip([m for m in q if isinstance(m, nn.Linear)], critic.layers):
                lin.weight.copy_(layer.weight[i].T)
                lin.bias.copy_(layer.bias[i, 0])
        return self


def plain_polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
    for p_t, p in zip(target.parameters(), source.parameters()):
        p_t.data.mul_(1 - tau).add_(tau * p.data)


def plain_offline_update(actor, critic, target, log_alpha, args, target_entropy) -> Callable:
    """EDAC as CORL writes it (alpha -> actor -> critic -> Polyak; TD and diversity terms from separate forwards),
    with a looped ensemble; alpha and actor losses share one policy sample, as so2.py and the EDAC code do."""
    actor_optim = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    alpha_optim = torch.optim.Adam([log_alpha], lr=args.alpha_lr)

    def update(batch):
        obs, actions, n = batch["observations"], batch["actions"], len(critic.qs)
        pi, log_pi = actor(obs)  # one policy sample for the temperature and the actor, as the EDAC code
        alpha_loss = -(log_alpha * (log_pi.detach() + target_entropy)).mean()
        alpha_optim.zero_grad()
        alpha_loss.backward()
        alpha_optim.step()
        alpha = log_alpha.exp().detach()

        actor_loss = (alpha * log_pi - critic(obs, pi).min(0).values).mean()  # also fills critic .grad
        actor_optim.zero_grad()
        actor_loss.backward()
        actor_optim.step()

        with torch.no_grad():
            next_pi, next_log_pi = actor(batch["next_observations"])
            q_next = target(batch["next_observations"], next_pi).min(0).values - alpha * next_log_pi
            y = batch["rewards"] + args.gamma * (1 - batch["terminated"]) * q_next
        q = critic(obs, actions)
        critic_loss = (q - y).pow(2).mean(1).sum()
        if args.eta > 0:
            obs_t = obs.unsqueeze(0).repeat(n, 1, 1)
            act_t = actions.unsqueeze(0).repeat(n, 1, 1).requires_grad_(True)
            q_t = torch.stack([qn(torch.cat([obs_t[i], act_t[i]], -1)).squeeze(-1) for i, qn in enumerate(critic.qs)])
            grads = torch.autograd.grad(q_t.sum(), act_t, create_graph=True)[0]
            grads = (grads / (grads.norm(dim=-1, keepdim=True) + 1e-10)).transpose(0, 1)  # [B, N, A]
            cos = grads @ grads.transpose(1, 2)
            mask = 1 - torch.eye(n, device=obs.device)
            critic_loss = critic_loss + args.eta * (cos * mask).sum((1, 2)).mean() / (n - 1)
        critic_optim.zero_grad()
        critic_loss.backward()
        critic_optim.step()
        plain_polyak(target, critic, args.tau)
        return {"loss/critic": critic_loss.detach(), "loss/actor": actor_loss.detach(), "loss/alpha": alpha_loss.detach()}

    return update


def plain_online_update(actor, critic, target, log_alpha, args) -> Callable:
    """SO2's block (PVU per-member target, mean over members), one critic step at a time, looped ensemble."""
    assert args.target_q == "member" and args.critic_reduction == "mean"
    actor_optim = torch.optim.Adam(actor.parameters(), lr=args.online_lr)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=args.online_lr)
    utd, actor_every, c = args.utd_ratio, args.utd_ratio // args.actor_updates_per_step, args.target_noise_clip

    def update(batch):
        alpha, critic_loss, actor_loss_sum = log_alpha.exp(), 0.0, 0.0
        for u in range(utd):
            obs, actions, next_obs = batch["observations"][u], batch["actions"][u], batch["next_observations"][u]
            with torch.no_grad():
                next_pi, next_log_pi = actor(next_obs)
                next_pi = (next_pi + (torch.randn_like(next_pi) * args.target_noise).clamp(-c, c)).clamp(-1, 1)
                y = batch["rewards"][u] + args.gamma * (1 - batch["terminated"][u]) * (
                    target(next_obs, next_pi) - alpha * next_log_pi)  # [N, B]
            loss = (critic(obs, actions) - y).pow(2).mean(1).mean()
            critic_optim.zero_grad()
            loss.backward()
            critic_optim.step()
            critic_loss = critic_loss + loss.detach() / utd
            if (u + 1) % actor_every == 0:
                pi, log_pi = actor(obs)
                actor_loss = (alpha * log_pi - critic(obs, pi).min(0).values).mean()
                actor_optim.zero_grad()
                actor_loss.backward()
                actor_optim.step()
                actor_loss_sum = actor_loss_sum + actor_loss.detach() / args.actor_updates_per_step
            plain_polyak(target, critic, args.tau)
        return {"loss/critic": critic_loss, "loss/actor": actor_loss_sum}

    return update


# ---- workloads
def make_agent(obs_dim, act_dim, n, device, online) -> so2.Agent:
    actor = so2.TanhGaussianActor(obs_dim, act_dim).to(device)
    critic = so2.VectorizedCritic(obs_dim, act_dim, n).to(device)
    log_alpha = torch.zeros((), device=device, requires_grad=True)
    if online:  # the state at the switch to SO2 (so2.main)
        actor.log_std_min = -20.0
        log_alpha = torch.full((), math.log(0.2), device=device)
    return so2.Agent(actor, critic, copy.deepcopy(critic), log_alpha)


def clone_agent(a: so2.Agent) -> so2.Agent:
    return so2.Agent(copy.deepcopy(a.actor), copy.deepcopy(a.critic), copy.deepcopy(a.critic_target),
                     a.log_alpha.detach().clone().requires_grad_(a.log_alpha.requires_grad))


def make_batch(lead: tuple[int, ...], obs_dim, act_dim, device, gen) -> dict[str, torch.Tensor]:
    r = lambda *s: torch.randn(*lead, *s, generator=gen)  # noqa: E731
    b = {"observations": r(obs_dim), "actions": torch.rand(*lead, act_dim, generator=gen) * 1.98 - 0.99,
         "rewards": r(), "next_observations": r(obs_dim),
         "terminated": (torch.rand(*lead, generator=gen) < 0.01).float(), "truncated": torch.zeros(lead)}
    return {k: v.to(device) for k, v in b.items()}


def flops_per_call(workload, obs_dim, act_dim, n, batch, args) -> float:
    mac_c = (obs_dim + act_dim) * 256 + 256 * 256 * 2 + 256  # one critic, one sample
    mac_a = obs_dim * 256 + 256 * 256 * 2 + 256 * 2 * act_dim  # actor trunk + mu and log_std heads
    fc, fa = 2 * mac_c * batch * n, 2 * mac_a * batch  # forward FLOPs of the ensemble / the actor
    if workload == "so2":  # per critic step: target (Fa + Fc) + TD fwd/bwd 3Fc; per actor step 3Fa + 2Fc
        return args.utd_ratio * (fa + 4 * fc) + args.actor_updates_per_step * (3 * fa + 2 * fc)
    # alpha + actor (one sample) 3Fa + 2Fc; target Fa + Fc; TD 3Fc; diversity on the TD forward: dQ/da Fc and
    # the backward of dQ/da 2Fc (the plain reference's separate forwards and actor weight grads are not counted)
    return 4 * fa + 6 * fc + (3 * fc if workload == "edac" else 0)


def timed(fn, batch, iters, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn(batch)
    sync()
    return (time.perf_counter() - t) / iters


def matmul_rates(device) -> dict[str, float]:
    """GFLOP/s of a 256x256x256 fp32 matmul and a [10,256,256] bmm, best of 7 repeats: what the machine can do."""
    out = {}
    for name, shape in (("256x256x256 mm", (256, 256)), ("[10,256,256] bmm", (10, 256, 256))):
        a, b = torch.randn(shape, device=device), torch.randn(shape, device=device)
        fn = lambda _: torch.matmul(a, b)  # noqa: E731
        iters = max(1, int(0.2 / timed(fn, None, 10, device)))
        out[name] = 2 * math.prod(shape) * shape[-1] / min(timed(fn, None, iters, device) for _ in range(7)) / 1e9
    return out


@dataclass
class Variant:
    name: str
    fn: Callable
    times: list[float] = field(default_factory=list)
    note: str = ""
    error: str = ""
    iters: int = 1


def checks(agent: so2.Agent, ref: tuple, make_ours, make_ref, batch, online: bool, seed: int) -> dict[str, float]:
    """Forward equality of the copied critics, then one update of each from the same RNG state."""
    actor, critic, target, _ = ref
    b = {k: v[0] for k, v in batch.items()} if online else batch
    with torch.no_grad():
        dq = max((agent.critic(b["observations"], b["actions"]) - critic(b["observations"], b["actions"])).abs().max().item(),
                 (agent.critic_target(b["next_observations"], b["actions"])
                  - target(b["next_observations"], b["actions"])).abs().max().item())
    if dq > 1e-5:
        raise SystemExit(f"the plain critics do not reproduce so2.py's VectorizedCritic: max |dQ| = {dq:.2e}")
    torch.manual_seed(seed)
    ours = make_ours(batch)
    torch.manual_seed(seed)
    theirs = make_ref(batch)
    out = {"max |dQ|": dq}
    for k in theirs:
        x, y = float(ours[k]), float(theirs[k])
        out[f"rel d {k}"] = abs(x - y) / max(abs(y), 1e-8)
    with torch.no_grad():  # critic weights after the update, member 0 and member N-1
        dw = max((layer.weight[i] - [m for m in critic.qs[i] if isinstance(m, nn.Linear)][j].weight.T).abs().max().item()
                 for j, layer in enumerate(agent.critic.layers) for i in (0, agent.critic.n_critics - 1))
    out["max |dW| after"] = dw
    return out


def run_workload(cfg: Config, size: str, workload: str, device) -> tuple[list[Variant], dict[str, float], str]:
    obs_dim, act_dim, n = SIZES[size]
    online = workload == "so2"
    args = so2.Args(n_critics=n, eta=1.0 if workload == "edac" else 0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    agent = make_agent(obs_dim, act_dim, n, device, online)
    lead = (args.utd_ratio, args.online_batch_size) if online else (args.batch_size,)
    batch = make_batch(lead, obs_dim, act_dim, device, gen)
    compiled_agent = clone_agent(agent)
    ref = (copy.deepcopy(agent.actor), PlainCritic(obs_dim, act_dim, n).to(device).copy_from(agent.critic),
           PlainCritic(obs_dim, act_dim, n).to(device).copy_from(agent.critic_target),
           agent.log_alpha.detach().clone().requires_grad_(agent.log_alpha.requires_grad))
    if online:
        ours, _ = so2.make_online_update(agent, args)
        plain = plain_online_update(*ref, args)
        compiled = so2.make_online_update(compiled_agent, args)[0]
    else:
        ours, _ = so2.make_offline_update(agent, args, target_entropy=-float(act_dim))
        plain = plain_offline_update(*ref, args, target_entropy=-float(act_dim))
        compiled = so2.make_offline_update(compiled_agent, args, target_entropy=-float(act_dim))[0]
    check = checks(agent, ref, ours, plain, batch, online, cfg.seed)
    variants = [Variant("plain reference", plain), Variant("so2.py eager", ours)]
    if cfg.compile:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        variants.append(Variant("so2.py torch.compile", torch.compile(compiled)))
    for v in variants:  # warm-up; the check above was already a first call of the eager variants
        try:
            compiling = "compile" in v.name
            v.times = [timed(v.fn, batch, 1, device) for _ in range(max(cfg.warmup, 3 if compiling else 1))]
            v.iters = max(1, round(cfg.round_seconds / v.times[-1]))
            if compiling:
                c = torch._dynamo.utils.counters
                v.note = (f"first call {v.times[0]:.0f} s; {c['stats']['unique_graphs']} graphs, "
                          f"{sum(c['graph_break'].values())} graph breaks")
        except Exception as e:  # a compile failure is reported, not fatal
            v.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0].split('. ')[0][:120]}"
            print(f"  {v.name} failed: {v.error}", flush=True)
    live = [v for v in variants if not v.error]
    round_s = sum(v.iters * v.times[-1] for v in live)  # estimated from the last warm-up call
    for v in live:
        v.times = []
    for r in range(max(3, min(cfg.rounds, int(cfg.workload_seconds / round_s)))):
        for v in live[r % len(live):] + live[: r % len(live)]:  # rotate the order every round
            v.times.append(timed(v.fn, batch, v.iters, device))
    return variants, check, f"{size} {workload}"


def main(cfg: Config) -> None:
    if cfg.quick:
        cfg.rounds, cfg.warmup, cfg.round_seconds = 3, 1, 0.3
    sizes = [s for s in cfg.sizes if not ((cfg.quick or cfg.skip_n50) and s == "hopper-n50")]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch._dynamo.config.recompile_limit = 64  # one compiled closure per workload shares so2.py's code objects
    device, start, load = torch.device(cfg.device), time.time(), [os.getloadavg()[0]]
    rates = matmul_rates(device)
    info = {"device": so2.device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "so2": hashlib.sha256((ROOT / "algorithms" / "so2.py").read_bytes()).hexdigest()[:12]}
    print(f"{info['device']}; torch {info['torch']}; threads {info['threads']}; matmul rate "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()), flush=True)
    rows, checks_md, ratios = [], [], {}
    print(HEAD)
    for size in sizes:
        for workload in cfg.workloads:
            (obs_dim, act_dim, n), args = SIZES[size], so2.Args(n_critics=SIZES[size][2])
            batch = args.online_batch_size if workload == "so2" else args.batch_size
            flop, t0 = flops_per_call(workload, obs_dim, act_dim, n, batch, args), time.time()
            variants, check, name = run_workload(cfg, size, workload, device)
            checks_md.append(f"| {name} | " + ", ".join(f"{k} {v:.1e}" for k, v in check.items()) + " |")
            for v in variants:
                res = {"name": name, "variant": v.name, "error": v.error, "flop": flop, "note": v.note}
                if not v.error:
                    res.update(ms=statistics.median(v.times) * 1e3, calls=f"{v.iters}x{len(v.times)}",
                               ratio=statistics.median(r / t for r, t in zip(variants[0].times, v.times)),
                               spread=(max(v.times) - min(v.times)) / statistics.median(v.times) * 100)
                    ratios[(size, workload, v.name)] = res["ratio"]  # per round, then the median
                rows.append(res)
                print(table_row(res, max(rates.values())), flush=True)
            print(f"  ({name}: {flop / 1e9:.1f} GFLOP per update, {time.time() - t0:.0f} s; "
                  + ", ".join(f"{k} {v:.1e}" for k, v in check.items()) + ")", flush=True)
            load.append(os.getloadavg()[0])
            if cfg.out:  # after every workload, so that a run cut short keeps what it measured
                write_report(cfg, info, rates, rows, checks_md, ratios, load, time.time() - start, final=False)
    rates = {k: max(v, w) for (k, v), w in zip(rates.items(), matmul_rates(device).values())}  # start and end
    verdict = write_report(cfg, info, rates, rows, checks_md, ratios, load, time.time() - start, final=True)
    print(f"target (walker2d-n10 EDAC >= 1.5x the plain reference): {verdict}\n"
          f"total {(time.time() - start) / 60:.1f} min")


HEAD = f"| {'workload':<20} | {'variant':<22} | ms/update | updates/s | vs reference | % of matmul rate | notes |"


def table_row(r: dict, peak: float) -> str:
    if r["error"]:
        return f"| {r['name']:<20} | {r['variant']:<22} | failed | | | | {r['error']} |"
    return (f"| {r['name']:<20} | {r['variant']:<22} | {r['ms']:9.1f} | {1e3 / r['ms']:9.3f} | {r['ratio']:11.2f}x | "
            f"{r['flop'] / r['ms'] / 1e6 / peak * 100:15.1f}% | {r['calls']} calls, range {r['spread']:.0f}%"
            f"{'; ' + r['note'] if r['note'] else ''} |")


def write_report(cfg, info, rates, rows, checks_md, ratios, load, elapsed, final) -> str:
    eager, comp = (ratios.get(("walker2d-n10", "edac", f"so2.py {k}")) for k in ("eager", "torch.compile"))
    verdict = ("not measured (walker2d-n10 edac was not run)" if eager is None else
               f"{'met' if eager >= 1.5 else 'NOT met'}: so2.py's eager EDAC update is {eager:.2f}x the plain "
               f"reference" + (f" ({comp:.2f}x under torch.compile)" if comp else ""))
    if not cfg.out:
        return verdict
    said = "; ".join(f"{s} {w} {v.removeprefix('so2.py ')} {r:.2f}x" for (s, w, v), r in ratios.items()
                     if v != "plain reference")
    busy = max(load) > os.cpu_count()
    lines = [
        "# Update speed of algorithms/so2.py" + ("" if final else " (partial: the run is still going or was cut short)"), "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- device: {info['device']}; torch {info['torch']}; {info['threads']} threads; python {sys.version.split()[0]}",
        "- matmul rate (fp32, best of 7 repeats at start and end): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()),
        f"- command: `python benchmark/speed.py {' '.join(sys.argv[1:])}`; algorithms/so2.py sha256 {info['so2']}…",
        f"- {cfg.rounds} round-robin rounds, {cfg.warmup} warm-up calls (compiled: >= 3), >= {cfg.round_seconds} s "
        f"per variant per round; 1-min load average {min(load):.1f} to {max(load):.1f} on {os.cpu_count()} cores; "
        f"runtime {elapsed / 60:.1f} min", "",
        HEAD, "|" + "---|" * 7, *(table_row(r, max(rates.values())) for r in rows), "",
        "An *update* is one call of the update function: for edac / sac-n one offline gradient step (alpha, actor, "
        "critic, Polyak) at batch 256; for so2 one env step's block, 10 critic + 10 actor steps at batch 2560. "
        "`ms/update` is the median over rounds; `vs reference` the median over rounds of the reference's time over "
        "the variant's in the same round; `range` (max - min) / median over rounds; `AxB calls` calls per round x "
        "rounds.", "",
        "**FLOP model.** A critic costs (obs+act)*256 + 2*256*256 + 256 multiply-adds per sample, so the forward of N "
        "critics at batch B is Fc = 2*MACs*B*N FLOPs (the actor's Fa likewise, with its two 256*act heads). A "
        "backward counts 2x its forward, an input-only one (actor loss through frozen critics, dQ/da) 1x. EDAC = "
        "4Fa + 6Fc + 3Fc (diversity: dQ/da on the TD forward and its backward), SAC-N = 4Fa + 6Fc, an SO2 block = "
        "10 (Fa + 4Fc) + 10 (3Fa + 2Fc): the work so2.py needs, also for the reference, which does more (a second "
        "critic forward for the diversity term, critic weight gradients in the actor loss). `% of matmul rate` = "
        "these FLOP/s over the better measured matmul rate; elementwise ops, optimizer steps and Python overhead "
        "show up as the missing percent (at batch 2560 a matmul runs faster than at 256, so > 100% is possible).", "",
        "**Checks** before timing (same initial weights; one update of each from the same seed on the same batch): "
        "max |dQ| between so2.py's critics and the copied Sequentials, relative difference of each returned loss, "
        "max |dW| of critic weights after that update.", "", "| workload | checks |", "|---|---|", *checks_md, "",
        f"**Target** (so2.py's EDAC offline update >= 1.5x the plain reference, walker2d-n10, same run): {verdict}.", "",
        f"**What the numbers say.** Speed-ups over the plain reference: {said}. "
        + ("The machine was busy with other jobs during the run (load above the core count), so absolute times are "
           "noisy and the per-round ratios are the numbers to trust. " if busy else "")
        + (f"With {info['threads']} threads every op is a parallel region, and the reference's per-critic loop has "
           "~N times more, smaller ones; when other processes hold the cores, each region waits for its slowest "
           "thread, which inflates the reference's time more than so2.py's: compare a `--threads 1` run before "
           "reading the ratio as a property of the code. " if info["threads"] > 1 else "")
        + "A `% of matmul rate` well below 100 means the time goes to elementwise ops, optimizer steps, dispatch "
        "and waiting rather than to matmuls.", ""]
    path = ROOT / cfg.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    if final:
        print(f"wrote {path}")
    return verdict


if __name__ == "__main__":
    main(tyro.cli(Config))
