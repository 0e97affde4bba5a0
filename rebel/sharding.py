"""Several processes, and a policy sharded across them: what the trainer does differently
under each accelerate config (``configs/accelerate/``: ddp, zero2, zero3, fsdp2).

* :func:`make_accelerator` builds the ``Accelerator`` that ``accelerate launch --config_file``
  asked for (the launcher passes its config in environment variables that ``Accelerator()``
  reads), also on CPUs, where accelerate itself would fall back to data parallel.
* :func:`full_weights` gives every process the policy's whole parameters while the sampler
  runs (generation, reward models, the reference log-probs): FSDP2 unshards every module once
  and keeps it unsharded until the collect ends; ZeRO-3 gathers every parameter once, with
  DeepSpeed's per-module gather hooks taken off meanwhile.
* :func:`prepare_frozen` shards a frozen model (a reference copy) like the policy; it too is
  whole inside :func:`full_weights`.
* Checkpoints: ``accelerator.get_state_dict`` and :func:`optimizer_state` gather full tensors
  on the main process (FSDP2: from DTensor shards; data parallel: the tensors themselves) and
  :func:`load_policy_state`, :func:`load_optimizer_state` shard them back; DeepSpeed keeps its
  own files (every process writes its optimizer partition), :func:`save_deepspeed` and
  :func:`load_deepspeed`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def make_accelerator(mixed_precision: str, max_grad_norm: float | None) -> Any:
    """The ``Accelerator`` of the launcher's config (data parallel, DeepSpeed ZeRO, FSDP2).

    The run's ``mixed_precision`` rules; an accelerate config that names another one (other
    than ``no``) is an error. DeepSpeed's ``gradient_clipping`` is ``max_grad_norm`` (a config
    that sets another value is an error; ``auto`` or none takes it). Without CUDA, DeepSpeed
    runs on its CPU accelerator over gloo and FSDP2 on gloo, which accelerate does not set up
    by itself (it starts plain data parallel there).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", mixed_precision):
        raise ValueError(
            f"mixed_precision: the accelerate config says {launcher!r} and the run {mixed_precision!r}; "
            f"set the run's (--mixed-precision {launcher}) or leave the accelerate config at 'no'"
        )
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi_cpu and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    else:
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=multi_cpu)
        if multi_cpu and _env_flag("ACCELERATE_USE_FSDP"):
            _use_fsdp_on_cpu(accelerator)
    if _is(accelerator, "FSDP") and not accelerator.is_fsdp2:
        raise ValueError("fsdp_version 1: rebel runs FSDP2 only (fsdp_version: 2 in the accelerate config, configs/accelerate/fsdp2.yaml)")
    if _is(accelerator, "DEEPSPEED"):
        _fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, max_grad_norm)
    return accelerator


def sharding(accelerator: Any) -> str | None:
    """``fsdp2`` or ``zero3`` when no process holds the whole policy, else None (data
    parallel and ZeRO-1/2, which shard only optimizer states and gradients)."""
    if _is(accelerator, "FSDP"):
        return "fsdp2"
    if _is(accelerator, "DEEPSPEED") and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "zero3"
    return None


def uses_deepspeed(accelerator: Any) -> bool:
    return _is(accelerator, "DEEPSPEED")


@contextlib.contextmanager
def full_weights(accelerator: Any, *models: torch.nn.Module) -> Iterator[None]:
    """Every process holds ``models`` whole inside (every process must enter): the policy and
    the frozen models the sampler uses, for one collection. Generation then costs one gather,
    not one per module and token, and processes that generate a different number of tokens
    never wait for each other; inside, ``parameters()`` are whole tensors."""
    kind = sharding(accelerator)
    with contextlib.ExitStack() as stack:
        for model in models:
            if kind == "fsdp2":
                stack.enter_context(_fsdp2_unsharded(model))
            elif kind == "zero3":
                stack.enter_context(_zero3_gathered(model))
        yield


def prepare_frozen(accelerator: Any, module: torch.nn.Module) -> torch.nn.Module:
    """A frozen model (a reference policy) on the accelerator's device, sharded like the
    policy under FSDP2 and ZeRO-3 (whole only inside :func:`full_weights`)."""
    kind = sharding(accelerator)
    if kind == "fsdp2":
        return accelerator.prepare(module.to(accelerator.device))
    if kind == "zero3":
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.eval()  # DeepSpeedEngine.eval returns None
        return engine
    return module.to(accelerator.device)


@contextlib.contextmanager
def whole_models() -> Iterator[None]:
    """Models built inside are whole on every process. Once accelerate's ZeRO-3 config is
    active in a process, transformers partitions every model it builds (``deepspeed.zero.Init``),
    and a partitioned model cannot be copied (the reference) nor run outside an engine (a
    reward model); the trainer shards the policy and the reference itself."""
    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    active = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    if active is None:
        yield
        return
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active


# ----------------------------------------------------------------- checkpoints


def load_policy_state(accelerator: Any, model: torch.nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Load a full (possibly partial) state dict into every process's shard; returns the
    names the policy lacks."""
    own = set(accelerator.unwrap_model(model).state_dict())
    unexpected = sorted(set(state) - own)
    if unexpected:
        return unexpected
    if sharding(accelerator) == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        accelerator.unwrap_model(model).load_state_dict(state, strict=False)
    return []


def optimizer_state(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state on the main process (every process must call)."""
    if sharding(accelerator) == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, base_optimizer(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if sharding(accelerator) == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, base_optimizer(optimizer), state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def save_deepspeed(model: Any, folder: Path) -> None:
    """DeepSpeed's own checkpoint of the policy and its optimizer (every process writes its
    partition; frozen parameters come back from their source, as in every checkpoint)."""
    model.save_checkpoint(str(folder), tag="state", save_latest=False, exclude_frozen_parameters=True)


def load_deepspeed(model: Any, folder: Path) -> None:
    model.load_checkpoint(str(folder), tag="state", load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False)


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (its ``param_groups``
    hold the learning rate that the wrappers use)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


# ------------------------------------------------------------------- helpers


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def _is(accelerator: Any, kind: str) -> bool:
    return str(accelerator.distributed_type).split(".")[-1] == kind


def _use_fsdp_on_cpu(accelerator: Any) -> None:
    """accelerate sets FSDP up only on accelerator devices; fully_shard runs over gloo on CPUs,
    so the state is switched to FSDP with the launcher's settings (the plugin reads them)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _fill_deepspeed_config(config: dict[str, Any], max_grad_norm: float | None) -> None:
    """DeepSpeed clips gradients itself: with ``max_grad_norm``. The trainer forms its own
    minibatches, so DeepSpeed's micro-batch size (which it only logs) is 1 unless set."""
    clip = 0.0 if max_grad_norm is None else float(max_grad_norm)
    value = config.get("gradient_clipping", "auto")
    if value == "auto":
        config["gradient_clipping"] = clip
    elif float(value) != clip:
        raise ValueError(
            f"gradient_clipping: the DeepSpeed config says {value} and the run's max_grad_norm {max_grad_norm}; "
            "leave it out of the DeepSpeed config (or 'auto') so that max_grad_norm applies"
        )
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = 1


@contextlib.contextmanager
def _fsdp2_unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Every FSDP module of ``model`` unsharded, staying so through forwards of any submodule
    (``generate`` calls the inner model, not the root), then resharded as configured."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model._get_fsdp_state()._lazy_init()  # the root sets itself up at its first forward; a collect may come first
    groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
    after_forward = [g.post_forward_mesh_info for g in groups]  # each group's reshard-after-forward setting
    for module in modules:
        module.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for group, info in zip(groups, after_forward):
            group.post_forward_mesh_info = info
        for module in modules:
            module.reshard()


@contextlib.contextmanager
def _zero3_gathered(engine: Any) -> Iterator[None]:
    """All ZeRO-3 parameters gathered once; DeepSpeed's hooks, which would release each
    module's parameters after its forward, are off meanwhile and put back afterwards."""
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)  # a frozen model's engine has no optimizer of its own
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        offload._remove_module_hooks()
        offload.forward_hooks.clear()
        offload.backward_hooks.clear()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()
