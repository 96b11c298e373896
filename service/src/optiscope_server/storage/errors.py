"""What the store refuses, in words the API maps to status codes."""

from __future__ import annotations


class NotFound(LookupError):
    pass


class Rejected(ValueError):
    """Input the store refuses; ``reason`` is machine-readable."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
