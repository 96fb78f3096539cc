"""API keys, accounts, points and the call log, in one SQLite file.

Everything that touches the database is a *transaction function*: a plain
function whose first argument is a DB-API cursor. The operator's command line
(``upvoot.cli``) runs them synchronously with ``transact``; the daemon runs
the very same functions on a one-thread ``adbapi.ConnectionPool`` through
``Store``, whose methods return Deferreds. Each call of a transaction
function is one transaction (``transact`` and ``Store.run`` commit on return
and roll back on an exception).

No database object is ever used, or freed, outside the thread that runs the
transaction: the cursor is closed there, whether the function returned or
raised. (A cursor left open and freed later on the reactor thread, by the
garbage collector, resets its statement, which takes the connection's mutex;
while the pool thread holds that mutex waiting out a locked database, the
whole reactor would wait with it. ``ConnectionPool.runInteraction`` leaves
the cursor of a failed transaction open, so ``Store`` does not use it.)

Concurrency: the CLI and the daemon may write at the same time (WAL journal,
``busy_timeout``); how two writers never both charge a call is in ``calls``.

The transaction functions live in ``accounts`` (keys, accounts, points)
and ``calls`` (the call log), the values in ``records``; this module
re-exports them all, so ``store.X`` names every one.

Times are Unix seconds (``float``), always passed in by the caller.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from typing import Any, Callable, Sequence

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger

from upvoot.ledger.accounts import (  # re-exported: store.X is the API
    KEY_PREFIX_LENGTH, KEY_SCHEME, MAX_POINTS_DELTA, account_agents, add_points, check_account_name,
    create_key, get_account, hash_key, is_well_formed_key, list_accounts, list_keys, lookup_key, revoke_key,
)
from upvoot.ledger.calls import (
    MAX_LIST_LIMIT, get_call, heartbeat, list_calls, open_call, open_call_once, settle_call, settle_orphans,
)
from upvoot.ledger.records import CallRecord, CallStart, KeyInfo, StoreError, UnknownAccount

__all__ = [
    # records
    "CallRecord", "CallStart", "KeyInfo", "StoreError", "UnknownAccount",
    # accounts
    "KEY_PREFIX_LENGTH", "KEY_SCHEME", "MAX_POINTS_DELTA", "account_agents", "add_points", "check_account_name",
    "create_key", "get_account", "hash_key", "is_well_formed_key", "list_accounts", "list_keys", "lookup_key",
    "revoke_key",
    # calls
    "MAX_LIST_LIMIT", "get_call", "heartbeat", "list_calls", "open_call", "open_call_once", "settle_call",
    "settle_orphans",
    # here
    "BUSY_TIMEOUT_MS", "SCHEMA_VERSION", "Store", "configure_connection", "connect", "transact",
]

BUSY_TIMEOUT_MS = 5000


# One entry per schema version; PRAGMA user_version is the number applied.
_MIGRATIONS: Sequence[Sequence[str]] = (
    (
        """CREATE TABLE accounts (
            name TEXT PRIMARY KEY,
            points INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE api_keys (
            prefix TEXT PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,
            account TEXT NOT NULL REFERENCES accounts(name),
            agent TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL
        )""",
        "CREATE INDEX api_keys_account ON api_keys(account)",
        """CREATE TABLE calls (
            call_id TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('active', 'settled')),
            key_prefix TEXT NOT NULL REFERENCES api_keys(prefix),
            account TEXT NOT NULL REFERENCES accounts(name),
            agent TEXT NOT NULL,
            provider TEXT NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            ended_at REAL,
            duration REAL,
            end_reason TEXT,
            turns INTEGER NOT NULL DEFAULT 0,
            barge_ins INTEGER NOT NULL DEFAULT 0,
            barge_ins_resumed INTEGER NOT NULL DEFAULT 0,
            points_charged INTEGER,
            transcript TEXT NOT NULL DEFAULT '[]',
            metadata TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX calls_started ON calls(started_at)",
        "CREATE INDEX calls_account_started ON calls(account, started_at)",
        "CREATE INDEX calls_active ON calls(state) WHERE state = 'active'",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


# -- opening the database --------------------------------------------------


def configure_connection(conn: sqlite3.Connection) -> None:
    """Per-connection settings; the ``cp_openfun`` of the daemon's pool."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database {path} has schema version {version}; this UpVoot knows"
            f" up to {SCHEMA_VERSION}: upgrade UpVoot"
        )
    conn.execute("BEGIN IMMEDIATE")  # two processes never migrate at once
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        for number in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[number]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def _create_private(path: str) -> None:
    # Call transcripts are personal data: no access for "other" users. SQLite
    # gives the -wal and -shm files the mode of the database file.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
    except FileExistsError:
        return
    os.close(fd)


def connect(path: str) -> sqlite3.Connection:
    """Open (creating it on first use) and migrate the database at ``path``.

    Raises ``StoreError`` with a one-line message naming the file when it
    cannot be opened, written or migrated.
    """
    try:
        _create_private(path)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"cannot open database {path}: {_reason(e)}") from None
    try:
        configure_connection(conn)
        _migrate(conn, path)
    except StoreError:
        conn.close()
        raise
    except sqlite3.Error as e:
        conn.close()
        raise StoreError(f"cannot use database {path}: {_reason(e)}") from None
    return conn


def transact(conn: sqlite3.Connection, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run transaction function ``fn(cursor, *args, **kw)`` and commit; roll
    back if it raises. The cursor is closed before this returns or raises."""
    try:
        with closing(conn.cursor()) as cursor:
            result = fn(cursor, *args, **kw)
        conn.commit()
        return result
    except BaseException:
        conn.rollback()
        raise


def _in_transaction(conn: Any, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    # In the pool's thread: ``runWithConnection`` commits after this returns
    # and rolls back if it raises; the cursor is closed here either way.
    with closing(conn.cursor()) as cursor:
        return fn(cursor, *args, **kw)


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


# -- the daemon's asynchronous face -----------------------------------------


class Store:
    """The database for the daemon: transaction functions run on one
    dedicated thread (SQLite allows one writer anyway), results as Deferreds.

    ``start()`` opens and migrates the database synchronously, so a missing
    directory or unwritable file raises ``StoreError`` at service start
    instead of failing the first call.
    """

    _log = Logger()

    def __init__(self, path: str, reactor: Any = None) -> None:
        self.path = path
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None

    def start(self) -> None:
        if self._pool is not None:
            return
        connect(self.path).close()
        kw: dict[str, Any] = {}
        if self._reactor is not None:
            kw["cp_reactor"] = self._reactor
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
            cp_min=1,
            cp_max=1,
            cp_openfun=configure_connection,
            **kw,
        )
        self._log.info("store.opened: {path}", path=self.path)

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        """Run transaction function ``fn(txn, *args, **kw)`` in one transaction,
        in the pool's thread; its cursor is closed there, whatever happens."""
        if self._pool is None:
            return defer.fail(StoreError(f"store {self.path} is not started"))
        return self._pool.runWithConnection(_in_transaction, fn, *args, **kw)

    def authenticate(self, key: str) -> defer.Deferred:
        """Deferred[KeyInfo | None]; malformed keys never reach the database."""
        if not is_well_formed_key(key):
            return defer.succeed(None)
        return self.run(lookup_key, key)

    def open_call(self, start: CallStart) -> defer.Deferred:
        return self.run(open_call, start)

    def heartbeat(self, call_id: str, now: float) -> defer.Deferred:
        return self.run(heartbeat, call_id, now)

    def settle_call(self, record: CallRecord) -> defer.Deferred:
        """Deferred[int]: the points actually charged."""
        return self.run(settle_call, record)
