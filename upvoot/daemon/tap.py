"""``twistd upvoot``: command-line options and the one composition root.

Configuration errors raise ``usage.UsageError`` from ``postOptions``, so
twistd prints one line naming file, section and option and exits 1 before
it daemonizes.
"""

from __future__ import annotations

from twisted.python import usage

from upvoot._env import set_offline_environment

set_offline_environment()  # before any engine module can import onnxruntime

from upvoot.config import ConfigError, load_config  # noqa: E402


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

        for description in self.endpoints:
            try:
                strports.service(description, None)
            except Exception as e:  # bad endpoint syntax or plugin name
                where = "--listen" if self["listen"] else f"{self.config.path}: [upvoot] listen"
                raise usage.UsageError(f"{where}: bad endpoint {description!r}: {e}") from None
        if self.config.admin_listen:
            try:
                strports.service(self.config.admin_listen, None)
            except Exception as e:
                raise usage.UsageError(f"{self.config.path}: [upvoot] admin_listen: bad endpoint "
                                       f"{self.config.admin_listen!r}: {e}") from None


def makeService(options: Options):
    from twisted.internet import reactor

    from upvoot.daemon.service import UpVootService
    from upvoot.daemon.ws import VoiceFactory

    service = UpVootService(options.config, reactor)
    factory = VoiceFactory(service)
    service.add_listeners(options.endpoints, factory)
    if options.config.admin_listen:
        from upvoot.daemon.web import admin_site

        public = len(options.endpoints)
        # Factory.numPorts counts the ports listening with this factory
        service.add_admin_listener(options.config.admin_listen,
                                   admin_site(service, listening=lambda: factory.numPorts >= public))
    return service
