"""Hugging Face transformers: ``Trainer(..., callbacks=[OptiscopeCallback(project="p")])``.

Importing this module imports transformers; ``import optiscope`` never does.
"""

from __future__ import annotations

import json

import torch
from transformers import TrainerCallback

from ._base import RunOwner


class OptiscopeCallback(RunOwner, TrainerCallback):
    """Watch the Trainer's optimizer and log the loss the Trainer reports.

    ``run``: an existing ``optiscope.Run`` (left open at the end), or None to create one with
    ``optiscope.init(**init_kwargs)`` at train begin (config: the TrainingArguments) and finish
    it at train end. ``every``: the probe's sampling period; None keeps the SDK default.
    """

    framework = "transformers"

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.is_world_process_zero:  # one run per job, not one per process
            self._safely(self._start, args, model, optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is not None and state.is_world_process_zero and logs and "loss" in logs:
            self._safely(self._log, state, logs)

    def on_train_end(self, args, state, control, **kwargs):
        self._safely(self._end_run, "finished")

    def _start(self, args, model, optimizer) -> None:
        run = self._start_run(lambda: {k: v for k, v in args.to_dict().items() if _jsonable(v)})
        # accelerate's AcceleratedOptimizer is itself a torch.optim.Optimizer subclass whose step
        # forwards to .optimizer without running its own hooks: attach to the innermost one.
        for _ in range(8):
            inner = getattr(optimizer, "optimizer", None)
            if not isinstance(inner, torch.optim.Optimizer):
                break
            optimizer = inner
        run.watch(optimizer, model, **self._watch_kwargs())

    def _log(self, state, logs: dict) -> None:
        if self.run is None:  # on_log checks it: the type checker cannot see that
            return
        # The Trainer logs after global_step += 1, so the step just taken is global_step - 1: the
        # probe's index for it. "loss" is the mean over the last logging_steps steps.
        values = {"loss": logs["loss"]}
        if "grad_norm" in logs:
            # Not the probe's grad_norm: the Trainer's own figure (pre-clip here, but per backend,
            # e.g. DeepSpeed's), kept under its own name so neither overwrites the other.
            values["hf_grad_norm"] = logs["grad_norm"]
        self.run.log(values, step=state.global_step - 1)


def _jsonable(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False
