"""Process environment the daemon needs before any model library loads.

onnxruntime (used by piper and Silero) otherwise writes a device id under the
home directory and keeps trying to reach its telemetry host; its API switch
does not stop that, the environment variable does. ``HF_HUB_OFFLINE`` makes
sure faster-whisper never tries to download a model: models come from
installed packages.
"""

import os


def set_offline_environment() -> None:
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
