"""What a run shows on the terminal besides the trainer's bar: the progress of long set-up
steps, and none of the libraries' messages that a user cannot act on.

:func:`hide_library_noise` (called by ``import rebel``) drops, by logger and message only:

* transformers' "``X`` requires torchvision (not installed); falling back to ``XPil``" (the
  PIL image processors it falls back to are the ones REBEL uses);
* DeepSpeed's "Setting accelerator to CPU" (accelerate imports DeepSpeed when it is
  installed, on machines without a GPU too).

:func:`quiet_saving` hides transformers' "Writing model shards" bar while a model is saved,
and :func:`quiet_generation` its advice to pass an ``attention_mask`` while REBEL samples
(REBEL always passes one; ``generate`` drops an all-ones mask itself, then warns when the
next input of a finished row is a pad token). Every other warning of these libraries, and
every warning of REBEL's own, still shows.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator

# logger name -> parts of the messages dropped from it
HIDDEN_MESSAGES: dict[str, tuple[str, ...]] = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class _DropMessages(logging.Filter):
    def __init__(self, parts: tuple[str, ...]) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


# transformers' warning when a padded input has no attention_mask (see quiet_generation)
MASK_ADVICE = ("transformers.modeling_utils", "We strongly recommend passing in an `attention_mask`")


def hide_library_noise() -> None:
    """Drop the messages of :data:`HIDDEN_MESSAGES` (idempotent; imports no library)."""
    for name, parts in HIDDEN_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(parts))


@contextlib.contextmanager
def quiet_generation() -> Iterator[None]:
    """Within the block, transformers' advice to pass an ``attention_mask`` is dropped (see the
    module's docstring). Outside it the advice shows, unless it was dropped here before:
    transformers gives it once per process."""
    name, part = MASK_ADVICE
    logger, drop = logging.getLogger(name), _DropMessages((part,))
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def quiet_saving() -> Iterator[None]:
    """Within the block, transformers' progress bars (its "Writing model shards") are off;
    they come back as they were after it. Nothing happens when transformers is not loaded."""
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is None or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def stage(steps: int, description: str, progress: bool) -> Iterable[int]:
    """``range(steps)`` of a set-up stage; with ``progress``, a bar on stderr while it runs and
    one line when it is done, ``<description>: N steps in S s``."""
    if not progress:
        yield from range(steps)
        return
    from tqdm.auto import tqdm

    start = time.perf_counter()
    yield from tqdm(range(steps), desc=description, leave=False, dynamic_ncols=True)
    print(f"{description}: {steps} steps in {time.perf_counter() - start:.1f} s", flush=True)
