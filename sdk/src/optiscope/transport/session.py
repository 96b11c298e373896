"""The collector's endpoints as one (run, rank) uses them: one method per request, each answering
the HTTP status, or None when the collector could not be reached.

Deciding *when* to send (backoff, heartbeats, the end of the run) is the exporter's job
(``collector.CollectorExporter``); this module only says how each request is made and what
its answers mean for the log: a refusal worth one line, a ``Retry-After`` worth remembering.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import rundoc
from .http import RETRYABLE, UNAUTHORIZED, Body, Transport, TransportError
from .record import WarnOnce
from .spool import pending_spools, replay


class CollectorSession:
    """``last_request``: when the last request was made, answered or not (the heartbeat's clock);
    ``retry_after``: the wait a 429/503 asked for, capped at ``backoff_max`` (0: none)."""

    def __init__(self, transport: Transport, run_id: str, rank: int, backoff_max: float):
        self.transport = transport
        self.run_id, self.rank, self.backoff_max = run_id, rank, backoff_max
        self.last_request = time.monotonic()
        self.retry_after = 0.0
        self._warn = WarnOnce()

    def call(self, method: str, path: str, body: Body, quiet: frozenset[int] = frozenset()) -> int | None:
        """Returns the status, or None when the collector could not be reached. ``quiet``: refusals
        the caller handles itself, so not logged here."""
        try:
            status, headers, payload = self.transport.request(method, path, body)
        except TransportError as e:
            self.last_request = time.monotonic()
            self._warn(
                "unreachable", "collector at %s unreachable (%s); will keep retrying", self.transport.base_url, e
            )
            return None
        if status in RETRYABLE and headers.get("retry-after", "").strip().isdigit():
            # the collector says when to come back (bounded by backoff_max)
            self.retry_after = min(self.backoff_max, float(headers["retry-after"]))
        self.last_request = time.monotonic()
        refused_for_good = status not in RETRYABLE and status not in UNAUTHORIZED and status != 413
        if status >= 400 and refused_for_good and status not in quiet:  # the caller says what a 401/403 means
            reason = _reason(payload)
            self._warn(
                f"http{status}:{reason}", "%s %s rejected with %d (%s); dropping it", method, path, status, reason
            )
        return status

    def register(self, doc: dict[str, Any]) -> int | None:
        """``PUT`` the run's document; an older collector that refuses its tags/environment gets the
        core of it instead (``rundoc.put_run``)."""

        def put(method: str, path: str, body: dict[str, Any]) -> int | None:
            # Only a refused core is worth the generic "rejected" line: the fallback says the rest.
            optional = rundoc.core(body) is not None
            return self.call(method, path, body, quiet=rundoc.REFUSED if optional else frozenset())

        status, fell_back = rundoc.put_run(put, self.run_id, doc)
        if fell_back:
            self._warn(
                "doc_refused", "the collector refused the run's tags/environment; the run is registered without them"
            )
        return status

    def send_batch(self, body: bytes) -> int | None:
        return self.call("POST", f"/api/v1/runs/{self.run_id}/batches", body)

    def heartbeat(self) -> int | None:
        return self.call("POST", f"/api/v1/runs/{self.run_id}/heartbeat", {"rank": self.rank})

    def finish(self, status: str) -> int | None:
        return self.call("POST", f"/api/v1/runs/{self.run_id}/finish", {"status": status, "rank": self.rank})

    def replay_spools(self, root: Path, own: Path | None) -> int:
        """Send what earlier runs on this machine left under ``root`` (killed, or ended while the
        collector was away), except ``own``; spools of live runs are skipped. Returns the batches
        sent; stops when the collector cannot be reached. A spool this run's token may not deliver
        (another project's, say) is left whole for ``optiscope sync`` with the right token."""
        sent = 0
        for d in pending_spools(root):
            if d == own:
                continue
            try:
                outcome, n = replay(d, self.transport)
                sent += n
                if outcome == "unreachable":
                    break
                if outcome in ("unauthorized", "refused"):
                    self._warn(
                        "replay-" + outcome,
                        "left an earlier run's spool at %s as it was: the collector %s it (run `optiscope sync` "
                        "with a token of that run's project)",
                        d,
                        "refused this token for" if outcome == "unauthorized" else "refused",
                    )
            except Exception:
                self._warn("replay", "could not replay the spool at %s", d)
        return sent

    def close(self) -> None:
        self.transport.close()


def _reason(payload: bytes) -> str:
    try:
        doc = json.loads(payload)
        return str(doc.get("reason") or doc.get("detail") or "")[:200]
    except Exception:
        return payload[:200].decode(errors="replace")
