"""A schedule-free-style optimizer for tests (`--optimizer_type tests.scripts.recording_optimizer.RecordingSGD`):
plain SGD with the train()/eval() methods schedule-free optimizers have, recording which mode it is in."""
from __future__ import annotations

import torch


class RecordingSGD(torch.optim.SGD):
    """SGD whose `mode` is "train" or "eval" as the trainer last switched it (schedule-free optimizers start in
    eval mode); `switches` lists every switch."""

    def __init__(self, params, lr=1e-3, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.mode = "eval"
        self.switches: list[str] = []

    def train(self) -> None:
        self.mode = "train"
        self.switches.append("train")

    def eval(self) -> None:
        self.mode = "eval"
        self.switches.append("eval")

    def step(self, closure=None):
        if self.mode != "train":
            raise AssertionError("RecordingSGD.step() called in eval mode")
        return super().step(closure)
