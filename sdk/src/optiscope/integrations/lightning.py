"""PyTorch Lightning: ``Trainer(callbacks=[OptiscopeCallback(project="p")])``.

Importing this module imports Lightning; ``import optiscope`` never does.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

import optiscope

from ._base import RunOwner


class OptiscopeCallback(RunOwner, Callback):
    """Watch every optimizer of the fit and log the training loss at each optimizer step.

    ``run``: an existing ``optiscope.Run`` (left open at the end), or None to create one with
    ``optiscope.init(**init_kwargs)`` at fit start (config: the module's hparams; finished at fit
    end, ``crashed`` on an exception). ``every``: the probe's sampling period; None keeps the SDK
    default.
    """

    framework = "Lightning"

    def __init__(self, run: optiscope.Run | None = None, every: int | None = None, **init_kwargs: Any):
        super().__init__(run, every, **init_kwargs)
        self._loss_sum: torch.Tensor | None = None
        self._last_global_step = 0

    # -- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:  # one run per job, not one per DDP process
            self._safely(self._start, trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.run is not None and trainer.is_global_zero:
            self._safely(self._log_loss, trainer, outputs)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._safely(self._end_run, "finished")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._safely(self._end_run, "crashed")

    # -- work --------------------------------------------------------------------------------
    def _start(self, trainer, pl_module) -> None:
        run = self._start_run(lambda: dict(pl_module.hparams) if getattr(pl_module, "hparams", None) else None)
        self._last_global_step, self._loss_sum = trainer.global_step, None
        # The raw torch optimizers, not LightningOptimizer wrappers. Lightning steps them with a
        # closure (forward and backward inside step()); the probe runs it before measuring.
        for opt in trainer.optimizers:
            run.watch(opt, pl_module, **self._watch_kwargs())

    def _log_loss(self, trainer, outputs) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or self.run is None:
            return  # manual optimization may return nothing (and the hook checks the run)
        # Lightning divides the loss of each micro-batch by accumulate_grad_batches, so their sum
        # over one optimizer step is the step's mean loss; log it once, when the step happened.
        # No .item(): run.log reads tensors on its exporter thread.
        loss = loss.detach()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        if trainer.global_step != self._last_global_step:
            self._last_global_step = trainer.global_step
            self.run.log({"loss": self._loss_sum})  # step=None: the last optimizer step's index
            self._loss_sum = None
