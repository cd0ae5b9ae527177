"""Milepost's PostgreSQL listener through real drivers: psycopg 3 and asyncpg.

Usage: pg_drivers.py HOST PORT TOKEN,TOKEN2,TOKEN3 [CA_FILE]

With CA_FILE the connections use TLS and verify the server's certificate
(sslmode=verify-full). Asserts what each driver must see (types, NULLs, empty
results, parameters, prepared statements, errors with their SQLSTATE, a
cancelled query, the busy answer) and prints, one JSON object a line, the
answers the Rust test compares with Milepost's HTTP API: hourly averages and raw
rows per device, and the series of Grafana's expanded time-series query.
"""

import asyncio
import datetime
import decimal
import json
import sys
import threading
import time

import asyncpg
import psycopg

HOST, PORT = sys.argv[1], sys.argv[2]
TOKEN, TOKEN2, TOKEN3 = sys.argv[3].split(",")
CA = sys.argv[4] if len(sys.argv) > 4 else None
DEVICES = ["car-a", "car-b"]
BOMB = "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t"


def dsn(user="analyst", token=None):
    tls = f"sslmode=verify-full&sslrootcert={CA}" if CA else "sslmode=disable"
    return f"postgresql://{user}:{token or TOKEN}@{HOST}:{PORT}/milepost?{tls}"


def emit(check, **fields):
    print(json.dumps({"check": check, **fields}, default=str), flush=True)


def iso(t):
    return t.replace(tzinfo=datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def expect_error(conn, sql, sqlstate, params=None):
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        assert e.sqlstate == sqlstate, f"{sql}: {e.sqlstate} {e}"
        conn.rollback()
        return str(e)
    raise AssertionError(f"{sql}: no error")


def psycopg_checks():
    # Not autocommit: psycopg opens a transaction (BEGIN) before the first query.
    with psycopg.connect(dsn()) as conn:
        assert conn.info.parameter_status("server_version").startswith("16")
        # Every mapped type, as text and as binary results.
        typed = """SELECT TIMESTAMP '2026-03-01 10:07:00' AS ts, 1.5::DOUBLE AS d,
                          42::BIGINT AS b, 7::INTEGER AS i, 3::SMALLINT AS s, 'x'::VARCHAR AS v,
                          true AS t, NULL AS n, DATE '2026-03-01' AS day,
                          12.25::DECIMAL(10, 2) AS m"""
        want = (
            datetime.datetime(2026, 3, 1, 10, 7),
            1.5,
            42,
            7,
            3,
            "x",
            True,
            None,
            datetime.date(2026, 3, 1),
            decimal.Decimal("12.25"),
        )
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            row = cur.execute(typed).fetchone()
            assert row == want, (binary, row)
            names = [c.name for c in cur.description]
            assert names == ["ts", "d", "b", "i", "s", "v", "t", "n", "day", "m"], names
        # The simple protocol (client-side binding) answers the same.
        cur = psycopg.ClientCursor(conn)
        assert cur.execute(typed).fetchone() == want
        # Parameters of each kind, server-side bound; a prepared statement reused.
        row = conn.execute(
            "SELECT %s::BIGINT + 1, %s, %s * 2, %s, %s IS NULL, NOT %s",
            (41, "text", 1.25, datetime.datetime(2026, 3, 1, 10, 0), None, False),
        ).fetchone()
        assert row == (42, "text", 2.5, datetime.datetime(2026, 3, 1, 10, 0), True, True), row
        for device in DEVICES:
            n = conn.execute(
                "SELECT count(*) FROM readings WHERE device = %s AND value >= %s",
                (device, 0.0),
                prepare=True,
            ).fetchone()[0]
            assert n > 0, device
        # An empty result still describes its columns.
        cur = conn.execute("SELECT device, value FROM readings WHERE false")
        assert cur.fetchall() == [] and [c.name for c in cur.description] == ["device", "value"]
        # Errors carry their SQLSTATE, and the connection goes on.
        expect_error(conn, "SELEC 1", "42601")
        expect_error(conn, "SELECT * FROM alerts", "42501")
        expect_error(conn, "DELETE FROM readings", "42501")
        expect_error(conn, "SELECT * FROM read_csv('/etc/passwd')", "42501")
        expect_error(conn, "SELECT 'a'::INTEGER", "22P02")
        expect_error(conn, "SET memory_limit = '8GB'", "0A000")
        # The answers the test compares with the HTTP API.
        for device in DEVICES:
            rows = conn.execute(
                """SELECT date_trunc('hour', ts) AS hour, count(*) AS n, avg(value) AS avg
                   FROM readings WHERE device = %s AND sensor = 'speed'
                   GROUP BY 1 ORDER BY 1""",
                (device,),
            ).fetchall()
            emit("hourly", device=device, rows=[[iso(h), n, a] for h, n, a in rows])
            rows = conn.execute(
                "SELECT ts, value FROM readings WHERE device = %s AND sensor = 'speed' ORDER BY ts",
                (device,),
            ).fetchall()
            emit("raw", device=device, rows=[[iso(t), v] for t, v in rows])
        conn.commit()


def grafana_checks():
    """The queries Grafana's PostgreSQL data source sends, macros expanded as its
    documentation says: the health check, the table and column pickers of the
    query builder, and a time-series panel ($__timeGroupAlias(ts, '1h') →
    floor(extract(epoch from ts)/3600)*3600 AS "time"; $__timeFilter(ts) → ts
    BETWEEN '…Z' AND '…Z')."""
    with psycopg.connect(dsn("grafana"), autocommit=True) as conn:
        conn.execute("-- ping")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        search_path = """SELECT CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
            FROM generate_series(
                array_lower(string_to_array(current_setting('search_path'), ','), 1),
                array_upper(string_to_array(current_setting('search_path'), ','), 1)
            ) AS i, string_to_array(current_setting('search_path'), ',') s"""
        tables = conn.execute(
            f"""SELECT CASE WHEN quote_ident(table_schema) IN ({search_path})
                    THEN quote_ident(table_name)
                    ELSE quote_ident(table_schema) || '.' || quote_ident(table_name)
                END AS "table"
                FROM information_schema.tables
                WHERE quote_ident(table_schema) NOT IN ('information_schema', 'pg_catalog',
                    '_timescaledb_cache', '_timescaledb_catalog', '_timescaledb_internal',
                    '_timescaledb_config', 'timescaledb_information', 'timescaledb_experimental')
                ORDER BY CASE WHEN quote_ident(table_schema) IN ({search_path})
                    THEN 0 ELSE 1 END, 1"""
        ).fetchall()
        assert sorted(t for (t,) in tables) == sorted(
            ["anomalies", "devices", "dumps", "readings", "rollups_15m", "sensors"]
        ), tables
        columns = conn.execute(
            f"""SELECT quote_ident(column_name) AS "column", data_type AS "type"
                FROM information_schema.columns
                WHERE CASE WHEN array_length(parse_ident('readings'), 1) = 2
                    THEN quote_ident(table_schema) = (parse_ident('readings'))[1]
                        AND quote_ident(table_name) = (parse_ident('readings'))[2]
                    ELSE quote_ident(table_name) = 'readings'
                        AND quote_ident(table_schema) IN ({search_path})
                END"""
        ).fetchall()
        assert dict(columns) == {
            "device": "character varying",
            "sensor": "character varying",
            "ts": "timestamp without time zone",
            "value": "double precision",
        }, columns
        for device in DEVICES:
            rows = conn.execute(
                f"""SELECT floor(extract(epoch from ts)/3600)*3600 AS "time",
                           avg(value) AS "speed"
                    FROM readings
                    WHERE ts BETWEEN '2026-03-01T10:00:00Z' AND '2026-03-01T13:00:00Z'
                      AND device = '{device}' AND sensor = 'speed'
                    GROUP BY 1 ORDER BY 1"""
            ).fetchall()
            emit("grafana", device=device, rows=[[int(t), v] for t, v in rows])


def cancel_and_busy_checks():
    # A cancel request (what psql's Ctrl-C sends) stops the running query.
    conn = psycopg.connect(dsn(), autocommit=True)
    threading.Timer(0.5, conn.cancel).start()
    started = time.monotonic()
    try:
        conn.execute(BOMB)
        raise AssertionError("the cancelled query answered")
    except psycopg.errors.QueryCanceled:
        pass
    assert time.monotonic() - started < 5, time.monotonic() - started
    # Two queries run at once, one a client (token): a third client's query is
    # told to come back (53300), and so is a client's second beside its first.
    others = [psycopg.connect(dsn(token=t), autocommit=True) for t in (TOKEN, TOKEN2)]
    outcomes = []

    def run(c):
        try:
            c.execute(BOMB)
        except psycopg.Error as e:
            outcomes.append(e.sqlstate)

    threads = [threading.Thread(target=run, args=(c,)) for c in others]
    for t in threads:
        t.start()
    time.sleep(0.5)
    third = psycopg.connect(dsn(token=TOKEN3), autocommit=True)
    for c, says in ((third, "too many queries"), (conn, "this client")):
        try:
            c.execute("SELECT count(*) FROM readings")
            raise AssertionError("a query ran beyond the caps")
        except psycopg.errors.TooManyConnections as e:
            assert says in str(e), e
    for c in others:
        c.cancel()
    for t in threads:
        t.join()
    assert outcomes == ["57014", "57014"], outcomes
    # Cancelled inside DuckDB, not just answered: both slots are free again.
    started = time.monotonic()
    for c in others:
        assert c.execute("SELECT count(*) FROM devices").fetchone()[0] >= 2
    assert time.monotonic() - started < 2
    for c in [conn, third, *others]:
        c.close()


async def asyncpg_checks():
    ssl = None
    if CA:
        import ssl as ssl_module

        ssl = ssl_module.create_default_context(cafile=CA)
    conn = await asyncpg.connect(
        host=HOST, port=int(PORT), user="analyst", password=TOKEN, database="milepost", ssl=ssl
    )
    # asyncpg describes every statement and decodes binary results.
    row = await conn.fetchrow(
        """SELECT TIMESTAMP '2026-03-01 10:07:00' AS ts, 1.5::DOUBLE AS d, 42::BIGINT AS b,
                  'x' AS v, true AS t, NULL AS n, 12.25::DECIMAL(10, 2) AS m"""
    )
    assert tuple(row) == (
        datetime.datetime(2026, 3, 1, 10, 7),
        1.5,
        42,
        "x",
        True,
        None,
        decimal.Decimal("12.25"),
    ), row
    # Parameters by the types the text casts them to; a prepared statement reused.
    stmt = await conn.prepare(
        "SELECT count(*) FROM readings WHERE device = $1 AND value >= $2::float8"
    )
    counts = [await stmt.fetchval(d, 0.0) for d in DEVICES]
    assert all(n > 0 for n in counts), counts
    assert await conn.fetchval("SELECT $1::bigint + 1", 41) == 42
    # Without casts, parameters take the types DuckDB's binder gives them where
    # they stand: asyncpg sends a datetime, a float and an int as such.
    uncast = await conn.fetchval(
        """SELECT count(*) FROM (SELECT * FROM readings
               WHERE device = $1 AND ts >= $2 AND value >= $3 LIMIT $4)""",
        DEVICES[0],
        datetime.datetime(2000, 1, 1),
        0.0,
        1_000_000,
    )
    assert uncast == counts[0], (uncast, counts)
    future = datetime.datetime(2100, 1, 1)
    assert await conn.fetchval("SELECT count(*) FROM readings WHERE ts > $1", future) == 0
    assert await conn.fetch("SELECT * FROM readings WHERE false") == []
    try:
        await conn.fetch("SELECT * FROM milepost.main.alerts")
        raise AssertionError("internal table read")
    except asyncpg.PostgresError as e:
        assert e.sqlstate == "42501", e
    # A timeout makes asyncpg send a cancel request; the connection goes on.
    try:
        await conn.fetch(BOMB, timeout=0.5)
        raise AssertionError("the query answered")
    except asyncio.TimeoutError:
        pass
    assert await conn.fetchval("SELECT count(*) FROM devices") >= 2
    await conn.close()
    emit("asyncpg", counts=counts)


psycopg_checks()
grafana_checks()
cancel_and_busy_checks()
asyncio.run(asyncpg_checks())
emit("done")
