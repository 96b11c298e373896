"""The ``optiscope`` command. ``sync`` is the SDK's own; other subcommands (``serve``, ``db``,
``token``) come from installed packages through the ``optiscope.commands`` entry point group (the
collector, package optiscope-server, declares them), so the SDK never imports the collector."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points

#: The entry point group a package declares its ``optiscope`` subcommands in: name = "module:function",
#: the function taking the subcommand's arguments and returning the exit status.
COMMANDS_GROUP = "optiscope.commands"
#: Shown in the help, and named when the package that provides them is missing.
COLLECTOR_COMMANDS = ("serve", "db", "token")


def plugin_commands() -> dict[str, EntryPoint]:
    """The subcommands installed packages declare (each is imported only when it is run)."""
    return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: optiscope serve [--host HOST] [--port PORT] [--db URL] [--webhook URL ...]\n"
            "       optiscope db upgrade|current [--db URL]\n"
            "       optiscope token create --project P --scope ingest|read|admin ... | list | revoke ID\n"
            "       optiscope sync [--url URL] [--token TOKEN] [--dir SPOOL_DIR]\n\n"
            "  serve    run the collector (needs the optiscope-server package)\n"
            "  db       apply or show the collector database's schema migrations\n"
            "  token    make, list and revoke the collector's API tokens\n"
            "  sync     send what killed or disconnected runs left in the spool"
        )
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "sync":
        return sync(rest)
    found = plugin_commands()
    if command in found:
        status: int = found[command].load()(rest)
        return status
    if command in COLLECTOR_COMMANDS:
        print(f"optiscope: '{command}' needs the collector: pip install optiscope-server", file=sys.stderr)
        return 2
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
    p.add_argument(
        "--dir", default=None, help="spool directory (default: OPTISCOPE_SPOOL_DIR or ~/.cache/optiscope/spool)"
    )
    args = p.parse_args(argv)
    client = HttpClient(args.url, args.token)
    left: dict[str, int] = {}
    for d in pending_spools(args.dir or default_root()):
        outcome, sent = replay(d, client)
        print(f"{d.name}: {outcome}, {sent} batches acknowledged")
        if outcome != "done":
            left[outcome] = left.get(outcome, 0) + 1
    for kind, why in SYNC_ADVICE.items():
        if kind in left:
            print(f"optiscope sync: {left[kind]} spool(s) {why}; nothing of them was deleted", file=sys.stderr)
    return 1 if left else 0


#: What ``sync`` tells the user about the spools it had to leave, by outcome.
SYNC_ADVICE = {
    "unauthorized": "were refused for lack of a valid token (HTTP 401/403): set OPTISCOPE_TOKEN or --token to a "
    "token with the ingest scope in the run's project, then run optiscope sync again",
    "refused": "were refused by the collector (the run was deleted, belongs to another project, or a batch is "
    "too large for it): see the collector's answer in its log",
    "unreachable": "could not be delivered: the collector did not answer or asked to retry later",
    "busy": "belong to runs still writing them",
}


if __name__ == "__main__":
    sys.exit(main())
