"""The real ``upvoot dial`` command against the real daemon: one ``twistd
upvoot`` per module (the shipped ini: Whisper, Piper, the demo agent), the
dialer run as a subprocess exactly as the README shows it. Slow: models load
and the call runs in real time."""

from __future__ import annotations

import json
import subprocess
import wave

import numpy as np
import pytest

from tests.daemon import BIN, Daemon, shipped_ini, synthesize
from upvoot.audio import write_wav

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("dial-daemon"), shipped_ini())
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "question.wav"
    write_wav(str(path), synthesize("What are your opening hours?"))
    return path


def dial(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "upvoot"), "dial", *args], capture_output=True, text=True, timeout=timeout)


def test_dial_a_call_with_a_question_and_record_the_agent(daemon, question_wav, tmp_path):
    key = daemon.key(account="dialer", points=10)
    record = tmp_path / "agent.wav"
    out = dial(daemon.url(f"/voice/{key}"), "--play", str(question_wav), "--play-after-greeting",
               "--record", str(record), "--json", "--max-seconds", "30")
    assert out.returncode == 0, out.stderr + out.stdout[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    msgs = [line["msg"] for line in lines if "msg" in line]
    summary = lines[-1]["summary"]
    where = f"messages: {msgs}"

    # the greeting: audio_start, audio_end, then what the agent said
    assert msgs[0] == {"type": "audio_start"}, where
    assert msgs[1] == {"type": "audio_end", "interrupted": False}, where
    assert msgs[2]["type"] == "transcript" and msgs[2]["role"] == "agent", where
    assert msgs[2]["text"].startswith("Hello! You have reached the UpVoot demo"), where
    # the question, heard and answered by the demo's hours rule
    caller = next(i for i, m in enumerate(msgs) if m["type"] == "transcript" and m["role"] == "caller")
    assert "opening hours" in msgs[caller]["text"].lower(), where
    assert all(m["type"] == "interim" for m in msgs[3:caller]), where
    assert msgs[caller + 1] == {"type": "turn_start"}, where
    reply = msgs[caller + 2:]
    assert reply[:2] == [{"type": "audio_start"}, {"type": "audio_end", "interrupted": False}], where
    assert reply[2]["type"] == "transcript" and reply[2]["role"] == "agent", where
    assert "nine" in reply[2]["text"] and "five" in reply[2]["text"], where

    assert summary["opened"] and summary["exit"] == 0 and summary["stray_frames"] == 0
    assert summary["bursts"] >= 2  # greeting and reply (then a silence prompt or closing line)

    # the recording: 16 kHz mono 16-bit, the call's length, holding the agent's audio
    with wave.open(str(record), "rb") as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (1, 16000, 2)
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    seconds = len(samples) / 16000
    call_seconds = lines[-1]["t"]
    assert summary["audio_seconds"] > 5.0
    assert seconds >= summary["audio_seconds"]
    assert seconds == pytest.approx(call_seconds, abs=0.5)
    # the gaps between bursts are digital silence; the agent's audio is (nearly) all non-zero
    voiced = np.count_nonzero(samples) / 16000
    assert 0.8 * summary["audio_seconds"] <= voiced <= summary["audio_seconds"] + 0.05

    # the daemon's call record agrees
    record_ = daemon.call()
    assert record_["key_prefix"] == key[:12] and record_["turns"] >= 1


def test_dial_with_a_bad_key_exits_3(daemon, tmp_path):
    out = dial(daemon.url("/voice/uvk_" + "x" * 32), "--max-seconds", "5", timeout=30)
    assert out.returncode == 3, out.stderr + out.stdout
    assert "refused: HTTP 401" in out.stderr
    revoked = daemon.key(account="dial-revoked")
    daemon.cli("keys", "revoke", revoked[:12])
    out = dial(daemon.url(f"/voice/{revoked}"), "--json", "--max-seconds", "5", timeout=30)
    assert out.returncode == 3 and "refused: HTTP 401" in out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["summary"]["refused"] == 401
    assert revoked not in daemon.log_text()
