"""Bytes on disk per row and rows/s inserted for tallyd's counters table,
with the sorting key and column types of each schema variant, on an old
and a modern ClickHouse side by side.

    python3 scripts/schema_size.py OLD_URL MODERN_URL
    e.g. a private clickhouse-server (18.16) on :18301 and
    python3 tests/modern/chdb_front.py 18302 /tmp/chdb (26.9) on :18302:
    python3 scripts/schema_size.py http://127.0.0.1:18301 http://127.0.0.1:18302

The rows are what tallyd writes for 10,000 keys on 5 hosts over 100
intervals (5 M rows), generated in SQL so that both servers get the same.
Each table is merged (OPTIMIZE FINAL) before it is measured.
"""
import sys
import time
import urllib.request


def q(url, sql):
    r = urllib.request.urlopen(urllib.request.Request(url + "/", data=sql.encode()))
    return r.read().decode()
COLS_OLD = "ts DateTime, name String, tags Array(String), host String, flush_id UInt64, value Float64, samples UInt64"
COLS_LC = "ts DateTime, name LowCardinality(String), tags Array(LowCardinality(String)), host LowCardinality(String), flush_id UInt64, value Float64, samples UInt64"
COLS_LC_CODEC = "ts DateTime CODEC(Delta, ZSTD(1)), name LowCardinality(String), tags Array(LowCardinality(String)), host LowCardinality(String), flush_id UInt64 CODEC(Delta, ZSTD(1)), value Float64 CODEC(ZSTD(1)), samples UInt64 CODEC(T64, ZSTD(1))"
KEY_OLD = "(name, tags, host, flush_id)"
KEY_TS = "(name, tags, host, ts, flush_id)"
# 10,000 keys x 100 intervals (1 s) on 5 hosts: what tallyd writes.
GEN = ("SELECT toDateTime(1700000000 + intDiv(number, 50000)) AS ts, concat('app.metric.', toString(number % 10000)) AS name, "
       "['env:prod', concat('route:/', toString(number % 37))] AS tags, concat('web-', toString(intDiv(number, 10000) % 5)) AS host, "
       "(toUInt64(1700000000 + intDiv(number, 50000)) * 1000000 + 12345) AS flush_id, toFloat64(number % 97) AS value, toUInt64(number % 13 + 1) AS samples "
       "FROM numbers(5000000)")
variants = [("old key", COLS_OLD, KEY_OLD), ("ts in key", COLS_OLD, KEY_TS)]
modern = [("LowCardinality, ts in key", COLS_LC, KEY_TS), ("LowCardinality + codecs, ts in key", COLS_LC_CODEC, KEY_TS)]
old_url, modern_url = sys.argv[1], sys.argv[2]
for port, vs in [(old_url, variants), (modern_url, variants + modern)]:
    engine = q(port, "SELECT version()").strip()
    for i, (label, cols, key) in enumerate(vs):
        t = f"default.sz{i}"
        q(port, f"DROP TABLE IF EXISTS {t}")
        q(port, f"CREATE TABLE {t} ({cols}) ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(ts) ORDER BY {key}")
        start = time.time()
        q(port, f"INSERT INTO {t} {GEN}")
        took = time.time() - start
        q(port, f"OPTIMIZE TABLE {t} FINAL")
        rows, size = q(port, f"SELECT sum(rows), sum(bytes_on_disk) FROM system.parts WHERE database = 'default' AND table = 'sz{i}' AND active").split()
        scan = time.time()
        q(port, f"SELECT sum(value) FROM {t} WHERE name = 'app.metric.42' AND ts >= toDateTime(1700000050) AND ts < toDateTime(1700000060)")
        scan = time.time() - scan
        print(f"{engine}\t{label}\t{int(rows)/took:,.0f} rows/s\t{int(size)/int(rows):.2f} B/row\tpoint query {scan*1000:.0f} ms")
        q(port, f"DROP TABLE {t}")
