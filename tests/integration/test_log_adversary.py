"""Adversary findings on the log redaction at 8f53bfd (the raw_parser/core_yylex rewrite).
Every test here fails on that code. Each marker (qzADV…x) cannot occur by chance; each check
reads only the part of the server log its own statements wrote.

1. LEAK  a verdict is cached by text alone: after SET standard_conforming_strings = off, the
         `statement:` line of a text first read under `on` is masked as the `on` reading says,
         and a literal that the `off` reading passes to field_hash is logged.
2. HIDE  the same stale verdict lets a role with no grants hide an ALTER ROLE it ran.
3. HIDE  the Citus shard heuristic (`vetassist_auth . sessions_<digits>` tokens anywhere in a
         statement) masks every literal of a statement of a role with no grants that only uses
         a table alias `vetassist_auth` with a column `sessions_1`.
4. HIDE  in a database whose encoding is not UTF-8 (LATIN1), a DO block that mentions us and
         holds one non-ASCII byte has its `statement:` line held back and never written:
         post_parse_analyze_hook returns early on text that is not UTF-8.
5. BREAK same LATIN1 database, extended protocol: a statement parsed under
         standard_conforming_strings = on, never analyzed by the hook (not UTF-8), fails in
         Bind after SET standard_conforming_strings = off: the log hook re-parses it under
         `off`, raw_parser raises inside error reporting, and the original error (22P02) is
         replaced, in the log and for the client, by a syntax error that never happened.
6. LEAK  `DETAIL: prepare: PREPARE st AS SELECT app_wrapper('TOKEN')` on the duration line
         of `EXECUTE st`, written after a function of ours ran in the statement
         (log_statement = none, log_min_duration_statement = 0).
7. BREAK every `statement:` line of a new text that mentions us is parsed in the log hook with
         CurrentMemoryContext = ErrorContext, which Postgres resets only after an ERROR: the
         parse trees accumulate (about 1.7 MB per 200 kB statement here), so any role grows
         its backend without bound (OOM) with statements that merely alias a column
         `touch_session`.
"""
from contextlib import contextmanager

import psycopg
import pytest

from log_fuzz import LOGGING, ServerLog, entries, logged_form
from vetassist_testing import installed_cluster


@pytest.fixture(scope="module")
def adv():
    with installed_cluster("adversary29", *LOGGING) as c:
        c.server_log = ServerLog(c)
        with c.connect("postgres") as su:
            su.execute("CREATE DATABASE latin ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
        yield c


def since(c, start):
    return c.server_log.since(start)


def statement_lines(log):
    return [e.message for e in entries(log) if e.is_statement_line()]


@contextmanager
def outsider_altered(c):
    """Yields a function that reads the outsider's role settings (what a hidden ALTER ROLE
    changed), and resets them afterwards."""
    def settings():
        with c.connect("vetassist") as su:
            return su.execute("SELECT rolconfig FROM pg_roles WHERE rolname = 'outsider'").fetchone()[0]
    try:
        yield settings
    finally:
        with c.connect("vetassist") as su:
            su.execute("ALTER ROLE outsider RESET ALL")


def attempt(conn, sql, params=None, **kw):
    try:
        conn.execute(sql, params, **kw)
        return None
    except psycopg.Error as e:
        return e


def test_1_a_literal_of_ours_leaks_after_standard_conforming_strings_changes(adv):
    c = adv
    # Under `on`: field_hash('\') (1 argument, unknown) and a plain literal outside the call.
    # Under `off`: field_hash(') AS a, ' || $m$qzADV1SCSx$m$, $e$email$e$): the marker is an
    # argument of ours, and the call runs.
    text = r"""SELECT vetassist_auth.field_hash('\') AS a, ' || $m$qzADV1SCSx$m$, $e$email$e$) AS h --' AS b"""
    with c.connect("vetassist", "app_user") as app:
        assert attempt(app, text) is not None  # read (and cached) under `on`
        app.execute("SET standard_conforming_strings = off")
        start = c.server_log.offset()
        assert attempt(app, text) is None  # field_hash ran with the marker
        log = since(c, start)
    leaked = [e.text for e in entries(log) if "qzADV1SCSx" in e.text]
    assert leaked == [], leaked


def test_2_a_role_without_grants_hides_an_alter_role_behind_a_stale_verdict(adv):
    c = adv
    # Under `off`: SELECT ' AS a, ' || touch_session('<ALTER ROLE … as a string>') AS z
    # Under `on`:  SELECT '\' AS a, '…'; ALTER ROLE outsider SET application_name = …; SELECT 2
    text = (r"""SELECT '\' AS a, ' || touch_session('; ALTER ROLE outsider SET application_name = """
            r"""$$qzADV2HIDDENx$$; SELECT 2 --') AS z""")
    with outsider_altered(c) as settings:
        with c.connect("vetassist", "outsider") as outsider:
            outsider.execute("SET standard_conforming_strings = off")
            assert attempt(outsider, text) is not None  # touch_session(unknown) does not exist
            outsider.execute("SET standard_conforming_strings = on")
            start = c.server_log.offset()
            assert attempt(outsider, text) is None
            log = since(c, start)
        assert settings() == ["application_name=qzADV2HIDDENx"]
    assert statement_lines(log) == [f"statement: {logged_form(text)}"]


def test_3_a_table_alias_named_like_our_schema_hides_an_insert(adv):
    c = adv
    insert = ("INSERT INTO loot SELECT 'qzADV3HIDDENx' FROM (SELECT 1 AS sessions_1) AS vetassist_auth "
              "WHERE vetassist_auth.sessions_1 = 1")
    with c.connect("vetassist", "outsider") as outsider:
        outsider.execute("CREATE TEMP TABLE loot (v text)")
        start = c.server_log.offset()
        outsider.execute(insert)
        log = since(c, start)
        assert outsider.execute("SELECT v FROM loot").fetchone()[0] == "qzADV3HIDDENx"
    assert statement_lines(log) == [f"statement: {insert}"]


def test_4_a_do_block_in_a_latin1_database_is_never_logged(adv):
    c = adv
    do = ("DO $$BEGIN IF false THEN PERFORM touch_session('x'); END IF; "
          "EXECUTE 'ALTER ROLE outsider SET application_name = ''qzADV4HIDDENx'''; END$$ -- caf\u00e9")
    with outsider_altered(c) as settings:
        with c.connect("latin", "outsider") as outsider:
            start = c.server_log.offset()
            assert attempt(outsider, do) is None
            outsider.execute("SELECT 'next statement'")
            log = since(c, start)
        assert settings() == ["application_name=qzADV4HIDDENx"]
    # The log is LATIN1 here: é is one byte, read back as U+FFFD.
    assert any("ALTER ROLE outsider SET application_name" in line for line in statement_lines(log)), log


def test_5_a_reparse_in_the_log_hook_replaces_the_real_error(adv):
    c = adv
    text = r"SELECT %s::int AS touch_session, '\' AS x -- caf" + "\u00e9"
    with c.connect("latin", "outsider") as outsider:
        outsider.execute(text, ("1",), prepare=True)  # the same parameter type: the same statement
        outsider.execute("SET standard_conforming_strings = off")
        start = c.server_log.offset()
        error = attempt(outsider, text, ("qzADV5NOTANINTx",), prepare=True)
        log = since(c, start)
    # Postgres reports 22P02 (invalid input syntax for type integer) from Bind.
    assert error is not None and error.sqlstate == "22P02", f"{error.sqlstate}: {error}"
    assert "invalid input syntax for type integer" in log, log
    assert "unterminated quoted string" not in log, log


def test_6_the_prepared_text_leaks_on_the_duration_line_after_ours_ran(adv):
    c = adv
    with c.connect("vetassist") as su:
        su.execute("CREATE ROLE quiet_app LOGIN IN ROLE vetassist_app")
        su.execute("ALTER ROLE quiet_app SET log_statement = 'none'")
    with c.connect("vetassist", "quiet_app") as app:
        app.execute("CREATE FUNCTION pg_temp.sign_in(t text) RETURNS bytea LANGUAGE plpgsql "
                    "AS $$BEGIN RETURN vetassist_auth.field_hash(t, 'email'); END$$")
        app.execute("PREPARE st AS SELECT pg_temp.sign_in('qzADV6TOKENx')")
        start = c.server_log.offset()
        app.execute("EXECUTE st")  # field_hash starts: every later line is masked, says the README
        log = since(c, start)
    assert "duration:" in log
    leaked = [e.text for e in entries(log) if "qzADV6TOKENx" in e.text]
    assert leaked == [], leaked


def test_7_statement_lines_accumulate_parse_trees_in_error_context(adv):
    c = adv
    literals = ",".join(f"'v{i}'" for i in range(20000))
    query = "SELECT total_bytes FROM pg_backend_memory_contexts WHERE name = 'ErrorContext'"
    with c.connect("vetassist") as su:  # pg_backend_memory_contexts needs a privileged role
        before = su.execute(query).fetchone()[0]
        for n in range(60):
            # A mention only (an alias), no call: any role can send it.
            su.execute(f"SELECT {n} AS touch_session, ARRAY[{literals}] IS NULL")
        after = su.execute(query).fetchone()[0]
    assert after - before < 16 * 1024 * 1024, f"ErrorContext grew by {(after - before) >> 20} MB"
