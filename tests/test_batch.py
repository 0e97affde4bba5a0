import numpy as np
import pytest
import torch

from rebel import RewardNormalizer, RolloutBatch, RunningMeanStd


def make_batch(group):
    n = len(group)
    return RolloutBatch(
        group=torch.tensor(group),
        reward=torch.arange(n, dtype=torch.float32),
        mask=torch.ones(n, 3, dtype=torch.bool),
        data={"obs": torch.arange(n * 2).view(n, 2), "prompt": [f"p{i}" for i in range(n)]},
        context=[f"c{g}" for g in group],
    )


def test_minibatches_keep_groups_whole_and_cover_the_batch():
    group = [5, 1, 5, 2, 2, 1, 9, 9, 9, 5, 3, 3]
    batch = make_batch(group)
    parts = batch.minibatch_indices(4, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(parts).tolist()) == list(range(len(group)))
    for index in parts:
        ids = set(batch.group[index].tolist())
        assert all(set(torch.nonzero(batch.group == g).flatten().tolist()) <= set(index.tolist()) for g in ids)
        assert len(index) <= 4 or len(ids) == 1
        assert index.tolist() == sorted(index.tolist()) or len(ids) > 1  # members keep batch order within a group
    assert [len(mb) for mb in batch.minibatches(None)] == [12]


def test_select_takes_tensors_and_lists_alike():
    batch = make_batch([0, 0, 1, 1])
    sub = batch.select(torch.tensor([3, 2]))
    assert sub.reward.tolist() == [3.0, 2.0]
    assert sub.data["prompt"] == ["p3", "p2"] and sub.data["obs"].tolist() == [[6, 7], [4, 5]]
    assert sub.context == ["c1", "c1"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group": torch.tensor([0, 0, 1])}, r"group must be an integer tensor of shape \(4,\)"),
        ({"group": torch.tensor([0, 0, 1, 2])}, "every group of a RolloutBatch needs at least two trajectories"),
        ({"mask": torch.ones(3, 2)}, r"mask must have shape \(4, T\)"),
        ({"data": {"obs": torch.zeros(5, 2)}}, r"data\['obs'\] has 5 entries; expected one per trajectory \(4\)"),
        ({"reward": torch.zeros(4, 1)}, "reward must be 1-D"),
    ],
)
def test_batch_validation(kwargs, message):
    args = {"group": torch.tensor([0, 0, 1, 1]), "reward": torch.zeros(4), "mask": torch.ones(4, 2)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        RolloutBatch(**args)


def test_running_mean_std_matches_numpy():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(1000, 3))
    stats = RunningMeanStd((3,))
    for chunk in np.array_split(data, 7):
        stats.update(chunk)
    assert np.allclose(stats.mean, data.mean(0)) and np.allclose(stats.var, data.var(0))
    restored = RunningMeanStd((3,))
    restored.load_state_dict(stats.state_dict())
    assert np.array_equal(restored.mean, stats.mean) and restored.count == 1000


def test_per_context_normalisation_uses_each_contexts_running_statistics():
    norm = RewardNormalizer("per_context", min_count=4)
    context = ["a", "a", "b", "b"]
    first = norm(torch.tensor([1.0, 3.0, 10.0, 30.0]), context)  # too few samples yet: batch statistics
    all_four = torch.tensor([1.0, 3.0, 10.0, 30.0])
    assert torch.allclose(first, (all_four - all_four.mean()) / (all_four.std(unbiased=False) + 1e-6))
    second = norm(torch.tensor([1.0, 3.0, 10.0, 30.0]), context)  # now 4 samples each
    assert torch.allclose(second, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5)
    with pytest.raises(ValueError, match="needs a sampler that sets batch.context"):
        norm(torch.zeros(2), None)
    with pytest.raises(ValueError, match="reward_normalization='x' is not supported"):
        RewardNormalizer("x")


def test_within_group_normalisation_centres_groups_and_scales_differences_to_one():
    reward = torch.tensor([100.0, 102.0, -5.0, -1.0, 7.0, 7.0])
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    out = RewardNormalizer("within_group")(reward, None, group)
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0, 0.0])
    assert torch.allclose(out, centred / centred.pow(2).mean().sqrt(), atol=1e-5)
    assert torch.allclose(out[3] - out[2], 2 * (out[1] - out[0]), atol=1e-5)  # relative sizes across groups kept
    with pytest.raises(ValueError, match="needs the batch's group ids"):
        RewardNormalizer("within_group")(reward)


@pytest.mark.parametrize("kind", ["none", "batch", "within_group", "per_context"])
def test_min_scale_bounds_every_normalisations_divisor(kind):
    reward, group = torch.tensor([1.0, 1.2, 3.0, 3.2]), torch.tensor([0, 0, 1, 1])
    plain = RewardNormalizer(kind)(reward, ["a"] * 4, group)
    assert torch.equal(RewardNormalizer(kind)(reward, ["a"] * 4, group, min_scale=0.05), plain)  # spreads above 0.05: unchanged
    floored = RewardNormalizer(kind)(reward, ["a"] * 4, group, min_scale=5.0)  # every spread below 5: divided by 5 instead
    centred = {"none": reward, "within_group": reward - torch.tensor([1.1, 1.1, 3.1, 3.1])}.get(kind, reward - reward.mean())
    assert torch.allclose(floored, centred / 5.0, atol=1e-6)
