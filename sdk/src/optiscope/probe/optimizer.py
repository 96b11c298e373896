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
import re
import time
from typing import Callable

import torch

from . import stats as S
from .fused import Kernels
from .native import Native

log = logging.getLogger("optiscope")

Emit = Callable[[int, dict, tuple | None], None]  # (step, host values, (names, device vector) | None)
F64 = torch.float64
_BAD = re.compile(r"[^A-Za-z0-9_.:/\-]")


class OptimizerProbe:
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

    def __init__(self, optimizer: torch.optim.Optimizer, emit: Emit, every: int = 1,
                 names: dict[int, str] | None = None, per_tensor: bool = True, start_step: int | None = None,
                 fused: bool = True, native: bool = True, vitals: bool = True):
        self.optimizer = optimizer
        self.vitals = vitals
        self.emit = emit
        self.every = max(1, int(every))
        self.per_tensor = per_tensor
        # completed optimizer steps == index of the next step
        self.steps = resumed_steps(optimizer) if start_step is None else int(start_step)
        self._names = {k: _BAD.sub("_", v) for k, v in (names or {}).items()}
        self._sampled = False
        self._pre: dict | None = None
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
        self._grad_hooks: dict[int, object] = {}
        # vitals on steps that are not sampled: the parameters whose gradients backward produced,
        # and their squared total norm once backward ended (a device tensor)
        self._vital_params: dict[int, torch.Tensor] = {}
        self._vital_queued = False
        self._vital_sq: torch.Tensor | None = None
        self._vital_cpu: dict[int, torch.Tensor] = {}  # float32 CPU gradients, reduced in their hook
        self._n_params = -1
        self._failed = False
        self._last_step_end: float | None = None
        self._scratch = S.Scratch()
        # Fused kernels for large tensors, compiled in the background on the first sampled step;
        # the eager blocks compute the same numbers until they are ready (and if they never are).
        self.kernels = Kernels(enabled=fused)
        # On CPU, both walks over every float32 tensor in one native call each (built in the
        # background with the C compiler); the fused kernels and eager blocks serve the rest.
        self.native = Native(enabled=fused and native)
        # Other probes: collect() -> [(name, 0-d tensor) or (names, 1-d tensor)] joins a sampled step's vector;
        # host_values() -> {name: value} joins every step's record.
        self.contributors: list = []
        self._handles = [optimizer.register_step_pre_hook(self._on_pre),
                         optimizer.register_step_post_hook(self._on_post)]
        self._hook_new_params()

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        for h in self._handles + list(self._grad_hooks.values()):
            h.remove()
        self._handles, self._grad_hooks = [], {}

    def sampling_next(self) -> bool:
        """True while the forward/backward passes of a step that will be sampled run."""
        return self.steps % self.every == 0 and not self._failed

    def _measuring_grads(self) -> bool:
        return (self.vitals or self.steps % self.every == 0) and not self._failed

    def _groups(self) -> list[dict]:
        return self.optimizer.param_groups

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
            groups: dict[tuple, list[torch.Tensor]] = {}
            parts = []
            done = [sq for k, sq in self._vital_cpu.items() if k in self._vital_params]
            if done:
                parts.append(torch.stack(done).to(F64).sum())
            for k, p in self._vital_params.items():
                g = p.grad
                if g is not None and k not in self._vital_cpu:
                    groups.setdefault((g.device, g.dtype, g.is_sparse), []).append(g)
            for (device, dtype, sparse), grads in groups.items():
                if sparse or not dtype.is_floating_point:
                    parts.extend(S.sq_sum(g).to(F64) for g in grads)
                else:  # float32 accumulation for half-precision gradients, whose norm may not fit
                    norms = torch._foreach_norm(grads, 2, dtype=torch.float32 if dtype.itemsize < 4 else None)
                    parts.append(torch.stack(norms).to(F64).square().sum())
            if parts:
                device = parts[0].device
                self._vital_sq = torch.stack([x.to(device) for x in parts]).sum()
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

    def _fail(self, where: str) -> None:
        self._failed = True
        log.warning("optiscope: optimizer probe disabled after an error in its %s hook; training "
                    "continues unobserved by the probe", where, exc_info=True)

    # -- hooks -------------------------------------------------------------------------------
    def _on_pre(self, optimizer, args, kwargs):
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

    def _on_post(self, optimizer, args, kwargs) -> None:
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
                self._backward_norms.clear()
                self._grad_versions.clear()
        self._vital_sq = None
        self._vital_params.clear()
        self._vital_cpu.clear()
        try:
            self.emit(index, host, vector)
        except Exception:
            self._fail("emit")

    def _host_values(self, now: float) -> dict:
        """Per-step values that cost no device work: learning rates and the host step time."""
        out: dict = {}
        for gi, g in enumerate(self._groups()):
            lr = g.get("lr", float("nan"))
            lr = lr.detach() if isinstance(lr, torch.Tensor) else float(lr)
            out["lr" if gi == 0 else f"lr/group/{gi}"] = lr
        if self._last_step_end is not None:
            out["step_time"] = now - self._last_step_end  # wall time between two optimizer steps
        self._last_step_end = now
        for c in self.contributors:
            if hasattr(c, "host_values"):
                try:  # inside optimizer.step(): never raise into the training loop
                    out.update(c.host_values())
                except Exception:
                    self._fail("post-step")
        return out

    # -- measurement -------------------------------------------------------------------------
    def _measure_before(self) -> dict:
        groups = self._groups()
        every = [p for g in groups for p in g["params"]]
        device = every[0].device if every else torch.device("cpu")
        changing = [p for p in every if p.grad is not None]
        still = [p for p in every if p.grad is None]
        adam = S.is_adam(self.optimizer)
        index_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        group_of = {id(p): groups[index_of[id(p)]] for p in every}
        walk = S.before_step(changing, self.optimizer, group_of, device, self._scratch, adam, self.kernels,
                             self.native) if changing else None
        grad_norm_known = self._learn_gradient_changes(changing)
        return {
            "grad_norm_known": grad_norm_known,
            "device": device, "changing": changing, "group_of": group_of, "adam": adam, "walk": walk,
            "group_index": [index_of[id(p)] for p in changing],
            # backward's norms (before any clipping); those missing are the post-walk's
            "backward": [self._backward_norms.get(id(p)) for p in changing],
            "still_sq": S.sq_norms(still, device).sum(),
            "vu": (walk.vu_sum, walk.vu_count) if walk and walk.vu_sum is not None else None,
            "had_v": walk.had_v if walk and walk.vu_sum is not None else None,
        }

    def _learn_gradient_changes(self, changing: list) -> bool:
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
            log.info("optiscope: gradients changed between backward and step (clipping?); grad_norm is "
                     "measured in backward from the next sampled step (this step's per-tensor norms are not reported; its "
                     "global grad_norm is, with vitals)")
        self._grads_change = self._grads_change or changed
        self._measure_in_backward = self._grads_change
        return known

    def _measure_after(self, pre: dict) -> tuple[tuple[str, ...], torch.Tensor]:
        device, changing = pre["device"], pre["changing"]
        adam_ok = pre["adam"] and changing and all("exp_avg" in self.optimizer.state.get(p, {}) for p in changing)
        if changing:
            walk = S.after_step(changing, pre["walk"], self.optimizer, pre["group_of"], device, self._scratch,
                                bool(adam_ok))
            upd_sq, dots, after_sq, adam = walk.upd_sq, walk.dots, walk.after_sq, walk.adam
            pre["before_sq"], post_sq = walk.before_sq, walk.post_sq
            pre["pre_sq"] = torch.stack([n.to(device) if n is not None else post_sq[i]
                                         for i, n in enumerate(pre["backward"])])
        else:
            upd_sq = dots = after_sq = post_sq = torch.zeros(0, dtype=F64, device=device)
            pre["before_sq"] = pre["pre_sq"] = post_sq
            adam = None
        pre["post_sq"] = post_sq
        out = _Vector()
        grad_norm = pre["pre_sq"].sum().sqrt()
        update_norm = upd_sq.sum().sqrt()
        if pre["grad_norm_known"]:
            out.add("grad_norm", grad_norm)
        elif self._vital_sq is not None:  # clipping just appeared: the vitals measured before it
            out.add("grad_norm", self._vital_sq.sqrt())
        out.add("grad_norm_clipped", pre["post_sq"].sum().sqrt())
        out.add("grad_nonfinite_tensors", (~torch.isfinite(pre["pre_sq"])).sum())
        out.add("param_norm", (after_sq.sum() + pre["still_sq"]).sqrt())
        out.add("update_norm", update_norm)
        out.add("update_ratio", update_norm / (pre["before_sq"].sum() + pre["still_sq"]).sqrt())
        # d = theta_before - theta_after points along -g for a descent step
        out.add("update_cosine", dots.sum() / (update_norm * pre["post_sq"].sum().sqrt()))
        if adam is not None:
            self._adam_global(out, adam, pre)
        else:
            self._generic_state(out, changing, device)
        groups = sorted(set(pre["group_index"]))
        if len(groups) > 1:
            self._per_group(out, groups, pre, upd_sq, dots, adam)
        if self.per_tensor:
            self._per_tensor(out, pre, upd_sq, after_sq, adam)
        for c in self.contributors:
            for name, value in (c.collect() if hasattr(c, "collect") else ()):
                if isinstance(name, list):
                    out.add_many(name, value.to(device))
                else:
                    out.add(name, value.to(device))
        return out.finish()

    def _adam_global(self, out: "_Vector", a: S.AdamSums, pre: dict) -> None:
        out.add("exp_avg_norm", a.m_sq.sum().sqrt())
        out.add("exp_avg_sq_norm", a.v_sq.sum().sqrt())
        out.add("update_rms", (a.u_sq.sum() / a.count.sum()).sqrt())
        out.add("update_bimodality", a.u_big.sum() / a.count.sum())
        out.add("eps_headroom", a.eps_headroom())
        out.add("bias_correction1", a.bc1[0])
        out.add("bias_correction2", a.bc2[0])
        if pre["vu"] is not None:
            out.add("v_underestimation", (pre["vu"][0].sum() / pre["vu"][1].sum()).sqrt())

    def _generic_state(self, out: "_Vector", changing: list, device) -> None:
        """Any other optimizer: the L2 norm of each floating-point state tensor kind it keeps."""
        keys: dict[str, list] = {}
        for p in changing:
            for k, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0 and k != "step":
                    keys.setdefault(k, []).append(v)
        for k, tensors in sorted(keys.items()):
            name = {"exp_avg": "exp_avg_norm", "exp_avg_sq": "exp_avg_sq_norm"}.get(k, f"state_norm/{_BAD.sub('_', k)}")
            out.add(name, S.sq_norms(tensors, device).sum().sqrt())

    def _per_group(self, out: "_Vector", groups: list[int], pre: dict, upd_sq, dots, a) -> None:
        idx = torch.tensor(pre["group_index"], device=pre["device"])
        n = max(groups) + 1

        def by_group(v):
            return torch.zeros(n, dtype=F64, device=v.device).index_add_(0, idx, v)

        g_pre, g_post, g_upd, g_dot, g_before = (by_group(v) for v in (
            pre["pre_sq"], pre["post_sq"], upd_sq, dots, pre["before_sq"]))
        if a is not None:
            g_m, g_v, g_u, g_big, g_cnt = (by_group(v) for v in (a.m_sq, a.v_sq, a.u_sq, a.u_big, a.count))
        if pre["vu"] is not None:
            g_vu, g_vc = by_group(pre["vu"][0]), by_group(pre["vu"][1])
        for gi in groups:
            sfx = f"/group/{gi}"
            if pre["grad_norm_known"]:
                out.add("grad_norm" + sfx, g_pre[gi].sqrt())
            out.add("update_ratio" + sfx, (g_upd[gi] / g_before[gi]).sqrt())
            out.add("update_cosine" + sfx, g_dot[gi] / (g_upd[gi] * g_post[gi]).sqrt())
            if a is not None:
                out.add("exp_avg_norm" + sfx, g_m[gi].sqrt())
                out.add("exp_avg_sq_norm" + sfx, g_v[gi].sqrt())
                out.add("update_rms" + sfx, (g_u[gi] / g_cnt[gi]).sqrt())
                out.add("update_bimodality" + sfx, g_big[gi] / g_cnt[gi])
                out.add("eps_headroom" + sfx, a.eps_headroom([i for i, g in enumerate(pre["group_index"]) if g == gi]))
            if pre["vu"] is not None and any(h for h, g in zip(pre["had_v"], pre["group_index"]) if g == gi):
                out.add("v_underestimation" + sfx, (g_vu[gi] / g_vc[gi]).sqrt())

    def _per_tensor(self, out: "_Vector", pre: dict, upd_sq, after_sq, a) -> None:
        names = [self._names[id(p)] for p in pre["changing"]]
        if pre["grad_norm_known"]:
            out.add_many([f"grad_norm/param/{n}" for n in names], pre["pre_sq"].sqrt())
        out.add_many([f"param_norm/param/{n}" for n in names], after_sq.sqrt())
        out.add_many([f"update_ratio/param/{n}" for n in names], (upd_sq / pre["before_sq"]).sqrt())
        if a is not None:
            out.add_many([f"update_rms/param/{n}" for n in names], (a.u_sq / a.count).sqrt())
            out.add_many([f"eps_headroom/param/{n}" for n in names], a.headroom)
        if pre["vu"] is not None:
            keep = [i for i, h in enumerate(pre["had_v"]) if h]
            vu = (pre["vu"][0] / pre["vu"][1]).sqrt()
            out.add_many([f"v_underestimation/param/{names[i]}" for i in keep], vu[keep])


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
    if closure is None or not type(optimizer).__module__.startswith("torch.optim.") \
            or isinstance(optimizer, torch.optim.LBFGS):
        return None
    with torch.enable_grad():
        result = closure()  # user code: its exceptions are the training loop's and propagate

    def cached():
        return result

    return (args, {**kwargs, "closure": cached}) if "closure" in kwargs else ((args[0], cached, *args[2:]), kwargs)


class _Vector:
    """Names and 0-d/1-d device tensors, concatenated once into the float64 vector the exporter reads."""

    def __init__(self):
        self.names: list[str] = []
        self.parts: list[torch.Tensor] = []

    def add(self, name: str, value: torch.Tensor) -> None:
        self.names.append(name)
        self.parts.append(value.to(F64).reshape(1))

    def add_many(self, names: list[str], values: torch.Tensor) -> None:
        self.names.extend(names)
        self.parts.append(values.to(F64).reshape(-1))

    def finish(self) -> tuple[tuple[str, ...], torch.Tensor]:
        device = self.parts[0].device if self.parts else torch.device("cpu")
        return tuple(self.names), torch.cat([p.to(device) for p in self.parts]) if self.parts else torch.zeros(0)
