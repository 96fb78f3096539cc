"""``upvoot db copy``: a whole ledger (accounts and balances, keys, calls)
from one database into another, exactly, typically an SQLite file into a
new PostgreSQL database when a single node becomes several.

Both databases must be at the current schema (the target is created at it
when empty). The copy reads the source in one read transaction (a snapshot:
a daemon still writing cannot tear it) and writes the target in one
transaction, holding its tables locked: the target is checked empty under
that lock, and a copy that fails half-way leaves it as empty as it was.
Rows are copied column for column, values as they are (a REAL is a DOUBLE
PRECISION on PostgreSQL: the same 64-bit float); nothing is recomputed.
"""

from __future__ import annotations

from typing import Any

from upvoot.ledger.backends import POSTGRESQL, SQLITE, dialect_of_connection
from upvoot.ledger.records import StoreError
from upvoot.ledger.schema import TABLES

#: each table's primary key: rows are copied (and compared) in its order
KEYS = {"accounts": "name", "api_keys": "prefix", "calls": "call_id"}
BATCH = 500


def columns(cursor: Any, table: str) -> list[str]:
    cursor.execute(f"SELECT * FROM {table} LIMIT 0")
    names = [d[0] for d in cursor.description]
    cursor.fetchall()
    return names


def counts(cursor: Any) -> dict[str, int]:
    """Rows per ledger table."""
    out = {}
    for table in TABLES:
        cursor.execute(f"SELECT COUNT(*) FROM {table}")
        out[table] = int(cursor.fetchone()[0])
    return out


def copy_ledger(source: Any, target: Any, target_name: str) -> dict[str, int]:
    """Copy every row of the ledger tables from connection ``source`` to
    connection ``target`` (either database each), in one transaction on the
    target. Returns the rows copied per table, and ``points``: the sum of the
    balances copied. ``StoreError`` if the target is not empty."""
    src_dialect, dst_dialect = dialect_of_connection(source), dialect_of_connection(target)
    if src_dialect is SQLITE:
        source.execute("BEGIN")  # one read snapshot for the three tables
    src = src_dialect.cursor(source)
    dst = dst_dialect.cursor(target)
    try:
        if src_dialect is POSTGRESQL:
            src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if dst_dialect is POSTGRESQL:
            dst.execute("LOCK TABLE " + ", ".join(TABLES) + " IN EXCLUSIVE MODE")
        else:
            target.execute("BEGIN IMMEDIATE")
        there = counts(dst)
        if any(there.values()):
            held = ", ".join(f"{n} {table}" for table, n in there.items() if n)
            raise StoreError(f"database {target_name} is not empty ({held}): copy only into a new database")
        copied: dict[str, int] = {}
        for table in TABLES:
            names = columns(src, table)
            if set(names) != set(columns(dst, table)):
                raise StoreError(f"table {table} has other columns in {target_name}: are both at the same schema?")
            listed = ", ".join(names)
            insert = f"INSERT INTO {table} ({listed}) VALUES ({', '.join('?' * len(names))})"
            src.execute(f"SELECT {listed} FROM {table} ORDER BY {KEYS[table]}")
            copied[table] = 0
            while True:
                rows = src.fetchmany(BATCH)
                if not rows:
                    break
                dst.executemany(insert, rows)
                copied[table] += len(rows)
        dst.execute("SELECT COALESCE(SUM(points), 0) FROM accounts")
        copied["points"] = int(dst.fetchone()[0])
        target.commit()
        return copied
    except BaseException:
        target.rollback()
        raise
    finally:
        src.close()
        dst.close()
        source.rollback()


__all__ = ["BATCH", "KEYS", "columns", "copy_ledger", "counts"]
