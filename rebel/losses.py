"""The REBEL loss and the baselines it is compared with.

For trajectories ``i`` and ``j`` sampled from pi_t for the same context::

    Delta_i = log pi_theta(tau_i) - log pi_t(tau_i)
    loss_ij = ((Delta_i - Delta_j) / eta - (r_i - r_j)) ** 2

With ``d_i = Delta_i / eta - r_i`` a pair's loss is ``(d_i - d_j) ** 2``, and over
all pairs of a group of n members ``sum_{i<j} (d_i - d_j)**2 = n * sum_i (d_i - mean(d))**2``:
the all-pairs loss is a centred regression computed in O(N).

The trainer runs the loss registered under ``TrainerConfig.loss`` (:data:`LOSSES`);
:func:`register_loss` adds one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rebel.batch import RolloutBatch

PAIRINGS = ("all", "adjacent", "best_worst")
REDUCTIONS = ("mean", "sum", "none")


def rebel_loss(
    logp: Tensor,
    logp_old: Tensor,
    reward: Tensor,
    group: Tensor | None = None,
    *,
    eta: float,
    pairs: str = "all",
    reduction: str = "mean",
) -> Tensor:
    """Squared error between ``(Delta_i - Delta_j) / eta`` and ``r_i - r_j`` over pairs.

    Args:
        logp: ``[N]`` log pi_theta of each trajectory (gradients flow through it).
        logp_old: ``[N]`` log pi_t of each trajectory, as computed by the training forward.
        reward: ``[N]`` reward of each trajectory.
        group: ``[N]`` integer context id; trajectories with the same id form a group.
            ``None`` pairs consecutive trajectories (0, 1), (2, 3), ...
        eta: step size (> 0); the mirror-descent KL weight is ``1 / eta``.
        pairs: ``"all"`` pairs inside each group, ``"adjacent"`` disjoint consecutive
            pairs inside each group, or ``"best_worst"`` (highest vs lowest reward).
        reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"`` (one value per pair,
            in the order of :func:`pair_indices`).
    """
    _check_eta(eta)
    _check_choice("reduction", reduction, REDUCTIONS)
    group_index, counts = _check_inputs(logp, logp_old, reward, group, pairs=pairs)
    d = (logp - logp_old.detach()) / eta - reward.detach().to(logp.dtype)

    if pairs == "all" and reduction != "none":
        n = counts.to(d.dtype)
        mean = _group_sum(d, group_index, len(counts)) / n
        per_group = n * _group_sum((d - mean[group_index]) ** 2, group_index, len(counts))
        total = per_group.sum()
        return total if reduction == "sum" else total / (n * (n - 1) / 2).sum()

    i, j = _pair_indices(reward, group_index, counts, pairs)
    per_pair = (d[i] - d[j]) ** 2
    if reduction == "none":
        return per_pair
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


def pair_indices(reward: Tensor, group: Tensor | None = None, pairs: str = "all") -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)`` of the pairs :func:`rebel_loss` regresses on (``i`` has the higher
    reward for ``best_worst``; for the others ``i`` comes first in the batch)."""
    group_index, counts = _check_inputs(reward, reward, reward, group, pairs=pairs)
    return _pair_indices(reward, group_index, counts, pairs)


def trajectory_log_prob(step_log_probs: Tensor, mask: Tensor) -> Tensor:
    """log pi(tau) = masked sum of per-step log-probs over the last dimension.

    The environment's transition log-probabilities are the same under pi_theta and pi_t
    on a given trajectory, so they cancel in every log-ratio and are never needed.
    Entries outside the mask are ignored even when they are not finite.
    """
    if step_log_probs.shape != mask.shape:
        raise ValueError(
            f"step_log_probs has shape {tuple(step_log_probs.shape)} but mask has shape {tuple(mask.shape)}; they must match ([B, T])"
        )
    mask = mask.to(torch.bool)
    return torch.where(mask, step_log_probs, torch.zeros_like(step_log_probs)).sum(-1)


def group_advantage(reward: Tensor, group: Tensor | None = None, *, kind: str = "leave_one_out", eps: float = 1e-8) -> Tensor:
    """Per-group baseline-corrected reward.

    ``"leave_one_out"``: ``r_i - mean_{j != i} r_j`` (RLOO).
    ``"normalized"``: ``(r_i - mean_g) / (std_g + eps)`` (DDPO's per-prompt normalisation).
    """
    group_index, counts = _check_inputs(reward, reward, reward, group, pairs="all")
    n = counts.to(reward.dtype)
    mean = _group_sum(reward, group_index, len(counts)) / n
    centred = reward - mean[group_index]
    if kind == "leave_one_out":
        return centred * (n / (n - 1))[group_index]
    if kind == "normalized":
        std = (_group_sum(centred**2, group_index, len(counts)) / n).sqrt()
        return centred / (std[group_index] + eps)
    raise ValueError(f"kind={kind!r} is not supported; expected 'leave_one_out' or 'normalized'")


def rloo_loss(logp: Tensor, logp_old: Tensor, reward: Tensor, group: Tensor | None = None, *, reduction: str = "mean") -> Tensor:
    """REINFORCE with a leave-one-out baseline, ``-A_i * pi_theta(tau_i) / pi_t(tau_i)``.

    The importance ratio equals 1 at theta_t, where the gradient is exactly RLOO's
    ``-A_i * grad log pi(tau_i)``; it keeps later epochs on the same batch consistent.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_inputs(logp, logp_old, reward, group, pairs="all")
    advantage = group_advantage(reward.detach(), group).to(logp.dtype)
    per_traj = -advantage * torch.exp(logp - logp_old.detach())
    return _reduce(per_traj, reduction)


def ppo_clip_loss(
    step_logp: Tensor,
    step_logp_old: Tensor,
    mask: Tensor,
    advantage: Tensor,
    *,
    clip_range: float = 0.2,
    reduction: str = "mean",
) -> Tensor:
    """PPO's clipped surrogate with one advantage per trajectory applied to every step
    (as DDPO does for the denoising chain). ``reduction="mean"`` averages over valid steps;
    ``"none"`` returns ``[B, T]`` with zeros outside the mask."""
    _check_choice("reduction", reduction, REDUCTIONS)
    if not (math.isfinite(clip_range) and clip_range > 0):
        raise ValueError(f"clip_range must be a finite number > 0, got {clip_range!r}")
    for name, value in (("step_logp_old", step_logp_old), ("mask", mask)):
        if value.shape != step_logp.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)} but step_logp has shape {tuple(step_logp.shape)}")
    if advantage.shape != step_logp.shape[:1]:
        raise ValueError(f"advantage has shape {tuple(advantage.shape)}; expected ({step_logp.shape[0]},), one per trajectory")
    mask = mask.to(torch.bool)
    log_ratio = torch.where(mask, step_logp - step_logp_old.detach(), torch.zeros_like(step_logp))
    ratio = torch.exp(log_ratio)
    adv = advantage.detach().to(step_logp.dtype)[:, None]
    per_step = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    per_step = torch.where(mask, per_step, torch.zeros_like(per_step))
    if reduction == "none":
        return per_step
    total = per_step.sum()
    return total if reduction == "sum" else total / mask.sum().clamp_min(1)


def explained_variance(logp: Tensor, logp_old: Tensor, reward: Tensor, group: Tensor | None, *, eta: float, pairs: str = "all") -> float:
    """Share of the pairwise reward differences the log-ratio regression explains:
    ``1 - sum_pairs (pred - target)^2 / sum_pairs target^2``; 0 at theta_t, 1 for a perfect fit."""
    residual = rebel_loss(logp, logp_old, reward, group, eta=eta, pairs=pairs, reduction="sum")
    total = rebel_loss(logp_old, logp_old, reward, group, eta=eta, pairs=pairs, reduction="sum")
    return float("nan") if total.item() == 0 else 1.0 - (residual / total).item()


# --------------------------------------------------------------------------- the trainer's losses

LossFn = Callable[["RolloutBatch", Tensor, Tensor, Any], Tensor]


@dataclass(frozen=True)
class TrainingLoss:
    """A loss :class:`rebel.Trainer` runs as ``fn(minibatch, logp, step_logp, config)``.

    ``minibatch`` is a :class:`~rebel.RolloutBatch` with ``logp_old`` filled (and
    ``step_logp_old`` when ``needs_step_logp_old``); ``logp`` ``[B]`` and ``step_logp`` ``[B, T]``
    are log pi_theta with gradients; ``config`` is the :class:`~rebel.TrainerConfig`.
    """

    name: str
    fn: LossFn
    needs_step_logp_old: bool = False


LOSSES: dict[str, TrainingLoss] = {}


def register_loss(name: str, *, needs_step_logp_old: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator: ``fn`` becomes ``TrainerConfig(loss=name)``; ``needs_step_logp_old`` asks the
    trainer for the ``[B, T]`` per-step log pi_t on each minibatch."""

    def add(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"a loss named {name!r} is already registered")
        LOSSES[name] = TrainingLoss(name, fn, needs_step_logp_old)
        return fn

    return add


@register_loss("rebel")
def _rebel(mb: RolloutBatch, logp: Tensor, step_logp: Tensor, config: Any) -> Tensor:
    return rebel_loss(logp, mb.logp_old, mb.reward, mb.group, eta=config.eta, pairs=config.pairs)


@register_loss("rloo")
def _rloo(mb: RolloutBatch, logp: Tensor, step_logp: Tensor, config: Any) -> Tensor:
    return rloo_loss(logp, mb.logp_old, mb.reward, mb.group)


@register_loss("ppo_clip", needs_step_logp_old=True)
def _ppo_clip(mb: RolloutBatch, logp: Tensor, step_logp: Tensor, config: Any) -> Tensor:
    advantage = group_advantage(mb.reward, mb.group, kind="normalized")
    return ppo_clip_loss(step_logp, mb.step_logp_old, mb.mask, advantage, clip_range=config.clip_range)


# --------------------------------------------------------------------------- helpers


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.mean()


def _check_eta(eta: float) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"eta must be a finite number > 0, got {eta!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, choices))}")


def _check_inputs(logp: Tensor, logp_old: Tensor, reward: Tensor, group: Tensor | None, *, pairs: str) -> tuple[Tensor, Tensor]:
    """Validate shapes and values; return each trajectory's dense group index and the group sizes."""
    _check_choice("pairs", pairs, PAIRINGS)
    for name, value in (("logp", logp), ("logp_old", logp_old), ("reward", reward)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one entry per trajectory), got shape {tuple(value.shape)}")
        if value.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)} but logp has shape {tuple(logp.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains non-finite values (nan or inf)")
    n = logp.shape[0]
    if group is None:
        if n % 2:
            raise ValueError(f"without group ids the batch is paired as (0, 1), (2, 3), ...; got an odd number of trajectories N={n}")
        group = torch.arange(n, device=logp.device) // 2
    if not isinstance(group, Tensor) or group.dim() != 1 or group.shape != logp.shape:
        shape = tuple(group.shape) if isinstance(group, Tensor) else type(group).__name__
        raise ValueError(f"group must be a 1-D tensor with the shape of logp {tuple(logp.shape)}, got {shape}")
    if group.dtype.is_floating_point or group.dtype.is_complex or group.dtype == torch.bool:
        raise ValueError(f"group must hold integer context ids, got dtype {group.dtype}")
    if n == 0:
        raise ValueError("the batch is empty: rebel_loss needs at least one group of two trajectories")
    _, group_index, counts = torch.unique(group, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        lonely = torch.unique(group)[counts < 2].tolist()
        raise ValueError(f"every group needs at least two trajectories; group ids {lonely[:10]} have only one")
    return group_index, counts


def _group_sum(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, group_index, values)


def _pair_indices(reward: Tensor, group_index: Tensor, counts: Tensor, pairs: str) -> tuple[Tensor, Tensor]:
    device = group_index.device
    if pairs == "all":
        same = group_index[:, None] == group_index[None, :]
        i, j = torch.nonzero(torch.triu(same, diagonal=1), as_tuple=True)
        return i, j
    starts = torch.cumsum(counts, 0) - counts  # first position of each group once sorted by group
    if pairs == "adjacent":
        order = torch.sort(group_index, stable=True).indices  # keeps batch order inside a group
        rank = torch.arange(len(order), device=device) - starts[group_index[order]]
        size = counts[group_index[order]]
        first = (rank % 2 == 0) & (rank + 1 < size)
        k = torch.nonzero(first, as_tuple=True)[0]
        return order[k], order[k + 1]
    # best_worst: sort by reward, then stably by group: each group's run is ordered by reward
    by_reward = torch.sort(reward.detach(), stable=True).indices
    order = by_reward[torch.sort(group_index[by_reward], stable=True).indices]
    ends = starts + counts - 1
    return order[ends], order[starts]
