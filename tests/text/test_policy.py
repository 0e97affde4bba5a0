"""CausalLMPolicy: sequence log-probs against a manual computation, masks, dropout."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rebel import RolloutBatch
from rebel.text import CausalLMPolicy, completion_mask


def test_completion_mask_stops_after_the_first_eos():
    tokens = torch.tensor([[5, 1, 0, 1], [5, 6, 7, 8], [1, 3, 1, 4]])
    assert completion_mask(tokens, [1]).tolist() == [
        [True, True, False, False],
        [True, True, True, True],  # no EOS: the whole completion
        [True, False, False, False],
    ]
    assert completion_mask(torch.tensor([[5, 2, 1]]), [1, 2]).tolist() == [[True, True, False]]  # several EOS ids


def _batch(tokenizer, prompts, completions, eos_at):
    """Left-padded prompts + completions with EOS at eos_at (None: no EOS), pad after it."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    t = max(len(c) + 1 for c in completions)
    rows, masks = [], []
    for text, eos in zip(completions, eos_at):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids = ids[:eos] + [tokenizer.eos_token_id]
        rows.append(ids + [tokenizer.pad_token_id] * (t - len(ids)))
        masks.append([True] * len(ids) + [False] * (t - len(ids)))
    completion = torch.tensor(rows)
    mask = torch.tensor(masks)
    return RolloutBatch(
        group=torch.tensor([0, 0, 1, 1]),
        reward=torch.zeros(4),
        mask=mask,
        data={
            "input_ids": torch.cat([enc["input_ids"], completion], 1),
            "attention_mask": torch.cat([enc["attention_mask"], mask.long()], 1),
        },
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_log_probs_equal_a_manual_computation_from_the_logits(tiny_lm, temperature):
    policy = CausalLMPolicy(tiny_lm, temperature=temperature)
    tokenizer = policy.tokenizer
    prompts = ["12:", "98765:", "3:", "4444:"]  # different lengths: left padding
    completions = ["123", "56789", "7", "0123"]
    eos_at = [3, None, 1, 2]  # EOS then padding, no EOS, EOS early (the rest of the text dropped)
    batch = _batch(tokenizer, prompts, completions, eos_at)
    got = policy.log_prob(batch)

    reference = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()  # a plain model, unpadded inputs
    for k, (prompt, completion, eos) in enumerate(zip(prompts, completions, eos_at)):
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        c = c if eos is None else c[:eos] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = reference(torch.tensor([p + c])).logits[0].double() / temperature
        logp = torch.log_softmax(logits, -1)
        manual = sum(logp[len(p) - 1 + h, token] for h, token in enumerate(c))
        assert got[k].item() == pytest.approx(manual.item(), abs=1e-4)
    assert batch.mask.sum(1).tolist() == [4, 5, 2, 3]


def test_dropout_is_disabled_and_training_mode_keeps_it_off(tiny_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    policy = CausalLMPolicy(model, AutoTokenizer.from_pretrained(tiny_lm))
    policy.train()
    tokenizer = policy.tokenizer
    batch = _batch(tokenizer, ["12:", "98:", "3:", "44:"], ["12", "89", "3", "44"], [None] * 4)
    torch.manual_seed(0)
    a = policy.log_prob(batch)
    torch.manual_seed(1)
    b = policy.log_prob(batch)
    assert torch.equal(a, b)
    assert all(m.p == 0.0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))


def test_model_object_needs_a_tokenizer_and_pad_defaults_to_eos(tiny_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model.config._name_or_path = ""
    with pytest.raises(ValueError, match="no tokenizer"):
        CausalLMPolicy(model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    tokenizer.pad_token = None
    policy = CausalLMPolicy(model, tokenizer)
    assert policy.tokenizer.pad_token_id == policy.tokenizer.eos_token_id == 1
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        CausalLMPolicy(model, tokenizer, temperature=0.0)
