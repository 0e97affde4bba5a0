"""Generation with a vLLM engine that holds the policy's current weights.

The engine is built from the policy's model config with placeholder weights
(``load_format="dummy"``) and gets the policy's weights before every collection, in the
checkpoint's own names (``reload_weights``), so it never reads a model folder: a model
object, a LoRA policy or a GGUF-loaded model all work the same. A LoRA adapter is sent
merged (``W + scale * B @ A`` per layer, computed aside: the policy's own weights are not
touched), so the engine runs the plain model at full speed.

Nothing else than the policy's distribution is sampled: the engine ignores the model's
``generation_config.json`` (``generation_config="vllm"``), runs in the policy's dtype,
and each request's ``SamplingParams`` are set field by field from
:class:`~rebel.text.generation.SamplingSettings` (no penalties, no ``min_p``, no
``min_tokens``, stop only at the policy's EOS ids). Each request has its own seed, drawn
from the sampler's generator, or the caller's row seed (``generate(..., row_seeds=...)``):
vLLM gives a seeded request a generator of its own, so requests with the same seed and
prefix draw the same tokens whatever else the engine runs.

``vllm_mode="colocate"`` runs the engine in the training process (:class:`LocalEngine`);
``"server"`` sends prompts and weights to ``rebel vllm-serve`` (:class:`ServerEngine`),
which runs the same :class:`LocalEngine` in its own process, on other devices or nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rebel.config import check_choice
from rebel.text.generation import VLLM_EXTRA, VLLM_MODES, GenerationBackend, SamplingSettings, check_row_seeds, check_vllm_kwargs


class LocalEngine:
    """A ``vllm.LLM`` in this process, built from a model config with placeholder weights.

    Args:
        config: the model's ``config.json`` as a dict (see :func:`engine_config`).
        dtype: the policy's parameter dtype name (the engine computes in it).
        max_model_length: longest prompt + completion (default: the model's).
        gpu_memory_utilization: share of the device's memory the engine may take.
        vllm_kwargs: more ``vllm.LLM`` arguments, from :data:`VLLM_KWARGS` only.
    """

    def __init__(
        self,
        config: dict[str, Any],
        dtype: str,
        max_model_length: int | None = None,
        gpu_memory_utilization: float = 0.3,
        vllm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        check_vllm_kwargs(vllm_kwargs or {})
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights pass by reference
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(f"generation_backend='vllm' needs vLLM, which is not installed: {VLLM_EXTRA}") from error
        self._owns_process_group = not torch.distributed.is_initialized()  # else the trainer's (accelerate's)
        self._set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it for the whole process
        self._folder = tempfile.TemporaryDirectory(prefix="rebel-vllm-")
        (Path(self._folder.name) / "config.json").write_text(json.dumps(config))
        self.llm = LLM(
            model=self._folder.name,
            skip_tokenizer_init=True,  # token ids in, token ids out: the policy's tokenizer does the rest
            load_format="dummy",  # weights come from the policy (load_weights)
            dtype=dtype,
            generation_config="vllm",  # not the model's generation_config.json
            max_model_len=max_model_length,
            gpu_memory_utilization=gpu_memory_utilization,
            **(vllm_kwargs or {}),
        )
        self.max_model_length = int(self.llm.llm_engine.model_config.max_model_len)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Replace the engine's weights (checkpoint names and layouts) and drop its
        prefix cache, which holds keys and values of the old weights."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def sample(self, prompts: list[list[int]], settings: SamplingSettings, seeds: list[int]) -> list[list[int]]:
        """One completion of each prompt (token ids, the EOS included), request ``k`` seeded with ``seeds[k]``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [sampling_params(SamplingParams, settings, seed) for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def close(self) -> None:
        """Free the engine (its KV cache and weights) and give ``torch.set_num_threads`` back;
        vLLM's process groups too when the engine set up torch's default group. Inside a
        trainer's group they stay (that group is not the engine's to end), and a later engine
        in this process takes them up again."""
        import gc

        with _keep_default_process_group(not self._owns_process_group):
            del self.llm  # vLLM's shutdown destroys torch's default process group, the trainer's one when it was there first
            gc.collect()
        torch.set_num_threads = self._set_num_threads
        if self._owns_process_group:
            from vllm.distributed import parallel_state

            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()
        self._folder.cleanup()


@contextlib.contextmanager
def _keep_default_process_group(keep: bool) -> Iterator[None]:
    """While it lasts (with ``keep``), ``torch.distributed.destroy_process_group`` spares the
    default group (vLLM's own groups inside it still go)."""
    destroy = torch.distributed.destroy_process_group
    if keep:

        def spare_default(group: Any = None) -> None:
            if group is not None and group is not torch.distributed.GroupMember.WORLD:
                destroy(group)

        torch.distributed.destroy_process_group = spare_default
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


class VLLMGeneration(GenerationBackend):
    """Samples with a vLLM engine that gets the policy's weights before each collection.

    Args:
        mode: ``"colocate"`` (an engine in this process) or ``"server"`` (``rebel
            vllm-serve`` at ``server_url``).
        server_url: the server's address (``mode="server"``).
        max_model_length: longest prompt + completion the engine holds (default: the model's).
        gpu_memory_utilization: share of the device's memory a colocated engine takes.
        vllm_kwargs: more ``vllm.LLM`` arguments (:data:`VLLM_KWARGS`: speed, memory, placement).
    """

    def __init__(
        self,
        mode: str = "colocate",
        server_url: str = "http://127.0.0.1:8000",
        max_model_length: int | None = None,
        gpu_memory_utilization: float = 0.3,
        vllm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        check_choice("vllm_mode", mode, VLLM_MODES)
        check_vllm_kwargs(vllm_kwargs or {})
        self.mode, self.server_url = mode, server_url
        self.max_model_length, self.gpu_memory_utilization = max_model_length, gpu_memory_utilization
        self.vllm_kwargs = dict(vllm_kwargs or {})
        self.engine: Any = None
        self._built_for: tuple[dict[str, Any], str] | None = None  # the model config and dtype the engine was built from
        self._weights_fixed = False  # inside fixed_weights, after the first sync

    @contextlib.contextmanager
    def fixed_weights(self, policy: Any) -> Iterator[None]:
        """The policy's weights go to the engine once for the whole block."""
        self.sync(policy)
        self._weights_fixed = True
        try:
            yield
        finally:
            self._weights_fixed = False

    def generate(
        self,
        policy: Any,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        settings: SamplingSettings,
        generator: torch.Generator,
        row_seeds: Sequence[int] | None = None,
    ) -> Tensor:
        if row_seeds is not None:
            check_row_seeds(row_seeds, len(prompt_ids))
        engine = self.engine if self._weights_fixed else self.sync(policy)
        longest = int(prompt_mask.sum(1).max()) + settings.max_new_tokens
        if longest > engine.max_model_length:
            raise ValueError(
                f"a prompt of {longest - settings.max_new_tokens} tokens + max_new_tokens {settings.max_new_tokens} is longer than the "
                f"vLLM engine's max_model_length {engine.max_model_length} (vllm_max_model_length, max_prompt_length)"
            )
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        seeds = (
            [int(s) for s in row_seeds] if row_seeds is not None else torch.randint(0, 2**62, (len(prompts),), generator=generator).tolist()
        )
        completions = engine.sample(prompts, settings, seeds)
        width = settings.max_new_tokens
        rows = [c + [settings.pad_token_id] * (width - len(c)) for c in completions]
        return torch.tensor(rows, dtype=prompt_ids.dtype).to(prompt_ids.device)

    def sync(self, policy: Any) -> Any:
        """The engine (built on first use) holding the policy's current weights."""
        model = policy.model
        config = engine_config(model)
        dtype = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")
        if self.engine is not None and self._built_for != (config, dtype):
            self.close()  # another model (or dtype) than the engine's: build one for it
        if self.engine is None:
            self._built_for = (config, dtype)
            if self.mode == "colocate":
                self.engine = LocalEngine(config, dtype, self.max_model_length, self.gpu_memory_utilization, self.vllm_kwargs)
            else:
                from rebel.text.vllm_server import ServerEngine

                self.engine = ServerEngine(self.server_url, config, dtype, self.max_model_length)
        with torch.no_grad():
            self.engine.load_weights(checkpoint_weights(model))
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def sampling_params(cls: Any, settings: SamplingSettings, seed: int) -> Any:
    """vLLM ``SamplingParams`` that draw from ``softmax(logits / temperature)`` (truncated by
    ``top_p``/``top_k`` only when asked): every field that could change it is set here."""
    return cls(
        n=1,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        min_p=0.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        max_tokens=settings.max_new_tokens,
        min_tokens=0,
        stop_token_ids=list(settings.eos_token_ids),
        ignore_eos=True,  # the engine's own EOS (from its config) does not stop; the policy's EOS ids do
        seed=seed,
        detokenize=False,
        watermarking=False,
    )


def checkpoint_weights(model: Any) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of the model's weights as its checkpoint names them, whole (FSDP2's
    sharded tensors gathered: every process must take part); a LoRA model's layers come
    merged (``W + delta``, computed aside, the model untouched)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora = {name: module for name, module in base.named_modules() if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")}
    for name, tensor in base.state_dict().items():
        if "lora_magnitude_vector" in name:
            raise ValueError("generation_backend='vllm' merges LoRA adapters; DoRA (use_dora) is not supported")
        if ".lora_" in name:
            continue
        tensor = _whole(tensor)
        module_name, _, leaf = name.partition(".base_layer.")
        if leaf:
            layer = lora[module_name]
            if leaf == "weight" and not getattr(layer, "merged", False) and not getattr(layer, "disable_adapters", False):
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        tensor = tensor + _whole(layer.get_delta_weight(adapter)).to(tensor.dtype)
            name = f"{module_name}.{leaf}"
        yield name, tensor


def _whole(tensor: Tensor) -> Tensor:
    """A DTensor (FSDP2's shard) gathered into a plain tensor; any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def engine_config(model: Any) -> dict[str, Any]:
    """The (base) model's ``config.json`` for the engine: its class named as the
    architecture, no quantization section (the engine gets plain weights)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = json.loads(base.config.to_json_string(use_diff=False))
    config.pop("quantization_config", None)
    config["architectures"] = [type(base).__name__]
    return config
