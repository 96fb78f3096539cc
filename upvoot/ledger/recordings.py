"""Call recordings: a stereo WAV per call, as the caller heard it.

Left channel the caller, right channel the agent, 16 kHz 16-bit, both on
the call's clock (seconds since the call started):

- caller audio at the time it arrived;
- agent audio at the time it plays at the caller's end, as the call works
  it out from its playout clock (``upvoot.call``: the time a frame is sent
  plus the audio queued ahead of it). Audio dropped at a barge-in was never
  sent, so it is not in the recording; a pause shows as silence.

Nothing of a call is held in memory: each channel streams into a temporary
raw file (``<call_id>.caller.raw``, ``<call_id>.agent.raw``) by positioned
writes (a gap is a hole in the file, read back as silence), about a second
at a time. After the call the two files become ``<call_id>.wav`` (written
as ``.wav.tmp`` and renamed) and are deleted. Every file operation runs in a
thread (``run_in_thread``), never on the reactor; unit tests pass a
synchronous runner. Recordings left as raw files by a process that died are
finished at the next start.

Layout, relative to ``[upvoot] recordings_dir``: ``YYYY-MM-DD/<call_id>.wav``
(the UTC day the call started). Retention: UpVoot's WAVs older than
``recordings_keep`` are deleted at start and once a day (0 keeps them);
nothing else is ever deleted, and a ``recordings_dir`` that is ``state_dir``
or holds other files is refused at start (``recording_files``, which holds
the file work). Recordings are personal data: files are created without
access for "other" users, like the database.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from upvoot.audio import BYTES_PER_SECOND, FRAME_BYTES, RATE
from upvoot.ledger.recording_files import (  # re-exported: the names a recording's files have
    AGENT_SUFFIX, CALLER_SUFFIX, MODE, RecordingsDirError, assemble, check_directory, purge, recover,
)
from upvoot.call.line import ICallRecorder
from upvoot.ledger.threads import Pending, RunInThread

__all__ = ["AGENT_SUFFIX", "CALLER_SUFFIX", "CallRecorder", "FLUSH_BYTES", "Recordings", "RecordingsDirError",
           "SNAP_BYTES", "assemble", "check_directory", "purge", "recover"]

FLUSH_BYTES = BYTES_PER_SECOND  # hand a track to the writer thread about once a second
SNAP_BYTES = 2 * FRAME_BYTES  # a gap shorter than this (jitter, rounding) is closed up


class _Track:
    """One channel: bytes placed by position, flushed by positioned writes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.cursor = 0  # byte position just after the last audio placed
        self._pending: list[tuple[int, bytearray]] = []
        self._pending_bytes = 0
        self._fd: int | None = None

    def place(self, seconds: float, pcm: bytes) -> None:
        if not pcm:
            return
        pos = max(0, int(round(seconds * RATE))) * 2
        if pos - self.cursor < SNAP_BYTES:
            pos = self.cursor  # contiguous (never overlapping what is already placed)
        pcm = pcm[: len(pcm) // 2 * 2]
        if self._pending and self._pending[-1][0] + len(self._pending[-1][1]) == pos:
            self._pending[-1][1].extend(pcm)
        else:
            self._pending.append((pos, bytearray(pcm)))
        self._pending_bytes += len(pcm)
        self.cursor = pos + len(pcm)

    @property
    def due(self) -> bool:
        return self._pending_bytes >= FLUSH_BYTES

    def take(self) -> list[tuple[int, bytes]]:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        return [(pos, bytes(data)) for pos, data in pending]

    # writer thread ---------------------------------------------------------
    def write(self, chunks: list[tuple[int, bytes]]) -> None:
        if self._fd is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, MODE)
        for pos, data in chunks:
            os.pwrite(self._fd, data, pos)

    def close(self) -> None:
        if self._fd is None:  # nothing ever placed: an empty track
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, MODE)
        os.close(self._fd)
        self._fd = None


@implementer(ICallRecorder)
class CallRecorder:
    """Records one call: the call's ``ICallRecorder``. The call feeds it on
    the reactor (``caller``, ``agent``: audio at its time on the call's
    clock), ``stop`` ends the recording; ``finalize`` writes the WAV."""

    _log = Logger()

    def __init__(self, call_id: str, directory: str, relpath: str, run_in_thread: RunInThread) -> None:
        self.call_id = call_id
        self.relpath = relpath  # of the WAV, relative to state_dir: goes in the call record
        base = os.path.join(directory, call_id)
        self.wav_path = base + ".wav"
        self._caller = _Track(base + CALLER_SUFFIX)
        self._agent = _Track(base + AGENT_SUFFIX)
        self._run = run_in_thread
        self._chain: defer.Deferred = defer.succeed(None)
        self.duration: float | None = None
        self.failed = False
        self.stopped = False

    # on the reactor ----------------------------------------------------------
    def caller(self, seconds: float, pcm: bytes) -> None:
        """Caller audio that arrived ``seconds`` after the call started."""
        if not self.stopped:
            self._caller.place(seconds, pcm)
            self._maybe_flush()

    def agent(self, seconds: float, pcm: bytes) -> None:
        """Agent audio that starts playing ``seconds`` after the call started."""
        if not self.stopped:
            self._agent.place(seconds, pcm)
            self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._caller.due or self._agent.due:
            self._flush()

    def _flush(self) -> None:
        batch = [(track, track.take()) for track in (self._caller, self._agent)]
        self._enqueue(self._write_batch, batch)

    def _enqueue(self, fn: Callable[..., None], *args: Any) -> None:
        def step(_: object) -> defer.Deferred | None:
            if self.failed:
                return None
            return self._run(fn, *args)

        def failed(f: Any) -> None:
            if not self.failed:
                self.failed = True
                self._log.error("Recording of call {call_id} failed ({error}); the call goes on unrecorded",
                                event="recording.failed", call_id=self.call_id, error=_why(f))

        self._chain.addCallback(step)
        self._chain.addErrback(failed)

    @staticmethod
    def _write_batch(batch: list) -> None:
        for track, chunks in batch:
            if chunks:
                track.write(chunks)

    def stop(self, duration: float | None = None) -> None:
        """The call is over after ``duration`` seconds: the WAV will be that
        long (None: as long as the longer track)."""
        if self.stopped:
            return
        self.stopped = True
        self.duration = None if duration is None else max(0.0, duration)
        self._flush()

    def finalize(self) -> defer.Deferred:
        """Deferred[str | None]: write the WAV (in a thread) once every
        write is done; fires with its absolute path, or None if it failed."""
        self.stop()
        result: defer.Deferred = defer.Deferred()

        def finish(_: object) -> defer.Deferred | None:
            if self.failed:
                return None
            nbytes = None if self.duration is None else int(round(self.duration * RATE)) * 2
            return self._run(_finish_tracks, self._caller, self._agent, self.wav_path, nbytes)

        def done(_: object) -> None:
            result.callback(None if self.failed else self.wav_path)

        def failed(f: Any) -> None:
            self._log.error("Could not write the recording of call {call_id}: {error}",
                            event="recording.failed", call_id=self.call_id, error=_why(f))
            result.callback(None)

        self._chain.addCallback(finish)
        self._chain.addCallbacks(done, failed)
        return result


def _why(f: Any) -> str:
    e = f.value
    return f"{type(e).__name__}: {e}"


def _finish_tracks(caller: _Track, agent: _Track, wav_path: str, nbytes: int | None) -> None:
    for track in (caller, agent):
        track.close()
    assemble(caller.path, agent.path, wav_path, nbytes)


# ---- the daemon's side --------------------------------------------------------------


class Recordings:
    """The recordings of the daemon: makes recorders, finalizes them after
    their calls (the service waits for that when it stops), finishes what a
    dead process left, and applies retention at start and once a day."""

    _log = Logger()
    purge_interval = 86400.0

    def __init__(self, directory: str, state_dir: str, keep: float, clock: Any, run_in_thread: RunInThread,
                 option: str = "[upvoot] recordings_dir") -> None:
        self.directory = directory
        self.state_dir = state_dir
        self.keep = keep
        self.clock = clock
        self.option = option  # how errors name the setting, e.g. "upvoot.ini: [upvoot] recordings_dir"
        self._run = run_in_thread
        self._pending = Pending()
        self._loop = LoopingCall(self._housekeeping)
        self._loop.clock = clock
        self._first = True

    def check(self) -> None:
        """Raise ``RecordingsDirError`` (one line naming the option) if the
        directory is ``state_dir`` or holds files UpVoot did not write.
        Blocking (one directory listing per day): at start only."""
        check_directory(self.directory, self.state_dir, self.option)

    def start(self) -> None:
        """Check the directory (raises ``RecordingsDirError``), then finish
        what a dead process left and purge, now and once a day."""
        self.check()
        self._first = True
        self._loop.start(self.purge_interval, now=True)

    def stop(self) -> defer.Deferred:
        """Stop the daily purge; fires when every pending WAV is written."""
        if self._loop.running:
            self._loop.stop()
        return self._pending.done()

    def _housekeeping(self) -> defer.Deferred:
        first, self._first = self._first, False
        d = self._pending.track(self._run(self._housekeep_sync, first))

        def done(result: tuple[list[str], list[str]]) -> None:
            recovered, deleted = result
            for path in recovered:
                self._log.warn("Finished recording {path} left by a dead process", event="recording.recovered",
                               path=os.path.relpath(path, self.state_dir))
            if deleted:
                self._log.info("Deleted {n} recordings older than {days:g} days", event="recording.purged",
                               n=len(deleted), days=self.keep / 86400)

        def failed(f: Any) -> None:
            self._log.failure("Recording housekeeping failed", f, event="recording.purge_failed")

        d.addCallbacks(done, failed)
        return defer.succeed(None)  # never let one failure stop the daily loop

    def _housekeep_sync(self, first: bool) -> tuple[list[str], list[str]]:
        recovered = recover(self.directory) if first and os.path.isdir(self.directory) else []
        return recovered, purge(self.directory, self.keep)

    def recorder(self, call_id: str, started_wall: float | None = None) -> CallRecorder:
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if started_wall is None else started_wall))
        directory = os.path.join(self.directory, day)
        relpath = os.path.relpath(os.path.join(directory, call_id + ".wav"), self.state_dir)
        return CallRecorder(call_id, directory, relpath, self._run)

    def finalize(self, recorder: CallRecorder) -> defer.Deferred:
        """Write the call's WAV (in a thread); Deferred[str | None]."""
        d = self._pending.track(recorder.finalize())

        def done(path: str | None) -> str | None:
            if path is not None:
                self._log.info("Recording of call {call_id} written: {path} ({seconds:.1f}s)",
                               event="recording.written", call_id=recorder.call_id, path=recorder.relpath,
                               seconds=recorder.duration or 0.0)
            return path

        return d.addCallback(done)
