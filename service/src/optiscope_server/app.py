"""The collector's HTTP app: the routers of ``api`` over the parts a ``Collector`` wires together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from opentelemetry.sdk.trace import TracerProvider

from . import __version__
from .alerting.detection import DetectorFactory
from .api import ROUTERS, errors
from .api.params import refuse_nul
from .collector import Collector
from .settings import Settings
from .telemetry import default_provider, instrument


def create_app(
    settings: Settings, tracer_provider: TracerProvider | None = None, detectors: DetectorFactory | None = None
) -> FastAPI:
    """The app. The collector's parts are built and started when the app starts (its lifespan),
    and closed when it stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        collector = app.state.collector = Collector(settings, detectors).start()
        yield
        collector.close()

    app = FastAPI(
        title="optiscope collector",
        version=__version__,
        lifespan=lifespan,
        dependencies=[Depends(refuse_nul)],
        description="Ingest, history, metrics and alerts for optimizer-state observability.",
    )
    app.state.tracer_provider = tracer_provider or default_provider(settings.otel_console)
    app.state.tracer = instrument(app, app.state.tracer_provider)
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
