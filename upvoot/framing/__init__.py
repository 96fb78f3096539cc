"""Wire codecs, sans-IO: UpVoot's raw protocol and each provider's dialect.

Owns: turning WebSocket frames into call events and the call's output into
frames. ``base`` holds the whole ``Framing`` contract and the events;
``raw`` is UpVoot's own protocol; ``exotel``, ``twilio``, ``plivo``,
``telnyx``, ``vonage`` the providers', on the shared base of ``provider``
(``ProviderFraming``, the mark book, the pre-start backlog); ``jsonwire``
parses a client's JSON with bounded size and depth; ``convert`` and
``g711`` convert audio; ``negotiate`` holds the one provider list, dialect
detection and ``Negotiation``, the state machine from a connection's open
to its call's start.

Never imports ``upvoot.call``, ``upvoot.daemon``, ``upvoot.dial``,
``upvoot.ledger``, ``upvoot.engines``, Twisted or Autobahn: it reads and
writes bytes and strings only (time comes to ``Negotiation`` as timeouts,
or from an injected clock).
"""
