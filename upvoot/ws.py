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

import time
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from upvoot.call import new_call
from upvoot.framing.base import CallerAudio, CallStarted, CallStopped, Dtmf, EndCallRequested, PlayoutMark, ProtocolError
from upvoot.framing.raw import RawFraming

_REASONS = {
    401: "Unauthorized",
    402: "Payment Required",
    404: "Not Found",
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
    """ICallOutput for the call machine: events -> framing -> WebSocket."""

    def __init__(self, proto: "VoiceProtocol") -> None:
        self.proto = proto
        self.framing = proto.framing

    def _send(self, frames) -> None:
        self.proto.send_frames(frames)

    def audio_start(self) -> None:
        self._send(self.framing.audio_start())

    def audio(self, pcm: bytes) -> None:
        self.proto.frames_out += 1
        self._send(self.framing.audio(pcm))

    def audio_end(self, interrupted: bool) -> None:
        self._send(self.framing.audio_end(interrupted))

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
    _closing = False
    _watch: _StallWatch | None = None

    @property
    def service(self) -> Any:
        return self.factory.service

    # ------------------------------------------------------------ handshake
    def onConnect(self, request) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._authorize(request))

    async def _authorize(self, request) -> None:
        service = self.service
        path = request.path
        if not path.startswith("/voice/"):
            service.note_refusal(404)
            raise ConnectionDeny(404, _REASONS[404])
        key = path[len("/voice/"):]
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
            service.note_refusal(401)
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
        self.key_info = info
        self.framing = RawFraming()
        service.calls_reserved += 1  # counted from now, so concurrent upgrades see it
        self._reserved = True
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
        service.calls_reserved -= 1
        self._reserved = False
        agent = service.agents.agents[self.key_info.agent]
        self.frames_in = 0
        self.frames_out = 0
        self._watch = _StallWatch(self)
        if self.transport is not None:
            self.transport.registerProducer(self._watch, True)
        self.machine, self.core = new_call(
            agent, _Output(self), service.clock, service.pacer, self._ended,
            lead=service.config.playout_lead, log_transcripts=service.config.log_transcripts,
        )
        self.started = CallStarted(provider=self.framing.name)
        service.call_opened(self)
        self._log.info("Call started: key {prefix}, account {account}, agent {agent}, from {peer}",
                       event="call.started", call_id=self.core.call_id, prefix=self.key_info.prefix,
                       account=self.key_info.account, agent=agent.config.name, peer=self.peer)
        self.machine.start()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.machine is None:
            return
        self.frames_in += 1
        try:
            events = self.framing.receive_binary(payload) if isBinary else self.framing.receive_text(payload.decode("utf-8", "replace"))
        except Exception:
            self._log.failure("Framing {name} raised on a frame", event="call.framing_error",
                              call_id=self.core.call_id, name=self.framing.name)
            return
        for event in events:
            self._dispatch(event)

    def _dispatch(self, event) -> None:
        if isinstance(event, CallerAudio):
            self.core.caller_audio(event.pcm)
        elif isinstance(event, EndCallRequested):
            self._log.info("Client asked to end the call", event="call.end_requested", call_id=self.core.call_id)
            self.machine.end_requested()
        elif isinstance(event, ProtocolError):
            self._log.warn("Bad client message: {message}", event="call.bad_message",
                           call_id=self.core.call_id, message=event.message)
            self.send_frames(self.framing.event("error", message=event.message))
        elif isinstance(event, CallStopped):
            self.machine.hangup()
        elif isinstance(event, (CallStarted, Dtmf, PlayoutMark)):
            pass  # provider framings (and DTMF/marks) come with the provider issue

    def send_frames(self, frames) -> None:
        if self._closing or self.state != self.STATE_OPEN:
            return
        for frame in frames:
            if frame.is_binary:
                self.sendMessage(frame.payload, isBinary=True)
            else:
                self.sendMessage(frame.payload.encode("utf-8"), isBinary=False)

    def close_normally(self) -> None:
        if not self._closing:
            self._closing = True
            if self.state == self.STATE_OPEN:
                self.sendClose(1000, "call ended")

    def stalled(self) -> None:
        self._log.warn("Client stopped reading; disconnecting", event="call.client_stalled",
                       call_id=self.core.call_id if self.core else None)
        self._watch = None
        self.dropConnection(abort=True)

    def onClose(self, wasClean: bool, code: int, reason: str) -> None:
        if getattr(self, "_reserved", False):
            self.service.calls_reserved -= 1
            self._reserved = False
        if self._watch is not None:
            self._watch.resumeProducing()
        if self.machine is not None:
            self.machine.hangup()

    def _ended(self, summary: dict) -> None:
        summary.update(
            key_prefix=self.key_info.prefix,
            account=self.key_info.account,
            provider=self.framing.name,
            metadata={"peer": self.peer},
        )
        self._log.info("Call ended: {reason} after {duration}s, {turns} turns, {points} points",
                       event="call.ended", call_id=summary["call_id"], reason=summary["end_reason"],
                       duration=summary["duration"], turns=summary["turns"], points=summary["points_charged"])
        self.service.call_ended(self, summary)


class VoiceFactory(WebSocketServerFactory):
    protocol = VoiceProtocol

    def __init__(self, service: Any, url: str = "ws://localhost/") -> None:
        super().__init__(url, server="UpVoot")
        self.service = service
        ws = service.config.websocket
        self.setProtocolOptions(
            maxMessagePayloadSize=ws.max_message_size,
            maxFramePayloadSize=ws.max_frame_size,
            openHandshakeTimeout=ws.open_handshake_timeout,
            closeHandshakeTimeout=ws.close_timeout,
            autoPingInterval=ws.auto_ping_interval or 0,
            autoPingTimeout=ws.auto_ping_timeout,
            maxConnections=ws.max_connections,
            trustXForwardedFor=0,
        )


def wall_clock() -> float:
    return time.time()
