"""Transaction functions for API keys, accounts and their points.

API keys look like ``uvk_`` followed by 32 URL-safe base64 characters (24
random bytes). The first 12 characters, the *prefix* (``uvk_AbCdEfGh``),
name a key in logs and on the command line. Only the SHA-256 of the whole
key is stored; the key itself is shown once, by ``create_key``, and is never
stored or logged.

Each function takes a DB-API cursor first and is one transaction when run by
``store.transact`` or ``store.Store.run`` (``upvoot.ledger.store`` re-exports
every public name here).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Any, Sequence

from upvoot.ledger.records import KeyInfo, StoreError, UnknownAccount

KEY_SCHEME = "uvk_"
KEY_PREFIX_LENGTH = 12
MAX_POINTS_DELTA = 10**12
_KEY_RE = re.compile(r"uvk_[A-Za-z0-9_-]{32}")
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


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


def lookup_key(txn: Any, key: str, now: float | None = None) -> KeyInfo | None:
    """What ``key`` grants, or None for an unknown or malformed key. A
    console key is claimed here (``console_keys.claim_console_key``, at
    ``now``, default the wall clock): None when it is used or expired."""
    if not is_well_formed_key(key):
        return None
    txn.execute(
        "SELECT k.prefix, k.account, k.agent, k.revoked_at, a.points, k.kind"
        " FROM api_keys AS k JOIN accounts AS a ON a.name = k.account"
        " WHERE k.key_hash = ?",
        (hash_key(key),),
    )
    row = txn.fetchone()
    if row is None:
        return None
    prefix, account, agent, revoked_at, points, kind = row
    if kind == "console":
        from upvoot.ledger.console_keys import claim_console_key  # it imports this module

        if not claim_console_key(txn, prefix, time.time() if now is None else now):
            return None
    return KeyInfo(prefix=prefix, account=account, agent=agent, revoked=revoked_at is not None, points=points,
                   kind=kind)


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
