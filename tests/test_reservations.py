"""Prepaid calls in the ledger (upvoot.ledger.reserve, calls.settle_*), on SQLite and PostgreSQL.

Every test takes ``database`` and runs on both backends; the races run
real transactions on separate connections (one per "node") in threads.
"""

from __future__ import annotations

import random
import threading

import pytest
import pytest_twisted
from twisted.internet import defer

from upvoot.ledger import calls, reserve, store
from upvoot.ledger.records import AccountBusy, CallRecord, CallStart, NoPoints

T0 = 1_700_000_000.0
PPI = 2  # points per increment
INC = 60.0  # seconds per increment


@pytest.fixture
def database(any_database):
    return any_database


@pytest.fixture
def db(database):
    conn = store.connect(database)
    yield conn
    conn.close()


def tx(conn, fn, *args, **kw):
    return store.transact(conn, fn, *args, **kw)


def account(conn, name="acme", points=10) -> str:
    """An account with ``points`` and one key; returns the key's prefix."""
    _, prefix = tx(conn, store.create_key, name, "demo", T0)
    if points:
        tx(conn, store.add_points, name, points)
    return prefix


def start(prefix, call_id="c1", name="acme", node="n1", at=T0) -> CallStart:
    return CallStart(call_id=call_id, key_prefix=prefix, account=name, agent="demo", provider="raw",
                     started_at=at, node=node)


def balance(conn, name="acme"):
    return tx(conn, reserve.account_balance, name)


def record(prefix, call_id="c1", points=0, name="acme", duration=30.0) -> CallRecord:
    return CallRecord(call_id=call_id, key_prefix=prefix, account=name, agent="demo", provider="raw",
                      started_at=T0, ended_at=T0 + duration, duration=duration, end_reason="hangup",
                      points_charged=points)


def test_hold_amounts():
    assert reserve.hold_for(120.0, INC, PPI) == 4
    assert reserve.hold_for(121.0, INC, PPI) == 6
    assert reserve.covered(5, INC, PPI) == 120.0  # whole increments only
    assert reserve.covered(0, INC, 0) == float("inf")


def test_a_call_opens_holding_its_horizon_and_its_node(db):
    prefix = account(db, points=10)
    assert tx(db, reserve.open_reserved, start(prefix), 4, PPI) == 4
    assert balance(db) == (10, 4)
    call = tx(db, store.get_call, "c1")
    assert (call["state"], call["node"]) == ("active", "n1")


def test_with_less_than_the_horizon_available_it_holds_the_whole_increments_there_are(db):
    prefix = account(db, points=5)
    assert tx(db, reserve.open_reserved, start(prefix, "c1"), 8, PPI) == 4
    with pytest.raises(NoPoints):  # 1 point left: not one increment
        tx(db, reserve.open_reserved, start(prefix, "c2"), 8, PPI)
    assert balance(db) == (5, 4)


def test_no_points_for_one_increment_is_refused_and_rolls_back(db):
    prefix = account(db, points=1)
    with pytest.raises(NoPoints):
        tx(db, reserve.open_reserved, start(prefix), 4, PPI)
    assert balance(db) == (1, 0) and tx(db, store.get_call, "c1") is None
    free = account(db, "free", points=0)
    with pytest.raises(NoPoints):  # a free agent still needs an account with points
        tx(db, reserve.open_reserved, start(free, name="free"), 0, 0)
    tx(db, store.add_points, "free", 1)
    assert tx(db, reserve.open_reserved, start(free, name="free"), 0, 0) == 0


def test_max_calls_per_account_counts_active_calls_of_every_node(database):
    a, b = store.connect(database), store.connect(database)  # two nodes
    try:
        prefix = account(a, points=100)
        tx(a, reserve.open_reserved, start(prefix, "c1", node="n1"), 2, PPI, 2)
        tx(b, reserve.open_reserved, start(prefix, "c2", node="n2"), 2, PPI, 2)
        with pytest.raises(AccountBusy):
            tx(a, reserve.open_reserved, start(prefix, "c3", node="n1"), 2, PPI, 2)
        assert balance(a) == (100, 4), "the refused call holds nothing"
        tx(b, store.settle_call, record(prefix, "c2", points=2))
        assert tx(a, reserve.open_reserved, start(prefix, "c3", node="n1"), 2, PPI, 2) == 2
    finally:
        a.close()
        b.close()


def test_a_heartbeat_extends_the_hold_as_far_as_points_go(db):
    prefix = account(db, points=7)
    tx(db, reserve.open_reserved, start(prefix), 4, PPI)
    assert tx(db, reserve.beat, "c1", T0 + 15, 4, PPI) == 4, "already held"
    assert tx(db, reserve.beat, "c1", T0 + 30, 6, PPI) == 6
    assert tx(db, reserve.beat, "c1", T0 + 45, 10, PPI) == 6, "1 point left: not one increment"
    assert balance(db) == (7, 6)
    assert tx(db, store.get_call, "c1")["heartbeat_at"] == T0 + 45
    tx(db, store.settle_call, record(prefix, points=4))
    assert tx(db, reserve.beat, "c1", T0 + 60, 10, PPI) is None, "not active any more"


def test_settlement_replaces_the_hold_with_the_charge_once(db):
    prefix = account(db, points=10)
    tx(db, reserve.open_reserved, start(prefix), 6, PPI)
    assert tx(db, store.settle_call, record(prefix, points=4)) == 4
    assert balance(db) == (6, 0)
    assert tx(db, store.settle_call, record(prefix, points=4)) == 0, "once"
    call = tx(db, store.get_call, "c1")
    assert (call["state"], call["points_charged"]) == ("settled", 4)


def test_a_charge_is_capped_at_the_balance_and_the_record_says_so(db):
    prefix = account(db, points=3)
    tx(db, reserve.open_reserved, start(prefix), 2, PPI)
    tx(db, store.add_points, "acme", -2)  # the operator took points back meanwhile
    assert tx(db, store.settle_call, record(prefix, points=8)) == 1
    assert balance(db) == (0, 0)
    assert tx(db, store.get_call, "c1")["points_charged"] == 1


def test_a_call_that_never_began_is_forgotten_with_its_hold(db):
    prefix = account(db, points=10)
    tx(db, reserve.open_reserved, start(prefix), 4, PPI)
    assert tx(db, reserve.cancel_call, "c1") is True
    assert tx(db, reserve.cancel_call, "c1") is False
    assert balance(db) == (10, 0) and tx(db, store.get_call, "c1") is None


def test_a_node_settles_only_its_own_leftovers_at_start(db):
    prefix = account(db, points=100)
    tx(db, reserve.open_reserved, start(prefix, "mine", node="n1"), 4, PPI)
    tx(db, reserve.open_reserved, start(prefix, "theirs", node="n2"), 4, PPI)
    tx(db, reserve.beat, "mine", T0 + 90, 4, PPI)
    settled = tx(db, store.settle_orphans, T0 + 100, charge=lambda r: reserve.hold_for(r.duration, INC, PPI),
                 node="n1")
    assert [(r.call_id, r.duration, r.points_charged) for r in settled] == [("mine", 90.0, 4)]
    assert tx(db, store.get_call, "theirs")["state"] == "active"
    assert balance(db) == (96, 4)


def test_crash_settlement_is_claimed_once_and_only_past_the_cutoff(db):
    prefix = account(db, points=100)
    tx(db, reserve.open_reserved, start(prefix), 4, PPI)
    tx(db, reserve.beat, "c1", T0 + 30, 4, PPI)
    assert tx(db, reserve.stale_calls, T0 + 30) == []
    assert tx(db, calls.settle_crashed, "c1", T0 + 29, "crash", lambda r: 2) is None, "it beat since"
    assert tx(db, reserve.stale_calls, T0 + 31) == ["c1"]
    rec = tx(db, calls.settle_crashed, "c1", T0 + 31, "crash", lambda r: 2)
    assert (rec.end_reason, rec.duration, rec.points_charged, rec.ended_at) == ("crash", 30.0, 2, T0 + 30)
    assert tx(db, calls.settle_crashed, "c1", T0 + 31, "crash", lambda r: 2) is None
    assert balance(db) == (98, 0)


def test_sweepers_racing_on_many_calls_settle_each_once(db, database):
    prefix = account(db, points=1000)
    ids = [f"c{i}" for i in range(12)]
    for call_id in ids:
        tx(db, reserve.open_reserved, start(prefix, call_id), 4, PPI)
    won: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def sweep():  # a node: its own connection, in its own thread
        conn = store.connect(database)
        try:
            barrier.wait()
            for call_id in tx(conn, reserve.stale_calls, T0 + 60):
                if tx(conn, calls.settle_crashed, call_id, T0 + 60, "crash", lambda r: 3) is not None:
                    won.append(call_id)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=sweep) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(won) == sorted(ids), "each call settled by exactly one sweeper"
    assert balance(db) == (1000 - 3 * len(ids), 0)


def _run_calls(db, database, seed: int, n_nodes: int, n_calls: int, points: int) -> None:
    """``n_calls`` calls on one account over ``n_nodes`` nodes (threads with a
    connection each), each call open / a few beats / settle (or a crash left
    to a sweeper), in whatever interleaving the threads take."""
    prefix = account(db, points=points)
    errors: list[BaseException] = []
    work = [[i for i in range(n_calls) if i % n_nodes == node] for node in range(n_nodes)]

    def one_call(conn, i: int) -> None:
        rnd = random.Random(seed * 1000 + i)
        call_id = f"s{seed}c{i}"
        try:
            held = tx(conn, reserve.open_reserved, start(prefix, call_id, node=f"n{i % n_nodes}"), 4, PPI)
        except NoPoints:
            return
        for beat in range(rnd.randrange(0, 4)):
            held = tx(conn, reserve.beat, call_id, T0 + 15 * (beat + 1), 4 + 2 * (beat + 1), PPI)
        # the call goes on for as long as it holds points, or a little over
        charge = min(rnd.randrange(0, 12), (held or 0) + rnd.choice((0, 0, 2)))
        if rnd.random() < 0.2:
            return  # crashed: a sweeper settles it
        tx(conn, store.settle_call, record(prefix, call_id, points=charge))

    def node(mine: list[int]) -> None:
        conn = store.connect(database)
        try:
            for i in mine:  # several calls of a node overlap: each call thread-interleaved with the others
                one_call(conn, i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            conn.close()

    # more threads than nodes: calls of every node race each other
    threads = [threading.Thread(target=node, args=([i],)) for chunk in work for i in chunk]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for call_id in tx(db, reserve.stale_calls, T0 + 10_000):
        tx(db, calls.settle_crashed, call_id, T0 + 10_000, "crash", lambda r: 2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_balance_never_goes_below_zero_and_is_start_minus_the_charges(db, database, seed):
    """Many calls at once on one account that cannot pay for them all, on
    two nodes, in any interleaving: the balance ends >= 0, equal to the
    start minus the sum of the charges recorded, nothing left held."""
    _run_calls(db, database, seed, n_nodes=2, n_calls=20, points=30)
    points, held = balance(db)
    rows = tx(db, store.list_calls, "acme", limit=1000)
    assert rows and all(row["state"] == "settled" for row in rows)
    charged = sum(row["points_charged"] for row in rows)
    assert points >= 0 and held == 0
    assert points == 30 - charged


@pytest_twisted.inlineCallbacks
def test_twenty_calls_over_two_daemon_stores_keep_the_invariant(db, database):
    """The daemon's own ``Store`` (its thread pool), two of them as two
    nodes, 20 calls at once on an account that pays for a few minutes."""
    from twisted.internet import reactor

    prefix = account(db, points=24)
    nodes = [store.Store(database, reactor) for _ in range(2)]
    for s in nodes:
        s.start()

    async def one_call(i: int) -> None:
        rnd = random.Random(i)
        s = nodes[i % 2]
        call_id = f"d{i}"
        try:
            held = await s.run(reserve.open_reserved, start(prefix, call_id, node=f"n{i % 2}"), 4, PPI, 0)
        except NoPoints:
            return
        for beat in range(rnd.randrange(0, 3)):
            held = await s.run(reserve.beat, call_id, T0 + 15 * (beat + 1), 4 + 2 * (beat + 1), PPI)
        await s.run(store.settle_call, record(prefix, call_id, points=min(rnd.randrange(0, 10), held + 2)))

    try:
        yield defer.gatherResults([defer.Deferred.fromCoroutine(one_call(i)) for i in range(20)],
                                  consumeErrors=True)
    finally:
        for s in nodes:
            s.close()
    points, held = balance(db)
    rows = tx(db, store.list_calls, "acme", limit=1000)
    assert len(rows) < 20, "some calls were refused: the account could not hold them all"
    assert points >= 0 and held == 0 and points == 24 - sum(row["points_charged"] for row in rows)
