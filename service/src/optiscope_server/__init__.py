"""optiscope-server: the collector (ingest, store, REST, Prometheus metrics, alerting)."""

from importlib.metadata import version

#: The installed distribution's version: declared once, in service/pyproject.toml.
__version__ = version("optiscope-server")
