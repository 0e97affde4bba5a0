"""A causal language model as a REBEL policy: tokens are the steps.

A trajectory is a completion of a prompt. ``batch.data`` holds ``input_ids`` and
``attention_mask`` of shape ``[B, P + T]``: the prompt, left-padded to ``P`` tokens,
followed by ``T`` completion slots. ``batch.mask`` (``[B, T]``) covers the completion
tokens up to and including the first EOS. Step ``h`` is the token at ``P + h``, scored
by the logits at ``P + h - 1`` divided by the sampling temperature.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rebel.batch import RolloutBatch
from rebel.config import check_int
from rebel.hf.inputs import load_pretrained
from rebel.policy import Policy
from rebel.sharding import whole_models

MODEL_EXPECTED = "a model folder or a hub id (org/name)"
LOGPROB_CHUNK_SIZE = 512
# model types whose logits are exactly ``get_output_embeddings()(base_model(...)[0])`` (no
# soft-capping or scaling after the head), each tested against the plain computation
LEAN_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "gemma", "olmo2"})


class CausalLMPolicy(Policy):
    """REBEL policy over any ``AutoModelForCausalLM``.

    Args:
        model: a local folder, a hub id, or a model object.
        tokenizer: a tokenizer (or its folder / hub id); default: loaded from ``model``'s
            folder or hub id. A missing pad token is set to the EOS token.
        temperature: log-probabilities use ``logits / temperature`` (the sampling temperature).
        peft_config: a ``peft`` config (LoRA, ...): only the adapter is trained.
        gradient_checkpointing: recompute activations in the backward pass.
        logprob_chunk_size: completion tokens whose logits are computed at a time (the
            lean log-probs of :func:`chunked_log_probs`); 0: all logits at once.
        model_kwargs: passed to ``from_pretrained`` (``dtype``, ``gguf_file``, ...).

    Dropout is switched off everywhere (its probabilities set to 0), so scoring and
    training are the same computation.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        temperature: float = 1.0,
        peft_config: Any = None,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = LOGPROB_CHUNK_SIZE,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        check_int("logprob_chunk_size", logprob_chunk_size, minimum=0)
        source = model if isinstance(model, (str, Path)) else getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if isinstance(model, (str, Path)):
            from transformers import AutoModelForCausalLM

            model = load_pretrained(AutoModelForCausalLM.from_pretrained, model, "model", MODEL_EXPECTED, **(model_kwargs or {}))
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else source, model_kwargs)
        self.temperature = float(temperature)
        self.gradient_checkpointing = gradient_checkpointing
        self.logprob_chunk_size = logprob_chunk_size
        if gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            if peft_config is not None and hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        disable_dropout(model)
        self.model = model
        # accelerate's FSDP2 (transformer-based wrap) shards each of these blocks on its own
        self._no_split_modules = getattr(_base_model(model), "_no_split_modules", None)
        if logprob_chunk_size and decoder_and_head(model) is None:
            model_type = getattr(getattr(_base_model(model), "config", None), "model_type", None)
            warnings.warn(
                f"logprob_chunk_size: model type {model_type!r} is not one of {sorted(LEAN_MODEL_TYPES)}; its log-probs use the plain computation (all logits at once)",
                stacklevel=2,
            )
        self.eos_token_ids = eos_token_ids(model, self.tokenizer)
        self._forward_args = set(inspect.signature(_base_model(model).forward).parameters)
        self.train(True)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> CausalLMPolicy:
        """Dropout stays off; the inner model is in training mode only when gradient
        checkpointing needs it (transformers checkpoints only in training mode)."""
        super().train(mode)
        self.model.train(mode and self.gradient_checkpointing)
        return self

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[Any]:
        """The inner model in eval mode (KV cache on) for ``generate``, with a blank
        ``generation_config``: ``generate`` fills every field its ``generation_config``
        argument leaves unset from the model's own (``generation_config.json``: a repetition
        penalty, suppressed tokens, ...), which the scoring forward does not apply."""
        from transformers import GenerationConfig

        base = _base_model(self.model)
        was_training, own_config = self.model.training, base.generation_config
        self.model.eval()
        base.generation_config = GenerationConfig()
        try:
            yield self.model
        finally:
            base.generation_config = own_config
            self.model.train(was_training)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The base model without its LoRA adapter (the reference policy)."""
        if not self.is_peft:
            raise ValueError("the policy has no adapter to disable (no peft_config)")
        with self.model.disable_adapter():
            yield

    # --------------------------------------------------------------- scoring
    def step_log_probs(self, batch: RolloutBatch) -> Tensor:
        """``[B, T]`` log pi(token_{P+h} | tokens_{<P+h}) of the completion tokens."""
        return self.token_log_probs(batch.data["input_ids"], batch.data["attention_mask"], batch.mask.shape[1])

    def token_log_probs(self, input_ids: Tensor, attention_mask: Tensor, completion_length: int, model: Any = None) -> Tensor:
        """Log-probabilities of the last ``completion_length`` tokens of ``input_ids``
        (``model`` defaults to the policy's own; a frozen reference may be passed).

        With ``logprob_chunk_size > 0`` and a model whose logits are its head applied to its
        decoder's hidden states (:data:`LEAN_MODEL_TYPES`), only the attended completion tokens
        are scored, ``logprob_chunk_size`` at a time (:func:`chunked_log_probs`); the others are 0.
        """
        model = self.model if model is None else model
        t = completion_length
        targets = input_ids[:, -t:]
        parts = decoder_and_head(model) if self.logprob_chunk_size else None
        if parts is None:
            inputs = model_inputs(input_ids, attention_mask, self._forward_args)
            if "logits_to_keep" in self._forward_args:
                inputs["logits_to_keep"] = t + 1
            logits = model(**inputs).logits[:, -(t + 1) : -1]
            return log_softmax_at(logits, targets, self.temperature)
        decoder, head = parts
        inputs = model_inputs(input_ids, attention_mask, inspect.signature(decoder.forward).parameters)
        hidden = decoder(**inputs)[0][:, -(t + 1) : -1]
        keep = attention_mask[:, -t:].bool()
        return chunked_log_probs(head, hidden, targets, keep, self.temperature, self.logprob_chunk_size)

    # ---------------------------------------------------------------- saving
    def save_pretrained(self, path: str | Path, merged: bool = False, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the model (or its LoRA adapter) and the tokenizer to ``path``;
        ``merged=True`` folds a LoRA adapter into the base weights first. ``state_dict``:
        this policy's full tensors, gathered from the processes that shard it."""
        path = Path(path)
        model = self.model if state_dict is None else self._whole_copy(state_dict)
        if merged and self.is_peft:
            import copy

            model = (copy.deepcopy(model) if model is self.model else model).merge_and_unload()
        with _gguf_weights_as_plain(model):
            model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        return path

    def _whole_copy(self, state_dict: dict[str, Tensor]) -> Any:
        """An unsharded copy of the model (LoRA adapter included) that holds ``state_dict``'s
        tensors, built on the meta device (nothing is initialised or copied)."""
        from transformers import AutoModelForCausalLM

        base = _base_model(self.model)
        with whole_models(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base.config)
            if self.is_peft:
                from peft import get_peft_model

                model = get_peft_model(model, self.model.peft_config[self.model.active_adapter])
        prefix = "model."
        model.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}, assign=True)
        _base_model(model).tie_weights()  # tied tensors (embeddings and LM head) came back as separate copies
        return model


# ------------------------------------------------------------------ helpers


def load_tokenizer(tokenizer: Any, model_kwargs: dict[str, Any] | None = None) -> Any:
    """A tokenizer object from an object, a folder or a hub id; pad token set to EOS if missing."""
    if tokenizer is None:
        raise ValueError("no tokenizer: pass one (processing_class / tokenizer) when the model is an object without a source folder")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        extra = {k: v for k, v in (model_kwargs or {}).items() if k == "gguf_file"}
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer, "tokenizer", MODEL_EXPECTED, **extra)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None)
    for value in ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []) + (found if isinstance(found, list) else [found]):
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an EOS token")
    return ids


def model_inputs(input_ids: Tensor, attention_mask: Tensor, forward_args: Any) -> dict[str, Any]:
    """A forward's arguments: no KV cache, and position ids when ``forward_args`` names them."""
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if "position_ids" in forward_args:
        inputs["position_ids"] = position_ids(attention_mask)
    return inputs


def decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder (hidden states) and output head of a model whose logits are
    ``head(decoder(...)[0])``: a type of :data:`LEAN_MODEL_TYPES`, with or without a peft
    adapter; ``None`` for any other model."""
    base = _base_model(model)
    if getattr(getattr(base, "config", None), "model_type", None) not in LEAN_MODEL_TYPES:
        return None
    return base.base_model, base.get_output_embeddings()


def log_softmax_at(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / temperature)`` at ``targets`` (float32), without the
    ``[..., vocab]`` log-softmax: the target's logit minus the logsumexp."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)


def chunked_log_probs(head: torch.nn.Module, hidden: Tensor, targets: Tensor, keep: Tensor, temperature: float, chunk_size: int) -> Tensor:
    """``[B, T]`` :func:`log_softmax_at` of ``head(hidden)`` where ``keep``, 0 elsewhere.

    The kept positions are scored ``chunk_size`` at a time, so at most ``chunk_size`` rows of
    float32 logits exist at once; with gradients each chunk is recomputed in the backward
    pass (``torch.utils.checkpoint``), which therefore holds one chunk's logits too.
    """
    rows, wanted = hidden[keep], targets[keep]
    scored = []
    for h, y in zip(rows.split(chunk_size), wanted.split(chunk_size)):
        if torch.is_grad_enabled():
            scored.append(checkpoint(_head_log_probs, head, h, y, temperature, use_reentrant=False))
        else:
            scored.append(_head_log_probs(head, h, y, temperature))
    out = torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(keep, torch.cat(scored)) if scored else out


def _head_log_probs(head: torch.nn.Module, hidden: Tensor, targets: Tensor, temperature: float) -> Tensor:
    return log_softmax_at(head(hidden), targets, temperature)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over attended tokens, as ``generate`` does for left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (modules and ``*dropout*`` config fields)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if "dropout" in key and isinstance(value, float):
                    setattr(config, key, 0.0)
    for module in model.modules():  # attention modules that copied a dropout rate from the config
        for name in ("attention_dropout", "dropout", "attn_dropout_p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


@contextlib.contextmanager
def _gguf_weights_as_plain(model: Any) -> Iterator[None]:
    """transformers dequantizes a GGUF file when it loads it but keeps a quantizer that
    refuses ``save_pretrained``; the weights are plain tensors, so save them as such."""
    base = _base_model(model)
    quantizer = getattr(base, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)).lower() != "gguf":
        yield
        return
    config = base.config
    had_config = hasattr(config, "quantization_config")
    saved_config = getattr(config, "quantization_config", None)
    base.hf_quantizer = None
    if had_config:
        del config.quantization_config
    try:
        yield
    finally:
        base.hf_quantizer = quantizer
        if had_config:
            config.quantization_config = saved_config


def _base_model(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model
