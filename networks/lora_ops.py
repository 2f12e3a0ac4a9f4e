"""The LoRA update of a Linear layer as one autograd function with few operations (training-step speed: on a
GPU the host's cost per dispatched operation dominates an SDXL LoRA step).

`out = base + (x @ downᵀ) @ upᵀ * scale` is two matrix products, the second folding the scale and the residual add
(`addmm`); the backward computes exactly the products it needs: `grad_h = g @ up * scale`, `grad_up = gᵀ h * scale`,
`grad_down = grad_hᵀ x` and, only when x needs it, `grad_x = grad_h @ down` (the base output's gradient passes
through untouched). It runs in the dtype of the base output (autocast's compute dtype): weights held in fp32 are
used through copies the network casts once per step for all modules (LoRANetwork.on_step_start, one foreach
copy), or cast here when there is none; their gradients are cast back, as autocast would do.
"""
from __future__ import annotations

import torch


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, base: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                scale: float, down_copy: torch.Tensor | None = None, up_copy: torch.Tensor | None = None
                ) -> torch.Tensor:
        dtype = base.dtype
        with torch.autocast(x.device.type, enabled=False):
            flat_x = x.reshape(-1, x.shape[-1])
            if flat_x.dtype != dtype:
                flat_x = flat_x.to(dtype)
            # down_copy / up_copy: the weights already cast to `dtype` (once per step for all modules)
            down_c = down_copy if down_copy is not None else (down if down.dtype == dtype else down.to(dtype))
            up_c = up_copy if up_copy is not None else (up if up.dtype == dtype else up.to(dtype))
            hidden = torch.mm(flat_x, down_c.t())
            out = torch.addmm(base.reshape(-1, base.shape[-1]), hidden, up_c.t(), alpha=scale)
        ctx.save_for_backward(flat_x, hidden, down_c, up_c)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        ctx.weight_dtypes = (down.dtype, up.dtype)
        return out.view(base.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        flat_x, hidden, down_c, up_c = ctx.saved_tensors
        scale = ctx.scale
        with torch.autocast(grad_out.device.type, enabled=False):
            grad = grad_out.reshape(-1, grad_out.shape[-1])
            if grad.dtype != hidden.dtype:
                grad = grad.to(hidden.dtype)
            grad_hidden = torch.mm(grad, up_c).mul_(scale)
            grad_up = torch.mm(grad.t(), hidden).mul_(scale) if ctx.needs_input_grad[3] else None
            grad_down = torch.mm(grad_hidden.t(), flat_x) if ctx.needs_input_grad[2] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(grad_hidden, down_c).view(ctx.x_shape)
                if grad_x.dtype != ctx.x_dtype:
                    grad_x = grad_x.to(ctx.x_dtype)
        down_dtype, up_dtype = ctx.weight_dtypes
        if grad_down is not None and grad_down.dtype != down_dtype:
            grad_down = grad_down.to(down_dtype)
        if grad_up is not None and grad_up.dtype != up_dtype:
            grad_up = grad_up.to(up_dtype)
        return grad_x, grad_out if ctx.needs_input_grad[1] else None, grad_down, grad_up, None, None, None


def lora_linear(x: torch.Tensor, base: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float,
                down_copy: torch.Tensor | None = None, up_copy: torch.Tensor | None = None) -> torch.Tensor:
    """`base + up(down(x)) * scale` for Linear down/up weights `[r, in]`, `[out, r]` (see the module docstring);
    `down_copy`/`up_copy`: the same weights already in the compute dtype."""
    return LoRALinearFunction.apply(x, base, down, up, scale, down_copy, up_copy)
