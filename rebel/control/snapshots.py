"""Exact snapshot / restore of gymnasium environments for branch rollouts.

``snapshot(env)`` captures everything that influences future ``env.step`` /
``env.reset`` results; ``restore(env, state)`` puts an environment (the same
instance or another one made with the same id and wrappers) back into that state,
so that replaying the same actions reproduces observations, rewards and
terminated/truncated flags bit for bit.

What is captured:

* **Wrappers** (``env`` -> ``env.env`` -> ... ): a deep copy of each wrapper's
  ``__dict__`` except references to the wrapped env, spaces, specs and constructor
  arguments (all immutable configuration). This covers TimeLimit's
  ``_elapsed_steps``, OrderEnforcing's ``_has_reset``, PassiveEnvChecker's flags,
  RecordEpisodeStatistics' counters and NormalizeObservation / NormalizeReward
  running statistics (``obs_rms``, ``return_rms``, ``discounted_reward``).
* **MuJoCo envs** (``env.unwrapped`` holds an ``mujoco.MjModel``/``MjData`` pair as
  ``model``/``data``, e.g. ``gymnasium.envs.mujoco.MujocoEnv``): the full
  ``mjSTATE_INTEGRATION`` state (time, qpos, qvel, act, history, warm-start,
  ctrl, applied forces, mocap, eq_active, userdata, plugin state), plus the
  derived kinematic quantities listed in ``MUJOCO_DERIVED_FIELDS``. The latter
  are needed because after ``mj_step`` they describe the state *before* the last
  integration sub-step, and some envs read them before stepping (Ant reads
  ``xpos``, Humanoid reads ``xipos``), so recomputing them with ``mj_forward`` is
  not bit-identical. The remaining Python attributes are deep-copied.
* **Pure-Python envs** (CartPole, Pendulum, MountainCar, Acrobot, FrozenLake,
  Taxi, ...): a deep copy of ``env.unwrapped.__dict__`` minus renderer objects.
* The env's RNG (``unwrapped.np_random``) bit-generator state; the generator is
  created first if it did not exist yet, so that the continuation is reproducible.
  ``reseed(env, seed)`` restarts it after a restore, for branches that should share
  the state but not the env's noise.
* ``gymnasium.vector.SyncVectorEnv`` (and vector wrappers around it): per-sub-env
  snapshots plus the vector env's autoreset bookkeeping (``_autoreset_envs``,
  ``_env_obs``, ``_observations``, ``_rewards``, ``_terminations``,
  ``_truncations``).

Not captured: the RNGs of ``observation_space`` / ``action_space`` (so
``env.action_space.sample()`` is not rewound) and render windows.

The returned state is a plain, picklable structure of dicts, lists and numpy
arrays (plus whatever Python objects the env itself stores, e.g. running-stat
objects), suitable for ``torch.save``.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec
from gymnasium.vector import AsyncVectorEnv, SyncVectorEnv, VectorEnv, VectorWrapper

try:  # MuJoCo is optional: pure-Python envs work without it.
    import mujoco
except ImportError:  # pragma: no cover - exercised only without mujoco
    mujoco = None

__all__ = [
    "MUJOCO_DERIVED_FIELDS",
    "SNAPSHOT_FORMAT",
    "frozen_normalizers",
    "reseed",
    "restore",
    "snapshot",
]

SNAPSHOT_FORMAT = "rebel.control.snapshot/1"

#: ``MjData`` fields saved besides the integration state: the outputs of the
#: position/velocity stages and of ``mj_rnePostConstraint`` that env code may
#: read between steps (``tree_asleep`` matters only for models with sleeping).
MUJOCO_DERIVED_FIELDS: tuple[str, ...] = (
    "xpos", "xquat", "xmat", "xipos", "ximat", "xanchor", "xaxis",
    "geom_xpos", "geom_xmat", "site_xpos", "site_xmat", "subtree_com",
    "cinert", "cdof", "cvel", "cacc", "cfrc_int", "cfrc_ext",
    "ten_length", "ten_velocity", "actuator_length", "actuator_velocity",
    "actuator_force", "qfrc_actuator", "qfrc_bias", "qfrc_passive",
    "qfrc_constraint", "qacc", "sensordata", "energy",
    "subtree_linvel", "subtree_angmom", "tree_asleep",
)  # fmt: skip

# Attributes that are configuration, renderers or links to other envs: never copied.
_SKIP_KEYS = frozenset(
    {
        "env",
        "envs",
        "env_fns",
        "spec",
        "_cached_spec",
        "metadata",
        "_metadata",
        "_saved_kwargs",
        "_ezpickle_args",
        "_ezpickle_kwargs",
        "mujoco_renderer",
        "viewer",
        "_viewers",
        "renderer",
        "window",
        "screen",
        "clock",
        "surf",
    }
)
# Values of these types are links or configuration (functions such as the lambdas
# TimeAwareObservation stores are immutable and usually unpicklable): never copied.
_EXTERNAL_TYPES: tuple[type, ...] = (
    gym.Env,
    VectorEnv,
    gym.Space,
    EnvSpec,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
)
if mujoco is not None:
    _EXTERNAL_TYPES += (mujoco.MjModel, mujoco.MjData)

# Env modules whose simulator state lives outside Python and cannot be copied.
_UNSUPPORTED_MODULES = (
    "gymnasium.envs.box2d",
    "gymnasium.envs.mujoco.mujoco_py_env",
    "ale_py",
)
_MJ_INTEGRATION = int(mujoco.mjtState.mjSTATE_INTEGRATION) if mujoco else 0


# --------------------------------------------------------------------------- helpers
def _env_id(env: Any) -> str:
    """``spec.id`` of the innermost env if known, else its class name."""
    inner = _base(env)
    spec = getattr(inner, "spec", None)
    if isinstance(spec, EnvSpec):
        return spec.id
    return type(inner).__name__


def _chain(env: Any) -> list[Any]:
    """``[env, env.env, ..., base]`` for gym wrappers and vector wrappers."""
    chain = [env]
    while isinstance(chain[-1], (gym.Wrapper, VectorWrapper)):
        chain.append(chain[-1].env)
    return chain


def _base(env: Any) -> Any:
    return _chain(env)[-1]


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _short(names: list[str]) -> str:
    return " -> ".join(n.rsplit(".", 1)[-1] for n in names)


def _is_mujoco(base: Any) -> bool:
    return (
        mujoco is not None
        and isinstance(getattr(base, "model", None), mujoco.MjModel)
        and isinstance(getattr(base, "data", None), mujoco.MjData)
    )


def _state_items(obj: Any) -> dict[str, Any]:
    """References to the attributes of ``obj`` that make up its mutable state."""
    return {k: v for k, v in vars(obj).items() if k not in _SKIP_KEYS and k != "_np_random" and not isinstance(v, _EXTERNAL_TYPES)}


def _external_memo(chain: list[Any]) -> dict[int, Any]:
    """A deepcopy memo that maps envs, spaces, models, renderers, ... to themselves.

    Nested references to them (e.g. a wrapper keeping a list of envs) are then
    shared instead of copied.
    """
    memo: dict[int, Any] = {}
    for obj in chain:
        memo[id(obj)] = obj
        for k, v in vars(obj).items():
            if k in _SKIP_KEYS or isinstance(v, _EXTERNAL_TYPES):
                memo[id(v)] = v
        if isinstance(obj, SyncVectorEnv):
            for sub in obj.envs:
                memo.update(_external_memo(_chain(sub)))
    return memo


def _deepcopy_attrs(chain: list[Any], raw: list[dict[str, Any]], env_id: str) -> list[dict[str, Any]]:
    try:
        return copy.deepcopy(raw, _external_memo(chain))
    except Exception as exc:  # locate the culprit for a helpful message
        for obj, attrs in zip(chain, raw, strict=True):
            for k, v in attrs.items():
                try:
                    copy.deepcopy(v, _external_memo(chain))
                except Exception:  # noqa: BLE001 - deepcopy may raise anything
                    raise TypeError(
                        f"cannot snapshot env {env_id!r}: attribute "
                        f"{type(obj).__name__}.{k} of type {type(v).__name__} cannot be "
                        f"deep-copied ({exc!r}). snapshot() needs a MuJoCo env "
                        "(gymnasium.envs.mujoco.MujocoEnv) or an env whose state is "
                        "deep-copyable."
                    ) from exc
        raise TypeError(f"cannot snapshot env {env_id!r}: deep copy failed ({exc!r})") from exc


def _restore_attrs(chain: list[Any], saved: list[dict[str, Any]]) -> None:
    copied = copy.deepcopy(saved, _external_memo(chain))
    for obj, attrs in zip(chain, copied, strict=True):
        d = vars(obj)
        for k in set(_state_items(obj)) - set(attrs):  # created after the snapshot
            del d[k]
        d.update(attrs)


def _rng_state(gen: Any) -> dict[str, Any] | None:
    """Deep copy of a Generator's bit-generator state (None if ``gen`` is not a Generator)."""
    if not isinstance(gen, np.random.Generator):
        return None
    return dict(copy.deepcopy(gen.bit_generator.state))


def _set_rng(base: Any, state: dict[str, Any] | None) -> None:
    if state is None:
        return
    gen = vars(base).get("_np_random")
    name = state["bit_generator"]
    if not isinstance(gen, np.random.Generator) or type(gen.bit_generator).__name__ != name:
        gen = np.random.Generator(getattr(np.random, name)())
        base._np_random = gen
    gen.bit_generator.state = copy.deepcopy(state)  # in place: keeps shared references


def _mujoco_state(base: Any) -> dict[str, Any]:
    model, data = base.model, base.data
    physics = np.empty(mujoco.mj_stateSize(model, _MJ_INTEGRATION), dtype=np.float64)
    mujoco.mj_getState(model, data, physics, _MJ_INTEGRATION)
    derived = {k: np.array(getattr(data, k), copy=True) for k in MUJOCO_DERIVED_FIELDS if hasattr(data, k)}
    return {"physics": physics, "derived": derived}


def _set_mujoco_state(base: Any, state: dict[str, Any]) -> None:
    model, data = base.model, base.data
    physics = np.ascontiguousarray(state["physics"], dtype=np.float64)
    mujoco.mj_setState(model, data, physics, _MJ_INTEGRATION)
    # Make every derived quantity consistent with the restored state (contacts,
    # constraint data, ...), then re-apply the state in case mj_forward touched any
    # of it (it does not in MuJoCo 3.x/4.x, but the warm-start used to be written
    # by the forward pass), and finally bring back the derived fields exactly as
    # they were after the last mj_step.
    mujoco.mj_forward(model, data)
    mujoco.mj_setState(model, data, physics, _MJ_INTEGRATION)
    for k, v in state["derived"].items():
        getattr(data, k)[...] = v


def _check_supported(base: Any, env_id: str) -> None:
    module = type(base).__module__
    if module.startswith(_UNSUPPORTED_MODULES):
        raise TypeError(
            f"cannot snapshot env {env_id!r} ({_qualname(base)}): its simulator state lives "
            "outside Python and cannot be copied. snapshot() needs a MuJoCo env "
            "(gymnasium.envs.mujoco.MujocoEnv) or an env whose state is deep-copyable."
        )


# --------------------------------------------------------------------------- single env
def _snapshot_single(env: gym.Env) -> dict[str, Any]:
    chain = _chain(env)
    base = chain[-1]
    env_id = _env_id(env)
    if not isinstance(base, gym.Env):
        raise TypeError(f"cannot snapshot {env_id!r}: expected a gymnasium.Env, got {type(base)!r}")
    _check_supported(base, env_id)
    rng = _rng_state(base.np_random)  # creates the generator if it was lazily missing
    attrs = _deepcopy_attrs(chain, [_state_items(o) for o in chain], env_id)
    return {
        "format": SNAPSHOT_FORMAT,
        "kind": "env",
        "env_id": env_id,
        "chain": [_qualname(o) for o in chain],
        "attrs": attrs,
        "rng": rng,
        "mujoco": _mujoco_state(base) if _is_mujoco(base) else None,
    }


def _check_mujoco_compat(base: Any, state: dict[str, Any], env_id: str) -> None:
    size = mujoco.mj_stateSize(base.model, _MJ_INTEGRATION)
    if np.shape(state["physics"]) != (size,):
        raise ValueError(
            f"cannot restore {env_id!r}: MuJoCo state has shape {np.shape(state['physics'])} "
            f"but this env's model needs ({size},); the snapshot comes from a different model"
        )
    for k, v in state["derived"].items():
        if not hasattr(base.data, k) or np.shape(getattr(base.data, k)) != np.shape(v):
            raise ValueError(f"cannot restore {env_id!r}: MjData field {k!r} has a different shape")


def _restore_single(env: gym.Env, state: dict[str, Any]) -> None:
    chain = _chain(env)
    base = chain[-1]
    _check_compatible(env, chain, state, "env")
    env_id = state["env_id"]
    if (state["mujoco"] is None) == _is_mujoco(base):
        raise ValueError(f"cannot restore {env_id!r}: MuJoCo state present/absent mismatch")
    if state["mujoco"] is not None:
        _check_mujoco_compat(base, state["mujoco"], env_id)
    _restore_attrs(chain, state["attrs"])
    _set_rng(base, state["rng"])
    if state["mujoco"] is not None:
        _set_mujoco_state(base, state["mujoco"])


def _check_compatible(env: Any, chain: list[Any], state: Any, kind: str) -> None:
    if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"not a snapshot made by rebel.control.snapshot (expected format {SNAPSHOT_FORMAT!r})")
    names = [_qualname(o) for o in chain]
    env_id = _env_id(env)
    if state["kind"] != kind or state["env_id"] != env_id or state["chain"] != names:
        raise ValueError(
            f"cannot restore: the snapshot was taken from env {state['env_id']!r} with wrapper chain "
            f"{_short(state['chain'])}, but the target env is {env_id!r} with wrapper chain {_short(names)}"
        )


# --------------------------------------------------------------------------- vector env
def _vector_base(env: VectorEnv) -> SyncVectorEnv:
    base = _base(env)
    if isinstance(base, AsyncVectorEnv):
        raise TypeError(
            "snapshot/restore cannot reach the sub-environments of an AsyncVectorEnv (they live in "
            "other processes); use gymnasium.vector.SyncVectorEnv (vectorization_mode='sync')"
        )
    if not isinstance(base, SyncVectorEnv):
        raise TypeError(f"snapshot/restore supports gymnasium.vector.SyncVectorEnv only, got {_qualname(base)}")
    return base


def _snapshot_vector(env: VectorEnv) -> dict[str, Any]:
    base = _vector_base(env)
    chain = _chain(env)
    env_id = _env_id(env)
    return {
        "format": SNAPSHOT_FORMAT,
        "kind": "sync_vector",
        "env_id": env_id,
        "chain": [_qualname(o) for o in chain],
        "attrs": _deepcopy_attrs(chain, [_state_items(o) for o in chain], env_id),
        "rng": _rng_state(vars(base).get("_np_random")),  # unused by SyncVectorEnv itself
        "envs": [_snapshot_single(e) for e in base.envs],
    }


def _restore_vector(env: VectorEnv, state: dict[str, Any]) -> None:
    base = _vector_base(env)
    chain = _chain(env)
    _check_compatible(env, chain, state, "sync_vector")
    if len(state["envs"]) != len(base.envs):
        raise ValueError(f"cannot restore: snapshot has {len(state['envs'])} sub-envs, target has {len(base.envs)}")
    for sub, sub_state in zip(base.envs, state["envs"], strict=True):
        _check_compatible(sub, _chain(sub), sub_state, "env")
    _restore_attrs(chain, state["attrs"])
    if state["rng"] is not None:
        _set_rng(base, state["rng"])
    for sub, sub_state in zip(base.envs, state["envs"], strict=True):
        _restore_single(sub, sub_state)


# --------------------------------------------------------------------------- public API
def snapshot(env: gym.Env | VectorEnv) -> dict[str, Any]:
    """Capture the complete state of ``env`` (wrappers, simulator, RNG).

    Raises:
        TypeError: if the env cannot be snapshotted (not MuJoCo and not
            deep-copyable, an AsyncVectorEnv, ...); the message names the env id.
    """
    if isinstance(env, VectorEnv):
        return _snapshot_vector(env)
    if isinstance(env, gym.Env):
        return _snapshot_single(env)
    raise TypeError(f"snapshot() expects a gymnasium.Env or SyncVectorEnv, got {type(env)!r}")


def restore(env: gym.Env | VectorEnv, state: dict[str, Any]) -> None:
    """Put ``env`` back into ``state`` (from :func:`snapshot` on an env with the same id and wrappers).

    ``env`` may be the instance the snapshot came from or another one built the
    same way (e.g. for parallel branch rollouts). ``state`` is not modified and
    can be restored any number of times.

    Raises:
        ValueError: if ``state`` was taken from a different env id or wrapper chain.
        TypeError: for env types that :func:`snapshot` does not support.
    """
    if isinstance(env, VectorEnv):
        _restore_vector(env, state)
    elif isinstance(env, gym.Env):
        _restore_single(env, state)
    else:
        raise TypeError(f"restore() expects a gymnasium.Env or SyncVectorEnv, got {type(env)!r}")


def reseed(env: gym.Env, seed: int) -> None:
    """Restart the env's random generator (``env.unwrapped.np_random``) from ``seed``, leaving
    the rest of its state as it is.

    The generator is reset in place, so wrappers holding it see the new stream. After
    :func:`restore`, copies reseeded with the same seed continue with the same env noise
    (common random numbers) and copies given different seeds with independent noise.
    """
    if not isinstance(env, gym.Env):
        raise TypeError(f"reseed() expects a gymnasium.Env, got {type(env)!r}")
    gen = env.unwrapped.np_random  # created first if it was lazily missing
    gen.bit_generator.state = type(gen.bit_generator)(seed).state


def _normalizers(env: Any) -> Iterator[Any]:
    chain = _chain(env)
    for obj in chain:
        if isinstance(getattr(type(obj), "update_running_mean", None), property):
            yield obj
    if isinstance(chain[-1], SyncVectorEnv):
        for sub in chain[-1].envs:
            yield from _normalizers(sub)


@contextlib.contextmanager
def frozen_normalizers(env: gym.Env | VectorEnv) -> Iterator[list[Any]]:
    """Freeze running statistics of normalizing wrappers inside the ``with`` block.

    Sets ``update_running_mean = False`` on every wrapper in the chain exposing that
    property (gymnasium's ``NormalizeObservation`` / ``NormalizeReward``, single and
    vector versions, and those of SyncVectorEnv sub-envs), and restores each previous
    setting on exit. Yields the list of affected wrappers.
    """
    wrappers = list(_normalizers(env))
    previous = [w.update_running_mean for w in wrappers]
    for w in wrappers:
        w.update_running_mean = False
    try:
        yield wrappers
    finally:
        for w, setting in zip(wrappers, previous, strict=True):
            w.update_running_mean = setting
