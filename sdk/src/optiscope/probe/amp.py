"""Mixed precision: the loss scale and the steps ``torch.amp.GradScaler`` skipped.

A skipped step never calls ``optimizer.step()``, so the optimizer hooks cannot see it; counting
``scaler.update()`` calls (one per iteration, skipped or not) against real optimizer steps can.
The scale is read from the scaler's own device tensor, copied at the step it applied to, and
read on the exporter thread: ``scaler.get_scale()`` would be a host sync.

Backward leaves scaled gradients; ``scaler.unscale_`` (called by the user before clipping, or by
``scaler.step``) divides them in place. The gradients are measured again right after it, so
``grad_norm`` is the norm of the true gradients, before any clipping.
"""

from __future__ import annotations

from .contributor import ContributorBase, HostValue


class ScalerProbe(ContributorBase):
    """A ``Contributor`` of every step's loss scale and skipped-step count (no sampled series)."""

    def __init__(self, scaler, optimizer_probe):
        self.scaler = scaler
        self.probe = optimizer_probe
        self.updates = 0
        self._original = scaler.update
        self._unscale = scaler.unscale_

        def update(*args, **kwargs):
            self.updates += 1
            return self._original(*args, **kwargs)

        def unscale_(optimizer):
            result = self._unscale(optimizer)
            if optimizer is self.probe.optimizer:
                self.probe.record_gradients()
            return result

        # this scaler instance only; close() puts the methods back
        scaler.update = update
        scaler.unscale_ = unscale_

    def close(self) -> None:
        for name in ("update", "unscale_"):
            if self.scaler.__dict__.get(name) is not None:
                delattr(self.scaler, name)

    def host_values(self) -> dict[str, HostValue]:
        """Called from the optimizer's post-step hook, before this iteration's scaler.update()."""
        out: dict[str, HostValue] = {"skipped_steps": float(self.updates + 1 - self.probe.steps)}
        scale = getattr(self.scaler, "_scale", None)
        if scale is not None and getattr(self.scaler, "is_enabled", lambda: True)():
            out["loss_scale"] = scale.detach().clone()  # device copy, no sync
        return out
