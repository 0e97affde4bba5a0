"""Shared by the whole suite: the --runslow option, one torch thread per test, and two-process torchrun runs."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread():
    """The suite's models are tiny: one torch thread is faster, and much faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_two_processes(worker: Path, *args: str, out: Path, port: int, accelerate_config: Path | None = None) -> tuple[dict, dict]:
    """Run the script ``worker`` in two CPU processes (one thread each) with ``args`` and then
    ``out`` as its arguments, under torchrun or, given ``accelerate_config``, under ``accelerate
    launch --config_file``; return the two dicts the ranks saved there (``rank0.pt``, ``rank1.pt``)."""
    import torch

    if accelerate_config is None:
        launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port)]
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                    "--num_processes", "2", "--main_process_port", str(port)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([*launcher, str(worker), *args, str(out)], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))  # type: ignore[return-value]


@pytest.fixture
def torchrun_two_processes(tmp_path: Path) -> Callable[..., tuple[dict, dict]]:
    """``run(worker, *args, port=...)``: :func:`run_two_processes` under torchrun into ``tmp_path``."""

    def run(worker: Path, *args: str, port: int) -> tuple[dict, dict]:
        return run_two_processes(worker, *args, out=tmp_path, port=port)

    return run


@pytest.fixture(scope="session")
def two_processes() -> Callable[..., tuple[dict, dict]]:
    """:func:`run_two_processes`, for fixtures of any scope."""
    return run_two_processes


@pytest.fixture
def eval_best_and_last(capsys) -> Callable[[Path], tuple[dict, dict, dict]]:
    """``fn(run)``: ``rebel eval`` on the run's best and last models; returns their printed
    results by model, and the run's files (bytes by path, the lock left out) before and after."""
    import json

    from rebel.cli import main

    def files(run: Path) -> dict:
        return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    def evaluate(run: Path) -> tuple[dict, dict, dict]:
        before, results = files(run), {}
        for model in ("best", "last"):
            assert main(["eval", str(run), "--model", model]) == 0
            results[model] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return results, before, files(run)

    return evaluate
