"""What travels through the transport, and what every stage of it shares.

A ``Record`` is what the training thread hands over: it may hold device tensors, because reading
them is a host sync and the training thread must not wait for one. On the exporter thread it
becomes a ``Point`` (step, unix time, {name: float}), the shape of one record of a ``wire.Batch``.

The delivery counters are one ``collections.Counter`` shared by the processor (which drops) and
the exporter (which sends, retries and spools); ``Run.counters`` reads it, and each batch carries
the ones in ``wire.SDK_COUNTERS`` as series of the run.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

log = logging.getLogger("optiscope")

#: One record as it goes on the wire: (step, unix time, {series name: value}).
Point = tuple[int, float, dict[str, float]]

#: Every delivery counter, in the order ``Run.counters`` lists them.
COUNTER_NAMES = (
    "dropped",
    "sent_batches",
    "sent_points",
    "retries",
    "rejected_batches",
    "bad_values",
    "spooled_batches",
    "spool_full",
    "replayed_batches",
    "split_batches",
    "heartbeats",
)


def new_counters() -> collections.Counter[str]:
    """The delivery counters of one run, all at zero (so each is listed even before it moves)."""
    return collections.Counter(dict.fromkeys(COUNTER_NAMES, 0))


class Record(NamedTuple):
    """One logged step as the training thread hands it over. ``values``: Python floats or 0-d
    tensors; ``vector``: the probe's statistics, (names, one 1-d device tensor), or None. A named
    tuple, not a dataclass: it is built on the training thread for every ``log()``, and a tuple
    costs a tenth of a frozen dataclass to make."""

    step: int
    time: float
    values: Mapping[str, Any]
    vector: tuple[Sequence[str], Any] | None = None

    def materialize(self) -> Point:
        """The record with every value read as a float; raises when one cannot be (the caller
        drops the record and counts it). Runs on the exporter thread, never on the training thread."""
        out: dict[str, float] = {}
        for k, v in self.values.items():
            # HOST SYNC (exporter thread): a 0-d tensor the user logged is read here, never in log().
            out[k] = float(v.tolist() if hasattr(v, "tolist") else v)
        if self.vector is not None:
            names, vec = self.vector
            # HOST SYNC (exporter thread): the probe's stacked statistics, one copy per sampled step.
            out.update(zip(names, (float(x) for x in vec.tolist())))
        return self.step, self.time, out


class WarnOnce:
    """One log line per kind of trouble: a collector that is down for an hour must not write a
    line per retry into the training job's log."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.warning("optiscope: " + msg, *args, exc_info=exc_info)
