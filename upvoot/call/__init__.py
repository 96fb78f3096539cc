"""One call, sans-IO: the state machine, hearing, speaking, playout, outcome.

Owns: everything that happens inside one call between its start and its
outcome: turn-taking (endpointing, interims, barge-in), the replies being
produced and paced out, the playout clock and the mark ledger, the limits'
timers, the transcript and the per-turn latencies.

Its surface: ``new_call(...) -> ICallHandle`` (what the outside may do to
a call), ``ILine`` (what a call does to its line), ``ICallRecorder`` (where
it records itself), ``CallOutcome`` and ``EndReason`` (how it ended, given
once to ``on_ended``), ``Pacer`` (the process's shared playout tick).
Inside: ``machine`` decides, ``core`` does, with ``hearing``, ``speaking``,
``playout``, ``limits`` and ``outcome`` each doing one job.

Reads time only from an injected ``IReactorTime``; talks to the line through
``ILine`` and to the models through ``upvoot.engines.interfaces``.

Must never import: ``upvoot.daemon``, ``upvoot.framing``, ``upvoot.ledger``,
``upvoot.dial``, Autobahn, or anything that opens a socket or a database.
"""

from upvoot.call.handle import CallHandle, ICallHandle, new_call, state_of
from upvoot.call.line import ICallRecorder, ILine
from upvoot.call.outcome import CallOutcome, EndReason
from upvoot.call.playout import Pacer

__all__ = ["CallHandle", "CallOutcome", "EndReason", "ICallHandle", "ICallRecorder", "ILine", "Pacer", "new_call",
           "state_of"]
