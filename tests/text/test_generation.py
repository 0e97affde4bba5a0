"""Choosing the generation backend: its settings are checked before any model loads, and
asking for vLLM where it is not installed is one line naming the extra."""

import importlib.util

import pytest

from rebel.cli import main
from rebel.text import TextConfig, TextSampler

NO_VLLM = importlib.util.find_spec("vllm") is None


def zero_reward(prompts, completions, **columns):
    return [0.0] * len(completions)


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed here")
def test_asking_for_vllm_without_it_is_one_line_naming_the_extra(tmp_path, capsys):
    expected = "generation_backend='vllm' needs vLLM, which is not installed: pip install 'rebel-rl[vllm]'"
    with pytest.raises(ValueError, match="^" + expected.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        TextConfig(generation_backend="vllm")
    with pytest.raises(ValueError, match="needs vLLM"):
        TextSampler(["1:"], zero_reward, generation_backend="vllm")
    run = tmp_path / "run"
    assert main(["train", "text", "--generation-backend", "vllm", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rebel train text: error: {expected}") and err.count("\n") == 1
    assert not run.exists()  # refused before any folder or model
    assert TextConfig(generation_backend="vllm", vllm_mode="server").vllm_mode == "server"  # the server holds vLLM


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"generation_backend": "sglang"}, "generation_backend='sglang' is not supported; expected one of transformers, vllm"),
        ({"generation_backend": "vllm", "vllm_mode": "remote"}, "vllm_mode='remote' is not supported; expected one of colocate, server"),
        ({"vllm_kwargs": {"enforce_eager": True}}, "vllm_kwargs enforce_eager: settings of generation_backend='vllm', not of 'transformers'"),
        ({"generation_backend": "vllm", "vllm_mode": "server", "generation_kwargs": {"use_cache": True}},
         "generation_kwargs use_cache: settings of generation_backend='transformers', not of 'vllm'"),
        ({"generation_backend": "vllm", "vllm_mode": "server", "vllm_kwargs": {"quantization": "fp8", "enforce_eager": True}},
         "vllm_kwargs quantization: not an engine setting that leaves the sampled distribution alone"),
        ({"generation_backend": "vllm", "vllm_mode": "server", "temperature": 3.0},
         "temperature=3.0 with generation_backend='vllm': vLLM samples temperatures in \\[0.01, 2.0\\] only"),
        ({"generation_backend": "vllm", "vllm_mode": "server", "temperature": 0.005},
         "temperature=0.005 with generation_backend='vllm': vLLM samples temperatures in \\[0.01, 2.0\\] only"),
    ],
)  # fmt: skip
def test_backend_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as error:
        TextConfig(**settings)
    assert "\n" not in str(error.value)


def test_a_colocated_engine_is_refused_beside_fsdp2(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for configs/accelerate/fsdp2.yaml
    with pytest.raises(
        ValueError, match="^vllm_mode='colocate' does not run beside FSDP2 .*; use vllm_mode='server' with rebel vllm-serve$"
    ):
        TextConfig(generation_backend="vllm")
    assert TextConfig(generation_backend="vllm", vllm_mode="server").vllm_mode == "server"


@pytest.fixture(scope="module")
def peaked_policy():
    """A random tiny GPT-2 with peaked next-token distributions (a wrong temperature shows)."""
    import torch

    from rebel.text.policy import CausalLMPolicy
    from rebel_envs.text_tasks import char_tokenizer, tiny_gpt2

    tokenizer = char_tokenizer()
    model = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_positions=64, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return CausalLMPolicy(model, tokenizer)


def settings_of(policy, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=1):
    from rebel.text.generation import SamplingSettings

    return SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            eos_token_ids=tuple(policy.eos_token_ids), pad_token_id=policy.tokenizer.pad_token_id)  # fmt: skip


def left_padded(policy, texts):
    import torch

    ids = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width, pad = max(map(len, ids)), policy.tokenizer.pad_token_id
    return (torch.tensor([[pad] * (width - len(x)) + x for x in ids]),
            torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]))  # fmt: skip


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 0, 1.0), (1.0, 0, 1.0), (1.3, 6, 1.0), (1.0, 0, 0.8)])
def test_row_seeded_samples_follow_the_warped_softmax(peaked_policy, temperature, top_k, top_p):
    """Next-token frequencies of 20000 row seeds against softmax(logits / T), truncated by
    top_k / top_p (kept: the fewest most likely tokens whose mass reaches top_p)."""
    import torch

    from rebel.text.generation import TransformersGeneration

    n = 20000
    ids, mask = left_padded(peaked_policy, ["12:"] * n)
    out = TransformersGeneration().generate(peaked_policy, ids, mask, settings_of(peaked_policy, temperature, top_k, top_p),
                                            torch.Generator(), row_seeds=list(range(n)))  # fmt: skip
    with torch.no_grad():
        logits = peaked_policy.model(ids[:1]).logits[0, -1].double()
    counts = torch.bincount(out[:, 0], minlength=len(logits)).double()

    def expected(t):
        p = (logits / t).softmax(-1)
        order = p.argsort(descending=True)
        keep = torch.zeros_like(p, dtype=torch.bool)
        mass = torch.cumsum(p[order], 0)
        kept = int((mass < top_p).sum()) + 1 if top_p < 1 else len(p)
        keep[order[: min(kept, top_k or len(p))]] = True
        return torch.where(keep, p, 0) / p[keep].sum()

    tv = lambda q: 0.5 * (counts / n - q).abs().sum().item()
    q = expected(temperature)
    assert q.max() > 0.1 and (q > 0.01).sum() >= 5  # peaked, yet several likely tokens
    assert counts[q == 0].sum() == 0  # nothing outside the truncation
    assert tv(q) < 0.02, tv(q)  # sampling noise: about 0.5 * sum(sqrt(2 q / (pi n))) < 0.02
    assert tv(expected(temperature * 1.25)) > 0.04 and tv(expected(temperature / 1.25)) > 0.04  # a wrong temperature fails


def test_row_seeds_fix_each_rows_tokens_whatever_the_batch(peaked_policy):
    import torch
    from transformers import AutoModelForCausalLM

    from rebel.text.generation import TransformersGeneration
    from rebel.text.policy import CausalLMPolicy
    from rebel_envs.text_tasks import distorting_generation_config

    settings = settings_of(peaked_policy, temperature=1.5, max_new_tokens=10)
    texts, seeds = ["12:", "9876543:", "12:", "12:", "5:"], [7, 8, 7, 9, 7]
    ids, mask = left_padded(peaked_policy, texts)
    backend = TransformersGeneration()
    together = backend.generate(peaked_policy, ids, mask, settings, torch.Generator().manual_seed(0), row_seeds=seeds).tolist()
    assert together[0] == together[2] != together[3]  # same prompt: same seed, same tokens; another seed, others
    for k, (text, seed) in enumerate(zip(texts, seeds)):  # alone, unpadded, with another generator: the same tokens
        one, one_mask = left_padded(peaked_policy, [text])
        assert backend.generate(peaked_policy, one, one_mask, settings, torch.Generator().manual_seed(k), row_seeds=[seed]).tolist() == [
            together[k]
        ]
    in_pairs = TransformersGeneration(batch_size=2).generate(peaked_policy, ids, mask, settings, torch.Generator(), row_seeds=seeds)
    assert in_pairs.tolist() == together
    assert len({tuple(r) for r in backend.generate(peaked_policy, ids[:1].repeat(8, 1), mask[:1].repeat(8, 1), settings,
                                                       torch.Generator(), row_seeds=range(8)).tolist()}) > 4  # fmt: skip
    distorted = AutoModelForCausalLM.from_config(peaked_policy.model.config)
    distorted.load_state_dict(peaked_policy.model.state_dict())
    distorted.generation_config.update(**distorting_generation_config(peaked_policy.tokenizer))
    other = CausalLMPolicy(distorted, peaked_policy.tokenizer)  # its generation_config.json may add no processor
    assert backend.generate(other, ids, mask, settings, torch.Generator(), row_seeds=seeds).tolist() == together
    with pytest.raises(ValueError, match="^row_seeds has 2 seeds for 5 prompts; expected one per prompt$"):
        backend.generate(peaked_policy, ids, mask, settings, torch.Generator(), row_seeds=[1, 2])


MASK_ADVICE_SCRIPT = """
import sys, torch
from rebel.text.generation import SamplingSettings, TransformersGeneration
from rebel.text.policy import CausalLMPolicy
from rebel_envs.text_tasks import char_tokenizer, tiny_gpt2

tokenizer = char_tokenizer()
policy = CausalLMPolicy(tiny_gpt2(tokenizer, n_layer=1, n_embd=16, n_positions=64), tokenizer)
eos, pad = policy.eos_token_ids[0], tokenizer.pad_token_id
with torch.no_grad():
    policy.model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
    policy.model.lm_head.bias[eos] = 1.5  # some rows end early while others go on: pad tokens follow them
ids = torch.tensor([tokenizer("12:", add_special_tokens=False)["input_ids"]] * 8)  # no padding: an all-ones mask
mask = torch.ones_like(ids)
torch.manual_seed(0)
if sys.argv[1] == "plain":
    policy.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=10, pad_token_id=pad, eos_token_id=eos)
else:
    settings = SamplingSettings(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=10, eos_token_ids=(eos,), pad_token_id=pad)
    out = TransformersGeneration().generate(policy, ids, mask, settings, torch.Generator().manual_seed(0))
    assert (out == pad).any(), out  # some row ended early
"""


def test_sampling_shows_no_attention_mask_advice(tmp_path):
    """transformers drops an all-ones mask, then advises passing one when a finished row's next
    input is a pad token; REBEL passes the mask, so the advice is hidden while it samples."""
    import subprocess
    import sys

    def stderr(mode: str) -> str:
        run = subprocess.run([sys.executable, "-c", MASK_ADVICE_SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
        return run.stderr

    advice = "We strongly recommend passing in an `attention_mask`"
    assert advice in stderr("plain")  # the situation does raise it
    assert advice not in stderr("rebel")
