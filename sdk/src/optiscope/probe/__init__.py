"""What is measured inside training. The optimizer and activation probes import torch; importing
this package does not, so that ``probe.environment`` can run inside ``init()`` in a process that
never imports torch."""

from __future__ import annotations

__all__ = ["OptimizerProbe"]


def __getattr__(name: str):
    # PEP 562: OptimizerProbe (and torch with it) is imported on first use, not with the package.
    if name == "OptimizerProbe":
        from .optimizer import OptimizerProbe

        return OptimizerProbe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
