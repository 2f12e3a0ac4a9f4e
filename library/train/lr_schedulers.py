"""`--lr_scheduler` name (or `--lr_scheduler_type` class) -> learning-rate scheduler, as kohya's get_scheduler_fix,
built on the transformers / diffusers schedule functions. Step counts are optimizer steps."""
from __future__ import annotations

import difflib
import importlib
import logging
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from library.errors import FlagError
from library.train.optimizers import needs_train_eval_mode, parse_optimizer_args, uses_relative_step

logger = logging.getLogger(__name__)


def _hf_schedules() -> types.ModuleType:
    # imported on use: transformers.optimization pulls in its trainer utilities, several seconds of import time
    from transformers import optimization

    return optimization


@dataclass(frozen=True)
class ScheduleSteps:
    """Resolved schedule lengths, in scheduler steps (already multiplied by the number of processes)."""

    warmup: int
    training: int
    decay: int
    num_cycles: int
    power: float
    timescale: int | None
    min_lr_ratio: float | None


def resolve_warmup_steps(value: float | None, total_steps: int, flag: str = "--lr_warmup_steps") -> int:
    """A step count, or (float below 1) a ratio of `total_steps`: 0.1 of 1000 steps is 100 (kohya int_or_float)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FlagError(f"{flag}: expected a step count or a ratio below 1, got {value!r}")
    if value < 0:
        raise FlagError(f"{flag}: expected a step count or ratio >= 0, got {value}")
    if isinstance(value, float) and value < 1:
        return int(value * total_steps)
    if isinstance(value, float) and not value.is_integer():
        raise FlagError(f"{flag}: expected a whole step count or a ratio below 1, got {value}")
    return int(value)


def _scaled_steps(value: float | None, num_training_steps: int, num_processes: int, flag: str) -> int:
    # A ratio applies to the already-scaled total (as kohya); a step count is scaled like the total. kohya does
    # not scale integer warmup/decay steps, which shortens them on several GPUs; we keep them in optimizer steps.
    if isinstance(value, float) and value < 1:
        return resolve_warmup_steps(value, num_training_steps * num_processes, flag)
    return resolve_warmup_steps(value, num_training_steps, flag) * num_processes


def _require_no_warmup(what: str, steps: ScheduleSteps) -> None:
    # kohya refuses warmup steps for schedules that ignore them (wrap_check_needless_num_warmup_steps)
    if steps.warmup:
        raise FlagError(f"--lr_warmup_steps: {what} has no warmup, got {steps.warmup} steps; set --lr_warmup_steps 0"
                        f" or use --lr_scheduler constant_with_warmup")


def _constant(optimizer: torch.optim.Optimizer, steps: ScheduleSteps, kwargs: dict[str, Any]) -> LRScheduler:
    _require_no_warmup("--lr_scheduler constant", steps)
    return _hf_schedules().get_constant_schedule(optimizer, **kwargs)


def _constant_with_warmup(optimizer: torch.optim.Optimizer, steps: ScheduleSteps,
                          kwargs: dict[str, Any]) -> LRScheduler:
    return _hf_schedules().get_constant_schedule_with_warmup(optimizer, num_warmup_steps=steps.warmup, **kwargs)


def _linear(optimizer: torch.optim.Optimizer, steps: ScheduleSteps, kwargs: dict[str, Any]) -> LRScheduler:
    return _hf_schedules().get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=steps.warmup, num_training_steps=steps.training, **kwargs)


def _cosine(optimizer: torch.optim.Optimizer, steps: ScheduleSteps, kwargs: dict[str, Any]) -> LRScheduler:
    return _hf_schedules().get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=steps.warmup, num_training_steps=steps.training, **kwargs)


def _cosine_with_restarts(optimizer: torch.optim.Optimizer, steps: ScheduleSteps,
                          kwargs: dict[str, Any]) -> LRScheduler:
    return _hf_schedules().get_cosine_with_hard_restarts_schedule_with_warmup(
        optimizer, num_warmup_steps=steps.warmup, num_training_steps=steps.training, num_cycles=steps.num_cycles,
        **kwargs)


def _polynomial(optimizer: torch.optim.Optimizer, steps: ScheduleSteps, kwargs: dict[str, Any]) -> LRScheduler:
    return _hf_schedules().get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=steps.warmup, num_training_steps=steps.training, power=steps.power, **kwargs)


def _inverse_sqrt(optimizer: torch.optim.Optimizer, steps: ScheduleSteps, kwargs: dict[str, Any]) -> LRScheduler:
    return _hf_schedules().get_inverse_sqrt_schedule(
        optimizer, num_warmup_steps=steps.warmup, timescale=steps.timescale, **kwargs)


def _cosine_with_min_lr(optimizer: torch.optim.Optimizer, steps: ScheduleSteps,
                        kwargs: dict[str, Any]) -> LRScheduler:
    if steps.min_lr_ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
        raise FlagError("--lr_scheduler cosine_with_min_lr: needs the final lr ratio, got none; "
                        "pass --lr_scheduler_min_lr_ratio, e.g. 0.1")
    if steps.min_lr_ratio is not None:
        kwargs = {"min_lr_rate": steps.min_lr_ratio, **kwargs}
    # kohya passes num_cycles / 2, so the default 1 is the usual half cosine from 1 down to the minimum
    return _hf_schedules().get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=steps.warmup, num_training_steps=steps.training,
        num_cycles=steps.num_cycles / 2, **kwargs)


def _warmup_stable_decay(optimizer: torch.optim.Optimizer, steps: ScheduleSteps,
                         kwargs: dict[str, Any]) -> LRScheduler:
    stable = steps.training - steps.warmup - steps.decay
    if stable < 0:
        raise FlagError(f"--lr_scheduler warmup_stable_decay: warmup ({steps.warmup}) + decay ({steps.decay}) steps "
                        f"exceed the {steps.training} training steps; shorten --lr_warmup_steps or --lr_decay_steps")
    return _hf_schedules().get_wsd_schedule(
        optimizer, num_warmup_steps=steps.warmup, num_stable_steps=stable, num_decay_steps=steps.decay,
        num_cycles=steps.num_cycles / 2, min_lr_ratio=steps.min_lr_ratio or 0.0, **kwargs)


def _piecewise_constant(optimizer: torch.optim.Optimizer, steps: ScheduleSteps,
                        kwargs: dict[str, Any]) -> LRScheduler:
    from diffusers.optimization import get_piecewise_constant_schedule

    if "step_rules" not in kwargs:
        raise FlagError("--lr_scheduler piecewise_constant: needs step_rules, got none; pass e.g. "
                        "--lr_scheduler_args step_rules=1:100,0.1:200,0.01 (multiplier:until_step, last multiplier)")
    if steps.warmup:
        logger.warning("--lr_scheduler piecewise_constant ignores --lr_warmup_steps (as kohya)")
    return get_piecewise_constant_schedule(optimizer, step_rules=str(kwargs.pop("step_rules")), **kwargs)


SCHEDULE_BUILDERS: dict[str, Callable[[torch.optim.Optimizer, ScheduleSteps, dict[str, Any]], LRScheduler]] = {
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "piecewise_constant": _piecewise_constant,
    "warmup_stable_decay": _warmup_stable_decay,
    "inverse_sqrt": _inverse_sqrt,
    "cosine_with_min_lr": _cosine_with_min_lr,
}
SCHEDULER_NAMES: tuple[str, ...] = (*SCHEDULE_BUILDERS, "adafactor")


def get_scheduler(name: str, optimizer: torch.optim.Optimizer, *, num_warmup_steps: float | None,
                  num_training_steps: int, num_decay_steps: float | None = None, num_cycles: int = 1,
                  power: float = 1.0, timescale: int | None = None, min_lr_ratio: float | None = None,
                  scheduler_type: str | None = None, scheduler_args: Iterable[str] | dict[str, Any] | None = None,
                  num_processes: int = 1) -> LRScheduler:
    """Build the schedule named by `--lr_scheduler`, or the class `--lr_scheduler_type` with `--lr_scheduler_args`.

    Step counts are optimizer steps; warmup/decay below 1 are ratios of `num_training_steps`. All counts are
    multiplied by `num_processes` because accelerate steps a prepared scheduler once per process. kohya
    multiplies only the total, so its integer warmup/decay steps shrink on several GPUs; ours do not.
    Raises:
        FlagError: unknown name, or a setting the schedule cannot use.
    """
    kwargs = _scheduler_kwargs(scheduler_args)
    steps = ScheduleSteps(
        warmup=_scaled_steps(num_warmup_steps, num_training_steps, num_processes, "--lr_warmup_steps"),
        training=num_training_steps * num_processes,
        decay=_scaled_steps(num_decay_steps, num_training_steps, num_processes, "--lr_decay_steps"),
        num_cycles=num_cycles, power=power, timescale=timescale, min_lr_ratio=min_lr_ratio)
    if needs_train_eval_mode(optimizer):
        return _schedule_free_constant(name, optimizer, steps)
    if scheduler_type:
        return _custom_scheduler(scheduler_type, optimizer, steps, kwargs)
    name = (name or "constant").strip()
    if uses_relative_step(optimizer) and not name.startswith("adafactor"):
        # kohya replaces the schedule: a relative-step Adafactor computes its own learning rate
        logger.info("AdaFactor with relative_step: using --lr_scheduler adafactor instead of %s", name)
        name = "adafactor"
    if name.startswith("adafactor"):
        return _adafactor(name, optimizer, steps)
    builder = SCHEDULE_BUILDERS.get(name.lower())
    if builder is None:
        raise FlagError(f"--lr_scheduler {name}: unknown{_did_you_mean(name, list(SCHEDULER_NAMES))}")
    logger.info("lr scheduler: %s, %d warmup of %d steps", name, steps.warmup, steps.training)
    return _call_builder(name, builder, optimizer, steps, kwargs)


def _scheduler_kwargs(scheduler_args: Iterable[str] | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(scheduler_args, dict):
        return dict(scheduler_args)
    return parse_optimizer_args(scheduler_args, flag="--lr_scheduler_args")


def _did_you_mean(name: str, choices: list[str]) -> str:
    matches = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.5)
    return f"; did you mean {matches[0]}?" if matches else f"; expected one of {', '.join(choices)}"


def _call_builder(name: str, builder: Callable, optimizer: torch.optim.Optimizer, steps: ScheduleSteps,
                  kwargs: dict[str, Any]) -> LRScheduler:
    try:
        return builder(optimizer, steps, kwargs)
    except (TypeError, ValueError) as error:
        raise FlagError(f"--lr_scheduler {name} --lr_scheduler_args {kwargs}: refused: {error}") from error


def _schedule_free_constant(name: str, optimizer: torch.optim.Optimizer, steps: ScheduleSteps) -> LRScheduler:
    # kohya gives schedule-free optimizers a do-nothing scheduler: they schedule (and warm up) by themselves
    if (name and name != "constant") or steps.warmup:
        logger.warning("schedule-free optimizer: --lr_scheduler %s and --lr_warmup_steps are ignored; pass "
                       "warmup_steps=N in --optimizer_args instead", name)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _adafactor(name: str, optimizer: torch.optim.Optimizer, steps: ScheduleSteps) -> LRScheduler:
    from transformers.optimization import Adafactor

    if not isinstance(optimizer, Adafactor):
        raise FlagError(f"--lr_scheduler adafactor: needs --optimizer_type AdaFactor, got {type(optimizer).__name__}")
    _require_no_warmup("--lr_scheduler adafactor", steps)
    _, _, lr_text = name.partition(":")
    try:
        # kohya's own spelling "adafactor:<lr>"; otherwise the lr get_optimizer kept with the param groups
        initial_lr = float(lr_text) if lr_text else float(optimizer.param_groups[0].get("initial_lr") or 0.0)
    except ValueError as error:
        raise FlagError(f"--lr_scheduler {name}: expected adafactor or adafactor:<initial lr>") from error
    return _hf_schedules().AdafactorSchedule(optimizer, initial_lr)


def _custom_scheduler(scheduler_type: str, optimizer: torch.optim.Optimizer, steps: ScheduleSteps,
                      kwargs: dict[str, Any]) -> LRScheduler:
    """kohya: a bare name is a torch.optim.lr_scheduler class, module.ClassName is imported; only the
    --lr_scheduler_args are passed, so warmup steps are refused."""
    _require_no_warmup(f"--lr_scheduler_type {scheduler_type}", steps)
    module_name, _, class_name = scheduler_type.rpartition(".")
    try:
        module = importlib.import_module(module_name or "torch.optim.lr_scheduler")
    except ImportError as error:
        raise FlagError(f"--lr_scheduler_type {scheduler_type}: cannot import module {module_name} ({error}); "
                        f"is its package installed?") from error
    scheduler_class = getattr(module, class_name, None)
    if not isinstance(scheduler_class, type):
        public_names = [attribute for attribute in dir(module) if attribute[:1].isupper()]
        raise FlagError(f"--lr_scheduler_type {scheduler_type}: module {module.__name__} has no class {class_name}"
                        f"{_did_you_mean_case(class_name, public_names)}")
    logger.info("lr scheduler: %s(%s)", scheduler_type, kwargs)
    try:
        return scheduler_class(optimizer, **kwargs)
    except (TypeError, ValueError) as error:
        raise FlagError(f"--lr_scheduler_type {scheduler_type} --lr_scheduler_args {kwargs}: refused: "
                        f"{error}") from error


def _did_you_mean_case(name: str, choices: list[str]) -> str:
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean {matches[0]}?" if matches else ""
