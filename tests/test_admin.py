"""The admin listener (/healthz, /metrics), the metrics hooks, JSON logs.

In memory: the real resources (``upvoot.daemon.web``) over ``treq.testing.StubTreq``
and a real ``UpVootService`` (``tap.build_service``) whose database is a fake
and whose clock is a ``Clock``. Over real ports (slow): the real daemon with ``admin_listen`` on
a free loopback port.
"""

from __future__ import annotations

import io
import os
import tempfile
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from tests.daemon import BIN, Caller, Daemon, free_port, shipped_ini
from upvoot.config import load_config
from upvoot.logs import JSONLineObserver, json_observer
from upvoot.daemon.metrics import STAGES, Metrics
from upvoot.call.playout import Playback
from upvoot.call.outcome import CallOutcome, EndReason
from upvoot.daemon.seams import Admission
from upvoot.framing.base import CallStarted
from upvoot.ledger import store
from upvoot.ledger.store import StoreError
from upvoot.ledger.threads import synchronous
from upvoot.daemon.tap import Options, build_service
from upvoot.testing import make_agent
from tests.test_service import FakeCalls, FakeProcess
from upvoot.daemon.web import admin_resource

ADMIN = "http://admin.invalid"


# ---- fakes ------------------------------------------------------------------------


class FakeStore:
    """The database as the service and /healthz use it, answering at once
    from an in-memory SQLite (``mode`` "ok"), failing ("error") or never
    answering ("hang")."""

    def __init__(self) -> None:
        self.mode = "ok"
        # a real, empty ledger (the schema the daemon's transactions need)
        self.conn = store.connect(os.path.join(tempfile.mkdtemp(prefix="upvoot-admin-"), "upvoot.sqlite3"))
        self.settled: list = []

    def run(self, fn, *args, **kw) -> defer.Deferred:
        if self.mode == "error":
            return defer.fail(StoreError("database is locked"))
        if self.mode == "hang":
            return defer.Deferred()
        return defer.succeed(fn(self.conn.cursor(), *args, **kw))

    def open_call(self, start) -> defer.Deferred:
        return defer.succeed(None)

    def heartbeat(self, call_id, now) -> defer.Deferred:
        return defer.succeed(True)

    def settle_call(self, record) -> defer.Deferred:
        self.settled.append(record)
        return defer.succeed(record.points_charged)


@pytest.fixture
def service(tmp_path):
    """A real UpVootService, not started: its database is a FakeStore and
    its clock a Clock, so nothing runs on the reactor."""
    ini = tmp_path / "upvoot.ini"
    ini.write_text("[upvoot]\n[agent:demo]\n")
    return build_service(load_config(str(ini)), Clock(), store=FakeStore(), run_in_thread=synchronous,
                         process=FakeProcess())


class Admin:
    """The admin resource tree in memory."""

    def __init__(self, service) -> None:
        self.listening = True
        self.stub = StubTreq(admin_resource(service, listening=lambda: self.listening))

    def get(self, path: str):
        """(status, headers, body text) of GET ``path``."""
        d = self.stub.get(ADMIN + path)
        self.stub.flush()
        response = _result(d)
        body = _result(response.text())
        return response.code, response.headers, body

    def metrics(self) -> dict:
        """{(sample name, frozenset of labels): value} from GET /metrics."""
        code, _, text = self.get("/metrics")
        assert code == 200
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def _result(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# ---- /healthz ---------------------------------------------------------------------


def test_healthz_is_503_while_starting(service):
    code, headers, body = Admin(service).get("/healthz")
    assert code == 503
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(body) == {"status": "unavailable", "not_ready": {"agents": "starting"}}


def test_healthz_is_ok_when_ready_listening_and_the_database_answers(service):
    service.ready = True
    code, headers, body = Admin(service).get("/healthz")
    assert (code, body) == (200, "ok\n")
    assert headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]


def test_healthz_is_503_while_draining(service):
    service.ready = True
    service.draining = True
    code, _, body = Admin(service).get("/healthz")
    assert code == 503
    assert json.loads(body)["not_ready"] == {"service": "draining"}


def test_healthz_names_listeners_that_are_not_listening(service):
    service.ready = True
    admin = Admin(service)
    admin.listening = False
    code, _, body = admin.get("/healthz")
    assert code == 503
    assert json.loads(body)["not_ready"] == {"listeners": "not listening"}


def test_healthz_names_a_failing_database(service):
    service.ready = True
    service.store.mode = "error"
    code, _, body = Admin(service).get("/healthz")
    assert code == 503
    assert json.loads(body)["not_ready"] == {"database": "unreachable"}


def test_healthz_times_out_a_database_that_does_not_answer(service):
    service.ready = True
    service.store.mode = "hang"
    admin = Admin(service)
    d = admin.stub.get(ADMIN + "/healthz")
    admin.stub.flush()
    got = []
    d.addBoth(lambda r: got.append(r) or r)
    assert got == []  # waiting for the database
    service.clock.advance(2.0)
    admin.stub.flush()
    response = _result(d)
    assert response.code == 503
    assert json.loads(_result(response.text()))["not_ready"] == {"database": "timed out"}
    assert service.clock.getDelayedCalls() == []


def test_healthz_answers_head_too(service):
    service.ready = True
    admin = Admin(service)
    d = admin.stub.head(ADMIN + "/healthz")
    admin.stub.flush()
    assert _result(d).code == 200


# ---- /metrics ---------------------------------------------------------------------


class Calls:
    """Calls through the service's seam (``start_call``), on fake handles."""

    def __init__(self, service) -> None:
        self.service = service
        self.fake = FakeCalls(wall=lambda: 1000.0)
        service._new_call = self.fake.new_call
        service.agents = SimpleNamespace(agents={"demo": make_agent(service.config.agents["demo"])})

    def start(self, provider: str = "raw"):
        admission = Admission(key_prefix="uvk_AbCdEfGh", account="acme", agent="demo", provider=provider,
                              params={}, peer="tcp4:127.0.0.1:5555", release=lambda: None)
        out = []
        self.service.start_call(admission, CallStarted(provider=provider), SimpleNamespace(),
                                lambda: None).addCallback(out.append)
        return out[0]


def outcome(call_id: str = "c1", **overrides) -> CallOutcome:
    """A call's outcome; 65 s of an agent billed per started minute: 2 points."""
    fields = dict(call_id=call_id, agent="demo", started_at=1000.0, ended_at=1065.0, duration=65.0,
                  end_reason=EndReason.HANGUP, turns=2, barge_ins=0, barge_ins_resumed=0, engine_failures=0,
                  latencies=(), transcript=())
    fields.update(overrides)
    return CallOutcome(**fields)


def test_metrics_is_the_prometheus_text_format_of_the_service_registry(service):
    code, headers, body = Admin(service).get("/metrics")
    assert code == 200
    assert headers.getRawHeaders("content-type") == [CONTENT_TYPE_LATEST]
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {
        "upvoot_calls_active", "upvoot_calls", "upvoot_calls_started", "upvoot_auth_failures",
        "upvoot_handshake_refusals", "upvoot_frames_in", "upvoot_frames_out", "upvoot_pacing_lateness_seconds",
        "upvoot_reactor_lag_seconds", "upvoot_stage_latency_seconds", "upvoot_engine_errors",
        "upvoot_worker_queue_length", "upvoot_points_charged",
    } <= names
    # the service's own registry: nothing from the process-wide default one
    # (its python_gc/python_info collectors); process_* is the service's own
    # ProcessCollector (tests/test_floods.py)
    assert not any(n.startswith("python_") for n in names)


def test_two_services_do_not_share_counters(service, tmp_path):
    other = Metrics()
    other.refused(503)
    assert value(Admin(service).metrics(), "upvoot_handshake_refusals_total", status="503") == 0


def test_call_metrics_follow_the_service_hooks(service):
    admin = Admin(service)
    calls = Calls(service)
    call = calls.start()
    m = admin.metrics()
    assert value(m, "upvoot_calls_active") == 1
    assert value(m, "upvoot_calls_started_total", provider="raw") == 1
    assert value(m, "upvoot_calls_total", end_reason="hangup", provider="raw") == 0

    latencies = [
        {"end_of_turn": 0.2, "turn_model": 0.4, "transcription": 0.2, "brain_first_token": 0.01, "first_audio": 0.15,
         "voice_to_voice": 0.96},
        {"end_of_turn": 0.2, "turn_model": 0.4, "transcription": 0.3, "brain_first_token": 0.02, "first_audio": 0.2,
         "voice_to_voice": 1.12},
    ]
    call.on_ended(outcome(call.call_id, latencies=tuple(latencies), engine_failures=1))  # 2 points
    m = admin.metrics()
    assert value(m, "upvoot_calls_active") == 0
    assert value(m, "upvoot_calls_total", end_reason="hangup", provider="raw") == 1
    for stage in STAGES:
        assert value(m, "upvoot_stage_latency_seconds_count", stage=stage) == 2
    assert value(m, "upvoot_stage_latency_seconds_sum", stage="voice_to_voice") == pytest.approx(2.08)
    assert value(m, "upvoot_stage_latency_seconds_bucket", stage="voice_to_voice", le="1.0") == 1
    assert value(m, "upvoot_engine_errors_total", engine="unknown") == 1
    assert value(m, "upvoot_points_charged_total") == 2  # what the store settled

    call = calls.start(provider="twilio")
    call.on_ended(outcome(call.call_id, end_reason=EndReason.MAX_TURNS, duration=0.0, ended_at=1000.0))  # 0 points
    m = admin.metrics()
    assert value(m, "upvoot_calls_total", end_reason="max_turns", provider="twilio") == 1
    assert value(m, "upvoot_calls_total", end_reason="hangup", provider="raw") == 1
    assert value(m, "upvoot_points_charged_total") == 2


def test_engine_errors_per_engine_when_the_summary_names_them():
    metrics = Metrics()
    metrics.call_ended(outcome(engine_failures={"stt": 2, "tts": 0, "brain": 1}), "raw")
    get = metrics.registry.get_sample_value
    assert get("upvoot_engine_errors_total", {"engine": "stt"}) == 2
    assert get("upvoot_engine_errors_total", {"engine": "brain"}) == 1
    assert get("upvoot_engine_errors_total", {"engine": "tts"}) is None


def test_refusals_by_status(service):
    admin = Admin(service)
    for status in (503, 503, 401, 402, 404):
        service.note_refusal(status)
    m = admin.metrics()
    assert value(m, "upvoot_handshake_refusals_total", status="503") == 2
    assert value(m, "upvoot_handshake_refusals_total", status="401") == 1
    assert value(m, "upvoot_handshake_refusals_total", status="402") == 1
    assert value(m, "upvoot_handshake_refusals_total", status="404") == 1


def test_reactor_lag_and_pacing_lateness_are_observed(service):
    admin = Admin(service)
    clock = service.clock
    service.lag.start()
    clock.advance(0.05)
    clock.advance(0.08)  # this tick runs 30 ms late
    service.lag.stop()

    playback = Playback(SimpleNamespace(audio=lambda pcm: None), lead=0.1, on_played=lambda: None)
    playback.add(b"\0" * 32000)
    service.pacer.add(playback)
    clock.advance(0.025)  # 5 ms late
    playback.stop()
    assert clock.getDelayedCalls() == []

    m = admin.metrics()
    assert value(m, "upvoot_reactor_lag_seconds_count") == 2
    assert value(m, "upvoot_reactor_lag_seconds_sum") == pytest.approx(0.03)
    assert value(m, "upvoot_pacing_lateness_seconds_count") == 1
    assert value(m, "upvoot_pacing_lateness_seconds_sum") == pytest.approx(0.005)


def test_worker_queue_length_is_read_at_scrape_time(service):
    admin = Admin(service)
    assert value(admin.metrics(), "upvoot_worker_queue_length") == 0
    service.pool = SimpleNamespace(queued=3, saturated=lambda: False)
    assert value(admin.metrics(), "upvoot_worker_queue_length") == 3


# ---- configuration -------------------------------------------------------------------


def test_admin_listen_defaults_to_loopback(service):
    assert service.config.admin_listen == "tcp:8081:interface=127.0.0.1"


def test_bad_admin_listen_endpoint_is_a_usage_error(tmp_path):
    ini = tmp_path / "upvoot.ini"
    ini.write_text("[upvoot]\nadmin_listen = nosuchtype:1234\n[agent:demo]\n")
    with pytest.raises(usage.UsageError) as e:
        Options().parseOptions(["--config", str(ini)])
    assert str(e.value).startswith(f"{ini}: [upvoot] admin_listen: bad endpoint 'nosuchtype:1234'")


# ---- JSON logs ----------------------------------------------------------------------


def emit_json(emit) -> list[dict]:
    out = io.StringIO()
    emit(Logger(namespace="upvoot.test", observer=JSONLineObserver(out)))
    lines = out.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_json_log_line_has_the_stable_fields():
    [line] = emit_json(lambda log: log.info("Call ended: {reason} after {duration}s", event="call.ended",
                                            call_id="abc123", reason="hangup", duration=12.5))
    assert line["level"] == "info"
    assert line["namespace"] == "upvoot.test"
    assert line["event"] == "call.ended"
    assert line["call_id"] == "abc123"
    assert line["message"] == "Call ended: hangup after 12.5s"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])
    assert line["data"] == {"reason": "hangup", "duration": 12.5}


def test_json_log_without_event_name_or_call_and_with_odd_values():
    [line] = emit_json(lambda log: log.warn("odd {thing}", thing=object()))
    assert line["event"] is None and line["level"] == "warn"
    assert "call_id" not in line and "data" not in line  # non-JSON values stay in the message only
    assert line["message"].startswith("odd <object object")


def test_json_log_carries_the_traceback_of_a_failure():
    def emit(log):
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("Engine {engine} crashed", event="call.engine_failed", engine="stt")

    [line] = emit_json(emit)
    assert line["level"] == "critical"
    assert line["event"] == "call.engine_failed"
    assert line["message"] == "Engine stt crashed"
    assert "ZeroDivisionError" in line["traceback"]


def test_json_observer_is_a_twistd_logger_factory_writing_to_stdout(capsys):
    observer = json_observer()
    assert ILogObserver.providedBy(observer)
    Logger(namespace="upvoot.x", observer=observer).info("hello", event="x.hello")
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert json.loads(out)["event"] == "x.hello"


# ---- the real daemon -----------------------------------------------------------------


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
def test_admin_listener_of_the_real_daemon(tmp_path):
    admin_port = free_port()
    # drain_time 0: on SIGTERM the running call hears its goodbye at once
    d = Daemon(tmp_path / "d", shipped_ini(admin_listen=f"tcp:{admin_port}:interface=127.0.0.1", drain_time="0"))
    d.start()
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        assert http_get(admin + "/healthz") == (200, "ok\n")
        key = d.key()
        c = Caller(d.url(f"/voice/{key}"))
        c.wait_json("audio_start", timeout=15)
        c.close()
        assert d.call()["end_reason"] == "hangup"
        code, text = http_get(admin + "/metrics")
        assert code == 200
        assert re.search(r'^upvoot_calls_total\{end_reason="hangup",provider="\w+"\} 1\.0$', text, re.M), text
        assert re.search(r"^upvoot_frames_out_total [1-9]", text, re.M), text
        assert re.search(r"^upvoot_calls_active 0\.0$", text, re.M), text

        # while a call drains, the admin listener stays up and says so
        c = Caller(d.url(f"/voice/{key}"))
        c.wait_json("audio_start", timeout=15)
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        seen = []
        while time.monotonic() < deadline:
            try:
                seen.append(http_get(admin + "/healthz"))
            except OSError:
                break
            if seen[-1][0] == 503:
                break
            time.sleep(0.05)
        assert seen and seen[-1][0] == 503, seen
        assert json.loads(seen[-1][1])["not_ready"]["service"] == "draining"
        c.wait_closed(30)
    finally:
        assert d.stop() in (0, -signal.SIGTERM), d.log_text()[-3000:]


@pytest.mark.slow
def test_twistd_with_the_json_logger_writes_json_lines(tmp_path):
    """The systemd unit's command line: JSON lines on stdout."""
    ini = tmp_path / "upvoot.ini"
    ini.write_text(shipped_ini(listen=f"tcp:{free_port()}:interface=127.0.0.1",
                               admin_listen=f"tcp:{free_port()}:interface=127.0.0.1"))
    proc = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "--logger=upvoot.logs.json_observer", "upvoot", "--config", str(ini)],
        cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    try:
        for raw in proc.stdout:
            lines.append(json.loads(raw))  # every line is one JSON object
            if lines[-1]["event"] == "upvoot.ready":
                break
        assert lines and lines[-1]["event"] == "upvoot.ready", lines
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines += [json.loads(raw) for raw in rest.splitlines()]
    assert all({"time", "level", "namespace", "event", "message"} <= set(line) for line in lines)
    assert any(line["namespace"] == "upvoot.daemon.service.UpVootService" for line in lines), lines
    assert not any(line["level"] in ("error", "critical") for line in lines), lines
    assert proc.returncode in (0, -signal.SIGTERM), err
