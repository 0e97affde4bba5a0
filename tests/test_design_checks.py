"""The checks of docs/math.md ("The checks") that any REBEL implementation must pass."""

import pytest
import torch

from rebel import Policy, RewardNormalizer, RolloutBatch, Sampler, Trainer, TrainerConfig, rebel_loss, trajectory_log_prob
from rebel.normalize import REWARD_NORMALIZATIONS
from rebel_envs.tabular import TabularMDP, TabularSampler, TabularSoftmaxPolicy, mirror_descent_step

ARM_REWARDS = torch.tensor([0.1, 0.9, 0.4, -0.3, 0.6], dtype=torch.float64)


class AllArmsSampler(Sampler):
    """One group holding every arm of the bandit once (the exact-minimisation setting)."""

    def __init__(self, rewards):
        self.rewards = rewards

    def collect(self, policy):
        k = len(self.rewards)
        actions = torch.arange(k)[:, None]
        return RolloutBatch(
            group=torch.zeros(k, dtype=torch.long),
            reward=self.rewards.float(),
            mask=torch.ones(k, 1, dtype=torch.bool),
            data={"states": torch.zeros(k, 1, dtype=torch.long), "actions": actions},
        )


def test_check1_exact_minimisation_is_the_mirror_descent_step():
    """Minimising the loss exactly on a one-state bandit gives pi_{t+1} ∝ pi_t exp(eta r)."""
    policy = TabularSoftmaxPolicy(1, 5, 1).double()
    with torch.no_grad():
        policy.logits.copy_(torch.tensor([[[0.3, -0.2, 0.0, 1.0, -0.5]]]))
    pi_t = policy.probs()[0, 0].detach().clone()
    batch = AllArmsSampler(ARM_REWARDS).collect(policy)
    eta = 2.0
    assert minimise_exactly(policy, batch, ARM_REWARDS, eta) < 1e-16
    assert torch.allclose(policy.probs()[0, 0].detach(), mirror_descent_step(pi_t, ARM_REWARDS, eta), atol=1e-10)


def minimise_exactly(policy, batch, reward, eta):
    """Minimise REBEL's loss from theta_t (LBFGS) and return the minimum."""
    logp_old = policy.log_prob(batch).detach()
    optimizer = torch.optim.LBFGS(
        policy.parameters(), max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = rebel_loss(policy.log_prob(batch), logp_old, reward, batch.group, eta=eta)
        loss.backward()
        return loss

    optimizer.step(closure)
    return closure().item()


def test_check1_through_the_trainer(tmp_path):
    """The real trainer, run to convergence on each iteration, follows exact mirror descent."""
    eta = 1.5
    policy = TabularSoftmaxPolicy(1, 5, 1)
    config = TrainerConfig(
        output_dir=str(tmp_path),
        iterations=2,
        eta=eta,
        epochs=400,
        learning_rate=0.05,
        max_grad_norm=None,
        progress=False,
        report_to="none",
        plot=False,
    )
    pi_0 = policy.probs()[0, 0].detach().double()
    Trainer(policy, AllArmsSampler(ARM_REWARDS), config).train()
    pi_2 = mirror_descent_step(mirror_descent_step(pi_0, ARM_REWARDS, eta), ARM_REWARDS, eta)
    assert torch.allclose(policy.probs()[0, 0].detach().double(), pi_2, atol=2e-3)


ARM_Q = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.0], dtype=torch.float64)


def soft_bandit_iteration(kind, min_scale=None, iterations=30, alpha=0.1, eta=2.0, states=4096):
    """REBEL on a 5-arm bandit with known Q and the critic's soft reward Q(a) - alpha log pi_t(a),
    normalised as the trainer does (``min_scale = eta * alpha`` unless given), each regression
    minimised exactly: returns the final policy's probabilities."""
    policy = TabularSoftmaxPolicy(1, 5, 1).double()
    generator = torch.Generator().manual_seed(0)
    normalizer = RewardNormalizer(kind)
    group = torch.arange(states).repeat_interleave(2)
    for _ in range(iterations):
        actions = torch.multinomial(policy.probs()[0, 0].detach(), 2 * states, replacement=True, generator=generator)
        batch = RolloutBatch(
            group=group,
            reward=torch.zeros(2 * states),
            mask=torch.ones(2 * states, 1, dtype=torch.bool),
            data={"states": torch.zeros(2 * states, 1, dtype=torch.long), "actions": actions[:, None]},
        )
        soft = ARM_Q[actions] - alpha * policy.log_prob(batch).detach()
        target = normalizer(soft, [0] * len(soft), group, min_scale=eta * alpha if min_scale is None else min_scale)
        minimise_exactly(policy, batch, target, eta)
    return policy.probs()[0, 0].detach()


def kl_to_soft_optimum(probs, alpha=0.1):
    return (probs * (probs.log() - torch.log_softmax(ARM_Q / alpha, -1))).sum().item()


@pytest.mark.parametrize("kind", REWARD_NORMALIZATIONS)
def test_check4_every_reward_normalisation_keeps_the_soft_fixed_point(kind):
    """pi_{t+1} ∝ pi_t^(1 - eta alpha / s) exp(eta Q / s) is a contraction towards exp(Q / alpha)
    while the divisor s >= eta alpha; eta * alpha = 0.2, so ``none`` contracts by 0.8 per step."""
    assert kl_to_soft_optimum(soft_bandit_iteration(kind)) < 1e-5


def test_check4_without_the_floor_a_shrinking_spread_overshoots_the_soft_fixed_point():
    """Near exp(Q / alpha) the soft rewards of a state become equal, their spread s -> 0 and the
    exponent 1 - eta alpha / s turns very negative: the policy oscillates and sticks on an arm."""
    probs = soft_bandit_iteration("within_group", min_scale=0.0)
    assert kl_to_soft_optimum(probs) > 1.0 and probs[1] > 0.99  # on the second-best arm


class GaussianMLP(Policy):
    """A small continuous-action policy: the check holds for any differentiable policy."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        self.log_std = torch.nn.Parameter(torch.zeros(2))

    def step_log_probs(self, batch):
        mean = self.net(batch.data["obs"])
        return torch.distributions.Normal(mean, self.log_std.exp()).log_prob(batch.data["act"]).sum(-1)


def test_check2_gradient_at_theta_t_is_rloo():
    """grad of one pair's loss at theta_t = -(2/eta)(r_i - r_j)(grad log pi(tau_i) - grad log pi(tau_j))."""
    torch.manual_seed(0)
    policy = GaussianMLP().double()
    batch = RolloutBatch(
        group=torch.tensor([0, 0]),
        reward=torch.tensor([1.3, -0.4], dtype=torch.float64),
        mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        data={"obs": torch.randn(2, 4, 3, dtype=torch.float64), "act": torch.randn(2, 4, 2, dtype=torch.float64)},
    )
    eta = 0.4
    params = list(policy.parameters())
    logp = policy.log_prob(batch)
    loss = rebel_loss(logp, logp.detach(), batch.reward, batch.group, eta=eta)
    grad_loss = torch.autograd.grad(loss, params, retain_graph=True)
    g_i = torch.autograd.grad(logp[0], params, retain_graph=True)
    g_j = torch.autograd.grad(logp[1], params)
    r_i, r_j = batch.reward.tolist()
    for got, a, b in zip(grad_loss, g_i, g_j):
        assert torch.allclose(got, -(2 / eta) * (r_i - r_j) * (a - b), atol=1e-12)


def full_trajectory_log_prob(mdp, probs, states, actions, mask):
    """log P(tau) with everything: initial state, every action and every transition."""
    out = torch.log(mdp.initial[states[:, 0]])
    for h in range(states.shape[1]):
        live = mask[:, h]
        out = out + torch.where(live, torch.log(probs[h, states[:, h], actions[:, h]]), 0.0)
        if h + 1 < states.shape[1]:
            moved = live & mask[:, h + 1]
            out = out + torch.where(moved, torch.log(mdp.transitions[states[:, h], actions[:, h], states[:, h + 1]]), 0.0)
    return out


def test_check3_dynamics_cancel_in_a_stochastic_environment():
    mdp = TabularMDP.random(num_states=5, num_actions=3, horizon=6, seed=3)
    assert ((mdp.transitions > 0).sum(-1) > 1).all()  # every transition is stochastic
    torch.manual_seed(1)
    pi_t, pi_theta = TabularSoftmaxPolicy(5, 3, 6).double(), TabularSoftmaxPolicy(5, 3, 6).double()
    with torch.no_grad():
        pi_t.logits.normal_()
        pi_theta.logits.normal_()
    batch = TabularSampler(mdp, num_contexts=20, group_size=3, seed=0).collect(pi_t)
    assert (~batch.mask).any()  # some episodes ended early in the terminal state
    states, actions = batch.data["states"], batch.data["actions"]
    full_ratio = full_trajectory_log_prob(mdp, pi_theta.probs().detach(), states, actions, batch.mask) - full_trajectory_log_prob(
        mdp, pi_t.probs().detach(), states, actions, batch.mask
    )
    policy_ratio = trajectory_log_prob(pi_theta(batch) - pi_t(batch), batch.mask).detach()
    assert torch.allclose(full_ratio, policy_ratio, atol=1e-12)
    assert full_ratio.abs().max() > 0.1  # the policies do differ
