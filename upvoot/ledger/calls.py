"""Transaction functions for the call log: open, heartbeat, settle (once), list, orphans.

Functions that read and then write start with the write (``UPDATE ...
WHERE state = 'active'``, ``INSERT ... ON CONFLICT DO NOTHING``), so the row
lock is taken before anything is decided and two writers can never both
charge the same call.

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
    """Record a call as 'active' (a crash leaves it for ``settle_orphans``)."""
    txn.execute(
        "INSERT INTO calls (call_id, state, key_prefix, account, agent, provider,"
        " started_at, heartbeat_at, metadata) VALUES (?, 'active', ?, ?, ?, ?, ?, ?, ?)",
        (
            start.call_id, start.key_prefix, start.account, start.agent,
            start.provider, start.started_at, start.started_at, _to_json(dict(start.metadata)),
        ),
    )  # fmt: skip


def open_call_once(txn: Any, start: CallStart) -> bool:
    """``open_call`` that does nothing if the call is already recorded
    (opened or settled): a spooled opening applied late. True if opened."""
    txn.execute(
        "INSERT INTO calls (call_id, state, key_prefix, account, agent, provider,"
        " started_at, heartbeat_at, metadata) VALUES (?, 'active', ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(call_id) DO NOTHING",
        (
            start.call_id, start.key_prefix, start.account, start.agent,
            start.provider, start.started_at, start.started_at, _to_json(dict(start.metadata)),
        ),
    )  # fmt: skip
    return txn.rowcount == 1


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
    for call in [_call_dict(row, lenient=True) for row in txn.fetchall()]:
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
