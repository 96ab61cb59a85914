"""Identity and token vault behaviour that needs several real clients."""
import concurrent.futures
import threading

import psycopg


def test_sixteen_clients_upserting_one_icn_end_with_one_account(cluster, su):
    icn = "1099999999V000016"
    barrier = threading.Barrier(16)

    def sign_in(i):
        with cluster.connect("vetassist", "app_user") as conn:
            barrier.wait()
            return conn.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', %s, 'Pat', 'Doe')",
                                (icn, f"pat{i}@example.org")).fetchone()[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = set(pool.map(sign_in, range(16)))
    assert len(ids) == 1
    (uid,) = ids
    rows = su.execute("SELECT count(*) FROM vetassist_auth.users WHERE va_icn_hash = ANY (vetassist_auth.field_hashes(%s, 'va_icn'))",
                      (icn,)).fetchone()[0]
    assert rows == 1
    events = dict(su.execute("""SELECT event_type, count(*) FROM vetassist_auth.audit_log
                                WHERE subject_user_id = %s AND category = 'identity' GROUP BY 1""", (uid,)).fetchall())
    assert events == {"user_created": 1, "user_signed_in": 15}


def test_concurrent_token_refreshes_keep_one_row_and_count_generations(cluster, app):
    uid = app.execute("SELECT vetassist_auth.upsert_va_user('1099999999V000017', 'veteran', NULL, NULL, NULL)").fetchone()[0]

    def refresh(i):
        with cluster.connect("vetassist", "app_user") as conn:
            return conn.execute("SELECT vetassist_auth.store_va_tokens(%s, %s, %s, now() + interval '1 hour', 'openid')",
                                (uid, f"access-{i}", f"refresh-{i}")).fetchone()[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        generations = sorted(pool.map(refresh, range(32)))
    assert generations == list(range(1, 33))
    token = app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0]
    assert token.startswith("access-")


def test_errors_reach_the_client_with_documented_sqlstates(app):
    uid = app.execute("SELECT vetassist_auth.upsert_va_user('1099999999V000018', 'veteran', NULL, NULL, NULL)").fetchone()[0]
    cases = [
        ("SELECT vetassist_auth.store_va_tokens(%s, '', NULL, now() + interval '1 hour', NULL)", (uid,), "22023"),
        ("SELECT vetassist_auth.store_va_tokens(%s, 'a', NULL, now() - interval '1 hour', NULL)", (uid,), "22023"),
        ("SELECT vetassist_auth.va_access_token(%s)", ("00000000-0000-0000-0000-000000000001",), "P0002"),
        ("SELECT vetassist_auth.upsert_va_user(%s, NULL, NULL, NULL, NULL)", ("",), "22023"),
        ("SELECT * FROM vetassist_auth.va_tokens", (), "42501"),
    ]
    for sql, params, state in cases:
        try:
            app.execute(sql, params)
        except psycopg.Error as e:
            assert e.sqlstate == state, sql
        else:
            raise AssertionError(f"no error from {sql}")
