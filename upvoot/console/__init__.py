"""The console: a browser page on the admin listener, and everything it talks to.

Owns ``/console/`` under ``upvoot.daemon.web``'s admin tree: the operator
token and the sessions it is exchanged for (``auth``: a token file made on
first start, HttpOnly SameSite=Strict cookies, a CSRF token per session),
the resource tree of the page and its JSON API (``resources``), the live
calls as server-sent events (``live``), the single-use test keys the page
calls the daemon's own public endpoint with (``keys``), the call history
(``history``), the static page shipped in the wheel (``static/``) and one
call drawn as SVG (``timeline``).

It sees the daemon only as the object it is given (the service: its
``config``, ``store.run``, ``live_calls()``, ``clock``) and never imports
``upvoot.daemon``, ``upvoot.framing``, ``upvoot.dial`` or Autobahn; of
``upvoot.call`` only the plain values of ``upvoot.call.outcome`` (latency
stages), never the call's machinery (``upvoot.call.core``,
``upvoot.call.machine``, ``upvoot.call.handle``, ``upvoot.call.speaking``). What is durable it reads and writes
through ``upvoot.ledger`` transaction functions, off the reactor
(``store.run``). No API key ever leaves it but the one a test-key request
mints (prefixes only elsewhere), and no token or cookie is ever logged.
"""
