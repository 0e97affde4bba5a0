"""The run folder: resolved config, metrics, TensorBoard events, checkpoints, plots.

Layout of a run folder::

    config.yaml            the resolved configuration
    metrics.jsonl          one JSON object per iteration
    tensorboard/           TensorBoard event files
    checkpoints/iter_N/    written atomically; ``checkpoints/latest`` names the newest
    curves.png             learning curves, drawn at the end of a run
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "iter_"
CURVE_KEYS = ("reward_mean", "episode_return", "expected_return", "eval_return", "loss", "kl", "explained_variance")


class RunDir:
    """One run's folder. Only the main process writes the shared files."""

    def __init__(self, path: str | os.PathLike, *, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.checkpoints = self.path / "checkpoints"
        self._writer: Any = None
        if is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- config
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def write_config(self, config: dict[str, Any]) -> None:
        import yaml

        if self.is_main:
            _atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        return read_config(self.path)

    # ---------------------------------------------------------------- metrics
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one iteration's row to metrics.jsonl and TensorBoard."""
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        if self._writer is not None:
            step = int(row["iteration"])
            for key, value in row.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """``image``: ``[H, W, 3]`` uint8 array."""
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC")

    def open_tensorboard(self, purge_step: int | None = None) -> None:
        if self.is_main and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path / "tensorboard"), purge_step=purge_step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def append_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Append rows (each with an ``iteration`` key) to ``name`` in the run folder, as
        ``metrics.jsonl`` is; a resume trims them like the metrics."""
        if self.is_main and rows:
            with open(self.path / name, "a") as f:
                f.writelines(json.dumps(r, default=_json_default) + "\n" for r in rows)

    def truncate_logs(self, iteration: int) -> None:
        """Drop rows past ``iteration`` from every ``*.jsonl`` of the run folder (rows written
        after the checkpoint a resume starts from)."""
        if not self.is_main:
            return
        for path in sorted(self.path.glob("*.jsonl")):
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line).get("iteration", 0) <= iteration]
            if len(kept) != len(lines):
                _atomic_write_text(path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def checkpoint_dir(self, iteration: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{iteration:06d}"

    def staging_dir(self, iteration: int) -> Path:
        """Where every process writes its part of a checkpoint before :meth:`commit_checkpoint`."""
        return self.checkpoints / f".tmp-{CHECKPOINT_PREFIX}{iteration:06d}"

    def commit_checkpoint(self, iteration: int, keep: int) -> Path:
        """Atomically publish the staged checkpoint and drop all but the newest ``keep``."""
        final = self.checkpoint_dir(iteration)
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.staging_dir(iteration), final)
        _atomic_write_text(self.checkpoints / "latest", final.name + "\n")
        existing = sorted(p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        for old in existing[: max(0, len(existing) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------ plots
    def plot_curves(self) -> Path | None:
        """Draw ``curves.png``: one panel per logged curve of :data:`CURVE_KEYS`."""
        rows = read_metrics(self.path)
        keys = [k for k in CURVE_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
        if not self.is_main or not keys:
            return None
        x_key = "env_steps" if any("env_steps" in r for r in rows) else "iteration"
        fig = _figure(figsize=(3.6 * len(keys), 3.0))
        axes = fig.subplots(1, len(keys), squeeze=False)
        for ax, key in zip(axes[0], keys):
            xs, ys = _series(rows, x_key, key)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
            ax.set_title(key)
            ax.set_xlabel(x_key)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.path / "curves.png"
        fig.savefig(out, dpi=100)
        return out


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {path} does not exist")
    return yaml.safe_load(path.read_text()) or {}


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ensure_new_run(run_dir: str | os.PathLike) -> None:
    """Refuse a folder that already holds a run (call it before any expensive set-up)."""
    if latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; resume it (resume=True / --resume) or choose another output_dir")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    checkpoints = Path(run_dir) / "checkpoints"
    pointer = checkpoints / "latest"
    if pointer.is_file():
        candidate = checkpoints / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = sorted(p for p in checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    return found[-1] if found else None


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    metric: str | None = None,
    x: str | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Overlay one metric of several runs. Defaults: ``eval_return`` if logged else
    ``reward_mean``, against ``env_steps`` if logged else ``iteration``."""
    all_rows = [read_metrics(d) for d in run_dirs]
    for d, rows in zip(run_dirs, all_rows):
        if not rows:
            raise FileNotFoundError(f"{d} has no metrics.jsonl rows to plot")
    if metric is None:
        metric = "eval_return" if all(any("eval_return" in r for r in rows) for rows in all_rows) else "reward_mean"
    if x is None:
        x = "env_steps" if all(any("env_steps" in r for r in rows) for rows in all_rows) else "iteration"
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, (d, rows) in enumerate(zip(run_dirs, all_rows)):
        xs, ys = _series(rows, x, metric)
        if not xs:
            raise ValueError(f"run {d} has no {metric!r} against {x!r} in its metrics.jsonl")
        ax.plot(xs, ys, label=labels[i] if labels else Path(d).name)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename, so a crash leaves no torn file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_file(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in rows if isinstance(r.get(y), (int, float)) and x in r and math.isfinite(r[y])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib figure that needs no display and leaves pyplot's state alone."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
