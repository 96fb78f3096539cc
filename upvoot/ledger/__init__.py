"""The ledger: keys, accounts, points, call records, the spool, recordings.

Owns: what is durable. API keys (stored hashed), balances and their
settlement (``store``), the fsynced settlement spool for when the database
is away (``spool``), the call recordings on disk (``recordings``).

Knows no socket and no provider: it never imports ``upvoot.daemon``,
``upvoot.framing``, ``upvoot.dial`` or Autobahn. Every database call runs
off the reactor thread.
"""
