"""The gradients of a watched optimizer's parameters as backward leaves them, before any clipping.

A hook on every parameter runs after each backward that accumulates into its ``.grad``:

- on a step about to be sampled, the squared norm of each gradient (a reduction per tensor, left
  on the device), and the gradient's version counter, from which the probe learns whether
  anything (clipping) changes the gradients between backward and the step;
- with ``vitals``, on every step, the squared total norm of all gradients, as one fused
  multi-tensor norm queued to run when backward ends (``_vital_norm``): a device tensor, no sync.

``OptimizerProbe`` (``optimizer.py``) builds on this with the optimizer's step hooks.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from . import stats as S
from .step_series import BAD_NAME_CHARS

log = logging.getLogger("optiscope")


class GradientProbe:
    """The gradient side of ``OptimizerProbe``; see the module docstring. ``steps``: the index of
    the next optimizer step (the step hooks advance it); ``every``, ``names``, ``vitals``: as
    ``OptimizerProbe`` takes them."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, steps: int, every: int, names: dict[int, str] | None, vitals: bool
    ) -> None:
        self.optimizer = optimizer
        self.vitals = vitals
        self.every = max(1, int(every))
        self.steps = steps  # completed optimizer steps == index of the next step
        self._names = {k: BAD_NAME_CHARS.sub("_", v) for k, v in (names or {}).items()}
        self._failed = False
        # Squared norm of each parameter's accumulated gradient as backward left it, i.e. before
        # any clipping (clip_grad_norm_ rescales .grad in place between backward and step).
        self._backward_norms: dict[int, torch.Tensor] = {}
        # The gradient tensor and its version counter as backward left it, on sampled steps. When
        # nothing touches the gradients between backward and step (no clipping), the post-step
        # walk's ||g||^2 *is* the backward norm, and measuring it in backward again would be one
        # more pass over every gradient. So backward measures on the first sampled step (to find
        # out) and, once the gradients were seen to change before a step, on every sampled step
        # after that one (whose grad_norm is then unknown and not reported).
        self._grad_versions: dict[int, tuple[torch.Tensor, int]] = {}
        self._measure_in_backward = True
        self._grads_change = False
        self._grad_hooks: dict[int, RemovableHandle] = {}
        # vitals on steps that are not sampled: the parameters whose gradients backward produced,
        # and their squared total norm once backward ended (a device tensor)
        self._vital_params: dict[int, torch.Tensor] = {}
        self._vital_queued = False
        self._vital_sq: torch.Tensor | None = None
        self._vital_cpu: dict[int, torch.Tensor] = {}  # float32 CPU gradients, reduced in their hook
        self._n_params = -1
        self._hook_new_params()

    # -- state ---------------------------------------------------------------------------------
    def sampling_next(self) -> bool:
        """True while the forward/backward passes of a step that will be sampled run."""
        return self.steps % self.every == 0 and not self._failed

    def _measuring_grads(self) -> bool:
        return (self.vitals or self.steps % self.every == 0) and not self._failed

    def _groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def _fail(self, where: str) -> None:
        self._failed = True
        log.warning(
            "optiscope: optimizer probe disabled after an error in its %s hook; training "
            "continues unobserved by the probe",
            where,
            exc_info=True,
        )

    def close(self) -> None:
        for h in self._grad_hooks.values():
            h.remove()
        self._grad_hooks = {}

    # -- backward --------------------------------------------------------------------------------
    def _hook_new_params(self) -> None:
        """Hook parameters not yet hooked (also those added with add_param_group mid-run)."""
        n = sum(len(g["params"]) for g in self._groups())
        if n == self._n_params:
            return
        self._n_params = n
        for gi, g in enumerate(self._groups()):
            for pi, p in enumerate(g["params"]):
                self._names.setdefault(id(p), f"{gi}.{pi}")
                if p.requires_grad and id(p) not in self._grad_hooks:
                    self._grad_hooks[id(p)] = p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, p: torch.Tensor) -> None:
        # After every backward that accumulates into p.grad. A step about to be sampled pays for a
        # reduction per tensor here (the last backward leaves the final value); any other step,
        # with vitals, only notes the parameter and, once per backward, queues _vital_norm to run
        # when backward ends: one fused multi-tensor norm over every gradient, before any clipping.
        if p.grad is None or not self._measuring_grads():
            return
        try:  # runs inside the user's backward(): never let it raise there
            if self.steps % self.every == 0:
                self._grad_versions[id(p)] = (p.grad, p.grad._version)
                if self._measure_in_backward:
                    self._backward_norms[id(p)] = S.sq_sum(p.grad)
            if not self.vitals:
                return
            self._vital_params[id(p)] = p
            g = p.grad
            if g.device.type == "cpu" and g.is_contiguous() and g.dtype == torch.float32 and not g.is_sparse:
                # on CPU, reduce now, while backward has just written it (often still in cache):
                # about half the cost of a separate pass at the end (no launch cost to save on CPU)
                self._vital_cpu[id(p)] = torch.dot(g.view(-1), g.view(-1))
            if not self._vital_queued:
                self._vital_queued = True
                try:
                    torch.autograd.Variable._execution_engine.queue_callback(self._vital_norm)
                except RuntimeError:  # not inside a backward (a hook called by hand): the step measures
                    self._vital_queued = False
        except Exception:
            self._fail("gradient")

    def _vital_norm(self) -> None:
        """At the end of a backward (or at GradScaler.unscale_): the squared norm of every noted
        gradient as it is now, as one device tensor: one ``_foreach_norm`` per device and dtype (a
        handful of kernels whatever the number of tensors), no sync. Under gradient accumulation
        each backward recomputes it over the gradients accumulated so far; the last one stands."""
        self._vital_queued = False
        try:
            sq = S.grad_sq_total(self._vital_params, self._vital_cpu)
            if sq is not None:
                self._vital_sq = sq
        except Exception:
            self._fail("gradient")

    def record_gradients(self) -> None:
        """Measure the gradients again as they are now: GradScaler.unscale_ calls this, so that
        grad_norm is the norm of the unscaled gradients, before any clipping that follows."""
        if not self._measuring_grads():
            return
        if self.steps % self.every == 0:
            vitals, self.vitals = self.vitals, False  # the per-tensor path only; the vital norm follows
            try:
                for g in self._groups():
                    for p in g["params"]:
                        if p.grad is not None:
                            self._on_grad(p)
            finally:
                self.vitals = vitals
        if self.vitals:  # not inside a backward: no callback to queue, measure now
            self._vital_cpu.clear()  # unscaled since: the reductions made in backward are stale
            self._vital_params.update((id(p), p) for g in self._groups() for p in g["params"] if p.grad is not None)
            self._vital_norm()

    # -- the step ------------------------------------------------------------------------------
    def _learn_gradient_changes(self, changing: list[torch.Tensor]) -> bool:
        """Whether this step's gradients are known as backward left them; decides whether the
        next sampled step measures them in backward. Reads version counters only: no device work."""
        changed = False
        for p in changing:
            seen = self._grad_versions.get(id(p))
            if seen is not None and (seen[0] is not p.grad or seen[0]._version != seen[1]):
                changed = True
                break
        known = not changed or self._measure_in_backward
        if changed and not known:
            log.info(
                "optiscope: gradients changed between backward and step (clipping?); grad_norm is "
                "measured in backward from the next sampled step (this step's per-tensor norms are not reported; its "
                "global grad_norm is, with vitals)"
            )
        self._grads_change = self._grads_change or changed
        self._measure_in_backward = self._grads_change
        return known

    def _forget_step(self) -> None:
        """After a step: what backward measured for it is spent."""
        self._backward_norms.clear()
        self._grad_versions.clear()
        self._vital_sq = None
        self._vital_params.clear()
        self._vital_cpu.clear()
