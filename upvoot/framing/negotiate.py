"""Which dialect a connection speaks, sans-IO: the one provider list, the
first-frame rules (:func:`detect`), and :class:`Negotiation`, the state
machine from a connection's open to its call's start.

Detection rules (the provider notes' closing table, as pipecat's runner does):

  binary frame                                          -> "raw"
  {"event": "websocket:connected", ...}                 -> "vonage"
  start with top-level ``stream_id`` and
      ``start.call_control_id``                         -> "telnyx"
  ``start.streamId`` + ``start.callId``                 -> "plivo"
  ``start.stream_sid`` + ``start.call_sid`` + ``start.account_sid``
      (keys matched case-insensitively, ``Event`` too)  -> "exotel"
  ``start.streamSid`` + ``start.callSid``               -> "twilio", unless
      the key ``Event`` is capitalised or ``mediaFormat.encoding`` names
      linear PCM (raw/slin/l16), which is Exotel's camelCase variant
  a JSON object without ``event`` carrying ``callSid`` or
      ``sampleRate``                                    -> JAMBONZ (no codec)
  anything else (``connected``, media, not JSON, ...)   -> None

The first frame of Twilio, Exotel and Telnyx is ``connected``, which names
nobody: :func:`detect` returns None and :class:`Negotiation` waits (at most
``start_timeout``) for the next text frame (the ``start``), then feeds both
frames to the codec it builds.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Protocol, Union

import attrs

from upvoot.framing.base import CallStarted, Event, Frame, Framing, ProtocolError
from upvoot.framing.jsonwire import loads, pick

#: every dialect UpVoot has a codec for: the one list (config, the dialer and the adapter use it)
PROVIDERS = ("raw", "exotel", "twilio", "plivo", "telnyx", "vonage")
#: the choice that lets the first frames decide
AUTO = "auto"
#: a dialect :func:`detect` recognises without a codec for it: jambonz's
#: ``listen`` sends a JSON metadata frame, then binary L16. Its metadata does
#: not decide anything; its binary audio (or the detect timeout) picks raw.
JAMBONZ = "jambonz"
#: detected dialects that have no codec: negotiation goes on as if undecided
NO_CODEC = frozenset({JAMBONZ})

# Close codes a server may send (Autobahn allows 1000 and 3000-4999 only).
CLOSE_BAD_PARAMETERS = 4400
CLOSE_NO_START = 4408
CLOSE_UNRECOGNISED = 4002


def _has(obj: object, *names: str) -> bool:
    return all(pick(obj, n) is not None for n in names)


def detect(first_frame: str | bytes) -> str | None:
    """The provider name for a first frame, or None when it does not tell."""
    if isinstance(first_frame, (bytes, bytearray, memoryview)):
        return "raw"
    msg = loads(first_frame)
    if not isinstance(msg, dict):
        return None  # not JSON, too deep, too long, or not an object
    event = pick(msg, "event")
    if event is None:
        if "callSid" in msg or "sampleRate" in msg:
            return JAMBONZ
        return None
    if event == "websocket:connected":
        return "vonage"
    start = pick(msg, "start")
    if not isinstance(start, dict):
        return None
    if "stream_id" in msg and "call_control_id" in start:
        return "telnyx"
    if "streamId" in start and "callId" in start:
        return "plivo"
    if _has(start, "stream_sid", "call_sid", "account_sid") and "streamSid" not in start:
        return "exotel"
    if "streamSid" in start and "callSid" in start:
        encoding = str(pick(pick(start, "mediaFormat", "media_format"), "encoding") or "").lower()
        if "event" not in msg or any(w in encoding for w in ("raw", "slin", "l16", "pcm")):
            return "exotel"
        return "twilio"
    return None


def make_framing(name: str, params: Mapping[str, str] | None = None) -> Framing:
    """The codec for provider ``name``; ``params`` are the URL's query
    parameters (``sample-rate``, ``codec``, ...). ValueError for an unknown
    name or a bad parameter."""
    params = params or {}
    if name == "raw":
        from upvoot.framing.raw import RawFraming

        return RawFraming()
    if name == "exotel":
        from upvoot.framing.exotel import ExotelFraming

        return ExotelFraming.from_params(params)
    if name == "twilio":
        from upvoot.framing.twilio import TwilioFraming

        return TwilioFraming.from_params(params)
    if name == "plivo":
        from upvoot.framing.plivo import PlivoFraming

        return PlivoFraming.from_params(params)
    if name == "telnyx":
        from upvoot.framing.telnyx import TelnyxFraming

        return TelnyxFraming.from_params(params)
    if name == "vonage":
        from upvoot.framing.vonage import VonageFraming

        return VonageFraming.from_params(params)
    raise ValueError(f"no framing for provider {name!r} (known: {', '.join(PROVIDERS)})")


# ---- actions: what the adapter must do ------------------------------------------


@attrs.frozen
class Chosen:
    """The dialect is fixed: ``framing`` encodes and decodes from now on."""

    framing: Framing
    why: str  # "configured", "detected" or "timeout"


@attrs.frozen
class Started:
    """The call may start (the provider's start, or the raw connection itself)."""

    started: CallStarted


@attrs.frozen
class Deliver:
    """A call event, in arrival order, always after :class:`Started`.
    ``ProtocolError`` too: the adapter logs it and answers it."""

    event: Event


@attrs.frozen
class Close:
    """Close the connection with this (sendable) code."""

    code: int
    reason: str


@attrs.frozen
class Reply:
    """Frames to send back now (e.g. what the framing made due on receiving)."""

    frames: list[Frame]


Action = Union[Chosen, Started, Deliver, Close, Reply]


class Clock(Protocol):
    """What Negotiation reads of an ``IReactorTime``."""

    def seconds(self) -> float: ...


class State(enum.Enum):
    NEW = "new"  # before begin()
    WAITING_FIRST = "waiting_first"  # auto: no frame has told the dialect yet
    WAITING_PROVIDER = "waiting_provider"  # auto: a provider said "connected", not who it is
    WAITING_START = "waiting_start"  # the framing is chosen; its start message has not come
    STARTED = "started"  # the call runs; frames are decoded and delivered
    CLOSED = "closed"  # a Close was returned; nothing more happens


class Negotiation:
    """From open to the call's start, without I/O: the adapter feeds it
    frames and timeouts and does what the returned actions say.

    ``n.begin()`` once on open; ``n.receive(payload, is_binary)`` for every
    frame; ``n.timeout()`` when ``n.deadline`` seconds have passed since the
    last call (the adapter re-arms its one timer after every call, cancels it
    when ``n.deadline`` is None). With ``clock`` (an ``IReactorTime``) the
    deadline is what is left of the current wait, so frames never extend
    it; without one, each call restarts the wait.

    The machine (every transition; Close is final)::

      NEW --begin, "raw"------------------------------> STARTED   Chosen, Started
      NEW --begin, a provider-------------------------> WAITING_START (start_timeout)
      NEW --begin, "auto"-----------------------------> WAITING_FIRST (detect_timeout)
      WAITING_FIRST --binary, {"type"}, not JSON-------> STARTED (raw), early frames replayed
      WAITING_FIRST --timeout-------------------------> STARTED (raw)
      WAITING_FIRST --a provider's "connected"--------> WAITING_PROVIDER (start_timeout)
      WAITING_FIRST/PROVIDER --a detected start-------> WAITING_START, early frames replayed
      WAITING_START --the codec's CallStarted---------> STARTED   Started, held events delivered
      WAITING_PROVIDER/START --timeout----------------> CLOSED    Close(4408)
      any waiting state --frame max_early_frames + 1--> CLOSED    Close(4002)
      bad framing parameters (make_framing fails)-----> CLOSED    Close(4400)
      STARTED --frame---------------------------------> STARTED   Deliver..., Reply(drained frames)

    ProtocolError events are delivered like the others: the adapter logs
    them and answers each with ``framing.event("error", message=...)``.
    """

    def __init__(
        self,
        choice: str,
        params: Mapping[str, str],
        *,
        detect_timeout: float,
        start_timeout: float,
        max_early_frames: int = 50,
        clock: Clock | None = None,
    ) -> None:
        self.choice = choice
        self.params = dict(params)
        self.detect_timeout = detect_timeout
        self.start_timeout = start_timeout
        self.max_early_frames = max_early_frames
        self.clock = clock
        self.state = State.NEW
        self.framing: Framing | None = None
        self._early: list[tuple[bytes, bool]] = []  # frames before the framing was chosen
        self._frames_before_start = 0
        self._held: list[Event] = []  # events before the start
        self._wait: float | None = None
        self._due: float | None = None  # absolute, with a clock

    # -- the adapter's side ------------------------------------------------------------
    @property
    def deadline(self) -> float | None:
        """Seconds from now until :meth:`timeout` is due; None = no timer."""
        if self._wait is None:
            return None
        if self.clock is None or self._due is None:
            return self._wait
        return max(0.0, self._due - self.clock.seconds())

    def begin(self) -> list[Action]:
        if self.state is not State.NEW:
            return []
        if self.choice == AUTO:
            self._enter(State.WAITING_FIRST, self.detect_timeout)
            return []
        return self._choose(self.choice, "configured")

    def receive(self, payload: bytes | str, is_binary: bool) -> list[Action]:
        if isinstance(payload, str):
            payload = payload.encode("utf-8", "surrogatepass")
        payload = bytes(payload)
        if self.state is State.STARTED:
            return self._feed(payload, is_binary)
        if self.state in (State.NEW, State.CLOSED):
            return []
        self._frames_before_start += 1
        if self._frames_before_start > self.max_early_frames:
            return self._close(CLOSE_UNRECOGNISED, "unrecognised protocol")
        if self.state is State.WAITING_START:
            return self._feed(payload, is_binary)
        self._early.append((payload, is_binary))
        return self._detect(payload, is_binary)

    def timeout(self) -> list[Action]:
        if self.state is State.WAITING_FIRST:
            return self._choose("raw", "timeout")  # a raw client that says nothing
        if self.state in (State.WAITING_PROVIDER, State.WAITING_START):
            return self._close(CLOSE_NO_START, "no start message")
        return []

    # -- the machine ------------------------------------------------------------------
    def _enter(self, state: State, wait: float | None) -> None:
        self.state = state
        self._wait = wait
        self._due = None if wait is None or self.clock is None else self.clock.seconds() + wait

    def _close(self, code: int, reason: str) -> list[Action]:
        self._enter(State.CLOSED, None)
        self._early.clear()
        self._held.clear()
        return [Close(code, reason)]

    def _detect(self, payload: bytes, is_binary: bool) -> list[Action]:
        if is_binary:
            return self._choose("raw", "detected")
        text = payload.decode("utf-8", "replace")
        name = detect(text)
        if name is not None and name not in NO_CODEC:
            return self._choose(name, "detected")
        msg = loads(text)
        if isinstance(msg, dict) and ("event" in msg or "Event" in msg):
            # a provider's first message ("connected"): wait for its start
            if self.state is State.WAITING_FIRST:
                self._enter(State.WAITING_PROVIDER, self.start_timeout)
            return []
        if isinstance(msg, ProtocolError) or (isinstance(msg, dict) and "type" in msg):
            return self._choose("raw", "detected")  # UpVoot's control messages, or text no provider sends
        return []  # JSON that tells nobody (jambonz metadata, a list, ...): keep waiting

    def _choose(self, name: str, why: str) -> list[Action]:
        try:
            self.framing = make_framing(name, self.params)
        except ValueError:
            return self._close(CLOSE_BAD_PARAMETERS, "bad provider parameters")
        actions: list[Action] = [Chosen(self.framing, why)]
        if name == "raw":
            self._enter(State.STARTED, None)
            actions.append(Started(CallStarted(provider="raw")))
        elif self.state in (State.NEW, State.WAITING_FIRST):
            self._enter(State.WAITING_START, self.start_timeout)
        else:  # WAITING_PROVIDER: the start wait already runs
            self.state = State.WAITING_START
        early, self._early = self._early, []
        for payload, is_binary in early:
            actions += self._feed(payload, is_binary)
        return actions

    def _feed(self, payload: bytes, is_binary: bool) -> list[Action]:
        framing = self.framing
        assert framing is not None
        if is_binary:
            events = framing.receive_binary(payload)
        else:
            events = framing.receive_text(payload.decode("utf-8", "replace"))
        actions: list[Action] = []
        for event in events:
            actions += self._event(event)
        ready = framing.drain()
        if ready:
            actions.append(Reply(ready))
        return actions

    def _event(self, event: Event) -> list[Action]:
        if self.state is State.STARTED:
            return [] if isinstance(event, CallStarted) else [Deliver(event)]
        if not isinstance(event, CallStarted):
            self._held.append(event)  # delivered once the call has started
            return []
        self._enter(State.STARTED, None)
        held, self._held = self._held, []
        return [Started(event)] + [Deliver(e) for e in held]
