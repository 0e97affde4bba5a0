"""Deterministic evaluation and videos of evaluation episodes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from rebel.control.envs import EnvSource, env_name, make_env, missing_package
from rebel.control.policy import MLPPolicy


def evaluate(
    policy: MLPPolicy,
    env: EnvSource,
    episodes: int = 10,
    seed: int = 10_000,
    deterministic: bool = True,
    envs: list[Any] | None = None,
    **env_kwargs: Any,
) -> dict[str, float]:
    """Mean and std of the undiscounted return of ``episodes`` episodes (reset seeds
    ``seed, seed + 1, ...``), all run side by side. ``envs`` reuses already made copies
    (at least ``episodes`` of them; they are reset here)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    own = envs is None
    envs = [make_env(env, **env_kwargs) for _ in range(episodes)] if envs is None else envs[:episodes]
    if len(envs) < episodes:
        raise ValueError(f"evaluate got {len(envs)} envs for {episodes} episodes")
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    returns, lengths = np.zeros(episodes), np.zeros(episodes, dtype=int)
    alive = np.ones(episodes, dtype=bool)
    while alive.any():
        live = np.flatnonzero(alive)
        actions = policy.predict(obs[live], deterministic=deterministic)
        for k, i in enumerate(live):
            obs[i], reward, terminated, truncated, _ = envs[i].step(actions[k])
            returns[i] += reward
            lengths[i] += 1
            alive[i] = not (terminated or truncated)
    if own:
        for e in envs:
            e.close()
    return {"eval_return": float(returns.mean()), "eval_return_std": float(returns.std()), "eval_length": float(lengths.mean())}


def record_video(
    policy: MLPPolicy,
    env: EnvSource,
    path: str | os.PathLike,
    episodes: int = 1,
    seed: int = 10_000,
    fps: int = 30,
    max_frames: int = 1000,
    size: tuple[int, int] = (320, 240),
    **env_kwargs: Any,
) -> Path | None:
    """Render deterministic episodes into an animated GIF at ``path``. MuJoCo renders
    offscreen (``MUJOCO_GL=egl`` unless set). A missing package (pygame, ...) is a ValueError
    saying what to install; when no GL is available or the env cannot render, returns None
    with a warning."""
    try:
        render_env = _render_env(env, size, **env_kwargs)
        frames = []
        for episode in range(episodes):
            obs, _ = render_env.reset(seed=seed + episode)
            frames.append(render_env.render())
            done = False
            while not done and len(frames) < max_frames:
                obs, _, terminated, truncated, _ = render_env.step(policy.predict(obs[None])[0])
                frames.append(render_env.render())
                done = terminated or truncated
        render_env.close()
    except Exception as error:  # noqa: BLE001 - any GL / rendering failure means: no video
        _refuse_missing_package(env, error)
        warnings.warn(
            f"no video of {env!r}: rendering failed ({type(error).__name__}: {error}). "
            "MuJoCo needs an OpenGL backend: install EGL (libegl1) or OSMesa and set MUJOCO_GL=egl or MUJOCO_GL=osmesa.",
            stacklevel=2,
        )
        return None
    from PIL import Image

    images = [Image.fromarray(np.asarray(f)) for f in frames if f is not None]
    if not images:
        warnings.warn(f"no video of {env!r}: the env rendered no frames", stacklevel=2)
        return None
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(out, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return out


def check_rendering(env: EnvSource, **env_kwargs: Any) -> None:
    """Render one frame of ``env``, before a run that ends with a video: a missing package is
    a ValueError saying what to install; any other failure is left to :func:`record_video`."""
    try:
        render_env = _render_env(env, (64, 64), **env_kwargs)
        render_env.reset(seed=0)
        render_env.render()
        render_env.close()
    except Exception as error:  # noqa: BLE001 - only a missing package stops the run
        _refuse_missing_package(env, error)


def _render_env(env: EnvSource, size: tuple[int, int], **env_kwargs: Any) -> Any:
    """``env`` made to render RGB frames of ``size`` (where its constructor takes a size)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    width, height = size
    try:
        return make_env(env, render_mode="rgb_array", width=width, height=height, **env_kwargs)
    except TypeError:  # envs without width/height arguments
        return make_env(env, render_mode="rgb_array", **env_kwargs)


def _refuse_missing_package(env: EnvSource, error: BaseException) -> None:
    missing = missing_package(error)
    if missing is not None:
        raise ValueError(f"cannot render environment {env_name(env)!r}: {missing}") from error
