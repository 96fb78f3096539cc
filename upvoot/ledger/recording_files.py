"""The recordings on disk: their names, the WAV assembly, recovery and retention (all blocking).

Layout, relative to ``[upvoot] recordings_dir``: ``YYYY-MM-DD/<call id>.wav``
(the UTC day the call started; a call id is 32 hex digits), next to the
call's raw tracks while it runs (``<call id>.caller.raw``,
``<call id>.agent.raw``) and the WAV being written (``<call id>.wav.tmp``).

UpVoot touches nothing else there: retention deletes only WAVs of that name
in day directories of that name, and removes only such day directories once
empty. The daemon refuses a ``recordings_dir`` that is ``state_dir`` itself or
holds anything else (``check_directory``): pointed at a directory of other
files, it would otherwise mix its own with them.

Every function here blocks on the disk: run them in a thread.
"""

from __future__ import annotations

import calendar
import os
import re
import time
import wave

import numpy as np

from upvoot.audio import BYTES_PER_SECOND, RATE

CALLER_SUFFIX = ".caller.raw"
AGENT_SUFFIX = ".agent.raw"
_CHUNK = BYTES_PER_SECOND * 4  # finalizing reads this much of each track at a time
MODE = 0o660  # personal data: no access for "other" users, like the database

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_CALL_ID = r"[0-9a-f]{32}"
_WAV = re.compile(_CALL_ID + r"\.wav")
_RAW = re.compile(r"(" + _CALL_ID + r")(" + re.escape(CALLER_SUFFIX) + "|" + re.escape(AGENT_SUFFIX) + ")")
_OWN = re.compile(_CALL_ID + r"(\.wav|\.wav\.tmp|" + re.escape(CALLER_SUFFIX) + "|" + re.escape(AGENT_SUFFIX) + ")")


class RecordingsDirError(Exception):
    """``recordings_dir`` is not a place for UpVoot's recordings; ``str()`` is one line."""


def is_day(name: str) -> bool:
    """A day directory's name: ``YYYY-MM-DD``, a real date."""
    if not _DAY.fullmatch(name):
        return False
    try:
        time.strptime(name, "%Y-%m-%d")
    except ValueError:
        return False
    return True


def _days(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names if is_day(n) and os.path.isdir(os.path.join(directory, n))]


def check_directory(directory: str, state_dir: str, option: str = "[upvoot] recordings_dir") -> None:
    """Raise ``RecordingsDirError`` (naming ``option``: say which file too)
    unless ``directory`` is missing, empty, or holds only UpVoot's day
    directories and recordings."""
    if os.path.realpath(directory) == os.path.realpath(state_dir):
        raise RecordingsDirError(f"{option} = {directory}: is state_dir itself; recordings need a directory"
                                 " of their own (the default is 'recordings', below state_dir)")
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory):
        raise RecordingsDirError(f"{option} = {directory}: is not a directory")
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not (is_day(name) and os.path.isdir(path) and not os.path.islink(path)):
            raise _foreign(option, directory, path)
        for inner in sorted(os.listdir(path)):
            if not (_OWN.fullmatch(inner) and os.path.isfile(os.path.join(path, inner))):
                raise _foreign(option, directory, os.path.join(path, inner))


def _foreign(option: str, directory: str, path: str) -> RecordingsDirError:
    return RecordingsDirError(
        f"{option} = {directory}: holds {path!r}, which UpVoot did not write; give recordings a directory"
        " of their own (UpVoot's retention deletes old recordings there)")


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
        fd_out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, MODE)
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


def _read_at(fd: int, pos: int, size: int) -> bytes:
    data = os.pread(fd, size, pos)
    return data + bytes(size - len(data))  # past the end: silence


def recover(directory: str) -> list[str]:
    """Finish recordings a dead process left as raw tracks in day
    directories (as long as the longer track). Run at start, before any
    call. Returns the WAVs written."""
    written = []
    for day in _days(directory):
        for call_id in sorted({m.group(1) for m in map(_RAW.fullmatch, os.listdir(day)) if m}):
            base = os.path.join(day, call_id)
            assemble(base + CALLER_SUFFIX, base + AGENT_SUFFIX, base + ".wav")
            written.append(base + ".wav")
    return written


def purge(directory: str, keep: float, now: float | None = None) -> list[str]:
    """Delete UpVoot's WAVs (``YYYY-MM-DD/<call id>.wav``) last modified more
    than ``keep`` seconds before ``now`` (0 keeps everything), then the day
    directories left empty. Returns what was deleted."""
    if not keep or not os.path.isdir(directory):
        return []
    cutoff = (time.time() if now is None else now) - keep
    deleted = []
    for day in _days(directory):
        for name in sorted(os.listdir(day)):
            if not _WAV.fullmatch(name):
                continue  # raw tracks of running calls, temp files, anything not ours
            path = os.path.join(day, name)
            try:
                if os.path.isfile(path) and not os.path.islink(path) and os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
                    deleted.append(path)
            except FileNotFoundError:
                pass
        if _day_start(os.path.basename(day)) + 86400 < cutoff:  # never a day a call may still write to
            try:
                os.rmdir(day)  # only if empty
            except OSError:
                pass
    return deleted


def _day_start(name: str) -> float:
    return float(calendar.timegm(time.strptime(name, "%Y-%m-%d")))
