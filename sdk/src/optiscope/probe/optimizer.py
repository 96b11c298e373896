"""Optimizer-state statistics, computed on the device with fused multi-tensor reductions.

The probe attaches to any ``torch.optim.Optimizer`` through its step hooks; it never calls
``optimizer.step`` itself and never changes the model, the optimizer or the RNG state. On a step
that is not sampled the hooks do a counter increment and nothing else: no kernel, no host sync.
On a sampled step every statistic stays a device tensor; the probe stacks them into one vector
that the exporter thread copies to the host (the only sync, and off the training thread).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("optiscope")

#: Emitted names, in the order of the stacked vector (Adam-family names only when the state has them).
GLOBAL_NAMES = ("grad_norm", "param_norm", "update_norm", "update_ratio")
ADAM_NAMES = ("exp_avg_norm", "exp_avg_sq_norm")

Emit = Callable[[int, dict, tuple], None]  # (step, scalar values, (names, device vector))


def total_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm over a list of tensors as a float64 0-d tensor on ``device``.

    ``torch._foreach_norm`` makes one fused pass per (device, dtype) group and accumulates in
    float32 even for half-precision inputs; the per-tensor norms are combined in float64.
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return _combine(list(norms), device)


def _combine(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not norms:
        return torch.zeros((), dtype=torch.float64, device=device)
    stacked = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
    return torch.linalg.vector_norm(stacked)


class OptimizerProbe:
    """Computes the canonical global series around each sampled ``optimizer.step()``.

    ``every``: sample one optimizer step in ``every`` (step index ``% every == 0``). Only real
    optimizer steps count: a step skipped by ``GradScaler`` never calls the hooks, and gradient
    accumulation calls backward several times but the optimizer once.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, emit: Emit, every: int = 1):
        self.optimizer = optimizer
        self.emit = emit
        self.every = max(1, int(every))
        self.steps = 0  # completed optimizer steps == index of the next step
        self._sampled = False
        self._before: list[torch.Tensor] | None = None
        self._changing: list[torch.Tensor] = []
        self._grad_norm: torch.Tensor | None = None
        self._param_norm_before: torch.Tensor | None = None
        # Norm of each parameter's accumulated gradient as backward left it, i.e. before any
        # clipping (clip_grad_norm_ rescales .grad in place between backward and step).
        self._backward_norms: dict[int, torch.Tensor] = {}
        self._grad_hooks: dict[int, object] = {}
        self._n_params = -1
        self._failed = False
        self._handles = [optimizer.register_step_pre_hook(self._pre),
                         optimizer.register_step_post_hook(self._post)]
        self._hook_new_params()

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        for h in self._handles + list(self._grad_hooks.values()):
            h.remove()
        self._handles, self._grad_hooks = [], {}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _hook_new_params(self) -> None:
        """Hook parameters not yet hooked (also those added with add_param_group mid-run)."""
        n = sum(len(g["params"]) for g in self.optimizer.param_groups)
        if n == self._n_params:
            return
        self._n_params = n
        for p in self._params():
            if p.requires_grad and id(p) not in self._grad_hooks:
                self._grad_hooks[id(p)] = p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, p: torch.Tensor) -> None:
        # Runs after every backward that accumulates into p.grad; only a step about to be sampled
        # pays for a reduction, and the last backward before the step leaves the final value.
        if self.steps % self.every == 0 and p.grad is not None and not self._failed:
            self._backward_norms[id(p)] = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)

    # -- hooks -------------------------------------------------------------------------------
    def _pre(self, optimizer, args, kwargs) -> None:
        self._sampled = self.steps % self.every == 0 and not self._failed
        if not self._sampled:
            return
        try:
            self._hook_new_params()
            with torch.no_grad():
                params = self._params()
                device = params[0].device if params else torch.device("cpu")
                with_grad = [p for p in params if p.grad is not None]
                hooked = [self._backward_norms[id(p)] for p in with_grad if id(p) in self._backward_norms]
                unhooked = [p.grad for p in with_grad if id(p) not in self._backward_norms]
                parts = hooked + (list(torch._foreach_norm(unhooked, 2, dtype=torch.float32)) if unhooked else [])
                self._grad_norm = _combine(parts, device)
                self._param_norm_before = total_norm(params, device)
                # Only parameters with a gradient can change (torch.optim skips the others); one
                # fused copy of them is the exact reference for theta_after - theta_before.
                self._changing = with_grad
                self._before = list(torch._foreach_mul(with_grad, 1.0)) if with_grad else []
        except Exception:  # never crash training; stop probing and say so once
            self._fail("pre-step")

    def _post(self, optimizer, args, kwargs) -> None:
        index = self.steps
        self.steps += 1
        if not self._sampled:
            return
        try:
            with torch.no_grad():
                params = self._params()
                device = params[0].device if params else torch.device("cpu")
                if self._before:
                    torch._foreach_sub_(self._before, self._changing)  # theta_before - theta_after
                update_norm = total_norm(self._before or [], device)
                param_norm = total_norm(params, device)
                names = list(GLOBAL_NAMES)
                stats = [self._grad_norm, param_norm, update_norm, update_norm / self._param_norm_before]
                state = optimizer.state
                moments = {k: [state[p][k] for p in params if k in state.get(p, {})] for k in ("exp_avg", "exp_avg_sq")}
                if moments["exp_avg"]:
                    names += ADAM_NAMES
                    stats += [total_norm(moments["exp_avg"], device), total_norm(moments["exp_avg_sq"], device)]
                vector = torch.stack(stats)
            lr = optimizer.param_groups[0]["lr"] if optimizer.param_groups else float("nan")
            self.emit(index, {"lr": lr.detach() if isinstance(lr, torch.Tensor) else float(lr)},
                      (tuple(names), vector))
        except Exception:
            self._fail("post-step")
        finally:
            self._before, self._changing = None, []
            self._grad_norm = self._param_norm_before = None
            self._backward_norms.clear()

    def _fail(self, where: str) -> None:
        self._failed = True
        log.warning("optiscope: optimizer probe disabled after an error in its %s hook; training "
                    "continues unobserved by the probe", where, exc_info=True)

