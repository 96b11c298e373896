"""The REST API: one router per resource, their dependencies, schemas and errors."""

from . import alerts, audit, health, ingest, projects, runs, series, webhooks

#: In the order they are mounted (and listed in OpenAPI).
ROUTERS = [
    health.router,
    ingest.router,
    projects.router,
    runs.router,
    series.router,
    alerts.router,
    audit.router,
    webhooks.router,
]

__all__ = ["ROUTERS"]
