"""Who is calling: a principal (an actor, the project it may see, its scopes), and the loopback
check an open collector uses against DNS rebinding.

Scopes: ``ingest`` (register runs, send batches, heartbeats, finish), ``read`` (every GET),
``admin`` (everything in its project: deletions, acknowledgements, webhooks, the audit log).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

SCOPES = ("ingest", "read", "admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``project`` None means every project (the root token, or an open collector)."""

    actor: str
    project: str | None
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def sees(self, project: str) -> bool:
        return self.project is None or self.project == project


ROOT = Principal("root", None, frozenset(SCOPES))
OPEN = Principal("anonymous", None, frozenset(SCOPES))


def loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback (with or without a port)."""
    host = host.strip().lower()
    name = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
