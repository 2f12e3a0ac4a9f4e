"""Exponential moving average (EMA) of trained weights (`--use_ema`, issue 14); kohya's scripts have none.

`ParameterEMA` keeps an fp32 shadow copy of named parameters (a U-Net, a text encoder or a LoRA network:
anything with `named_parameters()`) and after each optimizer step moves it toward the live weights:

    shadow = decay_t * shadow + (1 - decay_t) * param

The decay schedule follows diffusers' `EMAModel` (diffusers/training_utils.py, `get_decay`, checked against
0.42.1), whose defaults are what diffusers' training scripts use. There, with `optimization_step` counting
the updates so far (1 on the first) and `update_after_step=0`, `s = optimization_step - 1`; the decay is 0
when `s <= 0` (the first update copies the weights) and otherwise `min(decay, (1 + s) / (10 + s))` when
`use_ema_warmup=False` (its default), or `min(decay, 1 - (1 + s / inv_gamma) ** -power)` when it is True.

Here `warmup=True` (the default) is diffusers' default schedule: with `step` the optimizer steps done so far,
decay_t = 0 at step 1 and `min(decay, step / (9 + step))` after, i.e. 2/11, 3/12, ... reaching 0.999 near
step 9,000 and 0.9999 near step 90,000. `warmup=False` uses `decay` from the first update on, starting from
the weights the shadow was made from. The warm-up matters for short runs: 0.9999 ** 2000 = 0.82, so without
it a 2,000-step LoRA run's EMA still holds 82% of the initial (zero-delta) weights. diffusers' power schedule
(`use_ema_warmup=True`), `min_decay` and `update_after_step` are not offered.

The tracked set is fixed when the EMA is made: every parameter given then is averaged at each update, even
if it later stops requiring grad (diffusers instead copies such parameters into the shadow unaveraged).
A frozen parameter that was never trained simply keeps shadow == param.

State is tensors plus a JSON-able dict (`tensors()` / `info()`), so a state folder can hold it as
`ema.safetensors` + JSON without pickle; `load()` checks names and shapes before changing anything.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch

from library.errors import FlagError, UserInputError

STATE_VERSION = 1
_CHUNK_ELEMENTS = 1 << 26  # elements converted/copied at once per update (bounds the temporary memory)


def check_ema_decay(value: float, flag: str = "--ema_decay") -> float:
    """Return `value` as a float, or raise FlagError (one line) if it is not strictly between 0 and 1."""
    try:
        decay = float(value)
    except (TypeError, ValueError):
        decay = float("nan")
    if not 0.0 < decay < 1.0:  # also catches NaN
        raise FlagError(f"{flag} {value}: expected a value between 0 and 1 (exclusive), e.g. 0.9999")
    return decay


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """`module.named_parameters()` that require grad, in order: the usual set to give `ParameterEMA`."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _chunks(pairs: list, limit: int = _CHUNK_ELEMENTS) -> Iterator[list]:
    """Split (shadow, param) pairs into runs of at most `limit` elements (a bigger tensor gets its own run)."""
    run, size = [], 0
    for pair in pairs:
        if run and size + pair[1].numel() > limit:
            yield run
            run, size = [], 0
        run.append(pair)
        size += pair[1].numel()
    if run:
        yield run


class ParameterEMA:
    """fp32 EMA of `params` (name -> Parameter), kept on `device` (None: each parameter's own device)."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], decay: float = 0.9999, warmup: bool = True,
                 device: str | torch.device | None = None):
        if not params:
            raise ValueError("ParameterEMA needs at least one parameter")
        self.decay = check_ema_decay(decay, "decay")
        self.warmup = bool(warmup)
        self.step = 0  # optimizer steps folded into the shadows
        self.params = dict(params)
        with torch.no_grad():
            self.shadows = {name: p.detach().to(device or p.device, torch.float32, copy=True)
                            for name, p in self.params.items()}

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step `step` (1 = the first); see the module doc."""
        if not self.warmup:
            return self.decay
        if step <= 1:
            return 0.0
        return min(self.decay, step / (9 + step))

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Fold the live weights in after optimizer step `step` (1-based, e.g. the global step after it
        was incremented); returns the decay used."""
        decay = self.decay_at(step)
        pairs = [(self.shadows[name], p.detach()) for name, p in self.params.items()]
        for run in _chunks(pairs):
            shadows = [s for s, _ in run]
            # Bring the live weights to the shadow's device and fp32. Copies from an accelerator to the CPU
            # go non-blocking (into pinned memory) and are waited for before they are read.
            live = [p.to(s.device, non_blocking=True) for s, p in run]
            for device in {d for s, p in run if s.device != p.device for d in (s.device, p.device)}:
                if device.type != "cpu":
                    torch.accelerator.synchronize(device)
            live = [t if t.dtype == torch.float32 else t.float() for t in live]
            if decay == 0.0:
                torch._foreach_copy_(shadows, live)
            else:
                torch._foreach_lerp_(shadows, live, 1.0 - decay)  # s + (1 - d) * (p - s)
        self.step = int(step)
        return decay

    def _targets(self, params: Mapping[str, torch.nn.Parameter] | None) -> dict[str, torch.nn.Parameter]:
        params = self.params if params is None else dict(params)
        self._check(params.keys(), {n: p.shape for n, p in params.items()}, "the parameters")
        return params

    @torch.no_grad()
    def copy_to(self, params: Mapping[str, torch.nn.Parameter] | None = None) -> None:
        """Write the EMA weights into `params` (default: the tracked ones), cast to each parameter's dtype."""
        for name, p in self._targets(params).items():
            p.copy_(self.shadows[name])

    @contextlib.contextmanager
    def swapped_in(self, params: Mapping[str, torch.nn.Parameter] | None = None) -> Iterator[None]:
        """Use the EMA weights inside the block (sampling, saving); the training weights come back
        bit-exact afterwards, also on an exception. The backup is kept on the EMA's device."""
        params = self._targets(params)
        with torch.no_grad():
            backup = {name: p.detach().to(self.shadows[name].device, copy=True) for name, p in params.items()}
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    # --- state: tensors + JSON-able info, no pickle ---

    def tensors(self) -> dict[str, torch.Tensor]:
        """name -> fp32 shadow (the live tensors, not copies: save them before the next update)."""
        return dict(self.shadows)

    def info(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "decay": self.decay, "warmup": self.warmup,
                "count": len(self.shadows)}

    def state_dict(self) -> dict:
        return {"info": self.info(), "tensors": self.tensors()}

    def load_state_dict(self, state: Mapping) -> list[str]:
        return self.load(state["tensors"], state["info"])

    def _check(self, names, shapes: Mapping[str, torch.Size], what: str) -> None:
        """Raise UserInputError naming the first name/shape in `what` that does not match the tracked set."""
        names = set(names)
        for name, shadow in self.shadows.items():
            if name not in names:
                raise UserInputError(f"EMA: {what} lack {name!r} (the EMA tracks {len(self.shadows)} tensors)")
            if tuple(shapes[name]) != tuple(shadow.shape):
                raise UserInputError(f"EMA: {what} have {name!r} with shape {tuple(shapes[name])}, "
                                     f"expected {tuple(shadow.shape)}")
        extra = sorted(names - self.shadows.keys())
        if extra:
            raise UserInputError(f"EMA: {what} have {extra[0]!r}, which the EMA does not track "
                                 f"({len(extra)} unexpected name(s))")

    @torch.no_grad()
    def load(self, tensors: Mapping[str, torch.Tensor], info: Mapping) -> list[str]:
        """Restore shadows and step from `tensors()` / `info()` output; checks everything before changing
        anything. Decay and warm-up stay this object's (the current flags); returns a line for each one
        that differs from the saved state, for the caller to log."""
        step = info.get("step")
        if info.get("version") != STATE_VERSION or not isinstance(step, int) or step < 0:
            raise UserInputError(f"EMA state info is not a version-{STATE_VERSION} EMA state with a step "
                                 f"count: {dict(info)!r}")
        self._check(tensors.keys(), {n: t.shape for n, t in tensors.items()}, "the saved EMA state")
        for name, shadow in self.shadows.items():
            shadow.copy_(tensors[name])
        self.step = step
        return [f"EMA {key}: saved {info.get(key)!r}, now {getattr(self, key)!r}"
                for key in ("decay", "warmup") if info.get(key) != getattr(self, key)]
