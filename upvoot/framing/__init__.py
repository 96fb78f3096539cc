"""Wire codecs, sans-IO: UpVoot's raw protocol and each provider's dialect.

Owns: turning WebSocket frames into call events and the call's output into
frames (``base`` holds the whole ``Framing`` contract; ``raw`` is UpVoot's
own protocol; ``exotel``, ``twilio``, ``plivo``, ``telnyx``, ``vonage`` the
providers'), audio conversion (``convert``, ``g711``), and the negotiation
of which dialect a connection speaks (``negotiate``, with the one provider
list).

Never imports ``upvoot.call``, ``upvoot.daemon``, ``upvoot.ledger``,
``upvoot.engines`` or Autobahn: it reads and writes bytes and strings only.
"""
