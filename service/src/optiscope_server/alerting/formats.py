"""Delivery formats for alert events: the native JSON event, a Slack message, Alertmanager alerts.

Every format starts from the native event (``alertstore.webhook_event``) and is rendered when the
event is sent, so one outbox row can go out in whichever form its target wants. Bodies are strict
JSON: NaN and +-Inf are data here, so they are spelled "NaN", "Infinity", "-Infinity" before
dumping, and ``allow_nan=False`` turns any value that slipped through into an error here rather
than a body that Slack, Alertmanager or a strict parser would reject.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from optiscope import wire

FORMATS = ("native", "slack", "alertmanager")
CONTENT_TYPE = "application/json"

# Alertmanager resolves an alert sent without endsAt at receipt + resolve_timeout (5m unless its
# config says otherwise); re-sending well inside that window keeps a firing alert active even if a
# send or two is lost. Prometheus itself re-sends every minute.
ALERTMANAGER_REFRESH_SECONDS = 60.0

# Slack Block Kit limits (https://api.slack.com/reference/block-kit/blocks): a header's text is at
# most 150 characters, a section's text 3000, each section field 2000, at most 10 fields.
_SLACK_HEADER_MAX = 150
_SLACK_SECTION_MAX = 3000
_SLACK_FIELD_MAX = 2000
_SLACK_FALLBACK_MAX = 500  # the notification text; Slack allows far more, a phone shows far less
_RUN_NAME_MAX = 200


def render(fmt: str, event: dict) -> tuple[bytes, str]:
    """The body and content type that deliver one native ``event`` in format ``fmt``.

    ValueError for an unknown format or an alert state other than firing/resolved; such an event
    can never be delivered, however often it is retried."""
    if fmt == "native":
        return _dump(wire.json_safe(event)), CONTENT_TYPE
    if fmt == "slack":
        return _dump(slack_message(event)), CONTENT_TYPE
    if fmt == "alertmanager":
        # The v2 API takes a list (postableAlerts); one event is one alert.
        return _dump([alertmanager_alert(event)]), CONTENT_TYPE
    raise ValueError(f"unknown delivery format {fmt!r}; one of {', '.join(FORMATS)}")


def _dump(obj) -> bytes:
    # ensure_ascii keeps the body 7-bit: unicode run names travel as \u escapes, which every JSON
    # parser decodes, and a stray lone surrogate cannot make the encoder fail.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _value_text(value) -> str:
    """A metric value as text: floats in their shortest exact form, non-finite ones spelled."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return wire.value_text(value)
    return str(value)  # already spelled by the collector


def _state(event: dict) -> str:
    state = event["alert"].get("state") or event["type"].removeprefix("alert.")
    if state not in ("firing", "resolved"):
        raise ValueError(f"alert state must be firing or resolved, not {state!r}")
    return state


def _times(event: dict) -> tuple[float, float | None]:
    """(start, end) of the alert in unix seconds; end is None while it fires.

    A resolved event without ``created_at`` starts and ends at ``time``: still a valid resolved
    alert, and the same labels make Alertmanager resolve the one it already holds.
    """
    alert, t = event["alert"], float(event["time"])
    start = alert.get("created_at")
    start = t if start is None else float(start)
    if _state(event) == "firing":
        return start, None
    end = alert.get("resolved_at")
    end = t if end is None else float(end)
    # Alertmanager answers 400 to endsAt before startsAt, and the outbox would retry that forever;
    # two clocks that disagree slightly must not lose the resolution.
    return min(start, end), end


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- Slack -----------------------------------------------------------------------------------------
_SLACK_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _units(text: str) -> int:
    # Counted in UTF-16 code units, the larger of the ways Slack might count: an emoji in a run
    # name is two, so a clipped text stays inside a limit however Slack counts it.
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _cut(pieces: list[str], limit: int | None) -> str:
    """The pieces joined, or as many as fit in ``limit`` followed by an ellipsis: cutting between
    pieces never splits an escape such as ``&amp;``."""
    text = "".join(pieces)
    if limit is None or _units(text) <= limit:
        return text
    out, n = [], 0
    for piece in pieces:
        if n + _units(piece) > limit - 1:  # room for the ellipsis
            break
        out.append(piece)
        n += _units(piece)
    return "".join(out) + "…"


def _esc(text, limit: int | None = None) -> str:
    """``text`` for Slack mrkdwn: only & < > escaped, as Slack asks, then cut to ``limit``.
    Escaping is what stops a run name such as ``<!channel>`` from notifying a whole channel."""
    return _cut([_SLACK_ESCAPES.get(ch, ch) for ch in ("" if text is None else str(text))], limit)


def slack_message(event: dict) -> dict:
    """A Slack incoming-webhook message (``text`` fallback plus Block Kit ``blocks``)."""
    alert, run = event["alert"], event.get("run") or {}
    state = _state(event)
    severity = str(alert.get("severity") or "")
    if state == "resolved":
        icon, headline = ":white_check_mark:", "Resolved"
    else:
        icon, headline = (":rotating_light:" if severity == "page" else ":warning:"), "Firing"
    # The header is plain_text, where Slack shows characters as they are: only our own words
    # (state, severity, rule id) go there; user-controlled text goes into escaped mrkdwn below.
    header = _cut(list(f"{icon} {headline} [{severity}]: {alert.get('rule')}"), _SLACK_HEADER_MAX)

    name = str(run.get("name") or run.get("id") or "?")
    url = run.get("url")
    # <url|text> is Slack's link; `|` and `>` in the URL would end it early, so they are encoded.
    link = f"<{_esc(str(url).replace('|', '%7C').replace('>', '%3E'))}|{_esc(name, _RUN_NAME_MAX)}>" if url else None
    budget = _SLACK_FIELD_MAX - 20  # what a field's value may use besides its bold label
    fields = [
        ("Project", _esc(run.get("project"), budget)),
        ("Run", link if link and _units(link) <= budget else _esc(name, budget)),
        ("Rule", _esc(alert.get("rule"), budget)),
        ("Series", _esc(alert.get("series"), budget)),
        ("Step", _esc(alert.get("step"), budget)),
        ("Rank", _esc(alert.get("rank"), budget)),
        ("Value", _esc(_value_text(alert.get("value")), budget)),
    ]
    message = str(alert.get("message") or "")
    fallback = f"{headline} [{severity}] {alert.get('rule')}: {message} ({run.get('project')}/{name})"
    t = float(event["time"])
    # Slack shows the time in the reader's zone; the text after | is for clients that can't.
    when = f"<!date^{int(t)}^{{date_short_pretty}} {{time_secs}}|{_rfc3339(t)}>"
    return {
        "text": _esc(fallback.replace("\n", " "), _SLACK_FALLBACK_MAX),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _esc(message, _SLACK_SECTION_MAX) or " "},
                "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in fields],
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": when}]},
        ],
    }


# -- Alertmanager ----------------------------------------------------------------------------------
def alertmanager_alert(event: dict) -> dict:
    """One alert in Alertmanager API v2 ``postableAlerts`` form.

    Labels (identity, routing, silences) are the same for the firing and the resolved event of one
    alert, which is how Alertmanager knows the second resolves the first:

    - ``alertname``: ``optiscope_<rule>``, e.g. ``optiscope_non_finite``. The prefix keeps these
      apart from other sources in a shared Alertmanager (and from the Prometheus rules'
      ``Optiscope*`` alerts), and a route can take them all with ``alertname=~"optiscope_.+"``.
    - ``alert_id``: the collector's alert id. One incident is one Alertmanager alert: a series that
      fires, resolves and fires again is a new alert, not a resolved one coming back.
    - ``severity``, ``project``, ``run_id``, ``run_name``, ``series``, ``rank``: as in the event, as
      strings. Absent ones are left out (Alertmanager drops empty labels anyway).

    What changes between sends is an annotation: ``summary`` (the message), ``description``,
    ``value`` (spelled if non-finite), ``step``. ``generatorURL`` is the run's REST URL.

    Timing: ``startsAt`` is when the alert fired (``alert.created_at``, else the event's ``time``).
    A resolved event carries ``endsAt`` (``alert.resolved_at``, else ``time``) and resolves the
    alert at once. A firing event carries no ``endsAt``: it would be a guess at how long the alert
    lasts, and a delivery retried by the outbox could arrive already past it. Alertmanager then
    sets endsAt to receipt + ``resolve_timeout`` (global, default 5m) and resolves the alert by
    itself unless it hears of it again, so a firing alert must be re-sent well inside that window
    (every ``ALERTMANAGER_REFRESH_SECONDS``): see ``alertmanager_refresh``.
    """
    alert, run = event["alert"], event.get("run") or {}
    labels = {
        "alertname": f"optiscope_{alert['rule']}",
        "alert_id": alert.get("id"),
        "severity": alert.get("severity"),
        "project": run.get("project"),
        "run_id": run.get("id"),
        "run_name": run.get("name"),
        "series": alert.get("series"),
        "rank": alert.get("rank"),
    }
    labels = {k: str(v) for k, v in labels.items() if v is not None and str(v) != ""}
    value = _value_text(alert.get("value"))
    message = str(alert.get("message") or "")
    description = (
        f"{message}. Run {run.get('name')} ({run.get('id')}) in project {run.get('project')}: "
        f"rule {alert.get('rule')}, series {alert.get('series')}, step {alert.get('step')}, "
        f"rank {alert.get('rank')}, value {value}."
    )
    annotations = {
        "summary": message,
        "description": description,
        "value": value,
        "step": "" if alert.get("step") is None else str(alert.get("step")),
    }
    start, end = _times(event)
    out = {"labels": labels, "annotations": {k: v for k, v in annotations.items() if v}, "startsAt": _rfc3339(start)}
    if end is not None:
        out["endsAt"] = _rfc3339(end)
    if run.get("url"):
        out["generatorURL"] = str(run["url"])
    return out


def alertmanager_refresh(events: list[dict]) -> bytes:
    """One ``/api/v2/alerts`` body that re-sends several alerts at once.

    Pass every alert that is still firing, each as its latest native event, every
    ``ALERTMANAGER_REFRESH_SECONDS`` (well under Alertmanager's ``resolve_timeout``): each re-send
    pushes its endsAt out again, and an alert that stops being sent resolves by itself after
    resolve_timeout, which is what happens if the collector dies. Alertmanager also asks clients
    to keep re-sending resolved alerts for about 5 minutes, in case it restarted in between and
    missed the resolution; resolved events may be passed too and render with their endsAt.
    """
    return _dump([alertmanager_alert(e) for e in events])
