"""The seam between the socket (``upvoot.daemon.ws``) and the service.

The WebSocket adapter sees the service only through ``IVoiceService``; the
service sees a call only through its ``ICallHandle`` and never touches a
protocol object. An upgrade is decided by ``admit``; a connection that
becomes a call is handed over by ``start_call``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs
from zope.interface import Attribute, Interface


@attrs.frozen
class Refusal:
    """An upgrade refused before the handshake: HTTP ``status``, with headers."""

    status: int  # 400, 401, 402, 404, 408, 429, 503
    reason: str  # the HTTP reason phrase
    headers: tuple[tuple[str, str], ...] = ()


@attrs.define(eq=False)
class Admission:
    """An upgrade admitted. Holds one call slot and one of the account's
    concurrent calls from the moment it is made; ``release`` gives both back
    (idempotent). ``start_call`` takes the slot over into the running call,
    so the adapter calls ``release`` on every path where no call started
    (and may call it after one did: then it does nothing)."""

    key_prefix: str  # uvk_XXXXXXXX: the only part of a key that is ever logged
    account: str
    agent: str  # the key's agent (a provider's custom parameter may pick another at start)
    provider: str  # the framing asked for: a name from upvoot.framing.negotiate.PROVIDERS, or "auto"
    params: Mapping[str, str]  # the upgrade URL's query parameters (last value of each)
    peer: str
    _release: Callable[[], None] = attrs.field(repr=False)
    released: bool = False  # the slot and the account's count are given back
    taken: bool = False  # a running call holds them now (``take_over``)
    call_id: str = ""  # the call's id; its row is 'active' in the ledger from the admission on
    held: int = 0  # the points the call holds of its account (upvoot.ledger.reserve)
    kind: str = "api"  # the key's kind: "console" for the console's single-use test keys

    def release(self) -> None:
        """Give the slot and the account's count back, unless a call took
        them over (then the call's end gives them back). Idempotent."""
        if not self.released and not self.taken:
            self.released = True
            self._release()

    def take_over(self) -> Callable[[], None]:
        """For the service's ``start_call`` only: the call that starts now
        holds the slot; returns the (idempotent) release its end calls.
        ``release`` does nothing from now on."""
        if self.released or self.taken:
            raise ValueError("this admission was already released or taken over")
        self.taken = True

        def release() -> None:
            if not self.released:
                self.released = True
                self._release()

        return release


class IVoiceService(Interface):
    """The service as the WebSocket adapter sees it."""

    clock = Attribute("IReactorTime: the daemon's clock")
    config = Attribute("upvoot.config.Config")
    metrics = Attribute("upvoot.daemon.metrics.Metrics")

    def admit(path: str, peer: str, headers: Mapping[str, str], params: Mapping[str, str]) -> Any:
        """Decide an upgrade: a Deferred firing with an ``Admission`` or a
        ``Refusal`` (never failing: a database error is a 503 refusal).
        ``path``: the request path (``/voice/<key>``); ``peer``: the caller's
        address as the logs name it (``tcp4:1.2.3.4:5678``, or the PROXY/
        forwarded address); ``params``: the query parameters, one string
        each (the last value given). A 503 refusal carries ``Retry-After``
        in its headers: the adapter sends ``Refusal.headers`` as they are."""

    def start_call(admission: Admission, started: Any, line: Any, disconnect: Callable[[], None]) -> Any:
        """Turn an admitted connection into a call: ``started`` is the
        framing's ``CallStarted`` (its custom parameters may pick another of
        the account's agents), ``line`` the call's ``ILine``, ``disconnect``
        drops the connection at once (the service calls it, after
        ``handle.hangup()``, for a call that did not end when the daemon
        stops). A Deferred firing with the started call's ``ICallHandle``
        (the greeting is already playing), or with None when the call could
        not start (the admission is released then, and the adapter closes
        the socket). Never fails.

        While the Deferred is pending (the account's agents are being looked
        up), the adapter holds the caller's events back; if the connection
        closes meanwhile it calls ``admission.release()``, and the Deferred
        fires with None without starting anything."""

    def note_refusal(status: int) -> None:
        """Count a refusal the adapter decided itself (408: the client left
        during the handshake). ``admit`` counts its own."""

    def live_calls() -> list:
        """The running calls, oldest first, one dict each: ``call_id``,
        ``agent``, ``account``, ``provider``, ``state``, ``started_at``,
        ``duration``, ``turns``, ``key_prefix`` (never a key), ``console``
        (a console test call). What the console's live view shows."""

