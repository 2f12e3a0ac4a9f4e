"""Output names, the guard against overwriting them, left-overs of interrupted saves, when to save, and pruning
old saves (`--save_last_n_*`). Names follow kohya (COMPAT §17); the state folders themselves are
library/train/state_folder.py.
"""
from __future__ import annotations

import argparse
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
PARTIAL_SUFFIX = ".partial"  # a state folder being written


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
        self.extension = extension if not extension or extension.startswith(".") else "." + extension

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

    def _patterns(self) -> list[str]:
        """Regular expressions of every file and state-folder name a run of this output name writes."""
        files = [re.escape(self._name(DEFAULT_LAST_NAME)),
                 re.escape(self._name(DEFAULT_EPOCH_NAME)) + r"-\d{6}",
                 re.escape(self._name(DEFAULT_STEP_NAME)) + r"-step\d{8}"]
        extension = re.escape(self.extension)
        return [name + extension for name in files] + [name + "-state" for name in files]

    def _matching(self, template: str) -> list[Path]:
        if not self.folder.is_dir():
            return []
        matcher = re.compile("|".join(f"(?:{template.format(pattern)})" for pattern in self._patterns()) + r"\Z")
        return sorted(path for path in self.folder.iterdir() if matcher.match(path.name))

    def existing_outputs(self) -> list[Path]:
        """Files and state folders of this output name already in the folder (what a new run could overwrite)."""
        return self._matching("{}")

    def stale_temp_outputs(self) -> list[Path]:
        """What interrupted saves of this output name left: `.name.XXXXXXXX.tmp[.suffix]` / `.old` beside the
        files (atomic writes) and `name-state.partial` folders (state saves)."""
        return self._matching(r"\.(?:{})\.[0-9A-Za-z_]{{8}}\.(?:tmp|old)(?:\.\w+)?") + self._matching(
            "(?:{})" + re.escape(PARTIAL_SUFFIX))


def check_output_name(output_name: str | None) -> None:
    """An output name is a file name: a folder part would bypass the existing-file guard (and `..` escape
    --output_dir)."""
    if output_name is None:
        return
    if not output_name or output_name in (".", "..") or any(char in output_name for char in "/\\\0"):
        raise FlagError(f"--output_name {output_name!r}: expected a file name without folders (no '/', '\\' or "
                        "'..'); put the folder in --output_dir")


def remove_stale_temp_outputs(names: OutputNames) -> list[Path]:
    """Delete this output name's left-overs of interrupted saves (they are never a usable file); returns them."""
    stale = names.stale_temp_outputs()
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted save", path)
    return stale


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


def epoch_save_interval(args: argparse.Namespace, num_epochs: int) -> int | None:
    """Epochs between saves: --save_n_epoch_ratio R gives max(1, floor(epochs / R)) and replaces
    --save_every_n_epochs (kohya's train_network.py); None when neither is given."""
    ratio = getattr(args, "save_n_epoch_ratio", None)
    if ratio:
        return max(1, num_epochs // ratio)
    return getattr(args, "save_every_n_epochs", None)


def epoch_save_due(args: argparse.Namespace, epoch: int, num_epochs: int) -> bool:
    """Save at the end of this epoch? (not after the last one: the final save covers it, as kohya)."""
    every = epoch_save_interval(args, num_epochs)
    return bool(every) and epoch % every == 0 and epoch < num_epochs


def step_save_due(args: argparse.Namespace, global_step: int) -> bool:
    """Save after this step? kohya saves on every multiple, the last step included (unlike epoch saves)."""
    every = getattr(args, "save_every_n_steps", None)
    return bool(every) and global_step % every == 0


def prune_epoch_saves(names: OutputNames, args: argparse.Namespace, epoch: int, num_epochs: int | None = None) -> None:
    """--save_last_n_epochs(_state): delete the save made `every × n` epochs before this one. Without
    `num_epochs`, --save_n_epoch_ratio must already be resolved into args.save_every_n_epochs
    (run_setup.training_schedule does that)."""
    every = (epoch_save_interval(args, num_epochs) if num_epochs else args.save_every_n_epochs) or 1
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


@dataclass(frozen=True)
class PlannedSaves:
    """How many network files and state folders a run writes, and how many of each exist at once at most."""

    files_written: int
    files_kept: int
    states_written: int
    states_kept: int


def planned_saves(args: argparse.Namespace, num_epochs: int, max_train_steps: int) -> PlannedSaves:
    """Count the saves the flags ask for (epoch/step saves, the final one), after --save_last_n_* pruning; one
    more of each exists for a moment while it is written, before the oldest is pruned."""
    epoch_every, step_every = epoch_save_interval(args, num_epochs) or 0, args.save_every_n_steps or 0
    epoch_saves = (num_epochs - 1) // epoch_every if epoch_every else 0
    step_saves = max_train_steps // step_every if step_every else 0

    def kept(saves: int, keep_epochs: int | None, keep_steps: int | None) -> int:
        epochs = min(epoch_saves, keep_epochs) if keep_epochs else epoch_saves
        steps = min(step_saves, -(-keep_steps // step_every) + 1) if keep_steps and step_every else step_saves
        return min(saves, epochs + steps)

    files = epoch_saves + step_saves + 1
    files_kept = kept(files - 1, args.save_last_n_epochs, args.save_last_n_steps) + 1
    states = (epoch_saves + step_saves) if args.save_state else 0
    final_state = 1 if (args.save_state or args.save_state_on_train_end) else 0
    states_kept = kept(states, args.save_last_n_epochs_state or args.save_last_n_epochs,
                       args.save_last_n_steps_state or args.save_last_n_steps) if states else 0
    return PlannedSaves(files + 0, min(files, files_kept + 1), states + final_state,
                        min(states + final_state, states_kept + final_state + (1 if states else 0)))
