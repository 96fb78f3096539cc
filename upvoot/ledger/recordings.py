"""Call recordings: a stereo WAV per call, as the caller heard it.

Left channel the caller, right channel the agent, 16 kHz 16-bit, both on
the call's clock (seconds since the call started):

- caller audio at the time it arrived;
- agent audio at the time it plays at the caller's end: the time its frame
  was sent plus the audio queued ahead of it (``Playback.sent - played``,
  the playout clock). Audio dropped at a barge-in was never sent, so it is
  not in the recording; a pause shows as silence.

Nothing of a call is held in memory: each channel streams into a temporary
raw file (``<call_id>.caller.raw``, ``<call_id>.agent.raw``) by positioned
writes (a gap is a hole in the file, read back as silence), about a second
at a time. After the call the two files become ``<call_id>.wav`` (written
as ``.wav.tmp`` and renamed) and are deleted. Every file operation runs in a
thread (``run_in_thread``), never on the reactor; unit tests pass a
synchronous runner. Recordings left as raw files by a process that died are
finished at the next start.

Layout, relative to ``[upvoot] recordings_dir``: ``YYYY-MM-DD/<call_id>.wav``
(the UTC day the call started). Retention: WAVs older than
``recordings_keep`` are deleted at start and once a day (0 keeps them).
Recordings are personal data: files are created without access for
"other" users, like the database.
"""

from __future__ import annotations

import os
import time
import wave
from typing import Any, Callable

import numpy as np
from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from upvoot.audio import BYTES_PER_SECOND, FRAME_BYTES, RATE

RunInThread = Callable[..., defer.Deferred]

CALLER_SUFFIX = ".caller.raw"
AGENT_SUFFIX = ".agent.raw"
FLUSH_BYTES = BYTES_PER_SECOND  # hand a track to the writer thread about once a second
SNAP_BYTES = 2 * FRAME_BYTES  # a gap shorter than this (jitter, rounding) is closed up
_CHUNK = BYTES_PER_SECOND * 4  # finalizing reads this much of each track at a time
_MODE = 0o660


def synchronous(fn: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
    """A ``run_in_thread`` that runs inline: for unit tests."""
    return defer.maybeDeferred(fn, *args, **kw)


def reactor_threads(reactor: Any) -> RunInThread:
    """A ``run_in_thread`` on the reactor's thread pool."""

    def run(fn: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kw)

    return run


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
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _MODE)
        for pos, data in chunks:
            os.pwrite(self._fd, data, pos)

    def close(self) -> None:
        if self._fd is None:  # nothing ever placed: an empty track
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _MODE)
        os.close(self._fd)
        self._fd = None


class CallRecorder:
    """Records one call. The call feeds it (``caller``, ``agent_sink``) on the
    reactor; ``stop`` ends the recording; ``finalize`` writes the WAV."""

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

    def agent_sink(self, output: Any, clock: Any, t0: float) -> "AgentTap":
        """A sink for one ``Playback``: forwards to ``output`` and records."""
        return AgentTap(output, self, clock, t0)

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


class AgentTap:
    """Stands between a ``Playback`` and the call output: each agent frame
    goes on to the line and into the recording at its playout position.
    Everything else (marks, ``marks_playout``, ``min_lead``) is the output's."""

    def __init__(self, output: Any, recorder: CallRecorder, clock: Any, t0: float) -> None:
        self._output = output
        self._recorder = recorder
        self._clock = clock
        self._t0 = t0
        self.playback: Any = None

    def audio(self, pcm: bytes) -> None:
        pb = self.playback
        if pb is not None:
            # Playback counts the frame in ``sent`` before handing it over:
            # what is queued ahead of it plays first.
            ahead = max(0.0, (pb.sent - len(pcm) - pb.played) / BYTES_PER_SECOND)
            self._recorder.agent(self._clock.seconds() - self._t0 + ahead, pcm)
        self._output.audio(pcm)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._output, name)


# ---- files (all blocking: run in a thread) ---------------------------------------


def _read_at(fd: int, pos: int, size: int) -> bytes:
    data = os.pread(fd, size, pos)
    return data + bytes(size - len(data))  # past the end: silence


def assemble(caller_path: str, agent_path: str, wav_path: str, nbytes: int | None = None) -> None:
    """Interleave two mono raw tracks into a stereo WAV of ``nbytes`` per
    channel (None: the longer track), a few seconds at a time; then delete
    the tracks. The WAV appears complete or not at all (temp + rename)."""
    fds = [os.open(p, os.O_RDONLY) if os.path.exists(p) else None for p in (caller_path, agent_path)]
    try:
        if nbytes is None:
            nbytes = max((os.fstat(fd).st_size for fd in fds if fd is not None), default=0)
        nbytes = nbytes // 2 * 2
        tmp = wav_path + ".tmp"
        fd_out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _MODE)
        with os.fdopen(fd_out, "wb") as f:
            with wave.open(f, "wb") as w:
                w.setnchannels(2)
                w.setsampwidth(2)
                w.setframerate(RATE)
                for pos in range(0, nbytes, _CHUNK):
                    size = min(_CHUNK, nbytes - pos)
                    left, right = (
                        np.frombuffer(_read_at(fd, pos, size) if fd is not None else bytes(size), dtype="<i2")
                        for fd in fds
                    )
                    frames = np.empty(left.size * 2, dtype="<i2")
                    frames[0::2] = left
                    frames[1::2] = right
                    w.writeframes(frames.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, wav_path)
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)
    for p in (caller_path, agent_path):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def recover(directory: str) -> list[str]:
    """Finish recordings a dead process left as raw tracks (as long as the
    longer track). Run at start, before any call. Returns the WAVs written."""
    written = []
    for root, _dirs, files in os.walk(directory):
        for name in sorted(files):
            if not (name.endswith(CALLER_SUFFIX) or name.endswith(AGENT_SUFFIX)):
                continue
            base = os.path.join(root, name.rsplit(".", 2)[0])
            wav = base + ".wav"
            if wav in written or not (os.path.exists(base + CALLER_SUFFIX) or os.path.exists(base + AGENT_SUFFIX)):
                continue
            assemble(base + CALLER_SUFFIX, base + AGENT_SUFFIX, wav)
            written.append(wav)
    return written


def purge(directory: str, keep: float, now: float | None = None) -> list[str]:
    """Delete WAVs last modified more than ``keep`` seconds before ``now``
    (0 keeps everything), then empty day directories. Returns what was deleted."""
    if not keep or not os.path.isdir(directory):
        return []
    cutoff = (time.time() if now is None else now) - keep
    deleted = []
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            if not name.endswith(".wav"):
                continue  # raw tracks of running calls, temp files, anything else
            path = os.path.join(root, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
                    deleted.append(path)
            except FileNotFoundError:
                pass
        if root != directory:
            try:
                os.rmdir(root)  # only if empty
            except OSError:
                pass
    return deleted


# ---- the daemon's side --------------------------------------------------------------


class Recordings:
    """The recordings of the daemon: makes recorders, finalizes them after
    their calls (the service waits for that when it stops), finishes what a
    dead process left, and applies retention at start and once a day."""

    _log = Logger()
    purge_interval = 86400.0

    def __init__(self, directory: str, state_dir: str, keep: float, clock: Any, run_in_thread: RunInThread) -> None:
        self.directory = directory
        self.state_dir = state_dir
        self.keep = keep
        self.clock = clock
        self._run = run_in_thread
        self._pending: set[defer.Deferred] = set()
        self._loop = LoopingCall(self._housekeeping)
        self._loop.clock = clock
        self._first = True

    def start(self) -> None:
        self._first = True
        self._loop.start(self.purge_interval, now=True)

    def stop(self) -> defer.Deferred:
        """Stop the daily purge; fires when every pending WAV is written."""
        if self._loop.running:
            self._loop.stop()
        return defer.DeferredList(list(self._pending)).addCallback(lambda _: None)

    def _housekeeping(self) -> defer.Deferred:
        first, self._first = self._first, False
        d = self._track(self._run(self._housekeep_sync, first))

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
        d = self._track(recorder.finalize())

        def done(path: str | None) -> str | None:
            if path is not None:
                self._log.info("Recording of call {call_id} written: {path} ({seconds:.1f}s)",
                               event="recording.written", call_id=recorder.call_id, path=recorder.relpath,
                               seconds=recorder.duration or 0.0)
            return path

        return d.addCallback(done)

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._pending.add(d)

        def untrack(result: Any) -> Any:
            self._pending.discard(d)
            return result

        return d.addBoth(untrack)
