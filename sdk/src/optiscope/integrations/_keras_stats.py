"""Keras 3 Adam statistics for the Keras callback (``keras.py``): the weight and moment snapshots
of a sampled step and the series computed from them. Kept apart from the callback, which is about
when work may run without stalling Keras; this is about what is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import torch

from optiscope.probe.stats import sq_norms


def _sq_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor squared L2 norms, float32 per tensor and float64 across, as the torch probe."""
    return sq_norms(list(tensors), tensors[0].device if tensors else torch.device("cpu"))


def _hyper(x: Any) -> Any:
    """A Keras optimizer hyperparameter: a number, a 0-d tensor, or a callable returning one."""
    if callable(x) and not isinstance(x, torch.Tensor):
        x = x()
    if isinstance(x, keras.Variable):
        x = x.value
    return x


#: Keras Adam's state of one variable: (momentum, velocity, velocity_hat or None), Keras variables.
Slots = tuple[Any, Any, Any]


class KerasStatistics:
    """Mixed into the callback, which provides what is declared here: ``model``, ``_inner`` (the
    Keras optimizer that owns the state), ``_adam_off`` and ``_warn``."""

    model: Any
    _adam_off: bool

    @property
    def _inner(self) -> Any:
        raise NotImplementedError

    def _warn(self, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        raise NotImplementedError

    # -- statistics ---------------------------------------------------------------------------
    def _adam_slots(self, variables: list[Any]) -> list[Slots | None]:
        """Keras Adam's per-variable state: (momentum, velocity, velocity_hat or None) for each
        variable that has Adam state, None for a variable without (overwrite_with_gradient).

        Keras 3 keeps them in the lists ``_momentums`` / ``_velocities`` (``_velocity_hats`` with
        amsgrad) indexed by ``_get_variable_index``; if that layout is absent (another Keras
        version), they are found by name, ``<variable path with / as _>_momentum`` (``_velocity``,
        ``_velocity_hat``), as ``add_variable_from_reference`` names them.
        Raises when neither works: the caller then reports the generic series only."""
        opt = self._inner
        slots = _slots_from_lists(opt, variables)
        return slots if slots is not None else _slots_by_name(opt, variables)

    def _snapshot(self, step: int) -> dict[str, Any] | None:
        variables = list(self.model.trainable_weights)
        if not variables:
            return None
        params = [v.value.detach() for v in variables]
        snap: dict[str, Any] = {
            "step": step,
            "variables": variables,
            "before_sq": _sq_norms(params).sum(),
            # One fused copy of the parameters (the exact reference for the update, rounding included).
            "before": list(torch._foreach_mul(params, 1.0)),
            "adam": None,
        }
        opt = self._inner
        if isinstance(opt, keras.optimizers.Adam) and not self._adam_off and getattr(opt, "built", False):
            try:
                kept = [(i, s) for i, s in enumerate(self._adam_slots(variables)) if s is not None]
                if kept:
                    snap["adam"] = {
                        "slots": [s for _, s in kept],
                        "index": [i for i, _ in kept],
                        "m_prev": list(torch._foreach_mul([s[0].value.detach() for _, s in kept], 1.0)),
                    }
            except Exception:
                self._adam_off = True
                self._warn(
                    "adam_state",
                    "cannot find Keras Adam's moments; only the generic statistics are recorded",
                    exc_info=True,
                )
        return snap

    def _statistics(self, snap: dict[str, Any] | None) -> dict[str, torch.Tensor]:
        if snap is None:
            return {}
        variables = snap["variables"]
        after = [v.value.detach() for v in variables]
        diff = snap["before"]
        torch._foreach_sub_(diff, after)  # theta_before - theta_after, in place on the copy
        update_norm = _sq_norms(diff).sum().sqrt()
        out = {
            "param_norm": _sq_norms(after).sum().sqrt(),
            "update_norm": update_norm,
            "update_ratio": update_norm / snap["before_sq"].sqrt(),
        }
        if snap["adam"] is not None and not self._adam_off:
            try:
                # Keras's torch train_step clears .grad (set to None) before each backward, so until
                # the next batch a variable without .grad got no gradient in this step: Keras left
                # its moments untouched and it did not take part in the step (as the torch probe
                # counts only parameters with a gradient). When no variable has .grad (a custom
                # train_step that never sets it), all are kept.
                seen = [getattr(v.value, "grad", None) is not None for v in variables]
                out.update(self._adam_statistics(snap["adam"], snap["step"], seen if any(seen) else None))
            except Exception:
                self._adam_off = True
                self._warn(
                    "adam_stats",
                    "Adam statistics disabled after an error; the generic statistics are still recorded",
                    exc_info=True,
                )
        return out

    def _adam_statistics(self, adam: dict[str, Any], step: int, seen: list[bool] | None) -> dict[str, torch.Tensor]:
        """Adam's series from its state after the step and the first moments before it.

        grad_norm: Keras callbacks are not handed the gradients, but Adam's first moment is an exact
        linear function of them: m_t = beta1 * m_{t-1} + (1 - beta1) * g, hence
        g = (m_t - beta1 * m_{t-1}) / (1 - beta1). Keras's torch Adam computes m_t as
        fl(fl(beta1 * m_{t-1}) + (1 - beta1) * g) in float32; fl(beta1 * m_{t-1}) is recomputed here
        with the same float32 operation, so the recovered g carries only the rounding of m_t
        (relative error about 2**-24 * |m_t| / ((1 - beta1) |g|)). This g is the gradient Adam stepped
        with: after gradient accumulation (the mean of the micro-batches), after loss-scale
        unscaling, and after clipping when ``clipnorm``, ``global_clipnorm`` or ``clipvalue`` is set.
        The catalog's ``grad_norm`` is the norm before clipping, so with a clipping option the value is
        reported as ``grad_norm_clipped`` only (it is always reported under that name, which equals
        grad_norm when nothing clips). Variables that got no gradient in the step are left out.

        update_rms: Keras's Adam puts epsilon outside the bias correction:
            var -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps),  t = step + 1
        so u is that update divided by lr: u = sqrt(bc2) / bc1 * m / (sqrt(v) + eps) (v the
        velocity_hat with amsgrad). torch.optim.Adam computes (m / bc1) / (sqrt(v / bc2) + eps), i.e.
        the same with eps * sqrt(bc2) in place of eps: Keras's epsilon weighs 1 / sqrt(bc2) times
        more (about 31.6x at t = 1, fading as bc2 -> 1). AdamW's decoupled decay is not part of u, as
        in the torch probe; update_norm includes it (it is the change that really happened).
        """
        opt = self._inner
        beta1, beta2, eps = _hyper(opt.beta_1), _hyper(opt.beta_2), _hyper(opt.epsilon)
        t = step + 1  # Keras's local_step: the optimizer's iteration count before the update, plus one
        keep = [j for j, i in enumerate(adam["index"]) if seen is None or seen[i]]
        if not keep:
            return {}
        slots = [adam["slots"][j] for j in keep]
        m_prev = [adam["m_prev"][j] for j in keep]
        m = [s[0].value.detach() for s in slots]
        v = [s[1].value.detach() for s in slots]
        den_src = [s[2].value.detach() for s in slots] if slots[0][2] is not None else v
        # grad: m_prev <- beta1 * m_prev - m_t = -(1 - beta1) g, in place on the snapshot
        torch._foreach_mul_(m_prev, beta1)
        torch._foreach_sub_(m_prev, m)
        grad_norm = _sq_norms(m_prev).sum().sqrt() / abs(1 - beta1)
        # u' = m / (sqrt(v) + eps), then u = u' * sqrt(bc2) / bc1
        den = torch._foreach_sqrt(den_src)
        torch._foreach_add_(den, eps)
        for mi, di in zip(m, den):
            torch.div(mi, di, out=di)
        # Python floats when the betas are (the usual case): no host-to-device copy; else device math.
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        count = sum(x.numel() for x in m)
        u_sq = _sq_norms(den).sum() * bc2 / bc1**2
        out = {
            "grad_norm_clipped": grad_norm,
            "exp_avg_norm": _sq_norms(m).sum().sqrt(),
            "exp_avg_sq_norm": _sq_norms(v).sum().sqrt(),
            "update_rms": (u_sq / count).sqrt(),
        }
        if not any(getattr(opt, k, None) for k in ("clipnorm", "global_clipnorm", "clipvalue")):
            out["grad_norm"] = grad_norm
        return out


def _slots_from_lists(opt: Any, variables: list[Any]) -> list[Slots | None] | None:
    """Adam's state through Keras 3's lists; None when this optimizer does not have them."""
    amsgrad = bool(getattr(opt, "amsgrad", False))
    moms, vels = getattr(opt, "_momentums", None), getattr(opt, "_velocities", None)
    hats = getattr(opt, "_velocity_hats", None) if amsgrad else None
    if moms is None or vels is None or not hasattr(opt, "_get_variable_index") or (amsgrad and hats is None):
        return None
    out: list[Slots | None] = []
    for v in variables:
        i = opt._get_variable_index(v)
        m, s = moms[i], vels[i]
        out.append(None if m is None or s is None else (m, s, hats[i] if hats is not None else None))
    return out


def _slots_by_name(opt: Any, variables: list[Any]) -> list[Slots | None]:
    """Adam's state by the names Keras gives optimizer variables (the path without the scope)."""
    amsgrad = bool(getattr(opt, "amsgrad", False))
    by_name = {ov.name: ov for ov in opt.variables}
    out: list[Slots | None] = []
    for v in variables:
        key = v.path.replace("/", "_")
        m, s = by_name.get(f"{key}_momentum"), by_name.get(f"{key}_velocity")
        h = by_name.get(f"{key}_velocity_hat") if amsgrad else None
        if m is None and s is None and h is None:
            out.append(None)  # no Adam state for this variable (overwrite_with_gradient)
        elif m is None or s is None or (amsgrad and h is None):
            raise LookupError(f"incomplete Adam state for variable {v.path!r}")
        else:
            out.append((m, s, h))
    if not any(out):
        raise LookupError("no Adam state found by name")
    return out
