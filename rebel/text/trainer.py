"""``TextConfig`` and ``TextTrainer``: REBEL for causal language models, TRL-style.

    trainer = TextTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", reward_funcs=[my_reward],
                          train_dataset=dataset, config=TextConfig(output_dir="runs/lm"))
    trainer.train()

builds a :class:`CausalLMPolicy` and a :class:`TextSampler` and runs :class:`rebel.Trainer`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rebel.config import check_choice, check_group_size, check_int, check_positive, check_save_best, option, pick, with_defaults
from rebel.hf.trainer import PretrainedTrainer
from rebel.hub import CardInfo, card_settings, describe_rewards, hub_base_model
from rebel.runs import publish_best, read_best
from rebel.sharding import whole_models
from rebel.text.data import PromptDataset
from rebel.text.dialog import BRANCH_TURNS, FORMS, DialogSampler, env_rng
from rebel.text.env import TextEnv
from rebel.text.evaluation import EVAL_GENERATION, DialogEvaluator, TextEvaluator, eval_dialog_seed
from rebel.text.generation import check_backend, check_generation_kwargs
from rebel.text.policy import LOGPROB_CHUNK_SIZE, CausalLMPolicy
from rebel.text.rewards import as_reward_funcs, check_reward_funcs
from rebel.text.sampler import TextSampler
from rebel.trainer import TrainerConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
# TextConfig fields a model card lists beside the REBEL settings
CARD_SETTINGS = ("num_generations", "prompts_per_iteration", "max_new_tokens", "temperature", "kl_coef", "use_lora", "lora_r", "lora_alpha")
# TextConfig fields that TextSampler takes under the same names
GENERATION_SETTINGS = ("num_generations", "prompts_per_iteration", "max_new_tokens", "top_p", "top_k", "generation_kwargs", "generation_batch_size",
                       "shuffle", "generation_backend", "vllm_mode", "vllm_server_url", "vllm_max_model_length", "vllm_gpu_memory_utilization",
                       "vllm_kwargs")  # fmt: skip
SAMPLER_SETTINGS = (*GENERATION_SETTINGS, "reward_weights", "max_prompt_length", "missing_eos_penalty", "kl_coef")
# ... and those DialogSampler takes (``dialog_form`` is its ``form``)
DIALOG_SETTINGS = (*GENERATION_SETTINGS, "max_turns", "max_dialog_tokens", "branch_turns", "rollouts_per_branch")


@dataclass
class TextConfig(with_defaults(TrainerConfig, output_dir="runs/text", learning_rate=1e-6)):  # type: ignore[misc]
    """Settings of a REBEL run on a causal language model: every :class:`~rebel.TrainerConfig`
    setting (a learning rate of 1e-6 by default, as TRL's) and the text adapter's own."""

    prompts_per_iteration: int = option(8, "prompts per iteration and process")
    num_generations: int = option(2, "completions per prompt (>= 2; one group per prompt)")
    max_new_tokens: int = option(64, "longest completion")
    max_prompt_length: int | None = option(None, "prompts are cut to their last N tokens; none: no limit")
    temperature: float = option(1.0, "sampling temperature; log-probs use logits / temperature")
    top_p: float = option(1.0, "nucleus sampling (1: the full distribution, which the policy scores)")
    top_k: int = option(0, "top-k sampling (0: none)")
    generation_batch_size: int | None = option(None, "sequences per generate call; none: all at once")
    generation_backend: str = option(
        "transformers",
        "what samples the completions: transformers (model.generate) | vllm (a vLLM engine, given the policy's weights after every update)",
    )
    vllm_mode: str = option(
        "colocate", "colocate: the vLLM engine runs in the training process; server: in `rebel vllm-serve` at vllm_server_url"
    )
    vllm_server_url: str = option("http://127.0.0.1:8000", "address of the `rebel vllm-serve` server (vllm_mode server)")
    vllm_max_model_length: int | None = option(
        None, "longest prompt + completion the vLLM engine holds; none: the model's maximum positions"
    )
    vllm_gpu_memory_utilization: float = option(
        0.3, "share of the device's memory a colocated vLLM engine takes (a CPU's RAM unless VLLM_CPU_KVCACHE_SPACE sets its KV cache)"
    )
    missing_eos_penalty: float | None = option(None, "subtracted from the reward of a completion without EOS; none: off")
    kl_coef: float = option(0.0, "weight of the KL to the reference policy folded into the reward (0: off)")
    shuffle: bool = option(True, "reshuffle the prompts every pass over the dataset (the order's seed is seed, the same on every process)")
    use_lora: bool = option(False, "train a LoRA adapter (when no peft_config is given)")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_target_modules: str = option("all-linear", "LoRA target modules: all-linear or comma-separated names")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass")
    logprob_chunk_size: int = option(
        LOGPROB_CHUNK_SIZE, "completion tokens whose float32 logits exist at once when scoring (0: all at once)"
    )
    dtype: str = option("auto", "dtype the model is loaded in: auto | float32 | bfloat16 | float16")
    save_merged: bool = option(False, "with LoRA, also save the adapter merged into the base model (model_merged/, the base's size)")
    log_completions: int = option(8, "completions written to completions.jsonl and the trackers (report_to) per iteration (0: none)")
    dialog_form: str = option(
        "whole", "with an env: whole (n dialogs per opening, reward = return) | per_turn (Monte-Carlo resets: Q of n branched turns)"
    )
    max_turns: int = option(8, "with an env: agent turns after which a dialog is truncated")
    max_dialog_tokens: int | None = option(
        None, "with an env: tokens of a whole dialog (opening included) after which it is truncated; none: the model's positions"
    )
    branch_turns: str = option("uniform", "dialog_form per_turn: branch at one turn drawn uniformly per dialog | at all turns")
    rollouts_per_branch: int = option(1, "dialog_form per_turn: continuations of each branched turn (m) averaged into its Q")
    log_dialogs: int = option(4, "with an env: dialogs written to transcripts.jsonl and the trackers per iteration (0: none)")
    eval_every: int = option(
        10, "iterations between evaluations (and one at the end): on the eval_dataset, or with an env on eval_dialogs dialogs; 0: none"
    )
    eval_dialogs: int = option(
        32, "with an env: fresh dialogs per evaluation (openings: eval_dataset's rows in turn, else the env's; fixed env seeds)"
    )
    eval_generation: str = option(
        "greedy", "greedy | sampled | both: evaluation completions or dialogs (sampled: as in training, same seed each time)"
    )
    save_best: bool = option(
        False,
        "with an eval_dataset: keep the model of the best eval/reward_mean in RUN/best/ (with LoRA the adapter); with an env: of the "
        "best eval/return_mean",
    )
    reward_weights: list[float] | None = option(None, "one weight per reward function (default: 1 each)")  # noqa: RUF009 - option() builds a field
    generation_kwargs: dict[str, Any] = option({}, "GenerationConfig fields that change only speed or memory (use_cache, ...)")  # noqa: RUF009 - option() builds a field
    vllm_kwargs: dict[str, Any] = option({}, "vllm.LLM arguments of speed, memory, placement (enforce_eager, ...)")  # noqa: RUF009 - option() builds a field

    def __post_init__(self) -> None:
        check_group_size("num_generations", self.num_generations)
        check_choice("dtype", self.dtype, DTYPES)
        check_positive("temperature", self.temperature)
        check_int("logprob_chunk_size", self.logprob_chunk_size, minimum=0)
        check_int("eval_every", self.eval_every, minimum=0)
        check_save_best(self.save_best, self.eval_every)
        check_int("eval_dialogs", self.eval_dialogs)
        check_choice("eval_generation", self.eval_generation, EVAL_GENERATION)
        check_generation_kwargs(self.generation_kwargs)
        check_choice("dialog_form", self.dialog_form, FORMS)
        check_choice("branch_turns", self.branch_turns, BRANCH_TURNS)
        for name in ("max_turns", "rollouts_per_branch"):
            check_int(name, getattr(self, name))
        if self.max_dialog_tokens is not None:
            check_int("max_dialog_tokens", self.max_dialog_tokens)
        check_int("log_dialogs", self.log_dialogs, minimum=0)
        check_backend(self.generation_backend, self.vllm_mode, self.generation_kwargs, self.vllm_kwargs, self.temperature)
        super().__post_init__()

    def lora_config(self) -> Any:
        """A ``peft.LoraConfig`` from the ``lora_*`` fields (dropout 0: REBEL scores deterministically)."""
        from peft import LoraConfig

        targets = (
            self.lora_target_modules
            if self.lora_target_modules == "all-linear"
            else [m.strip() for m in self.lora_target_modules.split(",")]
        )
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


class TextTrainer(PretrainedTrainer):
    """REBEL for a causal language model, with TRL's argument names.

    Args:
        model: a folder, a hub id or an ``AutoModelForCausalLM`` object.
        reward_funcs: a callable ``fn(prompts, completions, **columns) -> list[float]``,
            a reward model (object, folder or hub id), or a list of them.
        train_dataset: prompt strings, records with a ``prompt``, or a ``datasets.Dataset``.
        config: the run's settings.
        peft_config: a ``peft`` config; only the adapter is trained.
        processing_class: the tokenizer (default: loaded with the model).
        reward_processing_classes: tokenizers of the reward models, in order.
        callbacks: ``fn(trainer, metrics)`` after each iteration (see :class:`rebel.Trainer`).
        model_kwargs: more ``from_pretrained`` arguments (``gguf_file``, ...).
        reference_model: frozen reference for ``kl_coef`` without LoRA (default: a copy
            of the starting model).
        env: a callable returning a :class:`~rebel.text.env.TextEnv`: the trajectories are
            dialogs with it (``config.dialog_form``, :class:`~rebel.text.dialog.DialogSampler`);
            the env gives the rewards (no ``reward_funcs``) and ``train_dataset``, optional,
            holds the rows its ``reset`` opens episodes from.
        eval_dataset: prompts evaluated every ``eval_every`` iterations (same forms as
            ``train_dataset``), metrics under ``eval/`` (see :class:`~rebel.text.evaluation.TextEvaluator`);
            with ``env``, opening rows of the ``eval_dialogs`` evaluation dialogs (default: the
            env's own openings; see :class:`~rebel.text.evaluation.DialogEvaluator`).
        eval_reward_funcs: the evaluation's rewards, summed (default: the training ones, with
            ``reward_weights``); not with ``env``.
    """

    adapter = "text"
    shardable = True

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        train_dataset: Any = None,
        config: TextConfig | None = None,
        *,
        env: Callable[[], TextEnv] | None = None,
        peft_config: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Sequence[Any] | None = None,
        callbacks: Sequence[Any] = (),
        model_kwargs: dict[str, Any] | None = None,
        reference_model: Any = None,
        run_config: dict[str, Any] | None = None,
        eval_dataset: Any = None,
        eval_reward_funcs: Any = None,
    ) -> None:
        config = config or TextConfig()
        # what the model card names: the base model (a folder or hub id) and the prompts' source
        self.base_model = (
            str(model) if isinstance(model, (str, Path)) else getattr(getattr(model, "config", None), "_name_or_path", None) or None
        )
        self.dataset_name = ((run_config or {}).get("source") or {}).get("dataset") or "prompts"
        if env is not None:  # the inputs' cheap checks come before the model loads
            check_dialog_inputs(env, reward_funcs, config, train_dataset, eval_dataset, eval_reward_funcs)
        else:
            if train_dataset is None or reward_funcs is None:
                raise ValueError("TextTrainer needs reward_funcs and train_dataset (or env, a callable returning a TextEnv)")
            train_dataset = PromptDataset(train_dataset)
            reward_funcs = check_reward_funcs(reward_funcs)
            if eval_dataset is not None:
                eval_dataset = PromptDataset(eval_dataset, "eval_dataset")
            if config.save_best and eval_dataset is None:
                raise ValueError("save_best=True keeps the model of the best eval/reward_mean, which needs an eval_dataset to score")
            if eval_reward_funcs is not None:
                if eval_dataset is None:
                    raise ValueError("eval_reward_funcs needs an eval_dataset to score")
                eval_reward_funcs = check_reward_funcs(eval_reward_funcs)
        if peft_config is None and config.use_lora:
            peft_config = config.lora_config()
        kwargs = dict(model_kwargs or {})
        if config.dtype != "auto" and isinstance(model, (str, Path)):
            import transformers

            key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            kwargs.setdefault(key, getattr(torch, config.dtype))
        # Models built whole (the trainer shards the policy and the reference), and a new
        # adapter initialised the same on every process (a sharded policy is not broadcast).
        with whole_models(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            policy = CausalLMPolicy(
                model,
                processing_class,
                temperature=config.temperature,
                peft_config=peft_config,
                gradient_checkpointing=config.gradient_checkpointing,
                logprob_chunk_size=config.logprob_chunk_size,
                model_kwargs=kwargs,
            )
            if config.kl_coef > 0 and reference_model is None and not policy.is_peft:
                reference_model = copy.deepcopy(policy.model)
            if env is not None:
                sampler: TextSampler | DialogSampler = DialogSampler(
                    env, train_dataset, form=config.dialog_form, data_seed=config.seed, **pick(config, DIALOG_SETTINGS)
                )
                sampler.limits(policy)  # the caps fit the model (checked before a run starts)
                logger: list[Any] = [DialogLogger(sampler, config.log_dialogs)]
            else:
                sampler = TextSampler(
                    train_dataset,
                    reward_funcs,
                    reward_processing_classes=reward_processing_classes,
                    reference_model=reference_model,
                    data_seed=config.seed,
                    **pick(config, SAMPLER_SETTINGS),
                )
                logger = [CompletionLogger(sampler, config.log_completions)]
        keep_best = self._keep_best if config.save_best else None
        if isinstance(sampler, DialogSampler):
            logger.append(DialogEvaluator(sampler, eval_dataset, config, keep_best))
        elif eval_dataset is not None:
            funcs, weights = sampler.reward_funcs, sampler.reward_weights
            if eval_reward_funcs is not None:
                funcs = as_reward_funcs(eval_reward_funcs)
                weights = [1.0] * len(funcs)
            logger.append(TextEvaluator(sampler, eval_dataset, funcs, weights, config, keep_best))
        super().__init__(policy, sampler, config, callbacks=[*logger, *callbacks], run_config=run_config)
        if getattr(sampler, "reference_model", None) is not None:  # sharded like the policy under FSDP2 and ZeRO-3
            sampler.reference_model = self.trainer.prepare_frozen(sampler.reference_model)

    @property
    def model(self) -> Any:
        """The trained transformers model (a ``PeftModel`` under LoRA)."""
        return self.trainer.policy.model

    @property
    def tokenizer(self) -> Any:
        return self.policy.tokenizer

    def train(self, resume: bool | str | Path = False, overwrite: bool = False) -> list[dict[str, Any]]:
        """As :meth:`PretrainedTrainer.train`; a vLLM engine is freed at the end (the next
        call builds a new one)."""
        try:
            return super().train(resume=resume, overwrite=overwrite)
        finally:
            self.sampler.backend.close()

    def model_folder(self) -> str:
        return "model"

    def _save(self, path: Path, state: dict[str, Any] | None = None) -> None:
        """The model and tokenizer with ``save_pretrained``; with LoRA only the adapter (which
        ``AutoModelForCausalLM.from_pretrained(path)`` loads onto its base when peft is
        installed), and the merged model in ``<path>_merged`` (with its card) when
        ``save_merged``. ``state``: the policy's full state dict, gathered from the processes
        that shard it."""
        policy: CausalLMPolicy = self.trainer.policy  # type: ignore[assignment]
        policy.save_pretrained(path, state_dict=state)
        if policy.is_peft and self.config.save_merged:
            merged = policy.save_pretrained(path.with_name(path.name + "_merged"), merged=True, state_dict=state)
            self.write_card(merged, merged=True)

    def card_info(self, merged: bool = False) -> CardInfo:
        """The card of the saved model: the LoRA adapter (peft) unless ``merged`` or a full fine-tune."""
        adapter = self.trainer.policy.is_peft and not merged  # type: ignore[attr-defined]
        base = self.base_model or "model"
        load = "# with peft installed, transformers loads the base model and this adapter on it\n" if adapter else ""
        return CardInfo(
            title=f"{Path(base).name} trained with REBEL" + (" (LoRA)" if adapter else ""),
            library_name="peft" if adapter else "transformers",
            task="text-generation",
            dataset=self.dataset_name,
            settings=card_settings(self.config, CARD_SETTINGS),
            reward=self._reward_description(),
            usage=(
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                'folder = "."  # this folder, or its repo id on the Hub\n' + load + "model = AutoModelForCausalLM.from_pretrained(folder)\n"
                "tokenizer = AutoTokenizer.from_pretrained(folder)"
            ),
            base_model=hub_base_model(self.base_model),
            start=f"`{base}`" if self.base_model else "a model built in-process",
            tags=("text-generation", "lora") if adapter else ("text-generation",),
            extra={"pipeline_tag": "text-generation"},
        )

    def _reward_description(self) -> str:
        if isinstance(self.sampler, DialogSampler):
            env = self.sampler.env
            return f"the return of dialogs with `{getattr(env, '__name__', type(env).__name__)}`"
        return describe_rewards(self.sampler.reward_funcs, self.sampler.reward_weights)  # type: ignore[attr-defined]

    def _save_sharded(self, path: Path, state: dict[str, Any]) -> None:
        self._save(path, state)

    def _keep_best(self, iteration: int, metric: str, score: float) -> None:
        """Save the model into ``RUN/best/`` when ``score`` beats the one recorded there (every
        process calls; a resumed run keeps the best of the runs before)."""
        run = self.trainer.run.path
        best = read_best(run)
        if best is not None and score <= best["score"]:
            return
        state = self.trainer.policy_state()  # every process takes part when the policy is sharded
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            record = {"iteration": iteration, "metric": metric, "score": score}

            def write(folder: Path) -> None:
                self.trainer.policy.save_pretrained(folder, state_dict=state)  # type: ignore[attr-defined]
                self.write_card(folder, results={"iteration": iteration, metric: score})

            publish_best(run, write, record)
        self.accelerator.wait_for_everyone()


def gathered_on_main(trainer: Any, samples: list[Any]) -> list[Any]:
    """Every process's ``samples`` on the main process (in rank order); nothing elsewhere.
    All processes call it (a collective when there are several)."""
    acc = trainer.accelerator
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        samples = [s for part in gather_object([samples]) for s in part]
    return samples if acc.is_main_process else []


class CompletionLogger:
    """Trainer callback: a few completions of each iteration in ``completions.jsonl``
    (and a table to the trackers). The trainer reports ``tokens_per_second`` from the counts."""

    def __init__(self, sampler: TextSampler, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __call__(self, trainer: Any, metrics: dict[str, Any]) -> None:
        samples = gathered_on_main(trainer, self.sampler.last_samples[: self.count])
        if not samples:
            return
        iteration = int(metrics["iteration"])
        trainer.run.append_jsonl("completions.jsonl", [{"iteration": iteration, **sample} for sample in samples])
        rows = [[s["prompt"], s["completion"], float(s["reward"])] for s in samples]
        trainer.run.log_table("completions", ["prompt", "completion", "reward"], rows, iteration)


def check_dialog_inputs(
    env: Any, reward_funcs: Any, config: TextConfig, train_dataset: Any = None, eval_dataset: Any = None, eval_reward_funcs: Any = None
) -> None:
    """What a dialog run refuses: rewards from elsewhere than the env, the completion-only
    settings, an empty ``eval_dataset``, and an evaluation without opening rows for an env
    whose ``reset`` needs one (it is tried once, as the evaluation would open a dialog)."""
    if not callable(env):
        raise TypeError(f"env must be a callable returning a TextEnv (a TextEnv subclass, a function), got {type(env).__name__}")
    for name, value in (("reward_funcs", reward_funcs), ("eval_reward_funcs", eval_reward_funcs)):
        if value is not None:
            raise ValueError(f"{name} with env: the environment gives the rewards; pass {name}=None")
    if eval_dataset is not None and len(eval_dataset) == 0:
        raise ValueError("eval_dataset is empty; expected opening rows for env.reset (or None: the env's own openings)")
    if eval_dataset is None and train_dataset is not None and config.eval_every:
        try:
            env().reset(env_rng(eval_dialog_seed(config.seed, 0), "reset", 0), None)
        except Exception as error:
            raise ValueError(
                f"evaluation opens dialogs with env.reset(rng, None) when there is no eval_dataset, and it raised "
                f"{type(error).__name__}: {error}; pass an eval_dataset of opening rows, or eval_every=0"
            ) from error
    for name in ("kl_coef", "missing_eos_penalty", "max_prompt_length", "reward_weights"):
        if getattr(config, name):
            raise ValueError(f"{name}={getattr(config, name)!r} applies to single completions, not to dialogs with an env; leave it unset")


class DialogLogger:
    """Trainer callback: a few dialogs of each iteration in ``transcripts.jsonl`` (and
    to the trackers as text, one readable block per dialog)."""

    def __init__(self, sampler: DialogSampler, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __call__(self, trainer: Any, metrics: dict[str, Any]) -> None:
        dialogs = gathered_on_main(trainer, self.sampler.last_dialogs[: self.count])
        if not dialogs:
            return
        iteration = int(metrics["iteration"])
        trainer.run.append_jsonl("transcripts.jsonl", [{"iteration": iteration, **d} for d in dialogs])
        trainer.run.log_text("dialogs", "\n\n---\n\n".join(transcript(d) for d in dialogs), iteration)


def transcript(dialog: dict[str, Any]) -> str:
    """A dialog record as Markdown: one line per message, then its return and how it ended."""
    lines = [f"**{m['role']}**: {_cell(m['content'])}  " for m in dialog["messages"]]
    end = "terminated" if dialog["terminated"] else "truncated" if dialog["truncated"] else "running"
    return "\n".join([*lines, f"*return {dialog['return']:.4g}, {dialog['turns']} turns, {dialog['tokens']} tokens, {end}*"])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")[:500]
