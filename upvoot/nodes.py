"""A node's name in a cluster of UpVoot processes sharing one ledger.

``[upvoot] node_id`` names the process in the database: every active call
row carries it, so a node restarting settles only its own leftovers and
the crash sweeper of any node can say whose calls it settled. Empty means
the host name, cut to the allowed characters and length.
"""

from __future__ import annotations

import re
import socket

MAX_NODE_ID = 63
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,%d}" % (MAX_NODE_ID - 1))


def default_node_id(hostname: str | None = None) -> str:
    """The host name as a node id: other characters become '-', cut to ``MAX_NODE_ID``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", hostname if hostname is not None else socket.gethostname())
    name = name.lstrip("._-")[:MAX_NODE_ID]
    return name or "node"


def parse_node_id(text: str) -> str:
    """An ini value: empty -> the host name; else 1 to 63 letters, digits, '.', '_', '-'."""
    text = text.strip()
    if not text:
        return default_node_id()
    if not _NODE_RE.fullmatch(text):
        raise ValueError(f"a node id is 1 to {MAX_NODE_ID} letters, digits, '.', '_' or '-'"
                         f" (starting with a letter or digit), got {text[:80]!r}")
    return text


#: Seconds of a running call's reservation kept for its closing line: a call
#: whose points cannot be extended beyond the next heartbeat plus this is
#: told to say ``closing_no_points`` and end.
CLOSING_ALLOWANCE = 20.0
