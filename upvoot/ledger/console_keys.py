"""Transaction functions for console keys: single-use test keys that expire.

The console (``upvoot.console``) mints one for each call an operator makes
from the browser: an ordinary API key row (``uvk_`` + 32 characters, only
its SHA-256 stored) with ``kind = 'console'``, an ``expires_at`` minutes
ahead and ``used_at`` NULL. ``accounts.lookup_key`` claims it as it looks it
up: the one ``UPDATE ... WHERE used_at IS NULL AND expires_at > now`` below
marks it used, so of two connections racing with the same key only one
gets a call, and an expired or used key is refused like an unknown one.

Each function takes a DB-API cursor first and is one transaction when run by
``store.transact`` or ``store.Store.run``; the SQL is portable (SQLite and
PostgreSQL).
"""

from __future__ import annotations

import secrets
from typing import Any

from upvoot.ledger.accounts import KEY_PREFIX_LENGTH, KEY_SCHEME, check_account_name, hash_key
from upvoot.ledger.records import StoreError, UnknownAccount

CONSOLE = "console"


def mint_console_key(txn: Any, account: str, agent: str, now: float, ttl: float) -> tuple[str, str, float]:
    """A single-use console key for ``agent`` billed to ``account`` (which
    must exist), valid until ``now + ttl``: ``(key, prefix, expires_at)``.
    The key itself is not stored. Console keys that expired unused are
    deleted on the way (they can hold no call), so the table stays small."""
    check_account_name(account)
    if not agent:
        raise StoreError("a console key needs an agent")
    if not ttl > 0:
        raise StoreError(f"a console key's lifetime must be positive, got {ttl!r}")
    txn.execute("SELECT 1 FROM accounts WHERE name = ?", (account,))
    if txn.fetchone() is None:
        raise UnknownAccount(f"unknown account {account!r}")
    txn.execute(
        "DELETE FROM api_keys WHERE kind = 'console' AND used_at IS NULL AND expires_at <= ?"
        " AND NOT EXISTS (SELECT 1 FROM calls WHERE calls.key_prefix = api_keys.prefix)",
        (now,),
    )
    expires_at = now + ttl
    for _ in range(5):  # prefixes carry 48 random bits: a clash is rare
        key = KEY_SCHEME + secrets.token_urlsafe(24)
        prefix = key[:KEY_PREFIX_LENGTH]
        txn.execute(
            "INSERT INTO api_keys (prefix, key_hash, account, agent, created_at, kind, expires_at)"
            " VALUES (?, ?, ?, ?, ?, 'console', ?) ON CONFLICT DO NOTHING",
            (prefix, hash_key(key), account, agent, now, expires_at),
        )
        if txn.rowcount == 1:
            return key, prefix, expires_at
    raise StoreError("could not pick an unused key prefix; try again")


def claim_console_key(txn: Any, prefix: str, now: float) -> bool:
    """Mark the console key ``prefix`` used, if it is unused and unexpired:
    True for the one caller that claims it, False for every other (used,
    expired, unknown). One statement: the row lock decides a race."""
    txn.execute(
        "UPDATE api_keys SET used_at = ? WHERE prefix = ? AND kind = 'console' AND used_at IS NULL"
        " AND (expires_at IS NULL OR expires_at > ?)",
        (now, prefix, now),
    )
    return txn.rowcount == 1
