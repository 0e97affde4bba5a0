"""CausalLMPolicy: sequence log-probs against a manual computation, masks, dropout."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rebel import RolloutBatch
from rebel.text import CausalLMPolicy, TextConfig, completion_mask


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


# ------------------------------------------------------------ lean log-probs

VOCAB = 4096
LAYERS = {
    "vocab_size": VOCAB,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 1,
}
DECODER = {**LAYERS, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
TINY_CONFIGS = {  # one tiny model of each type the lean path accepts
    "gpt2": {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "bos_token_id": 1, "eos_token_id": 1},
    "llama": DECODER,
    "mistral": DECODER,
    "qwen2": DECODER,
    "qwen3": DECODER,
    "phi3": DECODER,
    "gemma": DECODER,
    "olmo2": DECODER,
    "gpt_neox": {**LAYERS, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
}


def _tiny_model(model_type, **overrides):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS.get(model_type, DECODER), **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _char_tokenizer():
    from rebel_envs.text_tasks import char_tokenizer

    return char_tokenizer()


def _padded_inputs(completion_length=7):
    """Three rows of 5 prompt and ``completion_length`` completion tokens: left padding in
    rows 0 and 2, unattended completion tokens (after an EOS) in rows 1 and 2."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (3, 5 + completion_length), generator=generator)
    attention = torch.ones_like(ids)
    attention[0, :3] = attention[2, :1] = 0
    attention[1, -3:] = attention[2, -1:] = 0
    return ids, attention


def _scores_and_grads(policy, ids, attention, t):
    """Token log-probs and the gradients of a masked sum that weighs every position differently."""
    policy.zero_grad()
    logp = policy.token_log_probs(ids, attention, t)
    weights = torch.arange(1.0, logp.numel() + 1).view_as(logp)
    torch.where(attention[:, -t:].bool(), logp * weights, 0.0).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def _assert_lean_equals_plain(model, t=7, **policy_kwargs):
    ids, attention = _padded_inputs(t)
    lean = CausalLMPolicy(model, _char_tokenizer(), logprob_chunk_size=3, **policy_kwargs)
    logp, grads = _scores_and_grads(lean, ids, attention, t)
    lean.logprob_chunk_size = 0  # the same model, all logits at once
    plain_logp, plain_grads = _scores_and_grads(lean, ids, attention, t)
    kept = attention[:, -t:].bool()
    torch.testing.assert_close(logp[kept], plain_logp[kept], rtol=1e-6, atol=1e-6)
    assert logp[~kept].eq(0).all() and plain_logp[~kept].ne(0).all()  # lean: unattended positions are not scored
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        scale = plain_grads[name].abs().max().item()  # float32 sums in another order: within 1e-6 of the largest entry
        assert scale > 0, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_lean_log_probs_and_gradients_equal_the_plain_computation(model_type):
    from rebel.text.policy import LEAN_MODEL_TYPES

    assert set(TINY_CONFIGS) == LEAN_MODEL_TYPES  # every accepted type is tested
    _assert_lean_equals_plain(_tiny_model(model_type), temperature=0.7)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("target_modules", ["all-linear", ["lm_head", "q_proj"]], ids=["lora", "lora-on-the-head"])
def test_lean_log_probs_with_lora_equal_the_plain_computation(target_modules, temperature):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)  # random B: the adapter counts
    _assert_lean_equals_plain(_tiny_model("llama", tie_word_embeddings=False), temperature=temperature, peft_config=lora)


def test_lean_log_probs_keep_no_vocabulary_sized_tensor_and_compute_chunks():
    """The plain computation saves ``[B, T, V]`` float32 logits for the backward pass; the lean
    one saves none, runs the head on at most ``chunk`` rows, and in the backward pass
    recomputes each chunk's logits and uses them before it makes the next chunk's."""
    model, t = _tiny_model("llama"), 7
    ids, attention = _padded_inputs(t)
    policy = CausalLMPolicy(model, _char_tokenizer(), logprob_chunk_size=4)
    events = []

    def record(module, args, out):
        events.append(("head", out.shape[0]))
        if out.requires_grad:
            out.register_hook(lambda grad: events.append(("grad", grad.shape[0])))

    model.lm_head.register_forward_hook(record)

    def saved_vocab_sized(chunk):
        policy.logprob_chunk_size = chunk
        saved = [0]

        def pack(x):
            if x.shape[-1:] == (VOCAB,) and not isinstance(x, torch.nn.Parameter):
                saved.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            logp = policy.token_log_probs(ids, attention, t)
        logp.sum().backward()
        return max(saved)

    assert saved_vocab_sized(0) >= 3 * t * VOCAB
    events.clear()
    assert saved_vocab_sized(4) == 0
    assert int(attention[:, -t:].sum()) == 17  # kept tokens: chunks of 4, 4, 4, 4 and 1
    forward = [("head", n) for n in (4, 4, 4, 4, 1)]
    backward = [(kind, n) for n in (1, 4, 4, 4, 4) for kind in ("head", "grad")]
    assert events == forward + backward


def test_lean_log_probs_under_bf16_autocast_are_the_same_with_and_without_gradients():
    """logp_old (no grad) and the training forward give the same numbers: the log-ratio starts at 0."""
    model, t = _tiny_model("llama"), 7
    ids, attention = _padded_inputs(t)
    policy = CausalLMPolicy(model, _char_tokenizer(), logprob_chunk_size=4, temperature=0.7)
    kept = attention[:, -t:].bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            old = policy.token_log_probs(ids, attention, t)
        new = policy.token_log_probs(ids, attention, t)
        new.sum().backward()
        policy.logprob_chunk_size = 0
        with torch.no_grad():
            plain = policy.token_log_probs(ids, attention, t)
    assert old.dtype == new.dtype == torch.float32 and torch.equal(old, new.detach())
    torch.testing.assert_close(old[kept], plain[kept], rtol=1e-4, atol=1e-4)
    assert all(p.grad.isfinite().all() for p in policy.parameters())


def test_models_with_logits_after_the_head_use_the_plain_computation():
    model = _tiny_model("gemma2", final_logit_softcapping=0.5)  # logits = tanh(head / cap) * cap: not lean-able
    with pytest.warns(UserWarning, match="logprob_chunk_size: model type 'gemma2' is not one of"):
        policy = CausalLMPolicy(model, _char_tokenizer(), logprob_chunk_size=4)
    ids, attention = _padded_inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp_min(0)).logits
        manual = torch.log_softmax(logits[:, -8:-1], -1).gather(-1, ids[:, -7:, None])[..., 0]
        torch.testing.assert_close(policy.token_log_probs(ids, attention, 7), manual)
    for make in (lambda: CausalLMPolicy(model, _char_tokenizer(), logprob_chunk_size=-1), lambda: TextConfig(logprob_chunk_size=-1)):
        with pytest.raises(ValueError, match=r"^logprob_chunk_size must be an integer >= 0, got -1$"):
            make()
