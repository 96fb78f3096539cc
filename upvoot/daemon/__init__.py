"""The daemon: sockets, lifecycle and the composition root.

Owns: ``twistd upvoot`` (``tap``, the one place where the reactor is taken
and every collaborator is built), the service's lifecycle and drain
(``service``), who may call (``admission``: keys, abuse limits, load, the
call's opening in the ledger), the heartbeats that keep running calls paid
for and the sweeper that settles the calls of dead nodes (``sweeper``), the
WebSocket socket (``ws``), the agents and their loaded engines (``agents``),
the worker pool (``workers``), the admin listener (``web``) and the metrics
(``metrics``).

May import every other package of UpVoot; nothing else may import it (the
``upvoot`` CLI imports it only to run the daemon's own pieces, never the
other way round).
"""
