"""Which provider is talking: guess the dialect from the first frames, and
build its codec.

Rules (the provider notes' closing table, as pipecat's runner does):

  binary frame                                          -> "raw"
  {"event": "websocket:connected", ...}                 -> "vonage"
  start with top-level ``stream_id`` and
      ``start.call_control_id``                         -> "telnyx"
  ``start.streamId`` + ``start.callId``                 -> "plivo"
  ``start.stream_sid`` + ``start.call_sid`` + ``start.account_sid``
      (keys matched case-insensitively, ``Event`` too)  -> "exotel"
  ``start.streamSid`` + ``start.callSid``               -> "twilio", unless
      the key ``Event`` is capitalised or ``mediaFormat.encoding`` names
      linear PCM (raw/slin/l16), which is Exotel's camelCase variant
  a JSON object without ``event`` carrying ``callSid`` or
      ``sampleRate``                                    -> "jambonz" (no codec yet)
  anything else (``connected``, media, not JSON, ...)   -> None

The first frame of Twilio, Exotel and Telnyx is ``connected``, which names
nobody: ``detect`` returns None and the caller should look at the next text
frame (the ``start``), then feed both frames to the codec it builds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from upvoot.framing.base import Framing
from upvoot.framing.convert import pick

PROVIDERS = ("raw", "exotel", "twilio", "plivo", "telnyx", "vonage")


def _has(obj: object, *names: str) -> bool:
    return all(pick(obj, n) is not None for n in names)


def detect(first_frame: str | bytes) -> str | None:
    """The provider name for a first frame, or None when it does not tell."""
    if isinstance(first_frame, (bytes, bytearray, memoryview)):
        return "raw"
    try:
        msg = json.loads(first_frame)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(msg, dict):
        return None
    event = pick(msg, "event")
    if event is None:
        if "callSid" in msg or "sampleRate" in msg:
            return "jambonz"
        return None
    if event == "websocket:connected":
        return "vonage"
    start = pick(msg, "start")
    if not isinstance(start, dict):
        return None
    if "stream_id" in msg and "call_control_id" in start:
        return "telnyx"
    if "streamId" in start and "callId" in start:
        return "plivo"
    if _has(start, "stream_sid", "call_sid", "account_sid") and "streamSid" not in start:
        return "exotel"
    if "streamSid" in start and "callSid" in start:
        encoding = str(pick(pick(start, "mediaFormat", "media_format"), "encoding") or "").lower()
        if "event" not in msg or any(w in encoding for w in ("raw", "slin", "l16", "pcm")):
            return "exotel"
        return "twilio"
    return None


def make_framing(name: str, params: Mapping[str, str] | None = None) -> Framing:
    """The codec for provider ``name``; ``params`` are the URL's query
    parameters (``sample-rate``, ``codec``, ...). ValueError for an unknown
    name or a bad parameter."""
    params = params or {}
    if name == "raw":
        from upvoot.framing.raw import RawFraming

        return RawFraming()
    if name == "exotel":
        from upvoot.framing.exotel import ExotelFraming

        return ExotelFraming.from_params(params)
    if name == "twilio":
        from upvoot.framing.twilio import TwilioFraming

        return TwilioFraming.from_params(params)
    if name == "plivo":
        from upvoot.framing.plivo import PlivoFraming

        return PlivoFraming.from_params(params)
    if name == "telnyx":
        from upvoot.framing.telnyx import TelnyxFraming

        return TelnyxFraming.from_params(params)
    if name == "vonage":
        from upvoot.framing.vonage import VonageFraming

        return VonageFraming.from_params(params)
    raise ValueError(f"no framing for provider {name!r} (known: {', '.join(PROVIDERS)})")
