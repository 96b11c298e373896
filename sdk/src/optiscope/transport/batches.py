"""From points to numbered wire batches on disk: what the collector and the offline exporters share.

Each batch is encoded once, in wire version 2 (binary, columnar), and those bytes are what is
spooled, sent and re-sent; its sequence number (with the run and rank) is its idempotency key on
the collector. A batch is appended to the spool before anything else happens to it, so a killed
process or an absent collector loses nothing that reached the disk.

The run's registration document lives here too: the spool keeps the latest one (a replay
registers what the run last said), and a new one is handed over from the training thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import wire
from .record import Point, WarnOnce, new_counters
from .spool import Spool

log = logging.getLogger("optiscope")


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """One batch as it is sent: ``points`` (its number of values) is what the counters add up;
    ``spooled``: whether it is on disk too (if not, losing it from memory loses it)."""

    seq: int
    body: bytes
    points: int
    spooled: bool


class BatchWriter:
    """Numbers, encodes and spools the batches of one (run, rank). Used by the exporter thread,
    except ``update_run_doc``, which any thread may call."""

    def __init__(
        self,
        run_id: str,
        rank: int,
        run_doc: dict[str, Any],
        counters: collections.Counter[str] | None = None,
        spool: Spool | None = None,
    ):
        self.run_id, self.rank = run_id, rank
        self.counters = counters if counters is not None else new_counters()
        self.spool = spool
        self._run_doc = run_doc
        self._seq = 0
        self._new_doc: dict[str, Any] | None = None
        self._doc_lock = threading.Lock()  # the one piece of state the training thread writes
        self._warn = WarnOnce()

    @property
    def run_doc(self) -> dict[str, Any]:
        """The registration document as the exporter thread last took it."""
        return self._run_doc

    @property
    def spool_dir(self) -> Path | None:
        return self.spool.dir if self.spool is not None else None

    # -- any thread ------------------------------------------------------------------------------
    def update_run_doc(self, doc: dict[str, Any]) -> None:
        """Replace the registration document (e.g. a fingerprint that now knows the devices); the
        exporter thread takes it at its next batch (``take_doc``)."""
        with self._doc_lock:
            self._new_doc = doc

    # -- exporter thread -------------------------------------------------------------------------
    def take_doc(self) -> bool:
        """Adopt the document ``update_run_doc`` left, in the spool too; True when there was one
        (so the collector's copy is now stale)."""
        with self._doc_lock:
            doc, self._new_doc = self._new_doc, None
        if doc is None:
            return False
        self._run_doc = doc
        if self.spool is not None:
            try:
                self.spool.set_doc(doc)
            except OSError:
                self._warn("spool_doc", "cannot update the run document in the spool at %s", self.spool.dir)
        return True

    def write(self, points: Sequence[Point]) -> EncodedBatch:
        """The next batch: ``points``, then the exporter's counters at the last point's step."""
        # The counters travel as series of the run, so a dashboard sees drops and retries beside the loss.
        sdk = {wire.sdk_series(k): float(self.counters[k]) for k in wire.SDK_COUNTERS}
        return self.write_records([*points, (points[-1][0], time.time(), sdk)])

    def write_records(self, records: list[Point]) -> EncodedBatch:
        """``records`` as they are, under the next sequence number (the halves of a split batch)."""
        batch = wire.Batch(self.run_id, self.rank, self._seq, records)
        self._seq += 1
        body = wire.encode_batch(batch)
        return EncodedBatch(batch.seq, body, batch.n_points(), self._spool(batch.seq, body))

    def _spool(self, seq: int, body: bytes) -> bool:
        """Put a batch on disk before it is sent; False when it lives in memory only."""
        if self.spool is None:
            return False
        spooled = False
        try:
            spooled = self.spool.append(seq, body)
        except OSError:
            self._warn("spool_error", "cannot write the spool at %s; batches are kept in memory only", self.spool.dir)
        if spooled:
            self.counters["spooled_batches"] += 1
        else:
            self.counters["spool_full"] += 1
            self._warn("spool_full", "the spool is full; new batches are kept in memory only")
        return spooled

    def release(self, seq: int) -> None:
        """The collector acknowledged (or refused for good) the spooled batch ``seq``."""
        if self.spool is not None:
            self.spool.release(seq)

    def close(self, status: str, delivered: bool) -> None:
        """At the end of the run: the spool goes if everything was delivered, else it stays, with
        the run's final status, for the next run or ``optiscope sync``."""
        if self.spool is None:
            return
        try:
            self.spool.close(status, delivered)
        except OSError:
            log.warning("optiscope: could not close the spool", exc_info=True)
