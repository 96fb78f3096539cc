"""``upvoot dial URL``: a test caller that behaves like a telephony provider.

It speaks UpVoot's raw protocol (``upvoot.framing.raw`` holds the wire
contract) from the provider's side:

- connects to ``ws://`` or ``wss://HOST/voice/<api-key>`` (``--cafile`` trusts
  a self-signed certificate, ``--insecure`` skips verification);
- from the moment the upgrade completes it sends caller audio like a phone
  line: one 20 ms frame (640 bytes, 16 kHz mono s16le) every 20 ms, from a
  ``LoopingCall`` that catches up rather than drifts. The frames carry
  ``--play FILE.wav`` (converted to 16 kHz mono) once ``--delay`` has passed
  (and, with ``--play-after-greeting``, once the first ``audio_end`` came),
  and digital silence before and after it;
- prints every control message as it arrives, ``+1.234s {"type": ...}`` (or
  ``{"t": 1.234, "msg": {...}}`` lines with ``--json``), times relative to
  the open, then one summary line;
- ``--record FILE.wav`` writes the agent's audio as the caller hears it (see
  ``Playout``); ``--record-raw`` just concatenates the frames;
- ``--end-call-after S`` sends ``{"type": "end_call"}``; ``--hangup-after S``
  closes the socket; ``--max-seconds S`` (default 120) always ends the call.

Exit codes: 0 the server closed with 1000, or we hung up; 1 any other end
(connection failed, dropped, another close code); 2 bad arguments or input
files; 3 the server refused the upgrade (``refused: HTTP 401``).

Layout: ``Call`` is the caller's behaviour and bookkeeping; it talks to a
``CallTransport`` and a clock, never to Autobahn. ``_DialerProtocol`` is the
thin Autobahn adapter. ``dial(reactor, options)`` returns a Deferred that
fires with a ``DialResult`` and never fails for network reasons, so tests
and ``bench/load.py`` drive calls without ``sys.exit``; ``run(args)`` is the
command line around it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import wave
from typing import Any, Callable, Protocol, TextIO

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet import defer, task
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from upvoot.audio import FRAME_BYTES, FRAME_MS, RATE, duration, read_wav, write_wav

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

MAX_MESSAGE_BYTES = 1 << 20


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


# ---- printing ----------------------------------------------------------------------------------


class Printer:
    """Lines for people (``+1.234s {...}``) or JSON lines; errors go to ``err``."""

    def __init__(self, out: TextIO, err: TextIO, json_lines: bool = False) -> None:
        self._out = out
        self._err = err
        self._json = json_lines

    def received(self, t: float, msg: Any, is_json: bool = True) -> None:
        if self._json:
            self._line(self._out, json.dumps({"t": round(t, 3), "msg" if is_json else "text": msg}))
        elif is_json:
            self._line(self._out, f"+{t:.3f}s {json.dumps(msg)}")
        else:
            self._line(self._out, f"+{t:.3f}s text {msg!r}")

    def sent(self, t: float, msg: Any) -> None:
        if self._json:
            self._line(self._out, json.dumps({"t": round(t, 3), "sent": msg}))
        else:
            self._line(self._out, f"+{t:.3f}s sent {json.dumps(msg)}")

    def summary(self, r: DialResult) -> None:
        if r.refused is not None:
            self._line(self._err, f"refused: HTTP {r.refused}")
        elif r.error:
            self._line(self._err, f"failed: {r.error}")
        if self._json:
            self._line(self._out, json.dumps({"t": round(r.duration, 3), "summary": summary_fields(r)}))
        elif r.opened:
            self._line(self._out, summary_text(r))

    def error(self, text: str) -> None:
        self._line(self._err, text)

    @staticmethod
    def _line(stream: TextIO, text: str) -> None:
        stream.write(text + "\n")
        stream.flush()


def summary_fields(r: DialResult) -> dict:
    return {
        "opened": r.opened,
        "refused": r.refused,
        "error": r.error,
        "audio_seconds": round(r.audio_seconds, 3),
        "audio_frames": r.audio_frames,
        "bursts": len(r.bursts),
        "stray_frames": r.stray_frames,
        "sent_seconds": round(duration(r.sent_bytes), 3),
        "closed_by": r.closed_by,
        "hangup_reason": r.hangup_reason,
        "close_code": r.close_code,
        "close_reason": r.close_reason,
        "clean": r.clean,
        "exit": exit_code(r),
    }


def summary_text(r: DialResult) -> str:
    by = {"client": "by us", "server": "by the server", "network": "without a close handshake"}.get(r.closed_by or "", "")
    why = f" ({r.hangup_reason})" if r.hangup_reason else ""
    reason = f" {r.close_reason!r}" if r.close_reason else ""
    stray = f", {r.stray_frames} frames outside audio_start/audio_end" if r.stray_frames else ""
    unclean = "" if r.clean else ", unclean"
    return (
        f"summary: received {r.audio_seconds:.2f} s of agent audio in {r.audio_frames} frames"
        f" ({len(r.bursts)} burst{'' if len(r.bursts) == 1 else 's'}{stray}), sent {duration(r.sent_bytes):.2f} s;"
        f" closed {by}{why} after {r.duration:.3f} s: code {r.close_code}{reason}{unclean}"
    )


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
        printer: Printer | None = None,
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
        self._loop = task.LoopingCall.withCount(self._send_frames)
        self._loop.clock = self.clock
        self._loop.start(FRAME_SECONDS, now=True).addErrback(self._loop_failed)

    def text(self, payload: str) -> None:
        t = self.now()
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
        self._transport.close(1000, reason)

    # ---- internals
    def _send_frames(self, count: int) -> None:
        assert self._transport is not None
        for _ in range(min(count, MAX_CATCH_UP_FRAMES)):
            frame = self.source.frame(self, self.now())
            self.result.sent_bytes += len(frame)
            self._transport.send_binary(frame)

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
    printer: Printer | None = None,
) -> Call:
    """Connect and return the ``Call`` at once (``call.done`` fires at the end);
    callers that need to hang up early keep the ``Call``."""
    call = Call(reactor, options, source, printer)
    try:
        secure, host, port, _resource, _path, _params = parse_url(options.url)
        factory = _DialerFactory(call, url=options.url, reactor=reactor)
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
    printer: Printer | None = None,
) -> defer.Deferred[DialResult]:
    """Make one call; fires with its ``DialResult`` (never fails for network reasons)."""
    return start_call(reactor, options, source, printer).done


# ---- command line ----------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="ws://HOST:PORT/voice/KEY or wss://...")
    parser.add_argument("--play", metavar="FILE.wav", help="caller audio to stream (16-bit WAV, any rate and channels)")
    parser.add_argument("--play-after-greeting", action="store_true", help="start --play after the first audio_end")
    parser.add_argument("--delay", type=_seconds, default=0.0, metavar="S", help="start --play S seconds after the open")
    parser.add_argument("--record", metavar="FILE.wav", help="write the agent's audio as the caller heard it")
    parser.add_argument("--record-raw", action="store_true", help="with --record: concatenate the frames, no timing")
    parser.add_argument("--end-call-after", type=_seconds, metavar="S", help='send {"type": "end_call"} after S seconds')
    parser.add_argument("--hangup-after", type=_seconds, metavar="S", help="close the socket after S seconds")
    parser.add_argument("--max-seconds", type=_seconds, default=120.0, metavar="S", help="hang up after S seconds (default 120)")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--cafile", metavar="PEM", help="trust the certificate(s) in PEM (wss://)")
    tls.add_argument("--insecure", action="store_true", help="do not verify the server's certificate (wss://)")
    parser.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="S", help="connect and upgrade timeout (default 10)")


def options_from_args(args: argparse.Namespace) -> DialOptions:
    """Check the arguments and load the WAV; raises ``ValueError`` with one line."""
    try:
        secure = parse_url(args.url)[0]
    except Exception as e:
        raise ValueError(f"bad URL {args.url!r}: {e}")
    if (args.cafile or args.insecure) and not secure:
        raise ValueError("--cafile and --insecure need a wss:// URL")
    if args.cafile:
        try:
            _load_certificates(args.cafile)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot use --cafile {args.cafile}: {_reason(e)}")
    if args.record_raw and not args.record:
        raise ValueError("--record-raw needs --record FILE.wav")
    play = b""
    if args.play:
        try:
            play = read_wav(args.play)
        except FileNotFoundError:
            raise ValueError(f"cannot read {args.play}: no such file")
        except (OSError, EOFError, wave.Error, ValueError) as e:
            raise ValueError(f"cannot read {args.play}: {_reason(e)}")
    return DialOptions(
        url=args.url,
        play=play,
        play_after_greeting=args.play_after_greeting,
        delay=args.delay,
        max_seconds=args.max_seconds,
        end_call_after=args.end_call_after,
        hangup_after=args.hangup_after,
        record=bool(args.record),
        record_raw=args.record_raw,
        cafile=args.cafile,
        insecure=args.insecure,
        connect_timeout=args.connect_timeout,
    )


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        options = options_from_args(args)
        if args.record:  # fail now, not after the call
            directory = os.path.dirname(os.path.abspath(args.record))
            if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                raise ValueError(f"cannot write {args.record}: no writable directory {directory}")
    except (OSError, ValueError) as e:
        err.write(f"error: {_reason(e) if isinstance(e, OSError) else e}\n")
        return EXIT_USAGE
    printer = Printer(out, err, json_lines=args.json)
    if args.insecure:
        printer.error("warning: --insecure: the server's certificate is not verified")

    async def main(reactor: Any) -> None:
        call = start_call(reactor, options, printer=printer)

        def on_shutdown() -> defer.Deferred[None] | None:  # Ctrl-C: hang up, then stop
            if call.done.called:
                return None
            if not call.result.opened:
                call.failed("interrupted")
                return None
            waiting: defer.Deferred[None] = defer.Deferred()

            def ended(result: Any) -> Any:
                if not waiting.called:
                    waiting.callback(None)
                return result

            call.done.addBoth(ended)
            call.hangup("interrupted")
            return waiting.addTimeout(3, reactor).addErrback(lambda f: None)

        reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
        result = await call.done
        if args.record and result.recording is not None:
            write_wav(args.record, result.recording)
        raise SystemExit(exit_code(result))

    try:
        task.react(main)
    except SystemExit as e:
        return int(e.code or 0)
    return EXIT_OK  # not reached: react always exits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upvoot dial", description="Call an UpVoot server as a telephony provider would.")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
