"""The ledger: keys, accounts, points, call records, the spool, recordings.

Owns: what is durable, and what a call costs. API keys (stored hashed),
balances and the call log (``store``: the database, SQLite or PostgreSQL
(``backends``), versioned (``schema``), copied whole by ``dbcopy``, with its
transaction functions in ``accounts`` and ``calls`` and its values in
``records``); the points running calls hold, so that no balance goes
below 0 (``reserve``); the one points formula (``billing``); the one place a
call's outcome becomes its record (``settlement``); the daemon's durable
writes, with the fsynced spool behind the database (``ledger``,
``spool``); the call recordings on disk (``recordings``,
``recording_files``); and how blocking file work runs off the reactor
(``threads``).

Knows no socket and no provider: it never imports ``upvoot.daemon``,
``upvoot.framing``, ``upvoot.dial`` or Autobahn. Every database call runs
off the reactor thread, and no database object reaches the reactor thread.
"""
