"""The exporter protocol, and the two exporters that never touch the network.

An exporter is where the processor's batches go (as in OpenTelemetry's ``SpanExporter``): two
methods, both called by the processor only, ``export`` on its worker thread and ``shutdown`` once
that thread has stopped, so an exporter needs no lock for its own state. Unlike a span exporter,
``export`` must never wait on the network: while the collector is away, batches keep being made
and spooled on the processor's clock, and the exporter says through ``export``'s answer when it
wants to be called again (a retry after its backoff, a heartbeat). Three exporters exist:

- ``collector.CollectorExporter``: the collector over HTTP (registration, heartbeats, the end of
  the run, backoff and retry, 413 splitting, the spool, replay of other runs' spools);
- ``SpoolExporter``: offline (``init(offline=True)``): the spool only, for ``optiscope sync``;
- ``InMemoryExporter``: keeps what it is given, for tests.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from .batches import BatchWriter
from .record import Point

log = logging.getLogger("optiscope")


class Exporter(Protocol):
    def export(self, points: Sequence[Point], end: str | None = None, last: bool = False) -> float:
        """Take one batch of points (empty: nothing new, a tick) and send what can be sent now.

        ``end``: set once the run is closing, to its final status; ``last``: nothing follows this
        batch, so the end of the run is due too. Returns the seconds until the exporter wants to be
        called again with nothing new: for a retry or a heartbeat; ``math.inf`` when it needs no
        call (with ``last``: it is done, everything is delivered or given up)."""
        ...

    def shutdown(self, end: str, undelivered: int) -> bool:
        """The processor has stopped, or gave up at its deadline with ``undelivered`` records never
        exported: say what is lost, release what is held. True when everything was delivered
        (and, for a collector, the end of the run acknowledged)."""
        ...


def warn_undelivered(lost: int) -> None:
    if lost:
        log.warning("optiscope: finish() timed out with %d records/points undelivered", lost)


class SpoolExporter:
    """Offline: every batch goes to the spool (when there is one) and stays there, for
    ``optiscope sync`` to send; nothing is sent, so nothing is waited for."""

    def __init__(self, writer: BatchWriter):
        self.writer = writer

    @property
    def run_doc(self) -> dict[str, Any]:
        return self.writer.run_doc

    def update_run_doc(self, doc: dict[str, Any]) -> None:
        self.writer.update_run_doc(doc)

    def export(self, points: Sequence[Point], end: str | None = None, last: bool = False) -> float:
        self.writer.take_doc()
        if points:
            self.writer.write(points)
        return math.inf

    def shutdown(self, end: str, undelivered: int) -> bool:
        warn_undelivered(undelivered)
        delivered = undelivered == 0  # delivered to the spool: the only place an offline run sends to
        self.writer.close(end, delivered)
        return delivered


class InMemoryExporter:
    """Keeps every batch it is given (``batches``) and the run's final status (``ended``), for
    tests of what a processor hands over and when."""

    def __init__(self) -> None:
        self.batches: list[list[Point]] = []
        self.ended: str | None = None
        self.undelivered = 0
        self._lock = threading.Lock()  # a test reads while the processor's thread writes

    @property
    def points(self) -> list[Point]:
        with self._lock:
            return [p for batch in self.batches for p in batch]

    def export(self, points: Sequence[Point], end: str | None = None, last: bool = False) -> float:
        with self._lock:
            if points:
                self.batches.append(list(points))
            if last:
                self.ended = end
        return math.inf

    def shutdown(self, end: str, undelivered: int) -> bool:
        with self._lock:
            self.undelivered = undelivered
            return undelivered == 0 and self.ended == end
