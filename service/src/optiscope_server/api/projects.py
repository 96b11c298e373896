"""``/api/v1/projects``: the projects a caller can see, and deleting one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from optiscope import wire

from . import schemas as m
from .deps import Admin, CollectorDep, Read, own_project, remote
from .errors import ERRORS
from .runs import delete_runs

router = APIRouter(prefix="/api/v1/projects", responses=ERRORS)


@router.get("", tags=["history"], response_model=m.ProjectList)
def list_projects(who: Read, collector: CollectorDep) -> m.ProjectList:
    """The projects the caller can see, with their number of runs and last activity."""
    return m.ProjectList(projects=[m.ProjectOut(**p) for p in collector.projects.list_projects(who.project)])


@router.delete("/{project}", tags=["retention"], response_model=m.Deleted)
def delete_project(
    request: Request,
    who: Admin,
    collector: CollectorDep,
    project: Annotated[str, Path(pattern=wire.NAME_RE.pattern, max_length=wire.MAX_NAME_LEN)],
    force: Annotated[bool, Query(description="delete its runs even while running")] = False,
) -> m.Deleted:
    """Delete a project and every run of it completely."""
    own_project(who, project)
    return delete_runs(collector.runs, who.actor, remote(request), project=project, force=force)
