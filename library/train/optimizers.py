"""`--optimizer_type` name -> optimizer object, as kohya's get_optimizer does, with clear errors for bad names,
missing packages and bad `--optimizer_args`. The learning-rate schedule is library.train.lr_schedulers."""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import FlagError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerSpec:
    """Where a named optimizer lives and which pip package provides it (None: a hard dependency)."""

    name: str
    module: str
    class_name: str
    package: str | None = None


def _spec_table(*specs: OptimizerSpec) -> dict[str, OptimizerSpec]:
    return {spec.name.lower(): spec for spec in specs}


# kohya's names (matched case-insensitively) and the classes it builds for them (train_util.get_optimizer).
KNOWN_OPTIMIZERS: dict[str, OptimizerSpec] = _spec_table(
    OptimizerSpec("AdamW", "torch.optim", "AdamW"),
    OptimizerSpec("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    OptimizerSpec("PagedAdamW", "bitsandbytes.optim", "PagedAdamW", "bitsandbytes"),
    OptimizerSpec("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
    OptimizerSpec("PagedAdamW32bit", "bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes"),
    OptimizerSpec("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
    OptimizerSpec("Lion8bit", "bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    OptimizerSpec("PagedLion8bit", "bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"),
    OptimizerSpec("SGDNesterov", "torch.optim", "SGD"),
    OptimizerSpec("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", "bitsandbytes"),
    OptimizerSpec("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    OptimizerSpec("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    OptimizerSpec("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation"),
    OptimizerSpec("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadaptation"),
    OptimizerSpec("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadaptation"),
    OptimizerSpec("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    OptimizerSpec("DAdaptLion", "dadaptation", "DAdaptLion", "dadaptation"),
    OptimizerSpec("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadaptation"),
    OptimizerSpec("Prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
    OptimizerSpec("AdaFactor", "transformers.optimization", "Adafactor"),
    OptimizerSpec("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", "schedulefree"),
    OptimizerSpec("RAdamScheduleFree", "schedulefree", "RAdamScheduleFree", "schedulefree"),
    OptimizerSpec("SGDScheduleFree", "schedulefree", "SGDScheduleFree", "schedulefree"),
)

NESTEROV_OPTIMIZERS = frozenset({"sgdnesterov", "sgdnesterov8bit"})
ADAPTIVE_LR_PREFIXES = ("dadapt", "prodigy")


def parse_optimizer_args(strings: Iterable[str] | None, flag: str = "--optimizer_args") -> dict[str, Any]:
    """Turn `key=value` strings into keyword arguments; values are Python literals, else kept as strings.

    "betas=0.9,0.999" gives (0.9, 0.999), "decouple=True" gives True, "mode=fast" gives "fast".
    """
    kwargs: dict[str, Any] = {}
    for text in strings or ():
        key, separator, raw_value = text.partition("=")
        key, raw_value = key.strip(), raw_value.strip()
        if not separator:
            raise FlagError(f"{flag} {text!r}: expected key=value, got no '='")
        if not key.isidentifier():
            raise FlagError(f"{flag} {text!r}: expected a keyword name before '=', got {key!r}")
        if not raw_value:
            raise FlagError(f"{flag} {key}: expected a value after '=', got nothing")
        if key in kwargs:
            raise FlagError(f"{flag} {key}: given twice ({kwargs[key]!r} and {raw_value!r}); keep one")
        kwargs[key] = _literal_or_string(raw_value)
    return kwargs


def _literal_or_string(raw_value: str) -> Any:
    # kohya passes every value through ast.literal_eval; plain words such as a mode name are kept as text.
    try:
        return ast.literal_eval(raw_value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw_value


def resolve_optimizer_type(optimizer_type: str | None, use_8bit_adam: bool = False,
                           use_lion_optimizer: bool = False) -> str:
    """Apply kohya's old flags --use_8bit_adam / --use_lion_optimizer; an empty name means AdamW."""
    if use_8bit_adam and use_lion_optimizer:
        raise FlagError("--use_8bit_adam and --use_lion_optimizer: expected at most one, got both; "
                        "use --optimizer_type instead")
    old_flag, old_choice = ("--use_8bit_adam", "AdamW8bit") if use_8bit_adam else ("--use_lion_optimizer", "Lion")
    if use_8bit_adam or use_lion_optimizer:
        if optimizer_type:
            raise FlagError(f"{old_flag} and --optimizer_type {optimizer_type}: expected one of them, got both; "
                            f"{old_flag} means --optimizer_type {old_choice}")
        return old_choice
    return optimizer_type or "AdamW"


def needs_train_eval_mode(optimizer: torch.optim.Optimizer) -> bool:
    """True for schedule-free optimizers: call optimizer.train() before steps and .eval() before sampling/saving."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def uses_relative_step(optimizer: torch.optim.Optimizer) -> bool:
    """True for an Adafactor that computes its own learning rate (then the schedule must be `adafactor`)."""
    # no Adafactor exists unless transformers.optimization was imported; checking sys.modules avoids its slow import
    module = sys.modules.get("transformers.optimization")
    return (module is not None and isinstance(optimizer, module.Adafactor)
            and bool(optimizer.defaults.get("relative_step")))


def get_optimizer(optimizer_type: str, params: Iterable, lr: float | None,
                  optimizer_args: dict[str, Any] | None = None) -> tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer named by `--optimizer_type` (case-insensitive kohya names, torch.optim names, or
    module.ClassName) over `params` (tensors or param-group dicts).

    Returns:
        (class path such as "torch.optim.adamw.AdamW", "key=value,..." of the arguments used, the optimizer),
        the first two as kohya writes them into ss_optimizer.
    Raises:
        FlagError: unknown name, missing package, or arguments the optimizer refuses.
    """
    name = optimizer_type or "AdamW"
    kwargs = dict(optimizer_args or {})
    params = list(params)
    spec = KNOWN_OPTIMIZERS.get(name.lower())
    if spec is None:
        optimizer_class, fixed_kwargs = _custom_optimizer_class(name), {}
    else:
        optimizer_class = _import_class(spec, name)
        params, lr, fixed_kwargs = _adjust_for_family(spec, params, lr, kwargs)
    optimizer = _construct(name, optimizer_class, params, lr, {**kwargs, **fixed_kwargs})
    if needs_train_eval_mode(optimizer):
        # schedule-free optimizers start in eval mode; kohya switches them to train mode right away
        optimizer.train()
    class_path = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    description = ",".join(f"{key}={value}" for key, value in kwargs.items())
    logger.info("optimizer: %s(%s)", class_path, description)
    return class_path, description, optimizer


def _import_class(spec: OptimizerSpec, name: str) -> type:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as error:
        package = spec.package or spec.module.split(".")[0]
        raise FlagError(f"--optimizer_type {name}: needs the Python package {package}, which could not be imported "
                        f"({error}); install it with `pip install {package}`") from error
    return getattr(module, spec.class_name)


def _custom_optimizer_class(name: str) -> type:
    """kohya: a name with a dot is module.ClassName; a bare name is looked up in torch.optim (case-sensitive)."""
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        candidate = getattr(torch.optim, name, None)
        if isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer):
            return candidate
        raise FlagError(f"--optimizer_type {name}: unknown{_did_you_mean(name, _all_known_names())}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FlagError(f"--optimizer_type {name}: cannot import module {module_name} ({error}); "
                        f"is its package installed?") from error
    optimizer_class = getattr(module, class_name, None)
    if not isinstance(optimizer_class, type):
        public_names = [attribute for attribute in dir(module) if not attribute.startswith("_")]
        raise FlagError(f"--optimizer_type {name}: module {module_name} has no class {class_name}"
                        f"{_did_you_mean(class_name, public_names)}")
    return optimizer_class


def _all_known_names() -> list[str]:
    torch_names = [attribute for attribute in dir(torch.optim)
                   if isinstance(getattr(torch.optim, attribute), type)
                   and issubclass(getattr(torch.optim, attribute), torch.optim.Optimizer)
                   and attribute != "Optimizer"]
    return [spec.name for spec in KNOWN_OPTIMIZERS.values()] + torch_names


def _did_you_mean(name: str, choices: list[str]) -> str:
    by_lower = {choice.lower(): choice for choice in choices}
    matches = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[matches[0]]}?" if matches else ""


def _adjust_for_family(spec: OptimizerSpec, params: list, lr: float | None,
                       kwargs: dict[str, Any]) -> tuple[list, float | None, dict[str, Any]]:
    """kohya's per-family adjustments; returns (params, lr, arguments passed but not shown in the description)."""
    key = spec.name.lower()
    if key in NESTEROV_OPTIMIZERS:
        if "momentum" not in kwargs:
            # kohya: Nesterov needs momentum, so it sets 0.9 and reports it with the user's arguments
            logger.info("%s: Nesterov needs momentum; using momentum=0.9", spec.name)
            kwargs["momentum"] = 0.9
        return params, lr, {"nesterov": True}
    if key.startswith(ADAPTIVE_LR_PREFIXES):
        _warn_adaptive_lr(spec.name, params, lr)
    if key == "adafactor":
        params, lr = _adjust_adafactor(params, lr, kwargs)
    return params, lr, {}


def _warn_adaptive_lr(name: str, params: list, lr: float | None) -> None:
    group_lrs = [group.get("lr", lr) for group in params if isinstance(group, dict)]
    effective_lr = group_lrs[0] if group_lrs else lr
    if effective_lr is not None and effective_lr <= 0.1:
        logger.warning("%s adapts the step size itself and expects a learning rate around 1.0, got %s",
                       name, effective_lr)
    if len(set(group_lrs)) > 1:
        logger.warning("%s: several learning rates were given (e.g. text encoder and U-Net); only the first, %s, "
                       "takes effect", name, effective_lr)


def _adjust_adafactor(params: list, lr: float | None, kwargs: dict[str, Any]) -> tuple[list, float | None]:
    """kohya's Adafactor rules: relative_step defaults to True, warmup_init forces it, and then lr is None."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("AdaFactor: warmup_init=True needs relative_step=True; setting it")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            logger.warning("AdaFactor: clip_threshold=1.0 usually works best")
        logger.info("AdaFactor with a fixed lr: --lr_scheduler constant_with_warmup and --max_grad_norm 0 "
                    "usually work best")
        return params, lr
    if lr:
        logger.warning("AdaFactor with relative_step: the learning rate %s is only reported as the initial lr", lr)
    groups = [dict(group) for group in params] if params and isinstance(params[0], dict) else [{"params": params}]
    if any(group.pop("lr", None) is not None for group in groups):
        logger.warning("AdaFactor with relative_step ignores per-group learning rates (unet_lr, text_encoder_lr)")
    for group in groups:
        # kohya hands lr to AdafactorSchedule as its initial_lr ("adafactor:<lr>"); keep it with the groups
        group["initial_lr"] = lr or 0.0
    return groups, None


def _construct(name: str, optimizer_class: type, params: list, lr: float | None,
               kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        return optimizer_class(params, lr=lr, **kwargs)
    except TypeError as error:
        unknown = _first_unknown_keyword(optimizer_class, kwargs)
        if unknown is None:
            raise FlagError(f"--optimizer_type {name} --optimizer_args: {optimizer_class.__name__} refused the "
                            f"arguments {kwargs}: {error}") from error
        accepted = _accepted_keywords(optimizer_class)
        raise FlagError(f"--optimizer_args {unknown}: not an argument of {optimizer_class.__name__}"
                        f"{_did_you_mean(unknown, accepted)} (accepted: {', '.join(accepted)})") from error
    except ValueError as error:
        raise FlagError(f"--optimizer_type {name} --optimizer_args: {optimizer_class.__name__} refused "
                        f"lr={lr} {kwargs}: {error}") from error


def _accepted_keywords(optimizer_class: type) -> list[str]:
    try:
        parameters = inspect.signature(optimizer_class).parameters
    except (TypeError, ValueError):
        return []
    return [name for name, parameter in parameters.items()
            if name not in ("self", "params") and parameter.kind is not inspect.Parameter.VAR_KEYWORD]


def _first_unknown_keyword(optimizer_class: type, kwargs: dict[str, Any]) -> str | None:
    try:
        parameters = inspect.signature(optimizer_class).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    accepted = set(_accepted_keywords(optimizer_class))
    return next((key for key in kwargs if key not in accepted), None)
