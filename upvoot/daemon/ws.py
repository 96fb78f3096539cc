"""The Autobahn adapter: ``/voice/<api-key>`` WebSocket upgrades -> calls.

The wire protocol itself is written down once, in ``upvoot.framing.raw``
(UpVoot's own protocol). This module only does what needs a socket:

Handshake (``onConnect``), before any agent work:
  - any path other than ``/voice/<api-key>``          -> HTTP 404
  - the daemon is starting, draining, or saturated     -> HTTP 503 (Retry-After)
    (``max_calls`` calls running, or reactor lag over ``lag_budget``)
  - missing, unknown or revoked key                    -> HTTP 401
  - the key's account has no points left (<= 0)        -> HTTP 402
  - the key names an agent the config no longer has    -> HTTP 503
  The key never appears in logs or error messages: only its 12-character
  prefix (``uvk_XXXXXXXX``) is logged, and only once it is known valid.

Call (``onOpen`` .. ``onClose``): frames are decoded by a sans-IO framing
into events for the call machine; the machine's output goes back through the
framing. A client that stops reading is disconnected once the transport has
been backed up (producer paused) for ``stall_timeout`` seconds.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import attrs

from autobahn.twisted.util import peer2str
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from upvoot.daemon.admission import peer_host
from upvoot.call.machine import new_call
from upvoot.ledger.store import account_agents
from upvoot.framing.base import CallerAudio, CallStarted, CallStopped, Dtmf, EndCallRequested, PlayoutMark, ProtocolError
from upvoot.framing.negotiate import PROVIDERS, detect, make_framing
from upvoot.daemon.metrics import Metrics

_REASONS = {
    401: "Unauthorized",
    402: "Payment Required",
    404: "Not Found",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


@implementer(IPushProducer)
class _StallWatch:
    """Registered as the transport's producer: Twisted pauses it when the
    client stops reading and our outbound buffer fills up."""

    def __init__(self, proto: "VoiceProtocol") -> None:
        self.proto = proto
        self.timer = None

    def pauseProducing(self) -> None:
        if self.timer is None:
            self.timer = self.proto.service.clock.callLater(self.proto.service.stall_timeout, self.proto.stalled)

    def resumeProducing(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def stopProducing(self) -> None:
        self.resumeProducing()


class _Output:
    """ICallOutput for the call machine: events -> framing -> WebSocket.

    With a provider that acknowledges playback (marks), every playback gets
    a mark about every 200 ms of audio and at its end; the returning marks
    move the playback's clock of what the caller has heard."""

    MAX_PENDING_MARKS = 256

    def __init__(self, proto: "VoiceProtocol") -> None:
        self.proto = proto
        self.framing = proto.framing
        self.marks_playout = bool(getattr(proto.framing, "acknowledges_playout", False))
        # providers with large minimum chunks (Exotel) need more lead for the first chunk to leave at once
        self.min_lead = float(getattr(proto.framing, "min_lead", 0.0))
        self._marks: dict[str, tuple[Any, int]] = {}
        self._n = 0

    def _send(self, frames) -> None:
        self.proto.send_frames(frames)

    def audio_start(self) -> None:
        self._send(self.framing.audio_start())

    def audio(self, pcm: bytes) -> None:
        self.proto.frames_out += 1
        self._send(self.framing.audio(pcm))

    def audio_end(self, interrupted: bool) -> None:
        self._send(self.framing.audio_end(interrupted))

    def mark(self, playback: Any, position: int) -> None:
        self._n += 1
        name = f"upvoot-{self._n}"
        if len(self._marks) >= self.MAX_PENDING_MARKS:  # marks may never come back after a clear
            for old in [k for k, (p, _) in self._marks.items() if p.done]:
                del self._marks[old]
            while len(self._marks) >= self.MAX_PENDING_MARKS:
                del self._marks[next(iter(self._marks))]
        self._marks[name] = (playback, position)
        self._send(self.framing.mark(name))
        if playback.finished and not playback.buffered:
            # the last mark of an utterance: its audio tail (held by the
            # resampler/chunker until audio_end, which waits for this mark)
            # must go out now, or the mark can only come back by MARK_GRACE
            flush = getattr(self.framing, "flush", None)
            if flush is not None:
                self._send(flush())

    def acknowledged(self, name: str, cleared: bool) -> None:
        entry = self._marks.pop(name, None)
        if entry is not None and not cleared:
            playback, position = entry
            playback.acknowledge(position, self.proto.service.clock.seconds())

    def transcript(self, role: str, text: str) -> None:
        self._send(self.framing.transcript(role, text))

    def interim(self, text: str) -> None:
        self._send(self.framing.interim(text))

    def turn_start(self) -> None:
        self._send(self.framing.turn_start())

    def clear(self) -> None:
        self._send(self.framing.clear())

    def close(self) -> None:
        self.proto.close_normally()


class VoiceProtocol(WebSocketServerProtocol):
    _log = Logger()  # Autobahn owns self.log

    key_info: Any = None
    machine: Any = None
    core: Any = None
    framing: Any = None
    _reserved = False
    metadata: dict = {}
    _closing = False
    _watch: _StallWatch | None = None

    @property
    def service(self) -> Any:
        return self.factory.service

    # ------------------------------------------------------------ handshake
    def onConnect(self, request) -> defer.Deferred:
        if not self.factory.trustXForwardedFor and self.transport is not None:
            # Autobahn took the peer address when the connection was made;
            # behind a PROXY-protocol endpoint (haproxy:) the real caller's
            # address is only known once the PROXY header has been read.
            self.peer = peer2str(self.transport)
        return defer.Deferred.fromCoroutine(self._authorize(request))

    async def _authorize(self, request) -> None:
        service = self.service
        path = request.path
        if not path.startswith("/voice/"):
            service.note_refusal(404)
            raise ConnectionDeny(404, _REASONS[404])
        key = path[len("/voice/"):]
        host = peer_host(self.peer)
        if service.guard.blocked(host):
            service.note_refusal(429)
            raise ConnectionDeny(429, _REASONS[429])
        refusal = service.admission_refusal()
        if refusal is not None:
            service.note_refusal(503)
            self._log.warn("Upgrade refused: {why}", event="handshake.busy", why=refusal)
            raise ConnectionDeny(503, _REASONS[503])
        info = None
        if key and "/" not in key:
            try:
                info = await service.store.authenticate(key)
            except Exception:
                self._log.failure("Key lookup failed", event="auth.error")
                service.note_refusal(503)
                raise ConnectionDeny(503, _REASONS[503])
        if info is None or info.revoked:
            service.guard.failed(host)
            service.note_refusal(401)
            self.factory.metrics.auth_failures.inc()
            self._log.info("Upgrade refused: {why} key from {peer}", event="auth.denied",
                           why="revoked" if info is not None else "missing or unknown", peer=self.peer)
            raise ConnectionDeny(401, _REASONS[401])
        if info.points <= 0:
            service.note_refusal(402)
            self._log.info("Upgrade refused: account {account} has no points (key {prefix})",
                           event="auth.no_points", account=info.account, prefix=info.prefix)
            raise ConnectionDeny(402, _REASONS[402])
        if service.agents is None or info.agent not in service.agents.agents:
            service.note_refusal(503)
            self._log.error("Key {prefix} names agent {agent!r}, which is not configured",
                            event="auth.unknown_agent", prefix=info.prefix, agent=info.agent)
            raise ConnectionDeny(503, _REASONS[503])
        if service.guard.account_full(info.account):
            service.note_refusal(429)
            self._log.info("Upgrade refused: account {account} is at its limit of concurrent calls",
                           event="handshake.account_limit", account=info.account)
            raise ConnectionDeny(429, _REASONS[429])
        self.key_info = info
        self._params = {k: v[-1] for k, v in request.params.items() if v}
        self._choice = self._params.get("provider") or service.agents.agents[info.agent].config.provider
        if self._choice not in PROVIDERS and self._choice != "auto":
            self._log.info("Upgrade refused: unknown provider {provider!r}", event="handshake.bad_provider",
                           provider=self._choice[:40])
            raise ConnectionDeny(400, "Unknown provider")
        if self.state == self.STATE_CLOSED:
            # The client left (or the handshake timed out) during the key lookup. Autobahn
            # would still run onOpen on the dead connection: a ghost call, billed, holding a slot.
            self._log.info("Client left during the handshake (key {prefix})", event="handshake.abandoned",
                           prefix=info.prefix)
            raise ConnectionDeny(408, "Request Timeout")
        service.calls_reserved += 1  # counted from now, so concurrent upgrades see it
        self._reserved = True
        service.guard.account_add(info.account)
        self._account_counted = True
        return None

    def sendHttpErrorResponse(self, code, reason, responseHeaders=None):
        headers = list(responseHeaders or [])
        if code == 503:
            headers.append(("Retry-After", str(self.service.retry_after)))
        headers += [("Content-Length", "0"), ("Connection", "close")]
        super().sendHttpErrorResponse(code, reason, headers)

    # ---------------------------------------------------------------- call
    def onOpen(self) -> None:
        try:
            self._open()
        except Exception:
            self._log.failure("Could not start the call", event="call.start_failed")
            self.dropConnection(abort=True)

    def _open(self) -> None:
        service = self.service
        self.frames_in = 0
        self.frames_out = 0
        self._early: list[tuple[bytes, bool]] = []
        self._detect_timer = None
        self._watch = _StallWatch(self)
        if self.transport is not None:
            self.transport.registerProducer(self._watch, True)
        if self._choice == "auto":
            # Wait (briefly) for the first frame to say who is talking; a raw
            # client that says nothing gets its greeting after detect_timeout.
            self._detect_timer = service.clock.callLater(service.config.detect_timeout, self._choose, "raw", "timeout")
        else:
            self._choose(self._choice, "configured")

    def _choose(self, name: str, why: str) -> None:
        """Fix the framing, then replay the frames that arrived before."""
        if self._detect_timer is not None and self._detect_timer.active():
            self._detect_timer.cancel()
        self._detect_timer = None
        try:
            self.framing = make_framing(name, self._params)
        except ValueError as e:
            self._log.warn("Bad framing parameters: {error}", event="call.bad_framing", error=str(e))
            self.sendClose(1008, "bad provider parameters")
            return
        self._log.debug("Framing {name} ({why})", event="call.framing", name=name, why=why)
        if name == "raw":
            self._begin_call(CallStarted(provider="raw"))
        early, self._early = self._early, []
        for payload, is_binary in early:
            self._receive(payload, is_binary)

    def _provider_started(self, started: CallStarted) -> None:
        """A provider's start: maybe its custom parameters pick the agent."""
        own = self.service.agents.agents[self.key_info.agent].config
        wanted = str(started.custom.get(own.agent_select, "")) if own.agent_select else ""
        if not wanted or wanted == own.name:
            self._begin_call(started)
            return
        self._starting = True
        self._held: list = []
        d = self.service.store.run(account_agents, self.key_info.account)

        def chosen(allowed: set) -> None:
            if wanted in allowed and wanted in self.service.agents.agents:
                self._begin_call(started, wanted)
            else:
                self._log.warn("Custom parameter asks for agent {wanted!r}, which account {account} has no key for;"
                               " using {agent}", event="call.agent_refused", wanted=wanted[:64],
                               account=self.key_info.account, agent=own.name)
                self._begin_call(started)

        def failed(f):
            self._log.failure("Agent lookup failed; using the key's agent", f, event="call.agent_lookup_failed")
            self._begin_call(started)

        d.addCallbacks(chosen, failed)

        def replay(_):
            self._starting = False
            held, self._held = self._held, []
            if self.state == self.STATE_CLOSED:
                return
            for event in held:
                self._dispatch(event)

        d.addBoth(replay)

    def _begin_call(self, started: CallStarted, agent_name: str | None = None) -> None:
        service = self.service
        if self.state == self.STATE_CLOSED:
            return  # hung up while we looked the agent up
        if self._reserved:
            service.calls_reserved -= 1
            self._reserved = False
        agent = service.agents.agents[agent_name or self.key_info.agent]
        self.started = started
        self.metadata = {"peer": self.peer, **{k: v for k, v in attrs.asdict(started).items() if v not in (None, {}, "")}}
        call_id = uuid.uuid4().hex
        self.machine, self.core = new_call(
            agent, _Output(self), service.clock, service.pacer, self._ended,
            lead=service.config.playout_lead, log_transcripts=service.config.log_transcripts, call_id=call_id,
            recorder=service.recorder_for(call_id) if agent.config.record else None,
        )
        service.call_opened(self)
        self._log.info("Call started: key {prefix}, account {account}, agent {agent}, provider {provider}, from {peer}",
                       event="call.started", call_id=self.core.call_id, prefix=self.key_info.prefix,
                       account=self.key_info.account, agent=agent.config.name, provider=self.framing.name,
                       peer=self.peer)
        self.machine.start()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.frames_in += 1
        self.factory.metrics.frames_in.inc()
        if self.framing is None:
            self._detect(payload, isBinary)
            return
        self._receive(payload, isBinary)

    def _detect(self, payload: bytes, is_binary: bool) -> None:
        if len(self._early) >= 50:
            self._log.warn("No provider start message after 50 frames; closing", event="call.no_start")
            self.sendClose(1002, "unrecognised protocol")
            return
        self._early.append((payload, is_binary))
        name = "raw" if is_binary else detect(payload.decode("utf-8", "replace"))
        if name is not None and name != "jambonz":
            self._choose(name, "detected")
            return
        if not is_binary and self._detect_timer is not None:
            try:
                msg = json.loads(payload)
            except ValueError:
                msg = None
            if isinstance(msg, dict) and any(k in msg for k in ("event", "Event")):
                # a provider's first message ("connected"): wait for its start
                self._detect_timer.cancel()
                self._detect_timer = self.service.clock.callLater(10.0, self._no_start)
            elif isinstance(msg, dict) and "type" in msg or msg is None:
                self._choose("raw", "detected")

    def _no_start(self) -> None:
        self._detect_timer = None
        self._log.warn("Provider sent no start message; closing", event="call.no_start")
        self.sendClose(1002, "no start message")

    def _receive(self, payload: bytes, is_binary: bool) -> None:
        framing = self.framing
        try:
            if is_binary:
                events = framing.receive_binary(payload)
            else:
                events = framing.receive_text(payload.decode("utf-8", "replace"))
        except Exception:
            self._log.failure("Framing {name} raised on a frame", event="call.framing_error", name=framing.name)
            return
        for event in events:
            self._dispatch(event)
        drain = getattr(framing, "drain", None)
        if drain is not None:
            self.send_frames(drain())

    def _dispatch(self, event) -> None:
        if getattr(self, "_starting", False):
            self._held.append(event)  # the agent is being chosen: hold the media
            return
        if isinstance(event, CallStarted):
            if self.machine is None:
                if event.provider == "raw":
                    self._begin_call(event)
                else:
                    self._provider_started(event)
            return
        if self.machine is None:
            if isinstance(event, ProtocolError):
                self._log.info("Before the call started: {message}", event="call.early_frame", message=event.message)
            return
        call_id = self.core.call_id
        if isinstance(event, CallerAudio):
            self.core.caller_audio(event.pcm)
        elif isinstance(event, PlayoutMark):
            self._output.acknowledged(event.name, event.cleared)
        elif isinstance(event, Dtmf):
            self._log.info("DTMF {digit}", event="call.dtmf", call_id=call_id, digit=event.digit)
            self.core.caller_dtmf(event.digit)
        elif isinstance(event, EndCallRequested):
            self._log.info("Client asked to end the call", event="call.end_requested", call_id=call_id)
            self.machine.end_requested()
        elif isinstance(event, CallStopped):
            self._log.info("Provider stopped the stream: {reason}", event="call.stopped", call_id=call_id,
                           reason=event.reason)
            self.machine.hangup()
        elif isinstance(event, ProtocolError):
            self._log.warn("Bad client message: {message}", event="call.bad_message",
                           call_id=call_id, message=event.message)
            self.send_frames(self.framing.event("error", message=event.message))

    @property
    def _output(self) -> "_Output":
        return self.core.output

    def send_frames(self, frames) -> None:
        if self._closing or self.state != self.STATE_OPEN:
            return
        for frame in frames:
            self.factory.metrics.frames_out.inc()
            if frame.is_binary:
                self.sendMessage(frame.payload, isBinary=True)
            else:
                self.sendMessage(frame.payload.encode("utf-8"), isBinary=False)

    def close_normally(self) -> None:
        if not self._closing:
            if self.framing is not None:
                drain = getattr(self.framing, "drain", None)
                if drain is not None:
                    self.send_frames(drain())
            self._closing = True
            if self.state == self.STATE_OPEN:
                self.sendClose(1000, "call ended")

    def stalled(self) -> None:
        self._log.warn("Client stopped reading; disconnecting", event="call.client_stalled",
                       call_id=self.core.call_id if self.core else None)
        self._watch = None
        self.dropConnection(abort=True)

    def onClose(self, wasClean: bool, code: int, reason: str) -> None:
        if getattr(self, "_account_counted", False):
            self._account_counted = False
            self.service.guard.account_remove(self.key_info.account)
        if getattr(self, "_reserved", False):
            self.service.calls_reserved -= 1
            self._reserved = False
        timer = getattr(self, "_detect_timer", None)
        if timer is not None and timer.active():
            timer.cancel()
        if self._watch is not None:
            self._watch.resumeProducing()
        if self.machine is not None:
            self.machine.hangup()

    def _ended(self, summary: dict) -> None:
        summary.update(
            key_prefix=self.key_info.prefix,
            account=self.key_info.account,
            provider=self.framing.name,
            metadata=self.metadata,
        )
        if self.core.recorder is not None:
            self.metadata["recording"] = self.core.recorder.relpath  # relative to state_dir; written after the call
        self._log.info("Call ended: {reason} after {duration}s, {turns} turns, {points} points",
                       event="call.ended", call_id=summary["call_id"], reason=summary["end_reason"],
                       duration=summary["duration"], turns=summary["turns"], points=summary["points_charged"])
        self.service.call_ended(self, summary)


class VoiceFactory(WebSocketServerFactory):
    protocol = VoiceProtocol

    def __init__(self, service: Any, url: str = "ws://localhost/") -> None:
        super().__init__(url, server="UpVoot")
        self.service = service
        # the service's metrics (upvoot.daemon.metrics); a service without them (a unit-test fake) gets a private set
        self.metrics = getattr(service, "metrics", None) or Metrics()
        ws = service.config.websocket
        self.setProtocolOptions(
            maxMessagePayloadSize=ws.max_message_size,
            maxFramePayloadSize=ws.max_frame_size,
            openHandshakeTimeout=ws.open_handshake_timeout,
            closeHandshakeTimeout=ws.close_timeout,
            autoPingInterval=ws.auto_ping_interval or 0,
            autoPingTimeout=ws.auto_ping_timeout,
            maxConnections=ws.max_connections,
            trustXForwardedFor=service.config.trust_x_forwarded_for,
        )


def wall_clock() -> float:
    return time.time()
