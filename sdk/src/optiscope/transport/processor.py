"""The batching processor: a bounded queue, and the one thread that turns records into batches and
hands them to an exporter (as OpenTelemetry's ``BatchSpanProcessor`` does for spans).

``submit`` never waits on the network: it appends to a bounded deque (a full queue drops the
oldest record and counts it) and returns. The worker thread takes a batch every
``flush_interval`` seconds, or as soon as ``max_batch_records`` are queued, reads the records'
values on the host (the only host sync of a logged step), drops what is not a number or not a
valid series name, and calls ``exporter.export``. The exporter answers when it wants to be called
again with nothing new (a retry, a heartbeat), so one thread serves both clocks. ``close`` is
bounded by its timeout: the queue is flushed, the exporter ends the run, and whatever is still
undelivered at the deadline is counted and logged by the exporter's ``shutdown``.

A process forked while the processor runs (a DataLoader worker) has a copy of the queue but no
worker thread: the copy goes quiet (``submit`` drops, ``close`` returns at once), so the child
neither sends the parent's records twice nor ends the parent's run.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
import weakref
from collections.abc import Callable

from .. import wire
from .exporters import Exporter
from .record import Point, Record, WarnOnce, new_counters

#: What the worker takes from the queue at once: (records, the run's final status once closing, whether nothing follows).
_Take = tuple[list[Record], str | None, bool]


class BatchProcessor:
    """Bounds (see the README's table): ``max_queue`` records in memory (a full queue drops the
    oldest), batches of ``max_batch_records`` or every ``flush_interval`` seconds. ``observe``
    sees every batch of points as it is exported, on the worker thread (in-process detectors)."""

    def __init__(
        self,
        exporter: Exporter,
        counters: collections.Counter[str] | None = None,
        max_queue: int = 100_000,
        max_batch_records: int = 1_000,
        flush_interval: float = 0.5,
        observe: Callable[[list[Point]], None] | None = None,
    ):
        self.exporter = exporter
        self.counters = counters if counters is not None else new_counters()
        self.max_queue, self.max_batch_records, self.flush_interval = max_queue, max_batch_records, flush_interval
        self.observe = observe
        self._queue: collections.deque[Record] = collections.deque()
        self._cv = threading.Condition()
        self._woken = False  # wake(): take the next batch now, not a flush_interval later
        self._closing = False
        self._status = "finished"
        self._deadline = math.inf
        self._closed: bool | None = None
        self._forked = False
        self._warn = WarnOnce()
        self._thread = threading.Thread(target=self._run, name="optiscope-exporter", daemon=True)
        _LIVE.add(self)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Records submitted and not yet taken into a batch."""
        return len(self._queue)

    # -- the training thread ---------------------------------------------------------------------
    def submit(self, record: Record) -> None:
        if self._forked:
            return
        with self._cv:
            if len(self._queue) >= self.max_queue:
                self._queue.popleft()
                self.counters["dropped"] += 1
            self._queue.append(record)
            if len(self._queue) >= self.max_batch_records:
                self._cv.notify()

    def wake(self) -> None:
        """Take the next batch at once (the exporter has something new to send, e.g. a document)."""
        with self._cv:
            self._woken = True
            self._cv.notify()

    def close(self, timeout: float, status: str = "finished") -> bool:
        """Flush what is queued, let the exporter end the run with ``status``, stop the thread, all
        within ``timeout`` seconds. True when every record was delivered (see ``Exporter.shutdown``)."""
        if self._forked:
            return True  # the parent's run: the parent ends it
        if self._closed is not None:
            return self._closed
        with self._cv:
            self._closing = True
            self._status = status
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._cv.notify()
        self._thread.join(timeout=max(0.0, timeout) + 0.5)
        with self._cv:
            undelivered = len(self._queue)
        self._closed = self.exporter.shutdown(status, undelivered)
        return self._closed

    # -- the worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        first = True  # the first batch goes at once, not a flush_interval later: the run registers now
        wake_at = 0.0
        while True:
            taken = self._take(first, wake_at)
            if taken is None:
                return  # close()'s deadline passed
            records, end, last = taken
            first = False
            again = self.exporter.export(self._prepare(records), end, last)
            if end is None:
                wake_at = time.monotonic() + again
            elif last and again == math.inf:
                return  # the run's end is settled
            elif 0.0 < again < math.inf:
                self._pause(again)

    def _take(self, first: bool, wake_at: float) -> _Take | None:
        with self._cv:
            if not first and not self._closing and len(self._queue) < self.max_batch_records and not self._woken:
                self._cv.wait(timeout=min(self.flush_interval, max(0.0, wake_at - time.monotonic())))
            if time.monotonic() >= self._deadline:
                return None
            records = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_records))]
            self._woken = False
            end = self._status if self._closing else None
            return records, end, end is not None and not self._queue

    def _pause(self, seconds: float) -> None:
        """Closing: wait out the exporter's backoff, but no longer than close() allows."""
        with self._cv:
            until = min(time.monotonic() + seconds, self._deadline)
            self._cv.wait(timeout=max(0.0, until - time.monotonic()))

    def _prepare(self, records: list[Record]) -> list[Point]:
        out: list[Point] = []
        for r in records:
            try:
                out.append(r.materialize())
            except Exception:  # an object that is not a number: drop it, never the batch
                self.counters["bad_values"] += 1
                self._warn("bad_value", "dropped a record whose values could not be read as numbers")
        if not out:
            return out
        if self.observe is not None:
            try:
                self.observe(out)
            except Exception:
                self._warn("observe", "in-process detection failed; records are still sent")
        # Names from log() are checked there; a probe's names (from model.named_parameters()) could
        # still be too long. One check per distinct name, not per point: drop those series, never the batch.
        names: set[str] = set()
        for _, _, values in out:
            names.update(values)
        bad = {n for n in names if not wire.valid_name(n)}
        if bad:
            for _, _, values in out:
                for n in bad.intersection(values):
                    del values[n]
                    self.counters["bad_values"] += 1
            self._warn("bad_name", "dropped series with invalid names (e.g. %r)", sorted(bad)[0][:80])
        return out

    def _forked_child(self) -> None:
        # Only the forking thread survives a fork: the worker is gone, and the condition's lock may
        # have been held by it at that instant. A fresh lock keeps the child's copy from hanging.
        self._forked = True
        self._cv = threading.Condition()
        self._queue.clear()


#: Live processors, weakly: a process that makes many runs keeps none of them alive for this.
_LIVE: weakref.WeakSet[BatchProcessor] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for p in list(_LIVE):
        p._forked_child()


if hasattr(os, "register_at_fork"):  # POSIX; one hook for all processors (hooks cannot be removed)
    os.register_at_fork(after_in_child=_after_fork_in_child)
