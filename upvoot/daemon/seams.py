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
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release()


class IVoiceService(Interface):
    """The service as the WebSocket adapter sees it."""

    clock = Attribute("IReactorTime: the daemon's clock")
    config = Attribute("upvoot.config.Config")
    metrics = Attribute("upvoot.daemon.metrics.Metrics")

    def admit(path: str, peer: str, headers: Mapping[str, str], params: Mapping[str, str]) -> Any:
        """Decide an upgrade: a Deferred firing with an ``Admission`` or a
        ``Refusal`` (never failing: a database error is a 503 refusal)."""

    def start_call(admission: Admission, started: Any, line: Any) -> Any:
        """Turn an admitted connection into a call: ``started`` is the
        framing's ``CallStarted`` (its custom parameters may pick another of
        the account's agents), ``line`` the call's ``ILine``. A Deferred
        firing with the started call's ``ICallHandle`` (the greeting is
        already playing), or with None when the call could not start (the
        admission is released then, and the adapter closes the socket)."""

