"""One call, sans-IO: the state machine, hearing, speaking, playout, outcome.

Owns: everything that happens inside one call between its start and its
outcome: turn-taking (endpointing, interims, barge-in), the replies being
produced and paced out, the playout clock and the mark ledger, the limits'
timers, the transcript and the per-turn latencies.

Reads time only from an injected ``IReactorTime``; talks to the line through
``ILine`` and to the models through ``upvoot.engines.interfaces``.

Must never import: ``upvoot.daemon``, ``upvoot.framing``, ``upvoot.ledger``,
``upvoot.dial``, Autobahn, or anything that opens a socket or a database.
"""
