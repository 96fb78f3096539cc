"""The test dialer's call engine: one call from the provider's side.

``Call`` is the caller's behaviour and bookkeeping; it talks to a
``CallTransport`` and a clock, never to Autobahn. ``_DialerProtocol`` is the
thin Autobahn adapter. ``dial(reactor, options)`` returns a Deferred that
fires with a ``DialResult`` and never fails for network reasons, so tests
and ``bench/load.py`` drive calls without ``sys.exit``. The command line
around it is ``upvoot.dial.command``.

Protocols: with ``DialOptions.provider == "raw"`` (the default) the call
speaks UpVoot's raw protocol (``upvoot.framing.raw``). With a provider name
(``exotel``, ``twilio``, ``plivo``, ``telnyx``, ``vonage``) it speaks that
provider's protocol through ``upvoot.dial.providers``: the URL gains
``?provider=NAME`` (and ``sample-rate`` / ``codec`` where they apply), the
provider's opening messages go out on open, the 20 ms caller frames become
the provider's media messages, agent media is decoded back to 16 kHz, marks
are echoed once their audio has "played", a clear drops what had not, and a
hang-up sends the provider's ``stop`` before closing. Providers have no
``audio_start``/``audio_end``: a burst starts with the first agent media
and ends when the provider's player has run dry for ``BURST_GAP`` seconds
(or at a clear, interrupted).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Protocol

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet import defer, task
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from upvoot.audio import FRAME_BYTES, FRAME_MS, RATE, duration
from upvoot.framing.base import Frame
from upvoot.dial.providers import AgentAudio, Cleared, MarkSent, ProviderSim, Violation, make_sim

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3

FRAME_SECONDS = FRAME_MS / 1000.0
SILENT_FRAME = b"\x00" * FRAME_BYTES

#: How far behind the arrival of the first frame of a burst the recording
#: starts playing it: a small jitter buffer, as a phone has, so that a frame
#: a few milliseconds late inside a burst is not heard as a click of silence.
PLAYOUT_DELAY = 0.04

#: After a stall (a busy machine) the send loop catches up at most this many
#: frames at once; older ones are dropped, as a real line would drop them.
MAX_CATCH_UP_FRAMES = 25

#: Provider calls: a burst of agent audio ends when the provider's player
#: has had nothing to play for this long.
BURST_GAP = 0.3

MAX_MESSAGE_BYTES = 1 << 20

#: Provider messages that carry media: counted, never printed.
_MEDIA_EVENTS = ("media", "playAudio")


# ---- options and results ---------------------------------------------------------------


@attrs.frozen
class DialOptions:
    """What one call does. Times are seconds from the open."""

    url: str
    play: bytes = b""  # caller audio, 16 kHz mono s16le
    play_after_greeting: bool = False
    delay: float = 0.0
    max_seconds: float = 120.0
    end_call_after: float | None = None
    hangup_after: float | None = None
    record: bool = False
    record_raw: bool = False
    cafile: str | None = None
    insecure: bool = False
    connect_timeout: float = 10.0
    #: "raw" or a provider whose protocol to speak (``upvoot.dial.providers``)
    provider: str = "raw"
    sample_rate: int | None = None
    codec: str | None = None
    #: the provider's custom parameters (Exotel query pairs, Twilio
    #: ``<Parameter>``, Plivo extra headers, Vonage NCCO headers)
    custom: dict = attrs.field(factory=dict)


@attrs.define
class Burst:
    """Agent audio between one ``audio_start`` and its ``audio_end``."""

    start: float
    end: float | None = None
    interrupted: bool | None = None
    #: (arrival time, bytes) of every binary frame of the burst
    frames: list[tuple[float, int]] = attrs.field(factory=list)


@attrs.define
class DialResult:
    url: str
    opened: bool = False
    #: HTTP status of a refused upgrade (e.g. 401)
    refused: int | None = None
    #: why the call could not be set up (connect or TLS failure)
    error: str | None = None
    #: "server", "client" (we hung up) or "network" (dropped without a close)
    closed_by: str | None = None
    #: why we hung up: "hangup-after", "max-seconds", "interrupted"
    hangup_reason: str | None = None
    close_code: int | None = None
    close_reason: str | None = None
    clean: bool = False
    #: seconds from the open to the close
    duration: float = 0.0
    messages: list[tuple[float, Any]] = attrs.field(factory=list)
    bursts: list[Burst] = attrs.field(factory=list)
    audio_bytes: int = 0
    audio_frames: int = 0
    #: binary frames outside audio_start..audio_end (a protocol violation)
    stray_frames: int = 0
    sent_bytes: int = 0
    end_call_sent_at: float | None = None
    recording: bytes | None = None
    provider: str = "raw"
    #: the provider call id and stream id the dialer made up (provider calls)
    call_id: str | None = None
    stream_id: str | None = None
    #: marks the server asked for, clears it sent (provider calls)
    marks: int = 0
    clears: int = 0
    #: the server broke one of the provider's rules (see ``upvoot.dial.providers``)
    violations: list[str] = attrs.field(factory=list)

    @property
    def audio_seconds(self) -> float:
        return duration(self.audio_bytes)

    @property
    def first_audio_at(self) -> float | None:
        for burst in self.bursts:
            if burst.frames:
                return burst.frames[0][0]
        return None


def exit_code(result: DialResult) -> int:
    if result.refused is not None:
        return EXIT_REFUSED
    if result.error or not result.opened:
        return EXIT_FAILED
    if result.closed_by == "client":
        return EXIT_OK
    if result.closed_by == "server" and result.close_code == 1000:
        return EXIT_OK
    return EXIT_FAILED


# ---- what the caller hears ----------------------------------------------------------------


class Playout:
    """The agent's audio placed on the call's timeline, as a phone plays it.

    A frame plays as soon as it arrives, or after the audio queued before it
    (the server sends with a small lead). When the queue has run dry (the gap
    between two bursts, or a frame later than the jitter buffer), silence
    fills the gap and playing resumes ``delay`` seconds after the arrival.
    The result is one PCM track whose silences match what the caller heard.
    """

    def __init__(self, delay: float = PLAYOUT_DELAY) -> None:
        self._delay = delay
        self._pcm = bytearray()
        self._odd = b""

    def add(self, t: float, pcm: bytes) -> None:
        pcm = self._odd + pcm
        self._odd = pcm[len(pcm) - len(pcm) % 2 :]
        pcm = pcm[: len(pcm) - len(pcm) % 2]
        arrival = _byte_offset(t)
        if len(self._pcm) < arrival:
            self._pad_to(_byte_offset(t + self._delay))
        self._pcm += pcm

    def cut(self, t: float) -> None:
        """A clear at ``t``: what had not played by then never will."""
        offset = _byte_offset(t + self._delay)
        if len(self._pcm) > offset:
            del self._pcm[offset:]

    def finish(self, t: float) -> bytes:
        """The track up to ``t`` (the hang-up), or to its last sample if later."""
        self._pad_to(_byte_offset(t))
        return bytes(self._pcm)

    def _pad_to(self, offset: int) -> None:
        if len(self._pcm) < offset:
            self._pcm += bytes(offset - len(self._pcm))


def _byte_offset(t: float) -> int:
    return max(0, int(round(t * RATE))) * 2


class _Concatenation:
    def __init__(self) -> None:
        self._pcm = bytearray()

    def add(self, t: float, pcm: bytes) -> None:
        self._pcm += pcm

    def cut(self, t: float) -> None:
        pass

    def finish(self, t: float) -> bytes:
        return bytes(self._pcm[: len(self._pcm) - len(self._pcm) % 2])


# ---- caller audio ----------------------------------------------------------------------------


class CallerAudio(Protocol):
    """Decides the caller's next 20 ms frame. ``call`` exposes the agent's
    state (``agent_speaking``, ``bursts`` ...); ``t`` is seconds since the open."""

    def frame(self, call: "Call", t: float) -> bytes: ...


class PlayThenSilence:
    """Silence, then ``pcm`` once ``delay`` has passed (and, if asked, once
    the greeting's ``audio_end`` has arrived), then silence again."""

    def __init__(self, pcm: bytes = b"", delay: float = 0.0, after_greeting: bool = False) -> None:
        self._pcm = pcm
        self._delay = delay
        self._after_greeting = after_greeting
        self._pos: int | None = None
        #: when the first frame of ``pcm`` was sent (seconds since the open)
        self.started_at: float | None = None

    def frame(self, call: "Call", t: float) -> bytes:
        if self._pos is None:
            if not self._pcm or t < self._delay:
                return SILENT_FRAME
            if self._after_greeting and not any(b.end is not None for b in call.result.bursts):
                return SILENT_FRAME
            self._pos = 0
            self.started_at = t
        chunk = self._pcm[self._pos : self._pos + FRAME_BYTES]
        self._pos += FRAME_BYTES
        return chunk.ljust(FRAME_BYTES, b"\x00") if chunk else SILENT_FRAME


# ---- the call --------------------------------------------------------------------------------


class CallTransport(Protocol):
    def send_binary(self, data: bytes) -> None: ...

    def send_text(self, text: str) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class Call:
    """One call from the caller's side: the send loop, the timers, the bookkeeping.

    Inputs come from the adapter (``opened``, ``text``, ``binary``,
    ``closed``; ``refused`` and ``failed`` when there never was a call).
    Every timer belongs to the open call and is cancelled when it closes.
    ``done`` fires once with the ``DialResult``.
    """

    def __init__(
        self,
        clock: Any,
        options: DialOptions,
        source: CallerAudio | None = None,
        printer: Any = None,
    ) -> None:
        self.clock = clock
        self.options = options
        self.source = source if source is not None else PlayThenSilence(options.play, options.delay, options.play_after_greeting)
        self.printer = printer
        self.result = DialResult(url=options.url)
        self.done: defer.Deferred[DialResult] = defer.Deferred()
        self.agent_speaking = False
        self._transport: CallTransport | None = None
        self._opened_at: float | None = None
        self._loop: task.LoopingCall | None = None
        self._timers: list[Any] = []
        self._hanging_up = False
        self._recorder: Playout | _Concatenation | None = None
        if options.record:
            self._recorder = _Concatenation() if options.record_raw else Playout()
        #: the provider's side of the protocol (None: raw)
        self.sim: ProviderSim | None = None
        self.url = options.url
        self.result.provider = options.provider
        if options.provider != "raw":
            self.sim = make_sim(options.provider, options.sample_rate, options.codec, custom=options.custom)
            self.url = self.result.url = self.sim.url(options.url)
            self.result.call_id, self.result.stream_id = self.sim.call_id, self.sim.stream_id
        self._last_audio = 0.0

    # ---- clock
    def now(self) -> float:
        """Seconds since the open (0 before it)."""
        return 0.0 if self._opened_at is None else self.clock.seconds() - self._opened_at

    @property
    def current_burst(self) -> Burst | None:
        return self.result.bursts[-1] if self.agent_speaking else None

    # ---- inputs from the adapter
    def opened(self, transport: CallTransport) -> None:
        self._transport = transport
        self._opened_at = self.clock.seconds()
        self.result.opened = True
        o = self.options
        self._later(o.max_seconds, self.hangup, "max-seconds")
        if o.end_call_after is not None:
            self._later(o.end_call_after, self.send_end_call)
        if o.hangup_after is not None:
            self._later(o.hangup_after, self.hangup, "hangup-after")
        if self.sim is not None:
            self._send_sim(self.sim.open())
        self._loop = task.LoopingCall.withCount(self._send_frames)
        self._loop.clock = self.clock
        self._loop.start(FRAME_SECONDS, now=True).addErrback(self._loop_failed)

    def text(self, payload: str) -> None:
        t = self.now()
        if self.sim is not None:
            self._provider_text(t, payload)
            return
        try:
            msg = json.loads(payload)
        except ValueError:
            self.result.messages.append((t, payload))
            if self.printer:
                self.printer.received(t, payload, is_json=False)
            return
        self.result.messages.append((t, msg))
        if self.printer:
            self.printer.received(t, msg)
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "audio_start":
            self.agent_speaking = True
            self.result.bursts.append(Burst(start=t))
        elif kind == "audio_end" and self.agent_speaking:
            burst = self.result.bursts[-1]
            burst.end = t
            burst.interrupted = bool(msg.get("interrupted", False))
            self.agent_speaking = False

    def binary(self, payload: bytes) -> None:
        t = self.now()
        if self.sim is not None:
            self._sim_events(t, self.sim.receive_binary(payload, t))
            return
        self.result.audio_bytes += len(payload)
        self.result.audio_frames += 1
        if self.agent_speaking:
            self.result.bursts[-1].frames.append((t, len(payload)))
        else:
            self.result.stray_frames += 1
        if self._recorder is not None:
            self._recorder.add(t, payload)

    def closed(self, clean: bool, code: int | None, reason: str | None) -> None:
        if self.done.called:
            return
        self._stop()
        r = self.result
        r.duration = self.now()
        r.clean = clean
        r.close_code = code
        r.close_reason = reason or None
        if self._hanging_up:
            r.closed_by = "client"
        elif clean:
            r.closed_by = "server"
        else:
            r.closed_by = "network"
        if self._recorder is not None:
            r.recording = self._recorder.finish(r.duration)
        self._finish()

    def refused(self, status: int) -> None:
        if not self.done.called:
            self.result.refused = status
            self._finish()

    def failed(self, error: str) -> None:
        if not self.done.called:
            self._stop()
            self.result.error = error
            self._finish()

    # ---- actions
    def send_end_call(self) -> None:
        if self.sim is not None:
            raise ValueError("end_call is a raw-protocol message")
        msg = {"type": "end_call"}
        self.result.end_call_sent_at = self.now()
        if self.printer:
            self.printer.sent(self.now(), msg)
        assert self._transport is not None
        self._transport.send_text(json.dumps(msg))

    def hangup(self, reason: str) -> None:
        """Close from our side (once); the call ends when the close completes."""
        if self._hanging_up or self._transport is None or self.done.called:
            return
        self._hanging_up = True
        self.result.hangup_reason = reason
        self._stop()
        if self.sim is not None:
            self._send_sim(self.sim.stop())  # Exotel, Twilio, Telnyx; the others just close
        self._transport.close(1000, reason)

    # ---- internals
    def _send_frames(self, count: int) -> None:
        assert self._transport is not None
        for _ in range(min(count, MAX_CATCH_UP_FRAMES)):
            frame = self.source.frame(self, self.now())
            self.result.sent_bytes += len(frame)
            if self.sim is None:
                self._transport.send_binary(frame)
            else:
                self._send_sim(self.sim.caller_audio(frame))
        if self.sim is not None:
            self._provider_tick()

    # ---- provider calls
    def _send_sim(self, frames: list[Frame]) -> None:
        assert self._transport is not None
        for frame in frames:
            if frame.is_binary:
                self._transport.send_binary(frame.payload)
                continue
            self._transport.send_text(frame.payload)
            if self.printer:
                msg = json.loads(frame.payload)
                if msg.get("event") not in _MEDIA_EVENTS:
                    self.printer.sent(self.now(), msg)

    def _provider_text(self, t: float, payload: str) -> None:
        assert self.sim is not None
        events = self.sim.receive_text(payload, t)
        try:
            msg = json.loads(payload)
        except ValueError:
            msg = None
        if isinstance(msg, dict):
            if msg.get("event") not in _MEDIA_EVENTS:
                self.result.messages.append((t, msg))
                if self.printer:
                    self.printer.received(t, msg)
        else:
            self.result.messages.append((t, payload))
            if self.printer:
                self.printer.received(t, payload, is_json=False)
        self._sim_events(t, events)

    def _sim_events(self, t: float, events: list) -> None:
        r = self.result
        for event in events:
            if isinstance(event, AgentAudio):
                if not self.agent_speaking:
                    self.agent_speaking = True
                    r.bursts.append(Burst(start=t))
                r.audio_bytes += len(event.pcm)
                r.audio_frames += 1
                r.bursts[-1].frames.append((t, len(event.pcm)))
                self._last_audio = t
                if self._recorder is not None:
                    self._recorder.add(t, event.pcm)
            elif isinstance(event, MarkSent):
                r.marks += 1
            elif isinstance(event, Cleared):
                r.clears += 1
                if self._recorder is not None:
                    self._recorder.cut(t)
                self._end_burst(t, interrupted=True)
            elif isinstance(event, Violation):
                r.violations.append(event.message)
                if self.printer:
                    self.printer.error(f"provider rule broken: {event.message}")
        self._provider_tick()

    def _provider_tick(self) -> None:
        """Echo what is due; end the burst once the player has run dry."""
        assert self.sim is not None
        now = self.now()
        self._send_sim(self.sim.poll(now))
        if self.agent_speaking and self.sim.player.queued(now) == 0 and now - self._last_audio >= BURST_GAP:
            self._end_burst(max(self._last_audio, self.sim.player.play_end), interrupted=False)

    def _end_burst(self, t: float, interrupted: bool) -> None:
        if self.agent_speaking:
            burst = self.result.bursts[-1]
            burst.end, burst.interrupted = t, interrupted
            self.agent_speaking = False

    def _loop_failed(self, f: Failure) -> None:
        self.result.error = f"caller audio failed: {f.getErrorMessage()}"
        self.hangup("internal-error")

    def _later(self, seconds: float, f: Callable[..., Any], *args: Any) -> None:
        self._timers.append(self.clock.callLater(seconds, f, *args))

    def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []

    def _finish(self) -> None:
        if self.printer:
            self.printer.summary(self.result)
        self.done.callback(self.result)


# ---- the Autobahn adapter -------------------------------------------------------------------


class _DialerProtocol(WebSocketClientProtocol):
    call: Call

    def onOpen(self) -> None:
        try:
            self.call.opened(self)
        except Exception:
            self.call.failed(f"internal error: {Failure().getErrorMessage()}")
            self.dropConnection(abort=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.call.binary(payload)
        else:
            self.call.text(payload.decode("utf-8"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.call.result.opened:
            self.call.closed(wasClean, code, reason)
            return
        status = _refused_status(getattr(self, "http_status_line", None))
        if status is not None:
            self.call.refused(status)
        else:
            self.call.failed(reason or "the connection closed during the opening handshake")

    # CallTransport: after the server's close frame and before the TCP close
    # the send loop may still tick; those frames have nowhere to go.
    def send_binary(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(data, isBinary=True)

    def send_text(self, text: str) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(text.encode("utf-8"), isBinary=False)

    def close(self, code: int, reason: str) -> None:
        self.sendClose(code, reason)


def _refused_status(status_line: str | None) -> int | None:
    """The status of a non-101 handshake response (``HTTP/1.1 401 ...``)."""
    if not status_line:
        return None
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    status = int(parts[1])
    return None if status == 101 else status


class _DialerFactory(WebSocketClientFactory):
    protocol = _DialerProtocol

    def __init__(self, call: Call, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.call = call

    def buildProtocol(self, addr: Any) -> _DialerProtocol:
        p = super().buildProtocol(addr)
        p.call = self.call
        return p


# ---- TLS ----------------------------------------------------------------------------------------


def _load_certificates(cafile: str) -> list[Any]:
    from twisted.internet.ssl import Certificate

    with open(cafile, "rb") as f:
        pem = f.read()
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + part for part in pem.split(marker)[1:]]
    if not blocks:
        raise ValueError(f"{cafile}: no PEM certificate found")
    return [Certificate.loadPEM(block) for block in blocks]


@implementer(IOpenSSLClientConnectionCreator)
class _NoVerification:
    """TLS without certificate checks (``--insecure``); still sends SNI."""

    def __init__(self, host: str) -> None:
        from twisted.internet.ssl import CertificateOptions

        self._context = CertificateOptions(verify=False).getContext()
        self._sni = None if isIPAddress(host) or isIPv6Address(host) else host.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL import SSL

        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


def tls_options(host: str, cafile: str | None = None, insecure: bool = False) -> Any:
    from twisted.internet.ssl import optionsForClientTLS, trustRootFromCertificates

    if insecure:
        return _NoVerification(host)
    trust = trustRootFromCertificates(_load_certificates(cafile)) if cafile else None
    return optionsForClientTLS(host, trustRoot=trust)


# ---- dialing ---------------------------------------------------------------------------------------


def start_call(
    reactor: Any,
    options: DialOptions,
    source: CallerAudio | None = None,
    printer: Any = None,
) -> Call:
    """Connect and return the ``Call`` at once (``call.done`` fires at the end);
    callers that need to hang up early keep the ``Call``."""
    call = Call(reactor, options, source, printer)
    try:
        secure, host, port, _resource, _path, _params = parse_url(call.url)
        factory = _DialerFactory(call, url=call.url, reactor=reactor)
        factory.setProtocolOptions(
            openHandshakeTimeout=options.connect_timeout,
            closeHandshakeTimeout=2.0,
            maxMessagePayloadSize=MAX_MESSAGE_BYTES,
            maxFramePayloadSize=MAX_MESSAGE_BYTES,
        )
        endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=options.connect_timeout)
        if secure:
            endpoint = wrapClientTLS(tls_options(host, options.cafile, options.insecure), endpoint)
    except Exception as e:
        call.failed(str(e))
        return call

    def connect_failed(f: Failure) -> None:
        call.failed(f"cannot connect to {host}:{port}: {f.getErrorMessage()}")

    endpoint.connect(factory).addErrback(connect_failed)
    return call


def dial(
    reactor: Any,
    options: DialOptions,
    source: CallerAudio | None = None,
    printer: Any = None,
) -> defer.Deferred[DialResult]:
    """Make one call; fires with its ``DialResult`` (never fails for network reasons)."""
    return start_call(reactor, options, source, printer).done
