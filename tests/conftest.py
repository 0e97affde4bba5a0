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


@pytest.fixture
def kept_best() -> Callable[[Path, str], dict]:
    """``fn(run, metric)``: checks that ``RUN/best/best.json`` records the first evaluation of
    the highest ``metric`` in the run's metrics (which must differ between evaluations), and
    returns the record."""
    import json

    from rebel.runs import read_metrics

    def check(run: Path, metric: str) -> dict:
        scores = [r[metric] for r in read_metrics(run) if metric in r]
        best = json.loads((run / "best" / "best.json").read_text())
        first_best = max(range(len(scores)), key=lambda k: (scores[k], -k))
        assert (best["iteration"], best["score"], best["metric"]) == (first_best + 1, scores[first_best], metric)
        assert len(set(scores)) > 1  # the evaluations differ: the choice above means something
        return best

    return check


class OfflineWandb:
    """W&B in offline mode with its folders under ``dir``; :meth:`runs` reads back what it wrote."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder

    def runs(self) -> list[dict]:
        """Each offline run's ``folder``, ``id``, ``name``, ``project``, ``config``, ``history``
        rows (W&B's nested keys of media joined with ``/``) and ``exit_code``, oldest folder first."""
        import wandb

        wandb.teardown()  # the service writes the run files asynchronously; its shutdown flushes them
        return [self._read(folder) for folder in sorted((self.dir / "wandb").glob("offline-run-*"))]

    @staticmethod
    def _read(folder: Path) -> dict:
        import json

        [path] = folder.glob("run-*.wandb")
        found: dict = {"folder": folder, "config": {}, "history": []}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found.update(id=record.run.run_id, name=record.run.display_name, project=record.run.project)
                found["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                found["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "exit":
                found["exit_code"] = record.exit.exit_code
            elif kind == "history":
                items = record.history.item
                found["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
        found["config"].pop("_wandb", None)
        return found


def _wandb_records(path: Path) -> list:
    """The records of a ``run-ID.wandb`` file: a 7-byte header, then 32 KiB blocks of chunks,
    each ``crc32c (4) | length (2, little-endian) | kind (1: whole record; 2, 3, 4: its first, middle, last part)``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the zero-filled tail of a block
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OfflineWandb:
    """W&B offline, each of its folders inside ``tmp_path``, and no connection but local ones
    (the W&B client talks to its own service process over a local socket)."""
    import socket

    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'rebel-rl[wandb]')")
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    folder = tmp_path / "wandb-home"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    for key, name in (
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        monkeypatch.setenv(key, str(folder / name))
    connect = socket.socket.connect

    def local_only(self: socket.socket, address: object) -> None:
        if self.family != socket.AF_UNIX and address[0] not in ("127.0.0.1", "localhost", "::1"):  # type: ignore[index]
            raise AssertionError(f"W&B tried to reach {address} in offline mode")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    return OfflineWandb(folder)
