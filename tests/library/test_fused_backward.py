"""Fused backward pass (issue 14): updates inside backward equal the ordinary optimizer step, gradients are freed
one tensor at a time, per-tensor clipping, unbiased bf16 stochastic rounding, LR schedulers and state round trips
through the FusedOptimizer facade, kohya's --fused_optimizer_groups chunking, and other optimizer packages."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from library.train.fused_backward import (FusedOptimizer, OptimizerFactory, split_into_groups,
                                          stochastic_round_to_bf16_)


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(16, 6, generator=generator)
    return inputs.to(dtype), (inputs[:, :3] * 0.5 + 0.1).to(dtype)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    inputs, targets = _batch(step, dtype)
    return (model(inputs).float() - targets.float()).pow(2).mean()


def _groups(model: nn.Module, lrs: tuple[float, float] = (1e-2, 5e-3)) -> list[dict]:
    params = list(model.parameters())
    return [{"params": params[:4], "lr": lrs[0]}, {"params": params[4:], "lr": lrs[1]}]


def _train_unfused(model: nn.Module, make, steps: int, max_grad_norm: float = 0.0) -> None:
    optimizer = make(_groups(model))
    for step in range(steps):
        _loss(model, step).backward()
        if max_grad_norm:
            for param in model.parameters():
                torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _train_fused(model: nn.Module, make, steps: int, first_step: int = 0, optimizer=None, **options):
    optimizer = optimizer or FusedOptimizer(_groups(model), make, **options)
    for step in range(first_step, first_step + steps):
        _loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _assert_same_weights(model: nn.Module, reference: nn.Module, **tolerance) -> None:
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.float(), theirs.float(), **tolerance)


def _adamw(groups):
    return torch.optim.AdamW(groups, weight_decay=0.01)


def _adafactor(groups):
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False)


@pytest.mark.parametrize("make", [_adamw, _adafactor], ids=["AdamW", "Adafactor"])
def test_fused_steps_equal_the_unfused_optimizer(make):
    fused, reference = _mlp(), _mlp()
    _train_fused(fused, make, steps=3)
    _train_unfused(reference, make, steps=3)
    _assert_same_weights(fused, reference, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused[0].weight, _mlp()[0].weight)


def test_gradients_live_one_tensor_at_a_time():
    model = _mlp()
    params = list(model.parameters())
    alive_counts = []
    for param in params:  # registered first, so it runs before the fused hook of the same tensor
        param.register_post_accumulate_grad_hook(
            lambda _: alive_counts.append(sum(p.grad is not None for p in params)))
    optimizer = FusedOptimizer(_groups(model), _adamw)
    _loss(model, 0).backward()
    assert alive_counts == [1] * len(params)
    assert all(param.grad is None for param in params)
    optimizer.remove()
    _loss(model, 1).backward()
    assert all(param.grad is not None for param in params)


def test_clipping_is_per_tensor():
    model, reference = _mlp(), _mlp()
    sgd = lambda groups: torch.optim.SGD(groups)  # noqa: E731 - the update is lr times the applied gradient
    before = copy.deepcopy(model)
    _train_fused(model, sgd, steps=1, max_grad_norm=0.1)
    _train_unfused(reference, sgd, steps=1, max_grad_norm=0.1)
    _assert_same_weights(model, reference, rtol=1e-5, atol=1e-7)
    lrs = [group["lr"] for group in _groups(model) for _ in group["params"]]
    applied = [(old - new).norm().item() / lr for old, new, lr in zip(before.parameters(), model.parameters(), lrs)]
    assert max(applied) <= 0.1 * (1 + 1e-4)
    # gradient norms here are 0.28, 0.089, 0.27, 0.15, 0.22, 0.23: all but the second are cut to 0.1 on their own
    assert sum(norm > 0.0999 for norm in applied) == 5


def test_stochastic_rounding_is_unbiased_and_keeps_exact_values():
    low, high = torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(1.0078125, dtype=torch.bfloat16)
    value = torch.full((200_000,), 1.0 + 0.3 * 0.0078125)  # 30% of the way from 1.0 to its bf16 neighbour
    target = torch.empty(value.shape, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(target, value, torch.Generator().manual_seed(0))
    assert set(target.unique().tolist()) == {low.item(), high.item()}
    assert target.float().mean().item() == pytest.approx(value[0].item(), abs=2e-5)
    negative = stochastic_round_to_bf16_(torch.empty_like(target), -value)
    assert negative.float().mean().item() == pytest.approx(-value[0].item(), abs=2e-5)
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, 1e-40, float("inf"), float("-inf"), float("nan")])
    rounded = stochastic_round_to_bf16_(torch.empty(exact.shape, dtype=torch.bfloat16), exact)
    torch.testing.assert_close(rounded.float(), exact.bfloat16().float(), equal_nan=True, rtol=0, atol=0)


def test_bf16_weights_train_and_follow_the_fp32_run():
    model, reference = _mlp(dtype=torch.bfloat16), _mlp()
    optimizer = FusedOptimizer(_groups(model), _adamw, generator=torch.Generator().manual_seed(0))
    first_loss = _loss(model, 0).item()
    _train_fused(model, _adamw, steps=20, optimizer=optimizer)
    _train_unfused(reference, _adamw, steps=20)
    assert all(param.dtype == torch.bfloat16 and param.grad is None for param in model.parameters())
    assert _loss(model, 20).item() < 0.7 * first_loss
    _assert_same_weights(model, reference, rtol=0.0, atol=0.02)
    state = optimizer.inner_optimizers[0].state_dict()["state"][0]
    assert state["exp_avg"].dtype == torch.float32  # the update is computed in fp32


def test_lr_scheduler_on_the_facade_sets_the_lr_used():
    model = _mlp()
    before = copy.deepcopy(model)
    optimizer = FusedOptimizer(_groups(model), _adamw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step == 0 else 1.0)
    assert {group["lr"] for inner in optimizer.inner_optimizers for group in inner.param_groups} == {0.0}
    _train_fused(model, _adamw, steps=1, optimizer=optimizer)
    _assert_same_weights(model, before, rtol=0, atol=0)  # lr 0 (the AdamW weight decay is lr-scaled too)
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [1e-2, 5e-3]
    assert optimizer.inner_optimizers[-1].param_groups[0]["lr"] == 5e-3
    _train_fused(model, _adamw, steps=1, optimizer=optimizer)
    assert not torch.equal(model[0].weight, before[0].weight)


def test_state_dict_round_trip_resumes_exactly():
    resumed, reference = _mlp(), _mlp()
    saved = _train_fused(resumed, _adamw, steps=2)
    state = copy.deepcopy(saved.state_dict())
    saved.remove()
    fresh = FusedOptimizer(_groups(resumed), _adamw)
    fresh.load_state_dict(state)
    fresh.param_groups[1]["lr"] = 1e-3  # settings still reach the inner optimizers, whose groups were replaced
    assert fresh.inner_optimizers[-1].param_groups[0]["lr"] == 1e-3
    fresh.param_groups[1]["lr"] = 5e-3
    _train_fused(resumed, _adamw, steps=1, first_step=2, optimizer=fresh)
    _train_unfused(reference, _adamw, steps=3)
    _assert_same_weights(resumed, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fused_optimizer_groups"):
        FusedOptimizer(_groups(_mlp()), _adamw, num_groups=2).load_state_dict(state)


def test_split_into_groups_as_kohya():
    tensors = [torch.zeros(1) for _ in range(8)]
    groups = [{"params": tensors[:5], "lr": 1e-3}, {"params": tensors[5:], "lr": 2e-3}]
    # chunk size ceil(8 / 3) = 3, and the lr change starts a new chunk
    assert [len(chunk[0]["params"]) for chunk in split_into_groups(groups, 3)] == [3, 2, 3]
    chunks = split_into_groups(groups, 2)  # chunk size 4
    assert [(len(chunk[0]["params"]), chunk[0]["lr"]) for chunk in chunks] == [(4, 1e-3), (1, 1e-3), (3, 2e-3)]
    assert chunks[1][0]["params"][0] is tensors[4]
    same_lr = [{"params": tensors[:5], "lr": 1e-3}, {"params": tensors[5:], "lr": 1e-3}]
    assert [len(chunk[0]["params"]) for chunk in split_into_groups(same_lr, 2)] == [4, 4]
    assert len(split_into_groups(groups, 100)) == 8


def test_grouped_fused_equals_unfused_adamw():
    model, reference = _mlp(), _mlp()
    optimizer = _train_fused(model, _adamw, steps=3, num_groups=3)
    _train_unfused(reference, _adamw, steps=3)
    assert len(optimizer.inner_optimizers) == 3
    _assert_same_weights(model, reference, rtol=1e-5, atol=1e-6)


def test_grouped_step_finishes_chunks_missing_a_gradient():
    model, reference = _mlp(), _mlp()
    optimizer = FusedOptimizer(_groups(model), _adamw, num_groups=1)
    for net in (model, reference):
        net[4].bias.requires_grad_(False)
    unfused = _adamw(_groups(reference))
    for net, step in ((model, optimizer.step), (reference, unfused.step)):
        _loss(net, 0).backward()
        step()
    _assert_same_weights(model, reference, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model[0].weight, _mlp()[0].weight)


def test_hooks_disabled_accumulates_then_updates_with_the_sum():
    model, reference = _mlp(), _mlp()
    optimizer = FusedOptimizer(_groups(model), _adamw)
    with optimizer.hooks_disabled():
        _loss(model, 0).backward()
    assert all(param.grad is not None for param in model.parameters())
    _loss(model, 1).backward()
    unfused = _adamw(_groups(reference))
    _loss(reference, 0).backward()
    _loss(reference, 1).backward()
    unfused.step()
    _assert_same_weights(model, reference, rtol=1e-5, atol=1e-6)


def test_other_optimizer_packages_run_fused():
    from bitsandbytes.optim import AdamW8bit
    from lion_pytorch import Lion

    for make in (lambda groups: AdamW8bit(groups, min_8bit_size=16), lambda groups: Lion(groups, lr=1e-3)):
        model = _mlp()
        _train_fused(model, make, steps=1)
        assert not torch.equal(model[2].weight, _mlp()[2].weight)
        assert all(param.grad is None for param in model.parameters())


def test_optimizer_factory_uses_get_optimizer_names():
    factory = OptimizerFactory("AdaFactor", 1e-2, {"relative_step": False, "scale_parameter": False})
    model = _mlp()
    optimizer = FusedOptimizer(_groups(model), factory)
    assert factory.class_path == "transformers.optimization.Adafactor"
    assert len(optimizer.inner_optimizers) == len(list(model.parameters()))
    _train_fused(model, factory, steps=1, optimizer=optimizer)
    assert not torch.equal(model[0].weight, _mlp()[0].weight)
