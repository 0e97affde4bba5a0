"""The loss contract of rebel_loss and the baselines, checked against explicit formulas."""

import itertools
import math

import pytest
import torch

from rebel import (
    LOSSES,
    RolloutBatch,
    TrainerConfig,
    group_advantage,
    pair_indices,
    ppo_clip_loss,
    rebel_loss,
    register_loss,
    rloo_loss,
    trajectory_log_prob,
)


def explicit_pairs(group, pairs, reward):
    """The pairs, by brute force over the batch, in the documented order."""
    members = {}
    for i, g in enumerate(group.tolist()):
        members.setdefault(g, []).append(i)
    out = []
    for g in sorted(members):
        idx = members[g]
        if pairs == "all":
            out += list(itertools.combinations(idx, 2))
        elif pairs == "adjacent":
            out += [(idx[k], idx[k + 1]) for k in range(0, len(idx) - 1, 2)]
        else:
            best = max(idx, key=lambda i: (reward[i].item(), i))
            worst = min(idx, key=lambda i: (reward[i].item(), i))
            out.append((best, worst))
    return out


def explicit_loss(logp, logp_old, reward, pairs_list, eta):
    return torch.stack([((logp[i] - logp_old[i] - logp[j] + logp_old[j]) / eta - (reward[i] - reward[j])) ** 2 for i, j in pairs_list])


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    group = torch.tensor([7, 3, 7, 3, 7, 11, 11, 3, 7, 3, 11])  # non-contiguous ids, interleaved, sizes 4/4/3
    n = len(group)
    logp = torch.randn(n, generator=g, dtype=torch.float64)
    logp_old = torch.randn(n, generator=g, dtype=torch.float64)
    reward = torch.randn(n, generator=g, dtype=torch.float64)
    return logp, logp_old, reward, group


@pytest.mark.parametrize("pairs", ["all", "adjacent", "best_worst"])
@pytest.mark.parametrize("eta", [0.3, 1.0, 5.0])
def test_loss_equals_explicit_pair_formula(batch, pairs, eta):
    logp, logp_old, reward, group = batch
    expected = explicit_loss(logp, logp_old, reward, explicit_pairs(group, pairs, reward), eta)
    assert torch.allclose(rebel_loss(logp, logp_old, reward, group, eta=eta, pairs=pairs), expected.mean())
    assert torch.allclose(rebel_loss(logp, logp_old, reward, group, eta=eta, pairs=pairs, reduction="sum"), expected.sum())
    per_pair = rebel_loss(logp, logp_old, reward, group, eta=eta, pairs=pairs, reduction="none")
    got_pairs = list(zip(*[t.tolist() for t in pair_indices(reward, group, pairs)]))
    assert sorted(got_pairs) == sorted(explicit_pairs(group, pairs, reward))
    lookup = dict(zip(explicit_pairs(group, pairs, reward), expected.tolist()))
    assert per_pair.tolist() == pytest.approx([lookup[p] for p in got_pairs])


def test_adjacent_pairs_follow_batch_order_and_drop_odd_member():
    group = torch.tensor([0, 1, 0, 0, 1, 0, 0])
    i, j = pair_indices(torch.zeros(7), group, "adjacent")
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (1, 4), (3, 5)]  # member 6 of group 0 is the odd one


def test_best_worst_picks_highest_and_lowest_reward():
    reward = torch.tensor([0.5, 2.0, -1.0, 3.0, 3.5, -2.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    i, j = pair_indices(reward, group, "best_worst")
    assert list(zip(i.tolist(), j.tolist())) == [(1, 2), (4, 5)]


def test_no_groups_means_consecutive_pairs(batch):
    logp, logp_old, reward, _ = batch
    logp, logp_old, reward = logp[:10], logp_old[:10], reward[:10]
    expected = explicit_loss(logp, logp_old, reward, [(k, k + 1) for k in range(0, 10, 2)], 2.0).mean()
    for pairs in ("all", "adjacent", "best_worst"):
        assert torch.allclose(rebel_loss(logp, logp_old, reward, eta=2.0, pairs=pairs), expected)


def test_all_pairs_is_linear_in_batch_size():
    """200k trajectories: an O(N^2) pair matrix would need 4e10 entries."""
    n = 200_000
    logp, reward = torch.randn(n), torch.randn(n)
    group = torch.arange(n) // 4
    loss = rebel_loss(logp, torch.zeros(n), reward, group, eta=1.0)
    d = (logp - reward).view(-1, 4)
    expected = 4 * ((d - d.mean(1, keepdim=True)) ** 2).sum() / (n // 4 * 6)
    assert torch.allclose(loss, expected, rtol=1e-4)


def test_official_scaling_has_the_same_minimiser(batch):
    """The official code regresses Delta_i - Delta_j on eta * (r_i - r_j): our loss times eta^2."""
    logp, logp_old, reward, group = batch
    eta = 0.7
    ours = rebel_loss(logp, logp_old, reward, group, eta=eta, reduction="none")
    i, j = pair_indices(reward, group)
    official = ((logp[i] - logp_old[i]) - (logp[j] - logp_old[j]) - eta * (reward[i] - reward[j])) ** 2
    assert torch.allclose(official, eta**2 * ours)


def test_gradient_flows_through_logp_only(batch):
    logp, logp_old, reward, group = (t.clone().requires_grad_(t.dtype.is_floating_point) for t in batch)
    rebel_loss(logp, logp_old, reward, group, eta=1.0).backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert logp_old.grad is None and reward.grad is None


def test_zero_at_perfect_regression():
    reward = torch.tensor([1.0, 3.0, -2.0, 0.5])
    logp_old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    eta = 0.5
    logp = logp_old + eta * reward + torch.tensor([4.0, 4.0, -1.0, -1.0])  # + a constant per group
    assert rebel_loss(logp, logp_old, reward, torch.tensor([0, 0, 1, 1]), eta=eta).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": 0.0}, "eta must be a finite number > 0, got 0.0"),
        ({"eta": -1.0}, "eta must be a finite number > 0"),
        ({"eta": math.inf}, "eta must be a finite number > 0, got inf"),
        ({"eta": math.nan}, "eta must be a finite number > 0"),
        ({"pairs": "triples"}, "pairs='triples' is not supported"),
        ({"reduction": "max"}, "reduction='max' is not supported"),
        ({"logp_old": torch.zeros(3)}, r"logp_old has shape \(3,\) but logp has shape \(4,\)"),
        ({"reward": torch.zeros(4, 1)}, r"reward must be 1-D"),
        ({"reward": torch.tensor([0.0, math.nan, 0.0, 0.0])}, "reward contains non-finite values"),
        ({"logp": torch.tensor([0.0, -math.inf, 0.0, 0.0])}, "logp contains non-finite values"),
        ({"group": torch.tensor([0, 0, 1, 2])}, r"group ids \[1, 2\] have only one"),
        ({"group": torch.tensor([0.0, 0.0, 1.0, 1.0])}, "group must hold integer context ids"),
        ({"group": torch.tensor([0, 0, 1])}, "group must be a 1-D tensor with the shape of logp"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    args = {"logp": torch.zeros(4), "logp_old": torch.zeros(4), "reward": torch.zeros(4), "group": None, "eta": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rebel_loss(args.pop("logp"), args.pop("logp_old"), args.pop("reward"), args.pop("group"), **args)


def test_odd_batch_without_groups_is_an_error():
    with pytest.raises(ValueError, match="odd number of trajectories N=3"):
        rebel_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), eta=1.0)


def test_trajectory_log_prob_is_a_masked_sum_ignoring_padding():
    steps = torch.tensor([[-1.0, -2.0, -math.inf], [-0.5, float("nan"), -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert trajectory_log_prob(steps, mask).tolist() == [-3.0, -3.5]
    with pytest.raises(ValueError, match=r"step_log_probs has shape \(2, 3\) but mask has shape \(2, 2\)"):
        trajectory_log_prob(steps, mask[:, :2])


def test_group_advantage_leave_one_out_and_normalized():
    reward = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    loo = group_advantage(reward, group)
    assert loo.tolist() == pytest.approx([1 - 4, 2 - 3.5, 6 - 1.5, 0 - 6, 4 - 4, 8 - 2])
    norm = group_advantage(reward, group, kind="normalized")
    g0 = torch.tensor([1.0, 2.0, 6.0])
    assert norm[:3].tolist() == pytest.approx(((g0 - g0.mean()) / g0.std(unbiased=False)).tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="kind='z' is not supported"):
        group_advantage(reward, group, kind="z")


def test_rloo_gradient_at_theta_t_is_reinforce_with_leave_one_out_baseline():
    reward = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    logp = torch.randn(6, requires_grad=True)
    rloo_loss(logp, logp.detach(), reward, group, reduction="sum").backward()
    assert torch.allclose(logp.grad, -group_advantage(reward, group))


def test_rebel_gradient_at_theta_t_is_proportional_to_rloo():
    """Summed over all pairs of a group of n: -(2/eta) * n * (r_i - mean r) = -(2/eta)(n-1) * A_i."""
    reward = torch.tensor([1.0, 2.0, 6.0, 0.5])
    logp = torch.randn(4, dtype=torch.float64, requires_grad=True)
    eta = 0.25
    rebel_loss(logp, logp.detach(), reward.double(), torch.zeros(4, dtype=torch.long), eta=eta, reduction="sum").backward()
    expected = -(2 / eta) * 3 * group_advantage(reward.double(), torch.zeros(4, dtype=torch.long))
    assert torch.allclose(logp.grad, expected)


def test_ppo_clip_loss_matches_the_clipped_surrogate():
    step_logp_old = torch.log(torch.tensor([[0.5, 0.5, 0.2], [0.3, 0.3, 0.3]]))
    ratio = torch.tensor([[1.5, 0.9, 7.0], [0.5, 1.1, 1.0]])
    step_logp = (step_logp_old + torch.log(ratio)).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    advantage = torch.tensor([1.0, -2.0])
    loss = ppo_clip_loss(step_logp, step_logp_old, mask, advantage, clip_range=0.2)
    # row 0 (A>0): max(-1.5, -1.2) = -1.2 (clipped), max(-0.9, -0.9) = -0.9; row 1 (A<0): max(1.0, 1.6) = 1.6, 2.2, 2.0
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 1.6 + 2.2 + 2.0) / 5)
    loss.backward()
    assert step_logp.grad[0, 0] == 0 and step_logp.grad[1, 0] == 0  # clipped steps carry no gradient
    assert step_logp.grad[0, 2] == 0  # padding
    with pytest.raises(ValueError, match="clip_range must be a finite number > 0"):
        ppo_clip_loss(step_logp, step_logp_old, mask, advantage, clip_range=0)
    with pytest.raises(ValueError, match=r"advantage has shape \(3,\); expected \(2,\)"):
        ppo_clip_loss(step_logp, step_logp_old, mask, torch.zeros(3))


def test_the_registered_losses_are_the_functional_ones_with_the_trainers_settings():
    g = torch.Generator().manual_seed(1)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]] * 2, dtype=torch.bool)
    step_logp = torch.randn(6, 3, generator=g).clamp_max(-0.1)
    mb = RolloutBatch(group=group, reward=torch.randn(6, generator=g), mask=mask)
    mb.step_logp_old = step_logp + 0.3 * torch.randn(6, 3, generator=g)
    mb.logp_old = trajectory_log_prob(mb.step_logp_old, mask)
    logp = trajectory_log_prob(step_logp, mask)
    config = TrainerConfig(eta=0.7, pairs="best_worst", clip_range=0.05)
    expected = {
        "rebel": rebel_loss(logp, mb.logp_old, mb.reward, group, eta=0.7, pairs="best_worst"),
        "rloo": rloo_loss(logp, mb.logp_old, mb.reward, group),
        "ppo_clip": ppo_clip_loss(step_logp, mb.step_logp_old, mask, group_advantage(mb.reward, group, kind="normalized"), clip_range=0.05),
    }
    assert list(LOSSES) == list(expected)
    for name, value in expected.items():
        assert LOSSES[name].name == name
        assert LOSSES[name].fn(mb, logp, step_logp, config).item() == value.item()
    assert {name for name, loss in LOSSES.items() if loss.needs_step_logp_old} == {"ppo_clip"}


def test_registering_a_name_twice_is_an_error_naming_it():
    builtin = LOSSES["rebel"]
    with pytest.raises(ValueError, match="a loss named 'rebel' is already registered"):
        register_loss("rebel")(lambda mb, logp, step_logp, config: logp.sum())
    assert LOSSES["rebel"] is builtin
