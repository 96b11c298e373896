"""The exporter that delivers to the collector over HTTP.

Each batch is spooled as it is made (``batches.BatchWriter``), held in memory until the collector
acknowledges it, and sent oldest first with its idempotency key (run, rank, seq), retrying only
what can succeed later (unreachable, 429, 5xx from a proxy): the other refusals are counted and
dropped. After a failure the exporter backs off (jittered exponential, or the collector's
``Retry-After``, both capped at ``backoff_max``); batches keep being made and spooled meanwhile,
on the processor's clock. A 413 splits a batch in two. The run registers before its first batch,
again after its document changes, and, once the collector answers, replays what earlier runs left
in the spool.

A run that sends nothing for ``heartbeat_interval`` seconds (a long evaluation, a slow data
loader, no ``log`` calls) sends a heartbeat instead, so the collector can tell a quiet rank from a
dead one. A heartbeat is best-effort: one attempt per interval, never spooled, never retried on
the batches' backoff, never sent while batches wait to be retried.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import wire
from .batches import BatchWriter, EncodedBatch
from .exporters import warn_undelivered
from .http import RETRYABLE, UNAUTHORIZED, Transport
from .record import Point, WarnOnce
from .session import CollectorSession

log = logging.getLogger("optiscope")

#: Seconds without any request to the collector after which a registered run sends a heartbeat.
DEFAULT_HEARTBEAT_INTERVAL = 30.0


class CollectorExporter:
    """Bounds (see the README's table): at most ``max_pending_batches`` held for retry (then the
    oldest leaves memory; still in the spool, counted as dropped if it was not), retries
    ``backoff_max`` seconds apart at most, and one heartbeat after ``heartbeat_interval`` seconds
    (30) with nothing sent (None: no heartbeats). ``replay_root``: other runs' spools to send
    once the collector answers."""

    def __init__(
        self,
        transport: Transport,
        writer: BatchWriter,
        max_pending_batches: int = 1_000,
        backoff_max: float = 10.0,
        heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL,
        replay_root: Path | None = None,
    ):
        self.writer = writer
        self.counters = writer.counters
        self.max_pending, self.backoff_max = max_pending_batches, backoff_max
        self.heartbeat_interval = heartbeat_interval if heartbeat_interval and heartbeat_interval > 0 else None
        self.session = CollectorSession(transport, writer.run_id, writer.rank, backoff_max)
        self._replay_root = replay_root
        self._pending: collections.deque[EncodedBatch] = collections.deque()
        self._registered = False
        self._doc_stale = False  # registered, but run_doc changed since: PUT it before the next batch
        self._backoff = 0.0
        self._send_at = 0.0
        self._finish_acked = False
        self._done = False
        self._refused: int | None = None  # 401/403: this token will not do; nothing more is sent
        self._warn = WarnOnce()

    @property
    def run_doc(self) -> dict[str, Any]:
        return self.writer.run_doc

    @property
    def pending_batches(self) -> int:
        """Batches made and not yet acknowledged by the collector."""
        return len(self._pending)

    def update_run_doc(self, doc: dict[str, Any]) -> None:
        """Any thread: register ``doc`` again before the next batch (the PUT is idempotent)."""
        self.writer.update_run_doc(doc)

    # -- the processor's thread ------------------------------------------------------------------
    def export(self, points: Sequence[Point], end: str | None = None, last: bool = False) -> float:
        now = time.monotonic()
        if self.writer.take_doc():
            self._doc_stale = self._registered  # not yet registered: the first PUT carries it anyway
        if points:
            self._hold(self.writer.write(points))
        if now < self._send_at:  # backing off: batches wait in the spool and in memory
            later = time.monotonic()
            return max(0.0, self._send_at - later) if end is not None else self._wake_in(later)
        ok = self._drain()
        self._backoff = 0.0 if ok else self._grow(self._backoff)
        if not ok and self.session.retry_after:
            self._backoff, self.session.retry_after = max(self._backoff, self.session.retry_after), 0.0
        self._send_at = time.monotonic() + self._backoff
        if ok and end is None:
            self._heartbeat()
        if ok and last and end is not None:
            self._end(end)
        if end is None:
            return self._wake_in(time.monotonic())
        if self._done:
            return math.inf
        # Closing: the next batch goes at once; the last one waits out the backoff before it is retried.
        return max(0.0, self._send_at - time.monotonic()) if last else 0.0

    def shutdown(self, end: str, undelivered: int) -> bool:
        pending = list(self._pending)  # a copy: a worker past its deadline may still be sending
        lost = undelivered + sum(b.points for b in pending if not b.spooled)
        spooled = sum(b.points for b in pending if b.spooled)
        warn_undelivered(lost)  # whatever is still here when the deadline passed is lost; say how much, once
        if spooled:
            log.warning(
                "optiscope: %d points are kept in the spool at %s; they are sent by the next run "
                "or by `optiscope sync`",
                spooled,
                self.writer.spool_dir,
            )
        delivered = lost == 0 and not spooled and self._finish_acked
        self.writer.close(end, delivered)
        return delivered

    def _grow(self, backoff: float) -> float:
        return min(self.backoff_max, max(0.05, backoff * 2)) * random.uniform(0.5, 1.0)

    def _wake_in(self, now: float) -> float:
        """Not closing: when to be called with nothing new, for a retry or a heartbeat."""
        wake = math.inf
        if self._pending and self._backoff:
            wake = max(0.0, self._send_at - now)
        if self.heartbeat_interval is not None and self._registered and not self._backoff:
            wake = min(wake, max(0.0, self.session.last_request + self.heartbeat_interval - now))
        return wake

    def _hold(self, batch: EncodedBatch) -> None:
        if len(self._pending) >= self.max_pending:
            old = self._pending.popleft()
            if not old.spooled:  # a spooled batch is not lost: the next run or `optiscope sync` sends it
                self.counters["dropped"] += old.points
            self._warn(
                "pending_full",
                "collector unreachable and %d batches pending: the oldest leave memory",
                self.max_pending,
            )
        self._pending.append(batch)

    def _drain(self) -> bool:
        """Register the run if needed, then send pending batches oldest first. False = back off."""
        if self._refused is not None:
            return True  # the batches wait in the spool for `optiscope sync` with the right token
        if not self._registered or self._doc_stale:
            status = self.session.register(self.writer.run_doc)
            if status is None or status in RETRYABLE:
                self.counters["retries"] += 1
                return False
            if status in UNAUTHORIZED:
                return self._refuse(status)
            if self._doc_stale:  # a registered run's new document: accepted or not, the data goes on
                self._doc_stale = False
            else:
                self._registered = 200 <= status < 300
                if not self._registered:  # e.g. 401: nothing we send will be accepted
                    return True
                self._replay_others()
        while self._pending:
            batch = self._pending[0]
            status = self.session.send_batch(batch.body)
            if status is None or status in RETRYABLE:
                self.counters["retries"] += 1
                return False
            if status in UNAUTHORIZED:  # not released: only an acknowledgement releases a batch
                return self._refuse(status)
            self._pending.popleft()
            split = status == 413 and self._split(batch)
            if batch.spooled:  # acknowledged, refused for good, or split (its halves are on disk by now)
                self.writer.release(batch.seq)
            if split:
                continue
            if 200 <= status < 300:
                self.counters["sent_batches"] += 1
                self.counters["sent_points"] += batch.points
            else:
                self.counters["rejected_batches"] += 1
        return True

    def _refuse(self, status: int) -> bool:
        """The collector refuses this run's token (401: none or unknown, say tokens were created
        after the run started; 403: its scope or project). Sending again cannot succeed, so
        nothing more is sent; every batch stays in the spool, with the run's end, for `optiscope
        sync` with the right token. One log line says so."""
        self._refused = status
        self._warn(
            "unauthorized",
            "the collector refused this run's token (HTTP %d); nothing more is sent and every batch is kept in "
            "%s: set OPTISCOPE_TOKEN to a token with the ingest scope in project %r, then run `optiscope sync`",
            status,
            f"the spool at {self.writer.spool_dir}" if self.writer.spool_dir else "memory only (the spool is off)",
            self.writer.run_doc.get("project"),
        )
        return True

    def _split(self, batch: EncodedBatch) -> bool:
        """413: the collector's body limit is below this batch; send it as two halves instead
        (each with its own sequence number, spooled like any batch). False for a single record."""
        records = wire.decode_batch(batch.body).records
        if len(records) < 2:
            return False
        half = len(records) // 2
        parts = [self.writer.write_records(chunk) for chunk in (records[:half], records[half:])]
        self._pending.extendleft(reversed(parts))
        self.counters["split_batches"] += 1
        return True

    def _heartbeat(self) -> None:
        """Tell the collector this rank is alive, once ``heartbeat_interval`` passed with no request.
        Called only after a drain that sent everything: a heartbeat never waits in front of a batch.
        One attempt: failed or refused, the next is an interval later (the clock is any request)."""
        interval = self.heartbeat_interval
        if interval is None or not self._registered or self._pending or self._refused is not None:
            return
        if time.monotonic() - self.session.last_request < interval:
            return
        status = self.session.heartbeat()
        if status is not None and 200 <= status < 300:
            self.counters["heartbeats"] += 1

    def _end(self, status: str) -> None:
        """Mark the run ended; when that is worth trying again (unreachable, 429, 5xx), back off."""
        if self._registered and self._refused is None:  # a refused run's end waits in the spool too
            answer = self.session.finish(status)
            if answer is None or answer in RETRYABLE:
                self.counters["retries"] += 1
                self._backoff = self._grow(self._backoff)  # the end of the run is retried like a batch
                self._send_at = time.monotonic() + self._backoff
                return
            self._finish_acked = 200 <= answer < 300
        self.session.close()
        self._done = True

    def _replay_others(self) -> None:
        """Once the collector answers: send what earlier runs left in the spool (once per run)."""
        if self._replay_root is None:
            return
        root, self._replay_root = self._replay_root, None
        self.counters["replayed_batches"] += self.session.replay_spools(root, self.writer.spool_dir)
