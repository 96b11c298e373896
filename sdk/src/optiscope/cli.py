"""The ``optiscope`` command. ``optiscope serve`` runs the collector (package optiscope-server)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: optiscope serve [--host HOST] [--port PORT] [--db URL] [--webhook URL ...]\n\n"
              "  serve    run the collector (needs the optiscope-server package)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        try:
            from optiscope_server.cli import serve
        except ImportError:
            print("optiscope: 'serve' needs the collector: pip install optiscope-server", file=sys.stderr)
            return 2
        return serve(rest)
    print(f"optiscope: unknown command {command!r} (try --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
