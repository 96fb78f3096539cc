"""The ledger's speed on SQLite and on PostgreSQL: what one node (or two)
can open, heartbeat and settle per second through the daemon's own
``Store`` (the adbapi pool, on the real reactor), how the reactor fares
meanwhile, and N callers racing for one account's points.

    .venv/bin/python bench/ledger.py [--calls 1000] [--concurrency 16] [--racers 200]
                                     [--postgresql URL] [--pool 4] [--admission 50]

For each backend:

- ``open``: calls opened with a reservation (``reserve.open_reserved``),
  ``beat``: heartbeats extending it (``reserve.beat``), ``settle``: calls
  settled (``store.settle_call``): operations per second with
  ``--concurrency`` transactions in flight, and the reactor's worst and p99
  lateness (a 10 ms ticker) while they ran;
- ``2 nodes``: two Stores (two pools, as two daemons) settling at once;
- ``race``: ``--racers`` calls opening at once on one account that can pay
  for a tenth of them: how many got in, how long it took, and the ledger's
  invariants after all settled (balance >= 0, = start - charges; nothing
  left reserved);
- ``admission`` (with ``--admission N``): N WebSocket upgrades, one after the
  other, against a real daemon (``tests.daemon``) on that backend: upgrade
  request to 101 Switching Protocols, p50 and p99 (key lookup, reservation,
  opening of the call row).

PostgreSQL runs in a database of its own (``upvoot_bench_<random>``) on the
server ``--postgresql`` names (default: ``$UPVOOT_TEST_POSTGRESQL`` or the
tests' default), dropped at the end. Figures are for this machine and its
load: print ``uptime`` with them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from twisted.internet import defer, task  # noqa: E402

from bench.load import percentile  # noqa: E402
from tests.pg import server_url, with_dbname  # noqa: E402
from upvoot.ledger import reserve, store  # noqa: E402
from upvoot.ledger.records import NoPoints  # noqa: E402
from upvoot.ledger.store import CallRecord, CallStart  # noqa: E402

T0 = time.time()


class Lag:
    """Reactor lateness of a 10 ms ticker."""

    def __init__(self, reactor) -> None:
        self.reactor, self.late, self._last = reactor, [], None
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def _tick(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            self.late.append(max(0.0, now - self._last - 0.01))
        self._last = now

    def __enter__(self) -> "Lag":
        self._loop.start(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.stop()

    def text(self) -> str:
        if not self.late:
            return "lag -"
        return f"lag p99 {percentile(self.late, 99) * 1000:.1f} ms, max {max(self.late) * 1000:.1f} ms"


def _start(i: int, prefix: str, account: str = "acme", tag: str = "c") -> CallStart:
    return CallStart(f"{tag}{i}", prefix, account, "demo", "raw", T0 + i * 0.001, {"caller": "+100"})


def _record(start: CallStart, points: int = 1) -> CallRecord:
    return CallRecord(
        call_id=start.call_id, key_prefix=start.key_prefix, account=start.account, agent="demo",
        provider="raw", started_at=start.started_at, ended_at=start.started_at + 60, duration=60.0,
        end_reason="hangup", turns=3, points_charged=points,
        transcript=[{"role": "agent", "text": "Hello!", "t": 0.1}, {"role": "caller", "text": "Bye.", "t": 2.0}],
        metadata={"caller": "+100"},
    )


async def _all(concurrency: int, thunks) -> list:
    sem = defer.DeferredSemaphore(concurrency)
    return await defer.gatherResults([sem.run(t) for t in thunks], consumeErrors=True)


async def _timed(reactor, label: str, concurrency: int, thunks) -> float:
    n = len(thunks)
    with Lag(reactor) as lag:
        t = time.monotonic()
        await _all(concurrency, thunks)
        took = time.monotonic() - t
    print(f"  {label:<8} {n / took:8.0f} /s  ({n} in {took:.2f} s; {lag.text()})")
    return n / took


async def bench_backend(reactor, name: str, database: str, args) -> None:
    print(f"{name}:")
    conn = store.connect(database)
    _, prefix = store.transact(conn, store.create_key, "acme", "demo", T0)
    store.transact(conn, store.add_points, "acme", 10**12)
    conn.close()
    s = store.Store(database, reactor, pool_size=args.pool)
    s.start()
    try:
        starts = [_start(i, prefix) for i in range(args.calls)]
        await _timed(reactor, "open", args.concurrency,
                     [lambda st=st: s.run(reserve.open_reserved, st, 2, 1) for st in starts])
        await _timed(reactor, "beat", args.concurrency,
                     [lambda st=st: s.run(reserve.beat, st.call_id, T0 + 15, 4, 1) for st in starts])
        await _timed(reactor, "settle", args.concurrency, [lambda st=st: s.settle_call(_record(st)) for st in starts])

        # two nodes: two pools on the one database, settling at once
        other = store.Store(database, reactor, pool_size=args.pool)
        other.start()
        try:
            both = [_start(i, prefix, tag="n") for i in range(args.calls)]
            await _all(args.concurrency, [lambda st=st: s.run(reserve.open_reserved, st, 2, 1) for st in both])
            nodes = [s, other]
            await _timed(reactor, "2 nodes", 2 * args.concurrency,
                         [lambda i=i, st=st: nodes[i % 2].settle_call(_record(st)) for i, st in enumerate(both)])
        finally:
            other.close()

        await race(reactor, s, database, args)
    finally:
        s.close()


async def race(reactor, s, database: str, args) -> None:
    conn = store.connect(database)
    _, prefix = store.transact(conn, store.create_key, "racer", "demo", T0)
    can_pay = max(1, args.racers // 10)
    start_balance = store.transact(conn, store.add_points, "racer", can_pay * 2)
    conn.close()
    starts = [_start(i, prefix, account="racer", tag="r") for i in range(args.racers)]

    def attempt(st):
        return s.run(reserve.open_reserved, st, 2, 1).addCallbacks(
            lambda held: (st, held), lambda f: f.trap(NoPoints) and None)

    t = time.monotonic()
    results = await defer.gatherResults([attempt(st) for st in starts], consumeErrors=True)
    took = time.monotonic() - t
    admitted = [r for r in results if r is not None]
    charged = await defer.gatherResults([s.settle_call(_record(st, points=held)) for st, held in admitted])
    account = await s.run(reserve.account_balance, "racer")
    balance, reserved = account
    ok = balance >= 0 and balance == start_balance - sum(charged) and reserved == 0
    print(f"  race     {len(starts)} opening at once on points for {can_pay}: {len(admitted)} admitted in"
          f" {took * 1000:.0f} ms; balance {start_balance} -> {balance} (charged {sum(charged)}),"
          f" reserved {reserved}: {'invariants hold' if ok else 'INVARIANT BROKEN'}")


def admission(name: str, database: str, n: int) -> None:
    """Upgrade -> 101 against a real daemon on ``database``."""
    from websockets.sync.client import connect

    from tests.daemon import Daemon, shipped_ini

    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp), shipped_ini(database=database, heartbeat="1s")).start()
        try:
            key = d.key(account="admit", points=10**9)
            times = []
            for _ in range(n):
                t = time.monotonic()
                with connect(d.url(f"/voice/{key}"), open_timeout=10):
                    times.append(time.monotonic() - t)  # the 101 is in: the connection is open
                time.sleep(0.05)  # let the call end and settle
            print(f"  admission {n} upgrades: p50 {percentile(times, 50) * 1000:.1f} ms,"
                  f" p99 {percentile(times, 99) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
        finally:
            d.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--racers", type=int, default=200)
    parser.add_argument("--pool", type=int, default=4, help="PostgreSQL connections per Store (node)")
    parser.add_argument("--postgresql", default=server_url(), help="server URL; 'off': SQLite only")
    parser.add_argument("--admission", type=int, default=0, metavar="N", help="N upgrades against a real daemon")
    args = parser.parse_args()
    print(f"uptime: {os.popen('uptime').read().strip()}")

    admin = pg_db = None
    if args.postgresql.lower() != "off":
        import psycopg

        admin = psycopg.connect(args.postgresql, autocommit=True)
        name = "upvoot_bench_" + secrets.token_hex(4)
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        pg_db = (with_dbname(args.postgresql, name), name)
    tmp = tempfile.TemporaryDirectory()
    backends = [("SQLite", os.path.join(tmp.name, "bench.sqlite3"))]
    if pg_db:
        backends.append(("PostgreSQL", pg_db[0]))

    async def run(reactor):
        for label, database in backends:
            await bench_backend(reactor, label, database, args)

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    finally:
        if args.admission:
            for label, database in backends:
                print(f"{label}:")
                admission(label, database if label != "SQLite" else os.path.join(tmp.name, "daemon.sqlite3"),
                          args.admission)
        if admin is not None:
            admin.execute(f'DROP DATABASE IF EXISTS "{pg_db[1]}" WITH (FORCE)')
            admin.close()
        tmp.cleanup()
        print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
