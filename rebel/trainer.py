"""The REBEL iteration, the same for every adapter::

    batch = sampler.collect(policy)            # groups of trajectories from pi_t, with rewards
    batch.logp_old = log_prob(batch)           # no grad, the training forward itself (one update: its own forward, detached)
    for epoch in range(epochs):
        for minibatch in batch.minibatches():  # whole groups only
            loss = LOSSES[config.loss].fn(minibatch, log_prob(minibatch), ...)  # REBEL's regression by default
            backward, clip, step

Runs on accelerate (one process or many; every process collects its own contexts), under
the launcher's accelerate config: data parallel, DeepSpeed ZeRO or FSDP2 (see rebel.sharding).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rebel import sharding
from rebel.batch import RolloutBatch
from rebel.config import check_choice, check_int, check_positive, option
from rebel.losses import LOSSES, PAIRINGS, explained_variance, trajectory_log_prob
from rebel.normalize import REWARD_NORMALIZATIONS, RewardNormalizer
from rebel.policy import Policy
from rebel.runs import DamagedCheckpointError, RunDir, checkpoint_of, claim_run, load_checkpoint_file, save_file
from rebel.sampler import Sampler
from rebel.tracking import TRACKERS, resolve_report_to

LR_SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16")

Callback = Callable[["Trainer", dict[str, Any]], None]


@dataclass
class TrainerConfig:
    """Settings of the REBEL iteration shared by every adapter. An adapter's config derives
    from it (``with_defaults(TrainerConfig, ...)`` where the adapter's defaults differ) and
    declares only its own fields; the trainer reads the fields declared here."""

    output_dir: str = option("runs/rebel", "run folder: config, metrics, tracker files, checkpoints, plots")
    iterations: int | None = option(100, "number of REBEL iterations (collect, then regress); none: until the budget")
    budget: float | None = option(None, "also stop once the running total budget_counter reaches this (e.g. env steps)")
    budget_counter: str = option("env_steps", "the counter budget limits (a key of the sampler's batch.counts, or samples)")
    loss: str = option("rebel", f"{' | '.join(LOSSES)} (the baselines use the same adapters; rebel.register_loss adds one)")
    eta: float = option(1.0, "REBEL step size; 1/eta weighs the KL to the previous policy")
    pairs: str = option("all", "which pairs of a group are regressed: all | adjacent | best_worst")
    clip_range: float = option(0.2, "ratio clipping of the ppo_clip loss")
    epochs: int = option(1, "passes over each iteration's batch")
    minibatch_size: int | None = option(None, "trajectories per minibatch, whole groups only; none: the whole batch")
    learning_rate: float = option(3e-4, "AdamW learning rate")
    lr_schedule: str = option("constant", "constant | linear | cosine, over the iterations")
    warmup_iterations: int = option(0, "iterations of linear learning-rate warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = option(1.0, "gradient-norm clipping; none to disable")
    reward_normalization: str = option("none", "none | batch | within_group | per_context (running statistics per context)")
    seed: int = option(0, "random seed (each process adds its rank)")
    mixed_precision: str = option("no", "no | bf16 | fp16 (accelerate autocast)")
    checkpoint_every: int = option(10, "iterations between checkpoints (one is always written at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept on disk")
    stats_forward: bool = option(True, "one extra no-grad forward after each update for kl and explained_variance")
    report_to: list[str] = option(["tensorboard"], f"experiment trackers: any of {', '.join(TRACKERS)}, or none (as TRL's report_to)")  # noqa: RUF009 - option() builds a field
    plot: bool = option(True, "draw curves.png at the end")
    progress: bool = option(True, "show a progress bar")

    def trainer_settings(self) -> dict[str, Any]:
        """The values of TrainerConfig's own fields: ``config.yaml``'s ``trainer`` section."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainerConfig)}

    def adapter_settings(self) -> dict[str, Any]:
        """The values of the fields an adapter's config adds to TrainerConfig's: its own section of ``config.yaml``."""
        shared = {f.name for f in dataclasses.fields(TrainerConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in shared}

    def __post_init__(self) -> None:
        if self.iterations is None and self.budget is None:
            raise ValueError("iterations=None needs a budget: set iterations or budget")
        if self.iterations is not None:
            check_int("iterations", self.iterations)
        check_int("epochs", self.epochs)
        check_int("checkpoint_every", self.checkpoint_every)
        check_int("keep_checkpoints", self.keep_checkpoints)
        if self.minibatch_size is not None:
            check_int("minibatch_size", self.minibatch_size)
        if self.warmup_iterations < 0:
            raise ValueError(f"warmup_iterations must be >= 0, got {self.warmup_iterations}")
        for name in ("eta", "learning_rate", "clip_range", "adam_eps"):
            check_positive(name, getattr(self, name))
        if self.max_grad_norm is not None:
            check_positive("max_grad_norm", self.max_grad_norm)
        if self.budget is not None:
            check_positive("budget", self.budget)
        self.report_to = resolve_report_to(self.report_to)
        for name, choices in (
            ("loss", tuple(LOSSES)),
            ("pairs", PAIRINGS),
            ("lr_schedule", LR_SCHEDULES),
            ("reward_normalization", REWARD_NORMALIZATIONS),
            ("mixed_precision", MIXED_PRECISION),
        ):
            check_choice(name, getattr(self, name), choices)


class Trainer:
    """Runs REBEL iterations of ``policy`` on batches from ``sampler`` into a run folder.

    Args:
        policy: the adapter's :class:`~rebel.Policy` (its trainable parameters are optimised).
        sampler: the adapter's :class:`~rebel.Sampler`.
        config: the iteration's settings.
        run_config: the adapter's own settings, written to ``config.yaml`` beside ``trainer``.
        callbacks: called as ``fn(trainer, metrics)`` after each iteration, before the row is
            written; they may add entries (an evaluation, say) or call :meth:`request_stop`.
        optimizer: a ready optimizer over the policy's parameters (default: AdamW from config).
    """

    def __init__(
        self,
        policy: Policy,
        sampler: Sampler,
        config: TrainerConfig,
        *,
        run_config: dict[str, Any] | None = None,
        callbacks: Sequence[Callback] = (),
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a rebel.Policy, got {type(policy).__name__}")
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a rebel.Sampler, got {type(sampler).__name__}")
        self.config = config
        self.sampler = sampler
        self.callbacks = list(callbacks)
        _allow_new_mixed_precision(config.mixed_precision)
        self.accelerator = sharding.make_accelerator(config.mixed_precision, config.max_grad_norm)
        params = [p for p in policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters (requires_grad=False everywhere)")
        optimizer = optimizer or torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.iteration = 0  # completed iterations
        self.totals: dict[str, float] = {}  # cumulative counters (samples, env_steps, ...)
        self.wall_time = 0.0  # seconds spent in iterations, over resumes
        self.model, self.optimizer = self.accelerator.prepare(policy, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(sharding.base_optimizer(self.optimizer), self._lr_factor)
        self.normalizer = RewardNormalizer(config.reward_normalization)
        self.run = RunDir(config.output_dir, is_main=self.accelerator.is_main_process)
        self.run_config = dict(run_config or {})
        self.generator = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        self._stop_requested = self._goal_reached = False
        self._stop_signal: int | None = None
        self.stop_reason: str | None = None  # how the last train() call ended (see train)
        self._rng_at_iteration_start: dict[str, Any] | None = None
        self._frozen: list[torch.nn.Module] = []  # see prepare_frozen

    # ------------------------------------------------------------------ public
    @property
    def policy(self) -> Policy:
        """The policy itself (unwrapped from any data-parallel wrapper)."""
        return self.accelerator.unwrap_model(self.model)

    def prepare_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A frozen model the sampler uses beside the policy (a reference copy), on the
        trainer's device and sharded like the policy (FSDP2, ZeRO-3), whole while the sampler runs."""
        module = sharding.prepare_frozen(self.accelerator, module.eval().requires_grad_(False))
        self._frozen.append(module)
        return module

    @property
    def policy_is_sharded(self) -> bool:
        """True under FSDP2 and ZeRO-3: no process holds the whole policy (but while sampling)."""
        return sharding.sharding(self.accelerator) is not None

    def policy_state(self) -> dict[str, Tensor] | None:
        """The policy's full state dict on the main process when accelerate shards it (FSDP2,
        ZeRO-3; every process must call), else None: the module holds its tensors whole."""
        return self.accelerator.get_state_dict(self.model) if self.policy_is_sharded else None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def finishing(self) -> bool:
        """True in the callbacks of the run's last iteration (iterations or budget reached,
        or a stop requested): the place for a final evaluation."""
        return self._done() or self._stop_requested

    def request_stop(self, done: bool = False) -> None:
        """Finish the current iteration, write a checkpoint and return from :meth:`train`;
        ``done=True``: the run reached its goal (a reward threshold) and ends as ``"done"``."""
        self._stop_requested = True
        self._goal_reached = self._goal_reached or done

    def train(self, resume: bool | str | os.PathLike = False, overwrite: bool = False) -> list[dict[str, Any]]:
        """Run until ``config.iterations`` iterations are done or the ``budget`` is reached; return this call's metric rows.

        ``resume=True`` loads the newest intact checkpoint of ``config.output_dir`` (a damaged
        one is set aside with a warning) and continues exactly where it stopped; ``resume`` may
        also name one checkpoint folder. A new run refuses a folder that holds a run unless
        ``overwrite=True`` (which empties it); a folder in use by another process is refused.
        SIGINT (Ctrl-C) or SIGTERM finishes the iteration, writes a checkpoint and returns; a
        second one aborts at once. :attr:`stop_reason` then says how the call ended: ``"done"``
        (iterations or budget reached, or ``request_stop(done=True)``), ``"stopped"`` (:meth:`request_stop`), ``"SIGINT"`` or
        ``"SIGTERM"``; :attr:`exit_code` is what a command should exit with.
        """
        lock = claim_run(
            self.config.output_dir, resume=bool(resume) or self.iteration > 0, overwrite=overwrite, is_main=self.accelerator.is_main_process
        )
        try:
            return self._train(resume)
        finally:
            lock.release()

    @property
    def exit_code(self) -> int:
        """0 when the last :meth:`train` call finished or was stopped by a callback; 128 +
        the signal's number when a signal stopped it (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self._stop_signal if self._stop_signal is not None else 0

    def _train(self, resume: bool | str | os.PathLike) -> list[dict[str, Any]]:
        if resume:
            self._resume(None if resume is True else Path(resume))
        elif self.iteration == 0:
            _seed_everything(self.config.seed + self.accelerator.process_index)
            self.sampler.seed(self.config.seed + self.accelerator.process_index)
        # else: a later call on the same trainer continues in-process (raise iterations or budget first)
        config = {**self.run_config, "trainer": self.config.trainer_settings()}
        self.run.write_config(config)
        self.run.record_command()
        self.run.open_trackers(self.config.report_to, config, resume_step=self.iteration or None)
        rows: list[dict[str, Any]] = []
        self._stop_requested, self._goal_reached, self._stop_signal, self.stop_reason = False, False, None, None
        progress = self._progress_bar()
        restore_signals = self._install_signal_handlers()
        failed = True
        try:
            while not self._done() and not self._should_stop():
                row = self._iteration()
                rows.append(row)
                progress.update(self._progress_position() - progress.n)
                progress.set_postfix({k: f"{row[k]:.4g}" for k in ("reward_mean", "episode_return", "eval_return", "loss") if k in row})
                if self.finishing or self.iteration % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
            failed = False
        finally:
            restore_signals()
            progress.close()
            self.run.close(failed=failed)
        if self._stop_signal is not None:
            self.stop_reason = signal.Signals(self._stop_signal).name
            if self.accelerator.is_main_process:
                print(
                    f"rebel: stopped by {self.stop_reason} after iteration {self.iteration}; its checkpoint is in "
                    f"{self.run.checkpoints} (resume to continue)",
                    flush=True,
                )
        else:
            self.stop_reason = "done" if self._done() or self._goal_reached else "stopped"
        if self.config.plot:
            self.run.plot_curves(optimum=getattr(self.sampler, "optimum", None))
        return rows

    def _resume(self, chosen: Path | None) -> None:
        """Load ``chosen``, or else the newest checkpoint that every process can read; the
        damaged ones (and the ones newer than ``chosen``) are set aside; the logs are trimmed."""
        found = self.run.checkpoint_dirs()
        if chosen is not None:
            run_dir, checkpoint = checkpoint_of(chosen)
            if checkpoint is None or run_dir.resolve() != self.run.path.resolve():
                raise ValueError(f"resume={str(chosen)!r} is not a checkpoint of {self.run.path} (expected {self.run.checkpoints}/iter_N)")
            if not checkpoint.is_dir():
                raise FileNotFoundError(f"cannot resume: checkpoint {checkpoint} does not exist")
        elif not found:
            raise FileNotFoundError(f"cannot resume: {self.run.checkpoints} holds no checkpoint")
        problems: dict[Path, str] = {}
        for path in [chosen] if chosen is not None else found:
            try:
                state, own = self._read_checkpoint(path)
                problem = None
            except DamagedCheckpointError as error:
                problem = str(error)
            if self.accelerator.num_processes > 1:  # every process resumes from the same one
                flag = torch.tensor([float(problem is not None)], device=self.device)
                if self.accelerator.reduce(flag, "sum").item() > 0 and problem is None:
                    problem = f"checkpoint {path} is damaged in another process's file"
            if problem is None:
                break
            if chosen is not None:
                raise ValueError(problem)
            problems[path] = problem
            if self.accelerator.is_main_process:
                warnings.warn(f"{problem}; set aside as damaged-{path.name}, trying an older checkpoint", stacklevel=4)
        else:
            raise FileNotFoundError(f"cannot resume: no intact checkpoint in {self.run.checkpoints}: " + "; ".join(problems.values()))
        self._apply_checkpoint(path, state, own)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for newer in (p for p in found if p.name > path.name):
                if newer not in problems:
                    warnings.warn(f"resuming from {path}: the newer {newer} is set aside as discarded-{newer.name}", stacklevel=4)
                self.run.set_aside(newer, "damaged" if newer in problems else "discarded")
        self.run.truncate_logs(self.iteration)

    # --------------------------------------------------------------- iteration
    def _iteration(self) -> dict[str, Any]:
        config, model = self.config, self.model
        start = time.perf_counter()
        self._rng_at_iteration_start = _rng_state(self.generator)
        try:
            with torch.no_grad(), sharding.full_weights(self.accelerator, self.model, *self._frozen):
                batch = self.sampler.collect(self.policy)
        except BaseException:
            # Parameters are still those of the last iteration: keep them (sampler errors,
            # reward errors, an abort during a long collection) before the error goes up,
            # unless that iteration's checkpoint exists (it is exact: never replace it).
            if self.iteration > 0 and not self.run.checkpoint_dir(self.iteration).is_dir():
                self.save_checkpoint(rng=self._rng_at_iteration_start)
            raise
        batch = batch.to(self.device)
        collect_time = time.perf_counter() - start
        raw_reward = batch.reward
        # a soft reward r - alpha log pi_t: dividing by less than eta * alpha would overshoot exp(r / alpha)
        min_scale = config.eta * batch.entropy_weight
        batch.reward = self.normalizer(raw_reward, batch.context, batch.group, min_scale=min_scale).to(raw_reward.dtype)
        # logp_old: the training forward itself, no grad, on the first epoch's minibatches
        # (same inputs, same kernels), so each log-ratio is exactly 0 when training starts.
        # A single update (one epoch of one minibatch) takes it from that update's own forward,
        # detached: the same numbers, one forward less.
        partition = batch.minibatch_indices(config.minibatch_size, self.generator)
        first_epoch = [batch.select(index) for index in partition]
        single_update = config.epochs == 1 and len(first_epoch) == 1
        if not single_update:
            self._set_logp_old(batch, partition, first_epoch, self._score(first_epoch))

        losses, grad_norms, start_log_ratio = [], [], float("nan")
        for epoch in range(config.epochs):
            minibatches = first_epoch if epoch == 0 else list(batch.minibatches(config.minibatch_size, self.generator))
            for k, mb in enumerate(minibatches):
                with self.accelerator.autocast():
                    step_logp = model(mb)
                step_logp = step_logp.float()
                if single_update:
                    self._set_logp_old(batch, partition, first_epoch, [step_logp.detach()])
                logp = trajectory_log_prob(step_logp, mb.mask)
                if epoch == 0 and k == 0:
                    start_log_ratio = (logp.detach() - mb.logp_old).abs().max().item()
                loss = LOSSES[config.loss].fn(mb, logp, step_logp, config)
                self.accelerator.backward(loss)
                grad_norms.append(self._clip_gradients())
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().item())
        self.iteration += 1

        logp_new = None
        if config.stats_forward:
            steps = self._score(first_epoch)
            logp_new = _scatter(partition, [trajectory_log_prob(s, mb.mask) for s, mb in zip(steps, first_epoch)], len(batch))
        metrics, counts = self._metrics(batch, raw_reward, logp_new, losses, grad_norms, start_log_ratio)
        self.scheduler.step()  # after the counters moved: the schedule follows the run's progress
        metrics["collect_time"] = collect_time
        metrics["iteration_time"] = time.perf_counter() - start
        self.wall_time += metrics["iteration_time"]
        metrics["wall_time"] = self.wall_time
        for key, value in counts.items():  # samples_per_second, env_steps_per_second, ...
            metrics[f"{key}_per_second"] = value / metrics["iteration_time"]
        for callback in self.callbacks:
            callback(self, metrics)
        self.run.log_metrics(metrics)
        return metrics

    def _set_logp_old(self, batch: RolloutBatch, partition: list[Tensor], minibatches: list[RolloutBatch], step_logp: list[Tensor]) -> None:
        """Fill ``logp_old`` (and ``step_logp_old`` where the loss needs it) of ``batch`` and of
        its ``minibatches`` (taken at ``partition``) from their per-step log pi_t."""
        batch.logp_old = _scatter(partition, [trajectory_log_prob(s, mb.mask) for s, mb in zip(step_logp, minibatches)], len(batch))
        for mb, index in zip(minibatches, partition):
            mb.logp_old = batch.logp_old[index.to(self.device)]
        if LOSSES[self.config.loss].needs_step_logp_old:
            for mb, steps in zip(minibatches, step_logp):
                mb.step_logp_old = steps
            batch.step_logp_old = _scatter(partition, step_logp, len(batch))

    def _score(self, minibatches: list[RolloutBatch]) -> list[Tensor]:
        """No-grad per-step log-probs of each minibatch with the training forward."""
        with torch.no_grad():
            out = []
            for mb in minibatches:
                with self.accelerator.autocast():
                    out.append(self.model(mb).float())
            return out

    def _clip_gradients(self) -> float:
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = self.accelerator.clip_grad_norm_(params, max_norm)  # DeepSpeed clips in its step and reports the norm
        return float("nan") if norm is None else float(norm)

    def _metrics(
        self,
        batch: RolloutBatch,
        raw_reward: Tensor,
        logp_new: Tensor | None,
        losses: list[float],
        grad_norms: list[float],
        start_log_ratio: float,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """The iteration's metric row, and its counts summed over processes."""
        config = self.config
        n_procs = self.accelerator.num_processes
        local: dict[str, float] = {
            "loss": float(np.mean(losses)),
            "reward_mean": raw_reward.float().mean().item(),
            "reward_std": raw_reward.float().std(unbiased=False).item(),
            "grad_norm": float(np.mean(grad_norms)),
            "start_log_ratio_max": start_log_ratio,
        }
        if logp_new is not None:
            delta = logp_new - batch.logp_old
            local["log_ratio_mean"] = delta.mean().item()
            local["log_ratio_std"] = delta.std(unbiased=False).item()
            local["log_ratio_max_abs"] = delta.abs().max().item()
            # KL(pi_t || pi_theta) from samples of pi_t: E[r - 1 - log r], r = pi_theta / pi_t (>= 0, unbiased)
            local["kl"] = (torch.expm1(delta) - delta).mean().item()
            local["explained_variance"] = explained_variance(
                logp_new, batch.logp_old, batch.reward, batch.group, eta=config.eta, pairs=config.pairs
            )
        clashes = sorted(set(batch.stats) & set(local))
        if clashes:
            raise ValueError(f"the sampler's stats {clashes} would overwrite the trainer's metrics of the same name; rename them")
        local.update({k: float(v) for k, v in batch.stats.items()})
        metrics = self._mean_over_processes(local) if n_procs > 1 else local
        counts = {"samples": float(len(batch)), **{k: float(v) for k, v in batch.counts.items()}}
        if n_procs > 1:
            counts = {k: v * n_procs for k, v in self._mean_over_processes(counts).items()}
        for key, value in counts.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        row: dict[str, Any] = {"iteration": self.iteration}
        row.update({k: int(v) if float(v).is_integer() else v for k, v in self.totals.items()})
        row["learning_rate"] = self.scheduler.get_last_lr()[0]  # the rate this iteration used
        row.update(metrics)
        return row, counts

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        from accelerate.utils import gather_object

        gathered = gather_object([values])
        keys = sorted({k for d in gathered for k in d})
        return {k: float(np.nanmean([d.get(k, np.nan) for d in gathered])) for k in keys}

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self, rng: dict[str, Any] | None = None) -> Path:
        """Write ``checkpoints/iter_N`` atomically (model, optimizer, scheduler, RNG states,
        iteration, normaliser, sampler state; RNG and sampler state for every process)."""
        acc = self.accelerator
        staging = self.run.staging_dir(self.iteration)
        if acc.is_main_process:
            staging.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        save_file(
            {"rng": rng or _rng_state(self.generator), "sampler": self.sampler.state_dict()},
            staging / f"process_{acc.process_index}.pt",
        )
        deepspeed = sharding.uses_deepspeed(acc)
        if deepspeed:  # every process writes its partition of the policy and optimizer
            sharding.save_deepspeed(self.model, staging / "deepspeed")
        else:  # gathered from every process's shard under FSDP2
            policy = self.policy.checkpoint_state(acc.get_state_dict(self.model))
            optimizer = sharding.optimizer_state(acc, self.model, self.optimizer)
        if acc.is_main_process:
            state = {
                "iteration": self.iteration,
                "totals": dict(self.totals),
                "wall_time": self.wall_time,
                **({"deepspeed": True} if deepspeed else {"policy": policy, "optimizer": optimizer}),
                "scheduler": self.scheduler.state_dict(),
                "normalizer": self.normalizer.state_dict(),
                "num_processes": acc.num_processes,
            }
            save_file(state, staging / "trainer.pt")
        acc.wait_for_everyone()
        final = self.run.checkpoint_dir(self.iteration)
        if acc.is_main_process:
            final = self.run.commit_checkpoint(self.iteration, self.config.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote (this process's RNG and sampler)."""
        path = Path(path)
        self._apply_checkpoint(path, *self._read_checkpoint(path))

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkpoint's shared state and this process's own (a damaged file raises
        :class:`~rebel.runs.DamagedCheckpointError` naming it)."""
        shared = load_checkpoint_file(path / "trainer.pt")
        return shared, load_checkpoint_file(path / f"process_{self.accelerator.process_index}.pt")

    def _apply_checkpoint(self, path: Path, state: dict[str, Any], own: dict[str, Any]) -> None:
        if state["num_processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"checkpoint {path} was written by {state['num_processes']} processes; "
                f"resume it with the same number (now {self.accelerator.num_processes})"
            )
        if state.get("deepspeed", False) != sharding.uses_deepspeed(self.accelerator):
            written = "with" if state.get("deepspeed") else "without"
            raise ValueError(f"checkpoint {path} was written {written} DeepSpeed; resume it under the same accelerate config")
        if state.get("deepspeed"):
            sharding.load_deepspeed(self.model, path / "deepspeed")
        else:
            unexpected = sharding.load_policy_state(self.accelerator, self.model, state["policy"])
            if unexpected:
                raise ValueError(f"checkpoint {path} has parameters this policy lacks: {unexpected[:5]}")
            sharding.load_optimizer_state(self.accelerator, self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.normalizer.load_state_dict(state["normalizer"])
        self.iteration = int(state["iteration"])
        self.totals = dict(state["totals"])
        self.wall_time = float(state.get("wall_time", 0.0))
        self.sampler.load_state_dict(own["sampler"])
        _set_rng_state(own["rng"], self.generator)

    # ----------------------------------------------------------------- helpers
    def _done(self) -> bool:
        config = self.config
        if config.budget is not None and self.totals.get(config.budget_counter, 0.0) >= config.budget:
            return True
        return config.iterations is not None and self.iteration >= config.iterations

    def _progress_position(self) -> float:
        if self.config.budget is not None:
            return min(self.totals.get(self.config.budget_counter, 0.0), self.config.budget)
        return self.iteration

    def _lr_factor(self, _: int) -> float:
        """Warm-up over the first iterations, then the schedule over the run's progress
        (the larger of the iteration and budget fractions)."""
        config = self.config
        iteration = self.iteration
        if iteration < config.warmup_iterations:
            return (iteration + 1) / config.warmup_iterations
        if config.lr_schedule == "constant":
            return 1.0
        progress = 0.0
        if config.iterations is not None:
            progress = min(1.0, (iteration - config.warmup_iterations) / max(1, config.iterations - config.warmup_iterations))
        if config.budget is not None:
            progress = max(progress, min(1.0, self.totals.get(config.budget_counter, 0.0) / config.budget))
        if config.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def _should_stop(self) -> bool:
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(self._stop_requested)], device=self.device)
            self._stop_requested = bool(self.accelerator.reduce(flag, "sum").item() > 0)
        return self._stop_requested

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGINT and SIGTERM: the first finishes the iteration and stops (a checkpoint is
        written); a second aborts at once (KeyboardInterrupt, or SystemExit(143) for SIGTERM)."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.getsignal(s) for s in signals}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested and self._stop_signal is not None:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            self._stop_requested, self._stop_signal = True, signum
            if self.accelerator.is_main_process:
                again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
                print(
                    f"\nrebel: {signal.Signals(signum).name}: stopping after this iteration and writing a checkpoint ({again} again to abort)",
                    flush=True,
                )

        for s in signals:
            signal.signal(s, handler)

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore

    def _progress_bar(self) -> Any:
        from tqdm.auto import tqdm

        budget = self.config.budget
        return tqdm(
            total=budget if budget is not None else self.config.iterations,
            initial=self._progress_position(),
            desc="rebel",
            unit=self.config.budget_counter if budget is not None else "it",
            unit_scale=budget is not None,
            disable=not (self.config.progress and self.accelerator.is_main_process),
        )


def _scatter(partition: list[Tensor], parts: list[Tensor], size: int) -> Tensor:
    """Reassemble per-minibatch rows into batch order."""
    out = parts[0].new_empty((size, *parts[0].shape[1:]))
    for index, part in zip(partition, parts):
        out[index.to(part.device)] = part
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "trainer": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["trainer"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _allow_new_mixed_precision(mixed_precision: str) -> None:
    """accelerate keeps one mixed-precision setting per process and refuses an ``Accelerator``
    with another; a new trainer may choose its own (the process group itself is kept)."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
