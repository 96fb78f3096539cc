"""The ledger's values: what a key grants, a call's opening, a call's record; and its errors.

Plain frozen values, no database: the store, the spool and the settlement
pass them around (``upvoot.ledger.store`` re-exports every name here).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import attrs


class StoreError(Exception):
    """An error an operator can act on; ``str()`` is one line."""


class UnknownAccount(StoreError):
    pass


class CallRefused(Exception):
    """A call the ledger will not open (its transaction rolled back): the
    database answered, the account cannot have this call now."""


class NoPoints(CallRefused):
    """The account's available points do not pay for one billing increment."""


class AccountBusy(CallRefused):
    """The account holds ``max_calls_per_account`` active calls (all nodes)."""


# -- values ----------------------------------------------------------------


@attrs.frozen
class KeyInfo:
    """What an API key grants; ``revoked`` keys and ``points <= 0`` are refused by the daemon.
    ``points`` is the balance; what running calls hold of it is not subtracted."""

    prefix: str
    account: str
    agent: str
    revoked: bool
    points: int
    kind: str = "api"  # "console": a single-use test key the console minted (upvoot.ledger.console_keys)


@attrs.frozen
class CallStart:
    """A call's opening: the row 'active', on ``node`` (the node id that runs it)."""

    call_id: str
    key_prefix: str
    account: str
    agent: str
    provider: str
    started_at: float
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    node: str = ""


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
