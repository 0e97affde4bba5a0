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
