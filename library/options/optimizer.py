"""Optimizer and learning-rate scheduler flags (kohya spelling, types and defaults).
Building the optimizer and scheduler from them is library.train.optimizers / library.train.lr_schedulers."""
from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def steps_or_ratio(value: str) -> int | float:
    """Parse a step count that may also be a ratio of the training steps: "100", "0.1" or "10%".

    kohya's `int_or_float`: a value below 1 is a ratio, "N%" is N/100, anything else must be a whole number.
    """
    text = value.strip()
    try:
        if text.endswith("%"):
            return _checked_ratio(float(text[:-1]) / 100.0, value)
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count (100) or a ratio (0.1 or 10%), got {value!r}")
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a step count or ratio >= 0, got {value!r}")
    if 0 < number < 1:
        return number
    if not number.is_integer():
        raise argparse.ArgumentTypeError(
            f"expected a whole step count or a ratio below 1, got {value!r}; did you mean {int(number)}?")
    return int(number)


def _checked_ratio(ratio: float, value: str) -> float:
    if not 0 <= ratio <= 1:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0% and 100%, got {value!r}")
    return ratio


def _add_optimizer_choice_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--optimizer_type", type=str, default="",
                       help="optimizer, case-insensitive (default AdamW): AdamW, AdamW8bit, PagedAdamW, "
                            "PagedAdamW8bit, PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, "
                            "SGDNesterov8bit, DAdaptation, DAdaptAdam, DAdaptAdaGrad, DAdaptAdan, DAdaptAdanIP, "
                            "DAdaptLion, DAdaptSGD, Prodigy, AdaFactor, AdamWScheduleFree, RAdamScheduleFree, "
                            "SGDScheduleFree, a torch.optim class name, or module.ClassName")
    group.add_argument("--use_8bit_adam", action="store_true",
                       help="old spelling of --optimizer_type AdamW8bit (needs bitsandbytes)")
    group.add_argument("--use_lion_optimizer", action="store_true",
                       help="old spelling of --optimizer_type Lion (needs lion-pytorch)")
    group.add_argument("--learning_rate", type=float, default=2.0e-6,
                       help="base learning rate (default 2e-6; LoRA usually 1e-4; D-Adaptation/Prodigy about 1.0)")
    group.add_argument("--max_grad_norm", type=float, default=1.0,
                       help="clip the gradient norm to this before each step; 0 turns clipping off (default 1.0)")
    group.add_argument("--optimizer_args", type=str, default=None, nargs="*",
                       help='extra optimizer keyword arguments as key=value, values as Python literals: '
                            '"weight_decay=0.01" "betas=0.9,0.999"')
    group.add_argument("--fused_backward_pass", action="store_true",
                       help="full fine-tuning (sdxl_train.py, fine_tune.py, train_db.py): update each weight "
                            "inside backward and free its gradient at once, so the whole set of gradients never "
                            "exists; any optimizer (bf16 weights with stochastic rounding); --max_grad_norm then "
                            "clips each tensor on its own; a NaN loss stops the run after its step was applied (the last save "
                            "is kept). Needs --gradient_accumulation_steps 1 and one process. "
                            "Network training ignores it, as kohya's train_network.py does (warned)")
    group.add_argument("--fused_optimizer_groups", type=int, default=None,
                       help="full fine-tuning: split the weights into N optimizers, each stepped during backward "
                            "as soon as its gradients are complete (kohya; 4-10 is typical; any optimizer); not "
                            "with --fused_backward_pass. Network training ignores it (warned)")


def _add_scheduler_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--lr_scheduler", type=str, default="constant",
                       help="learning-rate schedule: linear, cosine, cosine_with_restarts, polynomial, constant "
                            "(default), constant_with_warmup, adafactor, piecewise_constant, warmup_stable_decay, "
                            "inverse_sqrt, cosine_with_min_lr")
    group.add_argument("--lr_warmup_steps", type=steps_or_ratio, default=0,
                       help="optimizer steps of linear warmup, or a ratio of the training steps when below 1 "
                            "(0.1 or 10%%; default 0)")
    group.add_argument("--lr_decay_steps", type=steps_or_ratio, default=0,
                       help="decay steps of warmup_stable_decay, or a ratio of the training steps when below 1 "
                            "(default 0)")
    group.add_argument("--lr_scheduler_num_cycles", type=int, default=1,
                       help="number of hard restarts of cosine_with_restarts (default 1)")
    group.add_argument("--lr_scheduler_power", type=float, default=1.0,
                       help="exponent of the polynomial schedule (default 1.0 = linear)")
    group.add_argument("--lr_scheduler_timescale", type=int, default=None,
                       help="timescale of inverse_sqrt, in steps (default: the warmup steps, or 10000 without warmup)")
    group.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                       help="final learning rate as a ratio of the initial one, for cosine_with_min_lr and "
                            "warmup_stable_decay (default 0 for warmup_stable_decay)")
    group.add_argument("--lr_scheduler_type", type=str, default="",
                       help="use this scheduler class instead of --lr_scheduler: a torch.optim.lr_scheduler class "
                            "name or module.ClassName, built with --lr_scheduler_args")
    group.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*",
                       help='extra scheduler keyword arguments as key=value, values as Python literals: '
                            '"step_size=100" "gamma=0.5"')


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the optimizer and learning-rate scheduler flags."""
    group = parser.add_argument_group("optimizer and learning-rate schedule")
    _add_optimizer_choice_arguments(group)
    _add_scheduler_arguments(group)
