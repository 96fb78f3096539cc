"""The dialer on the network: one ``Call`` over an Autobahn client socket.

``start_call(reactor, options)`` connects (``ws://`` or ``wss://``, with
``--cafile`` / ``--insecure`` TLS) and returns the ``Call`` at once;
``dial(reactor, options)`` returns a Deferred that fires with the
``DialResult`` and never fails for network reasons, so tests and
``bench/`` drive calls without ``sys.exit``. ``_DialerProtocol`` is the thin
adapter: it turns Autobahn's callbacks into the ``Call``'s inputs and offers
the ``CallTransport`` the call writes to.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from upvoot.dial.engine import Call
from upvoot.dial.media import AudioSource
from upvoot.dial.result import DialOptions, DialResult

MAX_MESSAGE_BYTES = 1 << 20


# ---- the Autobahn adapter -------------------------------------------------------------------


class _DialerProtocol(WebSocketClientProtocol):
    call: Call

    def onOpen(self) -> None:
        try:
            self.call.opened(self)
        except Exception:
            self.call.failed(f"internal error: {Failure().getErrorMessage()}")
            self.dropConnection(abort=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.call.binary(payload)
        else:
            self.call.text(payload.decode("utf-8"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.call.result.opened:
            self.call.closed(wasClean, code, reason)
            return
        status = _refused_status(getattr(self, "http_status_line", None))
        if status is not None:
            self.call.refused(status)
        else:
            self.call.failed(reason or "the connection closed during the opening handshake")

    # CallTransport: after the server's close frame and before the TCP close
    # the send loop may still tick; those frames have nowhere to go.
    def send_binary(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(data, isBinary=True)

    def send_text(self, text: str) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(text.encode("utf-8"), isBinary=False)

    def close(self, code: int, reason: str) -> None:
        self.sendClose(code, reason)


def _refused_status(status_line: str | None) -> int | None:
    """The status of a non-101 handshake response (``HTTP/1.1 401 ...``)."""
    if not status_line:
        return None
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    status = int(parts[1])
    return None if status == 101 else status


class _DialerFactory(WebSocketClientFactory):
    protocol = _DialerProtocol

    def __init__(self, call: Call, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.call = call

    def buildProtocol(self, addr: Any) -> _DialerProtocol:
        p = super().buildProtocol(addr)
        p.call = self.call
        return p


# ---- TLS ----------------------------------------------------------------------------------------


def load_certificates(cafile: str) -> list[Any]:
    from twisted.internet.ssl import Certificate

    with open(cafile, "rb") as f:
        pem = f.read()
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + part for part in pem.split(marker)[1:]]
    if not blocks:
        raise ValueError(f"{cafile}: no PEM certificate found")
    return [Certificate.loadPEM(block) for block in blocks]


@implementer(IOpenSSLClientConnectionCreator)
class _NoVerification:
    """TLS without certificate checks (``--insecure``); still sends SNI."""

    def __init__(self, host: str) -> None:
        from twisted.internet.ssl import CertificateOptions

        self._context = CertificateOptions(verify=False).getContext()
        self._sni = None if isIPAddress(host) or isIPv6Address(host) else host.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL import SSL

        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


def tls_options(host: str, cafile: str | None = None, insecure: bool = False) -> Any:
    from twisted.internet.ssl import optionsForClientTLS, trustRootFromCertificates

    if insecure:
        return _NoVerification(host)
    trust = trustRootFromCertificates(load_certificates(cafile)) if cafile else None
    return optionsForClientTLS(host, trustRoot=trust)


# ---- dialing ---------------------------------------------------------------------------------------


def start_call(
    reactor: Any,
    options: DialOptions,
    source: AudioSource | None = None,
    printer: Any = None,
) -> Call:
    """Connect and return the ``Call`` at once (``call.done`` fires at the end);
    callers that need to hang up early keep the ``Call``."""
    call = Call(reactor, options, source, printer)
    try:
        secure, host, port, _resource, _path, _params = parse_url(call.url)
        factory = _DialerFactory(call, url=call.url, reactor=reactor)
        factory.setProtocolOptions(
            openHandshakeTimeout=options.connect_timeout,
            closeHandshakeTimeout=2.0,
            maxMessagePayloadSize=MAX_MESSAGE_BYTES,
            maxFramePayloadSize=MAX_MESSAGE_BYTES,
        )
        endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=options.connect_timeout)
        if secure:
            endpoint = wrapClientTLS(tls_options(host, options.cafile, options.insecure), endpoint)
    except Exception as e:
        call.failed(str(e))
        return call

    def connect_failed(f: Failure) -> None:
        call.failed(f"cannot connect to {host}:{port}: {f.getErrorMessage()}")

    endpoint.connect(factory).addErrback(connect_failed)
    return call


def dial(
    reactor: Any,
    options: DialOptions,
    source: AudioSource | None = None,
    printer: Any = None,
) -> defer.Deferred[DialResult]:
    """Make one call; fires with its ``DialResult`` (never fails for network reasons)."""
    return start_call(reactor, options, source, printer).done
