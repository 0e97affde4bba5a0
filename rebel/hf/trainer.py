"""``PretrainedTrainer``: what ``TextTrainer`` and ``DiffusionTrainer`` share.

The adapter builds its policy and sampler from its config (a :class:`~rebel.TrainerConfig`
with the adapter's own fields) and hands them over; this class runs :class:`rebel.Trainer`,
writes the adapter's settings to ``config.yaml`` and saves the trained model, with its model
card, at the end; :meth:`PretrainedTrainer.push_to_hub` uploads that folder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from rebel.console import quiet_saving
from rebel.hub import CardInfo, check_push, push_folder, write_model_card
from rebel.policy import Policy
from rebel.sampler import Sampler
from rebel.trainer import Callback, Trainer, TrainerConfig


class PretrainedTrainer(ABC):
    """Trains a pretrained model's policy with REBEL and saves it.

    Subclasses set ``adapter`` (the section of ``config.yaml`` that holds their own settings)
    and implement :meth:`model_folder`, :meth:`_save` and :meth:`card_info`.
    """

    adapter: ClassVar[str]
    shardable: ClassVar[bool] = False  # runs under FSDP2 and ZeRO-3 (implements _save_sharded)

    def __init__(
        self,
        policy: Policy,
        sampler: Sampler,
        config: TrainerConfig,
        *,
        callbacks: Sequence[Callback] = (),
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.config, self.policy, self.sampler = config, policy, sampler
        self.trainer = Trainer(
            policy,
            sampler,
            config,
            run_config={"adapter": self.adapter, self.adapter: config.adapter_settings(), **(run_config or {})},
            callbacks=callbacks,
        )
        if self.trainer.policy_is_sharded and not self.shardable:
            raise ValueError(f"{self.adapter}: FSDP2 and ZeRO-3 are not supported; launch with data parallel or ZeRO-2")

    @property
    def accelerator(self) -> Any:
        return self.trainer.accelerator

    def train(self, resume: bool | str | Path = False, overwrite: bool = False) -> list[dict[str, Any]]:
        """Run the REBEL iterations (``resume``, ``overwrite``, signals and :attr:`stop_reason`
        as in :meth:`rebel.Trainer.train`), then save the model unless a signal stopped the
        run (its checkpoint holds it); returns this call's metric rows."""
        rows = self.trainer.train(resume=resume, overwrite=overwrite)
        if self.trainer.exit_code == 0:
            self.save_model()
        return rows

    @property
    def stop_reason(self) -> str | None:
        """How the last :meth:`train` call ended (see :meth:`rebel.Trainer.train`)."""
        return self.trainer.stop_reason

    @property
    def exit_code(self) -> int:
        return self.trainer.exit_code

    def save_model(self, path: str | Path | None = None, results: dict[str, Any] | None = None) -> Path:
        """Save what was trained, with its model card, to ``path`` (default:
        ``<run>/<model_folder>``); the card shows ``results`` (e.g. the evaluation that made
        a best model) or else the run's last metrics. Only the main process writes, every
        process waits for it."""
        path = Path(path) if path is not None else Path(self.config.output_dir) / self.model_folder()
        state = self.trainer.policy_state()  # every process takes part when the policy is sharded
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with quiet_saving():  # no "Writing model shards" bar
                self._save(path) if state is None else self._save_sharded(path, state)
            self.write_card(path, results=results)
        self.accelerator.wait_for_everyone()
        return path

    def write_card(self, path: Path, results: dict[str, Any] | None = None, **kwargs: Any) -> Path | None:
        """Write the model card ``path/README.md`` (``kwargs`` go to :meth:`card_info`) from
        this run's settings, commands and ``results`` or last metrics."""
        return write_model_card(path, self.card_info(**kwargs), run_dir=self.config.output_dir, results=results)

    def push_to_hub(
        self, repo_id: str, *, private: bool | None = None, token: str | None = None, commit_message: str | None = None
    ) -> str | None:
        """Save the model with its card (:meth:`save_model`) and upload that folder to the
        Hub repo ``repo_id`` (created if needed); returns the commit's URL (None on the other
        processes). A malformed ``repo_id`` or a missing token is refused before anything is saved."""
        token = check_push(repo_id, token)
        path = self.save_model()
        if not self.accelerator.is_main_process:
            return None
        return push_folder(path, repo_id, private=private, token=token, commit_message=commit_message)

    @abstractmethod
    def model_folder(self) -> str:
        """The folder of the run that :meth:`save_model` writes to by default."""

    @abstractmethod
    def _save(self, path: Path) -> None:
        """Write the trained model to ``path`` (main process only)."""

    @abstractmethod
    def card_info(self) -> CardInfo:
        """What the model card says about the saved model (base, library, settings, reward, usage)."""

    def _save_sharded(self, path: Path, state: dict[str, Any]) -> None:
        """Write the trained model to ``path`` from ``state``, the policy's full state dict
        gathered from the processes that shard it (FSDP2, ZeRO-3; main process only); an
        adapter that implements it sets ``shardable``."""
        raise NotImplementedError
