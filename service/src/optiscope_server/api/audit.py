"""``/api/v1/audit``: administrative actions (tokens, acknowledgements, deletions, webhooks)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from optiscope import wire

from ..storage.audit import list_audit
from . import schemas as m
from .deps import BIG, Admin, CollectorDep, own_project
from .errors import ERRORS

router = APIRouter(prefix="/api/v1", tags=["admin"], responses=ERRORS)


@router.get("/audit", response_model=m.AuditList)
def audit_log(
    who: Admin,
    collector: CollectorDep,
    project: Annotated[str | None, Query(max_length=wire.MAX_NAME_LEN)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=BIG, description="next_cursor of the previous page")] = None,
) -> m.AuditList:
    """Administrative actions (tokens, acknowledgements, deletions), newest first."""
    project = own_project(who, project)
    rows = list_audit(collector.db.engine, project, action, limit, cursor)
    return m.AuditList(
        entries=[m.AuditEntry(**r) for r in rows], next_cursor=str(rows[-1]["id"]) if len(rows) == limit else None
    )
