"""The ``optiscope`` command. ``optiscope serve`` runs the collector (package optiscope-server)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: optiscope serve [--host HOST] [--port PORT] [--db URL] [--webhook URL ...]\n"
              "       optiscope db upgrade|current [--db URL]\n"
              "       optiscope token create --project P --scope ingest|read|admin ... | list | revoke ID\n"
              "       optiscope sync [--url URL] [--token TOKEN] [--dir SPOOL_DIR]\n\n"
              "  serve    run the collector (needs the optiscope-server package)\n"
              "  db       apply or show the collector database's schema migrations\n"
              "  token    make, list and revoke the collector's API tokens\n"
              "  sync     send what killed or disconnected runs left in the spool")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "sync":
        return sync(rest)
    if command in ("serve", "db", "token"):
        try:
            from optiscope_server.cli import COMMANDS
        except ImportError:
            print(f"optiscope: '{command}' needs the collector: pip install optiscope-server", file=sys.stderr)
            return 2
        return COMMANDS[command](rest)
    print(f"optiscope: unknown command {command!r} (try --help)", file=sys.stderr)
    return 2


def sync(argv: list[str]) -> int:
    """Replay every spool under the spool directory to the collector; exit 1 if any is left."""
    import argparse
    import os

    from .run import DEFAULT_URL
    from .transport.http import HttpClient
    from .transport.spool import default_root, pending_spools, replay

    p = argparse.ArgumentParser(prog="optiscope sync", description=sync.__doc__)
    p.add_argument("--url", default=os.environ.get("OPTISCOPE_URL", DEFAULT_URL))
    p.add_argument("--token", default=os.environ.get("OPTISCOPE_TOKEN"))
    p.add_argument("--dir", default=None, help="spool directory (default: OPTISCOPE_SPOOL_DIR or ~/.cache/optiscope/spool)")
    args = p.parse_args(argv)
    client = HttpClient(args.url, args.token)
    left = 0
    for d in pending_spools(args.dir or default_root()):
        outcome, sent = replay(d, client)
        print(f"{d.name}: {outcome}, {sent} batches sent")
        left += outcome != "done"
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
