"""The test dialer against a small raw-protocol server on a loopback port.

The server (``FakeAgent``) does what ``upvoot.framing.raw`` promises: on open
it sends ``audio_start``, a 440 Hz tone in 20 ms frames paced in real time
(with a lead of three frames), ``audio_end``, and the agent's transcript. It
records what the caller sends with arrival times, answers ``end_call`` with
a goodbye and a 1000 close, and can deny the upgrade with 401.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import os
import pathlib
import wave

import numpy as np
import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, task
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.logger import globalLogPublisher

from upvoot import audio
from upvoot.dial import (
    JITTER_DELAY,
    AgentAudio,
    AgentRecorder,
    Burst,
    Call,
    Cleared,
    ControlMessage,
    DialOptions,
    MarkSent,
    Violation,
    dial,
    exit_code,
    make_sim,
)
from upvoot.dial import command as dialer

TONE_HZ = 440.0
LEAD_FRAMES = 3


def _reactor():
    from twisted.internet import reactor

    return reactor


# ---- the fake agent -----------------------------------------------------------------------


class FakeAgentProtocol(WebSocketServerProtocol):
    """With ``factory.converse``: barge-in after 200 ms of loud caller audio
    while speaking; a 1.5 s answer 300 ms after the caller stops talking."""

    _loop = None
    _timers: list = ()  # type: ignore[assignment]

    def onConnect(self, request):
        if self.factory.deny:
            raise ConnectionDeny(401, "unknown key")
        self.factory.connections.append(self)
        self.received: list[tuple[float, bytes]] = []
        self.texts: list[tuple[float, str]] = []
        self.close_code = None
        self._timers = []
        self._loud = 0  # consecutive loud caller frames
        self._quiet = 0  # consecutive quiet caller frames after speech
        return None

    def onOpen(self):
        self.opened_at = self.factory.clock.seconds()
        self.speak(self.factory.greeting_seconds, "Hello.")

    def speak(self, seconds, text):
        self.send_json({"type": "audio_start"})
        pcm = audio.tone(TONE_HZ, seconds, level_dbfs=-12.0)
        frames = [pcm[i : i + audio.FRAME_BYTES] for i in range(0, len(pcm), audio.FRAME_BYTES)]
        for frame in frames[:LEAD_FRAMES]:
            self.sendMessage(frame, isBinary=True)
        rest = iter(frames[LEAD_FRAMES:])

        def tick():
            frame = next(rest, None)
            if frame is None:
                self.stop_speaking(interrupted=False, text=text)
            else:
                self.sendMessage(frame, isBinary=True)

        self._loop = task.LoopingCall(tick)
        self._loop.clock = self.factory.clock
        self._loop.start(audio.FRAME_MS / 1000.0, now=False)

    def stop_speaking(self, interrupted, text):
        self._loop.stop()
        self._loop = None
        self.audio_end_at = self.now()
        self.send_json({"type": "audio_end", "interrupted": interrupted})
        self.send_json({"type": "transcript", "role": "agent", "text": text})
        if self.factory.close_after_greeting is not None:
            self.later(self.factory.close_after_greeting, self.sendClose, 1000, "done")

    def later(self, seconds, f, *args):
        self._timers.append(self.factory.clock.callLater(seconds, f, *args))

    def now(self):
        return self.factory.clock.seconds() - self.opened_at

    def send_json(self, msg):
        self.sendMessage(json.dumps(msg).encode(), isBinary=False)

    def onMessage(self, payload, isBinary):
        if isBinary:
            self.received.append((self.now(), payload))
            if self.factory.converse:
                self.hear(audio.rms_dbfs(payload) > -30)
            return
        self.texts.append((self.now(), payload.decode()))
        if json.loads(payload).get("type") == "end_call":
            self.send_json({"type": "transcript", "role": "agent", "text": "Goodbye."})
            self.sendClose(1000, "goodbye")

    def hear(self, loud):
        self._loud = self._loud + 1 if loud else 0
        if self._loop is not None:
            if self._loud >= 10:
                self.stop_speaking(interrupted=True, text="Hel")
            return
        if loud:
            self._quiet = 1
        elif self._quiet:
            self._quiet += 1
            if self._quiet == 15:
                self._quiet = 0
                self.send_json({"type": "turn_start"})
                self.later(0.3, self.speak, 1.5, "An answer.")

    def onClose(self, wasClean, code, reason):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self.close_code = code
        self.factory.closed.append(code)


class FakeAgent(WebSocketServerFactory):
    protocol = FakeAgentProtocol

    def __init__(self, *, deny=False, greeting_seconds=1.0, close_after_greeting=None, converse=False):
        super().__init__()
        self.setProtocolOptions(openHandshakeTimeout=0)  # no txaio timer outliving a failed TLS test
        self.clock = _reactor()
        self.deny = deny
        self.greeting_seconds = greeting_seconds
        self.close_after_greeting = close_after_greeting
        self.converse = converse
        self.connections: list[FakeAgentProtocol] = []
        self.closed: list = []


@pytest_twisted.async_yield_fixture
async def serve():
    """Start FakeAgents on 127.0.0.1:0; yields a function returning (factory, url)."""
    ports = []

    @defer.inlineCallbacks
    def start(tls=None, **kwargs):
        factory = FakeAgent(**kwargs)
        if tls is None:
            endpoint = TCP4ServerEndpoint(_reactor(), 0, interface="127.0.0.1")
        else:
            endpoint = SSL4ServerEndpoint(_reactor(), 0, tls, interface="127.0.0.1")
        port = yield endpoint.listen(factory)
        ports.append(port)
        scheme = "ws" if tls is None else "wss"
        return factory, f"{scheme}://127.0.0.1:{port.getHost().port}/voice/sk_test_key"

    yield start
    for port in ports:
        await port.stopListening()


def _printer():
    out, err = io.StringIO(), io.StringIO()
    return dialer.Printer(out, err), out, err


def _settle(seconds=0.05):
    return task.deferLater(_reactor(), seconds, lambda: None)


def _dominant_hz(pcm: bytes) -> float:
    x = audio.to_float32(pcm)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1.0 / audio.RATE)[int(np.argmax(spectrum))])


def _loud_spans(pcm: bytes, threshold_dbfs=-40.0) -> list[tuple[int, int]]:
    """(first, last+1) 20 ms frame indexes of runs of loud frames."""
    spans, start = [], None
    n = len(pcm) // audio.FRAME_BYTES
    for i in range(n):
        loud = audio.rms_dbfs(pcm[i * audio.FRAME_BYTES : (i + 1) * audio.FRAME_BYTES]) > threshold_dbfs
        if loud and start is None:
            start = i
        elif not loud and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, n))
    return spans


# ---- calls against the fake agent --------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_prints_control_messages_in_order_and_records_the_greeting(serve):
    agent, url = yield serve(close_after_greeting=0.3)
    printer, out, err = _printer()
    result = yield dial(_reactor(), DialOptions(url, record=True), printer=printer)

    lines = out.getvalue().splitlines()
    assert [json.loads(line.split(" ", 1)[1])["type"] for line in lines[:-1]] == ["audio_start", "audio_end", "transcript"]
    times = [float(line.split(" ", 1)[0].rstrip("s")) for line in lines[:-1]]
    assert all(line.startswith("+") for line in lines[:-1])
    assert times == sorted(times)
    assert 0.9 < times[1] < 1.5  # audio_end after ~1 s of paced audio
    assert lines[-1].startswith("summary: received 1.00 s of agent audio in 50 frames (1 burst)")
    assert "closed by the server" in lines[-1] and "code 1000 'done'" in lines[-1]
    assert err.getvalue() == ""

    assert result.closed_by == "server" and result.close_code == 1000
    assert exit_code(result) == 0
    assert result.first_audio_at < 0.2
    [(first, last)] = _loud_spans(result.recording)
    assert 48 <= last - first <= 51  # ~1 s of tone, no gaps inside
    tone = result.recording[first * audio.FRAME_BYTES : last * audio.FRAME_BYTES]
    assert abs(_dominant_hz(tone) - TONE_HZ) < 5
    # time-aligned: starts at the arrival (plus the jitter buffer), lasts to the hang-up
    assert first * 0.02 == pytest.approx(result.first_audio_at + JITTER_DELAY, abs=0.03)
    assert audio.duration(result.recording) == pytest.approx(result.duration, abs=0.01)


@pytest_twisted.inlineCallbacks
def test_json_lines(serve):
    agent, url = yield serve(greeting_seconds=0.2, close_after_greeting=0.0)
    out, err = io.StringIO(), io.StringIO()
    yield dial(_reactor(), DialOptions(url), printer=dialer.Printer(out, err, json_lines=True))
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [row["msg"]["type"] for row in rows[:-1]] == ["audio_start", "audio_end", "transcript"]
    assert all(isinstance(row["t"], float) for row in rows)
    assert rows[-1]["summary"]["audio_frames"] == 10
    assert rows[-1]["summary"]["close_code"] == 1000
    assert rows[-1]["summary"]["exit"] == 0


@pytest_twisted.inlineCallbacks
def test_record_raw_concatenates(serve):
    agent, url = yield serve(greeting_seconds=0.4, close_after_greeting=0.2)
    result = yield dial(_reactor(), DialOptions(url, record=True, record_raw=True))
    assert len(result.recording) == 20 * audio.FRAME_BYTES
    assert result.recording == audio.tone(TONE_HZ, 0.4, level_dbfs=-12.0)


@pytest_twisted.inlineCallbacks
def test_played_wav_reaches_the_server_in_real_time(serve):
    agent, url = yield serve(greeting_seconds=0.3)
    caller = audio.tone(1000.0, 1.0, level_dbfs=-6.0)
    options = DialOptions(url, play=caller, play_after_greeting=True, hangup_after=1.8)
    result = yield dial(_reactor(), options)
    yield _settle()

    [server] = agent.connections
    assert all(len(data) == audio.FRAME_BYTES for _, data in server.received)
    loud = [(t, data) for t, data in server.received if audio.rms_dbfs(data) > -40]
    assert b"".join(data for _, data in loud) == caller  # every sample, in order, nothing else
    # not before the greeting ended, and paced: 50 frames over ~0.98 s, not dumped
    assert loud[0][0] >= server.audio_end_at - 0.005
    assert loud[-1][0] - loud[0][0] == pytest.approx(0.98, abs=0.08)
    gaps = np.diff([t for t, _ in loud])
    assert np.median(gaps) == pytest.approx(0.02, abs=0.004)
    # the line stays open with silence before and after the WAV, in real time
    assert server.received[0][0] < 0.05
    assert len(server.received) == pytest.approx(1.8 / 0.02, abs=5)
    assert result.closed_by == "client" and result.hangup_reason == "hangup-after"
    assert server.close_code == 1000
    assert exit_code(result) == 0


@pytest_twisted.inlineCallbacks
def test_end_call_is_sent(serve):
    agent, url = yield serve(greeting_seconds=0.2)
    printer, out, err = _printer()
    result = yield dial(_reactor(), DialOptions(url, end_call_after=0.5), printer=printer)
    yield _settle()

    [server] = agent.connections
    [(t, text)] = server.texts
    assert json.loads(text) == {"type": "end_call"}
    assert t == pytest.approx(0.5, abs=0.05)
    assert result.end_call_sent_at == pytest.approx(0.5, abs=0.05)
    assert '+0.5' in out.getvalue() and 'sent {"type": "end_call"}' in out.getvalue()
    assert result.messages[-1][1] == {"type": "transcript", "role": "agent", "text": "Goodbye."}
    assert result.closed_by == "server" and result.close_code == 1000
    assert exit_code(result) == 0


@pytest_twisted.inlineCallbacks
def test_max_seconds_hangs_up(serve):
    agent, url = yield serve(greeting_seconds=0.1)
    result = yield dial(_reactor(), DialOptions(url, max_seconds=0.4))
    assert result.closed_by == "client" and result.hangup_reason == "max-seconds"
    assert result.duration == pytest.approx(0.4, abs=0.1)
    assert exit_code(result) == 0


@pytest_twisted.inlineCallbacks
def test_refused_upgrade_is_reported_with_exit_code_3(serve):
    agent, url = yield serve(deny=True)
    printer, out, err = _printer()
    result = yield dial(_reactor(), DialOptions(url, connect_timeout=5), printer=printer)
    assert result.refused == 401 and not result.opened
    assert exit_code(result) == 3
    assert err.getvalue() == "refused: HTTP 401\n"


@pytest_twisted.inlineCallbacks
def test_connection_refused_is_a_failure():
    # a port that was just free: nothing listens there
    port = yield TCP4ServerEndpoint(_reactor(), 0, interface="127.0.0.1").listen(FakeAgent())
    number = port.getHost().port
    yield port.stopListening()
    printer, out, err = _printer()
    result = yield dial(_reactor(), DialOptions(f"ws://127.0.0.1:{number}/voice/k"), printer=printer)
    assert exit_code(result) == 1
    assert err.getvalue().startswith(f"failed: cannot connect to 127.0.0.1:{number}")


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    from twisted.internet.ssl import DefaultOpenSSLContextFactory

    return str(tmp_path / "cert.pem"), DefaultOpenSSLContextFactory(str(tmp_path / "key.pem"), str(tmp_path / "cert.pem"))


@pytest_twisted.inlineCallbacks
def test_wss_with_cafile_and_insecure(serve, tmp_path):
    cafile, server_tls = _self_signed(tmp_path)
    agent, url = yield serve(tls=server_tls, greeting_seconds=0.1, close_after_greeting=0.0)
    trusted = yield dial(_reactor(), DialOptions(url, cafile=cafile))
    assert trusted.close_code == 1000 and trusted.audio_frames == 5
    insecure = yield dial(_reactor(), DialOptions(url, insecure=True))
    assert insecure.close_code == 1000 and insecure.audio_frames == 5
    untrusted = yield dial(_reactor(), DialOptions(url, connect_timeout=5))
    assert not untrusted.opened and exit_code(untrusted) == 1
    assert "certificate verify failed" in untrusted.error
    yield _settle(0.1)  # let the server side see its failed TLS connections close


# ---- the command line -------------------------------------------------------------------------------


def _args(*argv):
    parser = argparse.ArgumentParser()
    dialer.configure_parser(parser)
    return parser.parse_args(list(argv))


def test_missing_wav_is_exit_2(tmp_path):
    err = io.StringIO()
    code = dialer.run(_args("ws://127.0.0.1:9/voice/k", "--play", str(tmp_path / "nope.wav")), io.StringIO(), err)
    assert code == 2
    assert err.getvalue() == f"error: cannot read {tmp_path / 'nope.wav'}: no such file\n"


def test_8_bit_wav_is_exit_2(tmp_path):
    path = tmp_path / "eight.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 800)
    err = io.StringIO()
    assert dialer.run(_args("ws://127.0.0.1:9/voice/k", "--play", str(path)), io.StringIO(), err) == 2
    assert err.getvalue().count("\n") == 1 and "only 16-bit PCM WAV is supported" in err.getvalue()


def test_not_a_wav_and_bad_url_are_exit_2(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav at all")
    err = io.StringIO()
    assert dialer.run(_args("ws://127.0.0.1:9/voice/k", "--play", str(junk)), io.StringIO(), err) == 2
    assert dialer.run(_args("http://127.0.0.1:9/voice/k"), io.StringIO(), err) == 2
    assert dialer.run(_args("ws://127.0.0.1:9/voice/k", "--cafile", str(junk)), io.StringIO(), err) == 2
    assert len(err.getvalue().splitlines()) == 3


def test_stereo_44k_wav_becomes_16k_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    left = audio.to_int16(audio.tone(1000.0, 0.5, rate=44100))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(np.stack([left, left], axis=1).astype("<i2").tobytes())
    options = dialer.options_from_args(_args("ws://127.0.0.1:9/voice/k", "--play", str(path)))
    assert audio.duration(options.play) == pytest.approx(0.5, abs=0.01)
    assert abs(_dominant_hz(options.play) - 1000.0) < 5


# ---- the agent recorder (what the caller heard), on a fake clock ------------------------------------------------------


def test_agent_recorder_keeps_gaps_between_bursts_and_absorbs_small_jitter():
    frame = audio.tone(440.0, 0.02)
    p = AgentRecorder(delay=0.04)
    for i in range(10):  # 0.2 s burst at 1.0 s, each frame 3 ms late
        p.add(1.0 + i * 0.02 + (0.003 if i else 0), frame)
    for i in range(5):  # second burst at 2.0 s
        p.add(2.0 + i * 0.02, frame)
    pcm = p.finish(3.0)
    assert audio.duration(pcm) == pytest.approx(3.0)
    assert _loud_spans(pcm) == [(52, 62), (102, 107)]


# ---- bench/load.py: the pieces that need no daemon -------------------------------------------


def _load_bench():
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "load.py"
    spec = importlib.util.spec_from_file_location("upvoot_bench_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


def test_percentile(bench):
    assert bench.percentile([], 50) is None
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    values = list(range(1, 101))
    assert bench.percentile(values, 0) == 1 and bench.percentile(values, 100) == 100
    assert bench.percentile(values, 99) == pytest.approx(99.01)
    assert bench.percentile(values, 50) == pytest.approx(np.percentile(values, 50))


def test_parse_proc_stat(bench):
    # a command name with spaces and parentheses; utime 1234, stime 567 (fields 14, 15)
    line = "4242 (twistd (upvoot) x) S 1 4242 4242 0 -1 4194560 8123 0 0 0 1234 567 3 4 20 0 9 0 777 0 0"
    assert bench.parse_proc_stat(line) == 1234 + 567
    # this very process, read the real way
    assert bench.cpu_seconds(os.getpid()) > 0


def test_frame_jitter_skips_the_lead_and_measures_gaps(bench):
    frames = [(0.0, 640), (0.0, 640), (0.0, 640)]  # a lead of three frames at once
    frames += [(0.02 * (i - 2) + (0.005 if i == 6 else 0.0), 640) for i in range(3, 12)]  # then paced
    burst = Burst(start=0.0, end=0.3, interrupted=False, frames=frames)
    jitter = bench.frame_jitter([burst], skip=0.06)
    assert len(jitter) == 9
    assert sorted(round(j, 4) for j in jitter)[-2:] == [0.005, 0.005]  # frame 6 late, 7 early by as much
    assert bench.frame_jitter([burst], skip=0.0)[:2] == [0.02, 0.02]  # the lead, when not skipped


def test_barge_in_latency_pairs_onsets_with_interrupted_bursts(bench):
    spoken = Burst(start=0.0, end=2.05, interrupted=True, frames=[(0.02 * i, 640) for i in range(100)])
    finished = Burst(start=3.0, end=4.0, interrupted=False, frames=[(3.0, 640)])
    [cut, missed, outside] = bench.barge_ins([spoken, finished], [1.7, 3.5, 5.0])
    assert cut.last_frame == pytest.approx(0.28) and cut.heard == pytest.approx(0.3)
    assert cut.audio_end == pytest.approx(0.35)
    assert missed.last_frame is None and outside.last_frame is None


def test_call_urls_and_redaction(bench):
    assert bench.call_urls("ws://h:1/voice/k", [], 2) == ["ws://h:1/voice/k"] * 2
    assert bench.call_urls("ws://h:1/voice", ["a", "b"], 3) == ["ws://h:1/voice/a", "ws://h:1/voice/b", "ws://h:1/voice/a"]
    assert bench.call_urls("ws://h:1/voice/{key}?x=1", ["a"], 1) == ["ws://h:1/voice/a?x=1"]
    assert bench.redact("ws://h:1/voice/sk_live_secret") == "ws://h:1/voice/sk_liv…"


def test_voice_like_is_loud_enough_to_barge_in(bench):
    pcm = bench.voice_like(1.0, level_dbfs=-18.0)
    assert audio.duration(pcm) == pytest.approx(1.0)
    levels = [audio.rms_dbfs(pcm[i : i + audio.FRAME_BYTES]) for i in range(audio.FRAME_BYTES, len(pcm) - audio.FRAME_BYTES, audio.FRAME_BYTES)]
    assert min(levels) > -30


@pytest_twisted.inlineCallbacks
def test_load_run_against_the_fake_agent(bench, serve):
    agent, url = yield serve(greeting_seconds=1.5, converse=True)
    args = bench.parser().parse_args(["--url", url, "--calls", "3", "--seconds", "4", "--ramp", "0.2", "--talk-after", "0.5", "--pid", str(os.getpid())])
    report = yield defer.Deferred.fromCoroutine(bench.run_load(_reactor(), args, bench.voice_like(1.0), []))
    f = report.figures()
    assert f["outcomes"] == {"held": 3, "ended by server": 0, "dropped": 0, "interrupted": 0, "refused": 0, "failed": 0}
    assert f["greeting_ms"]["n"] == 3 and f["greeting_ms"]["p99"] < 100
    assert f["jitter_ms"]["n"] > 100 and f["jitter_ms"]["p50"] < 5
    # the fake agent stops after 10 loud frames: the last frame comes ~180 ms after the onset
    assert f["barge_ins_interrupted"] >= 3
    assert 150 < f["barge_in_last_frame_ms"]["p50"] < 260
    assert f["barge_in_heard_ms"]["p50"] > f["barge_in_last_frame_ms"]["p50"]
    assert f["server_cpu"]["cpu_seconds_per_call_minute"] >= 0
    table = bench.format_report(report)
    assert "held 3" in table and "greeting latency (ms)" in table and "% of a core per call" in table


def test_unwritable_record_path_is_exit_2(tmp_path):
    err = io.StringIO()
    args = _args("ws://127.0.0.1:9/voice/k", "--record", str(tmp_path / "missing" / "out.wav"))
    assert dialer.run(args, io.StringIO(), err) == 2
    assert err.getvalue().startswith("error: cannot write ")


# ---- the provider simulators, sans-IO ----------------------------------------------------------


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _sent(frames) -> list:
    return [json.loads(f.payload) for f in frames]


def test_exotel_sim_checks_chunks_and_its_stream_and_finishes_the_playing_chunk():
    sim = make_sim("exotel")
    sid = sim.stream_id
    [bad] = sim.receive_text(json.dumps({"event": "media", "stream_sid": sid, "media": {"payload": _b64(bytes(1000))}}), 0.0)[:1]
    assert bad == Violation("media chunk of 1000 bytes (Exotel wants 3200..100000, x320)")
    events = sim.receive_text(json.dumps({"event": "media", "stream_sid": "other", "media": {"payload": _b64(bytes(3200))}}), 0.0)
    assert events[0] == Violation("stream_sid 'other' is not this stream's " + repr(sid)) and isinstance(events[1], AgentAudio)
    assert sim.receive_text(json.dumps({"event": "media", "stream_sid": sid}), 0.0) == [Violation("media without a base64 payload")]
    assert sim.chunk_sizes == [1000, 3200]
    # 1000 + 3200 bytes of 8 kHz s16le: 0.2625 s queued from 0; a mark after them, then a clear at 0.1
    assert sim.receive_text(json.dumps({"event": "mark", "stream_sid": sid, "mark": {"name": "m"}}), 0.0) == [MarkSent("m")]
    [cleared] = sim.receive_text(json.dumps({"event": "clear", "stream_sid": sid}), 0.1)
    assert cleared.lost == () and cleared.dropped == pytest.approx(0.0)  # the chunk playing at 0.1 ends at 0.2625
    assert sim.poll(0.2) == [] and _sent(sim.poll(0.3))[0]["mark"] == {"name": "m"}


def test_twilio_sim_rejects_a_foreign_stream_and_returns_marks_on_clear():
    sim = make_sim("twilio")
    foreign = {"event": "media", "streamSid": "MZnot", "media": {"payload": _b64(bytes(160))}}
    assert sim.receive_text(json.dumps(foreign), 0.0) == [Violation("media with streamSid 'MZnot'")]
    [media] = sim.receive_text(json.dumps({**foreign, "streamSid": sim.stream_id}), 0.0)
    assert isinstance(media, AgentAudio) and media.size == 160 and media.plays_at == 0.0
    sim.receive_text(json.dumps({"event": "mark", "streamSid": sim.stream_id, "mark": {"name": "a"}}), 0.0)
    assert sim.receive_text(json.dumps({"event": "clear", "streamSid": sim.stream_id}), 0.01) == [Cleared(pytest.approx(0.01), returned=("a",))]
    assert [m["mark"]["name"] for m in _sent(sim.poll(0.01))] == ["a"]
    assert isinstance(sim.receive_text(json.dumps({"event": "hello"}), 0.0)[0], ControlMessage)


def test_plivo_sim_checks_the_format_and_loses_marks_on_clear():
    sim = make_sim("plivo", 16000)
    play = {"event": "playAudio", "streamId": sim.stream_id,
            "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": _b64(bytes(640))}}
    [wrong, media] = sim.receive_text(json.dumps(play), 0.0)
    assert wrong == Violation("playAudio in audio/x-mulaw/8000, stream is audio/x-l16/16000") and isinstance(media, AgentAudio)
    assert sim.receive_text(json.dumps({"event": "playAudio", "media": {}}), 0.0) == [Violation("playAudio without a base64 payload")]
    assert sim.receive_text(json.dumps({"event": "checkpoint", "name": "c"}), 0.0) == [MarkSent("c")]
    assert sim.receive_text(json.dumps({"event": "clearAudio"}), 0.0) == [Cleared(pytest.approx(0.02), lost=("c",))]
    assert [m["event"] for m in _sent(sim.poll(1.0))] == ["clearedAudio"]
    assert "from=+15550100001,to=+15550100002" in _sent(sim.open())[0]["extra_headers"]


def test_telnyx_and_vonage_sims_check_frame_lengths():
    telnyx = make_sim("telnyx")
    short = {"event": "media", "media": {"payload": _b64(bytes(80))}}
    assert telnyx.receive_text(json.dumps(short), 0.0)[0] == Violation("media of 10.0 ms (Telnyx takes 20 ms..30 s)")
    vonage = make_sim("vonage")
    assert vonage.receive_binary(bytes(100), 0.0)[0] == Violation("binary frame of 100 bytes (Vonage wants exactly 640)")
    assert vonage.receive_text(json.dumps({"action": "notify", "payload": {"name": "n", "x": 1}}), 0.0) == [MarkSent("n")]
    assert _sent(vonage.poll(0.01)) == [{"event": "websocket:notify", "payload": {"name": "n", "x": 1}}]
    opened = _sent(vonage.open())[0]
    assert (opened["from"], opened["to"]) == ("+15550100001", "+15550100002")


def test_a_provider_call_on_a_fake_clock_counts_bursts_marks_and_clears():
    class Transport:
        def __init__(self):
            self.texts, self.closed = [], None

        def send_binary(self, data):
            raise AssertionError("twilio sends text only")

        def send_text(self, text):
            self.texts.append(json.loads(text))

        def close(self, code, reason):
            self.closed = (code, reason)

    clock = task.Clock()
    call = Call(clock, DialOptions("ws://h/voice/k", provider="twilio", hangup_after=2.0, record=True))
    assert call.url.endswith("?provider=twilio")
    transport = Transport()
    call.opened(transport)
    assert [m["event"] for m in transport.texts] == ["connected", "start"]
    sid = call.sim.stream_id
    for i in range(10):  # 0.2 s of agent audio, then a mark
        call.text(json.dumps({"event": "media", "streamSid": sid, "media": {"payload": _b64(b"\x7f" * 160)}}))
    call.text(json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": "end"}}))
    clock.pump([0.02] * 30)
    assert [m["mark"]["name"] for m in transport.texts if m["event"] == "mark"] == ["end"]
    [burst] = call.result.bursts
    assert burst.end == pytest.approx(0.2) and burst.interrupted is False
    clock.advance(1.5)
    assert transport.closed == (1000, "hangup-after") and transport.texts[-1]["event"] == "stop"
    call.closed(True, 1000, "hangup-after")
    r = call.result
    assert (r.marks, r.clears, r.violations, r.closed_by, exit_code(r)) == (1, 0, [], "client", 0)
    assert r.duration == pytest.approx(2.1) and audio.duration(r.recording) == pytest.approx(r.duration)
