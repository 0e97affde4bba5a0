"""``Rebel``: the control adapter in Stable-Baselines3's shape.

agent = Rebel("HalfCheetah-v5", variant="trajectory", seed=0)
agent.learn(1_000_000)
action, _ = agent.predict(obs, deterministic=True)
agent.save("cheetah"); agent = Rebel.load("cheetah")   # a folder: agent.pt and its model card
agent.push_to_hub("me/cheetah-rebel")
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rebel.config import check_choice, check_group_size, check_int, from_dict, option, with_defaults
from rebel.control.envs import VEC_ENVS, EnvSource, make_env
from rebel.control.estimators import ValueFunction
from rebel.control.evaluation import check_rendering, evaluate, record_video
from rebel.control.policy import MLPPolicy
from rebel.runs import newest_intact, publish_best, read_best, read_config
from rebel.sampler import Sampler
from rebel.tracking import legacy_settings
from rebel.trainer import Callback, Trainer, TrainerConfig

VARIANTS = ("trajectory", "mc", "critic")
AGENT_FORMAT = "rebel-control-agent-1"
AGENT_FILE = "agent.pt"  # the weights and settings inside a saved agent's folder (RUN/model/, RUN/best/)
FILE_SUFFIXES = (".pt", ".pth")  # Rebel.save to such a path writes one file, as before folders
# ControlConfig fields a model card lists beside the REBEL settings
CARD_SETTINGS = ("env", "variant", "hidden_sizes", "num_groups", "group_size", "gamma", "normalize_observations")

# Settings each variant starts from, the control task's and the trainer's alike (measured:
# docs/control.md, docs/control_tuning.md); explicit options win.
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "trajectory": {
        "hidden_sizes": [64, 64],
        "activation": "tanh",
        "state_dependent_std": False,
        "normalize_observations": True,
        "num_groups": 8,
        "gamma": 0.99,
        "value_epochs": 4,
        "alpha": 0.0,
        "tune_alpha": False,
        "eta": 0.5,
        "learning_rate": 3e-4,
        "epochs": 10,
        "minibatch_size": 4,
        "reward_normalization": "batch",
        "max_grad_norm": 0.5,
    },
    "mc": {
        "hidden_sizes": [64, 64],
        "activation": "tanh",
        "state_dependent_std": False,
        "normalize_observations": True,
        "num_groups": 256,
        "gamma": 0.993,
        "value_epochs": 10,
        "value_bootstrap": True,
        "alpha": 0.0,
        "tune_alpha": False,
        "eta": 0.3,
        "learning_rate": 1e-3,
        "epochs": 4,
        "minibatch_size": 64,
        "reward_normalization": "within_group",
        "max_grad_norm": 0.5,
    },
    "critic": {
        "hidden_sizes": [256, 256],
        "activation": "relu",
        "state_dependent_std": True,
        "normalize_observations": False,
        "num_groups": 4096,
        "gamma": 0.99,
        "value_epochs": 4,
        "alpha": 0.1,
        "tune_alpha": False,
        "eta": 2.0,
        "learning_rate": 1e-3,
        "epochs": 4,
        "minibatch_size": 1024,
        "reward_normalization": "within_group",  # since 2026-11-30; the 1M benchmark's critic runs used "none"
        "max_grad_norm": 1.0,
    },
}


# Settings chosen per environment (measured; explicit options win): HalfCheetah-v5's critic
# runs on its back on three of five seeds with 5000 random steps, on none with 20000
# (docs/control_tuning.md, "Critic on HalfCheetah-v5"); elsewhere 5000 (20000 cost Hopper-v5 at 100k: "Critic on Hopper-v5 and Walker2d-v5").
LEARNING_STARTS = 5000
ENV_LEARNING_STARTS: dict[str, int] = {"HalfCheetah-v5": 20_000}


@dataclass
class ControlConfig(with_defaults(TrainerConfig, iterations=None)):  # type: ignore[misc]
    """The control task, the variant that forms REBEL's regression, and every
    :class:`~rebel.TrainerConfig` setting. :func:`resolve_config` (what ``Rebel`` uses) starts
    from the variant's :data:`VARIANT_DEFAULTS`; built directly, the fields left ``None`` take
    them and the trainer's settings keep TrainerConfig's defaults."""

    env: str = option("HalfCheetah-v5", "gymnasium environment id")
    variant: str = option("critic", "critic | trajectory | mc: what a pair compares (two actions at one state, or rollouts from one start)")
    total_steps: int = option(1_000_000, "environment-step budget; every step counts, reset and branch rollouts included")
    vec_env: str = option("sync", "sync | async: step the envs in this process, or in n_envs worker processes (gymnasium AsyncVectorEnv)")
    n_envs: int = option(
        1,
        "critic: env copies collecting in parallel (as SB3's n_envs; with async one worker each); "
        "trajectory, mc: worker processes sharing the sampler's copies with async (same results as sync)",
    )
    hidden_sizes: list[int] | None = option(None, "policy MLP sizes (default: 64 64; critic: 256 256)")  # noqa: RUF009 (option returns a dataclasses.field)
    activation: str | None = option(None, "tanh | relu | elu | silu (default: tanh; critic: relu)")
    squash: bool = option(True, "tanh-squash Gaussian actions into the bounds (else clip them for the env only)")
    state_dependent_std: bool | None = option(None, "standard deviation from a head rather than a learned vector (default: critic only)")
    log_std_init: float = option(-0.5, "initial log standard deviation")
    normalize_observations: bool | None = option(None, "running observation normalisation, saved with the policy (default: not for critic)")
    gamma: float | None = option(None, "discount of returns and Q values (default: 0.99; mc: 0.993)")
    num_groups: int | None = option(None, "contexts per iteration: start states (trajectory), states (mc, critic)")
    group_size: int = option(2, "samples compared per context: rollouts (trajectory) or actions (mc, critic)")
    segment_length: int = option(200, "trajectory: steps per rollout (the next segment starts where the group's first rollout stopped)")
    horizon: int = option(10, "mc: steps of a Q rollout after the branching action (then the learned value bootstraps)")
    rollouts_per_action: int = option(1, "mc: rollouts averaged per Q(s, a), each its own env noise (common random numbers across actions)")
    spread_walkers: bool = option(False, "mc: cut each walker's first episode at a random length so the walkers cover the whole episode")
    state_stride: int = option(10, "mc: each iteration every walker first advances 1..state_stride steps (uniform) to its next state")
    value_bootstrap: bool | None = option(
        None,
        "mc, trajectory: add gamma^H V(s_H) of a learned value function at a rollout's end, fit each iteration on the rollouts' returns (default: on for mc)",
    )
    value_hidden_sizes: list[int] | None = option(None, "mc, trajectory: value function MLP sizes, tanh (default: the policy's)")  # noqa: RUF009
    value_lr: float = option(1e-3, "value function learning rate")
    value_epochs: int | None = option(None, "passes over each iteration's returns when fitting the value function (default: 4; mc: 10)")
    value_normalize_targets: bool = option(True, "fit V to returns scaled by each iteration's mean and spread (outputs kept, PopArt-style)")
    steps_per_iteration: int = option(1000, "critic: environment steps collected per iteration")
    learning_starts: int | None = option(None, "critic: uniformly random steps before learning (default: 5000; HalfCheetah-v5: 20000)")
    buffer_size: int = option(1_000_000, "critic: replay buffer size")
    critic_batch_size: int = option(256, "critic: TD minibatch size")
    updates_per_step: float = option(1.0, "critic: TD updates per environment step")
    critic_lr: float = option(3e-4, "critic: learning rate")
    critic_hidden_sizes: list[int] = option([256, 256], "critic: Q network sizes")  # noqa: RUF009
    tau: float = option(0.005, "critic: target-network averaging rate")
    alpha: float | None = option(
        None, "critic: entropy weight (starting value with tune_alpha): soft TD target and actor reward Q - alpha log pi_t (default 0.1)"
    )
    tune_alpha: bool | None = option(None, "critic: adjust alpha towards target_entropy, as SAC's ent_coef='auto' (default: off)")
    target_entropy: float | None = option(None, "critic: entropy tune_alpha aims at (default: -action dims; Discrete: 0.5 log n)")
    eval_every: int = option(10, "iterations between deterministic evaluations (0: only the final one)")
    eval_episodes: int = option(10, "episodes per evaluation")
    video: bool = option(False, "render the final evaluation into videos/eval.gif")
    save_best: bool = option(True, "keep the policy of the best evaluation so far (with its observation statistics) in RUN/best/")
    stop_on_reward: float | None = option(None, "end the run (done, with a checkpoint) once an evaluation's mean return reaches this")

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        own = self.adapter_settings()
        for key, value in VARIANT_DEFAULTS[self.variant].items():
            if key in own and own[key] is None:
                setattr(self, key, copy.copy(value))
        if self.learning_starts is None:
            self.learning_starts = ENV_LEARNING_STARTS.get(self.env, LEARNING_STARTS)
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.budget is None:
            self.budget = float(self.total_steps)
        check_group_size("group_size", self.group_size)
        check_choice("vec_env", self.vec_env, VEC_ENVS)
        check_int("n_envs", self.n_envs)
        # per_context needs context keys, which no control sampler sets
        check_choice("reward_normalization", self.reward_normalization, ("none", "batch", "within_group"))
        if self.value_bootstrap and self.variant == "critic":
            raise ValueError("value_bootstrap applies to the mc and trajectory variants (critic learns Q by TD), got variant='critic'")
        if self.value_hidden_sizes is not None and (not self.value_hidden_sizes or any(int(h) < 1 for h in self.value_hidden_sizes)):
            raise ValueError(f"value_hidden_sizes must be a non-empty list of sizes >= 1, got {self.value_hidden_sizes!r}")
        if self.eval_episodes < 1 or self.eval_every < 0:
            raise ValueError(f"eval_episodes must be >= 1 and eval_every >= 0, got {self.eval_episodes} and {self.eval_every}")
        if self.variant == "critic" and not self.tune_alpha and self.alpha * self.eta > 1:
            raise ValueError(
                f"alpha * eta must be <= 1 for the critic variant (the step raises pi_t to the power 1 - eta * alpha), "
                f"got alpha={self.alpha} and eta={self.eta}"
            )
        super().__post_init__()


def option_names() -> set[str]:
    """The keyword options ``Rebel`` takes: every ControlConfig field (the trainer's included)."""
    return {f.name for f in dataclasses.fields(ControlConfig)}


def resolve_config(env_id: str, variant: str = "critic", seed: int = 0, output_dir: str | None = None, **options: Any) -> ControlConfig:
    """The config ``Rebel(env_id, variant, seed, output_dir, **options)`` trains with: the
    variant's defaults, ``options`` over them (raises ValueError on an unknown or bad option)."""
    unknown = sorted(set(options) - option_names())
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; see ControlConfig and TrainerConfig")
    check_choice("variant", variant, VARIANTS)
    values = {**VARIANT_DEFAULTS[variant], **options}
    values.setdefault("output_dir", output_dir or f"runs/control/{env_id}-{variant}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    return from_dict(ControlConfig, values, env=env_id, variant=variant, seed=seed, iterations=None)


def settings_differences(ours: ControlConfig, theirs: ControlConfig, ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """``{field: (our value, their value)}`` for every field where two configs differ,
    skipping the fields named in ``ignore``."""
    differences = {}
    for field in dataclasses.fields(ours):
        x, y = getattr(ours, field.name), getattr(theirs, field.name)
        if field.name not in ignore and x != y:
            differences[field.name] = (x, y)
    return differences


class Rebel:
    """Train, evaluate, save and load a REBEL control agent.

    Args:
        env: a gymnasium id, or an env made with ``gymnasium.make`` (copies are made from its spec).
        variant: ``critic`` (the default: measured best on locomotion), ``trajectory`` or ``mc``.
        seed: random seed.
        output_dir: the run folder (default ``runs/control/<env>-<variant>-s<seed>-<time>``).
        callbacks: extra ``fn(trainer, metrics)`` called after each iteration (see :class:`~rebel.Trainer`).
        **options: any :class:`ControlConfig` or :class:`~rebel.TrainerConfig` field.
    """

    def __init__(
        self,
        env: EnvSource | gym.Env,
        variant: str = "critic",
        seed: int = 0,
        output_dir: str | None = None,
        callbacks: Sequence[Callback] = (),
        **options: Any,
    ) -> None:
        self.callbacks = list(callbacks)
        self.env_source = _env_source(env)
        env_id = env if isinstance(env, str) else _env_id(env)
        self.config = resolve_config(env_id, variant, seed, output_dir, **options)
        probe = make_env(self.env_source)
        # what the env itself gives when make_env flattened it (Dict, Tuple, MultiDiscrete, MultiBinary)
        self.env_observation_space = probe.env.observation_space if isinstance(probe, gym.wrappers.FlattenObservation) else None
        torch.manual_seed(seed)
        self.policy = self._make_policy(probe.observation_space, probe.action_space)
        probe.close()
        self.trainer: Trainer | None = None
        self._eval_envs: list[gym.Env] = []

    # ---------------------------------------------------------------- building
    def _make_policy(self, observation_space: gym.Space, action_space: gym.Space) -> MLPPolicy:
        c = self.config
        return MLPPolicy(
            observation_space,
            action_space,
            hidden_sizes=tuple(c.hidden_sizes or ()),
            activation=str(c.activation),
            squash=c.squash,
            state_dependent_std=bool(c.state_dependent_std),
            log_std_init=c.log_std_init,
            normalize_observations=bool(c.normalize_observations),
        )

    def _make_value_function(self) -> ValueFunction | None:
        """The learned V of ``value_bootstrap`` (None without it); initialised from the seed only."""
        c = self.config
        if not c.value_bootstrap:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed + 1)
            return ValueFunction(
                self.policy.obs_dim,
                tuple(c.value_hidden_sizes or c.hidden_sizes or (64, 64)),
                lr=c.value_lr,
                epochs=c.value_epochs,
                normalize_targets=c.value_normalize_targets,
            )

    def _make_sampler(self) -> Sampler:
        c, env = self.config, self.env_source
        contexts = int(c.num_groups or 1)
        shared = {"gamma": c.gamma, "seed": c.seed}
        workers = c.n_envs if c.vec_env == "async" else 0  # trajectory, mc: processes sharing the copies
        if c.variant == "trajectory":
            from rebel.control.trajectory import TrajectorySampler

            return TrajectorySampler(
                env, self.policy, num_groups=contexts, group_size=c.group_size, segment_length=c.segment_length,
                value_function=self._make_value_function(), workers=workers, **shared,
            )  # fmt: skip
        if c.variant == "mc":
            from rebel.control.mc import MonteCarloSampler

            return MonteCarloSampler(
                env, self.policy, num_states=contexts, actions_per_state=c.group_size, rollouts_per_action=c.rollouts_per_action,
                horizon=c.horizon, value_function=self._make_value_function(), spread_walkers=c.spread_walkers,
                state_stride=c.state_stride, workers=workers, **shared,
            )  # fmt: skip
        from rebel.control.critic import CriticSampler

        return CriticSampler(
            env, self.policy, steps_per_iteration=c.steps_per_iteration, learning_starts=c.learning_starts, buffer_size=c.buffer_size,
            critic_batch_size=c.critic_batch_size, updates_per_step=c.updates_per_step, critic_lr=c.critic_lr,
            critic_hidden_sizes=tuple(c.critic_hidden_sizes), tau=c.tau, alpha=c.alpha, tune_alpha=c.tune_alpha,
            target_entropy=c.target_entropy, max_alpha=1.0 / c.eta, num_states=contexts, actions_per_state=c.group_size,
            num_envs=c.n_envs, vec_env=c.vec_env, **shared,
        )  # fmt: skip

    def _make_trainer(self) -> Trainer:
        run_config = {"adapter": "control", "control": self.config.adapter_settings()}
        sampler = self._make_sampler()
        sampler.optimum = known_optimum(self.config.env)
        return Trainer(
            self.policy,
            sampler,
            self.config,
            run_config=run_config,
            callbacks=[self._evaluation_callback, *self.callbacks],
        )

    def _evaluation_callback(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Every ``eval_every`` iterations and at the end: evaluate, keep the best policy,
        stop once ``stop_on_reward`` is reached."""
        c = self.config
        if not (trainer.finishing or (c.eval_every and trainer.iteration % c.eval_every == 0)):
            return
        seed = 10_000 + c.seed
        metrics.update(self.evaluate(c.eval_episodes, seed=seed))
        main = trainer.accelerator.is_main_process
        if c.save_best and main:
            self._keep_if_best(trainer.run.path, metrics, seed)
        if c.stop_on_reward is not None and metrics["eval_return"] >= c.stop_on_reward:
            trainer.request_stop(done=True)
        if trainer.finishing and c.video and main:
            video = record_video(self.policy, self.env_source, trainer.run.path / "videos" / "eval.gif", seed=seed)
            if video is not None:
                trainer.run.log_video("eval_video", video, trainer.iteration)

    def _keep_if_best(self, run_dir: Path, metrics: dict[str, Any], seed: int) -> None:
        """Save the agent to ``RUN/best/`` when its evaluation beats the one recorded there
        (the record on disk is the state: a resumed run keeps the best of the runs before)."""
        best = read_best(run_dir)
        if best is not None and metrics["eval_return"] <= best["eval_return"]:
            return
        record = {key: metrics[key] for key in ("iteration", "env_steps", "eval_return", "eval_return_std", "eval_length")}
        record.update(eval_episodes=self.config.eval_episodes, eval_seed=seed)
        publish_best(run_dir, lambda folder: self.save(folder, results=record), record)  # agent.pt and its card

    # ------------------------------------------------------------------ public
    @property
    def env_steps(self) -> int:
        return int(self.trainer.totals.get("env_steps", 0)) if self.trainer else 0

    def learn(
        self, total_steps: int | None = None, resume: bool | str | Path = False, progress: bool | None = None, overwrite: bool = False
    ) -> Rebel:
        """Train for ``total_steps`` more environment steps (default: ``config.total_steps``);
        stops within one iteration of the budget. ``resume=True`` first loads the newest
        intact checkpoint of the run folder (or the checkpoint ``resume`` names);
        ``overwrite=True`` replaces a run the folder holds. :attr:`stop_reason` says how it
        ended (``"done"``, or ``"SIGINT"`` / ``"SIGTERM"`` after a checkpoint)."""
        steps = self.config.total_steps if total_steps is None else total_steps
        if steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {steps}")
        if self.trainer is None:
            if self.config.video:
                check_rendering(self.env_source)  # a missing package is refused before the run starts, not after it
            self.trainer = self._make_trainer()
        changes: dict[str, Any] = {"budget": float(steps if resume else self.env_steps + steps)}
        if progress is not None:
            changes["progress"] = progress
        self.trainer.config = dataclasses.replace(self.trainer.config, **changes)
        self.trainer.train(resume=resume, overwrite=overwrite)
        if self.trainer.exit_code == 0 and self.trainer.accelerator.is_main_process:
            self.save(self.trainer.run.path / "model")
        return self

    @property
    def stop_reason(self) -> str | None:
        """How the last :meth:`learn` ended (see :meth:`rebel.Trainer.train`)."""
        return self.trainer.stop_reason if self.trainer else None

    def predict(self, observation: Any, deterministic: bool = True) -> tuple[np.ndarray, None]:
        """Action(s) for one observation or a batch, SB3-style ``(action, state)``. For an env
        whose observations are flattened (Dict, Tuple, MultiDiscrete, MultiBinary): one
        observation of the env's own space, a sequence of them, or flattened ones (arrays)."""
        if self.env_observation_space is not None:
            observation = self._flattened(observation)
        obs = np.asarray(observation)
        single = obs.shape == self.policy.observation_space.shape
        action = self.policy.predict(obs[None] if single else obs, deterministic=deterministic)
        return (action[0] if single else action), None

    def _flattened(self, observation: Any) -> np.ndarray:
        """``observation`` of the env's own space (one, or a sequence) flattened as the policy sees it."""
        space = self.env_observation_space
        assert space is not None
        if space.contains(observation):
            return gym.spaces.flatten(space, observation)
        if isinstance(observation, np.ndarray) and observation.shape[-1:] == self.policy.observation_space.shape:
            return observation  # flattened already
        return np.stack([gym.spaces.flatten(space, one) for one in observation])

    def evaluate(self, episodes: int = 10, seed: int = 10_000) -> dict[str, float]:
        """Deterministic evaluation: mean / std return and mean length (the evaluation
        environments are made once and reused)."""
        while len(self._eval_envs) < episodes:
            self._eval_envs.append(make_env(self.env_source))
        return evaluate(self.policy, self.env_source, episodes, seed=seed, envs=self._eval_envs)

    def record_video(self, path: str, episodes: int = 1, seed: int = 10_000) -> Path | None:
        return record_video(self.policy, self.env_source, path, episodes=episodes, seed=seed)

    def close(self) -> None:
        """Close the environments this agent made (the worker processes of ``vec_env="async"``
        included; they are also closed when the agent is garbage-collected)."""
        if self.trainer is not None:
            getattr(self.trainer.sampler, "close", lambda: None)()
        for env in self._eval_envs:
            env.close()
        self._eval_envs = []

    def save(self, path: str | Path, results: dict[str, Any] | None = None) -> Path:
        """Write the policy (weights and observation statistics) and configs: into the
        folder ``path`` as ``agent.pt`` with a model card (``README.md``: settings, the run's
        last metrics or ``results``, its commands), or into one file when ``path`` ends in
        ``.pt`` / ``.pth``. Returns ``path``."""
        out = Path(path)
        folder = out.suffix not in FILE_SUFFIXES
        file = out / AGENT_FILE if folder else out
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "format": AGENT_FORMAT,
                "control": self.config.adapter_settings(),
                "trainer": self.config.trainer_settings(),
                "policy": self.policy.state_dict(),
                "env_steps": self.env_steps,
            },
            file,
        )
        if folder:
            from rebel.hub import write_model_card

            run_dir = self.trainer.run.path if self.trainer is not None else None
            write_model_card(out, self.card_info(), run_dir=run_dir, results=results)
        return out

    def card_info(self) -> Any:
        """What the model card of a saved agent says (a :class:`rebel.hub.CardInfo`)."""
        from rebel.hub import CardInfo, card_settings

        env = self.config.env
        return CardInfo(
            title=f"REBEL ({self.config.variant}) agent for {env}",
            library_name="rebel-rl",
            task="reinforcement-learning",
            dataset=env,
            settings=card_settings(self.config, CARD_SETTINGS),
            reward=f"the environment's own ({env})",
            usage=(
                "import gymnasium as gym\nfrom rebel.control import Rebel\n\n"
                'agent = Rebel.load(".")  # this folder (huggingface_hub.snapshot_download(repo_id) fetches it from the Hub)\n'
                "env = gym.make(agent.config.env)\nobs, _ = env.reset(seed=0)\naction, _ = agent.predict(obs, deterministic=True)"
            ),
            tags=(env, "deep-reinforcement-learning"),
            start="a randomly initialised policy",
        )

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None, commit_message: str | None = None) -> str:
        """Save the agent with its model card into a temporary folder and upload it to the Hub
        repo ``repo_id`` (created if needed); returns the commit's URL. A malformed
        ``repo_id`` or a missing token is refused before anything is written."""
        import tempfile

        from rebel.hub import check_push, push_folder

        token = check_push(repo_id, token)
        with tempfile.TemporaryDirectory(prefix="rebel-push-") as folder:
            self.save(folder)
            return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    @classmethod
    def load(cls, path: str | Path, env: EnvSource | gym.Env | None = None, **options: Any) -> Rebel:
        """An agent from :meth:`save`: a folder (a run's ``model/`` or ``best/``) or a ``.pt``
        file; ``env`` defaults to the saved id; ``learn`` then starts a new run from these weights."""
        path = Path(path)
        file = path / AGENT_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a saved rebel control agent: {file} does not exist")
        state = torch.load(file, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != AGENT_FORMAT:
            raise ValueError(f"{file} is not a rebel control agent (saved with Rebel.save)")
        agent = cls._from_configs(state["control"], state["trainer"], env, options)
        agent.policy.load_state_dict(state["policy"])
        return agent

    @classmethod
    def from_run(cls, run_dir: str | Path, env: EnvSource | gym.Env | None = None, **options: Any) -> Rebel:
        """The agent of a run folder, with the policy of its newest checkpoint (``options``
        override the saved settings; ``learn(resume=True)`` continues the run exactly)."""
        config = _control_run_config(run_dir)
        agent = cls._from_configs(config["control"], config["trainer"], env, options)
        _, state = newest_intact(run_dir)
        agent.policy.load_state_dict(state["policy"], strict=False)
        return agent

    @classmethod
    def _from_configs(cls, control: dict[str, Any], trainer: dict[str, Any], env: Any, options: dict[str, Any]) -> Rebel:
        env_id, variant, seed, saved = _saved_options(control, trainer)
        return cls(env if env is not None else env_id, variant=variant, seed=seed, **{**saved, **options})


# envs that pay 1 per step alive: their best return is their time limit
ONE_PER_STEP = ("CartPole-v0", "CartPole-v1", "InvertedPendulum-v4", "InvertedPendulum-v5")


def known_optimum(env_id: str) -> dict[str, float] | None:
    """The best evaluation return of ``env_id`` where it is known (CartPole-v1 500,
    InvertedPendulum-v5 1000), drawn in ``curves.png``; None otherwise."""
    if env_id not in ONE_PER_STEP:
        return None
    return {"eval_return": float(gym.spec(env_id).max_episode_steps)}


def run_config(run_dir: str | Path) -> ControlConfig:
    """The config a control run folder trains with when resumed."""
    config = _control_run_config(run_dir)
    env_id, variant, seed, saved = _saved_options(config["control"], config["trainer"])
    return resolve_config(env_id, variant, seed, **saved)


def _control_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The saved config of a control run folder, its trainer's ``output_dir`` set to that folder."""
    config = read_config(run_dir)
    if config.get("adapter") != "control":
        raise ValueError(f"{run_dir} is a {config.get('adapter')!r} run, not a control run")
    return {**config, "trainer": {**config["trainer"], "output_dir": str(run_dir)}}


def _saved_options(control: dict[str, Any], trainer: dict[str, Any]) -> tuple[str, str, int, dict[str, Any]]:
    """``(env id, variant, seed, options)`` of a saved config's two sections (older runs kept
    the seed in both), as ``Rebel`` takes them."""
    # saved before these options existed: V learned raw returns, alpha stayed fixed
    saved = {"value_normalize_targets": False, "tune_alpha": False, **legacy_settings(trainer), **control}
    for key in ("iterations", "budget"):
        saved.pop(key, None)
    return saved.pop("env"), saved.pop("variant"), saved.pop("seed"), saved


def _env_source(env: EnvSource | gym.Env) -> EnvSource:
    if isinstance(env, gym.Env):
        if env.spec is None:
            raise ValueError(f"{type(env.unwrapped).__name__} was not made with gymnasium.make: pass its id or a function that makes it")
        spec = env.spec
        return lambda: gym.make(spec)
    return env


def _env_id(env: Any) -> str:
    if isinstance(env, gym.Env) and env.spec is not None:
        return env.spec.id
    return getattr(env, "__name__", type(env).__name__)
