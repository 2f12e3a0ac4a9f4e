"""Training-state folders (`--save_state` / `--resume`): written and read by us, never unpickling code.

The layout is accelerate's (what kohya's scripts write, so states move between the two): `model.safetensors`
(the network), `optimizer.bin`, `scheduler.bin`, `scaler.pt` (fp16 only), `random_states_<process>.pkl` and
`train_state.json`. accelerate's own `load_state` reads registered objects with `weights_only=False`, so a
crafted state could run code; here every `.bin/.pkl/.pt` is read with `safe_torch_load` (tensors and plain
values only; numpy arrays in RNG states) and the network is a safetensors file. Every file is read and checked
against this run (names, shapes, optimizer class) before anything is applied, so a bad state fails with one
line before the loop starts. A folder is written under `<name>.partial` and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from library.errors import FlagError, TrainingStopped, UserInputError
from library.models.state_dict_io import (DiskFullError, ModelFormatError, TensorFile, free_bytes, is_disk_full,
                                          new_temp_folder, remove_path, safe_torch_load,
                                          set_umask_permissions)
from library.train.checkpoints import TrainProgress

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"
PARTIAL_SUFFIX = ".partial"
NETWORK_FILE = "model.safetensors"
LEGACY_NETWORK_FILES = ("custom_checkpoint_0.pkl", "pytorch_model.bin")  # our earlier states / accelerate .bin
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
SCALER_FILE = "scaler.pt"
DEEPSPEED_ENGINE = "deepspeed"  # train_state.json "engine" of a state the DeepSpeed engine wrote
EMA_FILE = "ema.safetensors"  # --use_ema: the shadows, with the EMA's step and settings in the metadata


def rng_file_name(process_index: int) -> str:
    return f"random_states_{process_index}.pkl"


def _numpy_array_globals() -> list:
    """What a pickled numpy array (numpy's MT19937 key in accelerate's RNG files) needs: array reconstruction
    and dtypes only; an object array's items still go through the weights-only unpickler."""
    from numpy import dtypes

    reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
    allowed: list = [reconstruct, np.ndarray, np.dtype, dtypes.UInt32DType]
    if reconstruct.__module__ != "numpy.core.multiarray":
        # states written under numpy 1.x (most kohya installs) name it numpy.core.multiarray._reconstruct
        allowed.append((reconstruct, "numpy.core.multiarray._reconstruct"))
    return allowed


def _class_path(obj: Any) -> str:
    """Module and class of an optimizer or scheduler, seen through accelerate's wrappers."""
    for attribute in ("optimizer", "scheduler"):  # AcceleratedOptimizer.optimizer, AcceleratedScheduler.scheduler
        inner = getattr(obj, attribute, None)
        if type(obj).__name__.startswith("Accelerated") and inner is not None:
            obj = inner
            break
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# ---------------------------------------------------------------------------------------------------- saving


def save_state(accelerator, folder: Path, progress: TrainProgress, network, optimizer, scheduler,
               ema=None) -> None:
    """Write the state of every process into `folder` (all processes must call this).

    Raises:
        DiskFullError: the disk filled up (the partial folder is removed; an earlier state of that name is kept).
    """
    folder = Path(folder)
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    main = accelerator.is_main_process

    def main_only(action: Callable[[], None]) -> Callable[[], None]:
        return action if main else (lambda: None)

    # every process runs the same parts in the same order, so each check below is a barrier for all of them
    parts = [main_only(lambda: _start_partial(partial)),
             lambda: _write_rng(partial / rng_file_name(accelerator.process_index)),
             main_only(lambda: _write_main_files(partial, progress, network, optimizer, scheduler,
                                                 getattr(accelerator, "scaler", None), ema)),
             main_only(lambda: _move_into_place(partial, folder))]
    for part in parts:
        _run_checked(accelerator, part, folder, partial)
    if main:
        logger.info("saved training state to %s", folder)


def save_engine_state(accelerator, folder: Path, progress: TrainProgress, ema=None) -> None:
    """`save_state` for a DeepSpeed run: the engine writes its own checkpoint (model, partitioned optimizer,
    scheduler, RNG; every process its part) through accelerate, and this module adds train_state.json and the EMA,
    so a resume continues at the saved step like any other state. Written under `<name>.partial` too."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    main = accelerator.is_main_process

    def main_only(action: Callable[[], None]) -> Callable[[], None]:
        return action if main else (lambda: None)

    def write_progress() -> None:
        from safetensors.torch import save_file

        if ema is not None:
            shadows = {key: value.detach().to("cpu").contiguous() for key, value in ema.tensors().items()}
            save_file(shadows, str(partial / EMA_FILE), metadata={"format": "pt", "ema": json.dumps(ema.info())})
        record = {**progress.to_json(), "engine": DEEPSPEED_ENGINE}
        (partial / TRAIN_STATE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")

    parts = [main_only(lambda: _start_partial(partial)),
             lambda: accelerator.save_state(str(partial)),
             main_only(write_progress),
             main_only(lambda: _move_into_place(partial, folder))]
    for part in parts:
        _run_checked(accelerator, part, folder, partial)
    if main:
        logger.info("saved training state to %s (DeepSpeed checkpoint)", folder)


def load_engine_state(accelerator, folder: str | Path, ema=None) -> TrainProgress:
    """`load_state` for a DeepSpeed run: the engine reads its checkpoint (DeepSpeed's format, read by DeepSpeed
    and accelerate with their own loaders), then the progress and EMA of this module are restored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FlagError(f"--resume {folder}: not a folder; expected a '-state' folder saved with --save_state")
    record = _read_progress(folder, engine=DEEPSPEED_ENGINE)
    try:
        ema_state = _read_ema(folder) if ema is not None else None
    except ModelFormatError as error:
        raise FlagError(f"--resume {folder}: {error}") from None
    accelerator.load_state(str(folder))
    if ema_state is not None:
        for line in ema.load(*ema_state):
            logger.warning("--resume %s: %s (the flags of this run apply)", folder, line)
    progress = TrainProgress.from_json(record)
    logger.info("resumed from %s (DeepSpeed checkpoint): epoch %d, batch %d, step %d", folder, progress.epoch,
                progress.batch_in_epoch, progress.global_step)
    return progress


def _start_partial(partial: Path) -> None:
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)  # mode from the umask, like every folder the user makes


def _write_rng(path: Path) -> None:
    # accelerate's keys and types, so accelerate (kohya) reads our files and we read theirs
    states = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
              "torch_manual_seed": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    torch.save(states, path)


def _write_main_files(partial: Path, progress: TrainProgress, network, optimizer, scheduler, scaler,
                      ema=None) -> None:
    from safetensors.torch import save_file

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in network.state_dict().items()}
    save_file(tensors, str(partial / NETWORK_FILE), metadata={"format": "pt"})
    if ema is not None:
        shadows = {key: value.detach().to("cpu").contiguous() for key, value in ema.tensors().items()}
        save_file(shadows, str(partial / EMA_FILE), metadata={"format": "pt", "ema": json.dumps(ema.info())})
    torch.save(optimizer.state_dict(), partial / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), partial / SCHEDULER_FILE)
    if scaler is not None:
        torch.save(scaler.state_dict(), partial / SCALER_FILE)
    record = {**progress.to_json(), "optimizer_class": _class_path(optimizer), "scheduler_class": _class_path(scheduler)}
    (partial / TRAIN_STATE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
    for path in partial.iterdir():
        set_umask_permissions(path)


def _move_into_place(partial: Path, folder: Path) -> None:
    if folder.exists():
        backup = new_temp_folder(folder, suffix=".old")
        folder.replace(backup / folder.name)
        partial.replace(folder)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        partial.replace(folder)


def _run_checked(accelerator, action: Callable[[], None], folder: Path, partial: Path | None = None) -> None:
    """Run one part of a save on this process, then agree with the other processes that every part worked; on
    failure every process raises (none is left waiting for the others) and the partial folder is removed."""
    error: BaseException | None = None
    try:
        action()
    except Exception as caught:  # noqa: BLE001 - turned into one message below
        error = caught
    if not all_processes_ok(accelerator, error is None):
        if partial is not None and accelerator.is_main_process:
            remove_path(partial)
        if error is None:
            raise TrainingStopped(f"saving the training state {folder} failed on another process; see its message")
        if isinstance(error, UserInputError):
            raise error
        if is_disk_full(error, folder.parent):
            raise DiskFullError(folder, free_bytes(folder.parent)) from None
        raise error


def all_processes_ok(accelerator, ok: bool) -> bool:
    """True when `ok` holds on every process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum")) == 0.0


# ---------------------------------------------------------------------------------------------------- loading


def load_state(accelerator, folder: str | Path, network, optimizer, scheduler, ema=None) -> TrainProgress:
    """Check every file of a state folder against this run, then restore it; returns where to continue.

    Raises:
        FlagError: a missing, truncated, unsafe or foreign file, named with what differs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FlagError(f"--resume {folder}: not a folder; expected a '-state' folder saved with --save_state")
    try:
        record = _read_progress(folder)
        network_state = _read_network(folder, network)
        optimizer_state = _read_optimizer(folder, optimizer, record)
        scheduler_state = _read_plain(folder / SCHEDULER_FILE, "the learning-rate scheduler")
        scaler = getattr(accelerator, "scaler", None)
        scaler_state = _read_plain(folder / SCALER_FILE, "the fp16 gradient scaler") if scaler is not None and (
            folder / SCALER_FILE).exists() else None
        rng_state = _read_rng(folder, accelerator.process_index)
        ema_state = _read_ema(folder) if ema is not None else None
    except ModelFormatError as error:
        raise FlagError(f"--resume {folder}: {error}") from None
    if ema_state is not None:
        try:
            for line in ema.load(*ema_state):
                logger.warning("--resume %s: %s (the flags of this run apply)", folder, line)
        except UserInputError as error:
            raise FlagError(f"--resume {folder}: {EMA_FILE}: {error}") from None
    _check_class(folder, record, "scheduler_class", scheduler, "--lr_scheduler")
    network.load_state_dict(network_state, strict=True)
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (ValueError, KeyError, TypeError) as error:
        raise FlagError(f"--resume {folder}: {OPTIMIZER_FILE}/{SCHEDULER_FILE} do not fit this run's optimizer "
                        f"and scheduler ({error})") from None
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    _restore_rng(rng_state)
    progress = TrainProgress.from_json(record)
    logger.info("resumed from %s: epoch %d, batch %d, step %d", folder, progress.epoch, progress.batch_in_epoch,
                progress.global_step)
    return progress


def _read_ema(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA shadows and their info; a state saved without --use_ema is named as such."""
    from safetensors import safe_open

    path = folder / EMA_FILE
    if not path.is_file():
        raise ModelFormatError(path, "is missing: the state was saved without --use_ema (leave --use_ema out to "
                                     "resume it, or start a new run)")
    try:
        with safe_open(str(path), "pt") as file:
            info = json.loads((file.metadata() or {}).get("ema", "null"))
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelFormatError(path, f"cannot be read ({error})") from None
    if not isinstance(info, dict):
        raise ModelFormatError(path, "has no EMA step/settings in its metadata; not an EMA state of this tool")
    return tensors, info


def _read_progress(folder: Path, engine: str | None = None) -> dict:
    """train_state.json, checked; `engine` is DEEPSPEED_ENGINE for a DeepSpeed run (None otherwise), and a state
    written by the other kind of run is refused by name."""
    path = folder / TRAIN_STATE_FILE
    if not path.is_file():
        raise FlagError(f"--resume {folder}: has no {TRAIN_STATE_FILE}; expected a '-state' folder saved with "
                        "--save_state")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise FlagError(f"--resume {folder}: {TRAIN_STATE_FILE} is not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise FlagError(f"--resume {folder}: {TRAIN_STATE_FILE}: expected a JSON object, got {type(record).__name__}")
    for key in ("epoch", "batch_in_epoch", "global_step", "current_epoch", "current_step"):
        value = record.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FlagError(f"--resume {folder}: {TRAIN_STATE_FILE}: {key}: expected a whole number >= 0, "
                            f"got {value!r}")
    # kohya's DeepSpeed states have no "engine" key; DeepSpeed's checkpoint always has its `latest` tag file
    saved_by = record.get("engine") or (DEEPSPEED_ENGINE if (folder / "latest").is_file() else None)
    if saved_by != engine:
        if saved_by == DEEPSPEED_ENGINE:
            raise FlagError(f"--resume {folder}: saved by a DeepSpeed run (its optimizer is DeepSpeed's "
                            "partitioned checkpoint); resume it with --deepspeed and the same --zero_stage")
        raise FlagError(f"--resume {folder}: saved by a run without DeepSpeed; resume it without --deepspeed")
    return record


def _read_network(folder: Path, network) -> dict[str, torch.Tensor]:
    path = folder / NETWORK_FILE
    if path.is_file():
        saved = TensorFile(path).read()
    else:
        legacy = next((folder / name for name in LEGACY_NETWORK_FILES if (folder / name).is_file()), None)
        if legacy is None:
            raise FlagError(f"--resume {folder}: has no {NETWORK_FILE} (the network's weights)")
        path, saved = legacy, safe_torch_load(legacy)
        if not isinstance(saved, dict) or not all(isinstance(value, torch.Tensor) for value in saved.values()):
            raise ModelFormatError(path, "expected a dict of the network's tensors")
    own = network.state_dict()
    missing = [key for key in own if key not in saved]
    unexpected = [key for key in saved if key not in own]
    if missing or unexpected:
        first = f"it lacks {missing[0]}" if missing else f"it has {unexpected[0]}, which this network does not"
        raise FlagError(f"--resume {folder}: {path.name} holds another network ({len(saved)} tensors, this run's "
                        f"has {len(own)}; {first}); resume with the --network_module/--network_args of that run")
    for key, tensor in own.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise FlagError(f"--resume {folder}: {path.name}: {key} has shape {tuple(saved[key].shape)}, this run's "
                            f"network has {tuple(tensor.shape)} (saved with another --network_dim or "
                            "--network_args?)")
    return saved


def _read_optimizer(folder: Path, optimizer, record: dict) -> dict:
    state = _read_plain(folder / OPTIMIZER_FILE, "the optimizer")
    if not isinstance(state.get("param_groups"), list) or not isinstance(state.get("state"), dict):
        raise ModelFormatError(folder / OPTIMIZER_FILE, "expected an optimizer state (param_groups and state)")
    _check_class(folder, record, "optimizer_class", optimizer, "--optimizer_type")
    groups = optimizer.state_dict()["param_groups"]
    saved_sizes = [len(group.get("params", [])) for group in state["param_groups"]]
    sizes = [len(group["params"]) for group in groups]
    if saved_sizes != sizes:
        raise FlagError(f"--resume {folder}: {OPTIMIZER_FILE} has parameter groups of sizes {saved_sizes}, this run "
                        f"has {sizes} (other learning-rate groups or another network?)")
    params = [param for group in optimizer.param_groups for param in group["params"]]
    ids = [index for group in state["param_groups"] for index in group["params"]]
    for index, param in zip(ids, params):
        for name, value in (state["state"].get(index) or {}).items():
            # moment buffers have the parameter's shape; 1-D ones may be blocked (8-bit optimizers), so skip them
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and param.dim() == value.dim() and \
                    tuple(value.shape) != tuple(param.shape):
                raise FlagError(f"--resume {folder}: {OPTIMIZER_FILE}: state {name!r} of a parameter has shape "
                                f"{tuple(value.shape)}, the parameter has {tuple(param.shape)}")
    return state


def _check_class(folder: Path, record: dict, key: str, obj, flag: str) -> None:
    saved = record.get(key)
    current = _class_path(obj)
    if saved is not None and saved != current:
        raise FlagError(f"--resume {folder}: the state was saved with {saved}, this run uses {current} ({flag}); "
                        f"resume with the same {flag}")


def _read_plain(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FlagError(f"--resume {path.parent}: has no {path.name} ({what}'s state)")
    state = safe_torch_load(path)
    if not isinstance(state, dict):
        raise ModelFormatError(path, f"expected {what}'s state (a dict), got a {type(state).__name__}")
    return state


def _read_rng(folder: Path, process_index: int) -> dict | None:
    path = folder / rng_file_name(process_index)
    if not path.is_file():
        if process_index == 0:
            raise FlagError(f"--resume {folder}: has no {path.name} (the random-number states)")
        logger.warning("%s: no random states for process %d (the state was saved by fewer processes); it starts "
                       "from --seed", folder, process_index)
        return None
    state = safe_torch_load(path, allowed_globals=_numpy_array_globals())
    if not isinstance(state, dict) or not isinstance(state.get("torch_manual_seed"), torch.Tensor):
        raise ModelFormatError(path, "expected accelerate's random states (random_state, numpy_random_seed, "
                                     "torch_manual_seed)")
    return state


def _restore_rng(state: dict | None) -> None:
    if state is None:
        return
    try:
        if "random_state" in state:
            random.setstate(_as_python_state(state["random_state"]))
        if "numpy_random_seed" in state:
            np.random.set_state(state["numpy_random_seed"])
        torch.set_rng_state(state["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in state:
            torch.cuda.set_rng_state_all(state["torch_cuda_manual_seed"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise FlagError(f"random states of the resumed folder cannot be restored ({error})") from None


def _as_python_state(value):
    """random.setstate needs tuples; a pickle round trip keeps them, but be lenient with lists."""
    if isinstance(value, list):
        return tuple(_as_python_state(item) if isinstance(item, list) else item for item in value)
    return value
