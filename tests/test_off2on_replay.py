"""algorithms/off2on.py's balanced replay: the sum-tree's batch updates (every level against plain sums), its draws
(stratified segments, frequencies over many draws, empty leaves never drawn, rounding at the top end), the running
max priority, and the balanced buffer built from a dataset (priority 1), online rows written at the running max, the
initial online fraction f, ring wrap-around and an exact state round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import load_algo

o2o = load_algo("off2on")
torch.set_num_threads(1)  # the tiny tensors are slower with threads on a shared machine
CPU = torch.device("cpu")


def check_levels(tree, leaves: np.ndarray) -> None:
    """Every level of the tree equals the plain pairwise sums of the level below, starting from `leaves`."""
    level = np.asarray(leaves, dtype=np.float64)
    for depth in range(len(tree.levels) - 1, -1, -1):
        np.testing.assert_allclose(tree.levels[depth].numpy(), level, rtol=1e-12, atol=0,
                                   err_msg=f"sum-tree level {depth} is not the sum of its children")
        level = level[0::2] + level[1::2]


def test_capacity_must_be_a_power_of_two():
    with pytest.raises(o2o.RunError, match="power-of-2"):
        o2o.SumTree(12, CPU)


def test_batch_update_sets_leaves_and_every_ancestor():
    tree = o2o.SumTree(16, CPU)
    leaves = np.zeros(16)
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.integers(0, 13, 6)
        idx = np.concatenate([idx, idx[:2]])  # a transition drawn twice in one batch carries one priority
        values = rng.uniform(0.01, 5.0, 6)
        values = np.concatenate([values, values[:2]])
        tree.update(torch.as_tensor(idx), torch.as_tensor(values, dtype=torch.float32))
        leaves[idx] = values.astype(np.float32)
        check_levels(tree, leaves)
        assert float(tree.total()) == pytest.approx(leaves.sum(), rel=1e-12)


def test_running_max_never_decreases():
    tree = o2o.SumTree(8, CPU)
    assert float(tree.max) == 1.0
    tree.update(torch.tensor([0, 1]), torch.tensor([0.5, 0.2]))
    assert float(tree.max) == 1.0, "smaller priorities must not lower the running max"
    tree.update(torch.tensor([2]), torch.tensor([7.0]))
    assert float(tree.max) == 7.0
    tree.update(torch.tensor([2]), torch.tensor([0.1]))
    assert float(tree.max) == 7.0, "overwriting the largest leaf must not lower the running max"


def fill(tree, priorities: np.ndarray) -> None:
    tree.update(torch.arange(len(priorities)), torch.as_tensor(priorities))


PRIORITIES = np.array([0.001, 3.0, 0.5, 0.0, 10.0, 1.0, 1000.0, 2.0, 0.02, 4.0, 0.0, 6.0, 7.5])  # 3 and 10 empty


def test_stratified_draws_cover_their_segments():
    """Draw j of a batch of n lies in the j-th of n equal segments of [0, total]: the drawn leaf's prefix-sum interval
    meets that segment, and every leaf's count is within 1 of n p_i / total (the variance a stratified draw removes)."""
    tree = o2o.SumTree(16, CPU)
    fill(tree, PRIORITIES)
    gen = torch.Generator().manual_seed(0)
    cum = np.concatenate([[0.0], np.cumsum(PRIORITIES)])
    total = cum[-1]
    for n in (7, 64, 4096):
        idx = tree.sample(n, gen).numpy()
        lo, hi = np.arange(n) * total / n, (np.arange(n) + 1) * total / n
        assert np.all(cum[idx] <= hi + 1e-9) and np.all(cum[idx + 1] >= lo - 1e-9), \
            f"batch of {n}: a draw left its segment (not stratified)"
        counts = np.bincount(idx, minlength=16)
        np.testing.assert_array_less(np.abs(counts[:13] - n * PRIORITIES / total), 2.0 + 1e-9,
                                     err_msg=f"batch of {n}: counts far from n p / total")
        assert counts[[3, 10, 13, 14, 15]].sum() == 0, "a leaf of priority 0 was drawn"


def test_draw_frequencies_chi_square():
    """Single draws (n = 1, no stratification) over many batches: frequencies p_i / total (chi-square, 11 dof)."""
    tree = o2o.SumTree(16, CPU)
    p = np.array([1.0, 3.0, 0.5, 0.0, 10.0, 1.0, 2.0, 2.0, 0.25, 4.0, 0.0, 6.0, 7.5])
    fill(tree, p)
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(40_000, dtype=torch.float64, generator=gen) * tree.total()
    counts = np.bincount(tree.find(u).numpy(), minlength=16)
    assert counts[[3, 10, 13, 14, 15]].sum() == 0, "a leaf of priority 0 was drawn"
    expected = 40_000 * p / p.sum()
    keep = p > 0
    chi2 = (((counts[:13] - expected) ** 2)[keep] / expected[keep]).sum()
    assert chi2 < 31.3, f"chi-square {chi2:.1f} with 11 dof (p < 0.001): draws are not proportional to priority"


def test_top_end_and_empty_subtrees():
    """u at or past the total (rounding) returns the last non-empty leaf, never an empty one past it; u = 0 the first
    non-empty leaf."""
    tree = o2o.SumTree(16, CPU)
    fill(tree, np.array([0.0, 0.0, 2.0, 1.0, 0.0, 3.0]))
    u = torch.tensor([0.0, 1e-12, 2.0, 2.5, 3.0 + 1e-12, 6.0, 6.0 + 1e-9, 7.0], dtype=torch.float64)
    assert tree.find(u).tolist() == [2, 2, 2, 3, 5, 5, 5, 5]


def tiny_data(n: int, obs_dim: int = 3, act_dim: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    obs = np.stack([np.arange(n), np.zeros(n), -np.ones(n)], axis=1).astype(np.float32)
    return {"observations": obs, "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
            "rewards": rng.standard_normal((n, 1)).astype(np.float32), "next_observations": obs + [0, 1, 0],
            "terminated": np.zeros((n, 1), np.float32), "truncated": np.zeros((n, 1), np.float32)}


def online_rows(n: int, start: int = 0) -> list[tuple]:
    return [(np.array([start + i, 0.0, 1.0]), np.array([0.1, -0.1]), float(start + i), np.array([start + i, 1.0, 1.0]),
             False, i == n - 1) for i in range(n)]


def test_balanced_buffer_priorities_and_rows():
    buf = o2o.BalancedReplay(16, 3, 2, CPU, seed=0)
    buf.load_dataset(tiny_data(10))
    check_levels(buf.tree, np.r_[np.ones(10), np.zeros(6)])
    buf.tree.max.fill_(4.0)
    buf.add_rows(online_rows(3))
    check_levels(buf.tree, np.r_[np.ones(10), [4.0] * 3, np.zeros(3)])
    buf.tree.update(torch.tensor([11]), torch.tensor([9.0]))  # raises the running max to 9
    buf.add_rows(online_rows(5, start=3))  # the ring wraps: rows 13, 14, 15, then 0, 1 (the oldest dataset rows)
    check_levels(buf.tree, np.r_[[9.0, 9.0], np.ones(8), [4.0, 9.0, 4.0], [9.0] * 3])
    assert buf.size == 16 and buf.n_added == 8
    batch, idx = buf.sample_prioritized(64)
    rows = buf.storage[idx]
    for key, s in buf.slices.items():
        want = rows[:, s].squeeze(-1) if key in ("rewards", "terminated", "truncated") else rows[:, s]
        torch.testing.assert_close(batch[key], want, rtol=0, atol=0, msg=f"sampled {key} are not the drawn rows")
    assert (batch["observations"][:, 2] == 1).float().mean() > 0.5, "online rows (9, 4) should outweigh data (1)"


def test_balanced_buffer_state_round_trip():
    data = tiny_data(10)
    buf = o2o.BalancedReplay(16, 3, 2, CPU, seed=0)
    buf.load_dataset(data)
    buf.add_rows(online_rows(8))  # wraps over two dataset rows
    buf.tree.update(torch.tensor([3, 12]), torch.tensor([0.3, 50.0]))
    buf.sample_prioritized(5)
    state = buf.state_dict()
    copy = o2o.BalancedReplay(16, 3, 2, CPU, seed=99)
    copy.load_dataset(data)
    copy.load_state_dict(state)
    for a, b in zip(buf.tree.levels, copy.tree.levels):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(copy.tree.max) == 50.0
    torch.testing.assert_close(copy.storage, buf.storage, rtol=0, atol=0)
    (b1, i1), (b2, i2) = buf.sample_prioritized(32), copy.sample_prioritized(32)
    assert torch.equal(i1, i2) and torch.equal(b1["observations"], b2["observations"]), "the draws must continue alike"


@pytest.mark.parametrize("f", [0.5, 0.75])
def test_online_buffers_and_initial_online_fraction(f):
    """M f / ((1 - f) 1000) as the running max: the first 1000 online rows then hold exactly f of the priority mass."""
    m = 1500
    args = o2o.Args(init_online_fraction=f, online_buffer_size=2500, seed=4)
    buffers = o2o.online_buffers(args, tiny_data(m), 3, 2, CPU)
    assert set(buffers) == {"offline", "online", "balanced"}
    bal = buffers["balanced"]
    assert bal.capacity == 2 ** math.ceil(math.log2(m + 2500)) == 4096, "[O2O]: 2^ceil(log2(|D| + online buffer))"
    assert buffers["online"].capacity == 2500 and buffers["online"].size == 0
    assert buffers["offline"].size == buffers["offline"].capacity == m
    torch.testing.assert_close(bal.storage[:m], buffers["offline"].storage, rtol=0, atol=0)
    seeds = [buffers[k].generator.initial_seed() for k in ("offline", "online", "balanced")]
    assert len(set(seeds)) == 3 and 4 not in seeds, "three streams apart from the offline phase's"
    assert float(bal.tree.total()) == m, "dataset rows start at priority 1"
    assert float(bal.tree.max) == pytest.approx(m * f / ((1 - f) * 1000))
    bal.add_rows(online_rows(1000))
    online_mass = float(bal.tree.levels[-1][m:m + 1000].sum())
    assert online_mass / float(bal.tree.total()) == pytest.approx(f, rel=1e-9)
