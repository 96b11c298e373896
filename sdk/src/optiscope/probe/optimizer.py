"""Optimizer-state statistics around ``optimizer.step()``, computed on the device.

The probe attaches to any ``torch.optim.Optimizer`` through its step hooks; it never calls
``optimizer.step`` itself and never changes the model, the optimizer or the RNG state.

- Every step: the learning rate of each param group and the host-side step time (no kernel), and,
  unless ``vitals`` is off, the gradient norm before clipping: one fused multi-tensor norm when
  backward ends, left on the device (divergence detection needs it on every step, where the full
  statistics are sampled).
- Sampled steps (one in ``every``): the full statistics (global, per param group, per tensor),
  all kept as device tensors and stacked into one vector. The exporter thread copies that vector
  to the host: the only sync, and off the training thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from . import stats as S
from .contributor import Contributor, HostValue
from .fused import Kernels
from .gradients import GradientProbe
from .native import Native
from .step_series import (
    PreStep,
    SeriesVector,
    add_adam,
    add_global,
    add_per_group,
    add_per_tensor,
    add_state_norms,
    after_walk,
)

log = logging.getLogger("optiscope")

#: A sampled step's series: their names and one float64 device vector of their values.
Vector = tuple[tuple[str, ...], torch.Tensor]
#: Where the probe hands each step: (step index, host values, the sampled step's vector or None).
Emit = Callable[[int, dict[str, HostValue], Vector | None], None]


class OptimizerProbe(GradientProbe):
    """``every``: sample one optimizer step in ``every`` (step index ``% every == 0``).

    Only real optimizer steps count: a step skipped by ``GradScaler`` never calls the hooks, and
    gradient accumulation calls backward several times but the optimizer once.
    ``names``: parameter names by ``id(param)`` (from ``model.named_parameters()``); others are
    named ``<group>.<index>``. ``per_tensor``: also emit the per-tensor series on sampled steps.
    ``fused``: compute the statistics with compiled kernels, built in a background thread when
    first needed (on the first sampled step): on CPU one native call per walk over every float32
    tensor (``native``, built with the C compiler), elsewhere and for other dtypes one
    ``torch.compile``d kernel per large tensor; False keeps to the eager blocks.
    ``native=False`` leaves the CPU to the ``torch.compile``d kernels too.
    ``vitals``: measure ``grad_norm`` on every step, not only sampled ones.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        emit: Emit,
        every: int = 1,
        names: dict[int, str] | None = None,
        per_tensor: bool = True,
        start_step: int | None = None,
        fused: bool = True,
        native: bool = True,
        vitals: bool = True,
    ) -> None:
        steps = resumed_steps(optimizer) if start_step is None else int(start_step)
        super().__init__(optimizer, steps, every, names, vitals)
        self.emit = emit
        self.per_tensor = per_tensor
        self._sampled = False
        self._pre: PreStep | None = None
        self._last_step_end: float | None = None
        self._scratch = S.Scratch()
        # Fused kernels for large tensors, compiled in the background on the first sampled step;
        # the eager blocks compute the same numbers until they are ready (and if they never are).
        self.kernels = Kernels(enabled=fused)
        # On CPU, both walks over every float32 tensor in one native call each (built in the
        # background with the C compiler); the fused kernels and eager blocks serve the rest.
        self.native = Native(enabled=fused and native)
        # Other probes: host_values() joins every step's record, collect() a sampled step's vector.
        self.contributors: list[Contributor] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._on_pre),
            optimizer.register_step_post_hook(self._on_post),
        ]

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        super().close()

    # -- hooks -------------------------------------------------------------------------------
    def _on_pre(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        replaced = _closure_first(optimizer, args, kwargs)
        self._sampled = self.steps % self.every == 0 and not self._failed
        if self._vital_params and self._vital_sq is None and not self._vital_queued:
            self._vital_norm()  # only when no backward ran the hooks (they were called by hand)
        if self._sampled:
            try:
                self._hook_new_params()
                with torch.no_grad():
                    self._pre = self._measure_before()
            except Exception:  # never crash training; stop probing and say so once
                self._fail("pre-step")
        return replaced

    def _on_post(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        index = self.steps
        self.steps += 1
        now = time.perf_counter()
        host = self._host_values(now)
        vector = None
        if self._vital_sq is not None and not self._sampled and not self._failed:
            try:  # a 0-d device tensor: the exporter thread reads it (no sync here)
                host["grad_norm"] = self._vital_sq.sqrt()
            except Exception:
                self._fail("post-step")
        if self._sampled and self._pre is not None:
            try:
                with torch.no_grad():
                    vector = self._measure_after(self._pre)
            except Exception:
                self._fail("post-step")
            finally:
                self._pre = None
        self._forget_step()
        try:
            self.emit(index, host, vector)
        except Exception:
            self._fail("emit")

    def _host_values(self, now: float) -> dict[str, HostValue]:
        """Per-step values that cost no device work: learning rates and the host step time."""
        out: dict[str, HostValue] = {}
        for gi, g in enumerate(self._groups()):
            lr = g.get("lr", float("nan"))
            lr = lr.detach() if isinstance(lr, torch.Tensor) else float(lr)
            out["lr" if gi == 0 else f"lr/group/{gi}"] = lr
        if self._last_step_end is not None:
            out["step_time"] = now - self._last_step_end  # wall time between two optimizer steps
        self._last_step_end = now
        for c in self.contributors:
            try:  # inside optimizer.step(): never raise into the training loop
                out.update(c.host_values())
            except Exception:
                self._fail("post-step")
        return out

    # -- measurement -------------------------------------------------------------------------
    def _measure_before(self) -> PreStep:
        groups = self._groups()
        every = [p for g in groups for p in g["params"]]
        device = every[0].device if every else torch.device("cpu")
        changing = [p for p in every if p.grad is not None]
        adam = S.is_adam(self.optimizer)
        index_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        group_of = {id(p): groups[index_of[id(p)]] for p in every}
        walk = (
            S.before_step(changing, self.optimizer, group_of, device, self._scratch, adam, self.kernels, self.native)
            if changing
            else None
        )
        vu = None
        if walk is not None and walk.vu_sum is not None and walk.vu_count is not None:
            vu = (walk.vu_sum, walk.vu_count)
        return PreStep(
            grad_norm_known=self._learn_gradient_changes(changing),
            device=device,
            changing=changing,
            group_of=group_of,
            adam=adam,
            walk=walk,
            group_index=[index_of[id(p)] for p in changing],
            # backward's norms (before any clipping); those missing are the post-walk's
            backward=[self._backward_norms.get(id(p)) for p in changing],
            still_sq=S.sq_norms([p for p in every if p.grad is None], device).sum(),
            vu=vu,
            had_v=walk.had_v if walk is not None and vu is not None else None,
        )

    def _measure_after(self, pre: PreStep) -> Vector:
        sums = after_walk(pre, self.optimizer, self._scratch)
        out = SeriesVector()
        add_global(out, sums, self._vital_sq)
        if sums.adam is not None:
            add_adam(out, sums.adam, pre.vu)
        else:
            add_state_norms(out, self.optimizer, pre.changing, pre.device)
        groups = sorted(set(pre.group_index))
        if len(groups) > 1:
            add_per_group(out, sums, groups)
        if self.per_tensor:
            add_per_tensor(out, sums, [self._names[id(p)] for p in pre.changing])
        for c in self.contributors:
            out.add_contributed(c.collect(), pre.device)
        return out.finish()


def resumed_steps(optimizer: torch.optim.Optimizer) -> int:
    """The step count an optimizer loaded from a checkpoint carries in its state (Adam, AdamW,
    and most torch.optim classes keep one per parameter), 0 for a fresh one.

    HOST SYNC, once, when watching starts (never in a step): the count may be a device tensor."""
    for state in optimizer.state.values():
        step = state.get("step") if isinstance(state, dict) else None
        if step is not None:
            return int(step.item() if isinstance(step, torch.Tensor) else step)
    return 0


def _closure_first(optimizer, args, kwargs):
    """``optimizer.step(closure)`` (Lightning always, some users too): the closure runs zero_grad,
    forward and backward, but step pre-hooks run before the step body calls it, so the probe would
    measure the previous batch's gradients. Run it here instead and hand the step a closure that
    returns its result. Only for torch.optim classes other than LBFGS: they call the closure exactly
    once, first thing in step(); optimizers that call it several times are left alone (and are
    measured one closure late)."""
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
    if (
        closure is None
        or not type(optimizer).__module__.startswith("torch.optim.")
        or isinstance(optimizer, torch.optim.LBFGS)
    ):
        return None
    with torch.enable_grad():
        result = closure()  # user code: its exceptions are the training loop's and propagate

    def cached():
        return result

    return (args, {**kwargs, "closure": cached}) if "closure" in kwargs else ((args[0], cached, *args[2:]), kwargs)
