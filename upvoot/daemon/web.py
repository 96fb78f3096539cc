"""The admin listener: health and metrics, on their own endpoint.

``[upvoot] admin_listen`` (loopback by default) serves:

GET /healthz
    200 ``ok`` (text/plain) when the public listeners are listening, the
    database answers a trivial query and the agents are ready. Otherwise
    503 with a short JSON object naming what is not ready, e.g.
    ``{"status": "unavailable", "not_ready": {"agents": "starting"}}`` or
    ``{"database": "unreachable"}`` (then new calls get 503 too, until the
    database answers again: the pool reconnects by itself).
    The listener stays open while the daemon drains, so a load balancer
    sees ``{"service": "draining"}`` until the last call has ended.
GET /metrics
    The service's Prometheus registry in the text exposition format.
/console/
    The browser console (``upvoot.console``), when ``[upvoot] console``
    is on: its own resource tree, behind the operator token.

Both are small resources over the service and testable in memory
(``treq.testing.StubTreq``); nothing here uses the global reactor or the
global registry. Requests are not written to the log: a scraper asks every
few seconds.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site


def _ping(txn: Any) -> None:
    txn.execute("SELECT 1")
    txn.fetchall()


class HealthResource(Resource):
    """``/healthz``: 200 ``ok`` or 503 with what is not ready."""

    isLeaf = True
    _log = Logger()

    def __init__(self, service: Any, listening: Callable[[], bool], clock: Any = None, timeout: float = 2.0) -> None:
        """``service``: has ``ready``, ``draining`` and ``store.run``;
        ``listening()``: whether every public listener is listening;
        ``timeout``: how long the database may take to answer."""
        super().__init__()
        self.service = service
        self.listening = listening
        self.clock = clock if clock is not None else service.clock
        self.timeout = timeout

    def render_GET(self, request: Request) -> Any:
        problems: dict[str, str] = {}
        if self.service.draining:
            problems["service"] = "draining"
        elif not self.service.ready:
            problems["agents"] = "starting"
        if not self.listening():
            problems["listeners"] = "not listening"
        d = defer.maybeDeferred(self.service.store.run, _ping)
        d.addTimeout(self.timeout, self.clock)

        def db_failed(f: Any) -> None:
            problems["database"] = "timed out" if f.check(defer.TimeoutError) else "unreachable"
            if not f.check(defer.TimeoutError, defer.CancelledError) and not self.service.draining:
                self._log.warn("Health check: database query failed: {error}", event="health.database_failed",
                               error=f.getErrorMessage())

        def respond(_: object) -> None:
            if finished.called:
                return  # the client went away
            if problems:
                request.setResponseCode(503)
                request.setHeader(b"content-type", b"application/json")
                request.write(json.dumps({"status": "unavailable", "not_ready": problems}).encode() + b"\n")
            else:
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.write(b"ok\n")
            request.finish()

        finished = request.notifyFinish()
        finished.addErrback(lambda _: d.cancel())
        d.addCallbacks(lambda _: None, db_failed)
        d.addCallback(respond)
        d.addErrback(lambda f: self._log.failure("Health check failed", f, event="health.error"))
        return NOT_DONE_YET


class MetricsResource(Resource):
    """``/metrics``: ``generate_latest(registry)``, synchronously."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


def admin_resource(service: Any, listening: Callable[[], bool], console: Resource | None = None) -> Resource:
    """The admin tree: ``/healthz`` and ``/metrics`` over ``service``
    (an ``UpVootService``, or anything with the same attributes), and
    ``console`` (``upvoot.console.resources.console_resource``) at ``/console``."""
    root = Resource()
    root.putChild(b"healthz", HealthResource(service, listening))
    root.putChild(b"metrics", MetricsResource(service.metrics.registry))
    if console is not None:
        root.putChild(b"console", console)
    return root


class AdminSite(Site):
    """A ``Site`` that keeps scrapes and health probes out of the log."""

    def log(self, request: Request) -> None:
        pass


def admin_site(service: Any, listening: Callable[[], bool], console: Resource | None = None) -> AdminSite:
    return AdminSite(admin_resource(service, listening, console))
