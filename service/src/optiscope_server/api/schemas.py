"""Typed request and response bodies of the REST API (they make the OpenAPI schema).

Float fields serialise NaN, +Inf and -Inf as the strings "NaN", "Infinity" and "-Infinity",
the same spelling as the wire format: non-finite values are data, never null.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from optiscope import wire

NONFINITE_AS_STRINGS = ConfigDict(ser_json_inf_nan="strings")
#: PostgreSQL's text cannot hold a NUL character; refuse it at the door rather than fail at commit.
NO_NUL = r"^[^\x00]*$"


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = Field(pattern=wire.NAME_RE.pattern, max_length=wire.MAX_NAME_LEN)
    name: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    config: dict[str, Any] = Field(default_factory=dict)
    rank: int = Field(0, ge=0, le=wire.MAX_RANK)
    host: str | None = Field(None, max_length=255, pattern=NO_NUL)
    pid: int | None = None
    tags: list[str] = Field(
        default_factory=list,
        max_length=wire.MAX_TAGS,
        description="labels to find the run by (tag= filter); they accumulate across ranks",
    )
    environment: dict[str, Any] | None = Field(
        None, description="this rank's environment fingerprint (the SDK collects it)"
    )

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        bad = [t for t in tags if not wire.valid_tag(t)]
        if bad:
            raise ValueError(f"tags must match {wire.TAG_RE.pattern}: {bad[:3]}")
        return tags

    @field_validator("config", "environment")
    @classmethod
    def _no_nul(cls, doc: dict | None) -> dict | None:
        if doc is not None and "\\u0000" in json.dumps(doc):  # PostgreSQL's JSON operators fail on it
            raise ValueError("no key or string may contain a NUL character")
        return doc

    @field_validator("environment")
    @classmethod
    def _environment(cls, env: dict | None) -> dict | None:
        if env is not None and len(json.dumps(env)) > wire.MAX_ENVIRONMENT_BYTES:
            raise ValueError(f"environment exceeds {wire.MAX_ENVIRONMENT_BYTES} bytes of JSON")
        return env


class ErrorOut(BaseModel):
    reason: str = Field(description="machine-readable")
    detail: Any = Field(description="for people, or the offending field")


class RunOut(BaseModel):
    id: str
    project: str
    name: str
    status: str
    host: str | None
    created_at: float = Field(description="unix seconds")
    updated_at: float = Field(description="unix seconds of the last ingest or state change")
    finished_at: float | None
    tags: list[str] = Field(default_factory=list)
    url: str


class RankOut(BaseModel):
    rank: int
    status: str
    host: str | None
    started_at: float
    finished_at: float | None
    last_seen: float | None = Field(description="unix seconds the collector last heard from this rank")
    crash_reason: str | None = Field(description="reported (by the SDK) or heartbeat (silent too long)")
    environment: dict[str, Any] | None


class LastValue(BaseModel):
    model_config = NONFINITE_AS_STRINGS
    step: int
    value: float


class RunDetail(RunOut):
    model_config = NONFINITE_AS_STRINGS
    config: dict[str, Any]
    environment: dict[str, Any] | None = Field(description="the environment of the lowest rank that sent one")
    environment_differs: list[str] = Field(description="environment keys whose values differ between ranks")
    ranks: list[RankOut]
    last: dict[str, LastValue] = Field(description="the newest point of each series")
    alerts: dict[str, int] = Field(description="number of alerts by state, and firing_unacknowledged")


class RunList(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None = Field(None, description="pass as cursor= for the next page; null on the last page")


class ProjectOut(BaseModel):
    name: str
    created_at: float
    runs: int
    running: int
    last_activity: float | None = Field(description="unix seconds of the last ingest or state change of any run")


class ProjectList(BaseModel):
    projects: list[ProjectOut]


class AuditEntry(BaseModel):
    id: int
    at: float
    actor: str = Field(description="root, anonymous, token:<id> (<name>), or cli:<user>")
    action: str = Field(description="token.create, token.revoke, alert.acknowledge, run.delete, project.delete")
    project: str | None
    target: str | None
    detail: dict[str, Any] | None
    remote: str | None


class AuditList(BaseModel):
    entries: list[AuditEntry]
    next_cursor: str | None = Field(None, description="pass as cursor= for older entries")


class Deleted(BaseModel):
    deleted: list[str] = Field(description="the ids of the runs deleted")


class SeriesInfo(BaseModel):
    model_config = NONFINITE_AS_STRINGS
    name: str
    last_step: int | None
    last_value: float | None


class SeriesList(BaseModel):
    run_id: str
    series: list[SeriesInfo]


class SeriesData(BaseModel):
    model_config = NONFINITE_AS_STRINGS
    run_id: str
    name: str
    steps: list[int]
    ranks: list[int]
    values: list[float]
    truncated: bool = Field(description="true when more points matched than the limit")
    downsampled: bool = Field(
        False,
        description="true when the points are a downsampled view (max_points): per "
        "bucket and rank its first, last, smallest and largest value, and "
        "every non-finite point",
    )
    bucket_steps: int | None = Field(None, description="the width in steps of a downsampling bucket")


class SeriesComparison(BaseModel):
    model_config = NONFINITE_AS_STRINGS
    name: str
    runs: list[SeriesData] = Field(description="one entry per requested run, in the order asked")


class IngestOut(BaseModel):
    duplicate: bool = Field(description="the batch was already stored; nothing was stored again")
    points: int
    alerts: list[int]


class AlertOut(BaseModel):
    model_config = NONFINITE_AS_STRINGS
    id: int
    run_id: str
    project: str
    rule: str
    severity: str
    state: str
    series: str
    rank: int
    step: int
    value: float
    message: str
    evidence: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "what triggered the alert: the window of steps, the values and thresholds compared, the baseline; "
            "non-finite numbers as the strings NaN, Infinity, -Infinity; inhibited_by: the id of the alert "
            "already paging for this incident (this one was stored but not delivered)"
        ),
    )
    created_at: float
    resolved_at: float | None
    resolved_step: int | None
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    ack_note: str | None = None
    run_url: str


class AlertList(BaseModel):
    alerts: list[AlertOut]
    next_cursor: str | None = Field(None, description="pass as cursor= for older alerts")


class FinishIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["finished", "crashed"] = "finished"
    rank: int = Field(0, ge=0, le=wire.MAX_RANK)


class HeartbeatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(0, ge=0, le=wire.MAX_RANK)


class AckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = Field(None, max_length=1000, pattern=NO_NUL)


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2000, pattern=r"^https?://[^\x00\s]+$")
    format: Literal["native", "slack", "alertmanager"] = "native"
    project: str | None = Field(
        None,
        pattern=wire.NAME_RE.pattern,
        max_length=wire.MAX_NAME_LEN,
        description="whose alerts it receives; a project token's own by default; "
        "null with the root token: every project's",
    )
    secret: str | None = Field(None, max_length=200, description="whsec_...; made here when absent")
    signed: bool = Field(True, description="false: no webhook-signature (Slack and Alertmanager ignore it)")


class WebhookOut(BaseModel):
    id: int
    url: str
    format: str
    project: str | None
    secrets: int = Field(description="number of signing secrets (two during a rotation)")
    source: str = Field(description="api, or config: given on the collector's command line")
    created_at: float
    created_by: str | None
    disabled_at: float | None
    disabled_reason: str | None
    secret: str | None = Field(None, description="the new signing secret: shown once, on creation or rotation")


class WebhookList(BaseModel):
    webhooks: list[WebhookOut]


_RUN_FIELDS = ("id", "project", "name", "status", "host", "created_at", "updated_at", "finished_at")


def run_out(row: dict, url: str) -> RunOut:
    return RunOut(url=url, tags=row.get("tags", []), **{k: row[k] for k in _RUN_FIELDS})


def run_detail(row: dict, url: str) -> RunDetail:
    return RunDetail(
        url=url,
        config=row["config"],
        last=row["last"],
        alerts=row["alerts"],
        tags=row["tags"],
        environment=row["environment"],
        environment_differs=row["environment_differs"],
        ranks=[RankOut(**{k: r[k] for k in RankOut.model_fields}) for r in row["ranks"]],
        **{k: row[k] for k in _RUN_FIELDS},
    )


def alert_out(row: dict, run_url: str) -> AlertOut:
    fields = {k: v for k, v in row.items() if k in AlertOut.model_fields}
    fields["evidence"] = fields.get("evidence") or {}  # alerts stored before evidence existed: NULL
    return AlertOut(run_url=run_url, **fields)


# -- the ingest body, as documented in OpenAPI (the decoder in the wire module is what enforces it) --
BATCH_JSON_V1 = {
    "type": "object",
    "title": "Batch (wire version 1)",
    "additionalProperties": False,
    "required": ["v", "run", "rank", "seq", "records"],
    "properties": {
        "v": {"const": 1},
        "run": {"type": "string", "pattern": wire.RUN_ID_RE.pattern, "maxLength": 64},
        "rank": {"type": "integer", "minimum": 0, "maximum": wire.MAX_RANK},
        "seq": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "records": {
            "type": "array",
            "maxItems": wire.MAX_RECORDS_PER_BATCH,
            "items": {
                "type": "array",
                "description": "[step, unix time, {series name: value}]",
                "prefixItems": [
                    {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                    {"type": "number"},
                    {
                        "type": "object",
                        "maxProperties": wire.MAX_VALUES_PER_RECORD,
                        "propertyNames": {"pattern": wire.NAME_RE.pattern, "maxLength": wire.MAX_NAME_LEN},
                        "additionalProperties": {
                            "anyOf": [{"type": "number"}, {"enum": list(wire.NONFINITE_SPELLINGS)}]
                        },
                    },
                ],
                "items": False,
                "minItems": 3,
                "maxItems": 3,
            },
        },
    },
}
BATCH_REQUEST_BODY = {
    "required": True,
    "description": "one wire batch, told apart by its first bytes: binary version 2 (what the SDK sends) or a "
    "version 1 JSON document; may be gzip-compressed (Content-Encoding: gzip)",
    "content": {
        wire.CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": BATCH_JSON_V1},
    },
}
