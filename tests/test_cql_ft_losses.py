"""algorithms/cql_ft.py, one update at a time against the losses written out plainly from design/cql_ft.md section 3:
the value of every loss and the gradient each optimiser receives, offline and online (original with its own weight,
loose), with max-backup, entropy backup, a clipped penalty and a logsumexp temperature; batches hold terminated,
truncated and both-flagged rows. Then the Adam steps (learning rate per optimiser) and Polyak, and the documented
defaults (Args and the per-dataset table), each pinned to its source."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from conftest import load_algo

cql = load_algo("cql_ft")
torch.set_num_threads(1)  # the tiny networks are slower with threads on a shared machine

OBS, ACT = 4, 2


def make_agent(seed: int = 0):
    torch.manual_seed(seed)
    mean, std = torch.randn(OBS) * 0.1, torch.rand(OBS) + 0.5
    actor = cql.Actor(OBS, ACT, mean, std, hidden=32)
    critic = cql.Critic(OBS, ACT, 2, mean, std)
    cql.init_weights(actor, critic, "corl-offline")
    with torch.no_grad():  # spread Q and the policy over states: the 1e-2 output layers make both almost constant
        critic.layers[-1].weight.normal_(0, 0.3)
        actor.net[-1].weight.normal_(0, 0.3)
    target = copy.deepcopy(critic)
    with torch.no_grad():  # a target that differs from the critics, so that mixing them up shows
        for p in target.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return cql.Agent(actor, critic, target, torch.tensor(math.log(0.3), requires_grad=True))


# rows 0 and 3 terminated (3 also truncated: a termination on the time limit's last step), rows 1 and 4 truncated
TERMINATED = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
TRUNCATED = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(TERMINATED)
    return {"observations": torch.randn(b, OBS, generator=g), "actions": torch.rand(b, ACT, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g), "next_observations": torch.randn(b, OBS, generator=g),
            "terminated": torch.tensor(TERMINATED), "truncated": torch.tensor(TRUNCATED)}


def q(critic, i: int, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Q_i(s, a) of one state and one action, a 0-d tensor."""
    return critic(s.view(1, -1), a.reshape(1, -1))[i, 0]


def direct_losses(agent, batch, cql_alpha, gamma, k, temp, lo, hi, n_max, backup_entropy, seed):
    """The three losses of one update, state by state, with the update's random draws: the same seed and order
    (actor at s; the target's action(s) at s'; K uniform actions; K policy actions at s; K at s')."""
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
    critic_loss, diffs, per_state = td_loss, None, []
    with torch.no_grad():
        a_rand = torch.rand(b, k, ACT) * 2 - 1
        a_cur, log_pi_cur = agent.actor(obs.unsqueeze(1).expand(-1, k, -1))
        a_next, log_pi_next = agent.actor(nxt.unsqueeze(1).expand(-1, k, -1))
    if cql_alpha is not None:
        diffs = []
        for i in (0, 1):
            for s in range(b):  # every action is scored at s, each minus the log of the density it came from
                xs = ([q(agent.critic, i, obs[s], a_rand[s, j]) - ACT * math.log(0.5) for j in range(k)]
                      + [q(agent.critic, i, obs[s], a_cur[s, j]) - float(log_pi_cur[s, j]) for j in range(k)]
                      + [q(agent.critic, i, obs[s], a_next[s, j]) - float(log_pi_next[s, j]) for j in range(k)])
                xs = torch.stack(xs) / temp
                m = xs.max().detach()
                ood = temp * (m + torch.log(torch.exp(xs - m).sum()))
                per_state.append(ood - q(agent.critic, i, obs[s], act[s]))
            diffs.append(sum(torch.clamp(d, lo, hi) for d in per_state[-b:]) / b)
        critic_loss = td_loss + cql_alpha * (diffs[0] + diffs[1])
    return {"alpha_loss": alpha_loss, "actor_loss": actor_loss, "critic_loss": critic_loss, "td_loss": td_loss,
            "diffs": diffs, "per_state": per_state, "alpha": alpha, "log_pi": log_pi, "y": y}


CASES = {
    # test id: (Args overrides, phase)
    "offline-in_loose_mode": (dict(cql_alpha=2.0, online_mode="loose"), "offline"),
    "offline-max_backup-entropy_backup-temp": (
        dict(cql_alpha=2.0, cql_max_target_backup=True, backup_entropy=True, cql_temp=0.7), "offline"),
    "online-original-own_alpha": (dict(cql_alpha=2.0, cql_alpha_online=0.5), "online"),
    "online-original-offline_alpha": (dict(cql_alpha=2.0), "online"),
    "online-loose": (dict(cql_alpha=2.0, cql_alpha_online=0.5, online_mode="loose"), "online"),
}


def check_update(overrides: dict, phase: str, clip_hi: float | None = None) -> None:
    args = cql.Args(cql_n_actions=3, policy_lr=1e-3, qf_lr=2e-3, tau=0.1, gamma=0.9, **overrides)
    if clip_hi is not None:
        args = dataclasses.replace(args, cql_clip_diff_min=-1e6, cql_clip_diff_max=clip_hi)
    agent, batch = make_agent(), make_batch()
    before = copy.deepcopy(agent)
    offline_update, online_update, optims = cql.make_update_fns(agent, args, ACT)
    update = offline_update if phase == "offline" else online_update
    if phase == "offline":
        cql_alpha = args.cql_alpha
    elif args.online_mode == "loose":
        cql_alpha = None
    else:
        cql_alpha = args.cql_alpha if args.cql_alpha_online is None else args.cql_alpha_online
    torch.manual_seed(7)
    out = update(batch)
    ref = direct_losses(before, batch, cql_alpha, args.gamma, args.cql_n_actions, args.cql_temp,
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
                               msg=f"critic loss: TD + alpha_cql * (penalty_1 + penalty_2), alpha_cql = {cql_alpha}")
    if cql_alpha is None:
        assert "loss/cql_diff" not in out, "the loose variant has no penalty online"
    else:
        torch.testing.assert_close(out["loss/cql_diff"], (sum(ref["diffs"]) / 2).detach(), **close,
                                   msg="penalty: mean over states of clip(T logsumexp(x / T) - Q(s, a_data))")

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
    ref = direct_losses(make_agent(), make_batch(), 2.0, 0.9, 3, 1.0, -math.inf, math.inf, 0, False, seed=7)
    diffs = sorted(float(d.detach()) for d in ref["per_state"])
    hi = (diffs[len(diffs) // 2 - 1] + diffs[len(diffs) // 2]) / 2  # half the (critic, state) pairs are clipped
    check_update(dict(cql_alpha=2.0), "offline", clip_hi=hi)


def test_penalty_actions_are_detached_and_scored_at_s():
    """Moving s' (not s) changes the penalty only through the policy's actions at s', which are scored at s."""
    agent, batch = make_agent(), make_batch()
    torch.manual_seed(3)
    actions, lp_cur, lp_next = cql.penalty_actions(agent.actor, batch["observations"], batch["next_observations"], 3,
                                                   ACT)
    assert actions.shape == (6, 9, ACT) and not actions.requires_grad and not lp_cur.requires_grad
    assert (actions[:, :3].abs() <= 1).all()
    q_all = cql.q_of_samples(agent.critic, batch["observations"], actions)
    for s in range(2):
        for j in range(9):
            torch.testing.assert_close(q_all[:, s, j], agent.critic(batch["observations"][s:s + 1],
                                                                    actions[s, j:j + 1])[:, 0])


# ---------------------------------------------------------------- documented defaults
# Every method field of Args with its documented value and where design/cql_ft.md takes it from.
MUJOCO_DEFAULTS = {
    "batch_size": (256, "SO2 Table 5 / CORL offline MuJoCo yamls: batch 256"),
    "policy_lr": (3e-5, "SO2 Table 5: actor lr 3e-5"),
    "qf_lr": (3e-4, "SO2 Table 5: critic lr 3e-4"),
    "gamma": (0.99, "SO2 Table 5: discount 0.99"),
    "tau": (5e-3, "SO2 Table 5: target update rate 5e-3"),
    "q_n_hidden_layers": (3, "SO2 Table 5: critic 3 hidden layers x 256"),
    "init": ("corl-offline", "cql_ft.md Defaults: orthogonal init with small-gain output layer as in CORL offline"),
    "normalize_states": (True, "CORL offline MuJoCo yamls: normalize True"),
    "normalize_reward": (False, "CORL offline MuJoCo yamls: False except hopper-medium"),
    "backup_entropy": (False, "SO2 Table 5: entropy in Q target False"),
    "cql_alpha": (10.0, "SO2 Table 5: min Q weight 10"),
    "cql_alpha_online": (None, "original variant keeps the offline weight (cql_alpha_online = cql_alpha)"),
    "cql_n_actions": (10, "SO2 Table 5: number of sampled actions 10"),
    "cql_temp": (1.0, "CORL: cql_temp 1.0"),
    "cql_max_target_backup": (False, "CORL offline MuJoCo yamls: max-backup False"),
    "cql_clip_diff_min": (-math.inf, "CORL offline MuJoCo yamls: -inf"),
    "cql_clip_diff_max": (math.inf, "CORL offline MuJoCo yamls: inf"),
    "online_mode": ("original", "cql_ft.md Defaults: --online-mode original"),
    "buffer_mode": ("single", "cql_ft.md Defaults: --buffer-mode single (CORL)"),
    "mixing_ratio": (0.5, "cql_ft.md Defaults: --buffer-mode mixed --mixing-ratio 0.5 gives CalQL's batches"),
    "offline_steps": (1_000_000, "cql_ft.md Defaults: 1M offline updates"),
    "online_steps": (100_000, "design/README.md protocol: 100k online env steps on MuJoCo"),
    "eval_every": (1_000, "protocol: evaluate every 1,000 online env steps"),
    "offline_eval_every": (10_000, "protocol: every 10,000 gradient steps offline"),
    "eval_episodes": (10, "protocol: 10 deterministic episodes"),
}
ADROIT_DEFAULTS = {
    "cql_alpha": (1.0, "CORL finetune/cql adroit cloned_v1.yaml: cql_alpha 1.0"),
    "policy_lr": (1e-4, "CORL adroit yaml: policy_lr 1e-4"),
    "cql_max_target_backup": (True, "CORL adroit yaml: max-backup True"),
    "cql_clip_diff_min": (-200.0, "CORL adroit yaml: clip_diff_min -200"),
    "normalize_states": (False, "CORL adroit yaml: normalize False"),
    "init": ("corl-finetune", "CORL finetune file: orthogonal sqrt 2 on every layer"),
    "online_steps": (400_000, "protocol: 400k online env steps on Adroit"),
}
HOPPER_MEDIUM = {"normalize_reward": (True, "CORL configs/offline/cql/hopper/medium_v2.yaml: normalize_reward True")}


def test_args_defaults_are_the_documented_ones():
    args = cql.Args()
    method_fields = [f.name for f in dataclasses.fields(cql.Args)]
    method_fields = method_fields[method_fields.index("batch_size"):]
    missing = [f for f in method_fields if f not in MUJOCO_DEFAULTS]
    assert not missing, f"Args fields without a documented default in this test: {missing}"
    for name, (value, source) in MUJOCO_DEFAULTS.items():
        got = getattr(args, name)
        assert got == value and type(got) is type(value), f"Args.{name} = {got!r}, documented {value!r} ({source})"


@pytest.mark.parametrize("env_id", cql.TASK_IDS)
def test_per_dataset_defaults(env_id):
    expected = {k: v for k, v in MUJOCO_DEFAULTS.items()}
    if env_id.split("-")[0] in cql.ADROIT_FAMILIES:
        expected.update(ADROIT_DEFAULTS)
    if env_id == "hopper-medium":
        expected.update(HOPPER_MEDIUM)
    args = cql.parse_args(["--env-id", env_id])
    for name, (value, source) in expected.items():
        got = getattr(args, name)
        assert got == value, f"{env_id}: {name} = {got!r}, documented {value!r} ({source})"
