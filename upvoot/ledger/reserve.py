"""Prepaid calls: the points a running call holds, so that a balance never goes below 0.

An account's *available* points are its balance less what its running
calls hold (``accounts.points - accounts.reserved``; ``accounts.reserved``
is the sum of its active calls' ``calls.reserved``). A call opens only when
the available points pay for one billing increment, holding as many as its
horizon asks (``[upvoot] reservation_horizon``) or, failing that, as many
whole increments as are available; every heartbeat extends the hold ahead
of the call's elapsed time, in the same transaction as the beat. Settling
the call (``calls.settle_call``, ``calls.settle_crashed``) releases the
hold and charges the call, capped at the balance.

Every hold is taken by one conditional statement, ``UPDATE accounts SET
reserved = reserved + ? WHERE name = ? AND points - reserved >= ?``: on
SQLite under the file's write lock, on PostgreSQL under the row's lock with
the condition re-checked after any wait, so calls racing on any number of
nodes never hold more than the balance. That statement comes first in each
transaction, so the account row is locked before the account's active calls
are counted (``max_calls_per_account``, cluster-wide).

Each function takes a DB-API cursor first and is one transaction (``?``
placeholders and portable SQL: both backends run the same text).
"""

from __future__ import annotations

import math
from typing import Any

from upvoot.ledger.billing import points_for
from upvoot.ledger.calls import _start_fields, _to_json
from upvoot.ledger.records import AccountBusy, CallStart, NoPoints


# -- amounts (no database) ------------------------------------------------------------


def hold_for(seconds: float, billing_increment: float, points_per_increment: int) -> int:
    """The points that pay for the first ``seconds`` of a call: whole increments."""
    return points_for(seconds, billing_increment, points_per_increment)


def covered(held: int, billing_increment: float, points_per_increment: int) -> float:
    """Seconds of call that ``held`` points pay for (infinite for a free agent)."""
    if points_per_increment <= 0:
        return math.inf
    return (held // points_per_increment) * billing_increment


# -- transaction functions ---------------------------------------------------------------


def take_points(txn: Any, account: str, want: int, unit: int) -> int | None:
    """Hold ``want`` more points of ``account``, or failing that as many
    whole ``unit``\\ s as are available (at least one). The points held (0
    when ``want`` is 0 and the account has any available), or None when not
    even one unit is available. Locks the account row."""
    need = max(want, 1)  # a free call still needs an account with points
    txn.execute("UPDATE accounts SET reserved = reserved + ? WHERE name = ? AND points - reserved >= ?",
                (want, account, need))
    if txn.rowcount == 1:
        return want
    if unit <= 0 or want <= unit:
        return None
    txn.execute("SELECT points - reserved FROM accounts WHERE name = ?", (account,))
    row = txn.fetchone()
    some = 0 if row is None else min(want, max(0, row[0]) // unit * unit)
    if some < unit:
        return None
    txn.execute("UPDATE accounts SET reserved = reserved + ? WHERE name = ? AND points - reserved >= ?",
                (some, account, some))
    return some if txn.rowcount == 1 else None


def open_reserved(txn: Any, start: CallStart, want: int, unit: int, max_calls: int = 0) -> int:
    """Open the call 'active' on ``start.node``, holding ``want`` points (or
    the whole ``unit``\\ s available, at least one): the points held.

    Raises ``NoPoints`` when the account's available points do not pay for
    one ``unit`` (or it has none), ``AccountBusy`` when it already holds
    ``max_calls`` active calls on all nodes (0: no limit); either rolls the
    transaction back."""
    held = take_points(txn, start.account, want, unit)
    if held is None:
        raise NoPoints(f"account {start.account!r} has no points available for a call")
    if max_calls:
        txn.execute("SELECT COUNT(*) FROM calls WHERE account = ? AND state = 'active'", (start.account,))
        if txn.fetchone()[0] >= max_calls:
            raise AccountBusy(f"account {start.account!r} holds {max_calls} calls")
    txn.execute(
        "INSERT INTO calls (call_id, state, key_prefix, account, agent, provider,"
        " started_at, heartbeat_at, metadata, node, reserved) VALUES (?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        _start_fields(start) + (held,),
    )
    return held


def beat(txn: Any, call_id: str, now: float, hold_to: int, unit: int, begin: dict | None = None) -> int | None:
    """The heartbeat of a running call, extending its hold to ``hold_to``
    points (or by the whole ``unit``\\ s available) in the same transaction.
    ``begin``: the call has just begun (``{"started_at", "agent",
    "provider", "metadata"}``: the call row takes them). The points the call holds
    now; None if it is not active any more (settled: by a sweeper, say)."""
    txn.execute("UPDATE calls SET heartbeat_at = ? WHERE call_id = ? AND state = 'active'", (now, call_id))
    if txn.rowcount != 1:
        return None
    if begin:
        txn.execute("UPDATE calls SET started_at = ?, agent = ?, provider = ?, metadata = ? WHERE call_id = ?",
                    (begin["started_at"], begin["agent"], begin["provider"], _to_json(begin.get("metadata", {})),
                     call_id))
    txn.execute("SELECT account, reserved FROM calls WHERE call_id = ?", (call_id,))
    account, held = txn.fetchone()
    if hold_to <= held:
        return held
    more = take_points(txn, account, hold_to - held, unit)
    if not more:
        return held
    txn.execute("UPDATE calls SET reserved = reserved + ? WHERE call_id = ?", (more, call_id))
    return held + more


def cancel_call(txn: Any, call_id: str) -> bool:
    """Forget a call opened at admission that never began (its connection
    closed first), giving back what it held. True if there was one."""
    txn.execute("DELETE FROM calls WHERE call_id = ? AND state = 'active' RETURNING account, reserved", (call_id,))
    rows = txn.fetchall()
    if not rows:
        return False
    account, held = rows[0]
    txn.execute(
        "UPDATE accounts SET reserved = CASE WHEN reserved > ? THEN reserved - ? ELSE 0 END WHERE name = ?",
        (held, held, account),
    )
    return True


def stale_calls(txn: Any, cutoff: float, limit: int = 500) -> list[str]:
    """Active calls of any node whose last heartbeat is before ``cutoff``
    (candidates only: ``calls.settle_crashed`` claims each)."""
    txn.execute("SELECT call_id FROM calls WHERE state = 'active' AND heartbeat_at < ?"
                " ORDER BY heartbeat_at, call_id LIMIT ?", (cutoff, limit))
    return [row[0] for row in txn.fetchall()]


def account_balance(txn: Any, account: str) -> tuple[int, int] | None:
    """``(points, reserved)`` of ``account``, or None."""
    txn.execute("SELECT points, reserved FROM accounts WHERE name = ?", (account,))
    row = txn.fetchone()
    return None if row is None else (row[0], row[1])
