"""Call recordings: the stereo WAV of a call driven by task.Clock with
deterministic engines, retention, recovery, options; and a recorded call
on the real daemon."""

from __future__ import annotations

import os
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from twisted.internet.task import Clock

from upvoot.ledger import recordings as recording
from upvoot.ledger import threads
from upvoot.audio import FRAME_BYTES, RATE
from upvoot.call import new_call, state_of
from upvoot.config import load_config
from upvoot.call.playout import Pacer
from upvoot.testing import QueueSTT, RecordingOutput, ToneTTS, agent_config, make_agent, quiet, speech

STEP = 0.02
CALLER_HZ = 300.0  # upvoot.testing.speech
AGENT_HZ = 440.0  # ToneTTS and the cached fixed lines


class Harness:
    """The call machine on a Clock, recorded with a synchronous writer."""

    def __init__(self, tmp_path: Path, config=None, stt=None, tts=None):
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.out = RecordingOutput()
        self.pacer = Pacer(self.clock)
        self.ended: list = []  # the CallOutcome
        self.recordings = recording.Recordings(str(tmp_path / "recordings"), str(tmp_path), 30 * 86400.0,
                                               self.clock, threads.synchronous)
        self.recorder = self.recordings.recorder("call1")
        self.agent = make_agent(config or agent_config(), stt=stt, tts=tts)
        self.machine = new_call(self.agent, self.out, self.clock, self.pacer, self.ended.append,
                                call_id="call1", recorder=self.recorder)  # the ICallHandle

    @property
    def t(self) -> float:
        return self.machine.report.elapsed()

    @property
    def state(self) -> str:
        return state_of(self.machine)

    def wait(self, seconds: float, audio: bytes | None = None) -> None:
        n = int(round(seconds / STEP))
        pcm = audio if audio is not None else quiet(seconds)
        for i in range(n):
            frame = pcm[i * FRAME_BYTES:(i + 1) * FRAME_BYTES]
            if frame and not self.ended:
                self.machine.caller_audio(frame)
            self.clock.advance(STEP)

    def say(self, seconds: float) -> float:
        start = self.t
        self.wait(seconds, speech(seconds, CALLER_HZ))
        return start

    def until(self, state: str, limit: float = 30.0) -> float:
        waited = 0.0
        while self.state != state and waited < limit:
            self.wait(STEP)
            waited += STEP
        assert self.state == state, f"still {self.state} after {limit}s"
        return self.t


def read_wav(path: str) -> tuple[wave._wave_params, np.ndarray, np.ndarray]:
    with wave.open(path, "rb") as w:
        params = w.getparams()
        frames = np.frombuffer(w.readframes(params.nframes), dtype="<i2")
    return params, frames[0::2].astype(np.float64), frames[1::2].astype(np.float64)


def level(channel: np.ndarray, start: float, end: float) -> float:
    """RMS of ``channel`` between two times (seconds)."""
    part = channel[int(start * RATE):int(end * RATE)]
    return float(np.sqrt(np.mean(part * part))) if part.size else 0.0


def pitch(channel: np.ndarray, start: float, end: float) -> float:
    part = channel[int(start * RATE):int(end * RATE)]
    spectrum = np.abs(np.fft.rfft(part * np.hanning(part.size)))
    return float(np.fft.rfftfreq(part.size, 1 / RATE)[int(np.argmax(spectrum))])


def onset(channel: np.ndarray, after: float, threshold: float = 1000.0) -> float:
    """The first time after ``after`` where ``channel`` is loud."""
    start = int(after * RATE)
    loud = np.nonzero(np.abs(channel[start:]) > threshold)[0]
    assert loud.size, f"no audio after {after}s"
    return (start + int(loud[0])) / RATE


def test_a_call_with_a_greeting_a_turn_and_a_barge_in_is_recorded_as_heard(tmp_path):
    cfg = agent_config(rules={"rule.long": "hours -> One two three four five six seven eight nine ten eleven twelve."})
    h = Harness(tmp_path, cfg, stt=QueueSTT(["hours please", ""]), tts=ToneTTS(AGENT_HZ))
    h.machine.start()
    greeting_end = h.until("listening")
    h.wait(0.5)
    spoke_at = h.say(0.8)  # the caller's turn
    reply_at = h.until("speaking", limit=3.0)  # to the step: it started within the last 20 ms
    h.wait(1.0)  # four words of the reply play
    barge_at = h.say(0.5)  # the caller barges in: paused after two frames, cut at 300 ms
    assert h.machine.report.barge_ins == 1
    h.until("listening", limit=3.0)  # the barge-in had no words
    h.wait(1.0)
    h.machine.hangup()
    (summary,) = h.ended
    assert h.clock.getDelayedCalls() == []

    d = h.recordings.finalize(h.recorder)
    path = d.result
    assert path == str(tmp_path / h.recorder.relpath)
    assert h.recorder.relpath.startswith("recordings" + os.sep) and h.recorder.relpath.endswith(os.sep + "call1.wav")
    assert sorted(os.listdir(os.path.dirname(path))) == ["call1.wav"], "temporary tracks are gone"
    params, left, right = read_wav(path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (2, 2, 16000)
    assert params.nframes == round(summary.duration * RATE), "as long as the call"

    # the greeting, from the start, on the agent's channel only
    assert onset(right, 0.0) < 0.01
    assert pitch(right, 0.05, 0.7) == pytest.approx(AGENT_HZ, abs=5)
    assert level(left, 0.0, greeting_end) == 0.0
    # the caller's turn on the left channel, where it was spoken
    assert onset(left, 0.0) == pytest.approx(spoke_at, abs=0.005)
    assert pitch(left, spoke_at + 0.05, spoke_at + 0.75) == pytest.approx(CALLER_HZ, abs=5)
    assert level(right, greeting_end + 0.15, reply_at - STEP - 0.005) == 0.0, "the agent was silent while it listened"
    # the reply where it played: from the moment it started, until the cut
    assert reply_at - STEP - 0.005 <= onset(right, greeting_end + 0.15) <= reply_at + 0.005
    assert pitch(right, reply_at + 0.05, barge_at) == pytest.approx(AGENT_HZ, abs=5)
    assert onset(left, spoke_at + 0.8) == pytest.approx(barge_at, abs=0.005)
    # paused two frames into the barge-in: what was sent plays out (the lead), then silence to the end
    cut = np.nonzero(np.abs(right) > 1000)[0][-1] / RATE
    assert barge_at + 0.02 <= cut <= barge_at + 0.04 + 0.1 + 0.02
    assert level(right, cut + 0.01, summary.duration) == 0.0
    assert level(left, barge_at + 0.505, summary.duration) == 0.0
    assert h.recordings.stop().called


def test_agent_audio_is_placed_by_the_playout_clock_not_by_when_it_was_sent(tmp_path):
    """The first frames of a reply leave at once (the lead) but play one after
    another: each lands where it plays, not where it was sent."""
    h = Harness(tmp_path)
    h.machine.start()
    sent_at_start = h.out.audio_bytes
    assert sent_at_start > FRAME_BYTES, "several frames sent at once"
    h.until("listening")
    h.machine.hangup()
    params, left, right = read_wav(h.recordings.finalize(h.recorder).result)
    greeting = make_agent().phrases.get("Hello there caller")
    expected = np.frombuffer(greeting, dtype="<i2").astype(np.float64)
    assert np.array_equal(right[:expected.size], expected), "contiguous, in order, from t=0"


def test_the_recorder_is_the_calls_icallrecorder(tmp_path):
    from zope.interface.verify import verifyObject

    from upvoot.call import ICallRecorder

    recs = recording.Recordings(str(tmp_path / "recordings"), str(tmp_path), 0, Clock(), threads.synchronous)
    rec = recs.recorder("f" * 32, started_wall=0.0)
    assert verifyObject(ICallRecorder, rec)
    assert rec.relpath == os.path.join("recordings", "1970-01-01", "f" * 32 + ".wav")


def test_caller_audio_that_arrives_late_leaves_a_gap_and_never_overlaps(tmp_path):
    track_dir = tmp_path / "r"
    rec = recording.CallRecorder("c", str(track_dir), "r/c.wav", threads.synchronous)
    one = speech(0.1)
    rec.caller(0.0, one)
    rec.caller(0.09, one)  # early by 10 ms (jitter): appended, not mixed in
    rec.caller(0.5, one)  # after a gap: silence in between
    rec.stop(1.0)
    _, left, right = read_wav(rec.finalize().result)
    assert left.size == RATE
    assert level(left, 0.0, 0.2) > 1000 and level(left, 0.2, 0.5) == 0.0 and level(left, 0.5, 0.6) > 1000
    assert level(left, 0.6, 1.0) == 0.0 and level(right, 0.0, 1.0) == 0.0


def test_a_long_call_is_streamed_to_disk_not_held_in_memory(tmp_path):
    rec = recording.CallRecorder("c", str(tmp_path), "c.wav", threads.synchronous)
    for i in range(500):  # 10 s
        rec.caller(i * 0.02, speech(0.02))
    pending = sum(len(data) for _, data in rec._caller._pending)
    assert pending < recording.FLUSH_BYTES
    assert os.path.getsize(tmp_path / ("c" + recording.CALLER_SUFFIX)) >= 9 * 32000


def test_a_recording_that_cannot_be_written_does_not_stop_the_call(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rec = recording.CallRecorder("c", str(blocker / "day"), "x/c.wav", threads.synchronous)
    errors = []
    from twisted.logger import globalLogPublisher

    observer = errors.append
    globalLogPublisher.addObserver(observer)
    try:
        for i in range(60):
            rec.caller(i * 0.02, speech(0.02))
        rec.stop(1.2)
        assert rec.finalize().result is None
    finally:
        globalLogPublisher.removeObserver(observer)
    failures = [e for e in errors if e.get("event") == "recording.failed"]
    assert len(failures) == 1, "logged once"
    assert "Not a directory" in failures[0]["error"]


# ---- retention and recovery ---------------------------------------------------------


def _file(path: Path, age_days: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF")
    os.utime(path, (now - age_days * 86400, now - age_days * 86400))
    return path


A, B, C, D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)  # call ids: 32 hex digits


def test_retention_deletes_old_recordings_only(tmp_path):
    now = time.time()
    root = tmp_path / "recordings"
    old = _file(root / "2020-01-01" / f"{A}.wav", 31, now)
    new = _file(root / "2020-02-01" / f"{B}.wav", 29, now)
    other = _file(root / "2020-01-01" / "notes.txt", 90, now)
    raw = _file(root / "2020-03-01" / (C + recording.CALLER_SUFFIX), 90, now)
    old_alone = _file(root / "2019-12-01" / f"{D}.wav", 60, now)
    assert recording.purge(str(root), 0, now) == [], "0 keeps everything"
    deleted = recording.purge(str(root), 30 * 86400, now)
    assert sorted(deleted) == sorted([str(old), str(old_alone)])
    assert new.exists() and other.exists() and raw.exists()
    assert not (root / "2019-12-01").exists(), "an emptied day directory goes"
    assert root.exists()
    assert recording.purge(str(tmp_path / "missing"), 86400, now) == []


def test_retention_runs_at_start_and_once_a_day(tmp_path):
    clock = Clock()
    root = tmp_path / "recordings"
    now = time.time()
    first = _file(root / "2020-01-01" / f"{A}.wav", 31, now)
    recs = recording.Recordings(str(root), str(tmp_path), 30 * 86400.0, clock, threads.synchronous)
    recs.start()
    assert not first.exists()
    second = _file(root / "2020-01-02" / f"{B}.wav", 31, now)
    clock.advance(86400 - 1)
    assert second.exists()
    clock.advance(1)
    assert not second.exists()
    recs.stop()
    assert clock.getDelayedCalls() == []


def test_tracks_left_by_a_dead_process_are_finished_at_start(tmp_path):
    clock = Clock()
    root = tmp_path / "recordings"
    day = root / "2024-05-01"
    day.mkdir(parents=True)
    (day / (A + recording.CALLER_SUFFIX)).write_bytes(speech(0.5))
    (day / (A + recording.AGENT_SUFFIX)).write_bytes(speech(0.2, 440.0))
    recs = recording.Recordings(str(root), str(tmp_path), 0, clock, threads.synchronous)
    recs.start()
    recs.stop()
    assert sorted(os.listdir(day)) == [f"{A}.wav"]
    params, left, right = read_wav(str(day / f"{A}.wav"))
    assert params.nchannels == 2 and params.nframes == RATE // 2
    assert level(right, 0.0, 0.2) > 1000 and level(right, 0.2, 0.5) == 0.0


def test_retention_deletes_only_what_upvoot_wrote(tmp_path):
    """Issue 9 item 11: pointed at any directory, the purge deleted every
    *.wav older than 30 days below it and every empty subdirectory."""
    now = time.time()
    root = tmp_path / "music"
    foreign = [
        _file(root / "song.wav", 400, now),  # not in a day directory
        _file(root / "albums" / "2020-01-01" / f"{A}.wav", 400, now),  # a day directory, but not ours
        _file(root / "2020-01-01" / "take1.wav", 400, now),  # not a call id
        _file(root / "2020-01-01" / f"{A.upper()}.wav", 400, now),
        _file(root / "2020-13-01" / f"{A}.wav", 400, now),  # not a date
    ]
    (root / "empty").mkdir()
    ours = _file(root / "2020-01-02" / f"{B}.wav", 400, now)
    assert recording.purge(str(root), 30 * 86400, now) == [str(ours)]
    assert all(path.exists() for path in foreign) and (root / "empty").is_dir()
    assert not (root / "2020-01-02").exists(), "our own day directory, emptied, goes"
    today = root / time.strftime("%Y-%m-%d", time.gmtime(now))
    today.mkdir()
    recording.purge(str(root), 3600, now)
    assert today.is_dir(), "a day a call may still write to stays, even empty"


@pytest.mark.parametrize("layout, named", [
    (["notes.txt"], "notes.txt"),
    (["2024-05-01/holiday.wav"], "holiday.wav"),
    (["photos/"], "photos"),
    (["2024-05-01/" + "e" * 32 + ".wav", "2024-05-01/x.txt"], "x.txt"),
])
def test_a_recordings_dir_with_foreign_files_is_refused_at_start(tmp_path, layout, named):
    root = tmp_path / "recordings"
    for entry in layout:
        path = root / entry
        if entry.endswith("/"):
            path.mkdir(parents=True)
        else:
            _file(path, 400, time.time())
    recs = recording.Recordings(str(root), str(tmp_path), 30 * 86400.0, Clock(), threads.synchronous,
                                option="etc/upvoot.ini: [upvoot] recordings_dir")
    with pytest.raises(recording.RecordingsDirError) as e:
        recs.start()
    message = str(e.value)
    assert "\n" not in message and named in message and message.startswith("etc/upvoot.ini: [upvoot] recordings_dir")
    assert all((root / entry.rstrip("/")).exists() for entry in layout), "nothing deleted"
    assert recs.stop().called


def test_state_dir_itself_is_refused_as_recordings_dir(tmp_path):
    recs = recording.Recordings(str(tmp_path / "."), str(tmp_path), 30 * 86400.0, Clock(), threads.synchronous)
    with pytest.raises(recording.RecordingsDirError, match=r"\[upvoot\] recordings_dir = .*state_dir itself"):
        recs.start()


def test_upvoots_own_files_and_a_missing_directory_are_accepted(tmp_path):
    root = tmp_path / "recordings"
    recording.check_directory(str(root), str(tmp_path))  # missing: made on the first recording
    day = root / "2024-05-01"
    for name in (f"{A}.wav", f"{B}.wav.tmp", B + recording.CALLER_SUFFIX, B + recording.AGENT_SUFFIX):
        _file(day / name, 1, time.time())
    recording.check_directory(str(root), str(tmp_path))


# ---- options ------------------------------------------------------------------------


def test_recording_options(tmp_path):
    ini = tmp_path / "etc" / "upvoot.ini"
    ini.parent.mkdir()
    ini.write_text("[upvoot]\nstate_dir = ../state\nrecordings_keep = 7d\n[agent:a]\nrecord = yes\n[agent:b]\n")
    cfg = load_config(str(ini))
    assert cfg.recordings_dir == str(tmp_path / "state" / "recordings")
    assert cfg.recordings_keep == 7 * 86400
    assert cfg.agents["a"].record is True and cfg.agents["b"].record is False
    ini.write_text("[upvoot]\nrecordings_keep = 0\n[agent:a]\n")
    assert load_config(str(ini)).recordings_keep == 0
    ini.write_text("[upvoot]\n[agent:a]\n")
    assert load_config(str(ini)).recordings_keep == 30 * 86400


# ---- the real daemon ----------------------------------------------------------------


@pytest.mark.slow
def test_a_recorded_call_on_the_daemon_has_its_wav_as_long_as_its_record(tmp_path):
    from tests.daemon import Caller, Daemon, shipped_ini

    agent = "\n[agent:rec]\nrecord = yes\ngreeting = Hello, this call is recorded.\nsilence_timeout = 30s\n"
    d = Daemon(tmp_path, shipped_ini() + agent).start()
    try:
        key = d.key(agent="rec", account="rec", points=10)
        c = Caller(d.url(f"/voice/{key}"))
        c.wait_json("audio_end", timeout=20)
        c.play(speech(1.0, CALLER_HZ))
        c.pause(1.0)
        c.close()
        record = d.call()
        rel = record["metadata"]["recording"]
        assert not os.path.isabs(rel) and rel.startswith("recordings" + os.sep)
        path = tmp_path / rel
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        params, left, right = read_wav(str(path))
        assert (params.nchannels, params.framerate) == (2, 16000)
        assert params.nframes / RATE == pytest.approx(record["duration"], abs=0.01)
        assert level(right, 0.0, 1.0) > 100, "the greeting on the agent's channel"
        spoke = onset(left, 0.0)
        assert pitch(left, spoke + 0.1, spoke + 0.9) == pytest.approx(CALLER_HZ, abs=5)
        assert not list(path.parent.glob("*.raw"))
    finally:
        d.stop()
