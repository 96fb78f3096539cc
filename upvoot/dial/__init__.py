"""``upvoot dial``: a test caller that speaks UpVoot's protocol or a provider's.

Owns: the command (``command``), the call engine that streams a WAV in real
time and records what the agent says (``engine``), and the provider
simulators that speak Exotel, Twilio, Plivo, Telnyx and Vonage as those
platforms do (``providers``).

A client of the daemon, never a part of it: it must not import
``upvoot.daemon`` or ``upvoot.call``. It shares the wire types of
``upvoot.framing`` (frames, audio codecs) and reads the call's record from
``upvoot.ledger.store`` when asked to print it.
"""
