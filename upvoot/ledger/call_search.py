"""A transaction function for the console's call history: calls filtered, summaries only.

``search_calls`` reads the call log as ``calls.list_calls`` does but filters
by account, agent, end reason and a start-time window, and returns
summaries (no transcript, no metadata: a list of hundreds of calls stays
small); ``calls.get_call`` reads one call whole. Whether a call was made
with a console test key comes from the key's ``kind``.

Takes a DB-API cursor first, one transaction when run by ``store.transact``
or ``store.Store.run``; the SQL is portable (SQLite and PostgreSQL).
"""

from __future__ import annotations

from typing import Any

from upvoot.ledger.records import StoreError

#: Most calls one search returns.
MAX_SEARCH_LIMIT = 1000

_SUMMARY = (
    "call_id", "state", "key_prefix", "account", "agent", "provider", "started_at", "ended_at", "duration",
    "end_reason", "turns", "barge_ins", "barge_ins_resumed", "points_charged",
)  # fmt: skip


def search_calls(txn: Any, *, account: str | None = None, agent: str | None = None, end_reason: str | None = None,
                 since: float | None = None, until: float | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Call summaries, newest first: those of ``account``, ``agent``, ended
    with ``end_reason`` (each None: any), started at ``since`` or later and
    before ``until``; at most ``limit`` (1 to ``MAX_SEARCH_LIMIT``). Each is
    a dict of the columns in ``_SUMMARY`` and ``console`` (bool)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SEARCH_LIMIT:
        raise StoreError(f"a limit must be a whole number from 1 to {MAX_SEARCH_LIMIT}, got {limit!r}")
    where, args = [], []
    for column, value in (("account", account), ("agent", agent), ("end_reason", end_reason)):
        if value is not None:
            where.append(f"c.{column} = ?")
            args.append(value)
    if since is not None:
        where.append("c.started_at >= ?")
        args.append(float(since))
    if until is not None:
        where.append("c.started_at < ?")
        args.append(float(until))
    sql = ("SELECT " + ", ".join(f"c.{column}" for column in _SUMMARY) + ", k.kind"
           " FROM calls AS c LEFT JOIN api_keys AS k ON k.prefix = c.key_prefix")
    if where:
        sql += " WHERE " + " AND ".join(where)
    txn.execute(sql + " ORDER BY c.started_at DESC, c.call_id LIMIT ?", (*args, limit))
    out = []
    for row in txn.fetchall():
        call = dict(zip(_SUMMARY, row))
        call["console"] = row[-1] == "console"
        out.append(call)
    return out
