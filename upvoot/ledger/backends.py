"""The two databases the ledger runs on: SQLite (a file, the embedded default)
and PostgreSQL (a ``postgresql://`` URL, shared by many nodes).

The ini's ``database`` is either a file path or a libpq URL
(``postgresql://user@host:port/dbname?sslmode=...``). A PostgreSQL password
comes from ``database_password_file`` (a file holding the password alone)
or from libpq's own environment (``PGPASSWORD``, ``PGPASSFILE``,
``~/.pgpass``); one written into the URL works too, but every message that
names a database names it through ``redact``, so no password reaches a log
line or an error.

The transaction functions (``accounts``, ``calls``) write portable SQL with
``?`` placeholders; on PostgreSQL they get a ``PgCursor``, which turns each
``?`` outside a quoted string into ``%s`` and doubles every literal ``%``
(psycopg's own placeholder syntax), and nothing else. Numbers come back as
on SQLite: a ``NUMERIC`` (what ``SUM`` of integers is on PostgreSQL) as an
``int`` when it is whole.

Schema text is written once, in SQLite's words, and ``Dialect.ddl`` turns it
into PostgreSQL's (``REAL`` -> ``DOUBLE PRECISION``, ``INTEGER`` ->
``BIGINT``: SQLite's integers are 64-bit; ``TEXT`` compares as ``"C"``, byte
order, as SQLite does).
"""

from __future__ import annotations

import functools
import re
import sqlite3
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.adapt import Loader

from upvoot.ledger.records import StoreError

BUSY_TIMEOUT_MS = 5000  # how long a transaction waits for a lock (SQLite: busy_timeout; PostgreSQL: lock_timeout)

#: libpq connection settings used unless the URL sets them: fail fast when
#: the server is gone, and notice a dead network within seconds, not minutes.
PG_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
    "application_name": "upvoot",
}

#: "the database is not there right now": retry later (a lock wait that
#: timed out, a lost connection, a server restarting, a serialization clash).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.OperationalError, psycopg.OperationalError)
#: "this can never apply": bad data or SQL, not a bad moment.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError, sqlite3.InterfaceError,
    psycopg.IntegrityError, psycopg.DataError, psycopg.ProgrammingError,
)
#: what the constraints raise (unique keys, foreign keys, checks)
INTEGRITY_ERRORS: tuple[type[BaseException], ...] = (sqlite3.IntegrityError, psycopg.IntegrityError)
#: any error a database driver raises
DATABASE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, psycopg.Error)

_URL = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)


def is_postgresql(database: str) -> bool:
    """True if ``database`` is a PostgreSQL URL rather than a file path."""
    return bool(_URL.match(database))


def redact(database: str) -> str:
    """``database`` fit for a log line: a URL's password (in the user part
    or a ``password=`` parameter) replaced by ``***``."""
    if not is_postgresql(database):
        return database
    try:
        parts = urlsplit(database)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, host = netloc.rpartition("@")
            if ":" in user:
                netloc = user.split(":", 1)[0] + ":***@" + host
        query = re.sub(r"(?i)(^|&)(password)=[^&]*", r"\1\2=***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "postgresql://(unparsable URL)"


def scrub(message: str, database: str) -> str:
    """``message`` without ``database``'s password, and on one line."""
    secret = _password_in(database)
    if secret:
        message = message.replace(secret, "***")
    return " ".join(message.split())


def _password_in(database: str) -> str:
    if not is_postgresql(database):
        return ""
    try:
        parts = urlsplit(database)
        found = re.search(r"(?i)(?:^|&)password=([^&]*)", parts.query)
        return parts.password or (found.group(1) if found else "")
    except ValueError:
        return ""


# -- the ? -> %s cursor ---------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """``?`` placeholders -> ``%s``, and every ``%`` doubled, for psycopg.
    A ``?`` inside a quoted string or identifier is left alone."""
    out = []
    quote = ""
    for ch in sql:
        if ch == "%":
            out.append("%%")
        elif quote:
            out.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)


class PgCursor:
    """A psycopg cursor that takes SQLite's ``?`` placeholders."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> "PgCursor":
        if params is None:
            self._cursor.execute(sql)
        else:
            self._cursor.execute(to_pyformat(sql), tuple(params))
        return self

    def executemany(self, sql: str, seq_of_params: Iterable[Sequence[Any]]) -> "PgCursor":
        self._cursor.executemany(to_pyformat(sql), [tuple(p) for p in seq_of_params])
        return self

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    def fetchmany(self, size: int = 100) -> list[Any]:
        return self._cursor.fetchmany(size)

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def description(self) -> Any:
        return self._cursor.description

    def close(self) -> None:
        self._cursor.close()

    def __iter__(self):
        return iter(self._cursor)


class _WholeNumeric(Loader):
    """NUMERIC as ``int`` when whole (``SUM`` of integers), else ``float``: as SQLite."""

    def load(self, data: Any) -> Any:
        text = bytes(data).decode("ascii")
        try:
            return int(text)
        except ValueError:
            return float(text)


# -- dialects -------------------------------------------------------------------


class Dialect:
    """What differs between the two databases, and nothing else."""

    name = "sqlite"

    def cursor(self, conn: Any) -> Any:
        return conn.cursor()

    def ddl(self, statement: str) -> str:
        return statement


class _Postgres(Dialect):
    name = "postgresql"
    _TYPES = re.compile(r"\b(REAL|INTEGER|TEXT)\b")
    _AS = {"REAL": "DOUBLE PRECISION", "INTEGER": "BIGINT", "TEXT": 'TEXT COLLATE "C"'}

    def cursor(self, conn: Any) -> Any:
        return PgCursor(conn.cursor())

    def ddl(self, statement: str) -> str:
        # only the upper-case type names outside quotes: 'active' and the like stay as they are
        parts = re.split(r"('[^']*')", statement)
        return "".join(p if p.startswith("'") else self._TYPES.sub(lambda m: self._AS[m.group(1)], p) for p in parts)


SQLITE = Dialect()
POSTGRESQL = _Postgres()


def dialect_of(database: str) -> Dialect:
    return POSTGRESQL if is_postgresql(database) else SQLITE


def dialect_of_connection(conn: Any) -> Dialect:
    return SQLITE if isinstance(conn, sqlite3.Connection) else POSTGRESQL


# -- PostgreSQL connections ---------------------------------------------------------


def read_password(password_file: str) -> str | None:
    """The password in ``password_file`` (its first line), None for no file."""
    if not password_file:
        return None
    try:
        with open(password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"cannot read the database password file {password_file}:"
                         f" {getattr(e, 'strerror', None) or e}") from None


def pg_arguments(url: str, password_file: str = "") -> dict[str, Any]:
    """Keyword arguments for ``psycopg.connect(url, **these)``: PG_DEFAULTS
    the URL does not set, and the password from ``password_file``."""
    try:
        given = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise StoreError(f"bad database URL {redact(url)}: {scrub(str(e), url)}") from None
    kw: dict[str, Any] = {k: v for k, v in PG_DEFAULTS.items() if k not in given}
    password = read_password(password_file)
    if password is not None:
        kw["password"] = password
    return kw


def configure_pg(conn: Any) -> None:
    """Per-connection settings; the ``cp_openfun`` of a PostgreSQL pool."""
    conn.adapters.register_loader("numeric", _WholeNumeric)
    conn.execute(f"SET lock_timeout = {int(BUSY_TIMEOUT_MS)}")
    conn.execute("SET TIME ZONE 'UTC'")
    conn.commit()


def connect_pg(url: str, password_file: str = "") -> Any:
    """A psycopg connection (not autocommit), configured; ``StoreError`` with
    a one-line message naming the database (redacted) if it cannot be opened."""
    kw = pg_arguments(url, password_file)
    try:
        conn = psycopg.connect(url, autocommit=False, **kw)
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to database {redact(url)}: {scrub(str(e), url)}") from None
    try:
        configure_pg(conn)
    except psycopg.Error as e:
        conn.close()
        raise StoreError(f"cannot use database {redact(url)}: {scrub(str(e), url)}") from None
    return conn


__all__ = [
    "BUSY_TIMEOUT_MS", "DATABASE_ERRORS", "Dialect", "INTEGRITY_ERRORS", "PERMANENT_ERRORS", "PG_DEFAULTS",
    "POSTGRESQL", "PgCursor", "SQLITE", "UNAVAILABLE_ERRORS", "configure_pg", "connect_pg", "dialect_of",
    "dialect_of_connection", "is_postgresql", "pg_arguments", "read_password", "redact", "scrub", "to_pyformat",
]
