"""The detector protocol and the alert event every detector returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol


@dataclass(frozen=True)
class AlertEvent:
    rule: str            # stable identifier of the rule, e.g. "non_finite"
    severity: str        # "page" or "warning"
    state: str           # "firing" or "resolved"
    series: str          # the series that triggered it
    step: int
    rank: int
    value: float         # the triggering value (may be NaN or +-Inf)
    message: str         # one human sentence


class Detector(Protocol):
    def update(self, step: int, values: Mapping[str, float], rank: int = 0) -> list[AlertEvent]: ...
