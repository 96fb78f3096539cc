"""API keys, accounts, points and the call log, in SQLite or PostgreSQL.

Everything that touches the database is a *transaction function*: a plain
function whose first argument is a DB-API cursor. The operator's command line
(``upvoot.cli``) runs them synchronously with ``transact``; the daemon runs
the very same functions on an ``adbapi.ConnectionPool`` (one thread for
SQLite, ``pool_size`` for PostgreSQL) through ``Store``, whose methods
return Deferreds. Each call of a transaction
function is one transaction (``transact`` and ``Store.run`` commit on return
and roll back on an exception).

No database object is ever used, or freed, outside the thread that runs the
transaction: the cursor is closed there, whether the function returned or
raised. (A cursor left open and freed later on the reactor thread, by the
garbage collector, resets its statement, which takes the connection's mutex;
while the pool thread holds that mutex waiting out a locked database, the
whole reactor would wait with it. ``ConnectionPool.runInteraction`` leaves
the cursor of a failed transaction open, so ``Store`` does not use it.)

The database is a file (SQLite, the default) or a ``postgresql://`` URL
(many nodes, one ledger); what differs between the two is in ``backends``,
the schema and its versions in ``schema``. Everything here works the same
on both.

Concurrency: the CLI and the daemon (or many daemons, on PostgreSQL) may
write at the same time (SQLite: WAL journal, ``busy_timeout``; PostgreSQL:
row locks, ``lock_timeout``); how two writers never both charge a call is
in ``calls``.

The transaction functions live in ``accounts`` (keys, accounts, points)
and ``calls`` (the call log), the values in ``records``; this module
re-exports them all, so ``store.X`` names every one.

Times are Unix seconds (``float``), always passed in by the caller.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from typing import Any, Callable

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger

from upvoot.ledger import backends, schema
from upvoot.ledger.accounts import (  # re-exported: store.X is the API
    KEY_PREFIX_LENGTH, KEY_SCHEME, MAX_POINTS_DELTA, account_agents, add_points, check_account_name,
    create_key, get_account, hash_key, is_well_formed_key, list_accounts, list_keys, lookup_key, revoke_key,
)
from upvoot.ledger.calls import (
    MAX_LIST_LIMIT, get_call, heartbeat, list_calls, open_call, open_call_once, settle_call, settle_orphans,
)
from upvoot.ledger.records import CallRecord, CallStart, KeyInfo, StoreError, UnknownAccount

DATABASE_ERRORS = backends.DATABASE_ERRORS
INTEGRITY_ERRORS = backends.INTEGRITY_ERRORS
is_postgresql = backends.is_postgresql
redact = backends.redact

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
    "BUSY_TIMEOUT_MS", "DEFAULT_POOL_SIZE", "SCHEMA_VERSION", "Store", "configure_connection", "connect",
    "open_database", "transact",
    # backends
    "DATABASE_ERRORS", "INTEGRITY_ERRORS", "is_postgresql", "redact",
]

BUSY_TIMEOUT_MS = backends.BUSY_TIMEOUT_MS  # SQLite's busy_timeout (PostgreSQL's lock_timeout: backends)
SCHEMA_VERSION = schema.SCHEMA_VERSION
DEFAULT_POOL_SIZE = 4


# -- opening the database --------------------------------------------------


def configure_connection(conn: sqlite3.Connection) -> None:
    """Per-connection settings of SQLite; the ``cp_openfun`` of its pool."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")


def _create_private(path: str) -> None:
    # Call transcripts are personal data: no access for "other" users. SQLite
    # gives the -wal and -shm files the mode of the database file.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
    except FileExistsError:
        return
    os.close(fd)


def open_database(database: str, password_file: str = "") -> Any:
    """A connection to ``database`` (a file path or a ``postgresql://`` URL),
    its schema not checked: for ``upvoot db upgrade`` and ``db version``.
    ``StoreError`` (one line, naming the database, no password) if it cannot
    be opened."""
    if backends.is_postgresql(database):
        return backends.connect_pg(database, password_file)
    try:
        _create_private(database)
        conn = sqlite3.connect(database, timeout=BUSY_TIMEOUT_MS / 1000)
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"cannot open database {database}: {_reason(e)}") from None
    try:
        configure_connection(conn)
    except sqlite3.Error as e:
        conn.close()
        raise StoreError(f"cannot use database {database}: {_reason(e)}") from None
    return conn


def connect(database: str, password_file: str = "") -> Any:
    """Open ``database`` (creating an empty one at the current schema) and
    check its schema version: ``StoreError`` with a one-line message naming
    the database (password redacted) when it cannot be opened or used, or its
    schema is older (``upvoot db upgrade``) or newer (upgrade UpVoot)."""
    conn = open_database(database, password_file)
    dialect = backends.dialect_of(database)
    try:
        schema.ensure(conn, dialect, database)
    except StoreError as e:
        conn.close()
        if str(e).startswith("database "):
            raise
        raise StoreError(f"cannot use database {backends.redact(database)}: {e}") from None
    except backends.DATABASE_ERRORS as e:
        conn.close()
        raise StoreError(f"cannot use database {backends.redact(database)}:"
                         f" {backends.scrub(_reason(e), database)}") from None
    return conn


def transact(conn: Any, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run transaction function ``fn(cursor, *args, **kw)`` and commit; roll
    back if it raises. The cursor is closed before this returns or raises.
    ``conn`` is a connection from ``connect``, of either database."""
    try:
        with closing(backends.dialect_of_connection(conn).cursor(conn)) as cursor:
            result = fn(cursor, *args, **kw)
        conn.commit()
        return result
    except BaseException:
        conn.rollback()
        raise


def _in_transaction(conn: Any, dialect: backends.Dialect, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    # In the pool's thread: ``runWithConnection`` commits after this returns
    # and rolls back if it raises; the cursor is closed here either way.
    try:
        with closing(dialect.cursor(conn)) as cursor:
            return fn(cursor, *args, **kw)
    except backends.UNAVAILABLE_ERRORS:
        if dialect is not backends.POSTGRESQL or not (conn.closed or conn.broken):
            raise
    # The pool's connection had died (the server restarted, the network
    # dropped): nothing of this transaction was committed, so it runs once
    # more on a new connection, or fails if there is none to be had.
    conn.reconnect()
    with closing(dialect.cursor(conn)) as cursor:
        return fn(cursor, *args, **kw)


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


class _PgConnection(adbapi.Connection):
    """adbapi's connection, quiet when PostgreSQL has gone: a transaction
    that failed because the connection broke has nothing to roll back, so
    the connection is dropped without adbapi's "Rollback failed" tracebacks,
    and the pool's next transaction opens a new one (``cp_reconnect``)."""

    def rollback(self) -> None:
        raw = self._connection
        if raw is None or raw.closed or raw.broken:
            if raw is not None and self._pool.connections.get(self._pool.threadID()) is raw:
                self._pool.disconnect(raw)
            self._connection = None
            return
        super().rollback()

    def reconnect(self) -> None:
        raw, self._connection = self._connection, None
        if raw is not None and self._pool.connections.get(self._pool.threadID()) is raw:
            self._pool.disconnect(raw)
        self._connection = self._pool.connect()


# -- the daemon's asynchronous face -----------------------------------------


class Store:
    """The database for the daemon: transaction functions run on an
    ``adbapi.ConnectionPool``, results as Deferreds. SQLite gets one
    dedicated thread (it allows one writer anyway); PostgreSQL a pool of
    ``pool_size`` threads, each with its own connection, reconnecting after
    the server or the network went away (``cp_reconnect``).

    ``start()`` opens the database and checks its schema synchronously, so
    a missing directory, an unreachable server or a schema that needs
    ``upvoot db upgrade`` raises ``StoreError`` at service start instead of
    failing the first call.
    """

    _log = Logger()

    def __init__(self, path: str, reactor: Any = None, password_file: str = "",
                 pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.path = path  # a file path or a postgresql:// URL
        self.password_file = password_file
        self.pool_size = pool_size
        self.dialect = backends.dialect_of(path)
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None

    @property
    def name(self) -> str:
        """The database, fit for a log line (no password)."""
        return backends.redact(self.path)

    def start(self) -> None:
        if self._pool is not None:
            return
        connect(self.path, self.password_file).close()
        kw: dict[str, Any] = {}
        if self._reactor is not None:
            kw["cp_reactor"] = self._reactor
        if self.dialect is backends.POSTGRESQL:
            pool = adbapi.ConnectionPool(
                "psycopg",
                self.path,
                autocommit=False,
                cp_min=1,
                cp_max=self.pool_size,
                cp_reconnect=True,
                cp_openfun=backends.configure_pg,
                **backends.pg_arguments(self.path, self.password_file),
                **kw,
            )
            pool.connectionFactory = _PgConnection
        else:
            pool = adbapi.ConnectionPool(
                "sqlite3",
                self.path,
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
                cp_min=1,
                cp_max=1,
                cp_openfun=configure_connection,
                **kw,
            )
        self._pool = pool
        self._log.info("store.opened: {path}", path=self.name)

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        """Run transaction function ``fn(txn, *args, **kw)`` in one transaction,
        in the pool's thread; its cursor is closed there, whatever happens."""
        if self._pool is None:
            return defer.fail(StoreError(f"store {self.name} is not started"))
        return self._pool.runWithConnection(_in_transaction, self.dialect, fn, *args, **kw)

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
