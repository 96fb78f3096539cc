"""A fuzz target for the opening handshake: hypothesis-made request lines and
headers, sent over raw TCP to the real daemon (issue 9, items 4 and 7).

Every input is answered with an HTTP status or a close, within a bound, never
left hanging; afterwards the daemon still greets a legitimate call and no
line it logged during the whole run holds a key (some inputs carry the real
key in odd request lines)."""

from __future__ import annotations

import base64
import collections
import time

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.hostile.conftest import assert_no_key_logged, assert_still_serves, exchange

pytestmark = pytest.mark.slow

EXAMPLES = 300
#: seconds an input may take to be answered or closed
BOUND = 3.0
KEY = b"{KEY}"  # replaced by a real key of the daemon under test

WS_KEY = base64.b64encode(b"0123456789abcdef")
STANDARD = [(b"Host", b"127.0.0.1"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", WS_KEY), (b"Sec-WebSocket-Version", b"13")]

junk = st.binary(max_size=40)
text = st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass"))
word = st.text(st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs")), max_size=20).map(str.encode)


def mostly(good, *bad):
    """Well-formed parts three times in four, so that many inputs get past the request line."""
    broken = st.one_of(*bad)
    return st.integers(0, 3).flatmap(lambda i: good if i else broken)


methods = mostly(st.just(b"GET"), st.sampled_from([b"POST", b"get", b"HEAD", b"CONNECT", b"GET GET", b"", b"G\x00T"]),
                 junk)
paths = mostly(
    st.tuples(st.sampled_from([b"/voice/" + KEY, b"/voice/" + KEY + b"?provider=twilio", b"/voice/",
                               b"/voice/uvk_" + b"x" * 32, b"/", b"/x?redirect=https%3A%2F%2Fevil.example%2F",
                               b"/voice/../" + KEY, b"*", b"http://evil.example/voice/" + KEY]),
              mostly(st.just(b""), word, junk, text)).map(b"".join),
    junk, text,
)
versions = mostly(st.just(b"HTTP/1.1"), st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 x", b"",
                                                          b"HTTP/", b"HTTP/1.1\x00"]), junk)
separators = mostly(st.just(b" "), st.sampled_from([b"  ", b"\t", b"", b" \x00 "]))
names = st.one_of(st.sampled_from([b"Host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version",
                                   b"X-Forwarded-For", b"Origin", b"Sec-WebSocket-Protocol",
                                   b"Sec-WebSocket-Extensions",
                                   b"Content-Length", b"Transfer-Encoding", b"X-Pad", b""]), junk, text)
values = st.one_of(st.sampled_from([b"websocket", b"Upgrade", b"13", b"8", WS_KEY, b"127.0.0.1", b"127.0.0.1:0",
                                    b"permessage-deflate; client_max_window_bits", b"chunked", b"-1", b"\x00", KEY,
                                    b"A" * 9000]), junk, text)


@st.composite
def requests(draw) -> bytes:
    line = draw(methods) + draw(separators) + draw(paths) + draw(separators) + draw(versions)
    headers = [h for h in STANDARD if draw(st.integers(0, 7))]  # each kept 7 times in 8
    headers += draw(st.lists(st.tuples(names, values), max_size=4))
    headers = draw(st.permutations(headers))
    colon = draw(st.sampled_from([b": "] * 6 + [b":", b" : ", b""]))
    return b"\r\n".join([line] + [n + colon + v for n, v in headers]) + b"\r\n\r\n"


def test_handshake_fuzz(daemon):
    key = daemon.attacker.encode()
    statuses: collections.Counter = collections.Counter()
    slowest = [0.0]
    pages: list[bytes] = []  # answers that are a page or a redirect: the public port has none
    t0 = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              phases=(Phase.explicit, Phase.generate), report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    @example(b"GET /voice/{KEY} extra HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: " + WS_KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    @example(b"GET /voice/{KEY}\r\nHost: x\r\n\r\n")
    @example(b"GET /voice/{KEY} HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"A" * 20000 + b"\r\n\r\n")
    def one(data: bytes) -> None:
        data = data.replace(KEY, key)
        reply = exchange(daemon, data, timeout=BOUND)
        statuses[reply.status if reply.status is not None else reply.ended] += 1
        slowest[0] = max(slowest[0], reply.elapsed)
        assert reply.answered, f"no answer and not closed within {BOUND:g}s: {data[:300]!r}"
        assert reply.status is None or 100 <= reply.status < 600, reply.head[:200]
        if reply.status in (200, 301, 302, 303, 307, 308) or "location" in reply.headers:
            pages.append(data.replace(key, b"<KEY>")[:120])

    one()
    inputs = sum(statuses.values())
    print(f"\nhandshake fuzz: {inputs} inputs in {time.monotonic() - t0:.1f}s, slowest answer "
          f"{slowest[0] * 1000:.0f} ms; outcomes {dict(statuses)}")
    assert inputs >= EXAMPLES
    assert not pages, f"{len(pages)} inputs got a page or a redirect, e.g. {pages[:3]}"
    log = daemon.test_log()
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)
