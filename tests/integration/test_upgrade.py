"""Upgrades: every released version, built as Postgres builds it (the base install script and the
upgrade chain, sql/RELEASED), filled with data, then ALTER EXTENSION UPDATE to this version.
Everything written before still decrypts and verifies, the API keeps working, and the upgraded
catalog is the same as a fresh install's."""
import pytest

from vetassist_testing import Cluster, EXTENSION_DIR, ROOT, authenticator_code, enrolled_mfa, install
from test_release import released, version

RELEASES = [v for v, _script, _digest in released()]


@pytest.fixture(scope="module")
def upgrade_cluster():
    # An install script of a released version other than the base (a frozen copy an older
    # checkout installed) would be used instead of the chain.
    for stale in RELEASES[1:]:
        (EXTENSION_DIR / f"vetassist_auth--{stale}.sql").unlink(missing_ok=True)
    c = Cluster("upgrade", "shared_preload_libraries = 'vetassist_auth'")
    try:
        yield c
    finally:
        c.stop()


def fill(c, dbname):
    """A veteran signed in under the old version: profile, VA tokens, a session, TOTP, audit rows,
    sealed and rotated keys."""
    with c.connect(dbname, "app_user") as app:
        uid = app.execute("SELECT vetassist_auth.upsert_va_user('1012667145V762142', 'veteran', "
                          "'maria.hernandez@example.org', 'Maria', 'Hernandez')").fetchone()[0]
        app.execute("SELECT vetassist_auth.store_va_tokens(%s, 'va-access-before-upgrade', 'va-refresh-before-upgrade', "
                    "now() + interval '1 hour', 'openid profile')", (uid,))
        app.execute("SELECT vetassist_auth.create_session(%s, 'jti-before-upgrade', now() + interval '8 hours')", (uid,))
        uri = enrolled_mfa(app, uid)
        # Two failed codes: a streak the lock-out must still count after the upgrade.
        for _ in range(2):
            assert not app.execute("SELECT vetassist_auth.mfa_verify('jti-before-upgrade', '000000')").fetchone()[0]
        with app.transaction():
            app.execute("SELECT vetassist_auth.set_actor(%s)", (uid,))
            app.execute("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{\"page\": \"labs\"}')")
    with c.connect(dbname, "admin_user") as admin:
        admin.execute("SELECT vetassist_auth.rotate_key('phi')")
        admin.execute("SELECT vetassist_auth.seal_audit_log(100000)")
    return uid, uri


def test_each_release_upgrades_with_its_data(upgrade_cluster):
    c = upgrade_cluster
    current = version()
    for release in (r for r in RELEASES if r != current):
        db = "from_" + release.replace(".", "_")
        install(c, db, version=release)
        uid, uri = fill(c, db)

        c.psql("ALTER EXTENSION vetassist_auth UPDATE", db)
        with c.connect(db) as su:
            assert su.execute("SELECT extversion FROM pg_extension WHERE extname = 'vetassist_auth'").fetchone()[0] == current
            assert su.execute("""SELECT s.failures FROM vetassist_auth.mfa_settings m,
                                  vetassist_auth.mfa_lock_state(m.user_id, m.failures_counted_from) s
                                  WHERE m.user_id = %s""", (uid,)).fetchone()[0] == 2

        with c.connect(db, "app_user") as app:
            # Data written before the upgrade still decrypts, under the rotated and the old key.
            profile = app.execute("SELECT va_icn, email, first_name, last_name FROM vetassist_auth.user_profile(%s)",
                                  (uid,)).fetchone()
            assert profile == ("1012667145V762142", "maria.hernandez@example.org", "Maria", "Hernandez")
            assert app.execute("SELECT vetassist_auth.find_user_by_icn('1012667145V762142')").fetchone()[0] == uid
            assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == "va-access-before-upgrade"
            assert app.execute("SELECT vetassist_auth.va_refresh_token(%s)", (uid,)).fetchone()[0] == "va-refresh-before-upgrade"
            # The session and TOTP enrolment carry on.
            assert app.execute("SELECT vetassist_auth.touch_session('jti-before-upgrade')::text").fetchone()[0] == "ACTIVE"
            assert app.execute("SELECT vetassist_auth.mfa_verify('jti-before-upgrade', %s)", (authenticator_code(uri, 1),)).fetchone()[0]
            # New writes work and are audited.
            app.execute("SELECT vetassist_auth.upsert_va_user('1012667145V762142', 'veteran', 'maria.h@example.org', NULL, NULL)")
            with app.transaction():
                app.execute("SELECT vetassist_auth.set_actor(%s)", (uid,))
                app.execute("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{\"page\": \"meds\"}')")
            # A disclosure of the new release, sealed below with the rows before the upgrade.
            app.execute("SELECT vetassist_auth.record_disclosure(%s, 'County registry', 'Labs', 'public_health')", (uid,))
            assert app.execute("SELECT vetassist_auth.end_session('jti-before-upgrade', 'logout')").fetchone()[0]
        with c.connect(db, "admin_user") as admin:
            # The TOTP secret enrolled under the old version (a phi key) moves to an mfa key.
            while admin.execute("SELECT vetassist_auth.reencrypt(1000)").fetchone()[0] > 0:
                pass
            assert admin.execute("SELECT vetassist_auth.seal_audit_log(100000)").fetchone()[0] > 0
        with c.connect(db) as su:
            assert su.execute("""SELECT k.purpose FROM vetassist_auth.mfa_settings m JOIN vetassist_auth.keys k
                                 ON k.key_id = vetassist_auth.envelope_key_id(m.totp_secret_encrypted)
                                 WHERE m.user_id = %s""", (uid,)).fetchone()[0] == "mfa"
        with c.connect(db, "auditor_user") as auditor:
            # The chain sealed before the upgrade continues after it and verifies end to end.
            ok, checked, bad, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
            assert (ok, bad, problem) == (True, None, None)
            assert checked == auditor.execute("SELECT count(*) FROM vetassist_auth.audit_log").fetchone()[0]
            events = [r[0] for r in auditor.execute(
                "SELECT event_type FROM vetassist_auth.phi_disclosures(%s, now() - interval '1 hour', now() + interval '1 hour')",
                (uid,))]
            assert events.count("record_viewed") == 2
            assert auditor.execute("SELECT recipient FROM vetassist_auth.accounting_of_disclosures(%s)",
                                   (uid,)).fetchall() == [("County registry",)]


CATALOG = """
SELECT 'function ' || p.oid::regprocedure || ' ' || concat_ws(' | ', pg_get_function_result(p.oid),
       pg_get_function_arguments(p.oid), p.prokind, p.prosecdef, p.proisstrict, p.provolatile, p.proparallel,
       p.proconfig::text, l.lanname, CASE WHEN l.lanname = 'c' THEN p.prosrc ELSE md5(p.prosrc) END,
       p.proacl::text, obj_description(p.oid, 'pg_proc'))
FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.pronamespace = 'vetassist_auth'::regnamespace
UNION ALL
SELECT 'relation ' || c.oid::regclass || ' ' || concat_ws(' | ', c.relkind, c.relacl::text, obj_description(c.oid, 'pg_class'),
       (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                          || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''), ', ' ORDER BY a.attnum)
        FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped))
FROM pg_class c WHERE c.relnamespace = 'vetassist_auth'::regnamespace
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
WHERE c.relnamespace = 'vetassist_auth'::regnamespace
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
WHERE connamespace = 'vetassist_auth'::regnamespace
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = 'vetassist_auth'::regnamespace AND NOT t.tgisinternal
UNION ALL
SELECT 'type ' || t.oid::regtype || ' ' || coalesce((SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = t.oid), '')
FROM pg_type t WHERE t.typnamespace = 'vetassist_auth'::regnamespace AND t.typtype IN ('e', 'd', 'c') AND t.typrelid = 0
UNION ALL
SELECT 'config dump ' || unnest(extconfig)::regclass FROM pg_extension WHERE extname = 'vetassist_auth'
UNION ALL
SELECT 'schema acl ' || nspacl::text FROM pg_namespace WHERE nspname = 'vetassist_auth'
"""


def catalog(c, dbname):
    with c.connect(dbname) as su:
        return sorted(r[0] for r in su.execute(CATALOG))


def test_an_upgraded_catalog_is_the_same_as_a_fresh_install(upgrade_cluster):
    c = upgrade_cluster
    current = version()
    install(c, "fresh")
    fresh = catalog(c, "fresh")
    assert any(line.startswith("function vetassist_auth.write_audit(") for line in fresh)
    for release in (r for r in RELEASES if r != current):
        db = "catalog_" + release.replace(".", "_")
        install(c, db, version=release)
        c.psql("ALTER EXTENSION vetassist_auth UPDATE", db)
        upgraded = catalog(c, db)
        missing = sorted(set(fresh) - set(upgraded))
        extra = sorted(set(upgraded) - set(fresh))
        assert (missing, extra) == ([], []), f"upgrade from {release} differs from a fresh install of {current}"


def test_every_release_has_an_upgrade_path_to_this_version():
    # The version in development is reached from the newest release.
    current = version()
    chain = RELEASES if current in RELEASES else [*RELEASES, current]
    scripts = {p.name for p in (ROOT / "sql").glob("vetassist_auth--*--*.sql")}
    for older, newer in zip(chain, chain[1:]):
        assert f"vetassist_auth--{older}--{newer}.sql" in scripts, f"no upgrade script from {older} to {newer}"


def test_the_new_library_serves_the_last_release_before_its_update(upgrade_cluster):
    """Adversary review: between installing the new build and ALTER EXTENSION UPDATE, every
    set_actor with a client IP failed (the old keys table refuses the audit_ip purpose). The
    library serves the old SQL until the update: IP hashes there go under the hash purpose,
    which field_hashes(…, 'ip') searches too."""
    c = upgrade_cluster
    db = "serves_" + RELEASES[-1].replace(".", "_")
    install(c, db, version=RELEASES[-1])
    with c.connect(db, "app_user") as app:
        with app.transaction():
            app.execute("SELECT vetassist_auth.set_actor(NULL, '10.1.1.1')")
            app.execute("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{}')")
    c.psql("ALTER EXTENSION vetassist_auth UPDATE", db)
    with c.connect(db) as su:
        assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log "
                          "WHERE ip_hash = ANY(vetassist_auth.field_hashes('10.1.1.1', 'ip'))").fetchone()[0] == 1
