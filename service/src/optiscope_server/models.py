"""Typed request and response bodies of the REST API (they make the OpenAPI schema).

Float fields serialise NaN, +Inf and -Inf as the strings "NaN", "Infinity" and "-Infinity",
the same spelling as the wire format: non-finite values are data, never null.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from optiscope import wire

NONFINITE_AS_STRINGS = ConfigDict(ser_json_inf_nan="strings")


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = Field(pattern=wire.NAME_RE.pattern, max_length=wire.MAX_NAME_LEN)
    name: str = Field(min_length=1, max_length=200)
    config: dict[str, Any] = Field(default_factory=dict)
    rank: int = Field(0, ge=0)
    host: str | None = Field(None, max_length=255)
    pid: int | None = None


class RunOut(BaseModel):
    id: str
    project: str
    name: str
    status: str
    host: str | None
    created_at: float = Field(description="unix seconds")
    updated_at: float = Field(description="unix seconds of the last ingest or state change")
    finished_at: float | None
    url: str


class LastValue(BaseModel):
    model_config = NONFINITE_AS_STRINGS
    step: int
    value: float


class RunDetail(RunOut):
    model_config = NONFINITE_AS_STRINGS
    config: dict[str, Any]
    last: dict[str, LastValue] = Field(description="the newest point of each series")
    alerts: dict[str, int] = Field(description="number of alerts by state")


class RunList(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None = Field(None, description="pass as cursor= for the next page; null on the last page")


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
    downsampled: bool = Field(False, description="true when the points are a downsampled view (max_points): per "
                                                 "bucket and rank its first, last, smallest and largest value, and "
                                                 "every non-finite point")
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
    created_at: float
    resolved_at: float | None
    resolved_step: int | None
    run_url: str


class AlertList(BaseModel):
    alerts: list[AlertOut]


_RUN_FIELDS = ("id", "project", "name", "status", "host", "created_at", "updated_at", "finished_at")


def run_out(row: dict, url: str) -> RunOut:
    return RunOut(url=url, **{k: row[k] for k in _RUN_FIELDS})


def run_detail(row: dict, url: str) -> RunDetail:
    return RunDetail(url=url, config=row["config"], last=row["last"], alerts=row["alerts"],
                     **{k: row[k] for k in _RUN_FIELDS})


def alert_out(row: dict, run_url: str) -> AlertOut:
    return AlertOut(run_url=run_url, **{k: v for k, v in row.items() if k in AlertOut.model_fields})
