"""--optimizer_type names -> optimizers (one step each), --optimizer_args parsing, kohya's per-family rules, and
the messages for unknown names and missing packages."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import types

import pytest
import torch

from library.errors import FlagError
from library.options.optimizer import add_optimizer_arguments
from library.train.optimizers import (
    KNOWN_OPTIMIZERS,
    get_optimizer,
    needs_train_eval_mode,
    parse_optimizer_args,
    resolve_optimizer_type,
    uses_relative_step,
)

EIGHT_BIT_NAMES = {"AdamW8bit", "PagedAdamW8bit", "Lion8bit", "PagedLion8bit", "SGDNesterov8bit"}
OPTIONAL_PACKAGE_MODULES = {"lion-pytorch": "lion_pytorch", "dadaptation": "dadaptation",
                            "prodigyopt": "prodigyopt", "schedulefree": "schedulefree", "bitsandbytes": "bitsandbytes"}


def _installed(package: str | None) -> bool:
    return package is None or importlib.util.find_spec(OPTIONAL_PACKAGE_MODULES[package]) is not None


def _parameter() -> torch.nn.Parameter:
    # 64 elements: above the min_8bit_size=16 used below, so bitsandbytes really keeps 8-bit state on CPU
    return torch.nn.Parameter(torch.linspace(-1.0, 1.0, 64).reshape(8, 8))


@pytest.mark.parametrize("spec", list(KNOWN_OPTIMIZERS.values()), ids=lambda spec: spec.name)
def test_every_known_name_takes_a_step_or_names_its_package(spec):
    parameter = _parameter()
    arguments = {"min_8bit_size": 16} if spec.package == "bitsandbytes" else {}
    if not _installed(spec.package):
        with pytest.raises(FlagError, match=f"pip install {spec.package}`"):
            get_optimizer(spec.name, [parameter], 1e-2, arguments)
        return
    class_path, _, optimizer = get_optimizer(spec.name, [parameter], 1e-2, arguments)
    before = parameter.detach().clone()
    parameter.grad = torch.ones_like(parameter)
    # RAdam's variance rectification makes its first steps plain SGD, which RAdamScheduleFree skips
    # (silent_sgd_phase): step until the rectified phase
    for _ in range(6 if spec.name == "RAdamScheduleFree" else 1):
        optimizer.step()
    assert class_path.endswith("." + spec.class_name)
    assert not torch.equal(parameter.detach(), before), "one step with a gradient must move the weights"
    if spec.name in EIGHT_BIT_NAMES:
        assert optimizer.state[parameter]["state1"].dtype == torch.uint8


@pytest.mark.parametrize(("name", "package", "modules"), [
    ("AdamW8bit", "bitsandbytes", ["bitsandbytes", "bitsandbytes.optim"]),
    ("Lion", "lion-pytorch", ["lion_pytorch"]),
    ("DAdaptAdam", "dadaptation", ["dadaptation"]),
    ("Prodigy", "prodigyopt", ["prodigyopt"]),
    ("AdamWScheduleFree", "schedulefree", ["schedulefree"]),
])
def test_missing_package_message_says_what_to_pip_install(monkeypatch, name, package, modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail as if not installed
    with pytest.raises(FlagError) as caught:
        get_optimizer(name, [_parameter()], 1e-3, {})
    assert str(caught.value).startswith(f"--optimizer_type {name}: needs the Python package {package}")
    assert str(caught.value).endswith(f"install it with `pip install {package}`")


class _RecordingOptimizer(torch.optim.SGD):
    """Stands in for optional optimizers: records its keyword arguments and train/eval mode."""

    def __init__(self, params, lr=None, **kwargs):
        super().__init__(params, lr=1.0 if lr is None else lr)
        self.received = kwargs
        self.mode = "eval"


class _ScheduleFreeLike(_RecordingOptimizer):
    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"


def _fake_module(monkeypatch, name: str, **classes: type) -> None:
    module = types.ModuleType(name)
    for class_name, base in classes.items():
        setattr(module, class_name, type(class_name, (base,), {"__module__": name}))
    monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def fake_optional_packages(monkeypatch):
    _fake_module(monkeypatch, "lion_pytorch", Lion=_RecordingOptimizer)
    _fake_module(monkeypatch, "prodigyopt", Prodigy=_RecordingOptimizer)
    _fake_module(monkeypatch, "dadaptation", **{name: _RecordingOptimizer for name in
                                                ("DAdaptAdam", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptLion",
                                                 "DAdaptSGD")})
    _fake_module(monkeypatch, "dadaptation.experimental", DAdaptAdamPreprint=_RecordingOptimizer,
                 DAdaptAdanIP=_RecordingOptimizer)
    _fake_module(monkeypatch, "schedulefree", **{name: _ScheduleFreeLike for name in
                                                 ("AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree")})


@pytest.mark.parametrize(("name", "class_path"), [
    ("Lion", "lion_pytorch.Lion"),
    ("DAdaptation", "dadaptation.experimental.DAdaptAdamPreprint"),
    ("DAdaptAdanIP", "dadaptation.experimental.DAdaptAdanIP"),
    ("dadaptlion", "dadaptation.DAdaptLion"),
    ("Prodigy", "prodigyopt.Prodigy"),
    ("RAdamScheduleFree", "schedulefree.RAdamScheduleFree"),
])
def test_optional_optimizers_map_to_kohyas_classes(fake_optional_packages, name, class_path):
    found_path, description, optimizer = get_optimizer(name, [_parameter()], 1.0, {"d_coef": 2})
    assert (found_path, description, optimizer.received) == (class_path, "d_coef=2", {"d_coef": 2})


def test_schedule_free_optimizer_starts_in_train_mode(fake_optional_packages):
    _, _, optimizer = get_optimizer("AdamWScheduleFree", [_parameter()], 1e-3, {})
    assert needs_train_eval_mode(optimizer) and optimizer.mode == "train"
    assert not needs_train_eval_mode(torch.optim.AdamW([_parameter()]))


def test_adaptive_optimizers_warn_about_a_small_lr_and_several_lrs(fake_optional_packages, caplog):
    groups = [{"params": [_parameter()], "lr": 1e-4}, {"params": [_parameter()], "lr": 1e-3}]
    with caplog.at_level(logging.WARNING, logger="library.train.optimizers"):
        get_optimizer("Prodigy", groups, 1e-4, {})
    assert "expects a learning rate around 1.0, got 0.0001" in caplog.text
    assert "only the first, 0.0001, takes effect" in caplog.text


@pytest.mark.parametrize(("strings", "expected"), [
    (["betas=0.9,0.999", "weight_decay=1e-2"], {"betas": (0.9, 0.999), "weight_decay": 0.01}),
    (["decouple=True", "use_bias_correction=False"], {"decouple": True, "use_bias_correction": False}),
    (["d_coef=2", "eps=-1.5", "sizes=[1, 2]"], {"d_coef": 2, "eps": -1.5, "sizes": [1, 2]}),
    (["mode=fast", "step_rules=1:10,0.1"], {"mode": "fast", "step_rules": "1:10,0.1"}),
    (["expr=a=b"], {"expr": "a=b"}),
    (None, {}),
])
def test_parse_optimizer_args_values(strings, expected):
    assert parse_optimizer_args(strings) == expected


@pytest.mark.parametrize(("strings", "message"), [
    (["betas"], "--optimizer_args 'betas': expected key=value, got no '='"),
    (["betas="], "--optimizer_args betas: expected a value after '=', got nothing"),
    (["betas=0.9,0.99", "betas=0.8,0.9"], "--optimizer_args betas: given twice ((0.9, 0.99) and '0.8,0.9'); keep one"),
    (["weight decay=0.1"], "--optimizer_args 'weight decay=0.1': expected a keyword name before '='"),
])
def test_parse_optimizer_args_errors_name_the_key(strings, message):
    with pytest.raises(FlagError) as caught:
        parse_optimizer_args(strings)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(("name", "message"), [
    ("AdamW9bit", "--optimizer_type AdamW9bit: unknown; did you mean AdamW8bit?"),
    ("Prodigi", "--optimizer_type Prodigi: unknown; did you mean Prodigy?"),
    ("adam", "--optimizer_type adam: unknown; did you mean Adam?"),
    ("no_such_module_xyz.Opt", "--optimizer_type no_such_module_xyz.Opt: cannot import module no_such_module_xyz"),
    ("torch.optim.Adamm", ("--optimizer_type torch.optim.Adamm: module torch.optim has no class Adamm; "
                          "did you mean Adam?")),
])
def test_unknown_optimizer_names(name, message):
    with pytest.raises(FlagError) as caught:
        get_optimizer(name, [_parameter()], 1e-3, {})
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(("name", "class_path"), [
    ("", "torch.optim.adamw.AdamW"),
    ("adamw", "torch.optim.adamw.AdamW"),
    ("RMSprop", "torch.optim.rmsprop.RMSprop"),  # bare names are torch.optim classes, as kohya
    ("torch.optim.RAdam", "torch.optim.radam.RAdam"),
])
def test_case_insensitive_torch_and_module_path_names(name, class_path):
    assert get_optimizer(name, [_parameter()], 1e-3, {})[0] == class_path


def test_optimizer_args_reach_the_optimizer_and_the_description():
    arguments = parse_optimizer_args(["weight_decay=0.05", "betas=0.8,0.9"])
    _, description, optimizer = get_optimizer("AdamW", [_parameter()], 3e-4, arguments)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (3e-4, 0.05, (0.8, 0.9))
    assert description == "weight_decay=0.05,betas=(0.8, 0.9)"


def test_bad_optimizer_argument_names_the_key_and_the_nearest_one():
    with pytest.raises(FlagError) as caught:
        get_optimizer("AdamW", [_parameter()], 1e-3, {"beta": (0.9, 0.99)})
    assert str(caught.value).startswith("--optimizer_args beta: not an argument of AdamW; did you mean betas?")
    with pytest.raises(FlagError, match="AdamW refused lr=0.001 .*Invalid beta parameter"):
        get_optimizer("AdamW", [_parameter()], 1e-3, {"betas": (2.0, 0.99)})


def test_sgd_nesterov_sets_momentum_as_kohya():
    _, description, optimizer = get_optimizer("SGDNesterov", [_parameter()], 0.1, {})
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], description) == (0.9, True, "momentum=0.9")
    _, description, optimizer = get_optimizer("sgdnesterov", [_parameter()], 0.1, {"momentum": 0.5})
    assert (optimizer.param_groups[0]["momentum"], description) == (0.5, "momentum=0.5")


def test_adafactor_relative_step_drops_lr_and_keeps_it_as_initial_lr():
    groups = [{"params": [_parameter()], "lr": 1e-4}]
    _, description, optimizer = get_optimizer("AdaFactor", groups, 1e-3, {})
    group = optimizer.param_groups[0]
    assert description == "relative_step=True"
    assert (group["lr"], group["initial_lr"], uses_relative_step(optimizer)) == (None, 1e-3, True)
    assert groups[0]["lr"] == 1e-4, "the caller's param groups are not modified"


def test_adafactor_fixed_lr_and_warmup_init():
    _, description, optimizer = get_optimizer("adafactor", [_parameter()], 1e-3, {"relative_step": False})
    assert (optimizer.param_groups[0]["lr"], uses_relative_step(optimizer)) == (1e-3, False)
    _, description, _ = get_optimizer("AdaFactor", [_parameter()], 1e-3,
                                      {"relative_step": False, "warmup_init": True})
    assert description == "relative_step=True,warmup_init=True"


@pytest.mark.parametrize(("optimizer_type", "use_8bit_adam", "use_lion", "expected"), [
    ("", False, False, "AdamW"),
    (None, True, False, "AdamW8bit"),
    ("", False, True, "Lion"),
    ("Prodigy", False, False, "Prodigy"),
])
def test_old_optimizer_flags(optimizer_type, use_8bit_adam, use_lion, expected):
    assert resolve_optimizer_type(optimizer_type, use_8bit_adam, use_lion) == expected


def test_old_optimizer_flags_conflict():
    with pytest.raises(FlagError, match=r"^--use_8bit_adam and --optimizer_type Lion: expected one of them"):
        resolve_optimizer_type("Lion", use_8bit_adam=True)
    with pytest.raises(FlagError, match=r"^--use_8bit_adam and --use_lion_optimizer: expected at most one"):
        resolve_optimizer_type("", use_8bit_adam=True, use_lion_optimizer=True)


def test_optimizer_flag_defaults_are_kohyas():
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    args = parser.parse_args([])
    assert (args.optimizer_type, args.learning_rate, args.max_grad_norm, args.optimizer_args) == ("", 2e-6, 1.0, None)
    assert (args.lr_scheduler, args.lr_warmup_steps, args.lr_decay_steps) == ("constant", 0, 0)
    assert (args.lr_scheduler_num_cycles, args.lr_scheduler_power, args.lr_scheduler_type) == (1, 1.0, "")
    args = parser.parse_args(["--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99", "--use_8bit_adam"])
    assert args.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"] and args.use_8bit_adam
