"""The socket: ``/voice/<api-key>`` WebSocket upgrades, over Autobahn.

The wire protocol is written down in ``upvoot.framing.raw`` and the provider
framings; who may connect is the service's decision (``IVoiceService.admit``),
who is talking and when the call starts is ``upvoot.framing.negotiate``'s.
This module only does what needs the socket:

Handshake: a ``Refusal`` becomes its HTTP status with its headers
(``Retry-After``), ``Content-Length: 0``, no ``Server`` header; a client gone
while ``admit`` ran gets 408 (its ``Admission`` released). No upgrade: 404
(no status page, no redirect). A handshake over ``max_handshake_size``: 431.

Call: the negotiation's actions are carried out: a chosen framing becomes the
call's ``FramingLine``, a start ``IVoiceService.start_call``, call events go
to the ``ICallHandle`` (held until it exists). Close codes: 1000 call ended,
4400 bad provider parameters, 4408 no call within ``start_timeout``, 4002
unrecognised protocol; Autobahn's own 1009 (too big), 1002 (protocol error),
1007 (bad UTF-8), then a close (``failByDrop`` off: a code, not a reset).

A client that stops reading is dropped after ``stall_timeout`` backed up, or
once ``MAX_STALLED_BYTES`` more are queued; it gets no pongs meanwhile. No
key reaches a log (``upvoot.daemon.redact``); errors never echo the request.
"""

from __future__ import annotations

import http.client
from typing import Any, Iterable

import txaio
from autobahn.twisted.util import peer2str
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from upvoot.daemon.bounds import Complaints, StallWatch, is_utf8
from upvoot.daemon.line import CLOSE_NORMAL, FramingLine
from upvoot.daemon.redact import RedactingLog, redact
from upvoot.daemon.seams import Admission, IVoiceService, Refusal
from upvoot.framing.base import CallerAudio, CallStopped, Dtmf, EndCallRequested, Frame, PlayoutMark, ProtocolError
from upvoot.framing.negotiate import Chosen, Close, Deliver, Negotiation, Reply, Started

#: Call events held while the call is being started (its agent looked up).
MAX_HELD_EVENTS = 1000

class VoiceProtocol(WebSocketServerProtocol):
    log = RedactingLog(txaio.make_logger())  # Autobahn's, redacted
    _log = Logger()  # ours

    def __init__(self) -> None:
        super().__init__()
        self.admission: Admission | None = None
        self._refusal: Refusal | None = None  # the service's, as answered
        self.negotiation: Negotiation | None = None
        self.line: FramingLine | None = None
        self.handle: Any = None  # the call's ICallHandle, once started
        self._starting = False  # start_call is running: call events are held
        self._held: list = []
        self._timer: Any = None
        self._watch: StallWatch | None = None
        self._handshake_bytes = 0
        self._complaints: Complaints | None = None
        self._abort_timer: Any = None  # a lingering close (_linger)

    @property
    def service(self) -> IVoiceService:
        return self.factory.service

    # ------------------------------------------------------------ handshake
    def dataReceived(self, data: bytes) -> None:
        if self.state == self.STATE_CONNECTING:
            # Autobahn rescans its whole buffer on each read: bound it, so the scan stays cheap
            self._handshake_bytes += len(data)
            if self._handshake_bytes > self.service.config.websocket.max_handshake_size:
                self._too_large()
                return
        elif self.state == self.STATE_CLOSED:
            return
        super().dataReceived(data)

    def _too_large(self) -> None:
        self._log.info("Opening handshake over {limit} bytes from {peer}; closing", event="handshake.too_large",
                       limit=self.service.config.websocket.max_handshake_size, peer=self.peer)
        self.data = b""
        self.service.note_refusal(431)
        self.failHandshake("Request Header Fields Too Large", 431)

    def onConnect(self, request: Any) -> Any:
        if not self.factory.trustXForwardedFor and self.transport is not None:
            # behind a PROXY-protocol endpoint (haproxy:) the caller's address
            # is only known once the PROXY header has been read
            self.peer = peer2str(self.transport)
        params = {k: v[-1] for k, v in request.params.items() if v}
        d = self.service.admit(request.path, self.peer, request.headers, params)
        return d.addCallback(self._admitted)

    def _admitted(self, result: Admission | Refusal) -> None:
        if isinstance(result, Refusal):
            self._refusal = result
            raise ConnectionDeny(result.status, result.reason)
        if self.state == self.STATE_CLOSED:
            # The client left (or the handshake timed out) while admit ran. Autobahn
            # would still run onOpen on the dead connection: a ghost call holding a slot.
            self._log.info("Client left during the handshake (key {prefix})", event="handshake.abandoned",
                           prefix=result.key_prefix)
            result.release()
            self.service.note_refusal(408)
            raise ConnectionDeny(408, "Request Timeout")
        self.admission = result

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        if code == 426:  # "Upgrade header missing": not a WebSocket request, like any path we do not serve
            code = 404
        super().failHandshake(redact(reason), code, responseHeaders)

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        refusal = self._refusal
        if refusal is not None and refusal.status == code:
            phrase, extra = refusal.reason, refusal.headers
        else:  # Autobahn's own refusal: its reason may quote the request, never echo it
            phrase, extra = http.client.responses.get(code, "Error"), ()
        headers = [*(responseHeaders or ()), *extra, ("Content-Length", "0"), ("Connection", "close")]
        super().sendHttpErrorResponse(code, phrase, headers)

    # ---------------------------------------------------------------- call
    def onOpen(self) -> None:
        try:
            self._open()
        except Exception:
            self._log.failure("Could not start the call", event="call.start_failed")
            self.dropConnection(abort=True)

    def _open(self) -> None:
        service = self.service
        self._complaints = Complaints(service.clock)
        self._watch = StallWatch(service.clock, self.factory.stall_timeout, self._stalled)
        if self.transport is not None:
            self.transport.registerProducer(self._watch, True)
        admission = self.admission
        self.negotiation = Negotiation(admission.provider, admission.params, detect_timeout=service.config.detect_timeout,
                                       start_timeout=service.config.websocket.start_timeout, clock=service.clock)
        self._act(self.negotiation.begin())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.metrics.frames_in.inc()
        if self.negotiation is None:
            return
        try:
            self._act(self.negotiation.receive(payload, isBinary))
        except Exception:
            self._log.failure("A client message could not be handled", event="call.framing_error")

    def _timed_out(self) -> None:
        self._timer = None
        self._act(self.negotiation.timeout())

    def _act(self, actions: Iterable[Any]) -> None:
        for action in actions:
            if self.state != self.STATE_OPEN:
                break
            if isinstance(action, Chosen):
                self.line = FramingLine(action.framing, self.send_frames, self.hang_up)
                self._log.debug("Framing {name} ({why})", event="call.framing", name=action.framing.name,
                                why=action.why)
            elif isinstance(action, Started):
                self._start(action.started)
            elif isinstance(action, Deliver):
                self._deliver(action.event)
            elif isinstance(action, Reply):
                self.send_frames(action.frames)
            elif isinstance(action, Close):
                self._closing_early(action.code, action.reason)
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        seconds = self.negotiation.deadline if self.negotiation is not None and self.state == self.STATE_OPEN else None
        if seconds is not None:
            self._timer = self.service.clock.callLater(max(0.0, seconds), self._timed_out)

    def _closing_early(self, code: int, reason: str) -> None:
        if self.handle is None and not self._starting:
            self._log.warn("No call on this connection ({reason}); closing {code}: key {prefix} from {peer}",
                           event="call.no_start", code=code, reason=reason, prefix=self.admission.key_prefix,
                           peer=self.peer)
        self.hang_up(code, reason)

    def _start(self, started: Any) -> None:
        self._starting = True
        d = self.service.start_call(self.admission, started, self.line, self.disconnect)
        d.addCallbacks(self._started, self._start_failed)

    def _start_failed(self, failure: Any) -> None:
        self._log.failure("Could not start the call", failure, event="call.start_failed")
        self._started(None)

    def _started(self, handle: Any) -> None:
        self._starting = False
        held, self._held = self._held, []
        if handle is None:  # the service released the admission
            self.hang_up(CLOSE_NORMAL[0], "call could not start")
            return
        if self.state == self.STATE_CLOSED:
            handle.hangup()  # the caller left while the call was being started
            return
        self.handle = handle
        for event in held:
            self._deliver(event)

    def _deliver(self, event: Any) -> None:
        handle = self.handle
        if handle is None:
            if len(self._held) < MAX_HELD_EVENTS:
                self._held.append(event)
            return
        if isinstance(event, CallerAudio):
            handle.caller_audio(event.pcm)
        elif isinstance(event, PlayoutMark):
            handle.playout_acknowledged(event.name, event.cleared)
        elif isinstance(event, Dtmf):
            self._log.info("DTMF {digit}", event="call.dtmf", call_id=handle.call_id, digit=event.digit)
            handle.caller_dtmf(event.digit)
        elif isinstance(event, EndCallRequested):
            self._log.info("Client asked to end the call", event="call.end_requested", call_id=handle.call_id)
            handle.end_requested()
        elif isinstance(event, CallStopped):
            self._log.info("Provider stopped the stream: {reason}", event="call.stopped", call_id=handle.call_id,
                           reason=event.reason)
            handle.hangup()
        elif isinstance(event, ProtocolError):
            self._complain(event.message)

    def _complain(self, message: str) -> None:
        self.factory.metrics.bad_messages.inc()
        call_id = self.handle.call_id if self.handle is not None else None
        if self._complaints.note():
            self._log.warn("Bad client message: {message}", event="call.bad_message", call_id=call_id,
                           message=message[:200])
        else:
            self._summarise(call_id)
        if self.line is not None:
            self.line.notice("error", message=message)

    def _summarise(self, call_id: str | None, last: bool = False) -> None:
        n = self._complaints.summary_due(last) if self._complaints is not None else 0
        if n:
            self._log.warn("{n} more bad client messages", event="call.bad_messages", call_id=call_id, n=n)

    # ---------------------------------------------------------------- socket
    def send_frames(self, frames: Iterable[Frame]) -> None:
        if self.state != self.STATE_OPEN:
            return
        for frame in frames:
            self.factory.metrics.frames_out.inc()
            if frame.is_binary:
                self.sendMessage(frame.payload, isBinary=True)
            else:
                self.sendMessage(frame.payload.encode("utf-8"), isBinary=False)

    def hang_up(self, code: int, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(code, reason)

    def disconnect(self) -> None:  # the service's last resort at shutdown
        self.dropConnection(abort=True)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if self._watch is not None and self._watch.wrote(len(data)):
            return  # dropped: the client stopped reading long ago
        super().sendData(data, sync, chopsize)

    def onPing(self, payload: bytes) -> None:
        if self._watch is not None and self._watch.paused:
            return  # a client that does not read gets no pongs queued for it
        super().onPing(payload)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        if self.state == self.STATE_CLOSING and self.failedByMe:
            # we failed the connection (a bad close frame, e.g. one byte long): the close we sent
            # must reach the client before the connection goes, not be thrown away by an abort
            self._linger()
            return True
        # Autobahn answers a bad close frame with 1002/1007, then aborts the connection,
        # which throws that answer away (the client sees a reset): answer it, then close
        bad_code = code is not None and code not in self.CLOSE_STATUS_CODES_ALLOWED and not 3000 <= code <= 4999
        bad_reason = reasonRaw is not None and not is_utf8(reasonRaw)
        if self.state == self.STATE_OPEN and (bad_code or bad_reason):
            self._fail_connection(1002 if bad_code else 1007, "invalid close code" if bad_code else "invalid close reason")
            self._linger()
            return True
        return super().onCloseFrame(code, reasonRaw)

    def _linger(self) -> None:
        """Close once our close frame has left; abort after close_timeout (a client that does not read)."""
        self.dropConnection(abort=False)
        self._abort_timer = self.service.clock.callLater(self.factory.closeHandshakeTimeout, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        self.transport.abortConnection()

    def _stalled(self, why: str) -> None:
        self._log.warn("Client stopped reading ({why}); disconnecting", event="call.client_stalled", why=why,
                       call_id=self.handle.call_id if self.handle is not None else None, peer=self.peer)
        self._watch = None
        self.dropConnection(abort=True)

    def onClose(self, wasClean: bool, code: int, reason: str) -> None:
        for timer in (self._timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._abort_timer = None
        if self._watch is not None:
            self._watch.stopProducing()
            self._watch = None
        self._summarise(self.handle.call_id if self.handle is not None else None, last=True)
        if self.handle is not None:
            self.handle.hangup()
        elif self.admission is not None:
            self.admission.release()  # no call took the slot over (start_call then fires None)


class VoiceFactory(WebSocketServerFactory):
    protocol = VoiceProtocol
    #: seconds a client may leave our outbound buffer full before it is dropped
    stall_timeout = 10.0

    def __init__(self, service: IVoiceService, url: str = "ws://localhost/") -> None:
        super().__init__(url, server=None)  # no Server header: no product, no version
        self.service = service
        self.metrics = service.metrics
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
            webStatus=False,  # no status page naming Autobahn's version, no ?redirect= (an open redirect)
            failByDrop=False,  # a bad frame gets its close code (1002/1007/1009), not a TCP reset
        )
