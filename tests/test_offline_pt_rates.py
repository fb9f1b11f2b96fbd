"""A fine-tuning run started from an offline.pt keeps the pretraining run's Adam states but takes its own learning
rates: an optimiser's state_dict carries the rate it was saved with, which would silently override the run's flags.
Here the fine-tuning run sets the critic's rate to 0, so the critics must leave the online phase exactly as
pretrained while the run still makes online updates."""

from __future__ import annotations

import pytest
import torch

from conftest import load_algo, write_hopper_d4rl

# file -> (its critic learning-rate field, the fields that keep the run tiny)
FILES = {
    "awac": ("critic_lr", dict(batch_size=16, offline_batch_size=16, warmup_steps=10)),
    "cal_ql": ("qf_lr", dict(batch_size=16, cql_n_actions=2)),
    "cql_ft": ("qf_lr", dict(batch_size=16, cql_n_actions=2)),
    "edac": ("critic_lr", dict(batch_size=16, n_critics=2)),
    "td3bc_ft": ("critic_lr", dict(batch_size=16)),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    return write_hopper_d4rl(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5", 400, 100)


@pytest.mark.parametrize("name", sorted(FILES))
def test_fine_tuning_takes_its_own_critic_rate(name, tmp_path, hopper_file):
    algo = load_algo(name)
    field, tiny = FILES[name]
    base = dict(env_id="hopper-medium", dataset=str(hopper_file), device="cpu", hidden_dim=16, offline_steps=20,
                offline_eval_every=20, eval_every=40, eval_episodes=1, q_diag_extend_steps=5, checkpoint_every=1000,
                log_every=20, **tiny)
    first = algo.main(algo.Args(**base, online_steps=0, output_dir=str(tmp_path / "a")))
    run_dir = algo.main(algo.Args(**base, online_steps=40, output_dir=str(tmp_path / "b"),
                                  offline_checkpoint=str(first / "offline.pt"), **{field: 0.0}))
    offline = torch.load(first / "offline.pt", weights_only=False)
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    for k, v in offline["agent"]["critic"].items():
        assert torch.equal(final["agent"]["critic"][k], v), f"{name}: critic {k} moved at {field} 0"
    assert any(not torch.equal(final["agent"]["actor"][k], v) for k, v in offline["agent"]["actor"].items()), \
        f"{name}: no online update reached the actor, so the test shows nothing"
