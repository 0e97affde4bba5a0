"""Checks of what a text or diffusion run is given: a model, tokenizer or dataset named by a
path or a hub id (checked before anything loads), a load that still fails (one line naming
it), and the values a reward function returns (one real number per sample)."""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from rebel.config import first_line

# ``name`` or ``org/name``: what the Hugging Face hub accepts as a repository id
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
T = TypeVar("T")


def check_source(source: Any, what: str, expected: str) -> None:
    """``source`` (a path or a hub id; an object passes) must exist on this machine or have
    the shape of a hub id; otherwise a FileNotFoundError naming it and what is ``expected``."""
    if not isinstance(source, (str, Path)):
        return
    if not Path(source).exists() and not is_hub_id(str(source)):
        raise FileNotFoundError(f"{what} {str(source)!r} does not exist; expected {expected}")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hugging Face hub id: ``name`` or ``org/name``."""
    return HUB_ID.fullmatch(text) is not None and ".." not in text


def load_pretrained(load: Callable[..., T], source: str | Path, what: str, expected: str, **kwargs: Any) -> T:
    """``load(source, **kwargs)`` (a ``from_pretrained``) after :func:`check_source`. A load
    that fails is one line naming ``source``: a FileNotFoundError when files were missing or
    unreachable (an OSError), else a ValueError."""
    check_source(source, what, expected)
    try:
        return load(str(source), **kwargs)
    except (OSError, ValueError) as error:
        kind = FileNotFoundError if isinstance(error, OSError) else ValueError
        raise kind(f"cannot load the {what} {str(source)!r} ({first_line(error)}); expected {expected}") from error


def root_cause(error: BaseException) -> BaseException:
    """The innermost error of ``error``'s ``raise ... from`` chain (libraries wrap the telling one)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


# ------------------------------------------------------------------ rewards


class RewardFunctionError(ValueError):
    """A reward function raised, or returned the wrong number or kind of values, or a non-finite one."""


def reward_name(fn: Any) -> str:
    """The name metrics and errors use for a reward function."""
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


def call_reward_function(fn: Callable[..., Any], count: int, unit: str, *args: Any, **kwargs: Any) -> Tensor:
    """``fn(*args, **kwargs)``: the rewards of ``count`` samples as :func:`reward_values` checks
    them; an error ``fn`` raises is a :class:`RewardFunctionError` naming it."""
    name = reward_name(fn)
    try:
        values = fn(*args, **kwargs)
    except Exception as error:
        raise RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {error}") from error
    return reward_values(name, values, count, unit)


def reward_values(name: str, values: Any, count: int, unit: str) -> Tensor:
    """What the reward function ``name`` returned for ``count`` samples (``unit``: what a
    sample is) as ``[count]`` float64: one real number each (floats, ints, numpy or torch
    numbers; not bools or strings), finite; a :class:`RewardFunctionError` otherwise."""
    expected = f"expected one float per {unit} (ints and numpy or torch numbers are fine, bools are not)"
    if isinstance(values, Tensor) or (isinstance(values, np.ndarray) and values.dtype != object):
        if not _real_dtype(values.dtype):
            raise RewardFunctionError(f"reward function {name!r} returned a {type(values).__name__} of {values.dtype}; {expected}")
        items = values.flatten().tolist()
    elif isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
        raise RewardFunctionError(f"reward function {name!r} returned a {type(values).__name__}; {expected}")
    else:
        items = list(values)
    for item in items:
        if not _is_real(item):
            raise RewardFunctionError(f"reward function {name!r} returned a {type(item).__name__} ({item!r}); {expected}")
    if len(items) != count:
        raise RewardFunctionError(f"reward function {name!r} returned {len(items)} values for {count} {unit}s")
    out = torch.tensor([float(v) for v in items], dtype=torch.float64)
    bad = torch.nonzero(~torch.isfinite(out)).flatten().tolist()
    if bad:
        raise RewardFunctionError(f"reward function {name!r} returned non-finite values (nan or inf) for {unit}s {bad[:10]}")
    return out


def _real_dtype(dtype: Any) -> bool:
    if isinstance(dtype, torch.dtype):
        return dtype != torch.bool and not dtype.is_complex
    return np.dtype(dtype).kind in "iuf"


def _is_real(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and _real_dtype(value.dtype)
    if isinstance(value, np.ndarray):
        return value.size == 1 and _real_dtype(value.dtype)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
