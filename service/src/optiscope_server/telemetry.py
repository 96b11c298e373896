"""OpenTelemetry tracing of the collector itself: one server span per request, child spans for
store work. Spans go to the console with OPTISCOPE_OTEL_CONSOLE=1 (``Settings.otel_console``), or to any exporter a caller
attaches to the provider (tests use an in-memory one)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode


def default_provider(console: bool = False) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "optiscope-collector"}))
    if console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider


def instrument(app: FastAPI, provider: TracerProvider) -> trace.Tracer:
    tracer = provider.get_tracer("optiscope_server")

    @app.middleware("http")
    async def _trace(request: Request, call_next):
        with tracer.start_as_current_span(
            f"{request.method} {request.url.path}",
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.url.path},
        ) as span:
            response = await call_next(request)
            route = request.scope.get("route")
            if route is not None:  # low-cardinality name: the route template, not the concrete path
                span.update_name(f"{request.method} {route.path}")
                span.set_attribute("http.route", route.path)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return tracer
