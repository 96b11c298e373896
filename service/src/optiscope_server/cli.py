"""The collector's commands: ``optiscope serve`` (the collector with uvicorn), ``optiscope db``
(schema migrations) and ``optiscope token`` (API tokens). The ``optiscope`` command of the SDK finds
them through the ``optiscope.commands`` entry points this package declares; ``optiscope-server`` is
``optiscope serve``."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import socket
import sys

from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError

from optiscope import wire

from .alerting import endpoints, signing
from .auth import SCOPES, Verifier, create_token, list_tokens, revoke_token
from .settings import Settings, add_db_argument, parser
from .storage import migrate
from .storage.database import make_engine


def serve(argv: list[str]) -> int:
    """``optiscope serve``: the collector, under uvicorn."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = Settings.from_args(args)
        check_webhooks(settings)
    except ValueError as e:
        print(f"optiscope serve: {e}", file=sys.stderr)
        return 2
    engine = open_database("optiscope serve", settings.db_url)  # applies pending migrations before anything listens
    if engine is None:
        return 2
    try:
        has_tokens = Verifier(engine).any_token()
    finally:
        engine.dispose()
    if settings.require_auth and not (settings.token or has_tokens):
        print(
            f"optiscope serve: refusing to listen on {args.host} without authentication; create a token "
            "(optiscope token create), or set --token or OPTISCOPE_TOKEN, or listen on 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    import uvicorn  # only the serving command needs it

    from .app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def open_database(prog: str, url: str, migrate: bool = True) -> Engine | None:
    """The engine of ``url`` (migrated unless told not to), or None after one line that says why it
    cannot be opened (a missing directory, a server that refuses): no traceback for a user's typo."""
    try:
        engine = make_engine(url, migrate=migrate)
        with engine.connect():
            pass
    except (OperationalError, OSError, ValueError) as e:
        why = getattr(e, "orig", None) or e
        print(f"{prog}: cannot open the database {_redacted(url)}: {why}", file=sys.stderr)
        return None
    return engine


def _redacted(url: str) -> str:
    """The URL without its password, for a message."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: say it as given
        return url


def check_webhooks(settings: Settings) -> None:
    """The configured endpoints and secrets are well formed (ValueError says which is not)."""
    for w in settings.webhooks:
        try:
            endpoints.check_url(endpoints.parse_spec(w)[1])
        except ValueError as e:
            raise ValueError(f"--webhook {w}: {e}") from None
    if any(not signing.valid_secret(s) for s in settings.webhook_secrets):
        raise ValueError("a webhook secret is whsec_ followed by base64 of 24 to 64 bytes")


def db(argv: list[str]) -> int:
    """``optiscope db upgrade|current``."""
    p = argparse.ArgumentParser(prog="optiscope db", description="The collector's database schema.")
    p.add_argument(
        "action",
        choices=["upgrade", "current"],
        help="upgrade: apply pending migrations; current: print the schema revision and the newest",
    )
    add_db_argument(p)
    args = p.parse_args(argv)
    engine = open_database("optiscope db", args.db, migrate=False)
    if engine is None:
        return 2
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


def _token_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optiscope token", description="API tokens, scoped to one project.")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="make a token; it is printed once and only its hash is kept")
    c.add_argument("--project", required=True)
    c.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        required=True,
        help="repeatable: ingest (trainers), read (dashboards, queries), admin (everything in the project)",
    )
    c.add_argument("--name", default=None, help="what the token is for (default: the scopes)")
    ls = sub.add_parser("list", help="tokens (never their secrets)")
    ls.add_argument("--project", default=None)
    ls.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="revoke a token by its id (the 16 hex digits after osk_)")
    r.add_argument("id")
    for sp in (c, ls, r):
        add_db_argument(sp)
    return p


def token(argv: list[str]) -> int:
    """``optiscope token create|list|revoke``: tokens live in the collector's database."""
    args = _token_parser().parse_args(argv)
    defaulted = "OPTISCOPE_DB" not in os.environ and not any(a == "--db" or a.startswith("--db=") for a in argv)
    path = make_url(args.db).database if args.db.startswith("sqlite") else None
    if defaulted and path and not os.path.exists(path):
        # A token in a database no collector uses is a token nobody can use: say so rather than make one.
        print(
            f"optiscope token: no collector database at {os.path.abspath(path)} (the default, optiscope.db in "
            "the working directory); pass --db or set OPTISCOPE_DB to the database `optiscope serve` uses",
            file=sys.stderr,
        )
        return 2
    engine = open_database("optiscope token", args.db)
    if engine is None:
        return 2
    try:
        if args.action == "create":
            if not wire.valid_name(args.project):
                print(f"optiscope token: invalid project name {args.project!r}", file=sys.stderr)
                return 2
            secret, row = create_token(engine, args.project, args.scope, args.name or "+".join(args.scope), _actor())
            print(secret)
            print(
                f"id {row['id']}, project {row['project']}, scopes {row['scopes']}, in {_redacted(args.db)}: "
                "store it now, it is not shown again",
                file=sys.stderr,
            )
        elif args.action == "list":
            rows = list_tokens(engine, args.project)
            if args.json:
                print(json.dumps(rows, indent=2))
            for t in [] if args.json else rows:
                state = "revoked" if t["revoked_at"] else "active"
                print(f"{t['id']}  {t['project']}  {t['scopes']:<18} {state:<8} {t['name']}")
        else:
            try:
                row = revoke_token(engine, args.id, _actor())
            except LookupError:
                print(f"optiscope token: no token with id {args.id!r}", file=sys.stderr)
                return 1
            print(f"revoked {row['id']} ({row['name']}, project {row['project']})")
    finally:
        engine.dispose()
    return 0


def main() -> None:
    sys.exit(serve(sys.argv[1:]))
