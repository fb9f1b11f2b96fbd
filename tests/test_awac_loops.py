"""awac.py's loops on a marked environment and a marked dataset, with a recording update: how many rows each batch
has and where they come from (one buffer: the dataset plus the online rows, uniformly), the warm-up, what an online
transition stores (terminated and truncated kept apart, the raw reward, the final observation of a truncated
episode), and exploration with policy samples."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import load_algo

awac = load_algo("awac")
OBS, ACT, N_DATA = 3, 2, 40


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MarkedEnv(gym.Env):
    """obs[0] = 1000 + the number of steps taken so far; reward = 0.25 * that number; 5-step episodes that end
    terminated and truncated in turn."""
    observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (ACT,), np.float32)

    def __init__(self):
        self.steps, self.episodes, self.log = 0, 0, []

    def _obs(self):
        return np.array([1000.0 + self.steps, self.episodes, 0.5], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        obs = self._obs()
        self.steps += 1
        self.t += 1
        end = self.t == 5
        terminated, truncated = end and self.episodes % 2 == 0, end and self.episodes % 2 == 1
        if end:
            self.episodes += 1
        next_obs = self._obs()
        self.log.append(dict(obs=obs, action=np.array(action), reward=0.25 * self.steps, next_obs=next_obs,
                             terminated=terminated, truncated=truncated))
        return next_obs, 0.25 * self.steps, terminated, truncated, {}


def marked_data():
    """Dataset rows have obs[0] = -1 - i."""
    obs = np.zeros((N_DATA, OBS), np.float32)
    obs[:, 0] = -1.0 - np.arange(N_DATA)
    return {"observations": obs, "actions": np.zeros((N_DATA, ACT), np.float32),
            "rewards": np.ones((N_DATA, 1), np.float32), "next_observations": obs + 0.5,
            "terminated": np.zeros((N_DATA, 1), np.float32), "truncated": np.zeros((N_DATA, 1), np.float32)}


def check_rows(got, expected, msg, **tol):
    """np.testing's comparison with `msg` as the first line of the failure (pytest's one-line summary shows it)."""
    try:
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64), **tol)
    except AssertionError as e:
        raise AssertionError(f"{msg}\n{e}") from None


EVAL = {"return_mean": 0.0, "return_std": 0.0, "normalized_score": 0.0, "q_normalized_difference": 0.0,
        "q_kendall_tau": 0.0, "q_scored_steps": 0, "wall_time": 0.0}


def setup(tmp_path, **kw):
    a = awac.Args(**{**dict(online_steps=60, warmup_steps=10, batch_size=24, offline_batch_size=7, offline_steps=6,
                            eval_every=1000, offline_eval_every=1000, checkpoint_every=1000, log_every=1000, seed=3),
                     **kw})
    torch.manual_seed(0)
    agent = awac.make_agent(a, OBS, ACT, (torch.zeros(OBS), torch.ones(OBS)), torch.device("cpu"))
    buffer = awac.make_buffer(a, marked_data(), torch.device("cpu"))
    _, optims = awac.make_update(agent, a)
    env = MarkedEnv()
    calls = []

    def update(batch):
        calls.append({"obs0": batch["observations"][:, 0].clone(), "n_stored": buffer.n_added,
                      "rows": {k: v.clone() for k, v in batch.items()}})
        return {"loss/none": torch.zeros(())}

    ctx = {"run_dir": tmp_path, "env": env, "evaluate": lambda: dict(EVAL), "offline_grad_steps": 0,
           "dataset_info": {}}
    return a, agent, buffer, update, optims, ctx, awac.Logger(tmp_path), env, calls


def test_offline_batches_come_from_the_dataset_at_the_offline_size(tmp_path):
    a, agent, buffer, update, optims, ctx, logger, _, calls = setup(tmp_path)
    awac.train_offline(a, agent, buffer, update, optims, ctx, logger, 0)
    logger.close()
    assert len(calls) == a.offline_steps, "one update per offline step"
    for c in calls:
        assert len(c["obs0"]) == a.offline_batch_size, "offline batches have --offline-batch-size rows"
        assert (c["obs0"] < 0).all(), "offline batches come from the dataset"
    assert (tmp_path / "offline.pt").is_file()


def test_online_batches_warmup_and_provenance(tmp_path):
    a, agent, buffer, update, optims, ctx, logger, env, calls = setup(tmp_path)
    awac.train_online(a, agent, buffer, update, optims, ctx, logger, None)
    logger.close()
    assert len(calls) == a.online_steps - a.warmup_steps, \
        f"{len(calls)} updates: expected one per env step after the {a.warmup_steps}-step warm-up"
    assert calls[0]["n_stored"] == a.warmup_steps + 1, "the first update follows env step warm-up + 1"
    online_rows, expected, var = 0, 0.0, 0.0
    for c in calls:
        assert len(c["obs0"]) == a.batch_size, f"online batches have --batch-size ({a.batch_size}) rows"
        obs0 = c["obs0"]
        online = obs0 >= 1000
        assert ((obs0 < 0) | online).all()
        assert (obs0[online] < 1000 + c["n_stored"]).all(), "only rows already stored are sampled"
        online_rows += int(online.sum())
        p = c["n_stored"] / (N_DATA + c["n_stored"])  # uniform over the dataset and the online rows
        expected, var = expected + a.batch_size * p, var + a.batch_size * p * (1 - p)
    assert abs(online_rows - expected) < 5 * var ** 0.5, \
        f"{online_rows} online rows sampled, {expected:.0f} expected from one uniform buffer of dataset + online rows"
    assert online_rows < sum(len(c["obs0"]) for c in calls), "the dataset stays in the online batches"


def test_online_transitions_are_stored_as_the_env_gave_them(tmp_path):
    a, agent, buffer, update, optims, ctx, logger, env, calls = setup(tmp_path)
    torch.manual_seed(11)
    awac.train_online(a, agent, buffer, update, optims, ctx, logger, None)
    logger.close()
    stored = buffer.added()
    assert len(stored["rewards"]) == a.online_steps == len(env.log)
    log = env.log
    check_rows(stored["observations"], [s["obs"] for s in log], "stored observations")
    check_rows(stored["next_observations"], [s["next_obs"] for s in log],
               "stored next_obs: the last step of an episode keeps its final observation")
    check_rows(stored["rewards"], [s["reward"] for s in log], "stored rewards: the raw env rewards", rtol=1e-6)
    check_rows(stored["terminated"], [s["terminated"] for s in log], "stored terminated flags as the env gave them")
    check_rows(stored["truncated"], [s["truncated"] for s in log],
               "stored truncated flags as the env gave them (a time-out is no terminal)")
    assert stored["terminated"].sum() > 0 and stored["truncated"].sum() > 0
    check_rows(stored["actions"], [s["action"] for s in log], "stored actions: the ones sent to the env")
    # exploration: a ~ pi(.|s) (one torch draw per step, nothing else draws with a recording update), clipped
    torch.manual_seed(11)
    with torch.no_grad():
        for s in log:
            mean, log_std = agent.actor(torch.as_tensor(s["obs"]).unsqueeze(0))
            sampled = (mean + log_std.exp() * torch.randn(1, ACT)).clamp(-1, 1)[0].numpy()
            check_rows(s["action"], sampled, "online actions are policy samples, not the mean", rtol=1e-5, atol=1e-6)
