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


@pytest.fixture
def torchrun_two_processes(tmp_path: Path) -> Callable[..., tuple[dict, dict]]:
    """``run(worker, *args, port=...)`` runs the script ``worker`` under torchrun in two CPU
    processes (one thread each) with ``args`` and then ``tmp_path`` as its arguments, and returns
    the two dicts the ranks saved there (``rank0.pt``, ``rank1.pt``)."""
    import torch

    def run(worker: Path, *args: str, port: int) -> tuple[dict, dict]:
        torchrun = Path(sys.executable).with_name("torchrun")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        result = subprocess.run(
            [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), str(worker), *args, str(tmp_path)],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
        return rank0, rank1

    return run
