"""Attacks an insider could try: the privilege matrix and search_path hijacking."""
import psycopg
import pytest

from vetassist_testing import ROOT

ROLES = ("vetassist_app", "vetassist_admin", "vetassist_auditor")


def documented_access():
    """The documented access (docs/api.md, "Who may call what"), read from the page itself, apart
    from the GRANTs beside each function: role -> the signatures it may execute."""
    page = (ROOT / "docs" / "api.md").read_text()
    table = page.split("## Who may call what", 1)[1].split("\n## ", 1)[0]
    access = {role: set() for role in ROLES}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        signature = cells[0].strip("`").replace(", ", ",").replace("timestamptz", "timestamp with time zone")
        for role, mark in zip(ROLES, cells[1:]):
            if mark:
                access[role].add(signature)
    assert all(access.values()), "docs/api.md lost its access table"
    return access


EXPECTED_FUNCTIONS = {**documented_access(), "public": set()}
AUDITOR_TABLES = {"audit_log", "audit_seals"}


def test_function_privileges_are_exactly_the_documented_ones(su):
    functions = su.execute("""SELECT p.oid, replace(p.oid::regprocedure::text, 'vetassist_auth.', '')
                              FROM pg_proc p WHERE p.pronamespace = 'vetassist_auth'::regnamespace""").fetchall()
    names = {sig.replace(", ", ",") for _, sig in functions}
    for role, allowed in EXPECTED_FUNCTIONS.items():
        assert allowed <= names, f"documented functions missing: {allowed - names}"
        granted = {sig.replace(", ", ",") for oid, sig in functions
                   if su.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, oid)).fetchone()[0]}
        assert granted == allowed, f"{role}: extra {granted - allowed}, missing {allowed - granted}"


def test_table_privileges_are_exactly_the_documented_ones(su):
    tables = [r[0] for r in su.execute("""SELECT relname FROM pg_class WHERE relnamespace = 'vetassist_auth'::regnamespace
                                          AND relkind IN ('r', 'v', 'S')""").fetchall()]
    for role in ("vetassist_app", "vetassist_admin", "vetassist_auditor", "public"):
        for table in tables:
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"):
                if privilege in ("INSERT", "UPDATE", "DELETE", "TRUNCATE") and table.endswith("_seq"):
                    continue
                has = su.execute("SELECT has_table_privilege(%s, %s, %s)",
                                 (role, f"vetassist_auth.{table}", privilege)).fetchone()[0]
                expected = role == "vetassist_auditor" and table in AUDITOR_TABLES and privilege == "SELECT"
                assert has == expected, f"{role} {privilege} {table}"
    # The admin reads key metadata, never key material.
    assert su.execute("SELECT has_column_privilege('vetassist_admin', 'vetassist_auth.keys', 'status', 'SELECT')").fetchone()[0]
    assert not su.execute("SELECT has_column_privilege('vetassist_admin', 'vetassist_auth.keys', 'wrapped_key', 'SELECT')").fetchone()[0]


def test_a_login_role_with_no_grants_reaches_nothing(cluster):
    with cluster.connect("vetassist", "outsider") as conn:
        for sql in ("SELECT vetassist_auth.touch_session('x')", "SELECT * FROM vetassist_auth.audit_log",
                    "SELECT vetassist_auth.verify_installation()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)


PLANTS = """
CREATE SCHEMA IF NOT EXISTS evil AUTHORIZATION mallory;
SET ROLE mallory;
CREATE TABLE IF NOT EXISTS evil.calls (what text);
CREATE OR REPLACE FUNCTION evil.record(what text) RETURNS boolean LANGUAGE sql AS
    $$ INSERT INTO evil.calls VALUES (what) RETURNING true $$;
CREATE OR REPLACE FUNCTION evil.lower(text) RETURNS text LANGUAGE sql AS $$ SELECT evil.record('lower')::text $$;
CREATE OR REPLACE FUNCTION evil.upper(text) RETURNS text LANGUAGE sql AS $$ SELECT evil.record('upper')::text $$;
CREATE OR REPLACE FUNCTION evil.btrim(text) RETURNS text LANGUAGE sql AS $$ SELECT evil.record('btrim')::text $$;
CREATE OR REPLACE FUNCTION evil.length(text) RETURNS integer LANGUAGE sql AS $$ SELECT evil.record('length')::int $$;
CREATE OR REPLACE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT CASE WHEN evil.record('now') THEN 'epoch'::timestamptz END $$;
CREATE OR REPLACE FUNCTION evil.gen_random_uuid() RETURNS uuid LANGUAGE sql AS $$ SELECT CASE WHEN evil.record('uuid') THEN '00000000-0000-0000-0000-000000000000'::uuid END $$;
CREATE OR REPLACE FUNCTION evil.text_eq(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT evil.record('text =') $$;
CREATE OR REPLACE FUNCTION evil.varchar_eq(varchar, varchar) RETURNS boolean LANGUAGE sql AS $$ SELECT evil.record('varchar =') $$;
CREATE OR REPLACE FUNCTION evil.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE sql AS $$ SELECT evil.record('uuid =') $$;
CREATE OR REPLACE FUNCTION evil.bytea_eq(bytea, bytea) RETURNS boolean LANGUAGE sql AS $$ SELECT evil.record('bytea =') $$;
DROP OPERATOR IF EXISTS evil.= (text, text); CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_eq);
DROP OPERATOR IF EXISTS evil.= (varchar, varchar); CREATE OPERATOR evil.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = evil.varchar_eq);
DROP OPERATOR IF EXISTS evil.= (uuid, uuid); CREATE OPERATOR evil.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = evil.uuid_eq);
DROP OPERATOR IF EXISTS evil.= (bytea, bytea); CREATE OPERATOR evil.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = evil.bytea_eq);
CREATE OR REPLACE FUNCTION evil.int4_eq(integer, integer) RETURNS boolean LANGUAGE sql AS $$ SELECT evil.record('integer =') $$;
CREATE OR REPLACE FUNCTION evil.text_ne(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT evil.record('text <>') $$;
DROP OPERATOR IF EXISTS evil.= (integer, integer); CREATE OPERATOR evil.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.int4_eq);
DROP OPERATOR IF EXISTS evil.<> (text, text); CREATE OPERATOR evil.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_ne);
CREATE OR REPLACE FUNCTION pg_temp.lower(text) RETURNS text LANGUAGE sql AS $$ SELECT evil.record('pg_temp.lower')::text $$;
CREATE OR REPLACE FUNCTION pg_temp.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT CASE WHEN evil.record('pg_temp.now') THEN 'epoch'::timestamptz END $$;
"""


def mallory(su):
    """An application role allowed to create schemas."""
    su.execute("""DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mallory') THEN
                  CREATE ROLE mallory LOGIN IN ROLE vetassist_app; END IF; END $$""")
    su.execute("GRANT CREATE ON DATABASE vetassist TO mallory")


def plant(m):
    """mallory plants look-alike functions and operators in schema evil (and in her pg_temp),
    which each record that they ran."""
    m.execute("CREATE SCHEMA IF NOT EXISTS evil")
    m.execute("SET ROLE mallory")
    for statement in PLANTS.split(";\n"):
        if statement.strip() and "CREATE SCHEMA" not in statement and "SET ROLE" not in statement:
            m.execute(statement)


def test_planted_functions_and_operators_never_run_inside_the_api(cluster, su):
    mallory(su)
    with cluster.connect("vetassist", "mallory") as m:
        plant(m)
        m.execute("SET search_path = evil, pg_temp, pg_catalog, public")
        assert m.execute("SELECT 'a' = 'b'::text").fetchone()[0] is True  # the plants work where allowed
        m.execute("DELETE FROM evil.calls")
        uid = m.execute("SELECT vetassist_auth.upsert_va_user('1012669999V000777', 'veteran', 'M@Example.org', 'Mal', 'Lory')").fetchone()[0]
        calls = [
            ("SELECT vetassist_auth.find_user_by_icn('1012669999V000777')", None),
            ("SELECT count(*) FROM vetassist_auth.find_users_by_email('m@example.org')", None),
            ("SELECT vetassist_auth.store_va_tokens(%s, 'access', 'refresh', pg_catalog.now() + interval '1 hour', 'openid')", (uid,)),
            ("SELECT vetassist_auth.va_access_token(%s)", (uid,)),
            ("SELECT vetassist_auth.create_session(%s, 'jwt-mallory', pg_catalog.now() + interval '1 hour', '10.0.0.1', 'ua', 'fp')", (uid,)),
            ("SELECT vetassist_auth.touch_session('jwt-mallory')", None),
            ("SELECT vetassist_auth.session_status('jwt-mallory'::text)", None),
            ("SELECT vetassist_auth.log_session_event('jwt-mallory', 'x', 'info', '{}')", None),
            ("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)),
            ("SELECT * FROM vetassist_auth.user_profile(%s)", (uid,)),
            ("SELECT vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('x', 'c'), 'c')", None),
            ("SELECT vetassist_auth.field_hash('x', 'email'), vetassist_auth.field_hashes('X', 'email')", None),
            ("SELECT vetassist_auth.audit_event('app', 'probe', 'info', '{}')", None),
            ("SELECT vetassist_auth.end_session('jwt-mallory', 'logout')", None),
            ("SELECT vetassist_auth.expire_sessions(10)", None),
            ("SELECT vetassist_auth.delete_va_tokens(%s)", (uid,)),
        ]
        # (The calls themselves use no operator: at top level the caller's search_path applies.)
        for sql, params in calls:
            m.execute(sql, params)
        assert m.execute("SELECT vetassist_auth.find_user_by_icn('1012669999V000777')").fetchone()[0] == uid
        assert m.execute("SELECT count(*) FROM evil.calls").fetchone()[0] == 0
    # Nothing the API stored came from a planted function.
    assert su.execute("SELECT count(*) FROM vetassist_auth.sessions WHERE created_at = 'epoch' OR id = '00000000-0000-0000-0000-000000000000'").fetchone()[0] == 0


# The crypto hot path (src/encryption.rs): Rust functions that run no SQL of their own and pin
# the path around the key reads they cause (src/keys/search_path.rs).
UNPINNED_HOT_PATH = {
    "encrypt(bytea,text)", "decrypt(bytea,text)", "encrypt_text(text,text)", "decrypt_text(bytea,text)",
    "field_hash(text,text)", "field_hashes(text,text)", "opens(bytea,text,text)", "open_phi(bytea,text)",
    "open_phi_text(bytea,text)", "seal_phi_text(text,text)", "encrypt_token(text,text)", "decrypt_token(bytea,text)",
    "encrypt_mfa_secret(bytea,text)", "open_mfa_secret(bytea,text)",
}


def test_every_security_definer_function_pins_its_search_path_but_the_rust_hot_path(su):
    unpinned = su.execute("""SELECT replace(replace(p.oid::regprocedure::text, 'vetassist_auth.', ''), ', ', ','), l.lanname
                             FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
                             WHERE p.pronamespace = 'vetassist_auth'::regnamespace AND p.prosecdef
                               AND NOT ('search_path=pg_catalog, pg_temp' = ANY (coalesce(p.proconfig, '{}')))""").fetchall()
    assert {name for name, _ in unpinned} == UNPINNED_HOT_PATH
    assert {language for _, language in unpinned} == {"c"}


def test_the_hot_path_reads_keys_under_a_pinned_search_path_whatever_the_callers(cluster, su):
    """The unpinned functions read keys, key leases and first keys through SPI: with a cold key
    cache, keys rotated under it and leases running out, none of mallory's plants runs, and her
    own search_path is hers again after every call."""
    mallory(su)
    with cluster.connect("vetassist", "admin_user") as admin:
        with cluster.connect("vetassist", "app_user") as app:
            old = app.execute("SELECT vetassist_auth.encrypt_text('before', 'notes.body:1'), "
                              "vetassist_auth.field_hash('old@example.org', 'email')").fetchone()
        for purpose in ("phi", "hash"):
            admin.execute("SELECT vetassist_auth.rotate_key(%s)", (purpose,))
        with cluster.connect("vetassist", "mallory") as m:  # a new backend: nothing cached
            plant(m)
            m.execute("SET search_path = evil, pg_temp, pg_catalog, public")
            m.execute("DELETE FROM evil.calls")
            # Under the decrypt_only key (loaded by id), then the active ones.
            assert m.execute("SELECT vetassist_auth.decrypt_text(%s, 'notes.body:1')", (old[0],)).fetchone()[0] == "before"
            assert old[1] in m.execute("SELECT vetassist_auth.field_hashes('old@example.org', 'email')").fetchone()[0]
            for round_ in range(2):
                # More than one lease of 128 encryptions: the counter is read again.
                sealed = m.execute("SELECT array_agg(vetassist_auth.encrypt_text('n' || n, 'notes.body:' || n)) "
                                   "FROM generate_series(1, 300) n").fetchone()[0]
                assert m.execute("SELECT vetassist_auth.decrypt_text((%s::bytea[])[7], 'notes.body:7')", (sealed,)).fetchone()[0] == "n7"
                m.execute("SELECT vetassist_auth.field_hash('x@example.org', 'email')")
                assert m.execute("SHOW search_path").fetchone()[0] == "evil, pg_temp, pg_catalog, public"
                if round_ == 0:
                    # Rotated while mallory's backend holds the keys: it reloads them.
                    admin.execute("SELECT vetassist_auth.rotate_key('phi')")
            assert m.execute("SELECT count(*) FROM evil.calls").fetchone()[0] == 0
            assert m.execute("SELECT 1 = 1").fetchone()[0] is True  # the plants run where her path rules
            assert m.execute("SELECT count(*) FROM evil.calls").fetchone()[0] == 1
