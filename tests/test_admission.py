"""The abuse limits, on a task.Clock; the admission policy over a real SQLite ledger."""

from twisted.internet.task import Clock

from upvoot.daemon.admission import AbuseGuard, peer_host


def test_failed_keys_block_an_address_for_the_window_only():
    clock = Clock()
    g = AbuseGuard(clock, failure_limit=3, failure_window=60.0, max_calls_per_account=0)
    for _ in range(2):
        g.failed("10.0.0.1")
    assert not g.blocked("10.0.0.1")
    g.failed("10.0.0.1")
    assert g.blocked("10.0.0.1")
    assert not g.blocked("10.0.0.2"), "other addresses are not affected"
    clock.advance(59.0)
    assert g.blocked("10.0.0.1")
    clock.advance(1.5)
    assert not g.blocked("10.0.0.1")


def test_blocking_is_logged_once_per_window():
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        g = AbuseGuard(clock, failure_limit=1, failure_window=10.0, max_calls_per_account=0)
        g.failed("h")
        for _ in range(5):
            assert g.blocked("h")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e.get("event") for e in events].count("auth.rate_limited") == 1


def test_no_limit_when_zero_and_memory_is_bounded():
    clock = Clock()
    g = AbuseGuard(clock, failure_limit=0, failure_window=10.0, max_calls_per_account=0)
    g.failed("h")
    assert not g.blocked("h")
    g = AbuseGuard(clock, failure_limit=5, failure_window=10.0, max_calls_per_account=0)
    g.MAX_TRACKED = 100
    for i in range(1000):
        g.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(g._failures) <= 100


def test_peer_host():
    assert peer_host("tcp4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_host("tcp6:[::1]:5000") == "::1"
    assert peer_host("203.0.113.9") == "203.0.113.9"


def test_the_once_per_window_log_memory_is_pruned_and_bounded():
    """Every rate-limited address used to stay in ``_logged`` forever."""
    clock = Clock()
    g = AbuseGuard(clock, failure_limit=1, failure_window=10.0, max_calls_per_account=0)
    for i in range(50):
        host = f"10.1.0.{i}"
        g.failed(host)
        assert g.blocked(host)
    assert len(g._logged) == 50
    clock.advance(10.0)  # a window later, one more blocked address: the old log times go
    g.failed("10.2.0.1")
    assert g.blocked("10.2.0.1")
    assert list(g._logged) == ["10.2.0.1"]
    g.MAX_TRACKED = 20
    for i in range(100):
        host = f"10.3.0.{i}"
        g.failed(host)
        assert g.blocked(host)
    assert len(g._logged) <= 20 and len(g._failures) <= 20


def test_a_pruned_address_is_logged_again_a_window_later():
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        g = AbuseGuard(clock, failure_limit=1, failure_window=10.0, max_calls_per_account=0)
        g.failed("h")
        assert g.blocked("h")
        clock.advance(5.0)
        g.failed("h")
        assert g.blocked("h")  # within the window: not logged again
        clock.advance(5.0)
        assert g.blocked("h")  # a window after the first log line: logged again
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e.get("event") for e in events].count("auth.rate_limited") == 2


# ---- the admission policy ------------------------------------------------------------

import sqlite3  # noqa: E402

import pytest  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from twisted.internet import defer  # noqa: E402
from twisted.logger import formatEvent, globalLogPublisher  # noqa: E402

from upvoot.config import load_config  # noqa: E402
from upvoot.daemon.admission import REASONS, AdmissionPolicy  # noqa: E402
from upvoot.daemon.metrics import Metrics  # noqa: E402
from upvoot.daemon.seams import Admission, Refusal  # noqa: E402
from upvoot.ledger import reserve, store  # noqa: E402
from upvoot.ledger.store import KeyInfo, StoreError  # noqa: E402
from upvoot.testing import agent_config, make_agent  # noqa: E402

KEY = "uvk_AbCdEfGh" + "k" * 32
POOR = "uvk_PoOrPoOr" + "p" * 32
REVOKED = "uvk_ReVoKeDd" + "r" * 32
GONE = "uvk_GoNeGoNe" + "g" * 32
PEER = "tcp4:203.0.113.9:5555"

INI = """\
[upvoot]
max_calls = 2
lag_budget = 150ms
max_calls_per_account = 1
auth_failure_limit = 2

[agent:demo]
"""


class Keys:
    """The store: ``authenticate`` answers from ``keys`` (``hold`` keeps lookups
    pending); ``run`` runs the real transaction functions, synchronously, on
    an SQLite ledger holding those keys' accounts (``open_error``: it fails)."""

    def __init__(self, path) -> None:
        self.conn = store.connect(str(path))
        self.open_error: Exception | None = None
        self.keys = {
            KEY: KeyInfo("uvk_AbCdEfGh", "acme", "demo", False, 10),
            POOR: KeyInfo("uvk_PoOrPoOr", "poor", "demo", False, 0),
            REVOKED: KeyInfo("uvk_ReVoKeDd", "acme", "demo", True, 10),
            GONE: KeyInfo("uvk_GoNeGoNe", "acme", "retired", False, 10),
        }
        self.error: Exception | None = None
        self.hold = False
        self.pending: list[defer.Deferred] = []
        self.asked: list[str] = []

    def authenticate(self, key: str) -> defer.Deferred:
        self.asked.append(key)
        if self.error is not None:
            return defer.fail(self.error)
        if self.hold:
            d = defer.Deferred()
            self.pending.append((d, self.keys.get(key)))
            return d
        return defer.succeed(self.keys.get(key))

    def answer(self) -> None:
        pending, self.pending = self.pending, []
        for d, info in pending:
            d.callback(info)

    def ledger(self) -> None:
        for key, info in self.keys.items():
            self.conn.execute("INSERT INTO accounts (name, points, created_at) VALUES (?, ?, 0)"
                              " ON CONFLICT DO NOTHING", (info.account, info.points))
            self.conn.execute("INSERT INTO api_keys (prefix, key_hash, account, agent, created_at)"
                              " VALUES (?, ?, ?, ?, 0)", (info.prefix, store.hash_key(key), info.account, info.agent))
        self.conn.commit()

    def run(self, fn, *args, **kw) -> defer.Deferred:
        if self.open_error is not None:
            return defer.fail(self.open_error)
        return defer.maybeDeferred(store.transact, self.conn, fn, *args, **kw)

    def active(self, account: str) -> int:
        """Active calls of ``account`` in the ledger."""
        return self.conn.execute("SELECT COUNT(*) FROM calls WHERE account = ? AND state = 'active'",
                                 (account,)).fetchone()[0]


class World:
    def __init__(self, tmp_path) -> None:
        ini = tmp_path / "upvoot.ini"
        ini.write_text(INI)
        self.config = load_config(str(ini))
        self.clock = Clock()
        self.lifecycle = SimpleNamespace(ready=True, draining=False, agents=SimpleNamespace(
            agents={"demo": make_agent(agent_config(name="demo", provider="auto"))}))
        self.keys = Keys(tmp_path / "ledger.sqlite3")
        self.keys.ledger()
        self.guard = AbuseGuard(self.clock, self.config.auth_failure_limit, self.config.auth_failure_window,
                                self.config.max_calls_per_account)
        self.pool = SimpleNamespace(full=False, saturated=lambda: self.pool.full)
        self.lag = SimpleNamespace(average=0.0)
        self.metrics = Metrics()
        self.policy = AdmissionPolicy(self.config, self.lifecycle, self.keys, self.guard, self.pool, self.lag,
                                      self.metrics)

    def admit(self, key: str = KEY, path: str | None = None, peer: str = PEER, **params: str):
        d = self.policy.admit(path if path is not None else f"/voice/{key}", peer, {}, params)
        out = []
        d.addBoth(out.append)
        assert out, "admit has not answered"
        assert isinstance(out[0], (Admission, Refusal)), out[0]
        return out[0]


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.keys.conn.close()


def refused(result, status: int) -> None:
    assert isinstance(result, Refusal), result
    assert (result.status, result.reason) == (status, REASONS[status])
    retry = dict(result.headers).get("Retry-After")
    assert (retry is not None) == (status == 503), result.headers
    if retry is not None:
        assert int(retry) > 0


# the reasons of a 503, moved from tests/test_service.py (there: service.admission_refusal())

def test_admission_refuses_while_starting_then_admits(world):
    world.lifecycle.ready = False
    assert world.policy.busy() == "starting"
    world.lifecycle.ready = True
    assert world.policy.busy() is None


def test_admission_refuses_while_draining(world):
    world.lifecycle.draining = True
    assert world.policy.busy() == "draining"


def test_admission_counts_running_and_reserved_calls_against_max_calls(world):
    """Waiting connections and running calls hold a slot alike (a running
    call took over its admission's): one count, ``held``."""
    first = world.admit()
    assert isinstance(first, Admission) and world.policy.held == 1
    assert world.policy.busy() is None  # 1 of 2
    world.guard.max_calls_per_account = 0
    second = world.admit()
    assert isinstance(second, Admission)
    assert world.policy.busy() == "max_calls (2) reached"
    first.take_over()()  # a call that took its slot over ends
    assert world.policy.busy() is None
    third = world.admit()
    assert world.policy.busy() == "max_calls (2) reached"
    refused(world.admit(), 503)
    second.release()
    third.release()
    assert world.policy.held == 0 and world.policy.busy() is None


def test_admission_refuses_when_the_worker_pool_is_saturated(world):
    world.pool.full = True
    assert world.policy.busy() == "worker pool saturated"


def test_admission_refuses_when_reactor_lag_is_over_budget(world):
    world.lag.average = 0.149
    assert world.policy.busy() is None
    world.lag.average = 0.2
    assert world.policy.busy() == "reactor lag 200 ms over budget"


def test_the_first_reason_wins(world):
    world.lifecycle.ready = False
    world.lifecycle.draining = True
    world.lag.average = 1.0
    assert world.policy.busy() == "starting"
    world.lifecycle.ready = True
    assert world.policy.busy() == "draining"


def test_refusals_are_counted_by_status(world):
    for status in (401, 401, 503):
        world.policy.note_refusal(status)
    assert world.policy.refusals == {401: 2, 503: 1}


# every status admit answers

def test_an_admission_holds_a_slot_and_the_accounts_count_until_released(world):
    a = world.admit(provider="twilio", extra="x")
    assert isinstance(a, Admission)
    assert (a.key_prefix, a.account, a.agent, a.provider, a.peer) == ("uvk_AbCdEfGh", "acme", "demo", "twilio", PEER)
    assert a.params == {"provider": "twilio", "extra": "x"}
    assert world.policy.held == 1 and world.keys.active("acme") == 1
    a.release()
    assert world.policy.held == 0 and world.keys.active("acme") == 0
    a.release()  # idempotent
    assert world.policy.held == 0 and world.keys.active("acme") == 0
    assert world.policy.refusals == {}


def test_a_call_that_took_the_admission_over_gives_it_back_at_its_end(world):
    a = world.admit()
    end = a.take_over()
    a.release()  # the adapter's release after the call started does nothing
    assert world.policy.held == 1 and world.keys.active("acme") == 1
    end()
    end()
    assert world.policy.held == 0
    assert world.keys.active("acme") == 1, "the call's row is settled with its record, not forgotten"
    with pytest.raises(ValueError):
        a.take_over()


def test_the_provider_defaults_to_the_agents(world):
    assert world.admit().provider == "auto"


def test_404_for_any_other_path(world):
    refused(world.admit(path="/other"), 404)
    refused(world.admit(path="/"), 404)
    assert world.keys.asked == [] and world.policy.refusals == {404: 2}


@pytest.mark.parametrize("key", ["", "nosuchkey", "uvk_Unknown0" + "u" * 32, "a/b", REVOKED])
def test_401_for_a_missing_unknown_or_revoked_key(world, key, logged):
    refused(world.admit(key), 401)
    assert world.policy.refusals == {401: 1} and world.policy.held == 0
    assert world.metrics.registry.get_sample_value("upvoot_auth_failures_total") == 1
    assert world.metrics.registry.get_sample_value("upvoot_handshake_refusals_total", {"status": "401"}) == 1
    [line] = [e for e in logged if e.get("event") == "auth.denied"]
    assert PEER in formatEvent(line)
    if key == REVOKED:
        assert "revoked" in formatEvent(line)


def test_failed_keys_then_429_without_a_lookup(world):
    for _ in range(2):
        refused(world.admit("uvk_Unknown0" + "u" * 32), 401)
    asked = len(world.keys.asked)
    refused(world.admit(), 429)  # even with a good key: the address is blocked
    assert len(world.keys.asked) == asked
    assert isinstance(world.admit(peer="tcp4:198.51.100.1:1"), Admission), "other addresses are not affected"


@pytest.mark.parametrize("why", ["starting", "draining", "max_calls", "pool", "lag"])
def test_503_with_retry_after_when_busy_without_a_lookup(world, why, logged):
    if why == "starting":
        world.lifecycle.ready = False
    elif why == "draining":
        world.lifecycle.draining = True
    elif why == "max_calls":
        world.policy.held = 2
    elif why == "pool":
        world.pool.full = True
    else:
        world.lag.average = 0.5
    refused(world.admit(), 503)
    assert world.keys.asked == [] and world.policy.refusals == {503: 1}
    assert [e.get("event") for e in logged].count("handshake.busy") == 1


def test_503_when_the_key_lookup_fails_and_the_log_does_not_quote_the_key(world, logged):
    world.keys.error = StoreError(f"database is locked while looking up {KEY}")
    refused(world.admit(), 503)
    assert world.policy.held == 0
    [line] = [e for e in logged if e.get("event") == "auth.error"]
    assert "database is locked" in formatEvent(line)


def test_402_when_the_account_has_no_points(world, logged):
    refused(world.admit(POOR), 402)
    [line] = [e for e in logged if e.get("event") == "auth.no_points"]
    assert "uvk_PoOrPoOr" in formatEvent(line) and "poor" in formatEvent(line)
    assert world.policy.held == 0 and world.keys.active("poor") == 0


def test_503_when_the_key_names_an_agent_not_configured(world):
    refused(world.admit(GONE), 503)
    assert world.policy.held == 0


def test_429_when_the_account_holds_its_limit_of_calls(world):
    a = world.admit()
    assert isinstance(a, Admission)
    refused(world.admit(), 429)
    a.release()
    assert isinstance(world.admit(), Admission)


def test_400_for_an_unknown_provider(world, logged):
    refused(world.admit(provider="jambonz"), 400)
    assert world.policy.held == 0 and world.policy.refusals == {400: 1}
    refused(world.admit(provider="x" * 1000), 400)
    [_, line] = [e for e in logged if e.get("event") == "handshake.bad_provider"]
    assert len(formatEvent(line)) < 200


def test_upgrades_racing_through_the_lookup_do_not_exceed_max_calls(world):
    """Both pass the first check while their keys are looked up; the slots
    are counted when the answers come, so the third is refused."""
    world.guard.max_calls_per_account = 0
    world.keys.hold = True
    results = []
    for _ in range(3):
        world.policy.admit(f"/voice/{KEY}", PEER, {}, {}).addCallback(results.append)
    assert results == [] and world.policy.held == 0
    world.keys.answer()
    assert [type(r).__name__ for r in results] == ["Admission", "Admission", "Refusal"]
    assert results[2].status == 503 and world.policy.held == 2


def test_draining_during_the_lookup_refuses(world):
    world.keys.hold = True
    results = []
    world.policy.admit(f"/voice/{KEY}", PEER, {}, {}).addCallback(results.append)
    world.lifecycle.draining = True
    world.keys.answer()
    refused(results[0], 503)
    assert world.policy.held == 0


def test_no_log_line_ever_holds_a_key_only_a_valid_keys_prefix(world, logged):
    world.guard.failure_limit = 0
    for key in (KEY, POOR, REVOKED, GONE, "uvk_Unknown0" + "u" * 32):
        world.admit(key)
        world.admit(key, provider="nope")
    world.keys.error = StoreError(f"locked {KEY}")
    world.admit(KEY)
    world.keys.error = None
    world.lifecycle.ready = False
    world.admit(KEY)
    assert logged
    for event in logged:
        text = formatEvent(event) + repr(event)
        for key in (KEY, POOR, REVOKED, GONE):
            assert key not in text and key[12:] not in text, text
    assert "uvk_Unknown0" not in "".join(formatEvent(e) for e in logged), "an unknown key's prefix is never logged"


def test_429_when_the_address_holds_its_limit_of_calls(world, logged):
    """``max_calls_per_address``: a connection waiting to become a call (a slot
    holder) counts against its address from its admission until released;
    other addresses are not affected."""
    world.guard.max_calls_per_account = 0
    world.guard.max_calls_per_address = 1
    a = world.admit()
    assert isinstance(a, Admission) and world.guard.address_calls("203.0.113.9") == 1
    refused(world.admit(), 429)
    assert [e["host"] for e in logged if e.get("event") == "handshake.address_limit"] == ["203.0.113.9"]
    other = world.admit(peer="tcp4:203.0.113.10:5555")
    assert isinstance(other, Admission), "another address is not limited"
    other.release()
    a.release()
    a.release()  # idempotent: one count back, not two
    assert world.guard.address_calls("203.0.113.9") == 0
    assert isinstance(world.admit(), Admission)


# ---- the opening in the ledger: points held, cluster-wide counts, outages ------------------------


def test_an_admitted_call_is_active_in_the_ledger_on_this_node_holding_its_horizon(world):
    a = world.admit()
    call = store.transact(world.keys.conn, store.get_call, a.call_id)
    assert (call["state"], call["node"], call["metadata"]) == ("active", world.config.node_id, {"peer": PEER})
    # reservation_horizon 2m at 1 point a minute
    assert a.held == 2 and store.transact(world.keys.conn, reserve.account_balance, "acme") == (10, 2)
    assert world.policy.opened == {a.call_id: a}
    a.release()  # never began: forgotten, its points given back
    assert store.transact(world.keys.conn, store.get_call, a.call_id) is None
    assert store.transact(world.keys.conn, reserve.account_balance, "acme") == (10, 0)
    assert world.policy.opened == {}


def test_402_when_running_calls_hold_the_points(world, logged):
    world.guard.max_calls_per_account = 0
    world.keys.conn.execute("UPDATE accounts SET points = 2 WHERE name = 'acme'")
    world.keys.conn.commit()
    a = world.admit()
    assert isinstance(a, Admission) and a.held == 2
    refused(world.admit(), 402)
    assert world.policy.held == 1 and world.keys.active("acme") == 1
    assert [e["account"] for e in logged if e.get("event") == "auth.no_points"] == ["acme"]
    a.release()
    assert isinstance(world.admit(), Admission)


def test_max_calls_per_account_counts_the_calls_of_other_nodes(world):
    other = store.CallStart(call_id="elsewhere", key_prefix="uvk_AbCdEfGh", account="acme", agent="demo",
                            provider="raw", started_at=0.0, node="another-node")
    store.transact(world.keys.conn, reserve.open_reserved, other, 2, 1)
    refused(world.admit(), 429)
    assert world.policy.held == 0 and world.keys.active("acme") == 1


def test_503_while_the_ledger_cannot_open_calls_and_recovery_at_its_next_answer(world, logged):
    world.keys.open_error = sqlite3.OperationalError("unable to open database file")
    refused(world.admit(), 503)
    refused(world.admit(), 503)
    assert world.policy.database.problem == "unreachable" and world.policy.held == 0
    world.keys.open_error = None
    assert isinstance(world.admit(), Admission)
    assert world.policy.database.problem is None
    events = [e.get("event") for e in logged]
    assert events.count("store.unreachable") == 1 and events.count("store.reachable") == 1
