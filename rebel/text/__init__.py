"""Causal language models with REBEL (transformers, peft): tokens are the steps.

* :class:`CausalLMPolicy`: any ``AutoModelForCausalLM`` as a :class:`rebel.Policy`.
* :class:`TextSampler`: groups of sampled completions per prompt, scored by reward functions.
* :class:`TextConfig`, :class:`TextTrainer`: the TRL-like front end.
* :class:`TextEnv`: the other side of a multi-turn dialog (a user, a tool, a judge).
* :class:`DialogSampler`: dialogs with a :class:`TextEnv` as trajectories (whole-dialog and
  per-turn Monte-Carlo-reset REBEL); ``TextTrainer(..., env=...)`` uses it.

transformers and peft load when a model is built, not on import.
"""

from rebel.hf.inputs import RewardFunctionError
from rebel.text.data import PromptDataset, render_prompt
from rebel.text.dialog import DialogSampler
from rebel.text.env import EnvReply, TextEnv
from rebel.text.policy import CausalLMPolicy
from rebel.text.rewards import RewardModel
from rebel.text.sampler import TextSampler, completion_mask
from rebel.text.trainer import TextConfig, TextTrainer

__all__ = [
    "CausalLMPolicy",
    "DialogSampler",
    "EnvReply",
    "PromptDataset",
    "RewardFunctionError",
    "RewardModel",
    "TextConfig",
    "TextEnv",
    "TextSampler",
    "TextTrainer",
    "completion_mask",
    "render_prompt",
]
