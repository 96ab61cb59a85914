"""Regression tests for five findings on the log redaction of 0.1.5 (issue 29): literals of a
call of ours that still reached the log or the client's error, and statements of others that
were masked although they call nothing of ours. Each marker is a token that cannot occur by
chance; each check reads only the part of the log its own statements wrote.

Finding 5 (an unqualified call of any function of the extension, `SET search_path =
vetassist_auth, public; SELECT name('MARK')` for every proname in the schema) is covered by
test_secrets.py::test_an_unqualified_call_of_any_function_of_the_extension_logs_no_literal;
it is not repeated here."""
import re

import pytest

from log_fuzz import LOGGING, ServerLog, client_texts, entries, logged_form, run_collecting
from vetassist_testing import installed_cluster

NOBODY = "00000000-0000-4000-8000-00000000f1d0"  # a well-formed uuid of no user


@pytest.fixture(scope="module")
def logged():
    with installed_cluster("findings", *LOGGING) as c:
        with c.connect("vetassist", "app_user") as app:
            c.uid = app.execute("SELECT vetassist_auth.upsert_va_user('1012667985V290001', 'veteran', NULL, NULL, NULL)"
                                ).fetchone()[0]
        c.server_log = ServerLog(c)
        yield c


def run(c, conn, action):
    """Runs `action(conn)` (errors are expected by some steps); returns what the log got from it
    and the texts the client was told."""
    start = c.server_log.offset()
    error, notices = run_collecting(conn, action)
    return c.server_log.since(start), client_texts(error, notices), error


def leaks(markers, log, told=()):
    """Every log entry and client text that holds one of the markers."""
    found = [e.text for e in entries(log) if any(m in e.text for m in markers)]
    return found + [f"client: {t}" for t in told if any(m in t for m in markers)]


def test_1_execute_of_a_prepared_statement_of_ours_shows_its_text_masked(logged):
    """Postgres adds `DETAIL: prepare: PREPARE st … AS …` to the statement and duration lines of
    each EXECUTE: 0.1.5 masked the EXECUTE's own literals and left the prepared text's."""
    c = logged
    prepare = ("PREPARE {name}(uuid) AS SELECT vetassist_auth.store_va_tokens($1, 'qzvF1ACCESS{n}x', "
               "'qzvF1REFRESH{n}x', now() + interval '1 hour')")
    markers = [f"qzvF1{kind}{n}x" for kind in ("ACCESS", "REFRESH") for n in (1, 2)]
    with c.connect("vetassist", "app_user") as app:
        log, told, error = run(c, app, lambda a: (a.execute(prepare.format(name="st", n=1)),
                                                  a.execute(f"EXECUTE st('{c.uid}')")))
        assert error is None
        # Both in one query string.
        more, told2, error = run(c, app, lambda a: a.execute(prepare.format(name="st2", n=2) +
                                                             f"; EXECUTE st2('{c.uid}')"))
        assert error is None
    assert leaks(markers, log + more, told + told2) == []
    assert "prepare: PREPARE st(uuid) AS SELECT vetassist_auth.store_va_tokens($1, <redacted>" in log


BODIES = {
    # A nonexistent user: the call itself fails.
    "assignment": f"""DECLARE g text; BEGIN
  g := (SELECT vetassist_auth.store_va_tokens('{NOBODY}', 'qzvF2ASSIGNx', 'qzvF2ASSIGNRTx', now() + interval '1 hour'));
END""",
    # A malformed uuid: Postgres's input function fails on the literal (an error of the
    # assignment's own query, with the query as QUERY).
    "assignment-bad-uuid": """DECLARE g text; BEGIN
  g := (SELECT vetassist_auth.store_va_tokens('qzvF2BADUUIDx', 'qzvF2ASSIGN2x', NULL, now() + interval '1 hour'));
END""",
    "if-condition": """BEGIN
  IF (SELECT vetassist_auth.mfa_verify('jti-qzvF2IFx', '654321')) THEN RAISE NOTICE 'verified'; END IF;
END""",
}


@pytest.mark.parametrize("wrapper", ["do", "function"])
@pytest.mark.parametrize("body", sorted(BODIES))
def test_2_a_failing_call_in_a_plpgsql_expression_is_masked_in_its_context(logged, body, wrapper):
    """An error inside a PL/pgSQL assignment or condition quotes the expression in CONTEXT
    (`PL/pgSQL assignment "g := …"`, `SQL expression "…"`): 0.1.5 masked only `SQL statement
    "…"`, so the log and the client's error carried the literals. The same body in an
    application's function (created beforehand; its CREATE is the fuzzer's business), called
    without a literal, must leak nothing either.

    Today a DO block's error has no CONTEXT at all: the extension's ProcessUtility hook (a
    pg_guard, src/connections.rs) rethrows errors of utility statements without it, so only
    the function form shows the context today; both are checked for markers."""
    c = logged
    code = BODIES[body]
    markers = re.findall(r"qzvF2[A-Z0-9]+x", code)
    with c.connect("vetassist", "app_user") as app:
        if wrapper == "do":
            log, told, error = run(c, app, lambda a: a.execute(f"DO $$ {code} $$"))
        else:
            app.execute(f"CREATE FUNCTION pg_temp.finding2() RETURNS void LANGUAGE plpgsql AS $$ {code} $$")
            log, told, error = run(c, app, lambda a: a.execute("SELECT pg_temp.finding2()"))
            assert error is not None and re.search(r"line \d+ at (assignment|IF)", error.diag.context or ""), error
    assert error is not None
    assert leaks(markers, log, told) == []


@pytest.mark.parametrize("expires, fails", [("now() + interval '1 hour'", False), ("now() - interval '1 hour'", True)])
@pytest.mark.parametrize("before", ["-- note\r", "/* a */ -- note\r/* b */ "])
def test_3_a_line_comment_ended_by_a_carriage_return_hides_no_call(logged, before, expires, fails):
    """Postgres ends a `--` comment at a CR as at a LF; 0.1.5 read the comment on to the next LF,
    and the call after it, literals and all, was logged as someone else's statement."""
    c = logged
    marker = f"qzvF3{len(before)}{'FAIL' if fails else 'OK'}x"
    sql = f"SELECT {before}vetassist_auth.store_va_tokens('{c.uid}', '{marker}', NULL, {expires})"
    with c.connect("vetassist", "app_user") as app:
        log, told, error = run(c, app, lambda a: a.execute(sql))
    assert (error is not None) == fails, error
    assert "store_va_tokens" in log
    assert leaks([marker], log, told) == []


def test_4_a_role_without_grants_cannot_hide_its_statements(logged):
    """Names of the extension used as an alias with a column list, or in a call that never runs
    and carries no literal, are no call of ours: the statement is logged byte for byte.
    0.1.5 masked both, which let any role keep its literals out of the log."""
    c = logged
    with c.connect("vetassist") as su:
        su.execute("CREATE ROLE hider LOGIN")
        su.execute("CREATE TABLE public.notes (id int PRIMARY KEY, diagnosis text)")
        su.execute("INSERT INTO public.notes VALUES (1, 'none')")
        su.execute("ALTER TABLE public.notes OWNER TO hider")
    update = ("UPDATE notes SET diagnosis = 'qzvF4XMARKx' FROM (VALUES (1)) AS touch_session(x) "
              "WHERE notes.id = touch_session.x")
    do = ("DO $$BEGIN IF false THEN PERFORM touch_session(NULL); END IF; "
          "EXECUTE 'ALTER ROLE hider SET application_name = ''qzvF4VISIBLEx'''; END$$")
    with c.connect("vetassist", "hider") as hider:
        log, _, error = run(c, hider, lambda h: h.execute(update))
        assert error is None
        more, _, error = run(c, hider, lambda h: h.execute(do))
        assert error is None
    with c.connect("vetassist") as su:
        assert su.execute("SELECT diagnosis FROM public.notes").fetchone()[0] == "qzvF4XMARKx"
    assert [e.message for e in entries(log) if e.is_statement_line()] == [f"statement: {logged_form(update)}"]
    assert [e.message for e in entries(more) if e.is_statement_line()] == [f"statement: {logged_form(do)}"]
