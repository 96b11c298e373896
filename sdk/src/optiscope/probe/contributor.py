"""What another probe (activation headroom, the GradScaler's loss scale) hands the optimizer probe:
values that join the records the optimizer's step hooks emit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:  # the annotations only: amp.py's contributor never imports torch itself
    import torch

#: A value of a record: a host number, or a 0-d device tensor the exporter thread reads (no sync).
HostValue: TypeAlias = "float | torch.Tensor"
#: A sampled step's contribution: (name, 0-d tensor) or (names, 1-d tensor of as many values).
Contribution: TypeAlias = "tuple[str | list[str], torch.Tensor]"


class Contributor(Protocol):
    """A probe whose values join the optimizer probe's (``OptimizerProbe.contributors``). Both
    run inside ``optimizer.step()``; an exception disables the optimizer probe, never training."""

    def host_values(self) -> dict[str, HostValue]:
        """Every step, from the post-step hook: values that cost no host sync."""
        ...

    def collect(self) -> list[Contribution]:
        """A sampled step's values, joined to its device vector (then forgotten)."""
        ...


class ContributorBase:
    """A ``Contributor`` that contributes nothing: subclasses override what they have."""

    def host_values(self) -> dict[str, HostValue]:
        return {}

    def collect(self) -> list[Contribution]:
        return []
