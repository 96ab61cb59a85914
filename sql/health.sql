-- verify_installation(): one row per check, for operators and monitoring.
CREATE FUNCTION vetassist_auth.verify_installation()
RETURNS TABLE (check_name text, ok boolean, detail text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
    p text;
    missing text;
BEGIN
    FOREACH t IN ARRAY ARRAY['keys', 'users', 'va_tokens', 'sessions', 'session_routes', 'session_activity', 'session_events',
                             'mfa_settings', 'mfa_backup_codes', 'trusted_devices', 'audit_log', 'audit_seals',
                             'audit_seal_state', 'row_audit_registry', 'node_promotions'] LOOP
        check_name := 'table ' || t;
        ok := to_regclass('vetassist_auth.' || t) IS NOT NULL;
        detail := CASE WHEN ok THEN 'present' ELSE 'missing' END;
        RETURN NEXT;
        IF ok THEN
            check_name := 'backup ' || t;
            ok := EXISTS (SELECT 1 FROM pg_extension e
                          WHERE e.extname = 'vetassist_auth'
                            AND ('vetassist_auth.' || t)::regclass::oid = ANY (e.extconfig));
            detail := CASE WHEN ok THEN 'registered with pg_extension_config_dump' ELSE 'not dumped by pg_dump' END;
            RETURN NEXT;
        END IF;
    END LOOP;

    -- distribute() trades the unique indexes Citus cannot keep for plain ones (citus.sql).
    FOREACH t IN ARRAY ARRAY['keys_one_active_per_purpose', 'users_email_hash', 'va_tokens_user_id_key',
                             'va_tokens_expiry', 'session_routes_pkey', 'sessions_live_by_expiry', 'sessions_by_user',
                             'audit_log_by_subject', 'audit_seals_audit_id_key']
                       || CASE WHEN vetassist_auth.distributed() THEN ARRAY['users_by_va_icn_hash']
                               ELSE ARRAY['users_va_icn_hash_key', 'sessions_jwt_id_key'] END LOOP
        check_name := 'index ' || t;
        ok := to_regclass('vetassist_auth.' || t) IS NOT NULL;
        detail := CASE WHEN ok THEN 'present' ELSE 'missing' END;
        RETURN NEXT;
    END LOOP;

    IF vetassist_auth.citus_coordinator() THEN
        -- Every worker answers and runs this same version (each verifies its own audit chain).
        check_name := 'citus workers';
        SELECT bool_and(w.success AND w.result = e.extversion),
               string_agg(w.node || ' ' || w.result, ', ' ORDER BY w.ordinality)
        INTO ok, detail
        FROM vetassist_auth.on_workers('SELECT extversion FROM pg_catalog.pg_extension WHERE extname = ''vetassist_auth''')
                 WITH ORDINALITY w,
             pg_extension e
        WHERE e.extname = 'vetassist_auth';
        ok := coalesce(ok, false);
        detail := coalesce(detail, 'no workers');
        RETURN NEXT;
    END IF;

    FOREACH t IN ARRAY ARRAY['vetassist_app', 'vetassist_auditor', 'vetassist_admin'] LOOP
        check_name := 'role ' || t;
        ok := EXISTS (SELECT 1 FROM pg_roles WHERE rolname = t);
        detail := CASE WHEN ok THEN 'present' ELSE 'missing' END;
        RETURN NEXT;
    END LOOP;

    -- SUPERUSER, CREATEROLE, REPLICATION or BYPASSRLS is more than an extension role grants (the
    -- master key file, any role, a copy of every table, past row security): neither an extension
    -- role nor a login that holds one, directly or through other roles, should have any
    -- (README, "Who must not hold what").
    check_name := 'roles: no extension role or member of one holds SUPERUSER, CREATEROLE, REPLICATION or BYPASSRLS';
    WITH RECURSIVE member_of(member, granted) AS (
        SELECT r.oid, r.oid FROM pg_roles r WHERE r.rolname IN ('vetassist_app', 'vetassist_auditor', 'vetassist_admin')
        UNION
        SELECT m.member, mo.granted FROM pg_auth_members m JOIN member_of mo ON m.roleid = mo.member
    )
    SELECT string_agg(DISTINCT r.rolname || ' (' || g.rolname || ': '
                      || concat_ws(' ', CASE WHEN r.rolsuper THEN 'SUPERUSER' END, CASE WHEN r.rolcreaterole THEN 'CREATEROLE' END,
                                   CASE WHEN r.rolreplication THEN 'REPLICATION' END, CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END)
                      || ')', ', ') INTO missing
    FROM member_of mo JOIN pg_roles r ON r.oid = mo.member JOIN pg_roles g ON g.oid = mo.granted
    WHERE r.rolsuper OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls;
    ok := missing IS NULL;
    detail := coalesce('more power than an extension role grants: ' || missing, 'none');
    RETURN NEXT;

    check_name := 'grants: no function executable by PUBLIC';
    SELECT string_agg(f.oid::regprocedure::text, ', ') INTO missing
    FROM pg_proc f
    WHERE f.pronamespace = 'vetassist_auth'::regnamespace
      AND has_function_privilege('public', f.oid, 'EXECUTE');
    ok := missing IS NULL;
    detail := coalesce('executable by PUBLIC: ' || missing, 'none');
    RETURN NEXT;

    -- But the crypto hot path: Rust functions that run no SQL by name and pin the path around
    -- the key reads they cause (docs/ARCHITECTURE.md, "The hot path and search_path").
    check_name := 'grants: SECURITY DEFINER functions pin search_path';
    SELECT string_agg(f.oid::regprocedure::text, ', ') INTO missing
    FROM pg_proc f
    WHERE f.pronamespace = 'vetassist_auth'::regnamespace AND f.prosecdef
      AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (f.proconfig), false)
      AND NOT (f.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
               AND f.proname IN ('encrypt', 'decrypt', 'encrypt_text', 'decrypt_text', 'field_hash',
                                 'field_hashes', 'opens', 'open_phi', 'open_phi_text', 'seal_phi_text',
                                 'encrypt_token', 'decrypt_token', 'encrypt_mfa_secret', 'open_mfa_secret'));
    ok := missing IS NULL;
    detail := coalesce('unpinned: ' || missing, 'all pinned to pg_catalog, pg_temp (the Rust crypto functions pin it around their key reads)');
    RETURN NEXT;

    check_name := 'grants: vetassist_app has no direct table access';
    SELECT string_agg(c.relname, ', ') INTO missing
    FROM pg_class c
    WHERE c.relnamespace = 'vetassist_auth'::regnamespace AND c.relkind IN ('r', 'v', 'p')
      AND (has_table_privilege('vetassist_app', c.oid, 'SELECT')
           OR has_table_privilege('vetassist_app', c.oid, 'INSERT')
           OR has_table_privilege('vetassist_app', c.oid, 'UPDATE')
           OR has_table_privilege('vetassist_app', c.oid, 'DELETE'));
    ok := missing IS NULL;
    detail := coalesce('readable or writable: ' || missing, 'none');
    RETURN NEXT;

    check_name := 'audit: append-only triggers';
    SELECT string_agg(tab, ', ') INTO missing FROM unnest(ARRAY['audit_log', 'audit_seals']) tab
    WHERE (SELECT count(*) FROM pg_trigger g WHERE g.tgrelid = ('vetassist_auth.' || tab)::regclass
             AND g.tgname IN ('append_only', 'append_only_truncate') AND g.tgenabled <> 'D') < 2;
    ok := missing IS NULL;
    detail := coalesce('missing or disabled on: ' || missing, 'audit_log and audit_seals refuse UPDATE, DELETE, TRUNCATE');
    RETURN NEXT;

    check_name := 'audit: row audit on the extension''s tables';
    SELECT string_agg(tab, ', ') INTO missing
    FROM unnest(ARRAY['users', 'sessions', 'mfa_settings', 'mfa_backup_codes', 'trusted_devices', 'keys']) tab
    WHERE NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = ('vetassist_auth.' || tab)::regclass
                        AND g.tgname = 'vetassist_row_audit' AND g.tgenabled IN ('O', 'A'));
    ok := missing IS NULL;
    detail := coalesce('not audited: ' || missing, 'all audited');
    RETURN NEXT;

    -- Tables an administrator put under row audit (the registry enable_row_audit keeps) that
    -- no longer have a row-audit trigger that fires: disabled, replica-only, renamed, replaced
    -- or dropped. The registry, not the audit log: a check must not cost the whole log.
    check_name := 'audit: row audit enabled everywhere it was enabled';
    SELECT string_agg(r.target::text, ', ' ORDER BY r.target::text) INTO missing
    FROM vetassist_auth.row_audit_registry r
    WHERE r.enabled AND NOT vetassist_auth.row_audit_fires(r.target);
    ok := missing IS NULL;
    detail := coalesce('not firing (disabled, replica-only, renamed, replaced or dropped) on: ' || missing,
                       'every table put under row audit still has it');
    RETURN NEXT;

    check_name := 'logs: every channel in force can be redacted';
    detail := vetassist_auth.unredactable_log_channels();
    ok := detail IS NULL;
    detail := coalesce(detail, 'statements of the extension reach the log with their literals masked');
    RETURN NEXT;

    -- A logical replica writes nothing of ours until promote() (docs/ARCHITECTURE.md, "Replicas
    -- and failover").
    check_name := 'replication: node role';
    SELECT s.ok, s.detail INTO ok, detail FROM vetassist_auth.node_role_state() s;
    RETURN NEXT;

    check_name := 'audit: disclosures and failed authentications survive a rollback';
    SELECT s.ok, s.detail INTO ok, detail FROM vetassist_auth.durable_audit_state() s;
    RETURN NEXT;

    -- The setting the master key comes from; for a command, its load and last run (docs/operations.md,
    -- "The master key from a KMS").
    check_name := 'keys: master key source';
    SELECT s.ok, s.detail INTO ok, detail FROM vetassist_auth.master_key_source() s;
    RETURN NEXT;

    -- Before the previous master key file is removed (docs/operations.md, "Changing the master key").
    check_name := 'keys: wrapped under the current master key';
    detail := vetassist_auth.key_wrapping_problem();
    ok := detail IS NULL;
    detail := coalesce(detail, 'every data key opens under the current master key');
    RETURN NEXT;

    FOREACH p IN ARRAY vetassist_auth.key_purposes() LOOP
        check_name := 'key ' || p;
        -- Read-only: a check never creates a key (a data-only restore needs an empty key table).
        IF NOT EXISTS (SELECT 1 FROM vetassist_auth.keys k WHERE k.purpose = p AND k.status = 'active') THEN
            ok := true;
            detail := 'no key yet: created on first use';
        ELSE
            BEGIN
                detail := 'active key ' || vetassist_auth.active_key_id(p) || ' unwraps';
                ok := true;
            EXCEPTION WHEN OTHERS THEN
                ok := false;
                detail := SQLSTATE || ': ' || SQLERRM;
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION vetassist_auth.verify_installation() IS
    'Checks tables, backups, indexes, roles, grants and key access; one row per check.';

-- Who may call the functions of this file (any other function of the extension: no role,
-- sql/grants.sql).
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_installation() TO vetassist_admin, vetassist_auditor;
