"""The registry of protected columns (protected_columns(), src/protected_columns.rs) is complete
and drives what it claims: key_usage, reencrypt, and the reserved contexts and disclosures of
encrypt/decrypt. Every test reads the registry, so a column added to it is tested here too."""
import re
import uuid

import psycopg
import pytest

from vetassist_testing import authenticator_code, enrolled_mfa, install

DB = "registry"

# bytea columns that hold no value under a data key: wrapped key material and the audit chain's
# own digests (under the audit key named by audit_seals.key_id).
NOT_UNDER_A_DATA_KEY = {"keys.wrapped_key", "audit_seals.prev_hash", "audit_seals.hash", "audit_seal_state.checkpoint_hash"}


@pytest.fixture(scope="module")
def registry_cluster(cluster):
    """A database of this module's own in the shared cluster: its keys and values are its own."""
    install(cluster, DB)
    return cluster


def registry(conn):
    return conn.execute("SELECT * FROM vetassist_auth.protected_columns()").fetchall()


def columns_of(su, table):
    return {r[0] for r in su.execute("""SELECT attname FROM pg_attribute
                                         WHERE attrelid = ('vetassist_auth.' || quote_ident(%s))::regclass
                                           AND attnum > 0 AND NOT attisdropped""", (table,))}


def test_every_column_under_a_data_key_is_registered(registry_cluster):
    with registry_cluster.connect(DB) as su:
        rows = registry(su)
        registered = {f"{r[0]}.{r[1]}" for r in rows}
        bytea = {r[0] for r in su.execute("""
            SELECT c.relname || '.' || a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            WHERE c.relnamespace = 'vetassist_auth'::regnamespace AND c.relkind = 'r'
              AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid = 'bytea'::regtype""")}
        assert bytea - registered == NOT_UNDER_A_DATA_KEY
        for table, column, _purpose, row_id, _name, context_id, _field, hash_of, _disclosure in rows:
            names = {column, row_id, context_id, hash_of} - {None}
            assert names <= columns_of(su, table), f"{table}: {names - columns_of(su, table)}"
        # key_usage has one branch per registered column (read from its definition: a fresh
        # database holds no value to count).
        view = su.execute("SELECT pg_get_viewdef('vetassist_auth.key_usage'::regclass)").fetchone()[0]
        branches = re.findall(r"'([a-z_]+\.[a-z_]+)'::text", view)
        assert sorted(set(branches)) == sorted(registered), view


def test_administrators_and_auditors_read_the_registry_and_the_application_does_not(registry_cluster):
    for role in ("admin_user", "auditor_user"):
        with registry_cluster.connect(DB, role) as conn:
            assert len(registry(conn)) > 0
    with registry_cluster.connect(DB, "app_user") as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            registry(app)
        for call in ("vetassist_auth.reseal('\\x00', 'users.email:x', 'phi')",
                     "vetassist_auth.rehash('\\x00', 'users.email:x', 'phi', 'email')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute(f"SELECT {call}")


def fill_every_table(app):
    """A veteran with a value in every movable column: profile, VA tokens, a session whose
    refresh token was rotated (its successor kept), a confirmed TOTP secret."""
    uid = app.execute("SELECT vetassist_auth.upsert_va_user('1012669999V000001', 'veteran', "
                      "'lee.registry@example.org', 'Lee', 'Registry')").fetchone()[0]
    app.execute("SELECT vetassist_auth.store_va_tokens(%s, 'va-access-reg', 'va-refresh-reg', now() + interval '1 hour', 'openid')", (uid,))
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-registry', now() + interval '8 hours', '10.1.2.3')", (uid,))
    assert app.execute("SELECT vetassist_auth.rotate_session_refresh_token('jti-registry', NULL, 'app-refresh-1')").fetchone()[0] == 1
    uri = enrolled_mfa(app, uid)
    return uid, uri


def test_rotating_every_purpose_moves_every_registered_value_and_all_of_them_still_read(registry_cluster):
    c = registry_cluster
    with c.connect(DB, "app_user") as app, c.connect(DB, "admin_user") as admin, \
            c.connect(DB) as su:
        uid, uri = fill_every_table(app)
        movable = [(r[0], r[1], r[2]) for r in registry(admin) if r[4] is not None or r[7] is not None]
        assert movable
        for table, column, _ in movable:
            assert su.execute(f"SELECT count({column}) FROM vetassist_auth.{table}").fetchone()[0] > 0, \
                f"the test wrote nothing into {table}.{column}"
        for purpose in sorted({p for _, _, p in movable}):
            admin.execute("SELECT vetassist_auth.rotate_key(%s)", (purpose,))
        while admin.execute("SELECT vetassist_auth.reencrypt(1000)").fetchone()[0] > 0:
            pass

        for table, column, purpose in movable:
            under = su.execute("""SELECT DISTINCT k.purpose, k.status FROM vetassist_auth.key_usage u
                                  JOIN vetassist_auth.keys k USING (key_id) WHERE u.used_by = %s""",
                               (f"{table}.{column}",)).fetchall()
            assert under == [(purpose, "active")], f"{table}.{column} is under {under}"

        assert app.execute("SELECT va_icn, email, first_name, last_name FROM vetassist_auth.user_profile(%s)",
                           (uid,)).fetchone() == ("1012669999V000001", "lee.registry@example.org", "Lee", "Registry")
        assert app.execute("SELECT vetassist_auth.find_user_by_icn('1012669999V000001')").fetchone()[0] == uid
        assert app.execute("SELECT count(*) FROM vetassist_auth.find_users_by_email('LEE.registry@example.org')").fetchone()[0] == 1
        assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == "va-access-reg"
        assert app.execute("SELECT vetassist_auth.va_refresh_token(%s)", (uid,)).fetchone()[0] == "va-refresh-reg"
        # Two tabs: the token just replaced still yields the successor kept under the new key.
        assert app.execute("SELECT vetassist_auth.rotate_session_refresh_token('jti-registry', 'app-refresh-1', 'app-refresh-2')").fetchone()[0] == 2
        assert app.execute("SELECT refresh_token FROM vetassist_auth.refresh_session_token('jti-registry', 'app-refresh-1', 'app-refresh-3')").fetchone()[0] == "app-refresh-2"
        # The TOTP secret opens under the new mfa key (the next step: the current one was used).
        assert app.execute("SELECT vetassist_auth.mfa_verify('jti-registry', %s)", (authenticator_code(uri, 1),)).fetchone()[0]


def test_every_registered_envelope_context_is_refused_to_the_application(registry_cluster):
    with registry_cluster.connect(DB) as su:
        names = [r[4] for r in registry(su) if r[4] is not None]
    assert names
    with registry_cluster.connect(DB, "app_user") as app:
        for name in names:
            for call in ("encrypt_text(%s::text, %s)", "encrypt(%s::bytea, %s)"):
                with pytest.raises(psycopg.errors.InvalidParameterValue):
                    app.execute(f"SELECT vetassist_auth.{call}", ("forged", f"{name}:{uuid.uuid4()}"))
        # The application's own contexts are its to use.
        assert app.execute("SELECT vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('note', 'notes.body:1'), 'notes.body:1')").fetchone()[0] == "note"


def test_decrypting_a_registered_phi_value_is_recorded_as_a_disclosure(registry_cluster):
    c = registry_cluster
    with c.connect(DB, "app_user") as app, c.connect(DB) as su:
        uid = app.execute("SELECT vetassist_auth.upsert_va_user('1012669999V000002', 'veteran', "
                          "'kim.registry@example.org', 'Kim', 'Registry')").fetchone()[0]
        disclosed = [r for r in registry(su) if r[8] and r[2] == "phi"]
        assert disclosed
        for table, column, _purpose, _row_id, name, context_id, *_ in disclosed:
            stored, context_value = su.execute(f"SELECT {column}, {context_id}::text FROM vetassist_auth.{table} WHERE {context_id} = %s",
                                               (uid,)).fetchone()
            app.execute("SELECT vetassist_auth.decrypt_text(%s, %s)", (stored, f"{name}:{context_value}"))
            field = name.split(".", 1)[1]
            assert su.execute("""SELECT count(*) FROM vetassist_auth.audit_log
                                 WHERE subject_user_id = %s AND event_type = 'value_decrypted' AND target_table = %s
                                   AND details->>'field' = %s""", (uid, table, field)).fetchone()[0] == 1, name
