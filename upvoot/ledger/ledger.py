"""The daemon's durable writes: every call settled exactly once.

A call's opening is no durable write of this module: it is the admission's
transaction (``upvoot.ledger.reserve.open_reserved``, before the caller's
upgrade is answered), and a database that cannot take it means no call
(503). A call's settlement (``store.CallRecord``) goes to the database; when
it cannot take it for now (locked past its busy timeout, PostgreSQL
restarting, the network to it down, the disk full), the record goes to the
spool, fsynced, and reaches the database when it returns
(``upvoot.ledger.spool``), applied once.

Exactly once, whatever fails: settlement is idempotent by call id, so a
record applied twice (a crash between applying and removing its spool line),
or a call a sweeper settled as a crash meanwhile, is charged once. Spooled
openings of an older UpVoot still apply (``store.open_call_once``).

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
