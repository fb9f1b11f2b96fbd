"""iql_ft.py's loops on a marked environment and a marked dataset, with a recording update: batch sizes and where the
rows come from (one buffer: the dataset plus the online rows, uniformly), one update per env step from the first,
the actor's learning-rate schedule in each phase, what an online transition stores (the scaled reward, terminated and
truncated kept apart), and exploration (Gaussian samples without dropout; CORL's clipped noise on a deterministic
actor)."""

import numpy as np
import pytest
import torch
from conftest import load_algo
from test_awac_loops import ACT, EVAL, N_DATA, OBS, MarkedEnv, check_rows, marked_data

iql = load_algo("iql_ft")
SCALE = 2.5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(tmp_path, **kw):
    a = iql.Args(**{**dict(online_steps=50, batch_size=24, offline_steps=6, eval_every=1000, actor_dropout=0.5,
                           offline_eval_every=1000, checkpoint_every=1000, log_every=1000, seed=3), **kw})
    torch.manual_seed(0)
    agent = iql.make_agent(a, OBS, ACT, (torch.zeros(OBS), torch.ones(OBS)), torch.device("cpu"))
    buffer = iql.make_buffer(a, marked_data(), torch.device("cpu"))
    _, optims = iql.make_update(agent, a)
    env = MarkedEnv()
    calls = []

    def update(batch):
        calls.append({"obs0": batch["observations"][:, 0].clone(), "n_stored": buffer.n_added})
        return {"loss/none": torch.zeros(())}

    ctx = {"run_dir": tmp_path, "env": env, "evaluate": lambda: dict(EVAL), "offline_grad_steps": 0,
           "dataset_info": {}, "reward_fn": lambda r: r * SCALE}
    return a, agent, buffer, update, optims, ctx, iql.Logger(tmp_path), env, calls


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_offline_batches_and_cosine_schedule(tmp_path):
    a, agent, buffer, update, optims, ctx, logger, _, calls = setup(tmp_path)
    iql.train_offline(a, agent, buffer, update, optims, ctx, logger, 0)
    logger.close()
    assert len(calls) == a.offline_steps
    assert all(len(c["obs0"]) == a.batch_size and (c["obs0"] < 0).all() for c in calls), \
        "offline batches: --batch-size rows of the dataset"
    assert optims["actor_schedule"].last_epoch == a.offline_steps, "the cosine steps once per offline update"
    assert float(optims["actor_optim"].param_groups[0]["lr"]) < 1e-12, \
        "the cosine reaches 0 after --offline-steps updates (T_max = offline_steps)"


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("schedule", ["iql", "corl"])
def test_online_batches_provenance_and_schedule(tmp_path, schedule):
    a, agent, buffer, update, optims, ctx, logger, env, calls = setup(tmp_path, lr_schedule=schedule)
    iql.switch_to_online(a, optims)
    lr0, epoch0 = float(optims["actor_optim"].param_groups[0]["lr"]), optims["actor_schedule"].last_epoch
    iql.train_online(a, agent, buffer, update, optims, ctx, logger, None)
    logger.close()
    assert len(calls) == a.online_steps, "one update per env step, from the first (no warm-up)"
    assert [c["n_stored"] for c in calls] == list(range(1, a.online_steps + 1)), \
        "update k samples after the k-th online transition is stored"
    online_rows, expected, var = 0, 0.0, 0.0
    for c in calls:
        assert len(c["obs0"]) == a.batch_size, f"online batches have --batch-size ({a.batch_size}) rows"
        online = c["obs0"] >= 1000
        assert ((c["obs0"] < 0) | online).all() and (c["obs0"][online] < 1000 + c["n_stored"]).all()
        online_rows += int(online.sum())
        p = c["n_stored"] / (N_DATA + c["n_stored"])
        expected, var = expected + a.batch_size * p, var + a.batch_size * p * (1 - p)
    assert abs(online_rows - expected) < 5 * var ** 0.5, \
        f"{online_rows} online rows sampled, {expected:.0f} expected from one uniform buffer of dataset + online rows"
    lr, epoch = float(optims["actor_optim"].param_groups[0]["lr"]), optims["actor_schedule"].last_epoch
    if schedule == "iql":
        assert (lr, epoch) == (lr0, epoch0), "--lr-schedule iql: constant actor LR online, the cosine is not stepped"
    else:
        assert epoch == epoch0 + a.online_steps, "--lr-schedule corl: the cosine steps once per online update"


@pytest.mark.parametrize("actor_type", ["gaussian", "deterministic"])
def test_online_transitions_and_exploration(tmp_path, actor_type):
    a, agent, buffer, update, optims, ctx, logger, env, calls = setup(tmp_path, actor_type=actor_type,
                                                                      expl_noise=0.4)
    torch.manual_seed(11)
    iql.train_online(a, agent, buffer, update, optims, ctx, logger, None)
    logger.close()
    stored, log = buffer.added(), env.log
    assert len(stored["rewards"]) == a.online_steps == len(log)
    check_rows(stored["observations"], [s["obs"] for s in log], "stored observations")
    check_rows(stored["next_observations"], [s["next_obs"] for s in log],
               "stored next_obs: the last step of an episode keeps its final observation")
    check_rows(stored["rewards"], [SCALE * s["reward"] for s in log],
               "stored rewards: online rewards get the dataset's reward transform", rtol=1e-6)
    check_rows(stored["terminated"], [s["terminated"] for s in log], "stored terminated flags as the env gave them")
    check_rows(stored["truncated"], [s["truncated"] for s in log],
               "stored truncated flags as the env gave them (a time-out is no terminal)")
    assert stored["terminated"].sum() > 0 and stored["truncated"].sum() > 0
    check_rows(stored["actions"], [s["action"] for s in log], "stored actions: the ones sent to the env")
    torch.manual_seed(11)  # the only draws: the exploration noise, one per step
    clipped = False
    with torch.no_grad():
        for s in log:
            mean, log_std = agent.actor(torch.as_tensor(s["obs"]).unsqueeze(0))  # no dropout when acting
            if actor_type == "gaussian":
                expected = (mean + log_std.exp() * torch.randn(1, ACT)).clamp(-1, 1)[0].numpy()
                msg = "online actions are samples of the Gaussian policy, dropout off"
            else:
                raw = torch.randn(ACT) * a.expl_noise
                clipped |= bool((raw.abs() > 0.5).any())
                expected = np.clip(mean[0].numpy() + raw.clamp(-0.5, 0.5).numpy(), -1, 1)
                msg = "deterministic actor: mean + N(0, expl_noise^2) noise clipped to +-0.5 (CORL)"
            check_rows(s["action"], expected, msg, rtol=1e-5, atol=1e-6)
    assert actor_type == "gaussian" or clipped, "test setup: the noise clip never binds"
