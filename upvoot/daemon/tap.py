"""``twistd upvoot``: command-line options and the one composition root.

``makeService`` takes the reactor (twistd's global one, or a test's) and
``build_service`` builds every collaborator of the service on it: the store,
the worker pool, the metrics, the pacer, the lag monitor, the abuse guard,
the agents, the recordings, the spool and its spooler. Nothing else takes
the reactor. ``ReactorProcess`` is what the service may do to the process.

Configuration errors raise ``usage.UsageError`` from ``postOptions``, so
twistd prints one line naming file, section and option and exits 1 before
it daemonizes. A start that fails later (a port that cannot be listened on,
engines that cannot load) logs one line and exits 1 too (``ReactorProcess.fail``,
``service.StartFailed``), never 0: a supervisor must see it.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time
from typing import Any, Callable

from twisted.logger import Logger
from twisted.python import usage

from upvoot._env import set_offline_environment

set_offline_environment()  # before any engine module can import onnxruntime

from upvoot.config import Config, ConfigError, load_config  # noqa: E402


class Options(usage.Options):
    synopsis = "--config FILE [--listen ENDPOINT ...]"
    longdesc = (
        "Run the UpVoot voice-agent bridge. --listen (repeatable) replaces the "
        "ini file's [upvoot] listen endpoints, e.g. --listen tcp:8080:interface=127.0.0.1"
    )
    optParameters = [["config", "c", None, "the ini file (see etc/upvoot.ini)"]]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """A Twisted endpoint string to listen on (repeatable)."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self.endpoints = self["listen"] or list(self.config.listen)
        from twisted.application import strports

        from upvoot.ledger.recording_files import RecordingsDirError, check_directory
        from upvoot.values import check_endpoint_port

        for description in self.endpoints:
            try:
                check_endpoint_port(description)  # --listen skips the ini's own check
                strports.service(description, None)
            except Exception as e:  # bad endpoint syntax, port or plugin name
                where = "--listen" if self["listen"] else f"{self.config.path}: [upvoot] listen"
                raise usage.UsageError(f"{where}: bad endpoint {description!r}: {e}") from None
        if self.config.admin_listen:
            try:
                strports.service(self.config.admin_listen, None)
            except Exception as e:
                raise usage.UsageError(f"{self.config.path}: [upvoot] admin_listen: bad endpoint "
                                       f"{self.config.admin_listen!r}: {e}") from None
            from upvoot.console.auth import ConsoleSetupError, check_console

            try:  # no console a stranger can reach with a token nobody chose to keep
                check_console(self.config)
            except ConsoleSetupError as e:
                raise usage.UsageError(str(e)) from None
        try:  # before daemonizing: a directory of foreign files is refused, never purged
            check_directory(self.config.recordings_dir, self.config.state_dir,
                            f"{self.config.path}: [upvoot] recordings_dir")
        except RecordingsDirError as e:
            raise usage.UsageError(str(e)) from None


class ReactorProcess:
    """What the service needs of the process, and nothing else of the reactor:
    SIGHUP, stopping on a failed start with a non-zero exit status, and a
    clean exit after a drain."""

    _log = Logger()
    FAILED = 1  # the exit status of a start that failed after daemonizing

    def __init__(self, reactor: Any, at_exit: Callable[..., Any] = atexit.register) -> None:
        self._reactor = reactor
        self._at_exit = at_exit
        self.failed: str | None = None

    def on_sighup(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the reactor when SIGHUP arrives."""

        def on_hup(signum, frame):
            self._reactor.callFromThread(fn)

        try:
            signal.signal(signal.SIGHUP, on_hup)
        except ValueError:  # not the main thread (tests)
            pass

    def fail(self, message: str) -> None:
        """The daemon cannot run: log ``message`` (one line), stop the reactor,
        and make the process exit with status 1 once twistd has cleaned up
        (pid file, log), so a supervisor sees the failure and restarts it.
        twistd itself would exit 0 after ``reactor.stop()``."""
        if self.failed is not None:
            return
        self.failed = message
        self._log.critical("{message}; stopping", event="upvoot.start_failed", message=message)
        self._at_exit(_exit_now, self.FAILED)
        if self._reactor.running:
            self._reactor.stop()

    def drained(self) -> None:
        """A drain that wrote every record is a clean exit: twistd would
        otherwise re-raise SIGTERM and exit with its status."""
        if hasattr(self._reactor, "_exitSignal"):
            self._reactor._exitSignal = None


def _exit_now(status: int) -> None:
    """The last exit handler: keep ``status`` whatever twistd returns."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def _one_line_start_failures() -> None:
    """A ``StartFailed`` escaping twistd (a listener that cannot bind) is
    printed as its one line, not as a traceback; twistd still exits 1."""
    from upvoot.daemon.service import StartFailed

    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, StartFailed):
            sys.stderr.write(f"upvoot: {value}\n")
        else:
            previous(kind, value, tb)

    sys.excepthook = hook


def build_service(config: Config, reactor: Any, **given: Any):
    """The one composition root: every collaborator of the service, built on
    ``reactor``. ``given`` replaces collaborators by name (tests: a fake
    store, a synchronous ``run_in_thread``, a fake ``new_call``...)."""
    from upvoot import call
    from upvoot.call import playout
    from upvoot.daemon.admission import AbuseGuard
    from upvoot.daemon.agents import AgentRegistry
    from upvoot.daemon.lag import LagMonitor
    from upvoot.daemon.metrics import Metrics
    from upvoot.daemon.service import UpVootService
    from upvoot.daemon.workers import WorkerPool
    from upvoot.engines.interfaces import EngineContext
    from upvoot.ledger import recordings, spool as spoolmod, store as storemod
    from upvoot.ledger.ledger import Ledger
    from upvoot.ledger.threads import reactor_threads

    unknown = set(given) - _COLLABORATORS
    if unknown:
        raise TypeError(f"build_service: no collaborator named {', '.join(sorted(unknown))}")
    svc: Any = None  # the metrics read the service's live state at scrape time

    def have(name: str, make: Callable[[], Any]) -> Any:
        return given[name] if name in given else make()

    # blocking file work (recordings, the spool, loading models) runs on the reactor's threads
    run_in_thread = have("run_in_thread", lambda: reactor_threads(reactor))
    pool = have("pool", lambda: WorkerPool(reactor, size=config.workers, queue_limit=config.worker_queue))
    metrics = have("metrics", lambda: Metrics(
        calls_active=lambda: len(svc.calls), worker_queue=lambda: svc.pool.queued,
        delayed_calls=lambda: len(reactor.getDelayedCalls()), process=True))
    spool = have("spool", lambda: spoolmod.Spool(os.path.join(config.state_dir, "spool.jsonl")))
    store = have("store", lambda: storemod.Store(config.database, reactor, config.database_password_file,
                                                 config.database_pool))
    spooler = have("spooler", lambda: spoolmod.Spooler(
        spool, lambda: spoolmod.settle_spooled(spool, config.database, config.database_password_file), reactor,
        run_in_thread,
        on_applied=lambda record, charged: metrics.points(charged)))
    svc = UpVootService(
        config, reactor,
        process=have("process", lambda: ReactorProcess(reactor)),
        store=store,
        pool=pool,
        metrics=metrics,
        pacer=have("pacer", lambda: playout.Pacer(reactor, on_lag=metrics.pacing_lateness.observe)),
        lag=have("lag", lambda: LagMonitor(reactor, on_lag=metrics.reactor_lag.observe)),
        guard=have("guard", lambda: AbuseGuard(reactor, config.auth_failure_limit, config.auth_failure_window,
                                               config.max_calls_per_account, config.max_calls_per_address)),
        agents=have("agents", lambda: AgentRegistry(config.agents, EngineContext(pool=pool, clock=reactor),
                                                    run_in_thread)),
        recordings=have("recordings", lambda: recordings.Recordings(
            config.recordings_dir, config.state_dir, config.recordings_keep, reactor, run_in_thread,
            option=f"{config.path}: [upvoot] recordings_dir")),
        spool=spool,
        spooler=spooler,
        ledger=have("ledger", lambda: Ledger(store, spooler)),
        new_call=have("new_call", lambda: call.new_call),
        wall=have("wall", lambda: time.time),
    )
    return svc


_COLLABORATORS = {"run_in_thread", "store", "pool", "metrics", "pacer", "lag", "guard", "agents", "recordings",
                  "spool", "spooler", "ledger", "new_call", "process", "wall"}


def makeService(options: Options, reactor: Any = None):
    """twistd's entry point: the service and its listeners on ``reactor``
    (the global one when twistd calls it)."""
    if reactor is None:
        from twisted.internet import reactor

    from upvoot.daemon.ws import VoiceFactory

    _one_line_start_failures()
    service = build_service(options.config, reactor)
    factory = VoiceFactory(service)
    service.add_listeners(options.endpoints, factory)
    if options.config.admin_listen:
        from upvoot.daemon.web import admin_site

        console = None
        if options.config.console:
            from upvoot.console.auth import ConsoleSetupError
            from upvoot.console.resources import console_resource
            from upvoot.daemon.service import StartFailed
            from upvoot.ledger.threads import reactor_threads

            try:  # the token file is read (or made) now, before the reactor runs
                console = console_resource(service, options.endpoints, reactor_threads(reactor))
            except ConsoleSetupError as e:
                raise StartFailed(str(e)) from None
        public = len(options.endpoints)
        # Factory.numPorts counts the ports listening with this factory
        service.add_admin_listener(options.config.admin_listen,
                                   admin_site(service, listening=lambda: factory.numPorts >= public, console=console))
    return service
