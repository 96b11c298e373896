"""What every framework callback shares: the run it is given or creates, and the guard that keeps
any error of ours out of training."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import optiscope

log = logging.getLogger("optiscope")


class RunOwner:
    """``run``: an existing ``optiscope.Run`` (left open at the end), or None to create one with
    ``optiscope.init(**init_kwargs)`` when training starts and end it when training ends.
    ``every``: the probe's sampling period; None keeps the SDK default."""

    framework = "framework"

    def __init__(self, run: optiscope.Run | None = None, every: int | None = None, **init_kwargs: Any):
        self.run = run
        self.every = every
        self.init_kwargs = init_kwargs
        self._owned = False  # whether this callback created self.run, so ends it
        self._done = False  # ... and has ended it: a later fit gets a new run
        self._warned = False

    def _safely(self, fn: Callable, *args) -> None:
        # An observability callback must never be the reason training dies.
        try:
            fn(*args)
        except Exception:
            if not self._warned:
                self._warned = True
                log.warning("optiscope: %s callback failed; training continues", self.framework, exc_info=True)

    def _start_run(self, default_config: Callable[[], dict | None]) -> optiscope.Run:
        if self.run is None or self._done:
            kwargs = dict(self.init_kwargs)
            if kwargs.get("config") is None:
                kwargs["config"] = default_config()
            self.run, self._owned, self._done = optiscope.init(**kwargs), True, False
        return self.run

    def _watch_kwargs(self) -> dict:
        return {} if self.every is None else {"every": self.every}

    def _end_run(self, status: str = "finished") -> None:
        if self._owned and not self._done and self.run is not None:
            self._done = True
            self.run.finish(status=status)
