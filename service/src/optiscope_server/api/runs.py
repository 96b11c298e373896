"""``/api/v1/runs``: listing runs, one run's detail, deleting a run."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request

from optiscope import wire

from ..storage import Rejected, RunStore
from . import schemas as m
from .deps import Admin, CollectorDep, Read, RunId, own_project, remote, visible
from .errors import ERRORS, ApiError
from .params import config_filters, decode_cursor, encode_cursor

router = APIRouter(prefix="/api/v1/runs", responses=ERRORS)


@router.get("", tags=["history"], response_model=m.RunList)
def list_runs(
    who: Read,
    collector: CollectorDep,
    project: Annotated[str | None, Query(max_length=wire.MAX_NAME_LEN)] = None,
    status: Literal["running", "finished", "crashed"] | None = None,
    tag: Annotated[list[str], Query(description="repeatable: runs carrying every tag given")] = [],  # noqa: B006
    created_after: Annotated[float | None, Query(description="unix seconds, inclusive")] = None,
    created_before: Annotated[float | None, Query(description="unix seconds, exclusive")] = None,
    config: Annotated[
        list[str],
        Query(
            description="key=value, repeatable: a top-level config entry "
            "equal to value (a JSON number, true, false, null, "
            "or else a string)"
        ),
    ] = [],  # noqa: B006
    sort: Literal["created_at", "updated_at", "name"] = "created_at",
    order: Literal["desc", "asc"] = "desc",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=1000, description="next_cursor of the previous page")] = None,
) -> m.RunList:
    """Runs, newest first by default, one page at a time."""
    project = own_project(who, project)
    after = decode_cursor(cursor, sort, order) if cursor else None
    rows, last = collector.runs.list_runs(
        project,
        status,
        limit,
        created_after=created_after,
        created_before=created_before,
        config=config_filters(config),
        tags=tag,
        sort=sort,
        descending=order == "desc",
        after=after,
    )
    return m.RunList(
        runs=[m.run_out(r, collector.settings.run_url(r["id"])) for r in rows],
        next_cursor=encode_cursor(last, sort, order) if last else None,
    )


@router.get("/{run_id}", tags=["history"], response_model=m.RunDetail)
def get_run(run_id: RunId, who: Read, collector: CollectorDep) -> m.RunDetail:
    """One run: config, tags, environment of each rank, status, and a summary (last values, alerts)."""
    visible(collector, who, run_id)
    return m.run_detail(collector.runs.get_run(run_id), collector.settings.run_url(run_id))


@router.delete("/{run_id}", tags=["retention"], response_model=m.Deleted)
def delete_run(
    request: Request,
    run_id: RunId,
    who: Admin,
    collector: CollectorDep,
    force: Annotated[bool, Query(description="delete it even while running")] = False,
) -> m.Deleted:
    """Delete a run completely: ranks, series, points, alerts and their webhook deliveries."""
    visible(collector, who, run_id)
    return delete_runs(collector.runs, who.actor, remote(request), run_id=run_id, force=force)


def delete_runs(
    runs: RunStore,
    actor: str,
    remote: str | None,
    *,
    run_id: str | None = None,
    project: str | None = None,
    force: bool = False,
) -> m.Deleted:
    """Delete a run or a project's runs (audited); a running one without ``force`` is a 409."""
    try:
        return m.Deleted(deleted=runs.delete_runs(run_id, project, force, actor=actor, remote=remote))
    except Rejected as e:
        raise ApiError(409, e.reason, str(e)) from None
