"""Benchmarks with ratios against references run in the same database, in the same run.

Never a pass/fail gate: it prints what it measured. `make bench` runs it on a release build.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from conftest import Cluster, install  # noqa: E402

ROWS = 20_000
REPEATS = 5


def best_seconds(conn, sql, repeats=REPEATS):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        conn.execute(sql)
        best = min(best, time.perf_counter() - start)
    return best


def per_row_us(conn, expr, table):
    return best_seconds(conn, f"SELECT count({expr}) FROM {table}") / ROWS * 1e6


def crypto_bench(conn):
    conn.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    conn.execute(f"""CREATE TEMP TABLE payload AS
        SELECT gen_random_bytes(1024) AS b, encode(gen_random_bytes(768), 'base64') AS t,
               'veteran' || n || '@example.org' AS email
        FROM generate_series(1, {ROWS}) n""")
    key = "'\\x000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f'::bytea"
    # One table per ciphertext kind, so that no row grows past the TOAST threshold.
    conn.execute("CREATE TEMP TABLE sealed_ours AS SELECT vetassist_auth.encrypt(b, 'bench') AS ours FROM payload")
    conn.execute(f"CREATE TEMP TABLE sealed_cbc AS SELECT encrypt(b, {key}, 'aes') AS cbc FROM payload")
    rows = []

    def compare(label, ours_expr, ours_table, ref_label, ref_expr, ref_table, goal):
        ours = per_row_us(conn, ours_expr, ours_table)
        ref = per_row_us(conn, ref_expr, ref_table)
        rows.append((label, ours, ref_label, ref, ref / ours, goal))

    compare("encrypt 1 KiB (AES-256-GCM)", "vetassist_auth.encrypt(b, 'bench')", "payload",
            "pgp_sym_encrypt_bytea aes256", "pgp_sym_encrypt_bytea(b, 'pw', 'cipher-algo=aes256')", "payload",
            ">= 50x faster")
    compare("encrypt 1 KiB (AES-256-GCM)", "vetassist_auth.encrypt(b, 'bench')", "payload",
            "encrypt(.., 'aes') CBC, no auth", f"encrypt(b, {key}, 'aes')", "payload", ">= 0.67x")
    compare("decrypt 1 KiB (AES-256-GCM)", "vetassist_auth.decrypt(ours, 'bench')", "sealed_ours",
            "decrypt(.., 'aes') CBC, no auth", f"decrypt(cbc, {key}, 'aes')", "sealed_cbc", ">= 0.67x")
    compare("field_hash 1 KiB text", "vetassist_auth.field_hash(t, 'note')", "payload",
            "hmac(.., 'sha256')", f"hmac(t::bytea, {key}, 'sha256')", "payload", ">= 1x")
    compare("field_hash e-mail (normalized)", "vetassist_auth.field_hash(email, 'email')", "payload",
            "hmac(.., 'sha256')", f"hmac(email::bytea, {key}, 'sha256')", "payload", ">= 1x")
    return rows


def main():
    c = Cluster("bench", "shared_preload_libraries = 'vetassist_auth'", "shared_buffers = '512MB'",
                "max_connections = 50")
    try:
        install(c)
        with c.connect("vetassist") as conn:
            rows = crypto_bench(conn)
        print(f"\nPer-row cost over {ROWS:,} rows, best of {REPEATS} (µs/row; ratio = reference / ours, >1 means ours is faster)\n")
        print(f"| {'operation':32} | {'ours µs':>8} | {'reference':34} | {'ref µs':>8} | {'ratio':>7} | goal |")
        print(f"|{'-' * 34}|{'-' * 10}|{'-' * 36}|{'-' * 10}|{'-' * 9}|------|")
        for label, ours, ref_label, ref, ratio, goal in rows:
            print(f"| {label:32} | {ours:8.2f} | {ref_label:34} | {ref:8.2f} | {ratio:6.2f}x | {goal} |")
    finally:
        c.stop()


if __name__ == "__main__":
    main()
