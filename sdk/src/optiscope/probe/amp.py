"""Mixed precision: the loss scale and the steps ``torch.amp.GradScaler`` skipped.

A skipped step never calls ``optimizer.step()``, so the optimizer hooks cannot see it; counting
``scaler.update()`` calls (one per iteration, skipped or not) against real optimizer steps can.
The scale is read from the scaler's own device tensor, copied at the step it applied to, and
read on the exporter thread: ``scaler.get_scale()`` would be a host sync.
"""
from __future__ import annotations


class ScalerProbe:
    def __init__(self, scaler, optimizer_probe):
        self.scaler = scaler
        self.probe = optimizer_probe
        self.updates = 0
        self._original = scaler.update

        def update(*args, **kwargs):
            self.updates += 1
            return self._original(*args, **kwargs)

        scaler.update = update  # this scaler instance only; close() puts the method back

    def close(self) -> None:
        if self.scaler.__dict__.get("update") is not None:
            del self.scaler.update

    def host_values(self) -> dict:
        """Called from the optimizer's post-step hook, before this iteration's scaler.update()."""
        out = {"skipped_steps": float(self.updates + 1 - self.probe.steps)}
        scale = getattr(self.scaler, "_scale", None)
        if scale is not None and getattr(self.scaler, "is_enabled", lambda: True)():
            out["loss_scale"] = scale.detach().clone()  # device copy, no sync
        return out
