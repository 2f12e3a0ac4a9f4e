"""`--fused_backward_pass` and `--fused_optimizer_groups`: update the weights inside backward, so that the full set
of gradients never exists at once (issue 14; kohya's mechanism in TRAINERS §1.4 and §1.5).

Every trainable parameter gets a `Tensor.register_post_accumulate_grad_hook`. When autograd has finished the
gradient of a parameter, the hook clips that tensor's gradient (per tensor, not globally), hands it to the
optimizer that owns the parameter and, once all parameters of that optimizer have reported, steps it and drops the
gradients. With `num_groups=None` (`--fused_backward_pass`) every tensor has its own optimizer, so at most one
gradient is alive; with `num_groups=N` (`--fused_optimizer_groups N`) the tensors are cut into about N chunks with
one optimizer each, and a chunk's gradients live until its last tensor reported.

One optimizer per tensor or chunk is what makes this work for *any* optimizer (torch.optim, transformers' Adafactor,
bitsandbytes, lion-pytorch, schedule-free ...) without knowing its math: for optimizers whose update of a tensor
depends only on that tensor (Adam family, Lion, SGD, Adafactor) the result equals the unfused one. Optimizers that
pool statistics over all parameters (D-Adaptation, Prodigy) give a different result, because each instance sees
only its own tensors.

bf16 and fp16 weights are updated in fp32: the optimizer steps a float32 *shadow* parameter that holds a float32
copy of the weight and its gradient only while the update runs, then the result goes back into the weight, with
stochastic rounding for bf16 (unbiased, so small updates are not lost on average) and round-to-nearest for fp16.
There is no persistent fp32 master copy; the optimizer's state buffers are float32 though (for AdamW 8 bytes per
weight; the 8-bit optimizers and Adafactor's factored moments are the memory-light choices). kohya's fused
Adafactor keeps its state in float32 as well.

`FusedOptimizer` is what the trainer holds: a torch.optim.Optimizer whose `param_groups` are the caller's groups
(edits of "lr" and other settings reach every inner optimizer, so torch LR schedulers work on it), whose
`state_dict()`/`load_state_dict()` carry all inner states, and whose `step()`/`zero_grad()` only finish what
backward left (nothing in the per-tensor case), so a training loop written for an ordinary optimizer keeps working.

Limits: one backward per optimizer step (no gradient accumulation unless the hooks are disabled on the
non-final micro-batches, which then keeps all gradients like the unfused path); a single process (under DDP the
hooks would run before the gradients are averaged); no fp16 loss scaling (the hooks see scaled gradients).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MakeOptimizer = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

# float32 bit patterns: keep the sign, the exponent and the top 7 mantissa bits, which are exactly bfloat16
_BF16_KEEP_MASK = -65536  # 0xFFFF0000 as int32
_LOW_BITS = 1 << 16
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def stochastic_round_to_bf16_(target: Tensor, value_fp32: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Write float32 `value_fp32` into the bfloat16 tensor `target`, rounding up or down at random so that the
    expected result equals the value (a value 1/4 of the way between two bf16 neighbours rounds up 1/4 of the time).

    Adds random integers in [0, 2**16) to the float32 bit pattern, then drops the low 16 bits. Values that bf16
    represents exactly are unchanged; inf and NaN are copied as they are. Returns `target`.
    """
    if target.dtype != torch.bfloat16 or value_fp32.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16_: expected a bfloat16 target and a float32 value, got "
                        f"{target.dtype} and {value_fp32.dtype}")
    value = value_fp32.contiguous()
    bits = torch.randint(0, _LOW_BITS, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    bits.add_(value.view(torch.int32)).bitwise_and_(_BF16_KEEP_MASK)
    rounded = bits.view(torch.float32)  # low 16 bits are zero, so the bf16 conversion below is exact
    # inf/NaN patterns could be carried into another class (NaN -> inf, or wrap around); keep them as they are
    rounded = torch.where(torch.isfinite(value), rounded, value)
    with torch.no_grad():
        target.copy_(rounded)
    return target


def split_into_groups(param_groups: Iterable, num_groups: int) -> list[list[dict[str, Any]]]:
    """Cut param groups into chunks for `--fused_optimizer_groups N`, as kohya does (TRAINERS §1.5).

    All tensors are taken in order; a chunk holds at most ceil(total tensors / N) of them, and a new chunk starts
    whenever the learning rate changes (so U-Net and text encoders never share one). Here a new chunk also starts
    when any other group setting differs, so no setting is lost; for kohya's groups ("params" and "lr") that is the
    same rule. Each chunk is a list of one param-group dict, ready for an optimizer constructor.
    """
    if num_groups < 1:
        raise ValueError(f"split_into_groups: expected num_groups >= 1, got {num_groups}")
    groups = _as_groups(param_groups)
    total = sum(len(group["params"]) for group in groups)
    chunk_size = max(1, math.ceil(total / num_groups))
    chunks: list[list[dict[str, Any]]] = []
    current: list[Tensor] = []
    current_settings: dict[str, Any] = {}

    def close() -> None:
        if current:
            chunks.append([{**current_settings, "params": list(current)}])
            current.clear()

    for group in groups:
        settings = _settings(group)
        for param in group["params"]:
            if current and (len(current) == chunk_size or not _same_settings(settings, current_settings)):
                close()
            current_settings = settings
            current.append(param)
    close()
    return chunks


@dataclass
class _Unit:
    """One inner optimizer and the parameters it updates.

    `working[i]` is what the optimizer steps for `params[i]`: the parameter itself, or a float32 shadow for a
    bf16/fp16 parameter (holding data only during an update). `ready` holds the indices that reported this step.
    """

    optimizer: torch.optim.Optimizer
    params: list[Tensor]
    working: list[Tensor]
    ready: set[int] = field(default_factory=set)


class _SyncedGroup(dict):
    """A facade param group: setting a key (an LR scheduler setting "lr") also sets it in the inner groups.

    The inner groups are found through (optimizer, group index) at each write, because an optimizer's
    load_state_dict replaces its group dicts.
    """

    def __init__(self, values: dict[str, Any]):
        super().__init__(values)
        self.targets: list[tuple[torch.optim.Optimizer, int]] = []

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if key != "params":
            for optimizer, index in self.targets:
                optimizer.param_groups[index][key] = value

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


class FusedOptimizer(torch.optim.Optimizer):
    """Fused backward pass over `param_groups`, one optimizer from `make_optimizer` per tensor (`num_groups=None`)
    or per chunk of `split_into_groups(param_groups, num_groups)`.

    Args:
        param_groups: tensors, or dicts with "params" and settings such as "lr"; tensors without requires_grad
            are kept in the groups but never updated.
        make_optimizer: builds an optimizer from a list of param-group dicts (e.g. `OptimizerFactory`); called
            once per tensor or chunk.
        max_grad_norm: if > 0, each tensor's gradient is clipped to this norm on its own (not the global norm).
        num_groups: None for one optimizer per tensor (`--fused_backward_pass`), N for `--fused_optimizer_groups`.
        generator: random source for stochastic rounding of bf16 weights (default: torch's global RNG of the
            weight's device).

    `enabled = False` (or `with optimizer.hooks_disabled():`) lets gradients accumulate in `.grad` as usual; the
    first backward with the hooks enabled then updates with the accumulated gradient.
    """

    def __init__(self, param_groups: Iterable, make_optimizer: MakeOptimizer, *, max_grad_norm: float = 0.0,
                 num_groups: int | None = None, generator: torch.Generator | None = None):
        super().__init__(_as_groups(param_groups), defaults={})
        self.param_groups = [_SyncedGroup(group) for group in self.param_groups]
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.generator = generator
        self.enabled = True
        trainable = [{**group, "params": [p for p in group["params"] if p.requires_grad]}
                     for group in self.param_groups]
        total = sum(len(group["params"]) for group in trainable)
        chunks = split_into_groups(trainable, num_groups or max(total, 1)) if total else []
        self._units = [self._build_unit(chunk, make_optimizer) for chunk in chunks]
        self._connect_groups()
        self._handles = [param.register_post_accumulate_grad_hook(functools.partial(self._on_grad_ready, unit, i))
                         for unit in self._units for i, param in enumerate(unit.params)]
        if self._units and all(_has_train_eval(unit.optimizer) for unit in self._units):
            # only then: schedule-free optimizers are recognised by having train()/eval()
            self.train = functools.partial(self._switch_mode, "train")
            self.eval = functools.partial(self._switch_mode, "eval")

    @property
    def inner_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers doing the updates (one per tensor or chunk), e.g. to check their type or settings."""
        return [unit.optimizer for unit in self._units]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Updates happened in backward; this only steps chunks some of whose tensors got no gradient this step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for unit in self._units:
            if unit.ready:
                self._step_unit(unit)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop gradients backward left (only there if hooks were disabled or a step was skipped)."""
        for unit in self._units:
            for index in unit.ready:
                self._release(unit, index)
            unit.ready.clear()
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    @contextlib.contextmanager
    def hooks_disabled(self) -> Iterator[None]:
        """Within this block backward only accumulates gradients (e.g. a validation or debugging backward)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def remove(self) -> None:
        """Unregister the hooks; afterwards backward leaves gradients in `.grad` as usual."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_units", None) is not None:
            raise NotImplementedError("FusedOptimizer: param groups are fixed once the hooks are registered")
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """Torch-style groups (params as indices) plus every inner optimizer's own state_dict under "fused_units"."""
        index = {id(param): i for i, param in enumerate(self._all_params())}
        groups = [{**_settings(group), "params": [index[id(p)] for p in group["params"]]}
                  for group in self.param_groups]
        return {"state": {}, "param_groups": groups,
                "fused_units": [unit.optimizer.state_dict() for unit in self._units]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        units = state_dict.get("fused_units")
        if units is None:
            raise ValueError("FusedOptimizer.load_state_dict: this state was saved without the fused backward pass; "
                             "resume with the same --fused_backward_pass / --fused_optimizer_groups settings")
        if len(units) != len(self._units) or len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"FusedOptimizer.load_state_dict: the state has {len(units)} optimizers in "
                             f"{len(state_dict['param_groups'])} groups, this run has {len(self._units)} in "
                             f"{len(self.param_groups)}; resume with the same model, learning rates and "
                             f"--fused_optimizer_groups")
        for unit, unit_state in zip(self._units, units):
            unit.optimizer.load_state_dict(unit_state)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            # the inner groups already carry the saved settings; only the facade's copy needs them
            dict.update(group, _settings(saved))

    # --- internals ---

    def _all_params(self) -> list[Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def _build_unit(self, chunk: list[dict[str, Any]], make_optimizer: MakeOptimizer) -> _Unit:
        params = [param for group in chunk for param in group["params"]]
        working = {id(p): _shadow_for(p) if p.dtype in _LOW_PRECISION else p for p in params}
        inner_groups = [{**group, "params": [working[id(p)] for p in group["params"]]} for group in chunk]
        optimizer = make_optimizer(inner_groups)
        unit = _Unit(optimizer, params, [working[id(p)] for p in params])
        for index in range(len(params)):
            # shadows were built full size so the constructor saw the real shapes; they hold no data between updates
            self._release(unit, index)
        return unit

    def _connect_groups(self) -> None:
        """Link each facade group to the inner groups holding its tensors; the facade starts with their settings."""
        group_of = {id(param): group for group in self.param_groups for param in group["params"]}
        for unit in self._units:
            real_of = {id(w): p for p, w in zip(unit.params, unit.working)}
            for inner_index, inner in enumerate(unit.optimizer.param_groups):
                owners: list[_SyncedGroup] = []
                for working in inner["params"]:
                    owner = group_of[id(real_of[id(working)])]
                    if all(owner is not seen for seen in owners):
                        owners.append(owner)
                for group in owners:
                    if not group.targets:
                        dict.update(group, _settings(inner))  # e.g. lr None for a relative-step Adafactor
                    group.targets.append((unit.optimizer, inner_index))

    @torch.no_grad()
    def _on_grad_ready(self, unit: _Unit, index: int, param: Tensor) -> None:
        grad = param.grad
        if not self.enabled or grad is None:
            return
        working = unit.working[index]
        if working is not param:
            if index in unit.ready:  # a second backward before the chunk stepped: accumulate, as .grad would
                working.grad.add_(grad.float())
            else:
                working.data = param.detach().float()
                working.grad = grad.float()
            param.grad = None
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([working], self.max_grad_norm)
        unit.ready.add(index)
        if len(unit.ready) == len(unit.params):
            self._step_unit(unit)

    def _step_unit(self, unit: _Unit) -> None:
        unit.optimizer.step()
        for index in unit.ready:
            param, working = unit.params[index], unit.working[index]
            if working is not param:
                _write_back(param, working.data, self.generator)
            self._release(unit, index)
        unit.ready.clear()

    @staticmethod
    def _release(unit: _Unit, index: int) -> None:
        param, working = unit.params[index], unit.working[index]
        working.grad = None
        if working is not param:
            working.data = torch.empty(0, dtype=torch.float32, device=param.device)

    @torch.no_grad()
    def _switch_mode(self, mode: str) -> None:
        """Schedule-free train()/eval(): they rewrite the weights, so shadows get their data for the switch."""
        for unit in self._units:
            shadowed = [i for i, (p, w) in enumerate(zip(unit.params, unit.working)) if w is not p]
            for index in shadowed:
                unit.working[index].data = unit.params[index].detach().float()
            getattr(unit.optimizer, mode)()
            for index in shadowed:
                _write_back(unit.params[index], unit.working[index].data, self.generator)
                self._release(unit, index)


@dataclass
class OptimizerFactory:
    """`make_optimizer` for FusedOptimizer built on library.train.optimizers.get_optimizer (same names, arguments
    and kohya adjustments); logs only for the first optimizer it builds, not once per tensor.

    After the first call `class_path` and `description` hold what get_optimizer returns for ss_optimizer.
    """

    optimizer_type: str
    lr: float | None
    optimizer_args: dict[str, Any] | None = None
    class_path: str = ""
    description: str = ""

    def __call__(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        from library.train import optimizers

        first = not self.class_path
        if first and self.optimizer_type.lower().startswith(optimizers.ADAPTIVE_LR_PREFIXES):
            logger.warning("%s estimates its step size from all parameters together; with a fused backward pass "
                           "each tensor (or chunk) gets its own estimate, so results differ from the unfused run",
                           self.optimizer_type)
        previous = optimizers.logger.disabled
        optimizers.logger.disabled = previous or not first
        try:
            self.class_path, self.description, optimizer = optimizers.get_optimizer(
                self.optimizer_type, param_groups, self.lr, self.optimizer_args)
        finally:
            optimizers.logger.disabled = previous
        return optimizer


def _write_back(param: Tensor, value: Tensor, generator: torch.Generator | None) -> None:
    if param.dtype == torch.bfloat16:
        stochastic_round_to_bf16_(param.data, value, generator)
    else:
        param.data.copy_(value)


def _shadow_for(param: Tensor) -> Tensor:
    return torch.nn.Parameter(torch.empty_like(param, dtype=torch.float32, memory_format=torch.contiguous_format))


def _has_train_eval(optimizer: torch.optim.Optimizer) -> bool:
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def _as_groups(param_groups: Iterable) -> list[dict[str, Any]]:
    """Param groups as a list of dicts with a list under "params" (a bare list of tensors is one group)."""
    items = list(param_groups)
    if not items or not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for group in items:
        params = group["params"]
        groups.append({**group, "params": [params] if isinstance(params, Tensor) else list(params)})
    return groups


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key != "params"}


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[key] is b[key] or bool(a[key] == b[key]) for key in a)
