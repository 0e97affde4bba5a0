"""Shareable models: the model card (``README.md``) each world writes into its saved model
folder, and the upload of such a folder to the Hugging Face Hub.

A card's metadata is what the Hub reads (``library_name``, ``base_model``, ``tags``,
``pipeline_tag``, ``model-index`` with the run's evaluation results); its text says what
was trained, how (REBEL and the settings that matter), on which reward, with what result,
and the commands that made it (``commands.txt`` of the run folder). huggingface_hub is
loaded only here, when a card is written or a folder pushed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rebel.config import first_line

CARD_TAGS = ("rebel-rl", "reinforcement-learning")
# the REBEL settings every card lists (TrainerConfig fields); an adapter adds its own
TRAINER_CARD_SETTINGS = ("loss", "eta", "pairs", "learning_rate", "iterations", "epochs", "minibatch_size", "reward_normalization", "seed")
SAVED_MODEL_FOLDERS = ("model", "lora")  # where a run keeps its final model (lora: diffusion's LoRA)
# metrics of the last iteration that a card shows when the run logged them
RESULT_KEYS = ("iteration", "env_steps", "samples", "reward_mean", "reward_std", "episode_return", "expected_return", "optimal_return")


@dataclass
class CardInfo:
    """What a world tells :func:`write_model_card` about the model it saved.

    ``title``: the card's heading; ``library_name``: the library that loads the folder
    (``transformers``, ``peft``, ``diffusers``, ``rebel-rl``); ``base_model``: what was
    fine-tuned (a hub id goes into the metadata; a local folder is only named in the text);
    ``task``: the Hub task (``text-generation``, ``text-to-image``, ``reinforcement-learning``);
    ``dataset``: what the model-index's results were measured on (an env id, a dataset);
    ``settings``: the settings shown (name -> value); ``reward``: the reward, in words;
    ``usage``: a Python snippet that loads the folder; ``start``: what training started
    from, in words (default: the base model)."""

    title: str
    library_name: str
    task: str
    dataset: str
    settings: dict[str, Any]
    reward: str
    usage: str
    base_model: str | None = None
    tags: Sequence[str] = ()
    license: str | None = None
    start: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more metadata fields (pipeline_tag, ...)


def card_settings(config: Any, own: Sequence[str]) -> dict[str, Any]:
    """``{name: value}`` of a run config's REBEL settings and of the adapter's ``own`` fields
    (those set), after ``algorithm``: REBEL, or the baseline loss the run used instead."""
    loss = getattr(config, "loss", "rebel")
    algorithm = "REBEL" if loss == "rebel" else f"{loss} (baseline loss)"
    return {
        "algorithm": algorithm,
        **{n: getattr(config, n) for n in (*TRAINER_CARD_SETTINGS, *own) if getattr(config, n, None) is not None},
    }


def describe_rewards(fns: Sequence[Any], weights: Sequence[float]) -> str:
    """``name`` or ``name x weight, ...``: the rewards a run sums, by their names."""
    names = [getattr(fn, "__name__", type(fn).__name__) for fn in fns]
    if all(w == 1.0 for w in weights):
        return ", ".join(names)
    return ", ".join(f"{name} x {weight:g}" for name, weight in zip(names, weights))


def hub_base_model(source: Any) -> str | None:
    """``source`` when it names a model on the Hub (``org/name``, not a folder here); else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(source) if isinstance(source, (str, os.PathLike)) else ""
    if "/" not in text or Path(text).exists():
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def write_model_card(
    folder: str | os.PathLike, info: CardInfo, run_dir: str | os.PathLike | None = None, results: dict[str, Any] | None = None
) -> Path | None:
    """Write ``folder/README.md``: ``info``'s metadata and text, with the last metrics row and
    the commands of ``run_dir`` (when it is a run folder) and ``results`` (metrics to show
    instead of the last row, e.g. the evaluation that made a best model). Without
    huggingface_hub (an install older than the extras' list) the card is left out with a
    warning and None returned: the weights beside it are saved regardless."""
    try:
        from huggingface_hub import ModelCard, ModelCardData
    except ModuleNotFoundError:
        warnings.warn(f"no model card in {folder}: huggingface_hub is not installed (pip install huggingface_hub)", stacklevel=2)
        return None

    from rebel.runs import RunDir, read_metrics

    rows = read_metrics(run_dir) if run_dir is not None else []
    last = dict(results) if results is not None else (rows[-1] if rows else {})
    evals = {k: v for k, v in last.items() if k.startswith("eval") and _is_number(v)}
    commands = RunDir(run_dir).read_commands() if run_dir is not None else []
    data = ModelCardData(
        library_name=info.library_name,
        base_model=info.base_model,
        license=info.license,
        tags=[*CARD_TAGS, *info.tags],
        model_name=info.title,
        eval_results=_eval_results(evals, info) or None,
        **info.extra,
    )
    text = "\n\n".join(
        part
        for part in (
            f"---\n{data.to_yaml()}\n---",
            f"# {info.title}",
            _summary(info),
            "## Use it\n\n```python\n" + info.usage.strip() + "\n```",
            "## Training\n\n" + _table(info.settings),
            f"Reward: {info.reward}.",
            ("## Results\n\n" + _table({k: v for k, v in last.items() if k in RESULT_KEYS or k in evals})) if last else "",
            ("## Reproduce\n\n```bash\n" + "\n".join(commands) + "\n```") if commands else "",
        )
        if part
    )
    path = Path(folder) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    ModelCard(text + "\n").save(path)
    return path


def push_folder(
    folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None, commit_message: str | None = None
) -> str:
    """Create ``repo_id`` on the Hub if needed (``private`` as asked) and upload ``folder`` to
    it; returns the commit's URL. :func:`check_push` runs first."""
    from huggingface_hub import HfApi

    token = check_push(repo_id, token, folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message or "Upload a REBEL model (rebel-rl)"
    )
    return str(getattr(info, "commit_url", info))


def model_folder_of(path: str | os.PathLike) -> Path:
    """The saved model folder ``path`` names: itself (a folder with a model card) or, for a
    run folder, its final model (``model/`` or ``lora/``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; expected a run folder or a saved model folder")
    if (path / "README.md").is_file() and not (path / "config.yaml").is_file():
        return path
    for name in SAVED_MODEL_FOLDERS:
        if (path / name / "README.md").is_file():
            return path / name
    raise FileNotFoundError(
        f"{path} holds no saved model with a model card; expected a saved model folder (README.md beside the weights) "
        f"or a run folder with {' or '.join(n + '/' for n in SAVED_MODEL_FOLDERS)}"
    )


def check_push(repo_id: str, token: str | None, folder: str | os.PathLike | None = None) -> str:
    """The token to upload with, after the checks that need no network: ``repo_id`` is a valid
    ``name`` / ``org/name``, a token is given or stored (``HF_TOKEN``, ``hf auth login``) and
    ``folder`` (when given) holds a model card. Each failure is one line."""
    try:
        from huggingface_hub import get_token
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ModuleNotFoundError as error:
        raise ValueError("pushing to the Hub needs huggingface_hub: pip install 'rebel-rl[control]' (or text, diffusion)") from error
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"repo id {repo_id!r} is not valid; expected 'name' or 'org/name' ({first_line(error).split(': ', 1)[-1]})"
        ) from None
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: pass token=..., set HF_TOKEN, or log in with `hf auth login`")
    if folder is not None and not (Path(folder) / "README.md").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (it has no README.md model card)")
    return token


def _summary(info: CardInfo) -> str:
    start = info.start or (f"`{info.base_model}`" if info.base_model else "its base model")
    if info.settings.get("algorithm", "REBEL") != "REBEL":
        return f"A {info.task} model trained from {start} in rebel-rl's trainer with the {info.settings['algorithm']}, not REBEL's."
    return (
        f"A {info.task} model trained from {start} with REBEL (REgression to RElative REward Based RL) in rebel-rl: "
        "each iteration samples several trajectories per context and regresses the difference of their "
        "log-probability ratios onto the difference of their rewards."
    )


def _eval_results(evals: dict[str, float], info: CardInfo) -> list[Any]:
    """The model-index entries: ``eval_return`` (with its std) as the Hub's ``mean_reward``,
    any other evaluation reward (``eval/...reward...``) or dialog return (``eval/...return_mean``) under its own name."""
    from huggingface_hub import EvalResult

    def result(metric: str, value: Any, name: str) -> Any:
        return EvalResult(
            task_type=info.task,
            dataset_type=info.dataset,
            dataset_name=info.dataset,
            metric_type=metric,
            metric_value=value,
            metric_name=name,
        )

    out = []
    for key, value in evals.items():
        if key == "eval_return":
            std = evals.get("eval_return_std")
            out.append(result("mean_reward", f"{value:.2f} +/- {std:.2f}" if std is not None else round(value, 4), "mean_reward"))
        elif "reward" in key or key.endswith("return_mean"):  # text: a reward, or a dialog's return
            out.append(result(key, round(float(value), 6), key))
    return out


def _table(values: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {_shown(v)} |" for k, v in values.items())
    return "| name | value |\n| --- | --- |\n" + rows if values else ""


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
