"""The daemon's durable writes: every admitted call opened, and settled exactly once.

A call's opening (``store.CallStart``) and its settlement (``store.CallRecord``)
go to the database; when it cannot take them for now (locked past its busy
timeout, the disk is full), they go to the spool, fsynced, and reach the
database when it returns (``upvoot.ledger.spool``). So a call whose opening
failed is still known if the process dies: the spooled opening is applied at
the next start, before the calls left open are settled as crashes.

Exactly once, whatever fails: settlement is idempotent by call id, and a
spooled opening applies only to a call not recorded yet, so a call settled
while its opening waited in the spool is neither reopened nor charged twice.

A write the database refuses for good (bad data: ``spool.PERMANENT``) is not
retried: it goes to ``spool.rejected`` with a critical log line.

The methods never fail: they log what went wrong, and what they fire with
says where the write went.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from upvoot.ledger import spool as spoolmod
from upvoot.ledger import store as storemod
from upvoot.ledger.threads import Pending


class Ledger:
    """``store`` is the daemon's ``store.Store``; ``spooler`` its ``spool.Spooler``."""

    _log = Logger()

    def __init__(self, store: Any, spooler: spoolmod.Spooler) -> None:
        self.store = store
        self.spooler = spooler
        self._pending = Pending()

    def open_call(self, start: storemod.CallStart) -> defer.Deferred:
        """Record the call as active, or spool its opening. Deferred[bool]:
        True when the database has it now (heartbeats will find it)."""
        d = self.store.open_call(start)

        def failed(f: Any) -> Any:
            line = spoolmod.start_to_json(start)
            if f.check(*spoolmod.PERMANENT):
                return self._reject(line, f)
            self._log.warn("Could not record the start of call {call_id} ({error}); spooling it",
                           event="store.open_spooling", call_id=start.call_id, error=f.getErrorMessage())
            return self._spool(line, "store.open_spooled", "store.open_lost")

        return self._pending.track(d.addCallbacks(lambda _: True, failed))

    def settle_call(self, record: storemod.CallRecord) -> defer.Deferred:
        """Settle the call, or spool its record. Deferred[int | None]: the
        points charged now (0: settled before), None when the record was
        spooled (the spooler reports its points when it applies) or refused."""
        d = self.store.settle_call(record)

        def done(charged: int) -> int:
            self._log.info("Call {call_id} settled: {charged} points", event="call.settled",
                           call_id=record.call_id, charged=charged)
            return charged

        def failed(f: Any) -> Any:
            line = spoolmod.record_to_json(record)
            if f.check(*spoolmod.PERMANENT):
                return self._reject(line, f).addCallback(lambda _: None)
            # the database is unavailable: keep the record in the spool (fsynced) until it returns
            self._log.warn("Could not settle call {call_id} ({error}); spooling it", event="store.settle_failed",
                           call_id=record.call_id, error=f.getErrorMessage())
            return self._spool(line, "store.settle_spooled", "store.settle_lost").addCallback(lambda _: None)

        return self._pending.track(d.addCallbacks(done, failed))

    def stop(self) -> defer.Deferred:
        """Fires when every opening and settlement in flight is written somewhere."""
        return self._pending.done()

    def _spool(self, line: dict, kept_event: str, lost_event: str) -> defer.Deferred:
        call_id = line["call_id"]

        def kept(_: object) -> bool:
            self._log.warn("Call {call_id}: {kind} spooled, written when the database returns", event=kept_event,
                           call_id=call_id, kind=line["kind"])
            return False

        def lost(f: Any) -> bool:
            self._log.failure("Could not spool call {call_id}: its {kind} line is only in this log: {line}", f,
                              event=lost_event, call_id=call_id, kind=line["kind"], line=line)
            return False

        return self.spooler.add(line).addCallbacks(kept, lost)

    def _reject(self, line: dict, f: Any) -> defer.Deferred:
        def lost(f2: Any) -> bool:
            self._log.failure("Could not write call {call_id} to the rejected lines: it is only in this log: {line}",
                              f2, event="spool.reject_failed", call_id=line["call_id"], line=line)
            return False

        return self.spooler.reject(line, f.value).addCallbacks(lambda _: False, lost)
