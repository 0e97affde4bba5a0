"""TextSampler: groups, masks, rewards (TRL signature, columns, chat prompts, errors,
penalties), sharding and its state."""

import json
import math
from pathlib import Path

import pytest
import torch

import rebel.text.sampler as sampler_module
from rebel.text import CausalLMPolicy, RewardFunctionError, TextSampler

RECORDS = [{"prompt": f"{k}{k + 1}:", "answer": f"{k}{k + 1}", "idx": k} for k in range(8)]


def zero_reward(prompts, completions, **columns):
    return [0.0] * len(completions)


def test_a_batch_holds_groups_masks_rewards_and_columns(tiny_lm):
    seen = {}

    def length_reward(prompts, completions, answer, idx, **columns):
        seen.update(prompts=prompts, completions=completions, answer=answer, idx=idx)
        return [float(len(c)) for c in completions]

    policy = CausalLMPolicy(tiny_lm)
    sampler = TextSampler(
        RECORDS, [length_reward, zero_reward], reward_weights=[0.5, 1.0], num_generations=3, prompts_per_iteration=4, max_new_tokens=6
    )
    sampler.seed(0)
    batch = sampler.collect(policy)
    assert len(batch) == 12 and batch.group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert seen["prompts"][::3] == batch.context[::3] and len(set(batch.context[:3])) == 1  # prompt text is the context
    assert seen["idx"] == [r["idx"] for p in seen["prompts"] for r in RECORDS if r["prompt"] == p]  # columns follow their prompt
    assert batch.reward.tolist() == pytest.approx([0.5 * len(c) for c in seen["completions"]])
    # the mask: completion tokens up to and including the first EOS
    t = batch.mask.shape[1]
    completion = batch.data["input_ids"][:, -t:]
    for row, mask, text in zip(completion, batch.mask, seen["completions"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        eos = (row[:n] == policy.tokenizer.eos_token_id).nonzero()
        assert len(eos) <= 1 and (len(eos) == 0 or eos.item() == n - 1)
        assert policy.tokenizer.decode(row[:n], skip_special_tokens=True) == text
        assert (row[n:] == policy.tokenizer.pad_token_id).all()
    assert batch.counts["tokens"] == batch.mask.sum().item()
    assert batch.stats["completion_length"] == pytest.approx(batch.mask.sum(1).float().mean().item())
    assert batch.stats["rewards/length_reward"] == pytest.approx(sum(map(len, seen["completions"])) / 12)
    assert len(sampler.last_samples) == 12


@pytest.fixture(scope="module")
def lm_with_generation_defaults(tiny_lm, tmp_path_factory):
    """The tiny model saved with a generation_config.json that sets logits processors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rebel_envs.text_tasks import distorting_generation_config

    path = tmp_path_factory.mktemp("lm_with_generation_defaults")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    model.generation_config.update(**distorting_generation_config(tokenizer))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("lora", [False, True])
def test_samples_ignore_the_models_generation_defaults(lm_with_generation_defaults, lora):
    """generate's samples and the training forward agree: first tokens sampled from a model
    whose generation_config.json penalises, bans and truncates follow exp(log-probs) of the
    scoring forward (temperature 0.7, no truncation) over the whole vocabulary."""
    from peft import LoraConfig

    saved = json.loads((Path(lm_with_generation_defaults) / "generation_config.json").read_text())
    assert saved["repetition_penalty"] == 3.0 and saved["no_repeat_ngram_size"] == 1 and saved["min_new_tokens"] == 2
    peft_config = LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False) if lora else None  # a non-zero adapter
    with torch.random.fork_rng():
        torch.manual_seed(0)
        policy = CausalLMPolicy(lm_with_generation_defaults, temperature=0.7, peft_config=peft_config)
    assert policy.model.generation_config.suppress_tokens  # loaded back with the model
    sampler = TextSampler(["12:"], zero_reward, num_generations=4000, prompts_per_iteration=1, max_new_tokens=1)
    sampler.seed(0)
    first = sampler.collect(policy).data["input_ids"][:, -1]
    assert policy.model.generation_config.repetition_penalty == 3.0  # the model's own config is put back
    vocab = len(policy.tokenizer)
    empirical = torch.bincount(first, minlength=vocab).double() / len(first)
    prompt = policy.tokenizer(["12:"] * vocab, return_tensors="pt")
    every_token = torch.cat([prompt["input_ids"], torch.arange(vocab)[:, None]], 1)
    with torch.no_grad():
        scored = policy.token_log_probs(every_token, torch.ones_like(every_token), 1)[:, 0].double().exp()
    assert scored.sum().item() == pytest.approx(1.0)
    assert (empirical - scored).abs().max().item() < 0.02  # 4000 samples: a standard error of at most 0.006 a token


def test_chat_prompts_use_the_chat_template_and_completions_are_messages(tiny_lm):
    seen = {}

    def capture(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions)
        return [1.0] * len(completions)

    policy = CausalLMPolicy(tiny_lm)
    policy.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    data = [{"prompt": [{"role": "user", "content": "321"}]}, {"prompt": [{"role": "user", "content": "54"}]}]
    sampler = TextSampler(data, capture, prompts_per_iteration=2, max_new_tokens=3, shuffle=False)
    batch = sampler.collect(policy)
    assert batch.context == ["321:", "321:", "54:", "54:"]
    assert seen["prompts"][0] == data[0]["prompt"]
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen["completions"])


def broken(prompts, completions, **columns):
    raise KeyError("answer")


def too_short(prompts, completions, **columns):
    return [1.0]


def not_finite(prompts, completions, **columns):
    return [math.nan] * len(completions)


def numeric_text(prompts, completions, **columns):
    return ["1.0"] * len(completions)  # float() would take it: refused all the same


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (broken, "reward function 'broken' raised KeyError: 'answer'"),
        (too_short, "reward function 'too_short' returned 1 values for 4 completions"),
        (not_finite, r"reward function 'not_finite' returned non-finite values \(nan or inf\) for completions \[0, 1, 2, 3\]"),
        (numeric_text, r"reward function 'numeric_text' returned a str \('1.0'\); expected one float per completion \(ints and numpy"),
    ],
)
def test_reward_function_errors_name_the_function(tiny_lm, fn, message):
    sampler = TextSampler(RECORDS, [zero_reward, fn], prompts_per_iteration=2, max_new_tokens=2)
    with pytest.raises(RewardFunctionError, match=message):
        sampler.collect(CausalLMPolicy(tiny_lm))


def test_missing_eos_penalty(tiny_lm):
    policy = CausalLMPolicy(tiny_lm)
    sampler = TextSampler(RECORDS, zero_reward, prompts_per_iteration=8, num_generations=4, max_new_tokens=2, missing_eos_penalty=0.7)
    batch = sampler.collect(policy)
    has_eos = (batch.data["input_ids"][:, -batch.mask.shape[1] :] == policy.tokenizer.eos_token_id).any(1)
    assert 0 < has_eos.sum() < len(batch)  # both kinds present (random weights, 2 tokens)
    assert batch.reward.tolist() == pytest.approx((-0.7 * (~has_eos).float()).tolist())
    assert batch.stats["eos_fraction"] == pytest.approx(has_eos.float().mean().item())


def test_kl_penalty_to_a_frozen_reference(tiny_lm):
    from transformers import AutoModelForCausalLM

    policy = CausalLMPolicy(tiny_lm)
    sampler = TextSampler(
        RECORDS,
        zero_reward,
        prompts_per_iteration=4,
        max_new_tokens=4,
        kl_coef=0.5,
        reference_model=AutoModelForCausalLM.from_pretrained(tiny_lm),
    )
    batch = sampler.collect(policy)
    assert batch.stats["ref_kl"] == 0.0 and batch.reward.abs().max().item() == 0.0  # policy == reference
    with torch.no_grad():
        policy.model.lm_head.weight.mul_(1.5)  # tied to the input embeddings: a different policy
    batch = sampler.collect(policy)
    logp = policy.log_prob(batch).double()
    ref = CausalLMPolicy(tiny_lm).log_prob(batch).double()
    assert batch.reward.double().tolist() == pytest.approx((-0.5 * (logp - ref)).tolist(), abs=1e-5)
    assert batch.stats["ref_kl"] == pytest.approx((logp - ref).mean().item(), abs=1e-5)


class MaskedTargetsNonFinite(torch.nn.Module):
    """A reference model whose logits are ``fill`` (at ``token``, or everywhere) where the
    next token is masked out, as some attention kernels give at padded positions."""

    def __init__(self, model, fill, token=None):
        super().__init__()
        self.model, self.fill, self.token = model, fill, token

    def forward(self, input_ids, attention_mask, logits_to_keep=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = out.logits.clone()
        target_masked = torch.nn.functional.pad(attention_mask[:, 1:] == 0, (0, 1))
        columns = slice(None) if self.token is None else [self.token]
        logits[..., columns] = torch.where(target_masked[..., None], self.fill, logits[..., columns])
        out.logits = logits
        return out


@pytest.mark.parametrize(("fill", "token"), [(math.nan, None), (-math.inf, 0)], ids=["nan", "pad-impossible"])
def test_reference_kl_ignores_non_finite_values_at_masked_positions(tiny_lm, monkeypatch, fill, token):
    """A nan (or -inf: the pad token impossible) reference log-prob after the EOS stays out of the KL."""
    from transformers import AutoModelForCausalLM

    policy = CausalLMPolicy(tiny_lm)
    reference = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        reference.lm_head.weight.mul_(1.5)  # another policy than pi
    sampler = TextSampler(["12:"], zero_reward, prompts_per_iteration=1, max_new_tokens=4, kl_coef=0.5,
                          reference_model=MaskedTargetsNonFinite(reference, fill, token))  # fmt: skip
    digit, eos, pad = policy.tokenizer.convert_tokens_to_ids, policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    completions = torch.tensor([[digit("1"), eos, pad, pad], [digit("1"), digit("2"), digit("3"), digit("4")]])
    monkeypatch.setattr(sampler, "_generate", lambda policy, ids, mask, *rest: completions)
    batch = sampler.collect(policy)
    assert batch.mask.tolist() == [[True, True, False, False], [True] * 4]
    ids, attention = batch.data["input_ids"], batch.data["attention_mask"]
    with torch.no_grad():
        broken = policy.token_log_probs(ids, attention, 4, model=sampler.reference_model)
        kl = (policy.token_log_probs(ids, attention, 4) - policy.token_log_probs(ids, attention, 4, model=reference)).double()
    assert not broken[0, 2:].isfinite().any() and broken[0, :2].isfinite().all()  # non-finite exactly where masked
    expected = (kl * batch.mask).sum(1)
    assert expected.abs().min().item() > 1e-3
    assert batch.reward.double().tolist() == pytest.approx((-0.5 * expected).tolist(), abs=1e-5)
    assert batch.stats["ref_kl"] == pytest.approx(expected.mean().item(), abs=1e-5)


def test_processes_take_disjoint_slices_of_one_prompt_order(monkeypatch):
    records = [{"prompt": f"{k}:"} for k in range(12)]
    samplers = [TextSampler(records, zero_reward, prompts_per_iteration=3, data_seed=7) for _ in range(2)]
    taken = {0: [], 1: []}
    for _ in range(6):  # 6 iterations x 2 processes x 3 prompts = 3 passes over 12 prompts
        for rank, sampler in enumerate(samplers):
            monkeypatch.setattr(sampler_module, "_rank_and_world", lambda rank=rank: (rank, 2))
            taken[rank].append(sampler.next_indices())
    assert all(not set(a) & set(b) for a, b in zip(taken[0], taken[1]))  # an iteration never gives a prompt to both
    stream = [i for a, b in zip(taken[0], taken[1]) for i in a + b]
    passes = [stream[k : k + 12] for k in (0, 12, 24)]
    assert all(sorted(p) == list(range(12)) for p in passes)  # every prompt once per pass
    assert passes[0] != passes[1] != passes[2]  # reshuffled each pass
    assert samplers[0].state_dict()["epoch"] == 3


def test_state_dict_resumes_the_same_prompts_and_completions(tiny_lm):
    policy = CausalLMPolicy(tiny_lm)
    sampler = TextSampler(RECORDS, zero_reward, prompts_per_iteration=3, max_new_tokens=5)
    sampler.seed(3)
    sampler.collect(policy)
    state = sampler.state_dict()
    expected = sampler.collect(policy)
    other = TextSampler(RECORDS, zero_reward, prompts_per_iteration=3, max_new_tokens=5)
    other.load_state_dict(state)
    torch.manual_seed(123)  # the global RNG plays no part
    again = other.collect(policy)
    assert again.context == expected.context
    assert torch.equal(again.data["input_ids"], expected.data["input_ids"])


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="num_generations must be an integer >= 2"):
        TextSampler(RECORDS, zero_reward, num_generations=1)
    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1 reward functions"):
        TextSampler(RECORDS, zero_reward, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        import datasets

        TextSampler(datasets.Dataset.from_list([{"text": "1:"}]), zero_reward)
    with pytest.raises(ValueError, match="reward_funcs is empty"):
        TextSampler(RECORDS, [])


def test_generation_kwargs_that_change_the_distribution_are_refused():
    with pytest.raises(ValueError, match="^generation_kwargs no_repeat_ngram_size, temperature: the policy scores") as error:
        TextSampler(RECORDS, zero_reward, generation_kwargs={"use_cache": True, "no_repeat_ngram_size": 2, "temperature": 0.5})
    assert "\n" not in str(error.value) and "allowed: use_cache, cache_implementation" in str(error.value)
    with pytest.raises(ValueError, match="generation_kwargs cache_implementation='quantized' is not supported; expected one of dynamic"):
        TextSampler(RECORDS, zero_reward, generation_kwargs={"cache_implementation": "quantized"})
    sampler = TextSampler(RECORDS, zero_reward, generation_kwargs={"use_cache": False, "cache_implementation": "static"})
    assert sampler.backend.generation_kwargs == {"use_cache": False, "cache_implementation": "static"}
