"""The daemon's Prometheus metrics: one registry the service owns.

Why not the global ``prometheus_client.REGISTRY``: a registry per service
keeps tests independent (two services in one process do not share
counters) and holds only what is asked for. The service asks for
prometheus_client's ``ProcessCollector`` on it (``process=True``):
``process_resident_memory_bytes``, ``process_open_fds``,
``process_cpu_seconds_total``... read from /proc at scrape time; with
``upvoot_reactor_delayed_calls`` these are the leak-hunting figures
(``bench/soak.py`` watches them). ``upvoot.daemon.web`` serves it with
``generate_latest(registry)``.

Every name starts with ``upvoot_``. The service and the WebSocket adapter
call the hooks below at the point where a thing happens; nothing here
touches the reactor, so collecting is synchronous and cheap.

| metric | type | labels |
|---|---|---|
| upvoot_calls_active | gauge | |
| upvoot_calls_started_total | counter | provider |
| upvoot_calls_total | counter (calls ended) | end_reason, provider |
| upvoot_auth_failures_total | counter | |
| upvoot_handshake_refusals_total | counter | status |
| upvoot_frames_in_total, upvoot_frames_out_total | counter | |
| upvoot_bad_messages_total | counter | |
| upvoot_pacing_lateness_seconds | histogram | |
| upvoot_reactor_lag_seconds | histogram | |
| upvoot_stage_latency_seconds | histogram | stage (end_of_turn, turn_model, transcription, brain_first_token, first_audio, voice_to_voice) |
| upvoot_engine_errors_total | counter | engine |
| upvoot_worker_queue_length | gauge | |
| upvoot_points_charged_total | counter | |
| upvoot_reactor_delayed_calls | gauge (timers pending on the reactor) | |
| process_* (``process=True``) | ProcessCollector | |
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from upvoot.call.outcome import LATENCY_KEYS, EndReason, read_latency

#: The stage label values of upvoot_stage_latency_seconds: a turn's split
#: (``upvoot.call.outcome.split``) and its sum, voice_to_voice.
STAGES = LATENCY_KEYS

# timer lateness: a healthy reactor is well under 5 ms; lag_budget defaults to 150 ms
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# a turn's stages: milliseconds (a cached reply's first audio) to seconds (voice to
# voice), finer around the targets (voice to voice p50 0.5 s, p95 0.8 s)
_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    """The metric objects, and one hook per thing that happens.

    ``calls_active``, ``worker_queue`` and ``delayed_calls`` are read when
    the registry is collected (a scrape), so they are never stale.
    ``process``: register prometheus_client's ``ProcessCollector`` (this
    process's memory, open fds, CPU) on this registry too.
    """

    def __init__(
        self,
        calls_active: Callable[[], float] = lambda: 0,
        worker_queue: Callable[[], float] = lambda: 0,
        registry: CollectorRegistry | None = None,
        delayed_calls: Callable[[], float] = lambda: 0,
        process: bool = False,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.calls_active = Gauge("upvoot_calls_active", "Calls in progress.", registry=r)
        self.calls_active.set_function(calls_active)
        self.calls_started = Counter("upvoot_calls_started_total", "Calls started (WebSocket opened), by provider framing.",
                                     ["provider"], registry=r)
        self.calls = Counter("upvoot_calls_total", "Calls ended, by end reason and provider framing.",
                             ["end_reason", "provider"], registry=r)
        self.auth_failures = Counter("upvoot_auth_failures_total",
                                     "Upgrades refused for a missing, unknown or revoked API key (HTTP 401).", registry=r)
        self.handshake_refusals = Counter("upvoot_handshake_refusals_total",
                                          "WebSocket upgrades refused, by HTTP status.", ["status"], registry=r)
        self.frames_in = Counter("upvoot_frames_in_total", "WebSocket messages received from providers.", registry=r)
        self.frames_out = Counter("upvoot_frames_out_total", "WebSocket messages sent to providers.", registry=r)
        self.bad_messages = Counter("upvoot_bad_messages_total",
                                    "Client messages that could not be understood (answered with an error).", registry=r)
        self.pacing_lateness = Histogram("upvoot_pacing_lateness_seconds",
                                         "How late the shared 20 ms audio pacing tick ran.", buckets=_LAG_BUCKETS, registry=r)
        self.reactor_lag = Histogram("upvoot_reactor_lag_seconds",
                                     "How late the reactor ran the lag monitor's 50 ms timer.", buckets=_LAG_BUCKETS,
                                     registry=r)
        self.stage_latency = Histogram("upvoot_stage_latency_seconds",
                                       "Per-turn latency by stage: end_of_turn, turn_model, transcription, brain_first_token,"
                                       " first_audio, and their sum voice_to_voice (end of caller speech to agent audio).",
                                       ["stage"], buckets=_STAGE_BUCKETS, registry=r)
        self.engine_errors = Counter("upvoot_engine_errors_total", "Engine failures that cost a turn, by engine.",
                                     ["engine"], registry=r)
        self.worker_queue = Gauge("upvoot_worker_queue_length", "Model jobs waiting for a worker thread.", registry=r)
        self.worker_queue.set_function(worker_queue)
        self.points_charged = Counter("upvoot_points_charged_total", "Points deducted from accounts for calls.",
                                      registry=r)
        self.delayed_calls = Gauge("upvoot_reactor_delayed_calls",
                                   "Timers pending on the reactor (len(reactor.getDelayedCalls())); a count that"
                                   " grows while the calls do not is a timer leak.", registry=r)
        self.delayed_calls.set_function(delayed_calls)
        if process:
            # its registry argument defaults to the global REGISTRY: always pass ours
            ProcessCollector(registry=r)

    # ---------------------------------------------------------------- hooks
    def refused(self, status: int) -> None:
        self.handshake_refusals.labels(status=str(status)).inc()

    def call_started(self, provider: str) -> None:
        self.calls_started.labels(provider=provider).inc()

    def call_ended(self, outcome: Any, provider: str) -> None:
        """Count a call from its ``upvoot.call.outcome.CallOutcome`` and
        the provider framing it came through."""
        reason = EndReason(outcome.end_reason).value
        self.calls.labels(end_reason=reason, provider=provider).inc()
        for turn in outcome.latencies or ():
            for stage, seconds in read_latency(turn).items():
                if stage in STAGES and seconds is not None:
                    self.stage_latency.labels(stage=stage).observe(seconds)
        failures = outcome.engine_failures or 0
        # the call reports a count today; a mapping {engine: n} is counted
        # per engine should it report one
        by_engine = failures if isinstance(failures, Mapping) else {"unknown": failures}
        for engine, n in by_engine.items():
            if n:
                self.engine_errors.labels(engine=engine).inc(n)

    def points(self, charged: int) -> None:
        if charged > 0:
            self.points_charged.inc(charged)
