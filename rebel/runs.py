"""The run folder: resolved config, metrics, tracker runs, checkpoints, plots.

Layout of a run folder::

    .lock                  held (flock) by the process that runs it; names that process
    config.yaml            the resolved configuration
    metrics.jsonl          one JSON object per iteration
    commands.txt           the command line of each start (the first, each resume)
    tensorboard/           TensorBoard event files (report_to: tensorboard)
    trackers.json          the ids of the tracker runs a resume continues (W&B, Trackio)
    wandb/                 W&B's files, unless WANDB_DIR names another folder
    checkpoints/iter_N/    written atomically; ``checkpoints/latest`` names the newest
    best/                  the model of the best evaluation so far, and its record (control)
    eval/                  evaluation grids during training (diffusion), ``rebel eval`` results
    curves.png             learning curves, drawn at the end of a run

One run owns a folder: :func:`claim_run` takes its lock for the life of the run and
refuses a folder in use, or a new run into a folder that holds another run's files.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rebel.config import first_line
from rebel.tracking import Tracker, legacy_settings, open_trackers, scalars

CHECKPOINT_PREFIX = "iter_"
LOCK_FILE = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")  # a folder with any of these holds a run
BEST_FOLDER = "best"  # the model of the best evaluation so far
BEST_RECORD = "best.json"  # in it: the iteration and evaluation that made it the best
EVAL_FOLDER = "eval"  # evaluation outputs: grids during training, rebel eval's results
CURVE_KEYS = ("reward_mean", "episode_return", "expected_return", "eval_return", "loss", "kl", "explained_variance")


class RunDir:
    """One run's folder. Only the main process writes the shared files."""

    def __init__(self, path: str | os.PathLike, *, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.checkpoints = self.path / "checkpoints"
        self.trackers: list[Tracker] = []  # see open_trackers

    # ----------------------------------------------------------------- config
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def write_config(self, config: dict[str, Any]) -> None:
        import yaml

        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        return read_config(self.path)

    # ---------------------------------------------------------------- metrics
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one iteration's row to metrics.jsonl and report its numbers to the trackers."""
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        values, step = scalars(row), int(row["iteration"])
        for tracker in self.trackers:
            tracker.log_scalars(values, step)

    def log_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table (e.g. an iteration's completions) to the trackers."""
        for tracker in self.trackers:
            tracker.log_table(tag, columns, rows, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Markdown text (e.g. transcripts) to the trackers."""
        for tracker in self.trackers:
            tracker.log_text(tag, text, step)

    def log_images(self, tag: str, images: Sequence[Any], captions: Sequence[str], step: int) -> None:
        """Images (``[H, W, 3]`` uint8 arrays), each with its caption, to the trackers."""
        for tracker in self.trackers:
            tracker.log_images(tag, images, captions, step)

    def log_image(self, tag: str, image: Any, step: int, caption: str = "") -> None:
        """One image (``[H, W, 3]`` uint8 array) to the trackers."""
        self.log_images(tag, [image], [caption], step)

    def log_video(self, tag: str, path: str | os.PathLike, step: int) -> None:
        """A video file (an animated GIF) to the trackers that show videos."""
        for tracker in self.trackers:
            tracker.log_video(tag, Path(path), step)

    def open_trackers(self, names: Sequence[str], config: dict[str, Any], resume_step: int | None = None) -> None:
        """Start the trackers ``names`` (``report_to``) on the main process; a resumed run
        (``resume_step``: its checkpoint's iteration) continues their runs (``trackers.json``)."""
        if self.is_main and not self.trackers:
            self.trackers = open_trackers(names, self.path, config, resume_step)

    def close(self, failed: bool = False) -> None:
        """Finish the trackers' runs (``failed``: the run stopped on an error)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)

    def append_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Append rows (each with an ``iteration`` key) to ``name`` in the run folder, as
        ``metrics.jsonl`` is; a resume trims them like the metrics."""
        if self.is_main and rows:
            with open(self.path / name, "a") as f:
                f.writelines(json.dumps(r, default=_json_default) + "\n" for r in rows)

    def record_command(self) -> None:
        """Append this process's command line to ``commands.txt``: one line per start of the
        run (the first, each resume), shown by model cards. Not a ``*.jsonl`` log: a resumed run's
        logs equal an uninterrupted one's, its commands do not."""
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.path / "commands.txt", "a") as f:
                f.write(command_line() + "\n")

    def read_commands(self) -> list[str]:
        """The lines of ``commands.txt`` (none if it does not exist)."""
        path = self.path / "commands.txt"
        return [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []

    def truncate_logs(self, iteration: int) -> None:
        """Drop rows past ``iteration`` from every ``*.jsonl`` of the run folder (rows written
        after the checkpoint a resume starts from)."""
        if not self.is_main:
            return
        for path in sorted(self.path.glob("*.jsonl")):
            text = path.read_text(errors="replace")
            kept = [line for line, row in _jsonl_rows(path, text) if row.get("iteration", 0) <= iteration]
            if text != "".join(line + "\n" for line in kept):
                _atomic_write_text(path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def checkpoint_dirs(self) -> list[Path]:
        """The run's checkpoints, newest first."""
        return checkpoint_dirs(self.path)

    def set_aside(self, checkpoint: Path, label: str) -> Path:
        """Rename ``checkpoints/iter_N`` to ``checkpoints/<label>-iter_N`` (out of the
        checkpoints a resume considers; kept for inspection)."""
        target = checkpoint.with_name(f"{label}-{checkpoint.name}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(checkpoint, target)
        return target

    def checkpoint_dir(self, iteration: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{iteration:06d}"

    def staging_dir(self, iteration: int) -> Path:
        """Where every process writes its part of a checkpoint before :meth:`commit_checkpoint`."""
        return self.checkpoints / f".tmp-{CHECKPOINT_PREFIX}{iteration:06d}"

    def commit_checkpoint(self, iteration: int, keep: int) -> Path:
        """Atomically publish the staged checkpoint and drop all but the newest ``keep``."""
        final = self.checkpoint_dir(iteration)
        if final.exists():  # a checkpoint of this iteration from a run resumed before it: set it aside, then drop it
            shutil.rmtree(self.set_aside(final, "replaced"))
        os.replace(self.staging_dir(iteration), final)
        _atomic_write_text(self.checkpoints / "latest", final.name + "\n")
        existing = sorted(p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        for old in existing[: max(0, len(existing) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------ plots
    def plot_curves(self, optimum: dict[str, float] | None = None) -> Path | None:
        """Draw ``curves.png`` (see :func:`curves_figure`; ``optimum``: known best values,
        dashed)."""
        if not self.is_main:
            return None
        fig = curves_figure(read_metrics(self.path), optimum)
        if fig is None:
            return None
        out = self.path / "curves.png"
        fig.savefig(out, dpi=CURVES_DPI)
        return out


CURVES_DPI = 100
CURVES_COLUMNS = 3


def curves_figure(rows: list[dict[str, Any]], optimum: dict[str, float] | None = None) -> Any:
    """A figure of one panel per logged curve of :data:`CURVE_KEYS`, up to three panels a row
    (six panels: 1200 x 640 pixels), each known optimum (``{"eval_return": 1000.0}``) drawn as a
    dashed line; None when no curve is logged."""
    keys = [k for k in CURVE_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return None
    x_key = "env_steps" if any("env_steps" in r for r in rows) else "iteration"
    columns = min(CURVES_COLUMNS, len(keys))
    lines = -(-len(keys) // columns)
    fig = _figure(figsize=(4.0 * columns, 3.2 * lines))
    axes = fig.subplots(lines, columns, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        xs, ys = _series(rows, x_key, key)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
        best = (optimum or {}).get(key)
        if best is not None:
            ax.axhline(best, linestyle="--", color="tab:green", linewidth=1.2, label=f"optimum {best:.4g}")
            ax.legend(fontsize=9)
        ax.set_title(key, fontsize=12)
        ax.set_xlabel(x_key, fontsize=10)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's ``config.yaml``; a malformed one is an error naming the file and line."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {path} does not exist")
    return read_yaml_config(path)


def read_yaml_config(path: str | os.PathLike, option: str = "") -> dict[str, Any]:
    """The sections of a YAML file in ``config.yaml``'s format; a missing or malformed one is
    an error naming the file (after ``option``, the command-line option that named it) and line."""
    import yaml

    path = Path(path)
    where = f"{option} {path}" if option else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        config = yaml.safe_load(path.read_text(errors="replace"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{where}{line}: malformed YAML ({problem})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a mapping of sections (trainer:, ...), got a {type(config).__name__}")  # noqa: TRY004
    if isinstance(config.get("trainer"), dict):
        config["trainer"] = legacy_settings(config["trainer"])
    return config


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (a torn last line is skipped with a warning)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file the run appends to (none if it does not exist). A torn
    last line (a run killed while writing it) is dropped with a warning; a bad line before
    the last is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    return [row for _, row in _jsonl_rows(path, path.read_text(errors="replace"))]


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for k, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append((line, row))
        elif k == len(lines) - 1:
            warnings.warn(f"{path} line {number}: dropping a torn last line (the run stopped while writing it)", stacklevel=3)
        else:
            raise ValueError(f"{path} line {number}: not a JSON object: {line[:80]!r}")
    return rows


def holds_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a run's files (config.yaml, metrics.jsonl or a checkpoint)."""
    path = Path(run_dir)
    return any((path / name).exists() and not _empty_dir(path / name) for name in RUN_FILES)


def ensure_new_run(run_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse a folder that already holds a run, or with ``overwrite`` empty it (call it
    before any expensive set-up, holding the folder's lock)."""
    if not holds_run(run_dir):
        return
    if not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run; resume it (resume=True / --resume), replace it (overwrite=True / --overwrite) "
            "or choose another output_dir"
        )
    for entry in Path(run_dir).iterdir():
        if entry.name != LOCK_FILE:
            _remove(entry)


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints of a run folder, newest first."""
    checkpoints = Path(run_dir) / "checkpoints"
    return sorted((p for p in checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()), reverse=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = checkpoint_dirs(run_dir)
    return found[0] if found else None


def checkpoint_of(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(run folder, checkpoint or None)`` of a ``--resume`` argument: a run folder, or one
    of its checkpoints (``RUN/checkpoints/iter_N``) to resume from that one."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.name.startswith(CHECKPOINT_PREFIX):
        return path.parent.parent, path
    return path, None


# ------------------------------------------------------------------ lock


class RunInUseError(FileExistsError):
    """The run folder is held by another running process."""


_HELD: dict[Path, list[Any]] = {}  # folder -> [open lock file, claims, made by the claim]; a process may claim again


class RunLock:
    """This process's hold on a run folder (see :func:`claim_run`); :meth:`release` it when the run ends."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def release(self) -> None:
        if self.path is None or self.path not in _HELD:
            return
        entry = _HELD[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.path]
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path / LOCK_FILE).st_ino == os.fstat(entry[0].fileno()).st_ino:
                    (self.path / LOCK_FILE).unlink()  # ours, still held: nobody can have taken it meanwhile
            entry[0].close()
            if entry[2] and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()  # made for this run and nothing was written: leave nothing behind
        self.path = None


def claim_run(run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, is_main: bool | None = None) -> RunLock:
    """Take ``run_dir``'s lock for this process and check the folder suits the run: a folder
    in use by another process is refused (naming it and its holder); a new run refuses a
    folder that holds a run unless ``overwrite`` (which empties it). The lock lives in the
    kernel (``flock``): a process that dies leaves no stale lock. Only the main process of a
    multi-process launch claims (``is_main``; default: ``RANK`` is 0)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run, overwrite replaces it")
    if is_main is None:
        is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main:
        return RunLock(None)
    path = Path(run_dir).resolve()
    if path in _HELD:
        _HELD[path][1] += 1
        return RunLock(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output_dir {run_dir} is a file, not a folder")
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        handle = _lock_folder(path, run_dir)
    except BaseException:
        if made and not any(path.iterdir()):
            path.rmdir()
        raise
    _HELD[path] = [handle, 1, made]
    lock = RunLock(path)
    try:
        if not resume:
            ensure_new_run(path, overwrite=overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def claimed_run_folder(run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Iterator[None]:
    """Hold ``run_dir`` for a command (:func:`claim_run`) while it sets up and trains. If the
    command fails before its run holds a checkpoint, what it made is removed: the folder
    and the parents it made, or, in a folder that was there, the entries it added (a run
    that can resume stays). Only the main process claims and removes."""
    path = Path(run_dir).absolute()
    made = [p for p in (path, *path.parents) if not p.exists()]  # the folders the command will make, innermost first
    before = set(path.iterdir()) if path.is_dir() else set()
    lock = claim_run(path, resume=resume, overwrite=overwrite)  # refused: nothing made, nothing to remove
    try:
        yield
    except BaseException:
        if lock.path is not None and path.is_dir() and latest_checkpoint(path) is None:
            for entry in [path] if made else sorted(set(path.iterdir()) - before):
                if made or entry.name != LOCK_FILE:  # the lock file goes with the release below
                    _remove(entry)
            for parent in made[1:]:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only when nothing else went there
        raise
    finally:
        lock.release()


def _lock_folder(path: Path, shown: str | os.PathLike) -> Any:
    """Open and ``flock`` ``path/.lock`` (retrying if it was replaced meanwhile) and write
    who holds it; a folder held by another process is a :class:`RunInUseError`."""
    import fcntl

    lock_file = path / LOCK_FILE
    while True:
        handle = open(lock_file, "a+")  # noqa: SIM115 (held open for the life of the run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            handle.close()
            raise RunInUseError(f"{shown} is in use by {holder}; wait for that run to end or choose another output_dir") from None
        try:
            same = os.stat(lock_file).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # released and removed by its holder between our open and our lock: take the new file
    started = datetime.datetime.now().isoformat(timespec="seconds")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started} ({command_line()})\n")
    handle.flush()
    return handle


def _read_holder(handle: Any, wait_s: float = 2.0) -> str:
    """The holder line of a lock file another process holds. The holder writes it just
    after taking the lock, so an empty file is read again for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        handle.seek(0)
        holder = handle.read().strip()
        if holder or time.monotonic() > deadline:
            return holder or "another process"
        time.sleep(0.02)


def command_line() -> str:
    """This process's command line as a shell would take it (``rebel train ...``,
    ``python script.py ...``, ``python -m package ...``)."""
    import shlex

    if not sys.argv or not sys.argv[0]:
        return "python"
    first = Path(sys.argv[0])
    if first.name == "__main__.py":
        program = f"python -m {first.parent.name}"
    elif first.suffix == ".py" or first.name == "-c":
        program = f"python {sys.argv[0] if first.name != '-c' else '-c ...'}"
    else:
        program = first.name
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


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


def publish_folder(staging: Path, final: Path) -> Path:
    """Replace the folder ``final`` with ``staging`` (both in one folder): a crash in between
    leaves the old one as ``.old-<name>`` (see :func:`published_folder`)."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        _remove(old)
        os.replace(final, old)
    os.replace(staging, final)
    _remove(old)
    return final


def published_folder(final: Path) -> Path | None:
    """The folder :func:`publish_folder` wrote to ``final`` (or the old one it was replacing
    when a crash stopped it), or None."""
    for path in (final, final.with_name(f".old-{final.name}")):
        if path.is_dir():
            return path
    return None


def read_best(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The record of a run's best model (``RUN/best/best.json``: its iteration and
    evaluation), or None when the run has none."""
    folder = published_folder(Path(run_dir) / BEST_FOLDER)
    if folder is None or not (folder / BEST_RECORD).is_file():
        return None
    return json.loads((folder / BEST_RECORD).read_text())


def publish_best(run_dir: str | os.PathLike, write: Any, record: dict[str, Any]) -> Path:
    """Replace ``RUN/best`` with a new folder: ``write(folder)`` writes the model into it,
    ``record`` goes to its ``best.json``; staged beside it, then renamed into place."""
    staging = Path(run_dir) / f".tmp-{BEST_FOLDER}"
    _remove(staging)
    staging.mkdir(parents=True)
    write(staging)
    (staging / BEST_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return publish_folder(staging, Path(run_dir) / BEST_FOLDER)


def check_eval_output(run_dir: str | os.PathLike, out: str | os.PathLike) -> None:
    """An evaluation's ``--output`` may not name a file the run keeps (config, metrics, checkpoints, best model)."""
    kept = [(Path(run_dir) / name).resolve() for name in (*RUN_FILES, BEST_FOLDER)]
    target = Path(out).resolve()
    if any(target == p or p in target.parents for p in kept):
        raise ValueError(f"--output {out} is one of the run's own files; name a new file (default: {run_dir}/eval/<model>-<time>.json)")


def new_eval_path(run_dir: str | os.PathLike, label: str, suffix: str = ".json") -> Path:
    """A new file ``RUN/eval/<label>-<date>-<time><suffix>`` (``-2``, ``-3``... when taken),
    made empty here so that two evaluations never share one."""
    folder = Path(run_dir) / EVAL_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        path = folder / f"{label}-{stamp}{'' if k == 1 else f'-{k}'}{suffix}"
        try:
            path.open("x").close()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{folder} holds 999 evaluations of {label} from {stamp}")


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename, so a crash leaves no torn file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_file(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, torn, missing)."""


def load_checkpoint_file(path: Path) -> Any:
    """:func:`load_file`, with any failure a :class:`DamagedCheckpointError` naming the file."""
    try:
        return load_file(path)
    except Exception as error:  # noqa: BLE001 (torn, truncated or missing: torch raises many kinds)
        raise DamagedCheckpointError(f"checkpoint file {path} is damaged or unreadable ({first_line(error)})") from None


def newest_intact(run_dir: str | os.PathLike, name: str = "trainer.pt") -> tuple[Path, Any]:
    """``(checkpoint, its file name loaded)`` of the newest checkpoint whose ``name`` reads,
    warning about each damaged one passed over."""
    problems = []
    for checkpoint in checkpoint_dirs(run_dir):
        try:
            return checkpoint, load_checkpoint_file(checkpoint / name)
        except DamagedCheckpointError as error:
            warnings.warn(f"{error}; trying an older checkpoint", stacklevel=2)
            problems.append(str(error))
    raise FileNotFoundError(f"{run_dir} holds no intact checkpoint" + (": " + "; ".join(problems) if problems else ""))


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


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
