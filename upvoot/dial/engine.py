"""The test dialer's call engine: one call from the provider's side.

``Call`` is the caller's behaviour and bookkeeping: the 20 ms send loop, the
timers, what arrived and when (a ``DialResult``). It talks to a
``CallTransport`` and a clock, never to Autobahn; the socket around it is
``upvoot.dial.connect`` and the command line ``upvoot.dial.command``.

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
and ends when the provider's playback buffer has run dry for ``BURST_GAP``
seconds (or at a clear, interrupted).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Protocol

from twisted.internet import defer, task
from twisted.python.failure import Failure

from upvoot.dial.media import FRAME_SECONDS, AgentRecorder, AudioSource, FrameConcatenation, PlayThenSilence, Recorder
from upvoot.dial.providers import make_sim
from upvoot.dial.result import Burst, DialOptions, DialResult
from upvoot.dial.simulator import AgentAudio, Cleared, MarkSent, ProviderSim, Violation
from upvoot.framing.base import Frame

#: After a stall (a busy machine) the send loop catches up at most this many
#: frames at once; older ones are dropped, as a real line would drop them.
MAX_CATCH_UP_FRAMES = 25

#: Provider calls: a burst of agent audio ends when the provider's playback
#: buffer has had nothing to play for this long.
BURST_GAP = 0.3

#: Provider messages that carry media: counted, never printed.
_MEDIA_EVENTS = ("media", "playAudio")


# ---- the call --------------------------------------------------------------------------------


class CallTransport(Protocol):
    """What the call writes to; the socket adapter (``upvoot.dial.connect``) implements it."""

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
        source: AudioSource | None = None,
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
        self._recorder: Recorder | None = None
        if options.record:
            self._recorder = FrameConcatenation() if options.record_raw else AgentRecorder()
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
            self._received(t, payload, is_json=False)
            return
        self._received(t, msg)
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "audio_start":
            self._start_burst(t)
        elif kind == "audio_end":
            self._end_burst(t, interrupted=bool(msg.get("interrupted", False)))

    def binary(self, payload: bytes) -> None:
        t = self.now()
        if self.sim is not None:
            self._sim_events(t, self.sim.receive_binary(payload, t))
            return
        self._agent_audio(t, payload)

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
        if not isinstance(msg, dict):
            self._received(t, payload, is_json=False)
        elif msg.get("event") not in _MEDIA_EVENTS:
            self._received(t, msg)
        self._sim_events(t, events)

    def _sim_events(self, t: float, events: list) -> None:
        r = self.result
        for event in events:
            if isinstance(event, AgentAudio):
                if not self.agent_speaking:
                    self._start_burst(t)
                self._agent_audio(t, event.pcm)
                self._last_audio = t
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
        """Echo what is due; end the burst once the playback buffer has run dry."""
        assert self.sim is not None
        now = self.now()
        self._send_sim(self.sim.poll(now))
        if self.agent_speaking and self.sim.buffer.queued(now) == 0 and now - self._last_audio >= BURST_GAP:
            self._end_burst(max(self._last_audio, self.sim.buffer.play_end), interrupted=False)

    # ---- what the agent says, both protocols
    def _received(self, t: float, msg: Any, is_json: bool = True) -> None:
        self.result.messages.append((t, msg))
        if self.printer:
            self.printer.received(t, msg, is_json=is_json)

    def _agent_audio(self, t: float, pcm: bytes) -> None:
        r = self.result
        r.audio_bytes += len(pcm)
        r.audio_frames += 1
        if self.agent_speaking:
            r.bursts[-1].frames.append((t, len(pcm)))
        else:
            r.stray_frames += 1
        if self._recorder is not None:
            self._recorder.add(t, pcm)

    def _start_burst(self, t: float) -> None:
        self.agent_speaking = True
        self.result.bursts.append(Burst(start=t))

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
