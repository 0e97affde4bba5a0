"""The vLLM generation backend: samples from the scored policy, the engine follows the
policy's updates, seeds make a resume exact, and the TextTrainer learns with it."""

from pathlib import Path

import pytest
import torch

from rebel.text import CausalLMPolicy, TextConfig, TextSampler, TextTrainer

PROMPTS = [{"prompt": p} for p in ("3141:", "2718:", "9:", "55501:", "123:", "8080:", "604:", "77:")]


def zero_reward(prompts, completions, **columns):
    return [0.0] * len(completions)


def lora(r: int = 4):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)  # a non-zero adapter


@pytest.mark.parametrize("with_lora", [False, True], ids=["full", "lora"])
def test_first_tokens_follow_the_scored_probabilities(sorting_llama, engine, with_lora):
    """8000 first tokens sampled by vLLM (temperature 1.5; the model's generation_config.json
    asks for a repetition penalty, banned and suppressed tokens, top_k, min_p and another
    temperature) follow exp(CausalLMPolicy.token_log_probs) over the whole vocabulary."""
    policy = CausalLMPolicy(sorting_llama, temperature=1.5, peft_config=lora() if with_lora else None)
    n = 8000
    sampler = TextSampler(["55501:"], zero_reward, num_generations=n, prompts_per_iteration=1, max_new_tokens=1, generation_backend=engine)
    sampler.seed(0)
    batch = sampler.collect(policy)
    first = batch.data["input_ids"][:, -1]
    vocab = len(policy.tokenizer)
    frequency = torch.bincount(first, minlength=vocab).double() / n

    prompt = batch.data["input_ids"][0, :-1]
    candidates = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], 1)
    with torch.no_grad():
        probability = policy.token_log_probs(candidates, torch.ones_like(candidates), 1)[:, 0].double().exp()
    assert probability.sum().item() == pytest.approx(1.0, abs=1e-5)
    digit = policy.tokenizer.convert_tokens_to_ids
    banned = [digit("3"), digit("4"), digit("5")]  # suppressed, bad word, begin-suppressed in generation_config.json
    assert probability[banned].sum() > 0.1 and (probability > 0.05).sum() >= 3  # the file's settings would change a lot
    assert (frequency - probability).abs().max().item() < 0.02


@pytest.mark.parametrize("with_lora", [False, True], ids=["full", "lora"])
def test_greedy_completions_equal_transformers_after_updates(sorting_llama, backend, with_lora):
    """top_k=1 is greedy on both backends: vLLM's completions (in this process or from the
    server) equal generate's, before and after the policy's weights move (full model, or a
    LoRA adapter sent merged)."""
    policy = CausalLMPolicy(sorting_llama, peft_config=lora() if with_lora else None)
    settings = {"num_generations": 2, "prompts_per_iteration": 8, "max_new_tokens": 10, "top_k": 1, "shuffle": False}
    ours = TextSampler(PROMPTS, zero_reward, generation_backend=backend, **settings)
    reference = TextSampler(PROMPTS, zero_reward, **settings)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5 if with_lora else 0.05)
    seen = []
    for _ in range(3):
        batch = ours.collect(policy)
        expected = reference.collect(policy)
        assert torch.equal(batch.data["input_ids"], expected.data["input_ids"]) and torch.equal(batch.mask, expected.mask)
        seen.append(batch.data["input_ids"])
        # an update: raise the log-probability of completions that are not the greedy ones
        other = expected.data["input_ids"].roll(1, 0)
        step = policy.token_log_probs(other, torch.ones_like(other), expected.mask.shape[1])
        (-step.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(seen[0], seen[-1])  # the updates changed the greedy completions


def test_a_resumed_sampler_draws_the_same_completions(sorting_llama, backend):
    """Each request's seed comes from the sampler's generator: a sampler restored from a
    state_dict draws what the original drew next, and another seed draws otherwise."""
    policy = CausalLMPolicy(sorting_llama)
    original, resumed, other = (
        TextSampler(PROMPTS, zero_reward, num_generations=4, prompts_per_iteration=4, max_new_tokens=8, generation_backend=backend)
        for _ in range(3)
    )
    original.seed(1)
    original.collect(policy)
    resumed.load_state_dict(original.state_dict())
    expected = original.collect(policy)
    assert torch.equal(resumed.collect(policy).data["input_ids"], expected.data["input_ids"])
    other.load_state_dict(original.state_dict())
    other.seed(2)
    other.position = resumed.position - 4  # the same prompts, other seeds
    assert not torch.equal(other.collect(policy).data["input_ids"], expected.data["input_ids"])


def test_a_completion_does_not_depend_on_the_rest_of_the_batch(sorting_llama, engine):
    """Request k's seed is the generator's k-th draw: the first 5 of 16 prompts, alone, get
    the completions they got in the whole batch."""
    from rebel.text.generation import SamplingSettings

    policy = CausalLMPolicy(sorting_llama)
    policy.tokenizer.padding_side = "left"
    enc = policy.tokenizer([p["prompt"] for p in PROMPTS] * 2, return_tensors="pt", padding=True)
    settings = SamplingSettings(1.0, 1.0, 0, 8, tuple(policy.eos_token_ids), policy.tokenizer.pad_token_id)
    whole = engine.generate(policy, enc["input_ids"], enc["attention_mask"], settings, torch.Generator().manual_seed(5))
    part = engine.generate(policy, enc["input_ids"][:5], enc["attention_mask"][:5], settings, torch.Generator().manual_seed(5))
    assert torch.equal(part, whole[:5])


def test_row_seeds_fix_a_requests_tokens_whatever_the_batch(sorting_llama, backend):
    """With row seeds, a request's tokens depend on its prefix and seed only: the same prefix
    and seed at two places of a batch, or alone, give the same tokens; other seeds, others."""
    from rebel.text.generation import SamplingSettings

    policy = CausalLMPolicy(sorting_llama)
    policy.tokenizer.padding_side = "left"
    enc = policy.tokenizer([p["prompt"] for p in PROMPTS] * 3, return_tensors="pt", padding=True)
    settings = SamplingSettings(1.5, 1.0, 0, 8, tuple(policy.eos_token_ids), policy.tokenizer.pad_token_id)
    seeds = [*range(100, 108), *range(100, 108), *range(200, 208)]  # rows k and k + 8 share prompt and seed, k + 16 another seed
    out = backend.generate(policy, enc["input_ids"], enc["attention_mask"], settings, torch.Generator().manual_seed(0), row_seeds=seeds)
    assert torch.equal(out[:8], out[8:16]) and not torch.equal(out[:8], out[16:])
    alone = backend.generate(policy, enc["input_ids"][3:4], enc["attention_mask"][3:4], settings, torch.Generator().manual_seed(1),
                             row_seeds=[103])  # fmt: skip
    assert torch.equal(alone[0], out[3])
    with pytest.raises(ValueError, match="^row_seeds has 1 seeds for 2 prompts; expected one per prompt$"):
        backend.generate(policy, enc["input_ids"][:2], enc["attention_mask"][:2], settings, torch.Generator(), row_seeds=[1])


def test_prompts_longer_than_the_engine_are_refused(sorting_llama, engine):
    policy = CausalLMPolicy(sorting_llama)
    sampler = TextSampler(["1" * 30 + ":"], zero_reward, prompts_per_iteration=1, max_new_tokens=8, generation_backend=engine)
    with pytest.raises(
        ValueError, match=r"^a prompt of 31 tokens \+ max_new_tokens 8 is longer than the vLLM engine's max_model_length 28 "
    ):
        sampler.collect(policy)


def test_text_trainer_learns_with_vllm(sorting_llama, engine_kwargs, tmp_path):
    """REBEL with generation_backend='vllm' on the sorting task: logp_old comes from the
    training forward (the log-ratio is exactly 0 when each iteration starts), the engine
    follows the updates, and the reward rises."""
    from rebel_envs.text_tasks import sorted_digits_reward, sorting_dataset

    config = TextConfig(
        output_dir=str(tmp_path / "run"), iterations=20, prompts_per_iteration=32, num_generations=4, max_new_tokens=8,
        learning_rate=1e-3, missing_eos_penalty=1.0, generation_backend="vllm", vllm_kwargs=engine_kwargs, progress=False,
        report_to="none", plot=False,
    )  # fmt: skip
    trainer = TextTrainer(sorting_llama, [sorted_digits_reward], sorting_dataset(1000, seed=3), config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = trainer.train()
    finally:
        torch.set_num_threads(threads)
    assert [r["start_log_ratio_max"] for r in rows] == [0.0] * 20
    first, last = (sum(r["score_mean"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last > first + 0.08, (first, last)  # about 0.57 -> 0.74
    assert trainer.sampler.backend.engine is None  # freed at the end of train()


def test_the_server_trains_like_the_colocated_engine(sorting_llama, engine_kwargs, server_url, tmp_path):
    """Three iterations with the engine in this process and with rebel vllm-serve: the same
    seeds and the same weights give the same samples, so the same metrics."""
    from rebel_envs.text_tasks import sorted_digits_reward, sorting_dataset

    rows = {}
    for mode, extra in (("colocate", {"vllm_kwargs": engine_kwargs}), ("server", {"vllm_server_url": server_url})):
        config = TextConfig(
            output_dir=str(tmp_path / mode), iterations=3, prompts_per_iteration=8, num_generations=4, max_new_tokens=8,
            learning_rate=1e-3, generation_backend="vllm", vllm_mode=mode, progress=False, report_to="none", plot=False, **extra,
        )  # fmt: skip
        rows[mode] = TextTrainer(sorting_llama, [sorted_digits_reward], sorting_dataset(100, seed=3), config).train()
    keys = ("score_mean", "completion_length", "loss", "start_log_ratio_max")
    assert [[r[k] for k in keys] for r in rows["server"]] == [[r[k] for k in keys] for r in rows["colocate"]]


def test_a_resumed_run_is_bit_identical(sorting_llama, engine_kwargs, tmp_path):
    """4 iterations straight == 2, stop, resume, 2 more: the same completions (seeds from the
    checkpointed generator), so the same weights and metrics."""
    from rebel_envs.text_tasks import sorted_digits_reward, sorting_dataset

    def make(name, **kwargs):
        config = TextConfig(
            output_dir=str(tmp_path / name), iterations=4, prompts_per_iteration=8, num_generations=4, max_new_tokens=8,
            learning_rate=1e-3, generation_backend="vllm", vllm_kwargs=engine_kwargs, progress=False, report_to="none", plot=False,
        )  # fmt: skip
        return TextTrainer(sorting_llama, [sorted_digits_reward], sorting_dataset(100, seed=3), config, **kwargs)

    def stop_at_2(trainer, metrics):
        if trainer.iteration == 2:
            trainer.request_stop()

    straight = make("straight")
    rows = straight.train()
    first = make("split", callbacks=[stop_at_2]).train()
    resumed = make("split")
    second = resumed.train(resume=True)
    keys = ("iteration", "score_mean", "completion_length", "loss")
    assert [[r[k] for k in keys] for r in first + second] == [[r[k] for k in keys] for r in rows]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


WORKER = Path(__file__).with_name("distributed_worker.py")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.fixture(scope="module")
def ddp(two_processes, sorting_llama, tmp_path_factory):
    """Data parallel over torchrun, a colocated engine in each of the two processes."""
    return two_processes(WORKER, sorting_llama, out=tmp_path_factory.mktemp("ddp"), port=29561)


def test_data_parallel_with_colocated_engines_and_fsdp2_with_the_server_sample_alike(
    ddp, two_processes, sorting_llama, server_url, tmp_path, monkeypatch
):
    """Two processes: under torchrun each builds its own colocated engine inside the trainer's
    process group, and the ranks keep identical weights; under accelerate's FSDP2 config (the
    colocated engine is refused there) the server gets the weights gathered from the shards and
    draws the very same completions, and the weights end equal up to float rounding."""
    assert ddp[0]["world"] == ddp[1]["world"] == 2
    assert ddp[0]["process_group_after_train"] and ddp[1]["process_group_after_train"]  # the engine's shutdown spares the trainer's
    for name, value in ddp[0]["params"].items():
        assert torch.equal(value, ddp[1]["params"][name]), name
    assert [r["samples"] for r in ddp[0]["rows"]] == [16, 32]  # 2 processes x 4 prompts x 2 completions per iteration
    assert all(r["start_log_ratio_max"] == 0.0 for r in ddp[0]["rows"] + ddp[1]["rows"])

    monkeypatch.setenv("REBEL_TEST_BACKEND", server_url)
    fsdp2 = two_processes(WORKER, sorting_llama, out=tmp_path / "fsdp2", port=29562, accelerate_config=CONFIGS / "fsdp2.yaml")
    for rank in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(fsdp2[rank]["samples"], ddp[rank]["samples"], strict=True))
    assert [r["score_mean"] for r in fsdp2[0]["rows"]] == [r["score_mean"] for r in ddp[0]["rows"]]
    for name, value in ddp[0]["params"].items():
        torch.testing.assert_close(fsdp2[0]["params"][name], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [pytest.param("zero2", marks=pytest.mark.slow), "zero3"])
def test_deepspeed_with_colocated_engines_samples_and_updates_as_data_parallel(ddp, two_processes, sorting_llama, tmp_path, name):
    """DeepSpeed ZeRO-2 and ZeRO-3 beside a colocated engine in each process (ZeRO-3: the engine
    gets the weights gathered from the shards): the completions of both iterations are data
    parallel's, the weights end equal up to float rounding (through AdamW), and the trainer's process group
    outlives the engine (the gather of the sharded weights after train() needs it)."""
    pytest.importorskip("deepspeed")
    runs = two_processes(WORKER, sorting_llama, out=tmp_path, port=29563 + (name == "zero3"), accelerate_config=CONFIGS / f"{name}.yaml")
    for rank in (0, 1):
        assert runs[rank]["process_group_after_train"]
        assert len(runs[rank]["samples"]) == 2
        assert all(torch.equal(a, b) for a, b in zip(runs[rank]["samples"], ddp[rank]["samples"], strict=True))
    assert [r["score_mean"] for r in runs[0]["rows"]] == [r["score_mean"] for r in ddp[0]["rows"]]
    for name_, value in ddp[0]["params"].items():  # AdamW turns a rounding-sized gradient difference into up to a step (lr 1e-3)
        torch.testing.assert_close(runs[0]["params"][name_], value, rtol=0, atol=1e-4)  # ZeRO-3: 2.1e-5 at most here
