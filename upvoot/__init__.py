"""UpVoot: a self-hosted voice-agent bridge for phone calls over WebSocket."""

__version__ = "0.1.0"
