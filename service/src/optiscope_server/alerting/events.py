"""The native alert event: what webhooks receive (documented in the README), and what the Slack
and Alertmanager formats are rendered from."""

from __future__ import annotations

from typing import Any

from optiscope import wire
from optiscope.detect import AlertEvent


def evidence_json(ev: AlertEvent) -> dict | None:
    """The event's evidence as strict JSON: non-finite numbers spelled as the wire spells them,
    anything else that is not JSON as its string."""

    def clean(x: Any) -> Any:
        if isinstance(x, bool) or x is None or isinstance(x, (str, int)):
            return x
        if isinstance(x, float):
            return wire.encode_value(x)
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return str(x)

    return clean(dict(ev.evidence)) if ev.evidence else None


def webhook_event(alert_id: int, ev: AlertEvent, run: Any, run_url: str, now: float, started: float) -> dict:
    """The native JSON event POSTed to webhooks. ``run`` has ``id``, ``project`` and ``name``."""
    alert = {
        "id": alert_id,
        "rule": ev.rule,
        "severity": ev.severity,
        "state": ev.state,
        "series": ev.series,
        "step": ev.step,
        "rank": ev.rank,
        "value": wire.encode_value(ev.value),
        "message": ev.message,
        "evidence": evidence_json(ev) or {},
        "created_at": started,
    }
    if ev.state == "resolved":
        alert["resolved_at"] = now
    return {
        "type": f"alert.{ev.state}",
        "alert": alert,
        "run": {"id": run.id, "project": run.project, "name": run.name, "url": run_url},
        "time": now,
    }
