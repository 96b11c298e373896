"""Bounded queue and the background thread that batches records and sends them to the collector.

``submit`` never waits on the network: it appends to a bounded deque (a full queue drops the
oldest record and counts it) and returns. One daemon thread registers the run, batches records by
size and time, and sends each batch with its idempotency key (run, rank, seq), retrying only what
can succeed later. ``close`` is bounded by a timeout. Batches are encoded once, in wire version 2
(binary, columnar), and those bytes are what is spooled, sent, and re-sent.

A run that sends nothing for ``heartbeat_interval`` seconds (a long evaluation, a slow data
loader, no ``log`` calls) sends a heartbeat instead, so the collector can tell a quiet rank from a
dead one. A heartbeat is best-effort: one attempt per interval, never spooled, never retried on
the batches' backoff, never sent while batches wait to be retried.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import random
import threading
import time
from typing import Any

from .. import wire
from . import rundoc
from .http import RETRYABLE, HttpClient

log = logging.getLogger("optiscope")

#: Counters sent with every batch as the series sdk/<name>.
SERIES_COUNTERS = wire.SDK_COUNTERS

# A record as the training thread hands it over: (step, unix time, {name: float | 0-d tensor},
# optional (names, 1-d device tensor)). Tensors are copied to the host here, off the training thread.
Record = tuple[int, float, dict, Any]


def materialize(record: Record) -> tuple[int, float, dict[str, float]]:
    step, t, values, vector = record
    out: dict[str, float] = {}
    for k, v in values.items():
        # HOST SYNC (exporter thread): a 0-d tensor the user logged is read here, never in log().
        out[k] = float(v.tolist() if hasattr(v, "tolist") else v)
    if vector is not None:
        names, vec = vector
        # HOST SYNC (exporter thread): the probe's stacked statistics, one copy per sampled step.
        out.update(zip(names, (float(x) for x in vec.tolist())))
    return step, t, out


#: Seconds without any request to the collector after which a registered run sends a heartbeat.
DEFAULT_HEARTBEAT_INTERVAL = 30.0


class Exporter:
    """Bounds (see the README's table): ``max_queue`` records in memory (a full queue drops the
    oldest), batches of ``max_batch_records`` or every ``flush_interval`` seconds, at most
    ``max_pending_batches`` held for retry, retries ``backoff_max`` seconds apart at most, and one
    heartbeat after ``heartbeat_interval`` seconds (30) with nothing sent (None: no heartbeats)."""

    def __init__(self, client: HttpClient, run_id: str, run_doc: dict, rank: int = 0,
                 max_queue: int = 100_000, max_batch_records: int = 1_000, flush_interval: float = 0.5,
                 max_pending_batches: int = 1_000, backoff_max: float = 10.0, spool=None,
                 replay_root=None, heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL,
                 observe=None):
        # client None: offline, nothing is sent; batches go to the spool (if any) for `optiscope sync`
        self.client = client
        # observe(records): sees every record as sent, on this thread (in-process detectors)
        self.observe = observe
        self.run_id, self.run_doc, self.rank = run_id, run_doc, rank
        self.max_queue, self.max_batch_records = max_queue, max_batch_records
        self.flush_interval, self.max_pending, self.backoff_max = flush_interval, max_pending_batches, backoff_max
        self.heartbeat_interval = heartbeat_interval if heartbeat_interval and heartbeat_interval > 0 else None
        self.counters = collections.Counter(dropped=0, sent_batches=0, sent_points=0, retries=0,
                                            rejected_batches=0, bad_values=0, spooled_batches=0,
                                            spool_full=0, replayed_batches=0, split_batches=0, heartbeats=0)
        self.spool = spool  # transport.spool.Spool or None
        self._replay_root = replay_root  # other runs' spools to replay once the collector answers
        self._queue: collections.deque[Record] = collections.deque()
        # (seq, body, points, spooled)
        self._pending: collections.deque[tuple[int, bytes, int, bool]] = collections.deque()
        self._cv = threading.Condition()
        self._seq = 0
        self._registered = False
        self._new_doc: dict | None = None  # from update_run_doc, for the exporter thread to take
        self._doc_stale = False  # registered, but run_doc changed since: PUT it before the next batch
        self._last_request = time.monotonic()  # the heartbeat's clock: any request, answered or not
        self._closing = False
        self._deadline = math.inf
        self._finish_status: str | None = None
        self._finish_acked = False
        self._retry_after = 0.0
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="optiscope-exporter", daemon=True)
        self._thread.start()

    # -- training thread ---------------------------------------------------------------------
    def submit(self, record: Record) -> None:
        with self._cv:
            if len(self._queue) >= self.max_queue:
                self._queue.popleft()
                self.counters["dropped"] += 1
            self._queue.append(record)
            if len(self._queue) >= self.max_batch_records:
                self._cv.notify()

    def update_run_doc(self, doc: dict) -> None:
        """Replace the registration document (e.g. a fingerprint that now knows the devices); the
        exporter thread registers it again before its next batch (the PUT is idempotent)."""
        with self._cv:
            self._new_doc = doc
            self._cv.notify()

    def close(self, timeout: float, status: str = "finished") -> bool:
        """Flush what is queued, mark the run finished, stop the thread. True when every record
        was delivered and the collector acknowledged the end of the run."""
        with self._cv:
            self._closing = True
            self._finish_status = status
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._cv.notify()
        self._thread.join(timeout=max(0.0, timeout) + 0.5)
        with self._cv:
            # Whatever is still here when the deadline passed is lost; say how much, once.
            lost = len(self._queue) + sum(p for _, _, p, spooled in self._pending if not spooled)
            spooled = sum(p for _, _, p, sp in self._pending if sp)
        if lost:
            log.warning("optiscope: finish() timed out with %d records/points undelivered", lost)
        if spooled:
            log.warning("optiscope: %d points are kept in the spool at %s; they are sent by the next run "
                        "or by `optiscope sync`", spooled, self.spool.dir)
        delivered = lost == 0 and not spooled and (self._finish_acked or self.client is None)
        if self.spool is not None:
            try:
                self.spool.close(status, delivered)
            except OSError:
                log.warning("optiscope: could not close the spool", exc_info=True)
        return delivered

    # -- exporter thread ---------------------------------------------------------------------
    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("optiscope: " + msg, *args)

    def _loop(self) -> None:
        # Two clocks: records are batched (and spooled) every flush_interval or max_batch_records,
        # whatever the collector does; sending waits out the backoff (or Retry-After) after a failure.
        backoff, send_at = 0.0, 0.0
        first = True  # register at once, not a flush_interval later: the run shows up, heartbeats start
        while True:
            with self._cv:
                if not first and not self._closing and len(self._queue) < self.max_batch_records \
                        and self._new_doc is None:
                    wake = self.flush_interval if not self._pending or not backoff else \
                        min(self.flush_interval, max(0.0, send_at - time.monotonic()))
                    if self._heartbeat_on() and not backoff:  # wake for the heartbeat, records or not
                        wake = min(wake, max(0.0, self._last_request + self.heartbeat_interval - time.monotonic()))
                    self._cv.wait(timeout=wake)
                closing = self._closing
                now = time.monotonic()
                if now >= self._deadline:
                    return
                records = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_records))]
                new_doc, self._new_doc = self._new_doc, None
                first = False
            if new_doc is not None:
                self._take_doc(new_doc)
            if records:
                self._enqueue_batch(records)
            if self.client is None:  # offline: nothing to send, nothing to wait for
                if closing and not self._queue:
                    return
                continue
            if now < send_at:
                if closing:  # wait out the backoff, but no longer than finish() allows
                    with self._cv:
                        self._cv.wait(timeout=max(0.0, min(send_at, self._deadline) - time.monotonic()))
                continue
            ok = self._drain()
            backoff = 0.0 if ok else min(self.backoff_max, max(0.05, backoff * 2)) * random.uniform(0.5, 1.0)
            if not ok and self._retry_after:
                backoff, self._retry_after = max(backoff, self._retry_after), 0.0
            send_at = time.monotonic() + backoff
            if ok and not closing:
                self._heartbeat()
            if ok and closing:
                with self._cv:
                    if self._queue:
                        continue
                if self._send_finish():
                    self.client.close()
                    return
                backoff = min(self.backoff_max, max(0.05, backoff * 2)) * random.uniform(0.5, 1.0)
                send_at = time.monotonic() + backoff  # the end of the run is retried like a batch

    def _enqueue_batch(self, records: list[Record]) -> None:
        out = []
        for r in records:
            try:
                out.append(materialize(r))
            except Exception:  # an object that is not a number: drop it, never the batch
                self.counters["bad_values"] += 1
                self._warn_once("bad_value", "dropped a record whose values could not be read as numbers")
        if not out:
            return
        if self.observe is not None:
            try:
                self.observe(out)
            except Exception:
                self._warn_once("observe", "in-process detection failed; records are still sent")
        # Names from log() are checked there; a probe's names (from model.named_parameters()) could
        # still be too long. One check per distinct name, not per point: drop those series, never the batch.
        bad = {n for n in set().union(*(v for _, _, v in out)) if not wire.valid_name(n)}
        if bad:
            for _, _, values in out:
                for n in bad.intersection(values):
                    del values[n]
                    self.counters["bad_values"] += 1
            self._warn_once("bad_name", "dropped series with invalid names (e.g. %r)", sorted(bad)[0][:80])
        # The exporter's own counters travel as series of the run, at the batch's last step.
        out.append((out[-1][0], time.time(), {f"sdk/{k}": float(self.counters[k]) for k in SERIES_COUNTERS}))
        batch = wire.Batch(self.run_id, self.rank, self._seq, out)
        self._seq += 1
        body = wire.encode_batch(batch)
        spooled = self._spool(batch.seq, body)
        if self.client is None:
            return  # offline: the spool holds it (for `optiscope sync`), or nothing does
        if len(self._pending) >= self.max_pending:
            _, _, n, was_spooled = self._pending.popleft()
            if not was_spooled:  # a spooled batch is not lost: the next run or `optiscope sync` sends it
                self.counters["dropped"] += n
            self._warn_once("pending_full", "collector unreachable and %d batches pending: the oldest leave memory",
                            self.max_pending)
        self._pending.append((batch.seq, body, batch.n_points(), spooled))

    def _spool(self, seq: int, body: bytes) -> bool:
        """Put a batch on disk before it is sent; False when it lives in memory only."""
        if self.spool is None:
            return False
        spooled = False
        try:
            spooled = self.spool.append(seq, body)
        except OSError:
            self._warn_once("spool_error", "cannot write the spool at %s; batches are kept in memory only",
                            self.spool.dir)
        if spooled:
            self.counters["spooled_batches"] += 1
        else:
            self.counters["spool_full"] += 1
            self._warn_once("spool_full", "the spool is full; new batches are kept in memory only")
        return spooled

    def _call(self, method: str, path: str, body, quiet: frozenset[int] = frozenset()) -> int | None:
        """Returns the status, or None when the collector could not be reached. ``quiet``: refusals
        the caller handles itself, so not logged here."""
        try:
            status, headers, payload = self.client.request(method, path, body)
        except ConnectionError as e:
            self._last_request = time.monotonic()
            self._warn_once("unreachable", "collector at %s unreachable (%s); will keep retrying",
                            self.client.base_url, e)
            return None
        if status in RETRYABLE and headers.get("retry-after", "").strip().isdigit():
            # the collector says when to come back (bounded by backoff_max)
            self._retry_after = min(self.backoff_max, float(headers["retry-after"]))
        self._last_request = time.monotonic()
        if status >= 400 and status not in RETRYABLE and status != 413 and status not in quiet:
            reason = _reason(payload)
            self._warn_once(f"http{status}:{reason}", "%s %s rejected with %d (%s); dropping it",
                            method, path, status, reason)
        return status

    def _drain(self) -> bool:
        """Register the run if needed, then send pending batches oldest first. False = back off."""
        if not self._registered or self._doc_stale:
            status = self._register()
            if status is None or status in RETRYABLE:
                self.counters["retries"] += 1
                return False
            if self._doc_stale:  # a registered run's new document: accepted or not, the data goes on
                self._doc_stale = False
            else:
                self._registered = 200 <= status < 300
                if not self._registered:  # e.g. 401: nothing we send will be accepted
                    return True
                self._replay_others()
        while self._pending:
            seq, body, n, spooled = self._pending[0]
            status = self._call("POST", f"/api/v1/runs/{self.run_id}/batches", body)
            if status is None or status in RETRYABLE:
                self.counters["retries"] += 1
                return False
            self._pending.popleft()
            if status == 413 and self._split(body, n):
                if spooled:
                    self.spool.release(seq)  # its halves are spooled under new sequence numbers
                continue
            if spooled:
                self.spool.release(seq)
            if 200 <= status < 300:
                self.counters["sent_batches"] += 1
                self.counters["sent_points"] += n
            else:
                self.counters["rejected_batches"] += 1
        return True

    def _register(self) -> int | None:
        def put(method: str, path: str, body: dict) -> int | None:
            # The document with tags/environment may be refused by an older collector: rundoc falls
            # back to the core, so only a refused core is worth the generic "rejected" line.
            optional = rundoc.core(body) is not None
            return self._call(method, path, body, quiet=rundoc.REFUSED if optional else frozenset())

        status, fell_back = rundoc.put_run(put, self.run_id, self.run_doc)
        if fell_back:
            self._warn_once("doc_refused", "the collector refused the run's tags/environment; the run is "
                            "registered without them")
        return status

    def _take_doc(self, doc: dict) -> None:
        """On the exporter thread (the spool's only user): the new document replaces the old one,
        in the spool too (a replay registers what the run last said), and is sent before the next batch."""
        self.run_doc = doc
        self._doc_stale = self._registered  # not yet registered: the first PUT carries it anyway
        if self.spool is not None:
            try:
                self.spool.set_doc(doc)
            except OSError:
                self._warn_once("spool_doc", "cannot update the run document in the spool at %s", self.spool.dir)

    def _heartbeat_on(self) -> bool:
        return bool(self.heartbeat_interval) and self._registered

    def _heartbeat(self) -> None:
        """Tell the collector this rank is alive, once ``heartbeat_interval`` passed with no request.
        Called only after a drain that sent everything: a heartbeat never waits in front of a batch.
        One attempt: failed or refused, the next is an interval later (the clock is any request)."""
        if not self._heartbeat_on() or self._pending:
            return
        if time.monotonic() - self._last_request < self.heartbeat_interval:
            return
        status = self._call("POST", f"/api/v1/runs/{self.run_id}/heartbeat", {"rank": self.rank})
        if status is not None and 200 <= status < 300:
            self.counters["heartbeats"] += 1

    def _split(self, body: bytes, n: int) -> bool:
        """413: the collector's body limit is below this batch; send it as two halves instead
        (each with its own sequence number, spooled like any batch). False for a single record."""
        records = wire.decode_batch(body).records
        if len(records) < 2:
            return False
        half = len(records) // 2
        parts = []
        for chunk in (records[:half], records[half:]):
            batch = wire.Batch(self.run_id, self.rank, self._seq, chunk)
            self._seq += 1
            part = wire.encode_batch(batch)
            parts.append((batch.seq, part, batch.n_points(), self._spool(batch.seq, part)))
        self._pending.extendleft(reversed(parts))
        self.counters["split_batches"] += 1
        return True

    def _replay_others(self) -> None:
        """Once the collector answers: send what earlier runs on this machine left in the spool
        (killed, or ended while the collector was away). Spools of live runs are skipped."""
        if self._replay_root is None:
            return
        from .spool import pending_spools, replay
        root, self._replay_root = self._replay_root, None
        own = self.spool.dir if self.spool is not None else None
        for d in pending_spools(root):
            if d == own:
                continue
            try:
                outcome, sent = replay(d, self.client)
                self.counters["replayed_batches"] += sent
                if outcome == "unreachable":
                    return
            except Exception:
                self._warn_once("replay", "could not replay the spool at %s", d)

    def _send_finish(self) -> bool:
        """Mark the run ended; False when it is worth trying again (unreachable, 429, 5xx)."""
        if self._registered:
            status = self._call("POST", f"/api/v1/runs/{self.run_id}/finish",
                                {"status": self._finish_status or "finished", "rank": self.rank})
            if status is None or status in RETRYABLE:
                self.counters["retries"] += 1
                return False
            self._finish_acked = 200 <= status < 300
        return True


def _reason(payload: bytes) -> str:
    try:
        doc = json.loads(payload)
        return str(doc.get("reason") or doc.get("detail") or "")[:200]
    except Exception:
        return payload[:200].decode(errors="replace")
