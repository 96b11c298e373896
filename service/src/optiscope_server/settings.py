"""Every setting of the collector, with its default, in one place.

``Settings`` is what the app runs with. ``parser()`` builds ``optiscope serve``'s command line from
the same defaults, and ``Settings.from_args`` reads the flags and, where a flag is absent, the
``OPTISCOPE_*`` environment variables, once, at start. The README's "Collector settings" table
documents each bound.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .alerting.dispatcher import DEFAULT_SCHEDULE

DEFAULT_DB_URL = "sqlite:///optiscope.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8737
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_HEARTBEAT_TIMEOUT = 300.0
#: Points one series query answers at most (its default ``limit``).
MAX_POINTS_PER_RESPONSE = 100_000


@dataclass
class Settings:
    """Every bound has a documented default (README, "Collector settings")."""

    db_url: str = DEFAULT_DB_URL
    webhooks: list[str] = field(default_factory=list)  # [FORMAT=]URL, every project's alerts
    webhook_secrets: list[str] = field(default_factory=list)  # sign the configured webhooks, newest first
    allow_internal_webhooks: bool = False  # private, loopback, link-local targets allowed
    webhook_schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    token: str | None = None
    public_url: str = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # after decompression
    max_series_per_run: int = 10_000
    metrics_max_runs: int = 200
    metrics_active_window: float = 300.0  # seconds a finished run stays in /metrics
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT  # seconds of silence before a running rank is crashed
    require_auth: bool = False  # set when listening beyond loopback: never open
    otel_console: bool = False  # print the collector's own trace spans (OPTISCOPE_OTEL_CONSOLE=1)

    def run_url(self, run_id: str) -> str:
        """The link to a run, in alerts and API answers."""
        return f"{self.public_url.rstrip('/')}/api/v1/runs/{run_id}"

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        """The settings ``optiscope serve`` runs with: flags first, then OPTISCOPE_* variables.
        Raises ValueError with a message for the user on a malformed value."""
        env = os.environ if env is None else env
        webhooks = args.webhook if args.webhook is not None else _listed(env.get("OPTISCOPE_WEBHOOKS", ""))
        secrets = (
            args.webhook_secret
            if args.webhook_secret is not None
            else _listed(env.get("OPTISCOPE_WEBHOOK_SECRETS", ""))
        )
        schedule: tuple[float, ...] = DEFAULT_SCHEDULE
        if args.webhook_retry_schedule:
            try:
                schedule = tuple(float(x) for x in args.webhook_retry_schedule.split(","))
            except ValueError:
                raise ValueError("--webhook-retry-schedule is comma-separated seconds") from None
        return cls(
            db_url=args.db,
            webhooks=[w.strip() for w in webhooks],
            token=args.token or None,
            public_url=args.public_url or f"http://{args.host}:{args.port}",
            max_body_bytes=args.max_body_bytes,
            heartbeat_timeout=args.heartbeat_timeout,
            require_auth=not is_loopback(args.host),
            webhook_secrets=secrets,
            allow_internal_webhooks=args.allow_internal_webhooks,
            otel_console=env.get("OPTISCOPE_OTEL_CONSOLE") == "1",
            webhook_schedule=schedule,
        )


def _listed(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_db_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        default=os.environ.get("OPTISCOPE_DB", DEFAULT_DB_URL),
        help="SQLAlchemy URL: sqlite:///path.db or postgresql+psycopg://user@host/db "
        "(default: OPTISCOPE_DB, else optiscope.db in the working directory)",
    )


def parser() -> argparse.ArgumentParser:
    """``optiscope serve``'s command line."""
    p = argparse.ArgumentParser(prog="optiscope serve", description="Run the optiscope collector.")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    add_db_argument(p)
    p.add_argument(
        "--webhook",
        action="append",
        default=None,
        metavar="[FORMAT=]URL",
        help="send every project's alerts to this URL, FORMAT native (default), slack or alertmanager "
        "(repeatable; also OPTISCOPE_WEBHOOKS, comma-separated)",
    )
    p.add_argument(
        "--webhook-secret",
        action="append",
        default=None,
        metavar="whsec_...",
        help="sign the --webhook deliveries (Standard Webhooks); give two during a rotation, newest "
        "first (also OPTISCOPE_WEBHOOK_SECRETS, comma-separated)",
    )
    p.add_argument(
        "--allow-internal-webhooks",
        action="store_true",
        help="allow webhook targets on private, loopback and link-local addresses (refused by default)",
    )
    p.add_argument(
        "--webhook-retry-schedule",
        default=None,
        metavar="S,S,...",
        help=f"seconds before each retry of a failed delivery (default {','.join(f'{s:g}' for s in DEFAULT_SCHEDULE)})",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("OPTISCOPE_TOKEN"),
        help="root bearer token: every scope on every project (also OPTISCOPE_TOKEN)",
    )
    p.add_argument("--public-url", default=None, help="base URL used in alert links (default http://HOST:PORT)")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted, counted after decompression (default 8 MiB)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=DEFAULT_HEARTBEAT_TIMEOUT,
        help=f"seconds without a batch or heartbeat after which a running rank is marked crashed "
        f"(default {DEFAULT_HEARTBEAT_TIMEOUT:g}; the SDK sends a heartbeat every 30 s when it has "
        "nothing else to send)",
    )
    p.add_argument("--log-level", default="info")
    return p
