"""algorithms/cal_ql.py, one update at a time against the losses written out plainly from design/cal_ql.md section 2
and cql_ft.md section 3: the value of every loss and the gradient each optimiser receives, offline and online (with
and without --calibrate-online), with max-backup, entropy backup, a clipped penalty and a logsumexp temperature, on
batches whose Monte-Carlo returns bound some policy entries and not others and which hold terminated, truncated and
both-flagged rows. Then the Adam steps (learning rate per optimiser) and Polyak, and the documented defaults (Args and
the per-dataset table), each pinned to its source."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from conftest import load_algo

cal = load_algo("cal_ql")
torch.set_num_threads(1)  # the tiny networks are slower with threads on a shared machine

OBS, ACT = 4, 2


def make_agent(seed: int = 0):
    torch.manual_seed(seed)
    mean, std = torch.randn(OBS) * 0.1, torch.rand(OBS) + 0.5
    actor = cal.Actor(OBS, ACT, mean, std, hidden=32)
    critic = cal.Critic(OBS, ACT, 2, mean, std)
    cal.init_weights(actor, critic, "corl-offline")
    with torch.no_grad():  # spread Q and the policy over states: the 1e-2 output layers make both almost constant
        critic.layers[-1].weight.normal_(0, 0.3)
        actor.net[-1].weight.normal_(0, 0.3)
    target = copy.deepcopy(critic)
    with torch.no_grad():  # a target that differs from the critics, so that mixing them up shows
        for p in target.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return cal.Agent(actor, critic, target, torch.tensor(math.log(0.3), requires_grad=True))


# rows 0 and 3 terminated (3 also truncated: a termination on the time limit's last step), rows 1 and 4 truncated
TERMINATED = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
TRUNCATED = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def make_batch(agent, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(TERMINATED)
    obs = torch.randn(b, OBS, generator=g)
    with torch.no_grad():  # returns around the policy's Q-values, so that the bound is active for some entries only
        q_pi = agent.critic(obs, agent.actor(obs, deterministic=True)[0]).mean(0)
    return {"observations": obs, "actions": torch.rand(b, ACT, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g), "next_observations": torch.randn(b, OBS, generator=g),
            "terminated": torch.tensor(TERMINATED), "truncated": torch.tensor(TRUNCATED),
            "mc_returns": (q_pi + 0.5 * torch.randn(b, generator=g)).unsqueeze(1)}  # [B, 1], as the buffer has it


def q(critic, i: int, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Q_i(s, a) of one state and one action, a 0-d tensor."""
    return critic(s.view(1, -1), a.reshape(1, -1))[i, 0]


def direct_losses(agent, batch, calibrated, cql_alpha, gamma, k, temp, lo, hi, n_max, backup_entropy, seed):
    """The three losses of one update, state by state, with the update's random draws: the same seed and order
    (actor at s; the target's action(s) at s'; K uniform actions; K policy actions at s; K at s'). Calibrated: the
    policy actions' Q-values (at s and from s', all scored at s) become max(Q, G(s)) before the log-density is
    subtracted; uniform actions and the data action are never bounded."""
    torch.manual_seed(seed)
    obs, act, nxt = batch["observations"], batch["actions"], batch["next_observations"]
    b = len(obs)
    new_action, log_pi = agent.actor(obs)
    alpha = agent.log_alpha.exp()
    alpha_loss = -sum(agent.log_alpha * (float(log_pi[s].detach()) - ACT) for s in range(b)) / b  # H_target = -|A|
    q_new = [torch.minimum(q(agent.critic, 0, obs[s], new_action[s]), q(agent.critic, 1, obs[s], new_action[s]))
             for s in range(b)]  # min(Q1, Q2) of the online critics
    actor_loss = sum(float(alpha.detach()) * log_pi[s] - q_new[s] for s in range(b)) / b
    with torch.no_grad():
        if n_max:
            next_action, next_log_pi = agent.actor(nxt.unsqueeze(1).expand(-1, n_max, -1))
        else:
            next_action, next_log_pi = (x.unsqueeze(1) for x in agent.actor(nxt))
        y = []
        for s in range(b):
            v = [min(float(q(agent.critic_target, 0, nxt[s], a)), float(q(agent.critic_target, 1, nxt[s], a)))
                 for a in next_action[s]]
            j = max(range(len(v)), key=v.__getitem__)
            soft = v[j] - (float(alpha.detach()) * float(next_log_pi[s, j]) if backup_entropy else 0.0)
            # only `terminated` stops bootstrapping: truncated rows keep gamma * V(s')
            y.append(float(batch["rewards"][s]) + gamma * (1.0 - float(batch["terminated"][s])) * soft)
    td_loss = sum(sum((q(agent.critic, i, obs[s], act[s]) - y[s]) ** 2 for s in range(b)) / b for i in (0, 1))
    critic_loss, diffs, per_state, bounded = td_loss, [], [], []
    with torch.no_grad():
        a_rand = torch.rand(b, k, ACT) * 2 - 1
        a_cur, log_pi_cur = agent.actor(obs.unsqueeze(1).expand(-1, k, -1))
        a_next, log_pi_next = agent.actor(nxt.unsqueeze(1).expand(-1, k, -1))
    for i in (0, 1):
        for s in range(b):  # every action is scored at s, each minus the log of the density it came from
            g_s = torch.tensor(float(batch["mc_returns"][s, 0]))
            q_pol = [q(agent.critic, i, obs[s], a_cur[s, j]) for j in range(k)] + [
                q(agent.critic, i, obs[s], a_next[s, j]) for j in range(k)]
            bounded += [float(v.detach()) < float(g_s) for v in q_pol]
            if calibrated:
                q_pol = [torch.maximum(v, g_s) for v in q_pol]
            lp_pol = [float(log_pi_cur[s, j]) for j in range(k)] + [float(log_pi_next[s, j]) for j in range(k)]
            xs = ([q(agent.critic, i, obs[s], a_rand[s, j]) - ACT * math.log(0.5) for j in range(k)]
                  + [v - lp for v, lp in zip(q_pol, lp_pol)])
            xs = torch.stack(xs) / temp
            m = xs.max().detach()
            ood = temp * (m + torch.log(torch.exp(xs - m).sum()))
            per_state.append(ood - q(agent.critic, i, obs[s], act[s]))
        diffs.append(sum(torch.clamp(d, lo, hi) for d in per_state[-b:]) / b)
    critic_loss = td_loss + cql_alpha * (diffs[0] + diffs[1])
    return {"alpha_loss": alpha_loss, "actor_loss": actor_loss, "critic_loss": critic_loss, "td_loss": td_loss,
            "diffs": diffs, "per_state": per_state, "bound_rate": sum(bounded) / len(bounded), "alpha": alpha,
            "log_pi": log_pi, "y": y}


CASES = {
    # test id: (Args overrides, phase)
    "offline": (dict(cql_alpha=2.0), "offline"),
    "offline-with_no_calibrate_online": (dict(cql_alpha=2.0, calibrate_online=False), "offline"),
    "offline-max_backup-entropy_backup-temp": (
        dict(cql_alpha=2.0, cql_max_target_backup=True, backup_entropy=True, cql_temp=0.7), "offline"),
    "online-calibrated": (dict(cql_alpha=2.0), "online"),
    "online-no_calibrate_online": (dict(cql_alpha=2.0, calibrate_online=False), "online"),
}


def check_update(overrides: dict, phase: str, clip_hi: float | None = None) -> None:
    args = cal.Args(cql_n_actions=3, policy_lr=1e-3, qf_lr=2e-3, tau=0.1, gamma=0.9, **overrides)
    if clip_hi is not None:
        args = dataclasses.replace(args, cql_clip_diff_min=-1e6, cql_clip_diff_max=clip_hi)
    agent = make_agent()
    batch, before = make_batch(agent), copy.deepcopy(agent)
    offline_update, online_update, optims = cal.make_update_fns(agent, args, ACT)
    update = offline_update if phase == "offline" else online_update
    calibrated = phase == "offline" or args.calibrate_online
    cql_alpha = args.cql_alpha
    torch.manual_seed(7)
    out = update(batch)
    ref = direct_losses(before, batch, calibrated, cql_alpha, args.gamma, args.cql_n_actions, args.cql_temp,
                        args.cql_clip_diff_min, args.cql_clip_diff_max,
                        args.cql_n_actions if args.cql_max_target_backup else 0, args.backup_entropy, seed=7)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss/alpha"], ref["alpha_loss"].detach(), **close,
                               msg="temperature loss: -mean(log_alpha (log pi + H_target)), H_target = -|A|")
    torch.testing.assert_close(out["alpha"], ref["alpha"].detach(), msg="alpha = exp(log_alpha) before the step")
    torch.testing.assert_close(out["entropy"], -ref["log_pi"].detach().mean(), **close)
    torch.testing.assert_close(out["loss/actor"], ref["actor_loss"].detach(), **close,
                               msg="actor loss: mean(alpha log pi - min(Q1, Q2)) of the online critics")
    torch.testing.assert_close(out["loss/td"], ref["td_loss"].detach(), **close,
                               msg="TD loss: sum over critics of MSE to r + gamma (1 - terminated) min Q'(s', a')")
    torch.testing.assert_close(out["loss/critic"], ref["critic_loss"].detach(), **close,
                               msg=f"critic loss: TD + alpha_cql * (penalty_1 + penalty_2), alpha_cql = {cql_alpha}, "
                                   f"policy entries {'bounded by' if calibrated else 'free of'} max(Q, G(s))")
    torch.testing.assert_close(out["loss/cql_diff"], (sum(ref["diffs"]) / 2).detach(), **close,
                               msg="penalty: mean over states of clip(T logsumexp(x / T) - Q(s, a_data))")
    assert 0.1 < ref["bound_rate"] < 0.9, "test batch: the bound should be active for some policy entries only"
    assert float(out["q/bound_rate"]) == pytest.approx(ref["bound_rate"]), "q/bound_rate: share of Q < G(s)"

    # Gradients: each optimiser gets exactly its own loss's gradient (the update's one backward leaves them in .grad)
    grads = {"actor": torch.autograd.grad(ref["actor_loss"], list(before.actor.parameters()), retain_graph=True),
             "critic": torch.autograd.grad(ref["critic_loss"], list(before.critic.parameters())),
             "log_alpha": torch.autograd.grad(ref["alpha_loss"], [before.log_alpha])}
    got = {"actor": [p.grad for p in agent.actor.parameters()], "critic": [p.grad for p in agent.critic.parameters()],
           "log_alpha": [agent.log_alpha.grad]}
    names = {"actor": [n for n, _ in agent.actor.named_parameters()],
             "critic": [n for n, _ in agent.critic.named_parameters()], "log_alpha": [""]}
    for part in grads:
        for name, g, want in zip(names[part], got[part], grads[part]):
            where = f"{part}.{name}".rstrip(".")
            assert g is not None, f"{where} received no gradient"
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6,
                                       msg=f"gradient of {where} differs from the gradient of its own loss alone")

    # One Adam step each (first step: lr * g / (|g| + eps)) with its own learning rate, then Polyak on the new critics
    lrs = {"actor": args.policy_lr, "critic": args.qf_lr, "log_alpha": args.policy_lr}
    params = {"actor": (list(before.actor.parameters()), list(agent.actor.parameters())),
              "critic": (list(before.critic.parameters()), list(agent.critic.parameters())),
              "log_alpha": ([before.log_alpha], [agent.log_alpha])}
    for part, (old, new) in params.items():
        for name, p0, p1 in zip(names[part], old, new):
            step = -lrs[part] * p1.grad / (p1.grad.abs() + 1e-8)
            torch.testing.assert_close(p1.detach() - p0.detach(), step, rtol=1e-3, atol=1e-8,
                                       msg=f"{part}.{name}".rstrip(".") + f": not one Adam step at lr {lrs[part]}")
    for (name, t0), t1, c1 in zip(before.critic_target.named_parameters(), agent.critic_target.parameters(),
                                  agent.critic.parameters()):
        torch.testing.assert_close(t1, t0 + args.tau * (c1 - t0), rtol=1e-5, atol=1e-7,
                                   msg=f"critic_target.{name}: not Polyak with tau toward the stepped critic")


@pytest.mark.parametrize("case", CASES)
def test_update_losses_and_gradients(case):
    check_update(*CASES[case])


def test_clipped_penalty_gradient():
    """An upper clip inside the states' differences: the clipped states give the critics no penalty gradient."""
    agent = make_agent()
    ref = direct_losses(agent, make_batch(agent), True, 2.0, 0.9, 3, 1.0, -math.inf, math.inf, 0, False, seed=7)
    diffs = sorted(float(d.detach()) for d in ref["per_state"])
    hi = (diffs[len(diffs) // 2 - 1] + diffs[len(diffs) // 2]) / 2  # half the (critic, state) pairs are clipped
    check_update(dict(cql_alpha=2.0), "offline", clip_hi=hi)


# ---------------------------------------------------------------- documented defaults
# Every method field of Args with its documented value and where design/cql_ft.md takes it from.
MUJOCO_DEFAULTS = {
    "batch_size": (256, "cal_ql.md Defaults: the cql_ft MuJoCo defaults (SO2 Table 5): batch 256"),
    "policy_lr": (3e-5, "cal_ql.md Defaults: policy_lr 3e-5"),
    "qf_lr": (3e-4, "cal_ql.md Defaults: qf_lr 3e-4"),
    "gamma": (0.99, "cal_ql.md Defaults: gamma 0.99 (also the Monte-Carlo returns' discount)"),
    "tau": (5e-3, "cal_ql.md section 7: Polyak 5e-3 every step"),
    "q_n_hidden_layers": (3, "cal_ql.md Defaults: 3 x 256"),
    "init": ("corl-offline", "cql_ft.md Defaults: orthogonal init with small-gain output layer as in CORL offline"),
    "normalize_states": (True, "cql_ft.md Defaults: state normalisation on (MuJoCo)"),
    "normalize_reward": (False, "cql_ft.md Defaults: reward normalisation off except hopper-medium"),
    "backup_entropy": (False, "cal_ql.md section 6: backup_entropy False"),
    "cql_alpha": (10.0, "cal_ql.md Defaults: alpha 10, offline and online"),
    "cql_n_actions": (10, "cal_ql.md section 6: n_actions 10"),
    "cql_temp": (1.0, "cal_ql.md section 6: temp 1.0"),
    "cql_max_target_backup": (False, "cql_ft.md Defaults: max-backup False on MuJoCo"),
    "cql_clip_diff_min": (-math.inf, "cql_ft.md: CORL offline MuJoCo yamls -inf"),
    "cql_clip_diff_max": (math.inf, "cql_ft.md: CORL offline MuJoCo yamls inf"),
    "calibrate_online": (True, "cal_ql.md Defaults: calibration online on (Cal-QL code)"),
    "mixing_ratio": (0.5, "cal_ql.md Defaults: --mixing-ratio 0.5 (both codes)"),
    "offline_steps": (1_000_000, "cal_ql.md Defaults: 1M offline updates"),
    "online_steps": (100_000, "design/README.md protocol: 100k online env steps on MuJoCo"),
    "eval_every": (1_000, "protocol: evaluate every 1,000 online env steps"),
    "offline_eval_every": (10_000, "protocol: every 10,000 gradient steps offline"),
    "eval_episodes": (10, "protocol: 10 deterministic episodes"),
}
ADROIT_DEFAULTS = {
    "cql_alpha": (1.0, "CORL finetune/cal_ql adroit cloned_v1.yaml: cql_alpha 1.0"),
    "policy_lr": (1e-4, "CORL cal_ql adroit yaml: policy_lr 1e-4"),
    "cql_max_target_backup": (True, "CORL cal_ql adroit yaml: max-backup True"),
    "cql_clip_diff_min": (-200.0, "CORL cal_ql adroit yaml: clip_diff_min -200"),
    "normalize_states": (False, "CORL cal_ql adroit yaml: no state normalisation"),
    "init": ("corl-finetune", "CORL finetune file: orthogonal sqrt 2 on every layer"),
    "online_steps": (400_000, "protocol: 400k online env steps on Adroit"),
}
HOPPER_MEDIUM = {"normalize_reward": (True, "as cql_ft: CORL configs/offline/cql/hopper/medium_v2.yaml")}


def test_args_defaults_are_the_documented_ones():
    args = cal.Args()
    method_fields = [f.name for f in dataclasses.fields(cal.Args)]
    method_fields = method_fields[method_fields.index("batch_size"):]
    missing = [f for f in method_fields if f not in MUJOCO_DEFAULTS]
    assert not missing, f"Args fields without a documented default in this test: {missing}"
    for name, (value, source) in MUJOCO_DEFAULTS.items():
        got = getattr(args, name)
        assert got == value and type(got) is type(value), f"Args.{name} = {got!r}, documented {value!r} ({source})"


@pytest.mark.parametrize("env_id", cal.TASK_IDS)
def test_per_dataset_defaults(env_id):
    expected = {k: v for k, v in MUJOCO_DEFAULTS.items()}
    if env_id.split("-")[0] in cal.ADROIT_FAMILIES:
        expected.update(ADROIT_DEFAULTS)
    if env_id == "hopper-medium":
        expected.update(HOPPER_MEDIUM)
    args = cal.parse_args(["--env-id", env_id])
    for name, (value, source) in expected.items():
        got = getattr(args, name)
        assert got == value, f"{env_id}: {name} = {got!r}, documented {value!r} ({source})"
