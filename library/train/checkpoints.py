"""Output names, when to save, pruning old saves (`--save_last_n_*`), and training-state folders for `--resume`.

Names follow kohya (COMPAT §17). A state folder is accelerate's `save_state` output plus `train_state.json`
(kohya's `current_epoch`/`current_step`, and ours: the position inside the epoch), written under a temporary
name and renamed when complete, so an interrupted save never looks like a usable state.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from library.errors import FlagError

logger = logging.getLogger(__name__)

DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_STEP_NAME = "at"
DEFAULT_LAST_NAME = "last"
TRAIN_STATE_FILE = "train_state.json"
PARTIAL_SUFFIX = ".partial"


@dataclass
class TrainProgress:
    """Where a run is. `epoch` is 1-based and is the epoch in progress; `batch_in_epoch` counts batches of it
    already consumed (0 at an epoch boundary). `global_step` counts optimizer steps."""

    epoch: int = 1
    batch_in_epoch: int = 0
    global_step: int = 0
    session_id: int | None = None
    started_at: float | None = None

    def to_json(self) -> dict:
        # kohya's keys first, so kohya tools reading train_state.json find what they expect
        return {"current_epoch": self.epoch - (1 if self.batch_in_epoch == 0 else 0), "current_step": self.global_step,
                **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> "TrainProgress":
        if "epoch" in data:
            return cls(**{key: data[key] for key in ("epoch", "batch_in_epoch", "global_step", "session_id",
                                                      "started_at") if key in data})
        # a kohya state holds only the step count; epoch 0 means "derive the position from global_step"
        return cls(epoch=0, batch_in_epoch=0, global_step=int(data.get("current_step", 0)))

    def position_from_step(self, steps_per_epoch: int, accumulation: int) -> "TrainProgress":
        """For states without a position (kohya's): the epoch and batch that `global_step` steps reach."""
        if self.epoch:
            return self
        done_epochs, steps_into_epoch = divmod(self.global_step, max(steps_per_epoch, 1))
        return TrainProgress(done_epochs + 1, steps_into_epoch * accumulation, self.global_step, self.session_id,
                             self.started_at)


class OutputNames:
    """File and folder names inside --output_dir (COMPAT §17)."""

    def __init__(self, output_dir: str | Path, output_name: str | None, extension: str):
        self.folder = Path(output_dir)
        self.output_name = output_name
        self.extension = extension if extension.startswith(".") else "." + extension

    def _name(self, default: str) -> str:
        return self.output_name if self.output_name else default

    def epoch_file(self, epoch: int) -> Path:
        return self.folder / f"{self._name(DEFAULT_EPOCH_NAME)}-{epoch:06d}{self.extension}"

    def step_file(self, step: int) -> Path:
        return self.folder / f"{self._name(DEFAULT_STEP_NAME)}-step{step:08d}{self.extension}"

    def last_file(self) -> Path:
        return self.folder / f"{self._name(DEFAULT_LAST_NAME)}{self.extension}"

    def epoch_state(self, epoch: int) -> Path:
        return self.folder / f"{self._name(DEFAULT_EPOCH_NAME)}-{epoch:06d}-state"

    def step_state(self, step: int) -> Path:
        return self.folder / f"{self._name(DEFAULT_STEP_NAME)}-step{step:08d}-state"

    def last_state(self) -> Path:
        return self.folder / f"{self._name(DEFAULT_LAST_NAME)}-state"

    def existing_outputs(self) -> list[Path]:
        """Files of this output name already in the folder (what a new run could overwrite)."""
        if not self.folder.is_dir():
            return []
        patterns = [re.escape(self.last_file().name),
                    re.escape(self._name(DEFAULT_EPOCH_NAME)) + r"-\d{6}" + re.escape(self.extension),
                    re.escape(self._name(DEFAULT_STEP_NAME)) + r"-step\d{8}" + re.escape(self.extension)]
        matcher = re.compile("|".join(f"(?:{pattern})" for pattern in patterns) + r"\Z")
        return sorted(path for path in self.folder.iterdir() if matcher.match(path.name))


def check_output_folder(names: OutputNames, *, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a run that would overwrite files of the same name (unless resuming or --overwrite_output)."""
    if resuming or overwrite:
        return
    existing = names.existing_outputs()
    if existing:
        raise FlagError(f"--output_dir {names.folder} already holds {existing[0].name}"
                        f"{f' and {len(existing) - 1} more' if len(existing) > 1 else ''} for --output_name "
                        f"{names.output_name or '(default)'}; choose another --output_name, move the files, "
                        "or pass --overwrite_output")


def epoch_save_due(args: argparse.Namespace, epoch: int, num_epochs: int) -> bool:
    """Save at the end of this epoch? (not after the last one: the final save covers it, as kohya)."""
    every = getattr(args, "save_every_n_epochs", None)
    return bool(every) and epoch % every == 0 and epoch < num_epochs


def step_save_due(args: argparse.Namespace, global_step: int) -> bool:
    """Save after this step? kohya saves on every multiple, the last step included (unlike epoch saves)."""
    every = getattr(args, "save_every_n_steps", None)
    return bool(every) and global_step % every == 0


def prune_epoch_saves(names: OutputNames, args: argparse.Namespace, epoch: int) -> None:
    """--save_last_n_epochs(_state): delete the save made `every × n` epochs before this one."""
    every = args.save_every_n_epochs or 1
    if args.save_last_n_epochs:
        _remove(names.epoch_file(epoch - every * args.save_last_n_epochs))
    keep_states = args.save_last_n_epochs_state or args.save_last_n_epochs
    if keep_states:
        _remove(names.epoch_state(epoch - every * keep_states))


def prune_step_saves(names: OutputNames, args: argparse.Namespace, global_step: int) -> None:
    """--save_last_n_steps(_state): delete step saves older than the last N steps (kohya counts steps, not saves)."""
    every = args.save_every_n_steps or 1
    for keep, name_of in ((args.save_last_n_steps, names.step_file),
                          (args.save_last_n_steps_state or args.save_last_n_steps, names.step_state)):
        if not keep:
            continue
        for step in range(every, global_step - keep, every):
            _remove(name_of(step))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
        logger.info("removed old state %s", path)
    elif path.exists():
        path.unlink()
        logger.info("removed old save %s", path)


# ----------------------------------------------------------------------------------------------- states


def save_state(accelerator, folder: Path, progress: TrainProgress) -> None:
    """accelerate's state (registered network, optimizer, scheduler, RNG of every process) plus our progress.

    Every process must call this (accelerate saves each process's RNG state); the main process renames the
    finished folder into place.
    """
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / TRAIN_STATE_FILE).write_text(json.dumps(progress.to_json(), indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
        logger.info("saved training state to %s", folder)
    accelerator.wait_for_everyone()


def load_state(accelerator, folder: str | Path) -> TrainProgress:
    """Restore a state saved by `save_state` (or by kohya's scripts); returns where to continue."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FlagError(f"--resume {folder}: not a folder; expected a '-state' folder saved with --save_state")
    progress_file = folder / TRAIN_STATE_FILE
    if not progress_file.exists():
        raise FlagError(f"--resume {folder}: has no {TRAIN_STATE_FILE}; expected a '-state' folder saved with "
                        "--save_state")
    try:
        progress = TrainProgress.from_json(json.loads(progress_file.read_text()))
    except (ValueError, TypeError) as error:
        raise FlagError(f"--resume {folder}: {TRAIN_STATE_FILE} is not valid ({error})") from error
    accelerator.load_state(str(folder))
    logger.info("resumed from %s: epoch %d, batch %d, step %d", folder, progress.epoch, progress.batch_in_epoch,
                progress.global_step)
    return progress
