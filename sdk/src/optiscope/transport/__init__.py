"""How records leave the training process: bounded queue, batching exporter thread, HTTP."""
from .exporter import Exporter
from .http import HttpClient

__all__ = ["Exporter", "HttpClient"]
