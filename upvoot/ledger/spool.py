"""The settlement spool: call openings and call records waiting for the database.

When a call starts or ends and the database cannot take its opening or its
settlement (locked past its busy timeout, the disk is full, ...), the line
goes to ``spool.jsonl`` in ``state_dir``: one JSON object per line, each
append flushed and fsynced before the call goes on. A line's ``kind`` is
``open`` (a ``store.CallStart``) or ``settle`` (a ``store.CallRecord``; a
line without a kind is one too). The spool is replayed at start (before
calls left active by a dead process are settled as crashes, so a spooled
opening is settled as a crash and a spooled record wins over a crash
estimate) and every ``Spooler.retry_interval`` seconds while the daemon runs.

Never dropped, never applied twice:

- a line leaves the spool only after its settlement committed;
- settlement is idempotent by call id (``store.settle_call``), so a line
  applied but not yet removed (a crash in between) is harmless to apply
  again: it charges nothing the second time; an opening applies only to a
  call not recorded yet (``store.open_call_once``), so a call settled while
  its opening waited in the spool stays settled, and is charged once;
- the spool is rewritten atomically (a temp file, fsync, rename, fsync of
  the directory); lines appended while a replay runs are kept;
- a line that is not a record (a torn write, a hand edit) is moved to
  ``spool.jsonl.corrupt`` with a log line, never silently lost;
- a line the database refuses for good (bad data: a number too large for
  SQLite, a constraint it breaks: ``PERMANENT``) is moved to
  ``spool.rejected`` with a critical log line, for an operator to look at,
  instead of being retried forever; a line that fails for a reason that may
  pass (the database is locked) stays and is retried.

``Spool`` is blocking and thread-safe; ``Spooler`` runs it in threads for
the daemon, never on the reactor.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable, Iterable, Mapping

import attrs
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from upvoot.ledger import backends, store as storemod
from upvoot.ledger.threads import Pending, RunInThread

KIND_OPEN = "open"
KIND_SETTLE = "settle"

_MODE = 0o660  # call records are personal data, like the database


@attrs.frozen
class Replay:
    """What one replay did."""

    applied: list = attrs.field(factory=list)  # (record, result of apply)
    failed: list = attrs.field(factory=list)  # (record, exception)
    corrupt: int = 0  # lines moved aside
    remaining: int = 0  # lines left in the spool
    rejected: list = attrs.field(factory=list)  # (record, exception): moved to spool.rejected


class Spool:
    """``spool.jsonl``: append, read, and replay records (blocking calls)."""

    _log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self.corrupt_path = path + ".corrupt"
        self.rejected_path = os.path.join(os.path.dirname(path), "spool.rejected")
        self._lock = threading.Lock()

    # -- writing -----------------------------------------------------------
    def append(self, record: Mapping[str, Any]) -> None:
        """Add one record; on disk (fsynced) when this returns."""
        line = _line(record)
        with self._lock:
            created = not os.path.exists(self.path)
            _append_durably(self.path, line)
            if created:
                _fsync_dir(self.path)

    def reject(self, record: Mapping[str, Any], error: BaseException) -> None:
        """Put a line that can never apply in ``spool.rejected`` (fsynced),
        with a critical log line naming the call and the error."""
        self._log_rejected(record, error)
        with self._lock:
            _append_durably(self.rejected_path, _line(record))

    def _log_rejected(self, record: Mapping[str, Any], error: BaseException) -> None:
        self._log.critical(
            "Call {call_id}: the database refuses its {kind} line for good ({error}); moved to {path}"
            " for an operator: it is not retried", event="spool.rejected", call_id=record.get("call_id"),
            kind=record.get("kind", KIND_SETTLE), error=f"{type(error).__name__}: {error}",
            path=os.path.basename(self.rejected_path))

    # -- reading -----------------------------------------------------------
    def _lines(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        # a last line without its newline is a torn append: it is corrupt too
        return [line for line in lines if line.strip()]

    def records(self) -> list[dict]:
        """The records waiting (corrupt lines skipped, not moved)."""
        with self._lock:
            return [r for r in (_parse(line) for line in self._lines()) if r is not None]

    def __len__(self) -> int:
        with self._lock:
            return len(self._lines())

    # -- replaying ---------------------------------------------------------
    def replay(self, apply: Callable[[dict], Any], stop_on: tuple[type[BaseException], ...] = (),
               reject_on: tuple[type[BaseException], ...] = ()) -> Replay:
        """Apply every record with ``apply(record)`` (blocking; it returns once
        the settlement committed, raises if it did not). Applied lines and
        corrupt ones (moved aside) leave the spool; failed ones stay. An
        exception in ``stop_on`` (the database is unavailable: the rest would
        fail the same way) ends the replay early, keeping the rest; one in
        ``reject_on`` (the line can never apply) moves the line to
        ``spool.rejected``."""
        with self._lock:
            lines = self._lines()
        done: list[bytes] = []
        corrupt: list[bytes] = []
        refused: list[bytes] = []
        applied: list = []
        failed: list = []
        rejected: list = []
        for number, line in enumerate(lines, 1):
            record = _parse(line)
            if record is None:
                corrupt.append(line)
                self._log.warn("Spool line {number} is not a call record; moved to {path}: {start!r}",
                               event="spool.corrupt", number=number, path=os.path.basename(self.corrupt_path),
                               start=line[:80].decode("utf-8", "replace"))
                continue
            try:
                result = apply(record)
            except Exception as e:
                if isinstance(e, reject_on) and not isinstance(e, stop_on):
                    self._log_rejected(record, e)
                    refused.append(line)
                    rejected.append((record, e))
                    continue
                failed.append((record, e))
                if isinstance(e, stop_on):
                    break
                continue
            done.append(line)
            applied.append((record, result))
        if not done and not corrupt and not refused:
            return Replay(applied, failed, 0, len(lines))
        with self._lock:
            if corrupt:
                _append_durably(self.corrupt_path, b"".join(line + b"\n" for line in corrupt))
            if refused:
                _append_durably(self.rejected_path, b"".join(line + b"\n" for line in refused))
            remove = list(done) + list(corrupt) + list(refused)
            keep = []
            for line in self._lines():  # re-read: appends made during the replay stay
                if line in remove:
                    remove.remove(line)
                else:
                    keep.append(line)
            self._rewrite(keep)
        return Replay(applied, failed, len(corrupt), len(keep), rejected)

    def _rewrite(self, lines: Iterable[bytes]) -> None:
        lines = list(lines)
        if not lines:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            _fsync_dir(self.path)
            return
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _MODE)
        try:
            _write_all(fd, b"".join(line + b"\n" for line in lines))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path)


def _line(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(dict(record), ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("call_id"), str):
        return None
    return record


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _append_durably(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, _MODE)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # after a torn append, start a line of our own
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- call openings and records <-> spool lines ---------------------------------------


def record_to_json(record: storemod.CallRecord) -> dict:
    return {
        "kind": KIND_SETTLE,
        **attrs.asdict(record, recurse=False),
        "transcript": [dict(entry) for entry in record.transcript],
        "metadata": dict(record.metadata),
    }


def record_from_json(data: Mapping[str, Any]) -> storemod.CallRecord:
    return storemod.CallRecord(**_fields(storemod.CallRecord, data))


def start_to_json(start: storemod.CallStart) -> dict:
    return {"kind": KIND_OPEN, **attrs.asdict(start, recurse=False), "metadata": dict(start.metadata)}


def start_from_json(data: Mapping[str, Any]) -> storemod.CallStart:
    return storemod.CallStart(**_fields(storemod.CallStart, data))


def _fields(cls: type, data: Mapping[str, Any]) -> dict:
    names = {a.name for a in attrs.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def apply_line(txn: Any, data: Mapping[str, Any]) -> Any:
    """Transaction function: apply one spool line. An opening returns whether
    it opened the call; a record, the points it charged."""
    kind = data.get("kind", KIND_SETTLE)
    if kind == KIND_OPEN:
        return storemod.open_call_once(txn, start_from_json(data))
    if kind == KIND_SETTLE:
        return storemod.settle_call(txn, record_from_json(data))
    raise ValueError(f"unknown spool line kind {kind!r}")


# errors that mean "the database is not there right now": stop, retry later
UNAVAILABLE = (*backends.UNAVAILABLE_ERRORS, storemod.StoreError)
# errors that mean "this line can never apply": bad data, not a bad moment
# (OverflowError: a number too large for an SQLite INTEGER; TypeError and
# ValueError: a line that is no opening or record; IntegrityError: a
# constraint it breaks). Everything else is retried.
PERMANENT = (OverflowError, TypeError, ValueError, KeyError, *backends.PERMANENT_ERRORS)


def settle_spooled(spool: Spool, database: str, password_file: str = "") -> Replay:
    """Replay ``spool`` into the database at ``database`` on a connection of
    its own (blocking: at start, or in a thread)."""
    if not os.path.exists(spool.path):
        return Replay()
    conn = None

    def apply(data: dict) -> Any:
        nonlocal conn
        if conn is None:
            conn = storemod.connect(database, password_file)
        return storemod.transact(conn, apply_line, data)

    try:
        return spool.replay(apply, stop_on=UNAVAILABLE, reject_on=PERMANENT)
    finally:
        if conn is not None:
            conn.close()


class Spooler:
    """The daemon's side: spool (or reject) a line in a thread, and replay
    the spool in a thread at start and every ``retry_interval`` seconds."""

    _log = Logger()
    retry_interval = 5.0

    def __init__(self, spool: Spool, replay: Callable[[], Replay], clock: Any, run_in_thread: RunInThread,
                 on_applied: Callable[[dict, Any], None] | None = None) -> None:
        self.spool = spool
        self._replay = replay
        self._run = run_in_thread
        self._on_applied = on_applied  # (record, points charged) for each settlement applied
        self._busy: defer.Deferred | None = None
        self._pending = Pending()
        self._loop = LoopingCall(self.retry)
        self._loop.clock = clock

    def start(self, now: bool = True) -> None:
        self._loop.start(self.retry_interval, now=now)

    def stop(self) -> defer.Deferred:
        """Stop retrying; fires when every append and replay in flight is done."""
        if self._loop.running:
            self._loop.stop()
        return self._pending.done()

    def add(self, record: Mapping[str, Any]) -> defer.Deferred:
        """Spool one line (in a thread). Fires once it is on disk; fails if
        it could not be written (then it is lost: the caller logs it loudly)."""
        return self._pending.track(self._run(self.spool.append, record))

    def reject(self, record: Mapping[str, Any], error: BaseException) -> defer.Deferred:
        """Put a line the database refused for good in ``spool.rejected`` (in a thread)."""
        return self._pending.track(self._run(self.spool.reject, record, error))

    def retry(self) -> defer.Deferred:
        """Replay the spool now (in a thread) if it has lines and no replay
        is running. Never fails, so the timer never stops."""
        if self._busy is not None or not os.path.exists(self.spool.path):
            return defer.succeed(None)
        d = self._busy = self._pending.track(self._run(self._replay))

        def failed(f: Any) -> None:
            self._log.failure("Spool replay failed", f, event="spool.replay_failed")

        def idle(_: object) -> None:
            self._busy = None

        d.addCallbacks(self.report, failed)
        d.addBoth(idle)
        return defer.succeed(None)

    def report(self, result: Replay) -> None:
        """Log what a replay did (and count the points charged)."""
        for record, result_of_line in result.applied:
            if record.get("kind") == KIND_OPEN:
                self._log.info("Call {call_id} opened from the spool{already}", event="spool.opened",
                               call_id=record.get("call_id"), already="" if result_of_line else " (recorded before)")
                continue
            self._log.info("Call {call_id} settled from the spool: {charged} points", event="spool.applied",
                           call_id=record.get("call_id"), charged=result_of_line)
            if self._on_applied is not None:
                self._on_applied(record, result_of_line)
        for record, error in result.failed:
            self._log.warn("Spooled call {call_id} not settled yet: {error}", event="spool.retry_failed",
                           call_id=record.get("call_id"), error=str(error) or repr(error))
