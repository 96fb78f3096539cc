"""Test keys: what the page needs to call an agent through the daemon's own front door.

``POST /console/api/test-key`` ``{"agent", "account"}`` mints a console
key (``upvoot.ledger.console_keys``): stored hashed like any key, kind
``console``, single-use (the call that opens with it claims it, and a
second connection with the same key is a 401), expiring ``console_key_ttl``
after it is minted. The answer is the one place the console hands a key
out: ``{"key", "prefix", "expires_at", "voice_url"}``, where ``voice_url``
is the public listener's ``ws[s]://host:port/voice/`` (the page appends
the key and speaks the raw protocol to it, exactly as a provider would).
The log names the key by its prefix only.

``GET /console/api/agents`` lists what the page may choose from: the
configured agents, and the accounts with their points (``available``:
points minus what running calls hold, never below 0).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.server import Request

from upvoot.console.http import BadRequest, send_json
from upvoot.ledger import console_keys, store as storemod

_log = Logger()


def _text_field(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > 200:
        raise BadRequest(400, f"{name!r} must be a name")
    return value


async def agents(console: Any, request: Request) -> bytes:
    service = console.service
    accounts = await service.store.run(storemod.list_accounts)
    return send_json(request, {
        "agents": [{"name": name} for name in sorted(service.config.agents)],
        "accounts": [{"name": a["name"], "points": a["points"],
                      "available": max(0, a["points"] - a.get("reserved", 0))} for a in accounts],
        "ready": bool(getattr(service, "ready", True)),
    })


async def mint(console: Any, request: Request, body: dict) -> bytes:
    service = console.service
    agent = _text_field(body, "agent")
    account = _text_field(body, "account")
    if agent not in service.config.agents:
        raise BadRequest(404, f"no agent named {agent!r}")
    voice = console.voice_origin(request)
    if voice is None:
        raise BadRequest(503, "no public listener a browser can reach (listen has no tcp: or ssl: endpoint)")
    now = console.wall()
    try:
        key, prefix, expires_at = await service.store.run(
            console_keys.mint_console_key, account, agent, now, service.config.console_key_ttl)
    except storemod.UnknownAccount:
        raise BadRequest(404, f"no account named {account!r}") from None
    except storemod.StoreError as e:
        raise BadRequest(400, str(e)) from None
    _log.info("Console key {prefix} minted for agent {agent}, account {account}", event="console.key_minted",
              prefix=prefix, agent=agent, account=account)
    return send_json(request, {"key": key, "prefix": prefix, "expires_at": expires_at,
                               "voice_url": voice + "/voice/"}, keep_key=key)
