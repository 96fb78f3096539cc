"""The ledger's schema, versioned, and its migrations: the same on both databases.

``MIGRATIONS[n]`` takes a database from version ``n`` to ``n + 1``. Each
statement is written in SQLite's words and translated for PostgreSQL by
``backends.Dialect.ddl`` (type names only); a statement that must differ is a
``{"sqlite": ..., "postgresql": ...}`` dict. The version applied is the one
row of the ``schema_version`` table (SQLite files of version 1 kept it in
``PRAGMA user_version``, read once to migrate them; SQLite's user_version is
kept equal to it, so an UpVoot of before version 2 refuses a newer file).

Who migrates what:

- an empty database (a new file, a new PostgreSQL database) is created at
  ``SCHEMA_VERSION`` when it is first opened (``ensure``);
- an older one is upgraded only when the operator says so: ``upvoot db
  upgrade`` (``upgrade``); until then the daemon and the command line refuse
  it, naming the database and that command;
- a newer one is refused: "upgrade UpVoot".

Migrations run in one transaction, holding a lock (SQLite: ``BEGIN
IMMEDIATE``; PostgreSQL: a transaction-level advisory lock), and re-read the
version under it: two nodes starting at once never both migrate.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

from upvoot.ledger.backends import POSTGRESQL, Dialect, redact
from upvoot.ledger.records import StoreError

Statement = Union[str, Mapping[str, str]]

#: pg_advisory_xact_lock key held while migrating ("UpVt")
PG_MIGRATION_LOCK = 0x55705674

MIGRATIONS: Sequence[Sequence[Statement]] = (
    (  # 0 -> 1: keys, accounts, the call log
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
    (  # 1 -> 2: the version table; console keys; reservations; the node that runs a call
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        "ALTER TABLE api_keys ADD COLUMN kind TEXT NOT NULL DEFAULT 'api'",
        "ALTER TABLE api_keys ADD COLUMN expires_at REAL",
        "ALTER TABLE api_keys ADD COLUMN used_at REAL",
        "ALTER TABLE accounts ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE calls ADD COLUMN node TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE calls ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

#: the ledger's tables, parents first (foreign keys point backwards)
TABLES = ("accounts", "api_keys", "calls")


def statement_for(dialect: Dialect, statement: Statement) -> str:
    if isinstance(statement, str):
        return dialect.ddl(statement)
    return statement[dialect.name]


# -- reading the version ----------------------------------------------------------


def _has_table(cursor: Any, dialect: Dialect, table: str) -> bool:
    if dialect is POSTGRESQL:
        # pg_class read with the statement's snapshot: to_regclass() would ask the
        # catalog cache, which may not yet know a table another node created while
        # this one waited for the migration lock
        cursor.execute("SELECT 1 FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n"
                       " ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relname = ?",
                       (table,))
        return cursor.fetchone() is not None
    cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
    return cursor.fetchone() is not None


def read_version(cursor: Any, dialect: Dialect) -> int:
    """The schema version of the database; 0 for an empty one."""
    if _has_table(cursor, dialect, "schema_version"):
        cursor.execute("SELECT MAX(version) FROM schema_version")
        (version,) = cursor.fetchone()
        if version is not None:
            return int(version)
    if dialect is POSTGRESQL:
        if _has_table(cursor, dialect, "accounts"):
            raise StoreError("it holds UpVoot's tables but no schema version")
        return 0
    cursor.execute("PRAGMA user_version")
    return int(cursor.fetchone()[0])


def _write_version(cursor: Any, dialect: Dialect, version: int) -> None:
    cursor.execute("DELETE FROM schema_version")
    cursor.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    if dialect is not POSTGRESQL:
        cursor.execute(f"PRAGMA user_version = {int(version)}")


def _in_transaction(conn: Any, dialect: Dialect, fn: Any, *args: Any, begin: str | None = None) -> Any:
    """``fn(cursor, dialect, *args)`` in one transaction (``begin``: the
    statement that opens it, else the driver's own), committed or rolled back."""
    if begin is not None:
        conn.execute(begin)
    cursor = dialect.cursor(conn)
    try:
        result = fn(cursor, dialect, *args)
        conn.commit()
        return result
    except BaseException:
        conn.rollback()
        raise
    finally:
        cursor.close()


def version_of(conn: Any, dialect: Dialect) -> int:
    """The schema version of the database on ``conn`` (0: empty)."""
    return _in_transaction(conn, dialect, read_version)


# -- migrating ------------------------------------------------------------------------


def _migrate(cursor: Any, dialect: Dialect, only_empty: bool) -> tuple[int, int]:
    if dialect is POSTGRESQL:  # (SQLite: the caller began with BEGIN IMMEDIATE)
        cursor.execute("SELECT pg_advisory_xact_lock(?)", (PG_MIGRATION_LOCK,))
    version = read_version(cursor, dialect)  # again, under the lock: another node may have done it
    if version >= SCHEMA_VERSION or (only_empty and version != 0):
        return version, version
    for number in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[number]:
            cursor.execute(statement_for(dialect, statement))
    _write_version(cursor, dialect, SCHEMA_VERSION)
    return version, SCHEMA_VERSION


def _run_migration(conn: Any, dialect: Dialect, only_empty: bool) -> tuple[int, int]:
    # SQLite: the write lock first, so two processes never migrate at once
    begin = None if dialect is POSTGRESQL else "BEGIN IMMEDIATE"
    return _in_transaction(conn, dialect, _migrate, only_empty, begin=begin)


def ensure(conn: Any, dialect: Dialect, database: str) -> int:
    """Check the schema at open: create an empty database at the current
    version; refuse an older one (``upvoot db upgrade``) or a newer one
    (upgrade UpVoot) with ``StoreError`` naming ``database`` (redacted)."""
    version = version_of(conn, dialect)
    if version == 0:
        _, version = _run_migration(conn, dialect, only_empty=True)
    check(version, database)
    return version


def check(version: int, database: str) -> None:
    name = redact(database)
    if version > SCHEMA_VERSION:
        raise StoreError(f"database {name} has schema version {version}; this UpVoot knows"
                         f" up to {SCHEMA_VERSION}: upgrade UpVoot")
    if version < SCHEMA_VERSION:
        raise StoreError(f"database {name} has schema version {version}; this UpVoot needs"
                         f" {SCHEMA_VERSION}: run 'upvoot db upgrade' (back the database up first)")


def upgrade(conn: Any, dialect: Dialect, database: str) -> tuple[int, int]:
    """Bring the database to ``SCHEMA_VERSION``: ``(version before, after)``.
    Refuses a newer schema."""
    before, after = _run_migration(conn, dialect, only_empty=False)
    check(after, database)
    return before, after


__all__ = [
    "MIGRATIONS", "PG_MIGRATION_LOCK", "SCHEMA_VERSION", "TABLES", "check", "ensure", "read_version",
    "statement_for", "upgrade", "version_of",
]
