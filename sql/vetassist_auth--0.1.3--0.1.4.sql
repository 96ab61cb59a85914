-- vetassist_auth 0.1.3 -> 0.1.4
-- One registry of the columns that depend on a data key (protected_columns(), from
-- src/protected_columns.rs) generates key_usage and drives reencrypt, which now seals again and
-- hashes again inside reseal/rehash, so no plaintext passes through its SQL. key_usage names
-- the audit seals' column as 'audit_seals.key_id' (was 'audit_seals').
-- The crypto functions written in Rust drop their SET search_path (they run no SQL by name;
-- the key reads they cause pin the path themselves): encrypt, decrypt and field_hash cost
-- about half of what they did.
\echo Use "ALTER EXTENSION vetassist_auth UPDATE TO '0.1.4'" to load this file. \quit

-- Functions new or changed since 0.1.3, as in this release's install script
-- (scripts/upgrade-functions.py prints them).
CREATE OR REPLACE FUNCTION "decrypt"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS bytea /* Bytea */
STRICT SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'decrypt_wrapper';

CREATE OR REPLACE FUNCTION "decrypt_text"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'decrypt_text_wrapper';

CREATE OR REPLACE FUNCTION "decrypt_token"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT STABLE SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'decrypt_token_wrapper';

CREATE OR REPLACE FUNCTION "encrypt"(
	"plaintext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS bytea /* Bytea */
STRICT SECURITY DEFINER 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'encrypt_for_application_wrapper';

CREATE OR REPLACE FUNCTION "encrypt_mfa_secret"(
	"secret" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS bytea /* Bytea */
STRICT SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'encrypt_mfa_secret_wrapper';

CREATE OR REPLACE FUNCTION "encrypt_text"(
	"plaintext" TEXT, /* & str */
	"context" TEXT /* & str */
) RETURNS bytea /* Bytea */
STRICT SECURITY DEFINER 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'encrypt_text_for_application_wrapper';

CREATE OR REPLACE FUNCTION "encrypt_token"(
	"plaintext" TEXT, /* & str */
	"context" TEXT /* & str */
) RETURNS bytea /* Bytea */
STRICT SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'encrypt_token_wrapper';

CREATE OR REPLACE FUNCTION "field_hash"(
	"value" TEXT, /* & str */
	"field" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT STABLE SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'field_hash_wrapper';

CREATE OR REPLACE FUNCTION "field_hashes"(
	"value" TEXT, /* & str */
	"field" TEXT /* & str */
) RETURNS bytea[] /* Vec < Vec < u8 > > */
STRICT STABLE SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'field_hashes_wrapper';

CREATE OR REPLACE FUNCTION "open_mfa_secret"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT STABLE SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'open_mfa_secret_wrapper';

CREATE OR REPLACE FUNCTION "open_phi"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS bytea /* Bytea */
STRICT STABLE SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'open_phi_wrapper';

CREATE OR REPLACE FUNCTION "open_phi_text"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT STABLE SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'open_phi_text_wrapper';

CREATE OR REPLACE FUNCTION "opens"(
	"ciphertext" bytea, /* Option < & [u8] > */
	"context" TEXT, /* & str */
	"purpose" TEXT /* & str */
) RETURNS bool /* bool */
STABLE SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'opens_wrapper';

CREATE  FUNCTION "protected_columns"() RETURNS TABLE (
	"table_name" TEXT,  /* & '_ str */
	"column_name" TEXT,  /* & '_ str */
	"purpose" TEXT,  /* & '_ str */
	"row_id" TEXT,  /* & '_ str */
	"context_name" TEXT,  /* Option < & '_ str > */
	"context_id" TEXT,  /* Option < & '_ str > */
	"hash_field" TEXT,  /* Option < & '_ str > */
	"hash_of" TEXT,  /* Option < & '_ str > */
	"decrypt_is_disclosure" bool  /* bool */
)
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'protected_columns_wrapper';

CREATE  FUNCTION "rehash"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT, /* & str */
	"purpose" TEXT, /* & str */
	"field" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'rehash_wrapper';

CREATE  FUNCTION "reseal"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT, /* & str */
	"purpose" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'reseal_wrapper';

CREATE OR REPLACE FUNCTION "seal_phi_text"(
	"plaintext" TEXT, /* & str */
	"context" TEXT /* & str */
) RETURNS bytea /* Bytea */
STRICT SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'seal_phi_text_wrapper';

CREATE OR REPLACE FUNCTION vetassist_auth.reencrypt(batch_size integer DEFAULT 1000) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t     record;
    moved bigint := 0;
    n     bigint;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'vetassist_auth: batch_size must be a positive integer' USING ERRCODE = '22023';
    END IF;

    -- One statement per table of protected_columns(): its rows with an envelope, or a hash of
    -- one, under a key that is not the active one, and whose every envelope opens (a damaged,
    -- foreign or retired-key value stays). Envelopes are sealed again and hashes computed again
    -- from the envelope they hash, inside reseal and rehash: no plaintext passes through here.
    FOR t IN
        WITH c AS (
            SELECT p.*,
                   CASE WHEN p.context_name IS NOT NULL
                        THEN format('%L || t.%I', p.context_name || ':', p.context_id) END AS context,
                   CASE WHEN p.context_name IS NOT NULL OR p.hash_of IS NOT NULL
                        THEN vetassist_auth.active_key_id(p.purpose) END AS active_key
            FROM vetassist_auth.protected_columns() WITH ORDINALITY p
        )
        SELECT c.table_name, min(c.row_id) AS row_id,
               string_agg(format('vetassist_auth.%s(t.%I) <> %s',
                                 CASE WHEN c.purpose = 'hash' THEN 'hash_key_id' ELSE 'envelope_key_id' END,
                                 c.column_name, c.active_key), ' OR ' ORDER BY c.ordinality) AS stale,
               coalesce(string_agg(format('vetassist_auth.opens(t.%I, %s, %L)', c.column_name, c.context, c.purpose),
                                   ' AND ' ORDER BY c.ordinality) FILTER (WHERE c.context IS NOT NULL), 'true') AS opens,
               string_agg(CASE WHEN c.context IS NOT NULL
                               THEN format('%I = vetassist_auth.reseal(t.%I, %s, %L)', c.column_name, c.column_name, c.context, c.purpose)
                               ELSE format('%I = vetassist_auth.rehash(t.%I, %s, %L, %L)', c.column_name, source.column_name,
                                           source.context, source.purpose, c.hash_field)
                          END, ', ' ORDER BY c.ordinality) AS assignments
        FROM c LEFT JOIN c source ON source.table_name = c.table_name AND source.column_name = c.hash_of
        WHERE c.active_key IS NOT NULL
        GROUP BY c.table_name
        ORDER BY min(c.ordinality)
    LOOP
        EXECUTE format('WITH batch AS (SELECT t.%1$I FROM vetassist_auth.%2$I t WHERE (%3$s) AND %4$s '
                       'LIMIT $1 FOR UPDATE SKIP LOCKED) '
                       'UPDATE vetassist_auth.%2$I t SET %5$s FROM batch WHERE t.%1$I = batch.%1$I',
                       t.row_id, t.table_name, t.stale, t.opens, t.assignments)
            USING batch_size;
        GET DIAGNOSTICS n = ROW_COUNT;
        moved := moved + n;
    END LOOP;

    IF moved = 0 THEN
        PERFORM vetassist_auth.retire_unused_keys();
        -- Nothing moved, yet ciphertexts remain under old keys: they do not open (retired key,
        -- damaged, or restored from another database), or another transaction holds their row.
        SELECT count(*) INTO n FROM vetassist_auth.key_usage k JOIN vetassist_auth.keys USING (key_id)
        WHERE keys.purpose IN ('phi', 'token', 'mfa') AND keys.status <> 'active';
        IF n > 0 THEN
            RAISE WARNING 'vetassist_auth: % stored value(s) remain under old keys and were not moved', n
                USING HINT = 'They do not open (a retired key: unretire_key(key_id); damaged or restored from elsewhere) or their row is locked. SELECT key_id, used_by, count(*) FROM vetassist_auth.key_usage GROUP BY 1, 2 shows them.';
        END IF;
    END IF;
    -- After retiring: it writes, and a transaction that wrote first never retires (docs/ARCHITECTURE.md, "Retiring a key").
    PERFORM vetassist_auth.refresh_encrypt_counts();
    RETURN moved;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.verify_installation()
RETURNS TABLE (check_name text, ok boolean, detail text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
    p text;
    missing text;
BEGIN
    FOREACH t IN ARRAY ARRAY['keys', 'users', 'va_tokens', 'sessions', 'session_activity', 'session_events',
                             'mfa_settings', 'mfa_backup_codes', 'trusted_devices', 'audit_log', 'audit_seals',
                             'audit_seal_state'] LOOP
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

    FOREACH t IN ARRAY ARRAY['keys_one_active_per_purpose', 'users_va_icn_hash_key', 'users_email_hash',
                             'va_tokens_user_id_key', 'va_tokens_expiry', 'sessions_jwt_id_key',
                             'sessions_live_by_expiry', 'sessions_by_user', 'audit_log_by_subject',
                             'audit_seals_audit_id_key'] LOOP
        check_name := 'index ' || t;
        ok := to_regclass('vetassist_auth.' || t) IS NOT NULL;
        detail := CASE WHEN ok THEN 'present' ELSE 'missing' END;
        RETURN NEXT;
    END LOOP;

    FOREACH t IN ARRAY ARRAY['vetassist_app', 'vetassist_auditor', 'vetassist_admin'] LOOP
        check_name := 'role ' || t;
        ok := EXISTS (SELECT 1 FROM pg_roles WHERE rolname = t);
        detail := CASE WHEN ok THEN 'present' ELSE 'missing' END;
        RETURN NEXT;
    END LOOP;

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

    -- Tables an administrator put under row audit (enable_row_audit's audit rows, the latest
    -- per table) that no longer have a row-audit trigger that fires: disabled, replica-only,
    -- renamed, replaced or dropped.
    check_name := 'audit: row audit enabled everywhere it was enabled';
    SELECT string_agg(r.target_table, ', ' ORDER BY r.target_table) INTO missing
    FROM (SELECT DISTINCT ON (a.target_table) a.target_table, a.event_type
          FROM vetassist_auth.audit_log a
          WHERE a.category = 'audit' AND a.event_type IN ('row_audit_enabled', 'row_audit_disabled')
          ORDER BY a.target_table, a.id DESC) r
    WHERE r.event_type = 'row_audit_enabled'
      AND NOT coalesce(vetassist_auth.row_audit_fires(to_regclass(r.target_table)), false);
    ok := missing IS NULL;
    detail := coalesce('not firing (disabled, replica-only, renamed, replaced or dropped) on: ' || missing,
                       'every table put under row audit still has it');
    RETURN NEXT;

    check_name := 'logs: every channel in force can be redacted';
    detail := vetassist_auth.unredactable_log_channels();
    ok := detail IS NULL;
    detail := coalesce(detail, 'statements of the extension reach the log with their literals masked');
    RETURN NEXT;

    check_name := 'audit: disclosures and failed authentications survive a rollback';
    detail := vetassist_auth.durable_audit_problem();
    ok := detail IS NULL;
    detail := coalesce(detail, 'recorded by the audit recorder, committed before the caller goes on');
    RETURN NEXT;

    FOREACH p IN ARRAY ARRAY['token', 'phi', 'hash', 'audit', 'mfa'] LOOP
        check_name := 'key ' || p;
        BEGIN
            detail := 'active key ' || vetassist_auth.active_key_id(p) || ' unwraps';
            ok := true;
        EXCEPTION WHEN OTHERS THEN
            ok := false;
            detail := SQLSTATE || ': ' || SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;


-- key_usage, generated from the registry as in keys.sql.
DROP VIEW vetassist_auth.key_usage;
DO $key_usage$
BEGIN
    EXECUTE 'CREATE VIEW vetassist_auth.key_usage AS ' || (
        SELECT pg_catalog.string_agg(pg_catalog.format('SELECT %s AS key_id, %L::text AS used_by FROM vetassist_auth.%I',
                   CASE c.purpose
                       WHEN 'hash' THEN pg_catalog.format('vetassist_auth.hash_key_id(%I)', c.column_name)
                       WHEN 'audit' THEN pg_catalog.quote_ident(c.column_name)
                       ELSE pg_catalog.format('vetassist_auth.envelope_key_id(%I)', c.column_name)
                   END,
                   c.table_name || '.' || c.column_name, c.table_name),
               ' UNION ALL ' ORDER BY c.ordinality)
        FROM vetassist_auth.protected_columns() WITH ORDINALITY c);
END
$key_usage$;
COMMENT ON VIEW vetassist_auth.key_usage IS 'Which data key each stored ciphertext or field hash depends on.';
REVOKE ALL ON vetassist_auth.key_usage FROM PUBLIC;

-- Privileges: reseal and rehash are internal; administrators and auditors may read the registry.
REVOKE ALL ON FUNCTION
    vetassist_auth.protected_columns(),
    vetassist_auth.reseal(bytea, text, text),
    vetassist_auth.rehash(bytea, text, text, text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.protected_columns() TO vetassist_admin, vetassist_auditor;
