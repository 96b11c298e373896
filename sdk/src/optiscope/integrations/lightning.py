"""PyTorch Lightning: ``Trainer(callbacks=[OptiscopeCallback(project="p")])``.

Importing this module imports Lightning; ``import optiscope`` never does.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

import optiscope

log = logging.getLogger("optiscope")


class OptiscopeCallback(Callback):
    """Watch every optimizer of the fit and log the training loss at each optimizer step.

    ``run``: an existing ``optiscope.Run`` (left open at the end), or None to create one with
    ``optiscope.init(**init_kwargs)`` at fit start (finished at fit end, ``crashed`` on an
    exception). ``every``: the probe's sampling period; None keeps the SDK default.
    """

    def __init__(self, run: optiscope.Run | None = None, every: int | None = None, **init_kwargs: Any):
        self.run = run
        self.every = every
        self.init_kwargs = init_kwargs
        self._owned = False  # whether this callback created self.run, so ends it
        self._done = False  # ... and has ended it: a later fit gets a new run
        self._loss_sum = None
        self._last_global_step = 0
        self._warned = False

    def _safely(self, fn, *args) -> None:
        # An observability callback must never be the reason a fit dies.
        try:
            fn(*args)
        except Exception:
            if not self._warned:
                self._warned = True
                log.warning("optiscope: Lightning callback failed; training continues", exc_info=True)

    # -- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:  # one run per job, not one per DDP process
            self._safely(self._start, trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.run is not None and trainer.is_global_zero:
            self._safely(self._log_loss, trainer, outputs)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._safely(self._end, "finished")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._safely(self._end, "crashed")

    # -- work --------------------------------------------------------------------------------
    def _start(self, trainer, pl_module) -> None:
        if self.run is None or self._done:
            kwargs = dict(self.init_kwargs)
            if kwargs.get("config") is None and getattr(pl_module, "hparams", None):
                kwargs["config"] = dict(pl_module.hparams)
            self.run, self._owned, self._done = optiscope.init(**kwargs), True, False
        self._last_global_step, self._loss_sum = trainer.global_step, None
        every = {} if self.every is None else {"every": self.every}
        # The raw torch optimizers, not LightningOptimizer wrappers. Lightning steps them with a
        # closure (forward and backward inside step()); the probe runs it before measuring.
        for opt in trainer.optimizers:
            self.run.watch(opt, pl_module, **every)

    def _log_loss(self, trainer, outputs) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # manual optimization may return nothing
        # Lightning divides the loss of each micro-batch by accumulate_grad_batches, so their sum
        # over one optimizer step is the step's mean loss; log it once, when the step happened.
        # No .item(): run.log reads tensors on its exporter thread.
        loss = loss.detach()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        if trainer.global_step != self._last_global_step:
            self._last_global_step = trainer.global_step
            self.run.log({"loss": self._loss_sum})  # step=None: the last optimizer step's index
            self._loss_sum = None

    def _end(self, status: str) -> None:
        if self._owned and not self._done:
            self._done = True
            self.run.finish(status=status)
