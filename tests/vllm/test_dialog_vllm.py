"""The dialog sampler on vLLM: greedy dialogs (colocated engine and server) equal the
transformers backend's, token for token, in both forms; per_turn continuations share the policy's noise
across branches (row seeds as request seeds)."""

import pytest
import torch

from rebel.text.dialog import DialogSampler
from rebel.text.env import EnvReply, TextEnv
from rebel.text.policy import CausalLMPolicy
from rebel_envs.text_tasks import char_tokenizer, tiny_llama

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}<eos>:{% else %}{{ m['content'] }}:{% endif %}{% endfor %}"
)


class Repeat(TextEnv):
    """Says a digit; 1 for an answer that starts with it; then 1-3 random digits; 3 turns."""

    def reset(self, rng, row=None):
        self.target, self.turn = str(rng.randrange(10)), 0
        return [{"role": "user", "content": self.target}]

    def step(self, message, rng):
        reward = float(message[:1] == self.target)
        self.turn += 1
        said = "".join(str(rng.randrange(10)) for _ in range(rng.randint(1, 3)))
        self.target = said[0]
        done = self.turn >= 3
        return EnvReply([] if done else [{"role": "user", "content": said}], reward, terminated=done)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    """A random Llama (4 heads of 32) with peaked logits (no near-ties for greedy decoding) and
    a chat template."""
    path = tmp_path_factory.mktemp("chat_llama")
    tokenizer = char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    model = tiny_llama(tokenizer, n_layer=2, n_embd=128, n_positions=128, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("form", ["whole", "per_turn"])
def test_greedy_dialogs_equal_the_transformers_backend(chat_llama, backend, form):
    policy = CausalLMPolicy(chat_llama)
    settings = {"form": form, "num_generations": 2, "prompts_per_iteration": 4, "max_new_tokens": 4, "max_dialog_tokens": 60, "top_k": 1,
                "rollouts_per_branch": 2, "branch_turns": "all"}  # fmt: skip
    engine = backend.sync(policy)
    loads = []
    load_weights = engine.load_weights
    engine.load_weights = lambda weights: loads.append(1) or load_weights(weights)
    try:
        ours = DialogSampler(Repeat, generation_backend=backend, **settings).collect(policy)
    finally:
        del engine.load_weights
    assert len(loads) == 1  # the weights went to the engine once for all the rounds of the collection
    sampler = DialogSampler(Repeat, **settings)
    reference = sampler.collect(policy)
    assert torch.equal(ours.data["input_ids"], reference.data["input_ids"]) and torch.equal(ours.mask, reference.mask)
    assert torch.equal(ours.reward, reference.reward) and ours.counts == reference.counts
    assert len({tuple(row) for row in reference.data["input_ids"].tolist()}) > 2  # the dialogs differ (the env's replies)
    assert reference.stats["episode_turns"] == 3.0


def test_greedy_dialog_evaluation_equals_the_transformers_backend(chat_llama, backend):
    from rebel.text import TextConfig
    from rebel.text.evaluation import DialogEvaluator

    policy = CausalLMPolicy(chat_llama)
    config = TextConfig(eval_dialogs=6, prompts_per_iteration=2, num_generations=2, max_new_tokens=4, max_dialog_tokens=60, seed=1)
    settings = {"max_new_tokens": 4, "max_dialog_tokens": 60}
    engine = backend.sync(policy)
    loads = []
    load_weights = engine.load_weights
    engine.load_weights = lambda weights: loads.append(1) or load_weights(weights)
    try:
        ours, dialogs = DialogEvaluator(DialogSampler(Repeat, generation_backend=backend, **settings), None, config).measure(policy)
    finally:
        del engine.load_weights
    assert len(loads) == 1  # the weights went to the engine once for the evaluation's rounds (6 dialogs, 4 at a time)
    reference, expected = DialogEvaluator(DialogSampler(Repeat, **settings), None, config).measure(policy)
    assert ours == reference and dialogs == expected and len(expected["greedy"]) == 6
    assert len({str(d["messages"]) for d in expected["greedy"]}) == 6 and reference["eval/turns_mean"] == 3.0


class Logged(Repeat):
    """:class:`Repeat` keeping the agent's messages (in LOG, by the env's id)."""

    def step(self, message, rng):
        LOG.setdefault(id(self), []).append(message)
        return super().step(message, rng)


LOG: dict[int, list[str]] = {}


def test_per_turn_continuations_share_the_policys_noise_on_vllm(backend):
    """Every branch forced to the same branched turn ("3<eos>", unseeded calls): vLLM's
    continuations (row seeds as request seeds) are the same in every branch of a rollout
    index, and differ across rollout indices."""
    from rebel.text.generation import GenerationBackend

    class ForcedTurns(GenerationBackend):
        def fixed_weights(self, policy):
            return backend.fixed_weights(policy)

        def generate(self, policy, prompt_ids, prompt_mask, settings, generator, row_seeds=None):
            if row_seeds is not None:
                return backend.generate(policy, prompt_ids, prompt_mask, settings, generator, row_seeds=row_seeds)
            turn = [policy.tokenizer.convert_tokens_to_ids("3"), settings.eos_token_ids[0]]
            return torch.tensor([turn + [settings.pad_token_id] * (settings.max_new_tokens - 2)] * len(prompt_ids))

    tokenizer = char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    policy = CausalLMPolicy(tiny_llama(tokenizer, n_layer=2, n_embd=128, n_positions=128, seed=1), tokenizer)  # not peaked: samples spread
    made, n, m = [], 3, 3

    def factory():
        made.append(Logged())
        return made[-1]

    LOG.clear()
    sampler = DialogSampler(factory, form="per_turn", num_generations=n, rollouts_per_branch=m, prompts_per_iteration=1, max_new_tokens=4,
                            max_dialog_tokens=60, branch_turns="all", generation_backend=ForcedTurns())  # fmt: skip
    sampler.collect(policy)
    continued = [LOG[id(e)] for e in made[1 : 1 + n * m]]  # of the first turn: branch i, rollout j at i * m + j - 1
    assert all(c[0] == "3" for c in continued)
    for j in range(m):
        assert [continued[i * m + j] for i in range(n)] == [continued[j]] * n
    assert len({tuple(c) for c in continued[:m]}) == m
