"""Keras 3 integration (torch backend): ``model.fit(..., callbacks=[OptiscopeCallback(project="p")])``.

Set ``KERAS_BACKEND=torch`` before ``import keras``. Keras optimizers are not ``torch.optim``
optimizers, so the torch probe does not apply: this callback computes the canonical series itself
from Keras's variables (under the torch backend ``variable.value`` is a torch tensor), keeps every
value on the device as a 0-d tensor and hands it to ``run.log``; the exporter thread reads it.

What is logged, at ``step`` = the optimizer's iteration count before the batch (the 0-based index
of the optimizer step, as the torch probe numbers it):

- every step: ``loss`` (the batch's own loss, see ``_LossCapture``) and ``lr`` (the learning rate
  the optimizer applies at that step, schedule included);
- one optimizer step in ``every`` (``step % every == 0``): ``param_norm``, ``update_norm``,
  ``update_ratio``, and for Adam and AdamW also ``exp_avg_norm``, ``exp_avg_sq_norm``,
  ``grad_norm_clipped``, ``grad_norm`` (when no clipping option is set) and ``update_rms``.
  Other optimizers get the generic series only.

How the work is scheduled. The callback implements no ``on_*_batch_end`` hook, on purpose: Keras 3
dispatches batch-end callbacks to a worker thread only when every callback in the list leaves
``on_train_batch_end`` alone; one that overrides it makes Keras run all of them on the training
thread, where ``pythonify_logs`` calls ``float()`` on every metric tensor: a host sync per step
that this callback would have caused. So the end of batch k is handled at the beginning of batch
k + 1 (nothing runs between the two but data loading), and the last batch of an epoch at
``on_test_begin`` (validation), ``on_epoch_end`` or ``on_train_end``, whichever comes first.

Host reads. No tensor is read on the training thread per step, with one exception that Keras
already pays for: under a ``LossScaleOptimizer`` (mixed precision) the iteration count is read at
each batch, because that optimizer skips steps whose gradients are not finite and only the count
tells which; its own ``ops.cond`` already synchronises every step on the torch backend. Otherwise
the count is read once at train begin and then counted on the host (one optimizer step per batch,
or one per ``gradient_accumulation_steps`` batches), and checked once per epoch at
``on_epoch_end``, where Keras has just synchronised to read the epoch's metrics.

Nothing here raises into training: an error is logged once (logger ``optiscope``) and the part of
the statistics that failed is switched off; the rest of the run goes on. Keras has no exception hook
for callbacks: when ``fit`` raises and nothing catches it, the SDK marks the run ``crashed`` at
interpreter exit; a caller that catches the error can use the run as a context manager instead:
``with optiscope.init(...) as run: model.fit(..., callbacks=[OptiscopeCallback(run)])``.
Under ``torch.distributed``, only rank 0 records (one run per job).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import keras
import torch

import optiscope
from optiscope.run import DEFAULT_EVERY, Run

from ._keras_stats import KerasStatistics

log = logging.getLogger("optiscope")

F64 = torch.float64

__all__ = ["OptiscopeCallback"]


def _read_int(variable) -> int:
    """HOST READ (training thread): only where the module docstring says so."""
    value = variable.value if hasattr(variable, "value") else variable
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def _is_lso(optimizer) -> bool:
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def _accumulation(optimizer) -> int:
    """Batches per optimizer update (``gradient_accumulation_steps``, 1 when unset)."""
    return int(getattr(optimizer, "gradient_accumulation_steps", None) or 1)


def _learning_rate(optimizer):
    """The learning rate the optimizer applies in the coming update, as a device 0-d tensor.

    ``optimizer.learning_rate`` evaluates a schedule at the optimizer's current iteration (the
    one ``apply`` will use) on the device; a constant learning rate is a variable that callbacks
    may assign in place later, so it is copied (4 bytes, on the device)."""
    lr = optimizer.learning_rate
    if isinstance(lr, keras.Variable):
        lr = lr.value
    if isinstance(lr, torch.Tensor):
        return lr.detach().clone()
    return lr


class _LossCapture:
    """The loss of one batch, exactly as the train step computed it.

    In Keras 3, ``logs["loss"]`` at the end of a batch is the loss tracker's running mean over the
    epoch so far, not the batch's loss. Every train step feeds the batch's loss to that tracker
    (``model._loss_tracker.update_state(loss, sample_weight=batch_size)`` in the built-in
    ``train_step``; custom train steps update the same object through ``model.metrics``), so this
    wraps the tracker's ``update_state`` on the instance for the duration of ``fit`` and keeps the
    first value it receives after the callback armed it at the batch's beginning (a detached
    device tensor: no copy, no sync), then passes the call through unchanged. This is exact (it
    is the very tensor Keras backpropagates, before loss scaling, regularisation losses included),
    works with ``jit_compile=True`` and with batches of any size.

    Rejected alternative: recovering the batch loss from the tracker's float32 ``total``/``count``
    (``(total_k - total_{k-1}) / batch_size``) loses about ``k * 2**-24`` relative precision at
    the k-th batch of an epoch, since ``total`` grows with the epoch while the batch's share does not.

    Limits: a custom ``train_step`` that never updates the loss tracker yields no ``loss`` series
    (warned once; log it yourself with ``run.log``). Under ``gradient_accumulation_steps = N`` the
    loss of an optimizer step is the mean of its N micro-batch losses, as its gradient is the mean
    of theirs.
    """

    def __init__(self, tracker):
        self.tracker = tracker
        self.original = tracker.update_state
        self.armed = False
        self.value: torch.Tensor | None = None
        self.active = True
        tracker.update_state = self  # instance attribute: shadows the class's method

    def __call__(self, *args, **kwargs):
        if self.active and self.armed and args:
            values = args[0]
            if isinstance(values, torch.Tensor):
                self.value = values.detach()
            self.armed = False
        return self.original(*args, **kwargs)

    def arm(self) -> None:
        self.value, self.armed = None, True

    def take(self) -> torch.Tensor | None:
        value, self.value, self.armed = self.value, None, False
        return value

    def remove(self) -> None:
        self.active = False  # harmless even if something wrapped the tracker again after us
        if self.tracker.__dict__.get("update_state") is self:
            del self.tracker.__dict__["update_state"]


@dataclass
class _Pending:
    """One batch between its beginning and the point where its end is handled."""

    raw: int  # the optimizer's raw iteration count before the batch
    step: int  # optimizer step index (raw // accumulation steps)
    update: bool  # this batch applies an optimizer update (always, without accumulation)
    lr: Any = None  # device 0-d tensor or host number, read at the batch's beginning
    snap: dict | None = None  # sampled steps: the state before the step


class OptiscopeCallback(KerasStatistics, keras.callbacks.Callback):
    """Streams a Keras 3 (torch backend) training run's loss and optimizer statistics to optiscope.

    ``run``: an existing ``optiscope.Run``; if None, ``optiscope.init(**init_kwargs)`` creates one
    at train begin and the callback finishes it at train end. A run that was given is left open.
    ``every``: full statistics on one optimizer step in ``every`` (``step % every == 0``).
    """

    def __init__(self, run: Run | None = None, every: int = DEFAULT_EVERY, **init_kwargs):
        super().__init__()
        if run is not None and init_kwargs:
            raise TypeError(
                f"OptiscopeCallback: pass either run or optiscope.init() arguments, not both "
                f"(got run and {sorted(init_kwargs)})"
            )
        self.run = run
        self.every = max(1, int(every))
        self._init_kwargs = init_kwargs
        self._owns_run = False
        self._warned: set[str] = set()
        self._enabled = keras.backend.backend() == "torch"
        if not self._enabled:
            self._warn(
                "backend",
                "OptiscopeCallback needs the torch backend (KERAS_BACKEND=torch set "
                "before importing keras); Keras uses %r: nothing is recorded",
                keras.backend.backend(),
            )
        self._reset()

    def _reset(self) -> None:
        self._capture: _LossCapture | None = None
        self._pending: _Pending | None = None
        self._raw: int | None = None  # host count of the optimizer's raw iterations
        self._batches = 0  # batches seen, numbering the loss when the optimizer cannot be read
        self._acc_loss: list[torch.Tensor] = []
        self._stats_off = False
        self._adam_off = False

    def _warn(self, key: str, msg: str, *args, exc_info: bool = False) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("optiscope: " + msg, *args, exc_info=exc_info)

    # -- the optimizer ------------------------------------------------------------------------
    @property
    def _optimizer(self):
        return getattr(self.model, "optimizer", None)

    @property
    def _inner(self):
        """The optimizer that owns the state (inside a LossScaleOptimizer, its inner optimizer)."""
        opt = self._optimizer
        return opt.inner_optimizer if _is_lso(opt) else opt

    def _read_raw(self) -> int:
        return _read_int(self._inner._iterations)

    def _lr(self):
        """The learning rate of the coming update (``_learning_rate``), read at the batch's beginning."""
        return _learning_rate(self._inner)

    # -- Keras hooks --------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        if not self._enabled:
            return
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_rank() != 0
        ):
            self._enabled = False  # one run per job: rank 0 records
            return
        self._reset()
        if self.run is None or self._owns_run:
            try:
                self.run = optiscope.init(**self._init_kwargs)
                self._owns_run = True
            except Exception:  # as in the other integrations: never the reason a fit dies
                self.run, self._owns_run = None, False
                self._warn("init", "optiscope.init() failed; this fit is not recorded", exc_info=True)
                return
        try:
            tracker = getattr(self.model, "_loss_tracker", None)
            if tracker is not None and hasattr(tracker, "update_state"):
                self._capture = _LossCapture(tracker)
            else:
                self._warn("no_tracker", "this Keras model has no loss tracker; the loss is not recorded")
        except Exception:
            self._warn("capture", "could not attach to the loss tracker; the loss is not recorded", exc_info=True)
        try:
            if self._inner is None:
                raise RuntimeError("the model has no optimizer")
            # HOST READ, once per fit(): where the optimizer's step count starts (0 unless resumed).
            self._raw = self._read_raw()
        except Exception:
            self._warn("optimizer", "cannot read the Keras optimizer; only the loss is recorded", exc_info=True)
            self._raw = None

    def on_train_batch_begin(self, batch, logs=None):
        if not self._enabled or self.run is None:
            return
        raw_now = None
        if self._raw is not None and _is_lso(self._optimizer):
            try:
                raw_now = self._read_raw()  # HOST READ: LossScaleOptimizer only (module docstring)
            except Exception:
                self._warn("lso", "cannot read the optimizer's step count", exc_info=True)
        self._finish_pending(raw_now)
        try:
            self._begin(raw_now)
        except Exception:
            self._pending = None
            self._warn("begin", "per-step bookkeeping failed; this step is not recorded", exc_info=True)

    def on_test_begin(self, logs=None):
        # Validation inside fit() starts after the epoch's last batch: handle that batch first.
        self._boundary()

    def on_epoch_end(self, epoch, logs=None):
        self._boundary()
        if not self._enabled or self._raw is None or _is_lso(self._optimizer):
            return
        try:
            # HOST READ, once per epoch, after Keras has synchronised to read the epoch's metrics:
            # catches a custom train_step that does not step the optimizer exactly once per batch.
            actual = self._read_raw()
            if actual != self._raw:
                self._warn(
                    "count",
                    "the optimizer's step count is %d where the batches seen make it %d (a "
                    "custom train_step that does not step once per batch?); step numbers "
                    "are re-synchronised at each epoch end",
                    actual,
                    self._raw,
                )
                self._raw = actual
        except Exception:
            self._warn("count_read", "cannot read the optimizer's step count", exc_info=True)

    def on_train_end(self, logs=None):
        if not self._enabled:
            return
        self._boundary()
        if self._capture is not None:
            try:
                self._capture.remove()
            except Exception:
                self._warn("capture_remove", "could not detach from the loss tracker", exc_info=True)
            self._capture = None
        if self._owns_run and self.run is not None:
            self.run.finish()

    def _boundary(self) -> None:
        """Handle the pending batch where no further batch begins (epoch end, validation, train end)."""
        if not self._enabled or self._pending is None:
            return
        raw_now = None
        if _is_lso(self._optimizer):
            try:
                raw_now = self._read_raw()  # HOST READ: LossScaleOptimizer only
            except Exception:
                self._warn("lso", "cannot read the optimizer's step count", exc_info=True)
        self._finish_pending(raw_now)

    # -- one batch ----------------------------------------------------------------------------
    def _begin(self, raw_now: int | None) -> None:
        if self._capture is not None:
            self._capture.arm()
        if self._raw is None:  # optimizer unreadable: the loss alone, numbered by batch
            self._pending = _Pending(raw=-1, step=self._batches, update=True)
            self._batches += 1
            return
        raw = raw_now if raw_now is not None else self._raw
        n = _accumulation(self._inner)
        p = _Pending(raw=raw, step=raw // n, update=(raw + 1) % n == 0)
        if p.update:
            try:
                p.lr = self._lr()
            except Exception:
                self._warn("lr", "cannot read the learning rate; lr is not recorded", exc_info=True)
            if p.step % self.every == 0 and not self._stats_off:
                try:
                    with torch.no_grad():
                        p.snap = self._snapshot(p.step)
                except Exception:
                    self._stats_off = True
                    self._warn(
                        "snapshot",
                        "optimizer statistics disabled after an error; loss and lr are still recorded",
                        exc_info=True,
                    )
        self._pending = p
        self._raw = raw + 1

    def _finish_pending(self, raw_now: int | None) -> None:
        p, self._pending = self._pending, None
        if p is None:
            return
        try:
            loss = self._capture.take() if self._capture is not None else None
            if loss is not None:
                self._acc_loss.append(loss)
            elif self._capture is not None:
                self._warn(
                    "no_loss",
                    "no loss reached the loss tracker during a train step (a custom "
                    "train_step?); the loss is not recorded for such steps",
                )
            if not p.update:
                return  # a gradient-accumulation micro-batch: its loss waits for the update
            # A LossScaleOptimizer skipped the step when its count did not move: not an optimizer
            # step, so no statistics; the loss is still logged at the index the step would have had
            # (a later successful step replaces it), so a non-finite loss is never hidden.
            skipped = raw_now is not None and raw_now == p.raw
            values: dict[str, Any] = {}
            if self._acc_loss:
                losses, self._acc_loss = self._acc_loss, []
                values["loss"] = (
                    losses[0] if len(losses) == 1 else torch.stack([x.reshape(()).to(F64) for x in losses]).mean()
                )
            if p.lr is not None:
                values["lr"] = p.lr
            if p.snap is not None and not skipped and not self._stats_off:
                try:
                    with torch.no_grad():
                        values.update(self._statistics(p.snap))
                except Exception:
                    self._stats_off = True
                    self._warn(
                        "stats",
                        "optimizer statistics disabled after an error; loss and lr are still recorded",
                        exc_info=True,
                    )
            if values and self.run is not None:  # a batch is pending only while a run records
                self.run.log(values, step=p.step)
        except Exception:
            self._acc_loss = []
            self._warn("finish", "could not record a step", exc_info=True)
