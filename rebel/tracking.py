"""Experiment trackers: where a run reports besides its folder (``report_to``).

Each tracker gets the run's scalars every iteration (the row of ``metrics.jsonl``, step = the
iteration), each adapter's samples (tables, captioned images, videos), the resolved config
(``config.yaml``'s content) and the run folder's name as the run's name. Only the main
process reports. A resumed run continues the same tracker run: the ids live in the run
folder's ``trackers.json``.

    tensorboard   TensorBoard event files in ``RUN/tensorboard`` (``purge_step`` on resume)
    wandb         Weights & Biases (files under ``WANDB_DIR``, else ``RUN/wandb``)
    trackio       Trackio (its local database under ``TRACKIO_DIR``, or the Space it is told)
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rebel.config import check_choice

TRACKERS = ("tensorboard", "wandb", "trackio")
INSTALL = {
    "tensorboard": "pip install tensorboard",  # a dependency of rebel-rl itself
    "wandb": 'pip install "rebel-rl[wandb]"',
    "trackio": 'pip install "rebel-rl[trackio]"',
}
IDS_FILE = "trackers.json"
PROJECT = "rebel"  # the W&B / Trackio project unless WANDB_PROJECT / TRACKIO_PROJECT names one


def resolve_report_to(value: str | Sequence[str] | None) -> list[str]:
    """The trackers ``report_to`` names, as TRL takes it (a name or a list of names; ``"none"``,
    an empty list or None: no tracker). An unknown name, or a tracker whose package is not
    installed, is a one-line ValueError (checked without importing the package)."""
    names = [value] if isinstance(value, str) else list(value or [])
    for name in names:
        check_choice("report_to", name, (*TRACKERS, "none"))
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"report_to={names} mixes 'none' with trackers; give either 'none' or trackers")
        return []
    names = list(dict.fromkeys(names))
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:  # not installed (a bare ./wandb folder is no package)
            raise ValueError(_missing(name))
    return names


def legacy_settings(trainer: dict[str, Any]) -> dict[str, Any]:
    """Trainer settings saved before ``report_to`` (``tensorboard: true/false``) in today's terms."""
    if "tensorboard" not in trainer:
        return trainer
    trainer = dict(trainer)
    tensorboard = trainer.pop("tensorboard")
    trainer.setdefault("report_to", ["tensorboard"] if tensorboard else [])
    return trainer


def _missing(name: str) -> str:
    return f"report_to={name!r} needs the {name} package, which is not installed: {INSTALL[name]}"


def _import(name: str) -> Any:
    try:
        module = importlib.import_module(name)
    except ImportError:
        module = None
    if getattr(module, "__file__", None) is None:
        raise ValueError(_missing(name))
    return module


class Tracker:
    """One tracker's run; ``step`` is the iteration. A tracker ignores what it cannot show."""

    name = ""

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        """One iteration's numbers."""

    def log_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table (rows of cells under ``columns``), e.g. an iteration's completions."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Markdown text, e.g. an iteration's transcripts."""

    def log_images(self, tag: str, images: Sequence[Any], captions: Sequence[str], step: int) -> None:
        """Images (``[H, W, 3]`` uint8 arrays), each with its caption."""

    def log_video(self, tag: str, path: Path, step: int) -> None:
        """A video file (an animated GIF)."""

    def state(self) -> dict[str, Any]:
        """What a resume needs to continue this tracker's run (written to ``trackers.json``)."""
        return {}

    def close(self, failed: bool = False) -> None:
        """Finish the run (all data written); ``failed``: the run stopped on an error."""


class TensorBoardTracker(Tracker):
    """Event files in ``RUN/tensorboard``; a resume purges the events past its checkpoint.
    Tables are markdown text; videos are not written (TensorBoard's need moviepy)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
        lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in rows]
        self.writer.add_text(tag, "\n".join(lines), step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def log_images(self, tag: str, images: Sequence[Any], captions: Sequence[str], step: int) -> None:
        for k, image in enumerate(images):
            self.writer.add_image(tag if len(images) == 1 else f"{tag}/{k}", image, step, dataformats="HWC")

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run named after the run folder; its charts use ``iteration`` as their x axis (a
    resume from an earlier checkpoint logs those iterations again instead of being dropped)."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], saved: dict[str, Any]) -> None:
        self.wandb = _import("wandb")
        self.run = self.wandb.init(
            project=saved.get("project") or os.environ.get("WANDB_PROJECT") or PROJECT,
            name=run_dir.name,
            id=saved.get("id"),
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            reinit="create_new",
        )
        self.run.config.update(config, allow_val_change=True)
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "iteration": step})

    def log_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self.run.log({tag: self.wandb.Table(columns=list(columns), data=[list(r) for r in rows]), "iteration": step})

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.log_table(tag, ["text"], [[text]], step)  # W&B shows text in a table

    def log_images(self, tag: str, images: Sequence[Any], captions: Sequence[str], step: int) -> None:
        self.run.log({tag: [self.wandb.Image(i, caption=c) for i, c in zip(images, captions)], "iteration": step})

    def log_video(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Video(str(path), format=path.suffix.lstrip(".")), "iteration": step})

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id, "project": self.run.project}

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TrackioTracker(Tracker):
    """A Trackio run named after the run folder (Trackio resumes a run by its name)."""

    name = "trackio"

    def __init__(self, run_dir: Path, config: dict[str, Any], saved: dict[str, Any]) -> None:
        self.trackio = _import("trackio")
        self.run = self.trackio.init(
            project=saved.get("project") or os.environ.get("TRACKIO_PROJECT") or PROJECT,
            name=saved.get("name") or run_dir.name,
            config=config,
            resume="allow" if saved else "never",
            embed=False,
        )

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self.run.log({tag: self.trackio.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if hasattr(self.trackio, "Markdown"):
            self.run.log({tag: self.trackio.Markdown(text)}, step=step)
        else:  # releases before trackio.Markdown
            self.log_table(tag, ["text"], [[text]], step)

    def log_images(self, tag: str, images: Sequence[Any], captions: Sequence[str], step: int) -> None:
        keys = [tag] if len(images) == 1 else [f"{tag}/{k}" for k in range(len(images))]  # one image per key: Trackio takes no lists
        self.run.log({key: self.trackio.Image(i, caption=c) for key, i, c in zip(keys, images, captions)}, step=step)

    def log_video(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.trackio.Video(str(path))}, step=step)

    def state(self) -> dict[str, Any]:
        return {"project": self.run.project, "name": self.run.name, "id": getattr(self.run, "id", None)}

    def close(self, failed: bool = False) -> None:
        self.run.finish()


def open_trackers(names: Sequence[str], run_dir: Path, config: dict[str, Any], resume_step: int | None) -> list[Tracker]:
    """The trackers ``names`` for the run in ``run_dir``, continuing the tracker runs named in
    its ``trackers.json`` (whose new ids it records). ``resume_step``: the iteration a resume
    continues from (TensorBoard purges the events past it), None for a new run."""
    path = run_dir / IDS_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    trackers: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir, None if resume_step is None else resume_step + 1))
            elif name == "wandb":
                trackers.append(WandbTracker(run_dir, config, saved.get(name, {})))
            else:
                trackers.append(TrackioTracker(run_dir, config, saved.get(name, {})))
    except BaseException:
        for tracker in trackers:
            tracker.close(failed=True)
        raise
    states = {**saved, **{t.name: t.state() for t in trackers if t.state()}}
    if states != saved:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(states, indent=1) + "\n")
        os.replace(tmp, path)
    return trackers


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row, without its ``iteration`` (the step)."""
    return {k: v for k, v in row.items() if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _markdown_cell(cell: Any) -> str:
    if isinstance(cell, float):
        return f"{cell:.4g}"
    return str(cell).replace("|", "\\|").replace("\n", "<br>")[:500]
