"""Transaction functions for the call log: open, heartbeat, settle (once), list, orphans.

Functions that read and then write start with the write (``UPDATE ...
WHERE state = 'active'``, ``INSERT ... ON CONFLICT DO NOTHING``), so the row
lock is taken before anything is decided and two writers can never both
charge the same call (SQLite: the write lock of the file; PostgreSQL: the
row's lock, and READ COMMITTED re-checks the ``WHERE`` of a row it waited
for). Locks are taken call row first, then account row, one call per
transaction, so two transactions never wait for each other in a circle.

Points: settling a call releases what it held (``calls.reserved``, see
``upvoot.ledger.reserve``) and charges its points in the same transaction,
never more than the balance: a balance never goes below 0, and the record
holds the points really charged.

Each function takes a DB-API cursor first and is one transaction when run by
``store.transact`` or ``store.Store.run`` (``upvoot.ledger.store`` re-exports
every public name here).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import attrs

from upvoot.ledger.records import CallRecord, CallStart, StoreError

MAX_LIST_LIMIT = 10**9
MAX_INTEGER = 2**63 - 1  # a 64-bit INTEGER (SQLite) / BIGINT (PostgreSQL)


# -- calls -----------------------------------------------------------------

_CALL_COLUMNS = (
    "call_id", "state", "key_prefix", "account", "agent", "provider",
    "started_at", "heartbeat_at", "ended_at", "duration", "end_reason",
    "turns", "barge_ins", "barge_ins_resumed", "points_charged",
    "transcript", "metadata", "node",
)  # fmt: skip
_CALL_SELECT = "SELECT " + ", ".join(_CALL_COLUMNS) + " FROM calls"


def _to_json(value: Any) -> str:
    # default=str: an odd metadata value must never cost us a call record.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _call_dict(row: Sequence[Any], lenient: bool = False) -> dict[str, Any]:
    """A call row as a dict. A transcript or metadata column that is not JSON
    (a hand edit) raises ``StoreError`` naming the call, or with ``lenient``
    is kept as text: an empty transcript and ``{"unreadable_<column>": text}``
    in the metadata, so that settling the call never loses it."""
    call = dict(zip(_CALL_COLUMNS, row))
    unreadable = {}
    for column, empty in (("transcript", []), ("metadata", {})):
        text = call[column]
        try:
            value = json.loads(text)
        except (TypeError, ValueError, RecursionError):
            value = None
        if not isinstance(value, type(empty)):
            if not lenient:
                raise StoreError(f"call {call['call_id']!r} has a {column} that is not a JSON"
                                 f" {'list' if column == 'transcript' else 'object'}: {str(text)[:60]!r}")
            unreadable[f"unreadable_{column}"] = str(text)
            value = empty
        call[column] = value
    call["metadata"].update(unreadable)
    return call


def open_call(txn: Any, start: CallStart) -> None:
    """Record a call as 'active', holding no points (a crash leaves it for
    ``settle_orphans``; the daemon opens calls with ``reserve.open_reserved``)."""
    txn.execute(
        "INSERT INTO calls (call_id, state, key_prefix, account, agent, provider,"
        " started_at, heartbeat_at, metadata, node) VALUES (?, 'active', ?, ?, ?, ?, ?, ?, ?, ?)",
        _start_fields(start),
    )


def _start_fields(start: CallStart) -> tuple:
    return (
        start.call_id, start.key_prefix, start.account, start.agent, start.provider,
        start.started_at, start.started_at, _to_json(dict(start.metadata)), start.node,
    )  # fmt: skip


def open_call_once(txn: Any, start: CallStart) -> bool:
    """``open_call`` that does nothing if the call is already recorded
    (opened or settled): a spooled opening applied late. True if opened."""
    txn.execute(
        "INSERT INTO calls (call_id, state, key_prefix, account, agent, provider,"
        " started_at, heartbeat_at, metadata, node) VALUES (?, 'active', ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(call_id) DO NOTHING",
        _start_fields(start),
    )
    return txn.rowcount == 1


def heartbeat(txn: Any, call_id: str, now: float) -> bool:
    """Note that an active call is still alive; False if it is not active."""
    txn.execute(
        "UPDATE calls SET heartbeat_at = ? WHERE call_id = ? AND state = 'active'",
        (now, call_id),
    )
    return txn.rowcount == 1


def settle_call(txn: Any, record: CallRecord) -> int:
    """Mark the call settled with everything ``record`` says, release the
    points it held and charge ``record.points_charged``, at most once per
    ``call_id``.

    Returns the points actually charged: ``record.points_charged``, less if
    the balance held less (a balance never goes below 0; the row records
    what was charged), or 0 if the call was already settled. A call that was
    never opened is inserted as settled and charged.
    """
    charged = _settle(txn, record)
    return 0 if charged is None else charged


def charge_account(txn: Any, account: str, held: int, points: int) -> int:
    """Release ``held`` points of ``account``'s reservations and take
    ``points`` from its balance, never below 0: the points taken. (The first
    statement locks the account row: the balance read next is the last one.)"""
    txn.execute(
        "UPDATE accounts SET reserved = CASE WHEN reserved > ? THEN reserved - ? ELSE 0 END WHERE name = ?",
        (held, held, account),
    )
    txn.execute("SELECT points FROM accounts WHERE name = ?", (account,))
    row = txn.fetchone()
    charged = 0 if row is None else max(0, min(points, row[0]))
    if charged:
        txn.execute("UPDATE accounts SET points = points - ? WHERE name = ?", (charged, account))
    return charged


def _settle(txn: Any, record: CallRecord) -> int | None:
    """The settlement: the points charged, None if settled before."""
    if record.points_charged > MAX_INTEGER:  # bad data, for good (spool.PERMANENT): never "charge the balance"
        raise OverflowError(f"call {record.call_id!r}: {record.points_charged} points is more than a ledger holds")
    txn.execute("UPDATE calls SET heartbeat_at = heartbeat_at WHERE call_id = ? AND state = 'active'",
                (record.call_id,))  # the row's lock first (and is it active?)
    if txn.rowcount == 0:
        txn.execute(
            "INSERT INTO calls (call_id, state, key_prefix, account, agent, provider, started_at,"
            " heartbeat_at) VALUES (?, 'active', ?, ?, ?, ?, ?, ?) ON CONFLICT(call_id) DO NOTHING",
            (record.call_id, record.key_prefix, record.account, record.agent, record.provider,
             record.started_at, record.ended_at),
        )
        if txn.rowcount == 0:
            return None  # settled before: charge nothing
    txn.execute("SELECT account, reserved FROM calls WHERE call_id = ?", (record.call_id,))
    held_by, held = txn.fetchone()
    if held_by != record.account:  # the hold was taken from the account the call opened on
        charge_account(txn, held_by, held, 0)
        held = 0
    charged = charge_account(txn, record.account, held, record.points_charged)
    fields = (
        record.key_prefix, record.account, record.agent, record.provider,
        record.started_at, record.ended_at, record.duration, record.end_reason,
        record.turns, record.barge_ins, record.barge_ins_resumed, charged,
        _to_json([dict(entry) for entry in record.transcript]), _to_json(dict(record.metadata)),
    )  # fmt: skip
    txn.execute(
        "UPDATE calls SET state = 'settled', key_prefix = ?, account = ?, agent = ?,"
        " provider = ?, started_at = ?, ended_at = ?, duration = ?, end_reason = ?,"
        " turns = ?, barge_ins = ?, barge_ins_resumed = ?, points_charged = ?,"
        " transcript = ?, metadata = ?, reserved = 0 WHERE call_id = ?",
        fields + (record.call_id,),
    )
    return charged


def list_calls(txn: Any, account: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Call records, newest first; at most ``limit`` (1 to ``MAX_LIST_LIMIT``)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise StoreError(f"a limit must be a whole number from 1 to {MAX_LIST_LIMIT}, got {limit!r}")
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
    node: str | None = None,
) -> list[CallRecord]:
    """Settle calls left 'active' by a process that died.

    A call is an orphan when its last heartbeat is at least ``stale_after``
    seconds before ``now`` (and, with ``node``, it ran on that node). It is
    taken to have ended at that heartbeat: ``duration = heartbeat_at -
    started_at``, ``end_reason = reason``, and it is charged
    ``charge(record)`` points (nothing if ``charge`` is None), at most its
    account's balance. Returns the settled records.

    All in this one transaction: for a node's own leftovers at its start,
    and the command line. The daemons' sweeper settles calls of other nodes
    one per transaction (``reserve.stale_calls``, ``settle_crashed``).
    """
    cutoff = now - stale_after
    sql, args = "SELECT call_id FROM calls WHERE state = 'active' AND heartbeat_at <= ?", [cutoff]
    if node is not None:
        sql, args = sql + " AND node = ?", args + [node]
    txn.execute(sql + " ORDER BY started_at, call_id", tuple(args))
    settled = []
    for (call_id,) in txn.fetchall():
        record = settle_crashed(txn, call_id, cutoff, reason, charge)
        if record is not None:
            settled.append(record)
    return settled


def settle_crashed(
    txn: Any, call_id: str, cutoff: float, reason: str = "crash", charge: Callable[[CallRecord], int] | None = None,
) -> CallRecord | None:
    """Settle one call whose last heartbeat is at or before ``cutoff``, as
    ended at that heartbeat (see ``settle_orphans``): the record, or None if
    it is not such a call any more (settled meanwhile, or it beat again).
    The conditional ``UPDATE ... WHERE state = 'active' ... RETURNING`` is
    the claim: of several nodes sweeping at once, one settles it."""
    txn.execute(
        "UPDATE calls SET state = 'settled', end_reason = ?, ended_at = heartbeat_at,"
        " duration = CASE WHEN heartbeat_at > started_at THEN heartbeat_at - started_at ELSE 0 END"
        " WHERE call_id = ? AND state = 'active' AND heartbeat_at <= ?"
        " RETURNING " + ", ".join(_CALL_COLUMNS) + ", reserved",
        (reason, call_id, cutoff),
    )
    rows = txn.fetchall()
    if not rows:
        return None
    row = rows[0]
    call = _call_dict(row[:-1], lenient=True)
    record = CallRecord(
        call_id=call["call_id"], key_prefix=call["key_prefix"], account=call["account"], agent=call["agent"],
        provider=call["provider"], started_at=call["started_at"], ended_at=call["ended_at"],
        duration=call["duration"], end_reason=reason, transcript=call["transcript"], metadata=call["metadata"],
    )
    charged = charge_account(txn, record.account, row[-1], 0 if charge is None else charge(record))
    txn.execute("UPDATE calls SET points_charged = ?, reserved = 0, metadata = ? WHERE call_id = ?",
                (charged, _to_json(dict(record.metadata)), call_id))
    return attrs.evolve(record, points_charged=charged)
