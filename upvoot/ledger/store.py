"""API keys, accounts, points and the call log, in one SQLite file.

Everything that touches the database is a *transaction function*: a plain
function whose first argument is a DB-API cursor. The operator's command line
(``upvoot.cli``) runs them synchronously with ``transact``; the daemon runs
the very same functions on a one-thread ``adbapi.ConnectionPool`` through
``Store``, whose methods return Deferreds. Each call of a transaction
function is one transaction (``transact`` and ``runInteraction`` commit on
return and roll back on an exception).

Concurrency: the CLI and the daemon may write at the same time (WAL journal,
``busy_timeout``). Functions that read and then write start with the write
(``UPDATE ... WHERE state = 'active'``, ``INSERT ... ON CONFLICT DO
NOTHING``), so the row lock is taken before anything is decided and two
writers can never both charge the same call.

API keys look like ``uvk_`` followed by 32 URL-safe base64 characters (24
random bytes). The first 12 characters, the *prefix* (``uvk_AbCdEfGh``),
name a key in logs and on the command line. Only the SHA-256 of the whole
key is stored; the key itself is shown once, by ``create_key``, and is never
stored or logged.

Times are Unix seconds (``float``), always passed in by the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
from typing import Any, Callable, Mapping, Sequence

import attrs
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger

KEY_SCHEME = "uvk_"
KEY_PREFIX_LENGTH = 12
BUSY_TIMEOUT_MS = 5000
MAX_POINTS_DELTA = 10**12
_KEY_RE = re.compile(r"uvk_[A-Za-z0-9_-]{32}")
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")

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


class StoreError(Exception):
    """An error an operator can act on; ``str()`` is one line."""


class UnknownAccount(StoreError):
    pass


# -- values ----------------------------------------------------------------


@attrs.frozen
class KeyInfo:
    """What an API key grants; ``revoked`` keys and ``points <= 0`` are refused by the daemon."""

    prefix: str
    account: str
    agent: str
    revoked: bool
    points: int


@attrs.frozen
class CallStart:
    call_id: str
    key_prefix: str
    account: str
    agent: str
    provider: str
    started_at: float
    metadata: Mapping[str, Any] = attrs.field(factory=dict)


def _not_negative(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value!r}")


@attrs.frozen
class CallRecord:
    """A finished call. ``metadata`` is the call's final metadata and
    replaces what ``open_call`` recorded; ``transcript`` is a list of
    ``{"role", "text", "t"}`` dicts."""

    call_id: str
    key_prefix: str
    account: str
    agent: str
    provider: str
    started_at: float
    ended_at: float
    duration: float
    end_reason: str
    turns: int = attrs.field(default=0, validator=_not_negative)
    barge_ins: int = attrs.field(default=0, validator=_not_negative)
    barge_ins_resumed: int = attrs.field(default=0, validator=_not_negative)
    points_charged: int = attrs.field(default=0, validator=_not_negative)
    transcript: Sequence[Mapping[str, Any]] = attrs.field(factory=list)
    metadata: Mapping[str, Any] = attrs.field(factory=dict)


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
    """Run transaction function ``fn(cursor, *args, **kw)`` and commit, like
    ``ConnectionPool.runInteraction`` does; roll back if it raises."""
    cursor = conn.cursor()
    try:
        result = fn(cursor, *args, **kw)
        conn.commit()
        return result
    except BaseException:
        conn.rollback()
        raise
    finally:
        cursor.close()


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


# -- keys ------------------------------------------------------------------


def hash_key(key: str) -> str:
    # API keys are 192-bit random tokens, not passwords: no dictionary
    # attack applies and SHA-256 cannot be brute-forced back to them. A slow
    # KDF (bcrypt, scrypt) would add nothing but CPU per request, which would
    # turn the unauthenticated 401 path into a denial-of-service vector.
    # Looking the hash up through the UNIQUE index leaks nothing useful by
    # timing: an attacker cannot steer the hash of a guess.
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def is_well_formed_key(key: object) -> bool:
    return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None


def check_account_name(name: str) -> None:
    if not _ACCOUNT_RE.fullmatch(name):
        raise StoreError(
            f"invalid account name {name!r}: use 1 to 64 letters, digits and . _ @ + -"
            " (starting with a letter or digit)"
        )


def create_key(txn: Any, account: str, agent: str, now: float) -> tuple[str, str]:
    """Create an API key for ``agent``, billed to ``account`` (created with 0
    points if missing). Returns ``(key, prefix)``; the key is not stored."""
    check_account_name(account)
    if not agent:
        raise StoreError("an API key needs an agent")
    txn.execute(
        "INSERT INTO accounts (name, points, created_at) VALUES (?, 0, ?)"
        " ON CONFLICT(name) DO NOTHING",
        (account, now),
    )
    for _ in range(5):  # prefixes carry 48 random bits: a clash is rare
        key = KEY_SCHEME + secrets.token_urlsafe(24)
        prefix = key[:KEY_PREFIX_LENGTH]
        txn.execute(
            "INSERT INTO api_keys (prefix, key_hash, account, agent, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (prefix, hash_key(key), account, agent, now),
        )
        if txn.rowcount == 1:
            return key, prefix
    raise StoreError("could not pick an unused key prefix; try again")


def revoke_key(txn: Any, prefix: str, now: float) -> bool:
    """Revoke the key named by ``prefix``. True if such a key exists (revoking
    twice keeps the first revocation time), False if not."""
    txn.execute(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE prefix = ?",
        (now, prefix),
    )
    return txn.rowcount == 1


def list_keys(txn: Any) -> list[dict[str, Any]]:
    txn.execute(
        "SELECT prefix, account, agent, created_at, revoked_at FROM api_keys"
        " ORDER BY account, created_at, prefix"
    )
    return [
        {"prefix": p, "account": a, "agent": g, "created_at": c, "revoked_at": r}
        for p, a, g, c, r in txn.fetchall()
    ]


def account_agents(txn: Any, account: str) -> set[str]:
    """The agents an account holds a live (not revoked) key for: the agents
    a provider's custom parameter may pick for that account's calls."""
    txn.execute("SELECT DISTINCT agent FROM api_keys WHERE account = ? AND revoked_at IS NULL", (account,))
    return {row[0] for row in txn.fetchall()}


def lookup_key(txn: Any, key: str) -> KeyInfo | None:
    """What ``key`` grants, or None for an unknown or malformed key."""
    if not is_well_formed_key(key):
        return None
    txn.execute(
        "SELECT k.prefix, k.account, k.agent, k.revoked_at, a.points"
        " FROM api_keys AS k JOIN accounts AS a ON a.name = k.account"
        " WHERE k.key_hash = ?",
        (hash_key(key),),
    )
    row = txn.fetchone()
    if row is None:
        return None
    prefix, account, agent, revoked_at, points = row
    return KeyInfo(prefix=prefix, account=account, agent=agent, revoked=revoked_at is not None, points=points)


# -- accounts and points ---------------------------------------------------

_ACCOUNT_SELECT = (
    "SELECT a.name, a.points, a.created_at,"
    " (SELECT COUNT(*) FROM api_keys AS k WHERE k.account = a.name AND k.revoked_at IS NULL)"
    " FROM accounts AS a"
)


def _account_dict(row: Sequence[Any]) -> dict[str, Any]:
    name, points, created_at, active_keys = row
    return {"name": name, "points": points, "created_at": created_at, "active_keys": active_keys}


def add_points(txn: Any, account: str, n: int) -> int:
    """Add ``n`` points (negative to correct) to ``account``; returns the new
    balance. Raises ``UnknownAccount`` if there is no such account."""
    if not isinstance(n, int) or abs(n) > MAX_POINTS_DELTA:
        raise StoreError(f"points must be a whole number between -{MAX_POINTS_DELTA} and {MAX_POINTS_DELTA}")
    txn.execute("UPDATE accounts SET points = points + ? WHERE name = ?", (n, account))
    if txn.rowcount != 1:
        raise UnknownAccount(
            f"unknown account {account!r} (an account is created with its first key:"
            " upvoot keys create --agent AGENT --account NAME)"
        )
    txn.execute("SELECT points FROM accounts WHERE name = ?", (account,))
    return txn.fetchone()[0]


def get_account(txn: Any, name: str) -> dict[str, Any] | None:
    txn.execute(_ACCOUNT_SELECT + " WHERE a.name = ?", (name,))
    row = txn.fetchone()
    return None if row is None else _account_dict(row)


def list_accounts(txn: Any) -> list[dict[str, Any]]:
    txn.execute(_ACCOUNT_SELECT + " ORDER BY a.name")
    return [_account_dict(row) for row in txn.fetchall()]


# -- calls -----------------------------------------------------------------

_CALL_COLUMNS = (
    "call_id", "state", "key_prefix", "account", "agent", "provider",
    "started_at", "heartbeat_at", "ended_at", "duration", "end_reason",
    "turns", "barge_ins", "barge_ins_resumed", "points_charged",
    "transcript", "metadata",
)  # fmt: skip
_CALL_SELECT = "SELECT " + ", ".join(_CALL_COLUMNS) + " FROM calls"


def _to_json(value: Any) -> str:
    # default=str: an odd metadata value must never cost us a call record.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _call_dict(row: Sequence[Any]) -> dict[str, Any]:
    call = dict(zip(_CALL_COLUMNS, row))
    call["transcript"] = json.loads(call["transcript"])
    call["metadata"] = json.loads(call["metadata"])
    return call


def open_call(txn: Any, start: CallStart) -> None:
    """Record a call as 'active' (a crash leaves it for ``settle_orphans``)."""
    txn.execute(
        "INSERT INTO calls (call_id, state, key_prefix, account, agent, provider,"
        " started_at, heartbeat_at, metadata) VALUES (?, 'active', ?, ?, ?, ?, ?, ?, ?)",
        (
            start.call_id, start.key_prefix, start.account, start.agent,
            start.provider, start.started_at, start.started_at, _to_json(dict(start.metadata)),
        ),
    )  # fmt: skip


def heartbeat(txn: Any, call_id: str, now: float) -> bool:
    """Note that an active call is still alive; False if it is not active."""
    txn.execute(
        "UPDATE calls SET heartbeat_at = ? WHERE call_id = ? AND state = 'active'",
        (now, call_id),
    )
    return txn.rowcount == 1


def settle_call(txn: Any, record: CallRecord) -> int:
    """Mark the call settled with everything ``record`` says and deduct its
    ``points_charged`` from the account, at most once per ``call_id``.

    Returns the points actually charged: ``record.points_charged``, or 0 if
    the call was already settled. A call that was never opened is inserted
    as settled and charged. The balance may go negative.
    """
    return record.points_charged if _settle(txn, record) else 0


def _settle(txn: Any, record: CallRecord) -> bool:
    fields = (
        record.key_prefix, record.account, record.agent, record.provider,
        record.started_at, record.ended_at, record.duration, record.end_reason,
        record.turns, record.barge_ins, record.barge_ins_resumed, record.points_charged,
        _to_json([dict(entry) for entry in record.transcript]), _to_json(dict(record.metadata)),
    )  # fmt: skip
    txn.execute(
        "UPDATE calls SET state = 'settled', key_prefix = ?, account = ?, agent = ?,"
        " provider = ?, started_at = ?, ended_at = ?, duration = ?, end_reason = ?,"
        " turns = ?, barge_ins = ?, barge_ins_resumed = ?, points_charged = ?,"
        " transcript = ?, metadata = ? WHERE call_id = ? AND state = 'active'",
        fields + (record.call_id,),
    )
    if txn.rowcount == 0:
        txn.execute(
            "INSERT INTO calls (key_prefix, account, agent, provider, started_at,"
            " ended_at, duration, end_reason, turns, barge_ins, barge_ins_resumed,"
            " points_charged, transcript, metadata, call_id, state, heartbeat_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'settled', ?)"
            " ON CONFLICT(call_id) DO NOTHING",
            fields + (record.call_id, record.ended_at),
        )
        if txn.rowcount == 0:
            return False  # settled before: charge nothing
    txn.execute(
        "UPDATE accounts SET points = points - ? WHERE name = ?",
        (record.points_charged, record.account),
    )
    return True


def list_calls(txn: Any, account: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Call records, newest first."""
    if account is None:
        txn.execute(_CALL_SELECT + " ORDER BY started_at DESC, call_id LIMIT ?", (limit,))
    else:
        txn.execute(
            _CALL_SELECT + " WHERE account = ? ORDER BY started_at DESC, call_id LIMIT ?",
            (account, limit),
        )
    return [_call_dict(row) for row in txn.fetchall()]


def get_call(txn: Any, call_id: str) -> dict[str, Any] | None:
    txn.execute(_CALL_SELECT + " WHERE call_id = ?", (call_id,))
    row = txn.fetchone()
    return None if row is None else _call_dict(row)


def settle_orphans(
    txn: Any,
    now: float,
    reason: str = "crash",
    charge: Callable[[CallRecord], int] | None = None,
    stale_after: float = 0.0,
) -> list[CallRecord]:
    """Settle calls left 'active' by a process that died.

    A call is an orphan when its last heartbeat is at least ``stale_after``
    seconds before ``now``. It is taken to have ended at that heartbeat:
    ``duration = heartbeat_at - started_at``, ``end_reason = reason``, and
    it is charged ``charge(record)`` points (nothing if ``charge`` is None).
    Returns the settled records.
    """
    cutoff = now - stale_after
    # Write first (a no-op) so the write lock is held before the orphans are
    # read: a CLI or daemon settling one of them meanwhile must wait.
    txn.execute(
        "UPDATE calls SET heartbeat_at = heartbeat_at WHERE state = 'active' AND heartbeat_at <= ?",
        (cutoff,),
    )
    txn.execute(
        _CALL_SELECT + " WHERE state = 'active' AND heartbeat_at <= ? ORDER BY started_at",
        (cutoff,),
    )
    settled = []
    for call in [_call_dict(row) for row in txn.fetchall()]:
        record = CallRecord(
            call_id=call["call_id"],
            key_prefix=call["key_prefix"],
            account=call["account"],
            agent=call["agent"],
            provider=call["provider"],
            started_at=call["started_at"],
            ended_at=call["heartbeat_at"],
            duration=max(0.0, call["heartbeat_at"] - call["started_at"]),
            end_reason=reason,
            transcript=call["transcript"],
            metadata=call["metadata"],
        )
        if charge is not None:
            record = attrs.evolve(record, points_charged=charge(record))
        if _settle(txn, record):
            settled.append(record)
    return settled


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
        """Run transaction function ``fn(txn, *args, **kw)`` in one transaction."""
        if self._pool is None:
            return defer.fail(StoreError(f"store {self.path} is not started"))
        return self._pool.runInteraction(fn, *args, **kw)

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
