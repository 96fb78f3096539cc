"""``upvoot dial``: a test caller that speaks UpVoot's protocol or a provider's.

Owns: the command line (``command``), the call from the caller's side
(``engine``: the 20 ms send loop, timers, bookkeeping), its socket
(``connect``: Autobahn client, TLS, ``dial``/``start_call``), what the
call is asked and what it came to (``result``), the caller's audio and ears
(``media``: ``AudioSource``, ``AgentRecorder``, ``ProviderBuffer``), and
the provider simulators that speak Exotel, Twilio, Plivo, Telnyx and Vonage
as those platforms do (``simulator``: the shared base; ``providers``: each
provider).

A client of the daemon, never a part of it: it must not import
``upvoot.daemon`` or ``upvoot.call``. It shares the wire types of
``upvoot.framing`` (frames, audio codecs) and reads the call's record from
``upvoot.ledger.store`` when asked to print it.

The public surface is below (``__all__``); bench/ and the tests import from
here. Names load on first use, so importing ``upvoot.dial`` (as ``upvoot.cli``
does before it needs the dialer) pulls in neither Autobahn nor the command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module of this package that defines it
_EXPORTS = {
    "dial": "connect",
    "start_call": "connect",
    "tls_options": "connect",
    "Call": "engine",
    "CallTransport": "engine",
    "BURST_GAP": "engine",
    "MAX_CATCH_UP_FRAMES": "engine",
    "DialOptions": "result",
    "DialResult": "result",
    "Burst": "result",
    "exit_code": "result",
    "EXIT_OK": "result",
    "EXIT_FAILED": "result",
    "EXIT_USAGE": "result",
    "EXIT_REFUSED": "result",
    "AudioSource": "media",
    "PlayThenSilence": "media",
    "AgentRecorder": "media",
    "FrameConcatenation": "media",
    "ProviderBuffer": "media",
    "FRAME_SECONDS": "media",
    "SILENT_FRAME": "media",
    "JITTER_DELAY": "media",
    "ProviderSim": "simulator",
    "AgentAudio": "simulator",
    "MarkSent": "simulator",
    "Cleared": "simulator",
    "ControlMessage": "simulator",
    "Violation": "simulator",
    "SimEvent": "simulator",
    "make_sim": "providers",
    "PROVIDERS": "providers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ loads these
    from upvoot.dial.connect import dial, start_call, tls_options
    from upvoot.dial.engine import BURST_GAP, MAX_CATCH_UP_FRAMES, Call, CallTransport
    from upvoot.dial.media import (
        FRAME_SECONDS,
        JITTER_DELAY,
        SILENT_FRAME,
        AgentRecorder,
        AudioSource,
        FrameConcatenation,
        PlayThenSilence,
        ProviderBuffer,
    )
    from upvoot.dial.providers import PROVIDERS, make_sim
    from upvoot.dial.result import (
        EXIT_FAILED,
        EXIT_OK,
        EXIT_REFUSED,
        EXIT_USAGE,
        Burst,
        DialOptions,
        DialResult,
        exit_code,
    )
    from upvoot.dial.simulator import AgentAudio, Cleared, ControlMessage, MarkSent, ProviderSim, SimEvent, Violation
