"""--lr_scheduler names against hand-computed learning rates (base lr 1.0, 100 steps unless stated), warmup
ratios, multi-process scaling, custom scheduler classes and the error messages."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
from transformers.optimization import Adafactor, AdafactorSchedule

from library.errors import FlagError
from library.options.optimizer import add_optimizer_arguments
from library.train.lr_schedulers import SCHEDULER_NAMES, get_scheduler, resolve_warmup_steps


def _sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs_at(scheduler, optimizer, marks: list[int]) -> dict[int, float]:
    """The learning rate used by optimizer step number `mark` (0-based), for each mark."""
    found = {}
    for step in range(max(marks) + 1):
        if step in marks:
            found[step] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
    return found


def _schedule(name: str, marks: list[int], **settings) -> dict[int, float]:
    optimizer = _sgd()
    settings.setdefault("num_warmup_steps", 0)
    settings.setdefault("num_training_steps", 100)
    return _lrs_at(get_scheduler(name, optimizer, **settings), optimizer, marks)


def _approx(values: dict[int, float]):
    return pytest.approx(values, abs=1e-6)


def test_linear_warms_up_then_falls_to_zero():
    # warmup 10: lr = step/10; then (100 - step) / 90
    assert _schedule("linear", [5, 10, 55, 100], num_warmup_steps=10) == _approx({5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0})


def test_cosine_is_half_way_at_the_middle_of_the_decay():
    # 0.5 * (1 + cos(pi * (55 - 10) / 90)) = 0.5
    assert _schedule("cosine", [10, 55, 100], num_warmup_steps=10) == _approx({10: 1.0, 55: 0.5, 100: 0.0})


def test_constant_with_warmup_stays_at_the_base_lr():
    assert _schedule("constant_with_warmup", [5, 10, 100], num_warmup_steps=10) == _approx({5: 0.5, 10: 1.0,
                                                                                           100: 1.0})


def test_polynomial_with_power_two():
    # (1 - 1e-7) * (1 - 45/90)**2 + 1e-7 = 0.25; ends at transformers' lr_end 1e-7
    values = _schedule("polynomial", [10, 55, 100], num_warmup_steps=10, power=2.0)
    assert values == _approx({10: 1.0, 55: 0.25 + 0.75e-7, 100: 1e-7})


def test_cosine_with_restarts_restarts_each_cycle():
    values = _schedule("cosine_with_restarts", [25, 50, 75], num_cycles=2)
    assert values == _approx({25: 0.5, 50: 1.0, 75: 0.5})


def test_inverse_sqrt_after_warmup():
    # timescale defaults to the warmup (10): 1 / sqrt(40 / 10) = 0.5
    assert _schedule("inverse_sqrt", [5, 10, 40], num_warmup_steps=10) == _approx({5: 0.5, 10: 1.0, 40: 0.5})


def test_cosine_with_min_lr_ends_at_the_ratio():
    # 0.1 + 0.9 * 0.5 * (1 + cos(pi * 45 / 90)) = 0.55
    values = _schedule("cosine_with_min_lr", [10, 55, 100], num_warmup_steps=10, min_lr_ratio=0.1)
    assert values == _approx({10: 1.0, 55: 0.55, 100: 0.1})


def test_warmup_stable_decay_phases():
    # warmup 10, stable 70, cosine decay over the last 20 steps
    values = _schedule("warmup_stable_decay", [5, 50, 80, 90, 100], num_warmup_steps=10, num_decay_steps=20)
    assert values == _approx({5: 0.5, 50: 1.0, 80: 1.0, 90: 0.5, 100: 0.0})


def test_piecewise_constant_step_rules():
    values = _schedule("piecewise_constant", [5, 10, 15, 25], scheduler_args=["step_rules=1:10,0.1:20,0.01"])
    assert values == _approx({5: 1.0, 10: 0.1, 15: 0.1, 25: 0.01})


def test_constant_and_every_name_builds():
    for name in SCHEDULER_NAMES:
        optimizer = _sgd() if name != "adafactor" else Adafactor([torch.nn.Parameter(torch.zeros(2))])
        settings = {"scheduler_args": ["step_rules=1:10,0.1"]} if name == "piecewise_constant" else {}
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=0, num_training_steps=100, min_lr_ratio=0.1,
                                  **settings)
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler), name
    assert _schedule("constant", [0, 99]) == _approx({0: 1.0, 99: 1.0})


def test_warmup_ratio_is_a_share_of_the_training_steps():
    # 0.1 of 200 steps = 20 warmup steps
    values = _schedule("linear", [10, 20, 110, 200], num_warmup_steps=0.1, num_training_steps=200)
    assert values == _approx({10: 0.5, 20: 1.0, 110: 0.5, 200: 0.0})


def test_steps_are_multiplied_by_the_number_of_processes():
    # accelerate steps the scheduler twice per optimizer step with 2 processes: 10 warmup steps become 20
    values = _schedule("linear", [10, 20, 200], num_warmup_steps=10, num_processes=2)
    assert values == _approx({10: 0.5, 20: 1.0, 200: 0.0})


@pytest.mark.parametrize(("value", "total", "expected"), [
    (0.1, 1000, 100), (0.05, 30, 1), (50, 1000, 50), (0, 1000, 0), (None, 1000, 0), (20.0, 1000, 20)])
def test_resolve_warmup_steps(value, total, expected):
    assert resolve_warmup_steps(value, total) == expected


@pytest.mark.parametrize(("value", "message"), [
    (-1, "--lr_warmup_steps: expected a step count or ratio >= 0, got -1"),
    (1.5, "--lr_warmup_steps: expected a whole step count or a ratio below 1, got 1.5"),
    ("10", "--lr_warmup_steps: expected a step count or a ratio below 1, got '10'"),
])
def test_resolve_warmup_steps_errors(value, message):
    with pytest.raises(FlagError) as caught:
        resolve_warmup_steps(value, 100)
    assert str(caught.value) == message


@pytest.mark.parametrize(("text", "expected"), [("100", 100), ("0.1", 0.1), ("10%", 0.1), ("0", 0), ("5.0", 5)])
def test_lr_warmup_steps_flag_accepts_steps_and_ratios(text, expected):
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    value = parser.parse_args(["--lr_warmup_steps", text]).lr_warmup_steps
    assert value == pytest.approx(expected) and type(value) is type(expected)


@pytest.mark.parametrize("text", ["1.5", "ten", "-3", "150%"])
def test_lr_warmup_steps_flag_rejects(text, capsys):
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr_warmup_steps", text])
    assert "argument --lr_warmup_steps" in capsys.readouterr().err


def test_custom_scheduler_class_by_module_path():
    values = _schedule("constant", [0, 1, 2, 4], scheduler_type="torch.optim.lr_scheduler.StepLR",
                       scheduler_args=["step_size=2"])
    assert values == _approx({0: 1.0, 1: 1.0, 2: 0.1, 4: 0.01})
    bare_name = _schedule("constant", [3], scheduler_type="StepLR", scheduler_args={"step_size": 3, "gamma": 0.5})
    assert bare_name == _approx({3: 0.5})


@pytest.mark.parametrize(("settings", "message"), [
    ({"scheduler_type": "StepLR", "scheduler_args": ["step_size=2"], "num_warmup_steps": 5},
     "--lr_warmup_steps: --lr_scheduler_type StepLR has no warmup, got 5 steps"),
    ({"scheduler_type": "no_such_module_xyz.Sched"},
     "--lr_scheduler_type no_such_module_xyz.Sched: cannot import module no_such_module_xyz"),
    ({"scheduler_type": "torch.optim.lr_scheduler.StepLr"},
     ("--lr_scheduler_type torch.optim.lr_scheduler.StepLr: module torch.optim.lr_scheduler has no class StepLr; "
     "did you mean StepLR?")),
    ({"scheduler_type": "StepLR", "scheduler_args": ["step_sise=2"]},
     "--lr_scheduler_type StepLR --lr_scheduler_args {'step_sise': 2}: refused"),
    ({"scheduler_args": ["gamma"]}, "--lr_scheduler_args 'gamma': expected key=value, got no '='"),
])
def test_custom_scheduler_errors(settings, message):
    with pytest.raises(FlagError) as caught:
        get_scheduler("constant", _sgd(), **{"num_warmup_steps": 0, "num_training_steps": 10, **settings})
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(("name", "settings", "message"), [
    ("cosin", {}, "--lr_scheduler cosin: unknown; did you mean cosine?"),
    ("constant", {"num_warmup_steps": 10}, ("--lr_warmup_steps: --lr_scheduler constant has no warmup, got 10 steps; "
                                           "set --lr_warmup_steps 0 or use --lr_scheduler constant_with_warmup")),
    ("cosine_with_min_lr", {}, ("--lr_scheduler cosine_with_min_lr: needs the final lr ratio, got none; "
                               "pass --lr_scheduler_min_lr_ratio")),
    ("warmup_stable_decay", {"num_warmup_steps": 60, "num_decay_steps": 50},
     "--lr_scheduler warmup_stable_decay: warmup (60) + decay (50) steps exceed the 100 training steps"),
    ("piecewise_constant", {}, "--lr_scheduler piecewise_constant: needs step_rules, got none"),
    ("adafactor", {}, "--lr_scheduler adafactor: needs --optimizer_type AdaFactor, got SGD"),
])
def test_scheduler_errors(name, settings, message):
    with pytest.raises(FlagError) as caught:
        get_scheduler(name, _sgd(), **{"num_warmup_steps": 0, "num_training_steps": 100, **settings})
    assert str(caught.value).startswith(message)


def test_relative_step_adafactor_forces_the_adafactor_schedule():
    from library.train.optimizers import get_optimizer

    _, _, optimizer = get_optimizer("AdaFactor", [torch.nn.Parameter(torch.ones(4, 4))], 1e-3, {})
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=100)
    assert isinstance(scheduler, AdafactorSchedule)
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3), "reports the --learning_rate before the first step"
    kohya_spelling = get_scheduler("adafactor:0.5", Adafactor([torch.nn.Parameter(torch.ones(2))]),
                                   num_warmup_steps=0, num_training_steps=10)
    assert kohya_spelling.get_last_lr()[0] == pytest.approx(0.5)
    assert math.isfinite(scheduler.get_last_lr()[0])


class _ScheduleFreeLike(torch.optim.SGD):
    def train(self):
        pass

    def eval(self):
        pass


def test_schedule_free_optimizers_get_a_constant_schedule(caplog):
    optimizer = _ScheduleFreeLike([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=10, num_training_steps=20)
    assert _lrs_at(scheduler, optimizer, [0, 10, 20]) == _approx({0: 0.5, 10: 0.5, 20: 0.5})
    assert "schedule-free optimizer: --lr_scheduler cosine and --lr_warmup_steps are ignored" in caplog.text
