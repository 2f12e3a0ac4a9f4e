"""networks/lora_ops.py: the fused LoRA update equals the plain layers' (forward and every gradient) in fp32,
passes autograd's gradcheck in float64, keeps bf16 autocast semantics, and LoRAModule uses it for Linear layers
(not for convolutions or while hidden/rank dropout is active)."""
from __future__ import annotations

import pytest
import torch

from networks.lora import LoRAModule
from networks.lora_ops import LoRALinearFunction, lora_linear


def _plain(x, base, down, up, scale):
    return base + torch.nn.functional.linear(torch.nn.functional.linear(x, down), up) * scale


def test_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    down = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LoRALinearFunction.apply(*t, 0.75), (x, base, down, up))


def test_forward_and_gradients_equal_the_plain_layers_in_fp32():
    torch.manual_seed(1)
    tensors = [torch.randn(shape, requires_grad=True) for shape in ((4, 9, 16), (4, 9, 12), (8, 16), (12, 8))]
    fused_out = lora_linear(*tensors, 0.5)
    fused_out.square().sum().backward()
    fused_grads = [tensor.grad.clone() for tensor in tensors]
    for tensor in tensors:
        tensor.grad = None
    plain_out = _plain(*tensors, 0.5)
    plain_out.square().sum().backward()
    assert torch.allclose(fused_out, plain_out, atol=1e-5)
    for fused, tensor in zip(fused_grads, tensors):
        assert torch.allclose(fused, tensor.grad, atol=1e-4, rtol=1e-5)


def test_bf16_autocast_computes_in_bf16_and_returns_fp32_weight_gradients():
    torch.manual_seed(2)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    base = torch.randn(3, 12, dtype=torch.bfloat16)
    down = torch.randn(8, 16, requires_grad=True)
    up = torch.randn(12, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, base, down, up, 1.0)
        expected = _plain(x, base, down, up, 1.0)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected.float(), atol=0.1, rtol=0.02)
    out.float().sum().backward()
    assert down.grad.dtype == up.grad.dtype == torch.float32


@pytest.mark.parametrize("layer", [torch.nn.Linear(16, 12), torch.nn.Conv2d(16, 12, 1), torch.nn.Conv2d(16, 12, 3)])
@pytest.mark.parametrize("dropouts", [{}, {"dropout": 0.3}, {"rank_dropout": 0.3}])
def test_the_module_equals_its_plain_computation(layer, dropouts):
    torch.manual_seed(3)
    module = LoRAModule("lora_unet_x", layer, multiplier=0.8, lora_dim=4, alpha=2.0, **dropouts)
    torch.nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    x = torch.randn(2, 5, 16, requires_grad=True) if isinstance(layer, torch.nn.Linear) else \
        torch.randn(2, 16, 6, 6, requires_grad=True)
    module.train()
    torch.manual_seed(4)
    got = layer(x)
    got.sum().backward()
    got_grads = [x.grad.clone(), module.lora_down.weight.grad.clone(), module.lora_up.weight.grad.clone()]
    for tensor in (x, module.lora_down.weight, module.lora_up.weight):
        tensor.grad = None
    module._fused = False  # the plain layers
    torch.manual_seed(4)
    plain = layer(x)
    plain.sum().backward()
    assert torch.allclose(got, plain, atol=1e-5)
    for value, tensor in zip(got_grads, (x, module.lora_down.weight, module.lora_up.weight)):
        assert torch.allclose(value, tensor.grad, atol=1e-4, rtol=1e-5)
