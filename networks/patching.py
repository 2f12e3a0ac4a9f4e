"""Routing a model layer's calls through a network module (LoRA, LLLite): the one place that patches forwards.

A `ForwardPatch` keeps the wrapped layer by reference, in a list so that it is not registered as a sub-module
(its weights must not enter the network's state dict). `apply_to` replaces the layer's `forward` with the patch's
own; the patch calls `self.original_forward` for the layer's computation. `restore` undoes it.
"""
from __future__ import annotations

import torch


class ForwardPatch(torch.nn.Module):
    def __init__(self, original_module: torch.nn.Module):
        super().__init__()
        self.original_module_ref = [original_module]
        self.original_forward = None

    @property
    def original_module(self) -> torch.nn.Module:
        return self.original_module_ref[0]

    def apply_to(self) -> None:
        """Route the wrapped layer's calls through this module."""
        if self.original_forward is not None:
            return
        self.original_forward = self.original_module.forward
        self.original_module.forward = self.forward

    def restore(self) -> None:
        """Undo `apply_to`: the wrapped layer computes its own output again."""
        if self.original_forward is not None:
            del self.original_module.forward  # drops the instance attribute; the class method is used again
            self.original_forward = None
