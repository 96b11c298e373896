"""``optiscope serve``: run the collector with uvicorn."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="optiscope serve", description="Run the optiscope collector.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8737)
    p.add_argument("--db", default=os.environ.get("OPTISCOPE_DB", "sqlite:///optiscope.db"),
                   help="SQLAlchemy URL: sqlite:///path.db or postgresql+psycopg://user@host/db "
                        "(default: optiscope.db in the working directory)")
    p.add_argument("--webhook", action="append", default=None,
                   help="POST alerts to this URL (repeatable; also OPTISCOPE_WEBHOOKS, comma-separated)")
    p.add_argument("--token", default=os.environ.get("OPTISCOPE_TOKEN"),
                   help="bearer token required on /api/v1 (also OPTISCOPE_TOKEN); "
                        "required when listening on a non-loopback address")
    p.add_argument("--public-url", default=None, help="base URL used in alert links (default http://HOST:PORT)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="largest request body accepted, counted after decompression (default 8 MiB)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def serve(argv: list[str]) -> int:
    args = parse(argv)
    if not _is_loopback(args.host) and not args.token:
        print(f"optiscope serve: refusing to listen on {args.host} without authentication; "
              "set --token or OPTISCOPE_TOKEN, or listen on 127.0.0.1", file=sys.stderr)
        return 2
    webhooks = args.webhook if args.webhook is not None else [
        u for u in os.environ.get("OPTISCOPE_WEBHOOKS", "").split(",") if u.strip()]
    import uvicorn

    from .app import Settings, create_app

    settings = Settings(db_url=args.db, webhooks=[w.strip() for w in webhooks], token=args.token or None,
                        public_url=args.public_url or f"http://{args.host}:{args.port}",
                        max_body_bytes=args.max_body_bytes)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                access_log=False)
    return 0


def main() -> None:
    sys.exit(serve(sys.argv[1:]))
