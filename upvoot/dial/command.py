"""``upvoot dial URL``: a test caller that behaves like a telephony provider.

By default it speaks UpVoot's raw protocol (``upvoot.framing.raw`` holds the
wire contract) from the provider's side; ``--provider NAME`` (exotel,
twilio, plivo, telnyx, vonage) speaks that provider's own protocol instead,
through ``upvoot.dial.providers`` (``--sample-rate`` and ``--codec`` where the
provider offers a choice, ``--custom KEY=VALUE`` for its custom parameters):

- connects to ``ws://`` or ``wss://HOST/voice/<api-key>`` (``--cafile`` trusts
  a self-signed certificate, ``--insecure`` skips verification); with a
  provider the URL gains ``?provider=NAME`` and the codec's parameters;
- from the moment the upgrade completes it sends caller audio like a phone
  line: one 20 ms frame every 20 ms (raw: 640 bytes of 16 kHz mono s16le;
  a provider: its own media messages), from a ``LoopingCall`` that catches
  up rather than drifts. The frames carry ``--play FILE.wav`` (converted to
  16 kHz mono) once ``--delay`` has passed (and, with
  ``--play-after-greeting``, once the greeting has ended), and digital
  silence before and after it;
- prints every control message as it arrives, ``+1.234s {"type": ...}`` (or
  ``{"t": 1.234, "msg": {...}}`` lines with ``--json``), times relative to
  the open, then one summary line; with a provider, the messages it sends
  (start, mark echoes, stop) too, media never;
- ``--record FILE.wav`` writes the agent's audio as the caller hears it (see
  ``upvoot.dial.media.AgentRecorder``); ``--record-raw`` just concatenates the frames;
- ``--end-call-after S`` sends ``{"type": "end_call"}`` (raw only);
  ``--hangup-after S`` hangs up (a provider sends its ``stop`` first);
  ``--max-seconds S`` (default 120) always ends the call;
- ``--config FILE`` (the daemon's ini, when the dialer runs beside it):
  after the call, print the daemon's call record transcript
  (``{"t": ..., "transcript": [...]}`` with ``--json``). Providers carry no
  transcripts on the wire; the record is found by the provider call id the
  dialer made up (raw calls: the newest record).

Exit codes: 0 the server closed with 1000, or we hung up; 1 any other end
(connection failed, dropped, another close code); 2 bad arguments or input
files; 3 the server refused the upgrade (``refused: HTTP 401``).

Layout: this module is the command line and its printing; the call and its
parts are the package's public surface (``upvoot.dial``: ``dial``,
``start_call``, ``DialOptions``, ``DialResult``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import wave
from typing import Any, TextIO

from autobahn.websocket.util import parse_url
from twisted.internet import defer, task

from upvoot.audio import duration, read_wav, write_wav
from upvoot.dial.connect import load_certificates, start_call
from upvoot.dial.providers import PROVIDERS, make_sim
from upvoot.dial.result import EXIT_OK, EXIT_USAGE, DialOptions, DialResult, exit_code

#: how long to wait for the daemon to settle the call record (--config)
RECORD_WAIT = 10.0


# ---- printing ----------------------------------------------------------------------------------


class Printer:
    """Lines for people (``+1.234s {...}``) or JSON lines; errors go to ``err``."""

    def __init__(self, out: TextIO, err: TextIO, json_lines: bool = False) -> None:
        self._out = out
        self._err = err
        self._json = json_lines

    def received(self, t: float, msg: Any, is_json: bool = True) -> None:
        if self._json:
            self._line(self._out, json.dumps({"t": round(t, 3), "msg" if is_json else "text": msg}))
        elif is_json:
            self._line(self._out, f"+{t:.3f}s {json.dumps(msg)}")
        else:
            self._line(self._out, f"+{t:.3f}s text {msg!r}")

    def sent(self, t: float, msg: Any) -> None:
        if self._json:
            self._line(self._out, json.dumps({"t": round(t, 3), "sent": msg}))
        else:
            self._line(self._out, f"+{t:.3f}s sent {json.dumps(msg)}")

    def transcript(self, entries: list[dict]) -> None:
        if self._json:
            self._line(self._out, json.dumps({"t": None, "transcript": entries}))
            return
        for e in entries:
            cut = " (interrupted)" if e.get("interrupted") else ""
            self._line(self._out, f"transcript {e.get('role')}: {e.get('text')}{cut}")

    def summary(self, r: DialResult) -> None:
        if r.refused is not None:
            self._line(self._err, f"refused: HTTP {r.refused}")
        elif r.error:
            self._line(self._err, f"failed: {r.error}")
        if self._json:
            self._line(self._out, json.dumps({"t": round(r.duration, 3), "summary": summary_fields(r)}))
        elif r.opened:
            self._line(self._out, summary_text(r))

    def error(self, text: str) -> None:
        self._line(self._err, text)

    @staticmethod
    def _line(stream: TextIO, text: str) -> None:
        stream.write(text + "\n")
        stream.flush()


def summary_fields(r: DialResult) -> dict:
    return {
        "opened": r.opened,
        "refused": r.refused,
        "error": r.error,
        "audio_seconds": round(r.audio_seconds, 3),
        "audio_frames": r.audio_frames,
        "bursts": len(r.bursts),
        "stray_frames": r.stray_frames,
        "sent_seconds": round(duration(r.sent_bytes), 3),
        "closed_by": r.closed_by,
        "hangup_reason": r.hangup_reason,
        "close_code": r.close_code,
        "close_reason": r.close_reason,
        "clean": r.clean,
        "exit": exit_code(r),
        "provider": r.provider,
        "marks": r.marks,
        "clears": r.clears,
        "violations": list(r.violations),
    }


def summary_text(r: DialResult) -> str:
    by = {"client": "by us", "server": "by the server", "network": "without a close handshake"}.get(r.closed_by or "", "")
    why = f" ({r.hangup_reason})" if r.hangup_reason else ""
    reason = f" {r.close_reason!r}" if r.close_reason else ""
    stray = f", {r.stray_frames} frames outside audio_start/audio_end" if r.stray_frames else ""
    unclean = "" if r.clean else ", unclean"
    return (
        f"summary: received {r.audio_seconds:.2f} s of agent audio in {r.audio_frames} frames"
        f" ({len(r.bursts)} burst{'' if len(r.bursts) == 1 else 's'}{stray}), sent {duration(r.sent_bytes):.2f} s;"
        f" closed {by}{why} after {r.duration:.3f} s: code {r.close_code}{reason}{unclean}"
        + _provider_text(r)
    )


def _provider_text(r: DialResult) -> str:
    if r.provider == "raw":
        return ""
    broken = f", {len(r.violations)} provider rules broken" if r.violations else ""
    return f"; {r.provider}: {r.marks} marks, {r.clears} clears{broken}"


# ---- command line ----------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="ws://HOST:PORT/voice/KEY or wss://...")
    parser.add_argument("--play", metavar="FILE.wav", help="caller audio to stream (16-bit WAV, any rate and channels)")
    parser.add_argument("--play-after-greeting", action="store_true", help="start --play after the first audio_end")
    parser.add_argument("--delay", type=_seconds, default=0.0, metavar="S", help="start --play S seconds after the open")
    parser.add_argument("--record", metavar="FILE.wav", help="write the agent's audio as the caller heard it")
    parser.add_argument("--record-raw", action="store_true", help="with --record: concatenate the frames, no timing")
    parser.add_argument("--end-call-after", type=_seconds, metavar="S", help='send {"type": "end_call"} after S seconds')
    parser.add_argument("--hangup-after", type=_seconds, metavar="S", help="close the socket after S seconds")
    parser.add_argument("--max-seconds", type=_seconds, default=120.0, metavar="S", help="hang up after S seconds (default 120)")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--cafile", metavar="PEM", help="trust the certificate(s) in PEM (wss://)")
    tls.add_argument("--insecure", action="store_true", help="do not verify the server's certificate (wss://)")
    parser.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="S", help="connect and upgrade timeout (default 10)")
    parser.add_argument("--provider", choices=PROVIDERS, default="raw", help="the protocol to speak (default: raw)")
    parser.add_argument("--sample-rate", type=int, metavar="HZ", help="the provider stream's rate (Exotel 8000/16000/24000, Plivo, Telnyx L16, Vonage)")
    parser.add_argument("--codec", metavar="NAME", help="the provider's codec where it offers one (Telnyx PCMU/PCMA/L16, Plivo l16/mulaw)")
    parser.add_argument("--custom", action="append", default=[], metavar="KEY=VALUE", help="a provider custom parameter (repeatable)")
    parser.add_argument("--config", metavar="FILE", help="the daemon's ini: print the call record's transcript after the call")


def options_from_args(args: argparse.Namespace) -> DialOptions:
    """Check the arguments and load the WAV; raises ``ValueError`` with one line."""
    try:
        secure = parse_url(args.url)[0]
    except Exception as e:
        raise ValueError(f"bad URL {args.url!r}: {e}")
    if (args.cafile or args.insecure) and not secure:
        raise ValueError("--cafile and --insecure need a wss:// URL")
    if args.cafile:
        try:
            load_certificates(args.cafile)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot use --cafile {args.cafile}: {_reason(e)}")
    if args.record_raw and not args.record:
        raise ValueError("--record-raw needs --record FILE.wav")
    provider = getattr(args, "provider", "raw")
    custom = {}
    for pair in getattr(args, "custom", []) or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--custom wants KEY=VALUE, not {pair!r}")
        custom[key] = value
    if provider == "raw" and (custom or getattr(args, "sample_rate", None) or getattr(args, "codec", None)):
        raise ValueError("--sample-rate, --codec and --custom need --provider")
    if provider != "raw":
        if args.end_call_after is not None:
            raise ValueError("--end-call-after sends the raw protocol's end_call; providers end with --hangup-after")
        make_sim(provider, args.sample_rate, args.codec)  # ValueError for a rate or codec it does not offer
    play = b""
    if args.play:
        try:
            play = read_wav(args.play)
        except FileNotFoundError:
            raise ValueError(f"cannot read {args.play}: no such file")
        except (OSError, EOFError, wave.Error, ValueError) as e:
            raise ValueError(f"cannot read {args.play}: {_reason(e)}")
    return DialOptions(
        url=args.url,
        play=play,
        play_after_greeting=args.play_after_greeting,
        delay=args.delay,
        max_seconds=args.max_seconds,
        end_call_after=args.end_call_after,
        hangup_after=args.hangup_after,
        record=bool(args.record),
        record_raw=args.record_raw,
        cafile=args.cafile,
        insecure=args.insecure,
        connect_timeout=args.connect_timeout,
        provider=provider,
        sample_rate=getattr(args, "sample_rate", None),
        codec=getattr(args, "codec", None),
        custom=custom,
    )


async def _print_record(reactor: Any, config_path: str, result: DialResult, printer: Printer) -> None:
    """The daemon's record of this call, once settled: print its transcript."""
    from upvoot.ledger import store
    from upvoot.config import load_config

    try:
        config = load_config(config_path)
    except Exception as e:
        printer.error(f"cannot read the call record: {e}")
        return
    deadline = time.monotonic() + RECORD_WAIT
    while True:
        try:
            conn = store.connect(config.database, config.database_password_file)
            try:
                calls = store.transact(conn, store.list_calls, None, 20)
            finally:
                conn.close()
        except Exception as e:
            printer.error(f"cannot read the call record: {e}")
            return
        calls = [c for c in calls if c.get("state") == "settled"]
        if result.call_id is not None:
            calls = [c for c in calls if (c.get("metadata") or {}).get("call_id") == result.call_id]
        if calls:
            printer.transcript(calls[0].get("transcript") or [])
            return
        if time.monotonic() > deadline:
            printer.error("no settled call record found")
            return
        await task.deferLater(reactor, 0.2, lambda: None)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        options = options_from_args(args)
        if args.record:  # fail now, not after the call
            directory = os.path.dirname(os.path.abspath(args.record))
            if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                raise ValueError(f"cannot write {args.record}: no writable directory {directory}")
    except (OSError, ValueError) as e:
        err.write(f"error: {_reason(e) if isinstance(e, OSError) else e}\n")
        return EXIT_USAGE
    printer = Printer(out, err, json_lines=args.json)
    if args.insecure:
        printer.error("warning: --insecure: the server's certificate is not verified")

    async def main(reactor: Any) -> None:
        call = start_call(reactor, options, printer=printer)

        def on_shutdown() -> defer.Deferred[None] | None:  # Ctrl-C: hang up, then stop
            if call.done.called:
                return None
            if not call.result.opened:
                call.failed("interrupted")
                return None
            waiting: defer.Deferred[None] = defer.Deferred()

            def ended(result: Any) -> Any:
                if not waiting.called:
                    waiting.callback(None)
                return result

            call.done.addBoth(ended)
            call.hangup("interrupted")
            return waiting.addTimeout(3, reactor).addErrback(lambda f: None)

        reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
        result = await call.done
        if args.record and result.recording is not None:
            write_wav(args.record, result.recording)
        if getattr(args, "config", None) and result.opened:
            await _print_record(reactor, args.config, result, printer)
        raise SystemExit(exit_code(result))

    try:
        task.react(main)
    except SystemExit as e:
        return int(e.code or 0)
    return EXIT_OK  # not reached: react always exits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upvoot dial", description="Call an UpVoot server as a telephony provider would.")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
