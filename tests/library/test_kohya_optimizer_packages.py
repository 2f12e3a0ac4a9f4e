"""kohya's optional optimizer packages install with ours (requirements.txt) and build through the trainer's path:
the --optimizer_type spellings of kohya's configs (prodigy / Prodigy, module.ClassName) give the real classes,
with --optimizer_args reaching them, and one step moves the weights."""
from __future__ import annotations

import re
from importlib import metadata

import pytest
import torch
from packaging.requirements import Requirement

import train_network
from library.train.optimizers import get_optimizer, parse_optimizer_args, resolve_optimizer_type
from tests.conftest import ROOT

KOHYA_OPTIMIZER_PACKAGES = ("prodigyopt", "lion-pytorch", "dadaptation", "schedulefree", "pytorch-optimizer",
                            "prodigy-plus-schedule-free")


def _requirements() -> dict[str, Requirement]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    requirements = [Requirement(re.sub(r"\s+#.*", "", line)) for line in lines if line.strip() and
                    not line.lstrip().startswith("#")]
    return {requirement.name: requirement for requirement in requirements}


def test_kohya_optimizer_packages_are_required_and_installed_without_pinning_torch():
    requirements = _requirements()
    for package in KOHYA_OPTIMIZER_PACKAGES:
        assert package in requirements, package
        assert requirements[package].specifier.contains(metadata.version(package)), package
    assert str(requirements["torch"].specifier) == ">=2.4", "torch stays a range; the CPU/CUDA build is the user's"


def _train(optimizer_type: str, *optimizer_args: str) -> torch.optim.Optimizer:
    args = train_network.setup_parser().parse_args(["--optimizer_type", optimizer_type, "--learning_rate", "1.0",
                                                    "--optimizer_args", *optimizer_args] if optimizer_args else
                                                   ["--optimizer_type", optimizer_type, "--learning_rate", "1.0"])
    parameter = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 16).reshape(4, 4))
    name = resolve_optimizer_type(args.optimizer_type, args.use_8bit_adam, args.use_lion_optimizer)
    _, _, optimizer = get_optimizer(name, [{"params": [parameter], "lr": 1.0}], args.learning_rate,
                                    parse_optimizer_args(args.optimizer_args))
    before = parameter.detach().clone()
    for _ in range(5):  # RAdamScheduleFree-style warm-up phases do not move the weights on the first steps
        parameter.grad = torch.ones_like(parameter)
        optimizer.step()
    assert not torch.equal(parameter.detach(), before), f"{optimizer_type}: the weights did not move"
    return optimizer


@pytest.mark.parametrize("spelling", ["prodigy", "Prodigy", "prodigyopt.Prodigy"])
def test_prodigy_is_built_with_its_arguments(spelling):
    import prodigyopt

    optimizer = _train(spelling, "d_coef=2", "decouple=True", "weight_decay=0.01", "use_bias_correction=True")
    assert type(optimizer) is prodigyopt.Prodigy
    group = optimizer.param_groups[0]
    assert (group["d_coef"], group["decouple"], group["weight_decay"], group["use_bias_correction"]) == (
        2, True, 0.01, True)


@pytest.mark.parametrize(("spelling", "module", "class_name"), [
    ("Lion", "lion_pytorch", "Lion"),
    ("DAdaptAdam", "dadaptation", "DAdaptAdam"),
    ("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree"),
    ("pytorch_optimizer.CAME", "pytorch_optimizer", "CAME"),
    ("prodigyplus.ProdigyPlusScheduleFree", "prodigyplus", "ProdigyPlusScheduleFree"),
])
def test_kohya_optimizer_packages_build_and_step(spelling, module, class_name):
    optimizer = _train(spelling)
    assert type(optimizer).__name__ == class_name and type(optimizer).__module__.startswith(module)
