"""``optiscope serve`` (the collector with uvicorn), ``optiscope db`` (schema migrations) and
``optiscope token`` (API tokens): the collector's commands."""
from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import logging
import os
import socket
import sys

DEFAULT_DB = "sqlite:///optiscope.db"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get("OPTISCOPE_DB", DEFAULT_DB),
                   help="SQLAlchemy URL: sqlite:///path.db or postgresql+psycopg://user@host/db "
                        "(default: OPTISCOPE_DB, else optiscope.db in the working directory)")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="optiscope serve", description="Run the optiscope collector.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8737)
    _db_arg(p)
    p.add_argument("--webhook", action="append", default=None, metavar="[FORMAT=]URL",
                   help="send every project's alerts to this URL, FORMAT native (default), slack or alertmanager "
                        "(repeatable; also OPTISCOPE_WEBHOOKS, comma-separated)")
    p.add_argument("--webhook-secret", action="append", default=None, metavar="whsec_...",
                   help="sign the --webhook deliveries (Standard Webhooks); give two during a rotation, newest "
                        "first (also OPTISCOPE_WEBHOOK_SECRETS, comma-separated)")
    p.add_argument("--allow-internal-webhooks", action="store_true",
                   help="allow webhook targets on private, loopback and link-local addresses (refused by default)")
    p.add_argument("--webhook-retry-schedule", default=None, metavar="S,S,...",
                   help="seconds before each retry of a failed delivery (default 5,300,1800,7200,18000,36000,36000)")
    p.add_argument("--token", default=os.environ.get("OPTISCOPE_TOKEN"),
                   help="root bearer token: every scope on every project (also OPTISCOPE_TOKEN)")
    p.add_argument("--public-url", default=None, help="base URL used in alert links (default http://HOST:PORT)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="largest request body accepted, counted after decompression (default 8 MiB)")
    p.add_argument("--heartbeat-timeout", type=float, default=300.0,
                   help="seconds without a batch or heartbeat after which a running rank is marked crashed "
                        "(default 300; the SDK sends a heartbeat every 30 s when it has nothing else to send)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def serve(argv: list[str]) -> int:
    args = parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .access import Verifier
    from .db import make_engine

    engine = make_engine(args.db)  # applies pending migrations before anything listens
    try:
        has_tokens = Verifier(engine).any_token()
    finally:
        engine.dispose()
    public = not _is_loopback(args.host)
    if public and not (args.token or has_tokens):
        print(f"optiscope serve: refusing to listen on {args.host} without authentication; create a token "
              "(optiscope token create), or set --token or OPTISCOPE_TOKEN, or listen on 127.0.0.1", file=sys.stderr)
        return 2
    webhooks = args.webhook if args.webhook is not None else [
        u for u in os.environ.get("OPTISCOPE_WEBHOOKS", "").split(",") if u.strip()]
    secrets = args.webhook_secret if args.webhook_secret is not None else [
        s.strip() for s in os.environ.get("OPTISCOPE_WEBHOOK_SECRETS", "").split(",") if s.strip()]
    from . import hooks
    for w in webhooks:
        try:
            hooks.check_url(hooks.parse_spec(w)[1])
        except ValueError as e:
            print(f"optiscope serve: --webhook {w}: {e}", file=sys.stderr)
            return 2
    bad = [s for s in secrets if not hooks.valid_secret(s)]
    if bad:
        print("optiscope serve: a webhook secret is whsec_ followed by base64 of 24 to 64 bytes", file=sys.stderr)
        return 2
    try:
        schedule = tuple(float(x) for x in args.webhook_retry_schedule.split(",")) \
            if args.webhook_retry_schedule else None
    except ValueError:
        print("optiscope serve: --webhook-retry-schedule is comma-separated seconds", file=sys.stderr)
        return 2
    import uvicorn

    from .app import Settings, create_app

    settings = Settings(db_url=args.db, webhooks=[w.strip() for w in webhooks], token=args.token or None,
                        public_url=args.public_url or f"http://{args.host}:{args.port}",
                        max_body_bytes=args.max_body_bytes, heartbeat_timeout=args.heartbeat_timeout,
                        require_auth=public, webhook_secrets=secrets,
                        allow_internal_webhooks=args.allow_internal_webhooks,
                        **({"webhook_schedule": schedule} if schedule else {}))
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                access_log=False)
    return 0


def db(argv: list[str]) -> int:
    """``optiscope db upgrade|current``."""
    p = argparse.ArgumentParser(prog="optiscope db", description="The collector's database schema.")
    p.add_argument("action", choices=["upgrade", "current"],
                   help="upgrade: apply pending migrations; current: print the schema revision and the newest")
    _db_arg(p)
    args = p.parse_args(argv)
    from . import migrate
    from .db import make_engine

    engine = make_engine(args.db, migrate=False)
    try:
        if args.action == "upgrade":
            before, after = migrate.upgrade(engine)
            print(f"{before or 'empty'} -> {after}" if before != after else f"already at {after}")
        else:
            now, head = migrate.current(engine), migrate.head()
            print(f"{now or 'empty'} (newest: {head}{', up to date' if now == head else ', run optiscope db upgrade'})")
    finally:
        engine.dispose()
    return 0


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd entry)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def token(argv: list[str]) -> int:
    """``optiscope token create|list|revoke``: tokens live in the collector's database."""
    from .access import SCOPES

    p = argparse.ArgumentParser(prog="optiscope token", description="API tokens, scoped to one project.")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="make a token; it is printed once and only its hash is kept")
    c.add_argument("--project", required=True)
    c.add_argument("--scope", action="append", choices=SCOPES, required=True,
                   help="repeatable: ingest (trainers), read (dashboards, queries), admin (everything in the project)")
    c.add_argument("--name", default=None, help="what the token is for (default: the scopes)")
    ls = sub.add_parser("list", help="tokens (never their secrets)")
    ls.add_argument("--project", default=None)
    ls.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="revoke a token by its id (the 16 hex digits after osk_)")
    r.add_argument("id")
    for sp in (c, ls, r):
        _db_arg(sp)
    args = p.parse_args(argv)

    from optiscope import wire

    from . import access
    from .db import make_engine

    engine = make_engine(args.db)
    try:
        if args.action == "create":
            if not wire.valid_name(args.project):
                print(f"optiscope token: invalid project name {args.project!r}", file=sys.stderr)
                return 2
            secret, row = access.create_token(engine, args.project, args.scope, args.name or "+".join(args.scope),
                                              _actor())
            print(secret)
            print(f"id {row['id']}, project {row['project']}, scopes {row['scopes']}: store it now, it is not "
                  "shown again", file=sys.stderr)
        elif args.action == "list":
            rows = access.list_tokens(engine, args.project)
            if args.json:
                print(json.dumps(rows, indent=2))
            for t in [] if args.json else rows:
                state = "revoked" if t["revoked_at"] else "active"
                print(f"{t['id']}  {t['project']}  {t['scopes']:<18} {state:<8} {t['name']}")
        else:
            try:
                row = access.revoke_token(engine, args.id, _actor())
            except LookupError:
                print(f"optiscope token: no token with id {args.id!r}", file=sys.stderr)
                return 1
            print(f"revoked {row['id']} ({row['name']}, project {row['project']})")
    finally:
        engine.dispose()
    return 0


COMMANDS = {"serve": serve, "db": db, "token": token}


def main() -> None:
    sys.exit(serve(sys.argv[1:]))
