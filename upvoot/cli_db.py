"""``upvoot db ...``: the database's schema version, its upgrade, and copying
the ledger into another database (``upvoot.ledger.schema``,
``upvoot.ledger.dbcopy``). Part of ``upvoot.cli``, which adds these commands
to its parser; errors are ``StoreError`` (one line, exit status 1), and no
message names a database with its password.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from upvoot.ledger import backends, dbcopy, schema, store
from upvoot.ledger.records import StoreError


def _guarded(database: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except backends.DATABASE_ERRORS as e:
        raise StoreError(f"database {backends.redact(database)}: {backends.scrub(str(e), database)}") from None


def _version(args: argparse.Namespace, config: Any) -> int:
    database = config.database
    conn = store.open_database(database, config.database_password_file)
    try:
        version = _guarded(database, lambda: schema.version_of(conn, backends.dialect_of(database)))
    finally:
        conn.close()
    print(version)
    if version != schema.SCHEMA_VERSION:
        print(f"upvoot: {backends.redact(database)} has schema version {version}; this UpVoot's is"
              f" {schema.SCHEMA_VERSION}", file=sys.stderr)
    return 0


def _upgrade(args: argparse.Namespace, config: Any) -> int:
    database = config.database
    conn = store.open_database(database, config.database_password_file)
    try:
        before, after = _guarded(database, lambda: schema.upgrade(conn, backends.dialect_of(database), database))
    finally:
        conn.close()
    name = backends.redact(database)
    if before == after:
        print(f"{name}: schema version {after}, nothing to do")
    elif before == 0:
        print(f"{name}: created at schema version {after}")
    else:
        print(f"{name}: upgraded from schema version {before} to {after}")
    return 0


def _copy(args: argparse.Namespace, config: Any) -> int:
    source_name, target = config.database, args.to
    if target == source_name:
        raise StoreError("the target is the configured database itself")
    source = store.connect(source_name, config.database_password_file)
    try:
        target_conn = store.connect(target, args.password_file or "")
        try:
            copied = _guarded(target, lambda: dbcopy.copy_ledger(source, target_conn, backends.redact(target)))
        finally:
            target_conn.close()
    finally:
        source.close()
    print(f"copied {backends.redact(source_name)} to {backends.redact(target)}: {copied['accounts']} accounts"
          f" ({copied['points']} points in all), {copied['api_keys']} keys, {copied['calls']} calls")
    return 0


def add_commands(commands: Any) -> None:
    """Add ``db version``, ``db upgrade`` and ``db copy`` to ``upvoot``'s subparsers."""
    db = commands.add_parser("db", help="the database: schema version, upgrade, copy into another database")
    db_cmds = db.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = db_cmds.add_parser(
        "version", help="print the database's schema version",
        description="Print the schema version of the configured database alone (0: empty).",
    )
    p.set_defaults(handler=_version)
    p = db_cmds.add_parser(
        "upgrade", help="bring the database's schema to this UpVoot's version",
        description="Upgrade the configured database to this UpVoot's schema, in one transaction"
        " (back it up first). The daemon refuses to start on an older schema until this ran.",
    )
    p.set_defaults(handler=_upgrade)
    p = db_cmds.add_parser(
        "copy", help="copy accounts, balances, keys and calls into a new, empty database",
        description="Copy every account (with its balance), key and call of the configured database"
        " into the empty database TARGET, exactly, in one transaction; refuses a target that holds"
        " anything. Print what was copied.",
    )
    p.add_argument("--to", required=True, metavar="TARGET",
                   help="postgresql://USER@HOST:PORT/DBNAME (or an SQLite file); its password from"
                   " --password-file, PGPASSWORD or ~/.pgpass")
    p.add_argument("--password-file", metavar="FILE", help="a file holding the target's password alone")
    p.set_defaults(handler=_copy)


__all__ = ["add_commands"]
