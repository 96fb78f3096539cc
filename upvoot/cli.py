"""The operator's command line: ``upvoot [--config FILE] COMMAND ...``.

Commands that use the database read the daemon's ini file (``--config`` or
the ``UPVOOT_CONFIG`` environment variable) to find it, and run the same
transaction functions as the daemon (``upvoot.ledger.store``), so they are safe to
use while it runs.

Output is meant for scripts: ``keys create`` prints the key alone,
``points add`` and ``points show`` print the balance alone, ``--json``
prints JSON (times as Unix seconds). Errors are one line on stderr,
``upvoot: error: ...``; exit status 2 means a usage or configuration
mistake, 1 anything else that failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from upvoot.ledger import store

CONFIG_ENV = "UPVOOT_CONFIG"
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """An operator mistake or failure: reported as one line, no traceback."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


# -- parser ----------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, like every other error, but pointing at the right help.
        self.exit(EXIT_USAGE, f"upvoot: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str, maximum: int = store.MAX_LIST_LIMIT) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    if value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum}: {text!r}")
    return value


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="upvoot",
        description="Manage UpVoot API keys, points and call records, or dial an UpVoot server.",
        epilog="Exit status: 0 success, 1 failure, 2 usage or configuration error.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get(CONFIG_ENV) or None,
        help=f"the daemon's ini file (default: ${CONFIG_ENV}); it names the database",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keys = commands.add_parser("keys", help="create, revoke and list API keys")
    keys_cmds = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = keys_cmds.add_parser(
        "create",
        help="create an API key and print it (alone, once: only its hash is stored)",
        description="Create an API key for AGENT billed to ACCOUNT (created with 0 points"
        " if new) and print the key alone on stdout. It cannot be shown again.",
    )
    p.add_argument("--agent", required=True, metavar="NAME", help="an agent defined in the config ([agent:NAME])")
    p.add_argument("--account", required=True, metavar="NAME", help="the account whose points calls use")
    p.set_defaults(handler=_keys_create)
    p = keys_cmds.add_parser(
        "revoke",
        help="revoke an API key: new calls with it are refused",
        description="Revoke the API key named by PREFIX; calls already running continue.",
    )
    p.add_argument("prefix", metavar="PREFIX", help="the key's first 12 characters, as in 'keys list'")
    p.set_defaults(handler=_keys_revoke)
    p = keys_cmds.add_parser("list", help="list API keys (prefixes only)", description="List API keys by prefix.")
    _json_flag(p)
    p.set_defaults(handler=_keys_list)

    points = commands.add_parser("points", help="add or show an account's points")
    points_cmds = points.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = points_cmds.add_parser(
        "add",
        help="add N points to ACCOUNT and print the new balance",
        description="Add N points to ACCOUNT (negative N corrects a mistake) and print the new balance alone.",
    )
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("n", metavar="N", type=int, help="points to add; may be negative")
    p.set_defaults(handler=_points_add)
    p = points_cmds.add_parser(
        "show",
        help="print ACCOUNT's balance",
        description="Print ACCOUNT's balance alone, or the account as a JSON object with --json.",
    )
    p.add_argument("account", metavar="ACCOUNT")
    _json_flag(p)
    p.set_defaults(handler=_points_show)

    accounts = commands.add_parser("accounts", help="list accounts")
    accounts_cmds = accounts.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = accounts_cmds.add_parser(
        "list", help="list accounts with their balance", description="List accounts, balances and active keys."
    )
    _json_flag(p)
    p.set_defaults(handler=_accounts_list)

    calls = commands.add_parser("calls", help="list and show call records")
    calls_cmds = calls.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = calls_cmds.add_parser(
        "list",
        help="list calls, newest first",
        description="List calls, newest first. --json prints an array of full call records.",
    )
    _json_flag(p)
    p.add_argument("--account", metavar="NAME", help="only this account's calls")
    p.add_argument("--limit", metavar="N", type=_positive_int, default=50, help="at most N calls (default: 50)")
    p.set_defaults(handler=_calls_list)
    p = calls_cmds.add_parser(
        "show", help="show one call with its transcript", description="Show one call record with its transcript."
    )
    p.add_argument("call_id", metavar="CALL_ID")
    _json_flag(p)
    p.add_argument("--svg", metavar="FILE", help="write the call's timeline as an SVG picture to FILE ('-': stdout)")
    p.set_defaults(handler=_calls_show)

    from upvoot import cli_db

    cli_db.add_commands(commands)
    from upvoot.console import command as console_command

    console_command.add_commands(commands)

    # The dialer's own arguments are parsed later by its own parser, so that
    # upvoot.dial.command is only imported when it is used.
    commands.add_parser(
        "dial",
        add_help=False,
        help="call an UpVoot server as a telephony provider would (see 'upvoot dial --help'); needs no config",
    )
    return parser


# -- main ------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else list(argv)))


def run(argv: Sequence[str]) -> int:
    """Run the command line ``argv`` (without the program name); returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "dial":
        return _dial(extra)
    if extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    try:
        return args.handler(args, _load_config(args.config))
    except CommandError as e:
        return _fail(str(e), e.status)
    except store.StoreError as e:
        return _fail(str(e), EXIT_FAILURE)
    except BrokenPipeError:  # `upvoot calls list | head`: no traceback at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAILURE


def _fail(message: str, status: int) -> int:
    print(f"upvoot: error: {message}", file=sys.stderr)
    return status


def _dial(argv: list[str]) -> int:
    try:
        import importlib

        dialer = importlib.import_module("upvoot.dial.command")
    except ImportError as e:
        return _fail(f"the dial command is not available: {e}", EXIT_FAILURE)
    parser = _Parser(
        prog="upvoot dial", description="Call an UpVoot server as a telephony provider would."
    )
    dialer.configure_parser(parser)
    return dialer.run(parser.parse_args(argv))


def _load_config(path: str | None) -> Any:
    if not path:
        raise CommandError(f"no configuration: pass --config FILE or set {CONFIG_ENV}", EXIT_USAGE)
    from upvoot.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or e}", EXIT_USAGE) from None


def _transact(config: Any, fn: Callable[..., Any], *fn_args: Any) -> Any:
    """Run one transaction function on the configured database."""
    path = config.database
    conn = store.connect(path, config.database_password_file)
    try:
        return store.transact(conn, fn, *fn_args)
    except store.DATABASE_ERRORS as e:
        raise CommandError(f"database {store.redact(path)}: {store.backends.scrub(str(e), path)}") from None
    finally:
        conn.close()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


# -- commands --------------------------------------------------------------


def _keys_create(args: argparse.Namespace, config: Any) -> int:
    if args.agent not in config.agents:
        known = ", ".join(sorted(config.agents))
        raise CommandError(f"unknown agent {args.agent!r} (agents in {args.config}: {known})", EXIT_USAGE)
    try:
        store.check_account_name(args.account)
    except store.StoreError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    key, prefix = _transact(config, store.create_key, args.account, args.agent, time.time())
    print(key)
    print(
        f"upvoot: created key {prefix} for agent {args.agent!r}, account {args.account!r};"
        " it will not be shown again",
        file=sys.stderr,
    )
    return 0


def _keys_revoke(args: argparse.Namespace, config: Any) -> int:
    if not _transact(config, store.revoke_key, args.prefix, time.time()):
        hint = ""
        if len(args.prefix) != store.KEY_PREFIX_LENGTH:
            hint = f" (a prefix is the first {store.KEY_PREFIX_LENGTH} characters of a key, as in 'keys list')"
        raise CommandError(f"no key with prefix {args.prefix!r}{hint}")
    print(f"revoked {args.prefix}")
    return 0


def _keys_list(args: argparse.Namespace, config: Any) -> int:
    keys = _transact(config, store.list_keys)
    if args.json:
        _print_json(keys)
        return 0
    _table(
        ["PREFIX", "ACCOUNT", "AGENT", "CREATED", "REVOKED"],
        [[k["prefix"], k["account"], k["agent"], _when(k["created_at"]), _when(k["revoked_at"])] for k in keys],
    )
    return 0


def _points_add(args: argparse.Namespace, config: Any) -> int:
    print(_transact(config, store.add_points, args.account, args.n))
    return 0


def _points_show(args: argparse.Namespace, config: Any) -> int:
    account = _transact(config, store.get_account, args.account)
    if account is None:
        raise CommandError(f"unknown account {args.account!r}")
    if args.json:
        _print_json(account)
    else:
        print(account["points"])
    return 0


def _accounts_list(args: argparse.Namespace, config: Any) -> int:
    accounts = _transact(config, store.list_accounts)
    if args.json:
        _print_json(accounts)
        return 0
    _table(
        ["ACCOUNT", "POINTS", "KEYS", "CREATED"],
        [[a["name"], a["points"], a["active_keys"], _when(a["created_at"])] for a in accounts],
    )
    return 0


def _calls_list(args: argparse.Namespace, config: Any) -> int:
    calls = _transact(config, store.list_calls, args.account, args.limit)
    if args.json:
        _print_json(calls)
        return 0
    _table(
        ["STARTED", "CALL", "ACCOUNT", "AGENT", "STATE", "SECONDS", "POINTS", "END"],
        [
            [
                _when(c["started_at"]), c["call_id"], c["account"], c["agent"], c["state"],
                _seconds(c["duration"]), _blank(c["points_charged"]), _blank(c["end_reason"]),
            ]
            for c in calls
        ],
    )  # fmt: skip
    return 0


def _calls_show(args: argparse.Namespace, config: Any) -> int:
    call = _transact(config, store.get_call, args.call_id)
    if call is None:
        raise CommandError(f"no call {args.call_id!r}")
    if args.svg:
        return _write_svg(args.svg, call)
    if args.json:
        _print_json(call)
        return 0
    times = ("started_at", "heartbeat_at", "ended_at")
    for name, value in call.items():
        if name in ("transcript", "metadata"):
            continue
        shown = _when(value) if name in times else _seconds(value) if name == "duration" else _blank(value)
        print(f"{name + ':':<19}{shown}")
    for name, value in sorted(call["metadata"].items()):
        print(f"{'metadata.' + name + ':':<19}{value}")
    if call["transcript"]:
        print("transcript:")
    for entry in call["transcript"]:
        t = entry.get("t")
        stamp = f"{t:7.1f}s" if isinstance(t, (int, float)) else " " * 8
        print(f"  {stamp}  {entry.get('role', '?')}: {entry.get('text', '')}")
    return 0


def _write_svg(path: str, call: dict) -> int:
    from upvoot.console import timeline  # the call's timeline picture

    try:
        timeline.save(call, sys.stdout if path == "-" else path)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from None
    return 0


# -- formatting ------------------------------------------------------------


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _seconds(d: float | None) -> str:
    return "-" if d is None else f"{d:.1f}"


def _blank(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

if __name__ == "__main__":
    main()
