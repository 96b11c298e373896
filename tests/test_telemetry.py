"""The collector traces itself with OpenTelemetry: a server span per request, a child span for store work."""

from __future__ import annotations

from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from optiscope import wire
from optiscope_server.app import create_app
from optiscope_server.settings import Settings


def test_requests_are_traced(tmp_path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 't.db'}"), tracer_provider=provider)
    with TestClient(app, base_url="http://127.0.0.1") as client:  # an open collector answers loopback
        assert client.put("/api/v1/runs/r1", json={"project": "p", "name": "n"}).status_code == 200
        body = wire.encode_batch(wire.Batch("r1", 0, 0, [(0, 0.0, {"loss": 1.0})]))
        assert client.post("/api/v1/runs/r1/batches", content=body).status_code == 200
        assert client.get("/api/v1/runs/nope").status_code == 404
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert "PUT /api/v1/runs/{run_id}" in spans
    server = spans["POST /api/v1/runs/{run_id}/batches"]
    assert server.attributes["http.response.status_code"] == 200
    store = spans["store.ingest"]
    assert store.parent.span_id == server.context.span_id and store.attributes["optiscope.points"] == 1
    assert spans["GET /api/v1/runs/{run_id}"].attributes["http.response.status_code"] == 404
