"""Sampling completions and scoring them: the text adapter's :class:`rebel.Sampler`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rebel.batch import RolloutBatch
from rebel.config import check_group_size, check_int
from rebel.hf.inputs import reward_name
from rebel.policy import Policy
from rebel.sampler import Sampler
from rebel.text.data import PromptDataset, is_conversation, render_prompt
from rebel.text.generation import GenerationBackend, SamplingSettings, make_backend
from rebel.text.policy import CausalLMPolicy
from rebel.text.rewards import RewardFunc, as_reward_funcs, call_reward


class PromptCursor(Sampler):
    """A sampler that takes ``prompts_per_iteration`` records a process and iteration from a
    dataset of ``len(self.dataset)`` records, in an epoch-seeded order (``data_seed``,
    ``shuffle``), and draws its random numbers from ``self.generator``; its state (the cursor
    and the generator) resumes exactly."""

    dataset: Any
    prompts_per_iteration: int
    data_seed: int
    shuffle: bool
    epoch: int
    position: int
    generator: torch.Generator

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generator.set_state(state["generator"])

    def next_indices(self) -> list[int]:
        """This process's prompts of the next iteration: a slice of the global prompt order
        (an epoch-seeded permutation), so processes never share a prompt in an iteration."""
        rank, world = _rank_and_world()
        k, n = self.prompts_per_iteration, len(self.dataset)
        taken: list[int] = []
        while len(taken) < k * world:
            order = self._order(self.epoch, n)
            step = min(k * world - len(taken), n - self.position)
            taken += order[self.position : self.position + step]
            self.position += step
            if self.position == n:
                self.epoch, self.position = self.epoch + 1, 0
        return taken[rank * k : (rank + 1) * k]

    def _order(self, epoch: int, n: int) -> list[int]:
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.data_seed * 100_003 + epoch)).tolist()


class TextSampler(PromptCursor):
    """Each iteration takes ``prompts_per_iteration`` prompts (per process) from the
    dataset and samples ``num_generations`` completions of each (one group per prompt).

    Args:
        dataset: prompts (see :class:`~rebel.text.data.PromptDataset`).
        reward_funcs: callables ``fn(prompts, completions, **columns) -> list[float]`` or
            reward models; their weighted sum is the reward.
        reward_weights: one weight per function (default 1 each).
        num_generations: completions per prompt (>= 2).
        prompts_per_iteration: prompts per iteration and process.
        max_new_tokens: completion length limit.
        top_p, top_k: nucleus / top-k truncation of sampling (``top_k=0``: none). The
            policy scores the untruncated distribution at its temperature.
        generation_kwargs: ``GenerationConfig`` fields that change speed or memory, not the
            sampled distribution (:data:`~rebel.text.generation.GENERATION_KWARGS`); any
            other is refused (transformers backend only).
        generation_batch_size: sequences per ``generate`` call (default: all at once).
        generation_backend: ``"transformers"`` (``model.generate``), ``"vllm"`` (a vLLM
            engine that gets the policy's weights before each collection) or a
            :class:`~rebel.text.generation.GenerationBackend`.
        vllm_mode, vllm_server_url, vllm_max_model_length, vllm_gpu_memory_utilization, vllm_kwargs:
            the vLLM engine's settings (see :class:`~rebel.text.vllm.VLLMGeneration`).
        max_prompt_length: prompts are cut to their last ``max_prompt_length`` tokens.
        missing_eos_penalty: subtracted from the reward of a completion without EOS.
        kl_coef: ``kl_coef * (log pi(y|x) - log pi_ref(y|x))`` is subtracted from the reward.
        reference_model: the frozen reference for ``kl_coef`` (default: the policy with
            its LoRA adapter disabled).
        data_seed: seed of the prompt order (the same on every process; processes take
            disjoint slices of it).
        shuffle: reshuffle the prompts every pass over the dataset.
    """

    def __init__(
        self,
        dataset: Any,
        reward_funcs: Any,
        *,
        reward_weights: Sequence[float] | None = None,
        reward_processing_classes: Sequence[Any] | None = None,
        num_generations: int = 2,
        prompts_per_iteration: int = 8,
        max_new_tokens: int = 64,
        top_p: float = 1.0,
        top_k: int = 0,
        generation_kwargs: dict[str, Any] | None = None,
        generation_batch_size: int | None = None,
        generation_backend: str | GenerationBackend = "transformers",
        vllm_mode: str = "colocate",
        vllm_server_url: str = "http://127.0.0.1:8000",
        vllm_max_model_length: int | None = None,
        vllm_gpu_memory_utilization: float = 0.3,
        vllm_kwargs: dict[str, Any] | None = None,
        max_prompt_length: int | None = None,
        missing_eos_penalty: float | None = None,
        kl_coef: float = 0.0,
        reference_model: Any = None,
        data_seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        check_group_size("num_generations", num_generations)
        check_int("prompts_per_iteration", prompts_per_iteration)
        check_int("max_new_tokens", max_new_tokens)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.backend = sampler_backend(generation_backend, generation_kwargs, generation_batch_size, vllm_mode, vllm_server_url,
                                       vllm_max_model_length, vllm_gpu_memory_utilization, vllm_kwargs)  # fmt: skip
        self.dataset = PromptDataset(dataset)
        self.reward_funcs: list[RewardFunc] = as_reward_funcs(reward_funcs, reward_processing_classes)
        weights = [1.0] * len(self.reward_funcs) if reward_weights is None else [float(w) for w in reward_weights]
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions")
        self.reward_weights = weights
        self.num_generations = num_generations
        self.prompts_per_iteration = prompts_per_iteration
        self.max_new_tokens = max_new_tokens
        self.top_p, self.top_k = top_p, top_k
        self.max_prompt_length = max_prompt_length
        self.missing_eos_penalty = missing_eos_penalty
        self.kl_coef = kl_coef
        self.reference_model = reference_model.eval().requires_grad_(False) if reference_model is not None else None
        self.data_seed, self.shuffle = data_seed, shuffle
        self.epoch, self.position = 0, 0  # the data cursor over the global prompt order
        self.generator = torch.Generator().manual_seed(data_seed)
        self.last_samples: list[dict[str, Any]] = []  # the last batch, for logging

    # ----------------------------------------------------------- collect
    def collect(self, policy: Policy) -> RolloutBatch:
        if not isinstance(policy, CausalLMPolicy):
            raise TypeError(f"TextSampler samples from a CausalLMPolicy, got {type(policy).__name__}")
        tokenizer, device = policy.tokenizer, next(policy.parameters()).device
        records = [self.dataset[i] for i in self.next_indices()]
        prompts = [r["prompt"] for r in records]
        texts = [render_prompt(p, tokenizer) for p in prompts]
        g = self.num_generations
        conversational = is_conversation(prompts[0])
        enc = self._tokenize(tokenizer, texts, add_special_tokens=not conversational)
        prompt_ids = enc["input_ids"].repeat_interleave(g, 0).to(device)
        prompt_mask = enc["attention_mask"].repeat_interleave(g, 0).to(device)
        completion = self._generate(policy, prompt_ids, prompt_mask)
        mask = completion_mask(completion, policy.eos_token_ids)
        length = int(mask.sum(1).max().clamp_min(1))
        completion, mask = completion[:, :length], mask[:, :length]
        completion = torch.where(mask, completion, torch.full_like(completion, tokenizer.pad_token_id))
        has_eos = torch.isin(completion, torch.tensor(policy.eos_token_ids, device=device)).any(1)
        input_ids = torch.cat([prompt_ids, completion], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)

        content = (mask.sum(1) - has_eos.long()).tolist()  # tokens before the EOS
        texts_out = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(completion.tolist(), content)]
        completions: list[Any] = [[{"role": "assistant", "content": t}] for t in texts_out] if conversational else texts_out
        rep = [k for k in range(len(records)) for _ in range(g)]
        columns = {key: [records[k].get(key) for k in rep] for key in records[0] if key != "prompt"}
        scores = {}
        reward = torch.zeros(len(rep), dtype=torch.float64)
        for fn, weight in zip(self.reward_funcs, self.reward_weights):
            if hasattr(fn, "to"):
                fn.to(device)
            values = call_reward(fn, [prompts[k] for k in rep], completions, columns)
            scores[reward_name(fn)] = values
            reward += weight * values
        stats = {f"rewards/{name}": v.mean().item() for name, v in scores.items()}
        stats["score_mean"] = reward.mean().item()
        if self.missing_eos_penalty is not None:
            reward -= self.missing_eos_penalty * (~has_eos).double().cpu()
        if self.kl_coef > 0:
            ref_kl = self._reference_kl(policy, input_ids, attention_mask, mask)
            reward -= self.kl_coef * ref_kl
            stats["ref_kl"] = ref_kl.mean().item()
        lengths = mask.sum(1).float()
        stats.update(
            completion_length=lengths.mean().item(),
            completion_length_max=lengths.max().item(),
            eos_fraction=has_eos.float().mean().item(),
        )
        self.last_samples = [
            {
                "prompt": texts[k],
                "completion": texts_out[n],
                "reward": reward[n].item(),
                **{name: v[n].item() for name, v in scores.items()},
            }
            for n, k in enumerate(rep)
        ]
        return RolloutBatch(
            group=torch.tensor(rep),
            reward=reward.float(),
            mask=mask.cpu(),
            data={"input_ids": input_ids.cpu(), "attention_mask": attention_mask.cpu()},
            context=[texts[k] for k in rep],
            counts={"tokens": float(mask.sum()), "prompts": float(len(records))},
            stats=stats,
        )

    # ---------------------------------------------------------- helpers
    def _tokenize(self, tokenizer: Any, texts: list[str], add_special_tokens: bool) -> dict[str, Tensor]:
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        finally:
            tokenizer.padding_side = side
        if self.max_prompt_length is not None:
            enc = {k: v[:, -self.max_prompt_length :] for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _generate(self, policy: CausalLMPolicy, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """``[N, max_new_tokens]`` sampled tokens (pad after an early stop) from the backend,
        drawn with the sampler's own generator so that a resumed run draws the same completions."""
        settings = SamplingSettings(
            temperature=policy.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=tuple(policy.eos_token_ids),
            pad_token_id=policy.tokenizer.pad_token_id,
        )
        return self.backend.generate(policy, prompt_ids, prompt_mask, settings, self.generator)

    def _reference_kl(self, policy: CausalLMPolicy, input_ids: Tensor, attention_mask: Tensor, mask: Tensor) -> Tensor:
        """``log pi(y|x) - log pi_ref(y|x)`` of each completion (float64, on the CPU)."""
        t = mask.shape[1]
        logp = policy.token_log_probs(input_ids, attention_mask, t)
        if self.reference_model is not None:
            if next(self.reference_model.parameters()).device != input_ids.device:
                self.reference_model.to(input_ids.device)
            ref = policy.token_log_probs(input_ids, attention_mask, t, model=self.reference_model)
        else:
            with policy.adapter_disabled():
                ref = policy.token_log_probs(input_ids, attention_mask, t)
        return torch.where(mask, logp - ref, 0.0).sum(1).double().cpu()  # a select: nan/inf at masked positions stay out


def sampler_backend(
    backend: str | GenerationBackend,
    generation_kwargs: dict[str, Any] | None = None,
    generation_batch_size: int | None = None,
    vllm_mode: str = "colocate",
    vllm_server_url: str = "http://127.0.0.1:8000",
    vllm_max_model_length: int | None = None,
    vllm_gpu_memory_utilization: float = 0.3,
    vllm_kwargs: dict[str, Any] | None = None,
) -> GenerationBackend:
    """``backend`` itself when it is a :class:`GenerationBackend`, else the one it names, from
    the samplers' settings of the same names."""
    if isinstance(backend, GenerationBackend):
        return backend
    return make_backend(
        backend,
        generation_kwargs=generation_kwargs,
        generation_batch_size=generation_batch_size,
        mode=vllm_mode,
        server_url=vllm_server_url,
        max_model_length=vllm_max_model_length,
        gpu_memory_utilization=vllm_gpu_memory_utilization,
        vllm_kwargs=vllm_kwargs,
    )


def completion_mask(tokens: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """``[N, T]`` bool: each completion's tokens up to and including its first EOS."""
    is_eos = torch.isin(tokens, torch.tensor(list(eos_ids), device=tokens.device))
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()  # EOS tokens strictly before each position
    return before == 0


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
