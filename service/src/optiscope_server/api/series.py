"""``/api/v1/runs/{id}/series`` and ``/api/v1/series``: a run's series catalog, one series' points
(downsampled on request, as JSON or CSV), and one series of several runs for comparison."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from optiscope import wire

from ..collector import Collector
from ..settings import MAX_POINTS_PER_RESPONSE
from . import schemas as m
from .deps import BIG, CollectorDep, Read, RunId, visible
from .errors import ERRORS, ApiError
from .params import series_csv

router = APIRouter(prefix="/api/v1", tags=["history"], responses=ERRORS)

Rank = Annotated[int | None, Query(ge=0, le=wire.MAX_RANK)]
Step = Annotated[int | None, Query(ge=0, le=BIG)]
Limit = Annotated[int, Query(ge=1, le=MAX_POINTS_PER_RESPONSE)]
MaxPoints = Annotated[
    int | None,
    Query(
        ge=4,
        le=MAX_POINTS_PER_RESPONSE,
        description="downsample to about this many points, keeping every bucket's extremes and every non-finite point",
    ),
]


def series_data(
    collector: Collector,
    run_id: str,
    name: str,
    rank: int | None,
    start: int | None,
    end: int | None,
    limit: int,
    max_points: int | None,
) -> m.SeriesData:
    steps, ranks, values, truncated, width = collector.series.get_series(
        run_id, name, rank, start, end, limit, max_points
    )
    return m.SeriesData(
        run_id=run_id,
        name=name,
        steps=steps,
        ranks=ranks,
        values=values,
        truncated=truncated,
        downsampled=width is not None,
        bucket_steps=width,
    )


@router.get("/runs/{run_id}/series", response_model=m.SeriesList)
def list_series(run_id: RunId, who: Read, collector: CollectorDep) -> m.SeriesList:
    """The series catalog of a run, with each series' last step and value."""
    visible(collector, who, run_id)
    return m.SeriesList(run_id=run_id, series=[m.SeriesInfo(**s) for s in collector.series.list_series(run_id)])


@router.get(
    "/runs/{run_id}/series/{name:path}",
    response_model=m.SeriesData,
    responses={
        200: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "the points, as JSON or (format=csv) as CSV: step,rank,value",
        }
    },
)
def get_series(
    name: str,
    run_id: RunId,
    who: Read,
    collector: CollectorDep,
    rank: Rank = None,
    start: Step = None,
    end: Step = None,
    limit: Limit = MAX_POINTS_PER_RESPONSE,
    max_points: MaxPoints = None,
    format: Literal["json", "csv"] = "json",
) -> Any:
    """The points of one series, optionally downsampled, as JSON or CSV."""
    visible(collector, who, run_id)
    data = series_data(collector, run_id, name, rank, start, end, limit, max_points)
    if format == "csv":
        return Response(
            series_csv(data),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{run_id}.csv"'},
        )
    return data


@router.get("/series", response_model=m.SeriesComparison)
def compare_series(
    who: Read,
    collector: CollectorDep,
    name: Annotated[str, Query(pattern=wire.NAME_RE.pattern, max_length=wire.MAX_NAME_LEN)],
    run: Annotated[list[str], Query(min_length=1, max_length=20, description="run ids, repeated")],
    rank: Rank = None,
    start: Step = None,
    end: Step = None,
    limit: Limit = MAX_POINTS_PER_RESPONSE,
    max_points: MaxPoints = None,
) -> m.SeriesComparison:
    """The same series of several runs in one call, each downsampled alike: for comparison."""
    for r in run:
        if not wire.RUN_ID_RE.fullmatch(r):
            raise ApiError(422, "bad_run_id", {"loc": ["query", "run"], "input": r})
        visible(collector, who, r)
    return m.SeriesComparison(
        name=name, runs=[series_data(collector, r, name, rank, start, end, limit, max_points) for r in run]
    )
