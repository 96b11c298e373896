"""optiscope-server: the collector (ingest, store, REST, Prometheus metrics, alerting)."""
__version__ = "0.1.0"
