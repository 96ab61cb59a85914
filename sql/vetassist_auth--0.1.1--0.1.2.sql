-- vetassist_auth 0.1.1 -> 0.1.2
-- Day-2 operations: key retirement that never strands a value (pins and a snapshot horizon),
-- unretire_key/destroy_key, an old and a new master key at once, clock-based time-outs, a
-- refresh-token reuse grace, a restore guard on the keys table, resync_sequences() for
-- failover, a sealer whose cost does not grow with the sealed log; audit: locks no role can
-- take, row text independent of session settings, anchors and a minimum retention, reserved
-- categories, verifiable crisis NOTIFY, row audit that COPY and DISABLE TRIGGER cannot dodge.
\echo Use "ALTER EXTENSION vetassist_auth UPDATE TO '0.1.2'" to load this file. \quit

-- Keys: retirement waits recorded per key; destroyed keys keep their row without material.
ALTER TABLE vetassist_auth.keys ALTER COLUMN wrapped_key DROP NOT NULL;
ALTER TABLE vetassist_auth.keys ADD COLUMN retire_after bigint;
ALTER TABLE vetassist_auth.keys ADD COLUMN destroyed_at timestamptz;
ALTER TABLE vetassist_auth.keys ADD CONSTRAINT keys_check CHECK ((wrapped_key IS NULL) = (destroyed_at IS NOT NULL));
ALTER TABLE vetassist_auth.keys ADD CONSTRAINT keys_check1 CHECK (destroyed_at IS NULL OR status = 'retired');
COMMENT ON COLUMN vetassist_auth.keys.retire_after IS
    'Set when no value uses this decrypt_only key any more: the transaction id that every open snapshot must have passed before it retires.';
COMMENT ON COLUMN vetassist_auth.keys.destroyed_at IS
    'When destroy_key() erased the material of this retired key (wrapped_key is then NULL).';

-- Sessions: the replaced refresh token and its successor, for the reuse grace.
ALTER TABLE vetassist_auth.sessions ADD COLUMN previous_refresh_token_hash bytea;
ALTER TABLE vetassist_auth.sessions ADD COLUMN refresh_rotated_at timestamptz;
ALTER TABLE vetassist_auth.sessions ADD COLUMN refresh_successor_encrypted bytea;
COMMENT ON COLUMN vetassist_auth.sessions.refresh_successor_encrypted IS
    'The current refresh token, encrypted (context sessions.refresh_successor:<id>), so the one it replaced can yield it within refresh_reuse_grace.';

-- Sealer: every row above the highest sealed id is unsealed; the rest come from the time range.
ALTER TABLE vetassist_auth.audit_seal_state ADD COLUMN sealed_through_id bigint NOT NULL DEFAULT 0;
UPDATE vetassist_auth.audit_seal_state
SET sealed_through_id = coalesce((SELECT max(audit_id) FROM vetassist_auth.audit_seals), 0);
COMMENT ON TABLE vetassist_auth.audit_seal_state IS
    'Sealer state (one row, written by the first seal): every audit row not yet sealed is above sealed_through_id or at or after scan_from; the chain continues from the purge checkpoint.';

-- phi_disclosures gained a reported_by column: a new result type is a new function.
DROP FUNCTION vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz);

-- Functions, views and triggers new or changed since 0.1.1, as in this release's install script
-- (scripts/upgrade-functions.py prints them).

CREATE  FUNCTION "audit_seal_status"() RETURNS TABLE (
	"head_seq" bigint,  /* Option < i64 > */
	"head_sealed_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"sealed_through_id" bigint,  /* Option < i64 > */
	"waiting_rows" bigint,  /* Option < i64 > */
	"sealer_pid" INT  /* Option < i32 > */
)
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'audit_seal_status_wrapper';

CREATE  FUNCTION "claim_new_account"(
	"va_icn" TEXT /* & str */
) RETURNS bool /* bool */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'claim_new_account_wrapper';

CREATE  FUNCTION "destroy_key"(
	"key_id" INT /* i32 */
) RETURNS bool /* bool */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'destroy_key_wrapper';

CREATE  FUNCTION "key_creation_in_progress"() RETURNS bool /* bool */
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_creation_in_progress_wrapper';

CREATE  FUNCTION "opens"(
	"ciphertext" bytea, /* Option < & [u8] > */
	"context" TEXT, /* & str */
	"purpose" TEXT /* & str */
) RETURNS bool /* bool */
STABLE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'opens_wrapper';

CREATE  FUNCTION "refresh_reuse_grace"() RETURNS interval /* Interval */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'refresh_reuse_grace_wrapper';

CREATE OR REPLACE VIEW vetassist_auth.key_usage AS
          SELECT vetassist_auth.envelope_key_id(va_icn_encrypted) AS key_id, 'users.va_icn_encrypted' AS used_by FROM vetassist_auth.users
UNION ALL SELECT vetassist_auth.envelope_key_id(email_encrypted), 'users.email_encrypted' FROM vetassist_auth.users
UNION ALL SELECT vetassist_auth.envelope_key_id(first_name_encrypted), 'users.first_name_encrypted' FROM vetassist_auth.users
UNION ALL SELECT vetassist_auth.envelope_key_id(last_name_encrypted), 'users.last_name_encrypted' FROM vetassist_auth.users
UNION ALL SELECT vetassist_auth.hash_key_id(va_icn_hash), 'users.va_icn_hash' FROM vetassist_auth.users
UNION ALL SELECT vetassist_auth.hash_key_id(email_hash), 'users.email_hash' FROM vetassist_auth.users
UNION ALL SELECT vetassist_auth.hash_key_id(first_name_hash), 'users.first_name_hash' FROM vetassist_auth.users
UNION ALL SELECT vetassist_auth.hash_key_id(last_name_hash), 'users.last_name_hash' FROM vetassist_auth.users
UNION ALL SELECT vetassist_auth.envelope_key_id(access_token_encrypted), 'va_tokens.access_token_encrypted' FROM vetassist_auth.va_tokens
UNION ALL SELECT vetassist_auth.envelope_key_id(refresh_token_encrypted), 'va_tokens.refresh_token_encrypted' FROM vetassist_auth.va_tokens
UNION ALL SELECT vetassist_auth.envelope_key_id(totp_secret_encrypted), 'mfa_settings.totp_secret_encrypted' FROM vetassist_auth.mfa_settings
UNION ALL SELECT vetassist_auth.hash_key_id(ip_hash), 'sessions.ip_hash' FROM vetassist_auth.sessions
UNION ALL SELECT vetassist_auth.hash_key_id(device_fingerprint_hash), 'sessions.device_fingerprint_hash' FROM vetassist_auth.sessions
UNION ALL SELECT vetassist_auth.hash_key_id(refresh_token_hash), 'sessions.refresh_token_hash' FROM vetassist_auth.sessions
UNION ALL SELECT vetassist_auth.hash_key_id(previous_refresh_token_hash), 'sessions.previous_refresh_token_hash' FROM vetassist_auth.sessions
UNION ALL SELECT vetassist_auth.envelope_key_id(refresh_successor_encrypted), 'sessions.refresh_successor_encrypted' FROM vetassist_auth.sessions
UNION ALL SELECT vetassist_auth.hash_key_id(device_fingerprint_hash), 'trusted_devices.device_fingerprint_hash' FROM vetassist_auth.trusted_devices
UNION ALL SELECT vetassist_auth.hash_key_id(code_hash), 'mfa_backup_codes.code_hash' FROM vetassist_auth.mfa_backup_codes
UNION ALL SELECT vetassist_auth.hash_key_id(ip_hash), 'audit_log.ip_hash' FROM vetassist_auth.audit_log
UNION ALL SELECT key_id, 'audit_seals' FROM vetassist_auth.audit_seals;

CREATE FUNCTION vetassist_auth.refresh_encrypt_counts() RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH counters (purpose, lease) AS (
        SELECT 'phi', last_value FROM vetassist_auth.phi_encryptions_seq WHERE is_called
        UNION ALL
        SELECT 'token', last_value FROM vetassist_auth.token_encryptions_seq WHERE is_called
    ), due AS (
        SELECT k.key_id, (c.lease - k.counter_base) * 128 AS counted
        FROM vetassist_auth.keys k JOIN counters c ON c.purpose = k.purpose
        WHERE k.status = 'active' AND k.encrypt_count < (c.lease - k.counter_base) * 128
        FOR UPDATE OF k SKIP LOCKED
    ), mirrored AS (
        UPDATE vetassist_auth.keys k SET encrypt_count = due.counted
        FROM due WHERE k.key_id = due.key_id
        RETURNING 1
    )
    SELECT count(*)::integer FROM mirrored
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.reencrypt(batch_size integer DEFAULT 1000) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    phi_key   integer := vetassist_auth.active_key_id('phi');
    token_key integer := vetassist_auth.active_key_id('token');
    hash_key  integer := vetassist_auth.active_key_id('hash');
    moved     bigint := 0;
    n         bigint;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'vetassist_auth: batch_size must be a positive integer' USING ERRCODE = '22023';
    END IF;

    WITH batch AS (
        SELECT u.id FROM vetassist_auth.users u
        WHERE (vetassist_auth.envelope_key_id(u.va_icn_encrypted) <> phi_key
           OR vetassist_auth.envelope_key_id(u.email_encrypted) <> phi_key
           OR vetassist_auth.envelope_key_id(u.first_name_encrypted) <> phi_key
           OR vetassist_auth.envelope_key_id(u.last_name_encrypted) <> phi_key
           OR vetassist_auth.hash_key_id(u.va_icn_hash) <> hash_key
           OR vetassist_auth.hash_key_id(u.email_hash) <> hash_key
           OR vetassist_auth.hash_key_id(u.first_name_hash) <> hash_key
           OR vetassist_auth.hash_key_id(u.last_name_hash) <> hash_key)
          -- Only rows whose every value opens (a damaged, foreign or retired-key value stays).
          AND vetassist_auth.opens(u.va_icn_encrypted, 'users.va_icn:' || u.id, 'phi')
          AND vetassist_auth.opens(u.email_encrypted, 'users.email:' || u.id, 'phi')
          AND vetassist_auth.opens(u.first_name_encrypted, 'users.first_name:' || u.id, 'phi')
          AND vetassist_auth.opens(u.last_name_encrypted, 'users.last_name:' || u.id, 'phi')
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), plain AS (
        SELECT u.id,
               vetassist_auth.decrypt_text(u.va_icn_encrypted, 'users.va_icn:' || u.id) AS va_icn,
               vetassist_auth.decrypt_text(u.email_encrypted, 'users.email:' || u.id) AS email,
               vetassist_auth.decrypt_text(u.first_name_encrypted, 'users.first_name:' || u.id) AS first_name,
               vetassist_auth.decrypt_text(u.last_name_encrypted, 'users.last_name:' || u.id) AS last_name
        FROM batch JOIN vetassist_auth.users u USING (id)
    )
    UPDATE vetassist_auth.users u SET
        va_icn_encrypted     = vetassist_auth.encrypt_text(p.va_icn, 'users.va_icn:' || u.id),
        va_icn_hash          = vetassist_auth.field_hash(p.va_icn, 'va_icn'),
        email_encrypted      = vetassist_auth.encrypt_text(p.email, 'users.email:' || u.id),
        email_hash           = vetassist_auth.field_hash(p.email, 'email'),
        first_name_encrypted = vetassist_auth.encrypt_text(p.first_name, 'users.first_name:' || u.id),
        first_name_hash      = vetassist_auth.field_hash(p.first_name, 'first_name'),
        last_name_encrypted  = vetassist_auth.encrypt_text(p.last_name, 'users.last_name:' || u.id),
        last_name_hash       = vetassist_auth.field_hash(p.last_name, 'last_name')
    FROM plain p WHERE u.id = p.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    moved := moved + n;

    WITH batch AS (
        SELECT t.id FROM vetassist_auth.va_tokens t
        WHERE (vetassist_auth.envelope_key_id(t.access_token_encrypted) <> token_key
           OR vetassist_auth.envelope_key_id(t.refresh_token_encrypted) <> token_key)
          AND vetassist_auth.opens(t.access_token_encrypted, 'va_tokens.access_token:' || t.user_id, 'token')
          AND vetassist_auth.opens(t.refresh_token_encrypted, 'va_tokens.refresh_token:' || t.user_id, 'token')
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    )
    UPDATE vetassist_auth.va_tokens t SET
        access_token_encrypted = vetassist_auth.encrypt_token(
            vetassist_auth.decrypt_token(t.access_token_encrypted, 'va_tokens.access_token:' || t.user_id),
            'va_tokens.access_token:' || t.user_id),
        refresh_token_encrypted = vetassist_auth.encrypt_token(
            vetassist_auth.decrypt_token(t.refresh_token_encrypted, 'va_tokens.refresh_token:' || t.user_id),
            'va_tokens.refresh_token:' || t.user_id)
    FROM batch WHERE t.id = batch.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    moved := moved + n;

    WITH batch AS (
        SELECT s.id FROM vetassist_auth.sessions s
        WHERE vetassist_auth.envelope_key_id(s.refresh_successor_encrypted) <> token_key
          AND vetassist_auth.opens(s.refresh_successor_encrypted, 'sessions.refresh_successor:' || s.id, 'token')
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    )
    UPDATE vetassist_auth.sessions s SET
        refresh_successor_encrypted = vetassist_auth.encrypt_token(
            vetassist_auth.decrypt_token(s.refresh_successor_encrypted, 'sessions.refresh_successor:' || s.id),
            'sessions.refresh_successor:' || s.id)
    FROM batch WHERE s.id = batch.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    moved := moved + n;

    WITH batch AS (
        SELECT m.user_id FROM vetassist_auth.mfa_settings m
        WHERE vetassist_auth.envelope_key_id(m.totp_secret_encrypted) <> phi_key
          AND vetassist_auth.opens(m.totp_secret_encrypted, 'mfa_settings.totp_secret:' || m.user_id, 'phi')
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    )
    UPDATE vetassist_auth.mfa_settings m SET
        totp_secret_encrypted = vetassist_auth.encrypt(
            vetassist_auth.decrypt(m.totp_secret_encrypted, 'mfa_settings.totp_secret:' || m.user_id),
            'mfa_settings.totp_secret:' || m.user_id)
    FROM batch WHERE m.user_id = batch.user_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    moved := moved + n;

    IF moved = 0 THEN
        PERFORM vetassist_auth.retire_unused_keys();
        -- Nothing moved, yet ciphertexts remain under old keys: they do not open (retired key,
        -- damaged, or restored from another database), or another transaction holds their row.
        SELECT count(*) INTO n FROM vetassist_auth.key_usage k JOIN vetassist_auth.keys USING (key_id)
        WHERE k.used_by NOT LIKE '%hash' AND k.used_by <> 'audit_seals' AND keys.status <> 'active';
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

    check_name := 'grants: SECURITY DEFINER functions pin search_path';
    SELECT string_agg(f.oid::regprocedure::text, ', ') INTO missing
    FROM pg_proc f
    WHERE f.pronamespace = 'vetassist_auth'::regnamespace AND f.prosecdef
      AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (f.proconfig), false);
    ok := missing IS NULL;
    detail := coalesce('unpinned: ' || missing, 'all pinned to pg_catalog, pg_temp');
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

    FOREACH p IN ARRAY ARRAY['token', 'phi', 'hash', 'audit'] LOOP
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

CREATE OR REPLACE FUNCTION "rewrap_keys"(
	"old_master_key_file" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS INT /* i32 */
SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'rewrap_keys_wrapper';

CREATE  FUNCTION "unretire_key"(
	"key_id" INT /* i32 */
) RETURNS bool /* bool */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'unretire_key_wrapper';

CREATE OR REPLACE FUNCTION "verify_audit_chain"(
	"anchor_seq" bigint, /* Option < i64 > */
	"anchor_hash" bytea /* Option < & [u8] > */
) RETURNS TABLE (
	"ok" bool,  /* bool */
	"checked" bigint,  /* i64 */
	"first_bad_seq" bigint,  /* Option < i64 > */
	"problem" TEXT  /* Option < String > */
)
SECURITY DEFINER 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'verify_audit_chain_against_wrapper';

CREATE OR REPLACE FUNCTION vetassist_auth.audit_event(category text, event_type text, outcome text, details jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF coalesce(btrim(category), '') = '' OR coalesce(btrim(event_type), '') = '' THEN
        RAISE EXCEPTION 'vetassist_auth: category and event_type must not be empty' USING ERRCODE = '22023';
    END IF;
    IF outcome IS NULL OR outcome NOT IN ('success', 'failure', 'denied', 'info') THEN
        RAISE EXCEPTION 'vetassist_auth: outcome must be success, failure, denied or info' USING ERRCODE = '22023';
    END IF;
    IF length(category) > 64 OR length(event_type) > 128 OR octet_length(details::text) > 65536 THEN
        RAISE EXCEPTION 'vetassist_auth: audit event is too large' USING ERRCODE = '22023';
    END IF;
    -- Plain lower-case names only, so no look-alike (a tab, a no-break space, a Cyrillic letter)
    -- of the extension's own categories can be written; those are reserved outright.
    IF category !~ '^[a-z][a-z0-9_.-]{0,63}$' THEN
        RAISE EXCEPTION 'vetassist_auth: category must be lower-case ASCII letters, digits, _ . or -, starting with a letter' USING ERRCODE = '22023';
    END IF;
    IF category IN ('audit', 'auth', 'clinical', 'data', 'identity', 'key', 'mfa', 'phi_access', 'session') THEN
        RAISE EXCEPTION 'vetassist_auth: this category is reserved for the extension''s own audit rows' USING ERRCODE = '22023',
            HINT = 'Application events use categories of their own, such as phi for PHI the application shows.';
    END IF;
    RETURN vetassist_auth.write_audit(category, event_type, outcome,
                                      vetassist_auth.current_actor(), NULL, NULL, details);
END
$$;

CREATE FUNCTION vetassist_auth.row_audit_fires(tab oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pg_trigger g
                   WHERE g.tgrelid = tab AND g.tgname = 'vetassist_row_audit'
                     AND g.tgenabled IN ('O', 'A') AND g.tgfoid = 'vetassist_auth.row_audit()'::regprocedure)
$$;

CREATE FUNCTION vetassist_auth.audit_table_altered() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    altered record;
BEGIN
    FOR altered IN
        SELECT t.tab, vetassist_auth.row_audit_fires(t.tab) AS fires
        FROM (SELECT DISTINCT CASE WHEN d.classid = 'pg_class'::regclass THEN d.objid
                                   ELSE (SELECT g.tgrelid FROM pg_trigger g WHERE g.oid = d.objid) END AS tab
              FROM pg_event_trigger_ddl_commands() d
              WHERE d.classid IN ('pg_class'::regclass, 'pg_trigger'::regclass)) t
        WHERE EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = t.tab
                        AND (g.tgname = 'vetassist_row_audit' OR g.tgfoid = 'vetassist_auth.row_audit()'::regprocedure))
    LOOP
        PERFORM vetassist_auth.write_audit('audit', 'audited_table_altered',
            CASE WHEN altered.fires THEN 'info' ELSE 'denied' END,
            NULL, altered.tab::regclass::text, NULL,
            jsonb_build_object('row_audit', CASE WHEN altered.fires THEN 'enabled' ELSE 'disabled' END,
                               'command', tg_tag, 'by', session_user));
    END LOOP;
END
$$;

CREATE FUNCTION vetassist_auth.audit_row_audit_dropped() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    dropped record;
BEGIN
    FOR dropped IN
        SELECT o.object_identity FROM pg_event_trigger_dropped_objects() o
        WHERE o.object_type = 'trigger' AND o.object_identity LIKE 'vetassist\_row\_audit on %'
    LOOP
        PERFORM vetassist_auth.write_audit('audit', 'audited_table_altered', 'denied', NULL,
            regexp_replace(dropped.object_identity, '^vetassist_row_audit on ', ''), NULL,
            jsonb_build_object('row_audit', 'dropped', 'command', tg_tag, 'by', session_user));
    END LOOP;
END
$$;

CREATE FUNCTION vetassist_auth.audit_chain_head() RETURNS TABLE (seq bigint, hash bytea, sealed_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    (SELECT s.seq, s.hash, s.sealed_at FROM vetassist_auth.audit_seals s ORDER BY s.seq DESC LIMIT 1)
    UNION ALL
    (SELECT st.checkpoint_seq, st.checkpoint_hash, st.checkpoint_at FROM vetassist_auth.audit_seal_state st
     WHERE st.checkpoint_seq > 0 AND NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_seals))
$$;

COMMENT ON FUNCTION vetassist_auth.audit_chain_head() IS
    'The head of the audit chain (seq, hash, when sealed): an anchor to keep outside the database for verify_audit_chain(seq, hash).';

CREATE FUNCTION vetassist_auth.phi_disclosures(subject_user_id uuid, from_time timestamptz, to_time timestamptz)
RETURNS TABLE (reported_by text, occurred_at timestamptz, category text, event_type text, outcome text,
               actor_user_id uuid, db_role text, session_id uuid, details jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF subject_user_id IS NULL OR from_time IS NULL OR to_time IS NULL OR from_time > to_time THEN
        RAISE EXCEPTION 'vetassist_auth: a subject and a period (from_time <= to_time) are required' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    -- phi_access rows are the extension's own (audit_event refuses that category); phi rows are
    -- what the application reported through audit_event. Listed apart, the extension's first.
    SELECT CASE a.category WHEN 'phi_access' THEN 'extension' ELSE 'application' END,
           a.occurred_at, a.category, a.event_type, a.outcome, a.actor_user_id, a.db_role, a.session_id, a.details
    FROM vetassist_auth.audit_log a
    WHERE a.subject_user_id = phi_disclosures.subject_user_id
      AND a.occurred_at >= from_time AND a.occurred_at < to_time
      AND a.category IN ('phi', 'phi_access')
    ORDER BY a.category = 'phi', a.occurred_at, a.id;
END
$$;

COMMENT ON FUNCTION vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz) IS
    'PHI access events about one veteran in [from_time, to_time), the extension''s own (reported_by extension) apart from those the application reported: what an accounting-of-disclosures request needs.';

CREATE FUNCTION vetassist_auth.refuse_foreign_keys() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF vetassist_auth.key_creation_in_progress() THEN
        RETURN NEW;
    END IF;
    -- Rows this transaction wrote itself (the earlier rows of the same COPY) do not count.
    IF EXISTS (SELECT 1 FROM vetassist_auth.keys k
               WHERE k.xmin::text::bigint <> pg_current_xact_id()::text::bigint % 4294967296) THEN
        RAISE EXCEPTION 'vetassist_auth: this database already has data keys; restored keys would not match them'
            USING ERRCODE = '55000',
                  HINT = 'Restore into a new database (pg_restore --create, or CREATE DATABASE and a full pg_restore), or into a fresh CREATE EXTENSION with pg_restore --data-only --single-transaction.';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER refuse_foreign_keys BEFORE INSERT ON vetassist_auth.keys
    FOR EACH ROW EXECUTE FUNCTION vetassist_auth.refuse_foreign_keys();

CREATE FUNCTION vetassist_auth.resync_sequences()
RETURNS TABLE (sequence_name text, new_value bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    now_at bigint;
    moved integer := 0;
BEGIN
    FOR r IN
        SELECT 'keys_key_id_seq' AS seq, (SELECT max(key_id) FROM vetassist_auth.keys)::bigint AS used
        UNION ALL SELECT 'audit_log_id_seq', (SELECT max(id) FROM vetassist_auth.audit_log)
        UNION ALL SELECT 'session_activity_id_seq', (SELECT max(id) FROM vetassist_auth.session_activity)
        UNION ALL SELECT 'session_events_id_seq', (SELECT max(id) FROM vetassist_auth.session_events)
        UNION ALL SELECT 'mfa_backup_codes_id_seq', (SELECT max(id) FROM vetassist_auth.mfa_backup_codes)
    LOOP
        EXECUTE format('SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM vetassist_auth.%I', r.seq)
            INTO now_at;
        IF r.used IS NOT NULL AND r.used > now_at THEN
            PERFORM setval(format('vetassist_auth.%I', r.seq)::regclass, r.used);
            sequence_name := r.seq;
            new_value := r.used;
            moved := moved + 1;
            RETURN NEXT;
        END IF;
    END LOOP;
    FOR r IN SELECT p AS purpose FROM unnest(ARRAY['phi', 'token']) p LOOP
        sequence_name := r.purpose || ' key rotated';  -- new_value: the new key's id
        new_value := vetassist_auth.rotate_key(r.purpose);
        RETURN NEXT;
    END LOOP;
    PERFORM vetassist_auth.write_audit('key', 'sequences_resynchronised', 'success', NULL, NULL, NULL,
        jsonb_build_object('sequences_moved', moved, 'keys_rotated', ARRAY['phi', 'token']));
END
$$;

COMMENT ON FUNCTION vetassist_auth.resync_sequences() IS
    'After a failover to a logical replica: moves the extension''s id sequences past the ids in use and rotates the phi and token keys (their encryption counts since the last mirror are unknown); returns what changed.';

CREATE OR REPLACE FUNCTION vetassist_auth.upsert_va_user(
    va_icn text, veteran_status text, email text, first_name text, last_name text)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    icn       text := upper(regexp_replace(coalesce(va_icn, ''), '\s', '', 'g'));
    icn_hash  bytea;
    email_h   bytea;
    first_h   bytea;
    last_h    bytea;
    uid       uuid;
    old       vetassist_auth.users;
    changed   text[] := '{}';
BEGIN
    IF icn !~ '^[0-9A-Z]{1,64}$' THEN
        RAISE EXCEPTION 'vetassist_auth: va_icn must be 1 to 64 letters and digits' USING ERRCODE = '22023';
    END IF;
    email := vetassist_auth.checked_phi(email, 'email', 320);
    IF email IS NOT NULL AND position('@' IN email) < 2 THEN
        RAISE EXCEPTION 'vetassist_auth: email is not an e-mail address' USING ERRCODE = '22023';
    END IF;
    first_name := vetassist_auth.checked_phi(first_name, 'first_name', 200);
    last_name := vetassist_auth.checked_phi(last_name, 'last_name', 200);
    veteran_status := vetassist_auth.checked_phi(veteran_status, 'veteran_status', 64);
    -- Each hash once: it is stored on insert, and decides what changed on update.
    icn_hash := vetassist_auth.field_hash(icn, 'va_icn');
    email_h := vetassist_auth.field_hash(email, 'email');
    first_h := vetassist_auth.field_hash(first_name, 'first_name');
    last_h := vetassist_auth.field_hash(last_name, 'last_name');

    FOR attempt IN 1..2 LOOP
        SELECT * INTO old FROM vetassist_auth.users u
        WHERE u.va_icn_hash = ANY (vetassist_auth.field_hashes(icn, 'va_icn'))
        FOR UPDATE;
        EXIT WHEN FOUND;
        -- A transaction creating the same account under another hash key (a rotation between
        -- the two) would not conflict in the unique index: wait for it and look again.
        CONTINUE WHEN vetassist_auth.claim_new_account(icn);
        uid := gen_random_uuid();
        INSERT INTO vetassist_auth.users AS u
            (id, va_icn_encrypted, va_icn_hash, va_veteran_status,
             email_encrypted, email_hash, first_name_encrypted, first_name_hash,
             last_name_encrypted, last_name_hash, last_login_at)
        VALUES (uid, vetassist_auth.encrypt_text(icn, 'users.va_icn:' || uid), icn_hash, veteran_status,
                vetassist_auth.encrypt_text(email, 'users.email:' || uid), email_h,
                vetassist_auth.encrypt_text(first_name, 'users.first_name:' || uid), first_h,
                vetassist_auth.encrypt_text(last_name, 'users.last_name:' || uid), last_h,
                now())
        ON CONFLICT (va_icn_hash) DO NOTHING;
        IF FOUND THEN
            PERFORM vetassist_auth.write_audit('identity', 'user_created', 'success', uid, 'users', uid::text,
                jsonb_build_object('fields', array_remove(ARRAY['va_icn',
                    CASE WHEN email IS NOT NULL THEN 'email' END,
                    CASE WHEN first_name IS NOT NULL THEN 'first_name' END,
                    CASE WHEN last_name IS NOT NULL THEN 'last_name' END], NULL)));
            RETURN uid;
        END IF;
        -- Another transaction created the account at the same moment: update that one.
    END LOOP;

    uid := old.id;
    IF uid IS NULL THEN  -- created and deleted again while we looked: let the caller retry
        RAISE EXCEPTION 'vetassist_auth: concurrent change to this account, retry' USING ERRCODE = '40001';
    END IF;
    IF NOT old.is_active THEN
        RAISE EXCEPTION 'vetassist_auth: this account is deactivated' USING ERRCODE = '28000';
    END IF;
    -- Re-encrypt only what changed, judged by the field hashes; NULL keeps the stored value.
    IF email IS NOT NULL AND old.email_hash IS DISTINCT FROM email_h THEN
        changed := changed || 'email'::text;
    END IF;
    IF first_name IS NOT NULL AND old.first_name_hash IS DISTINCT FROM first_h THEN
        changed := changed || 'first_name'::text;
    END IF;
    IF last_name IS NOT NULL AND old.last_name_hash IS DISTINCT FROM last_h THEN
        changed := changed || 'last_name'::text;
    END IF;
    IF veteran_status IS NOT NULL AND old.va_veteran_status IS DISTINCT FROM veteran_status THEN
        changed := changed || 'va_veteran_status'::text;
    END IF;
    UPDATE vetassist_auth.users u SET
        email_encrypted = CASE WHEN 'email' = ANY (changed) THEN vetassist_auth.encrypt_text(email, 'users.email:' || uid) ELSE u.email_encrypted END,
        email_hash = CASE WHEN 'email' = ANY (changed) THEN email_h ELSE u.email_hash END,
        first_name_encrypted = CASE WHEN 'first_name' = ANY (changed) THEN vetassist_auth.encrypt_text(first_name, 'users.first_name:' || uid) ELSE u.first_name_encrypted END,
        first_name_hash = CASE WHEN 'first_name' = ANY (changed) THEN first_h ELSE u.first_name_hash END,
        last_name_encrypted = CASE WHEN 'last_name' = ANY (changed) THEN vetassist_auth.encrypt_text(last_name, 'users.last_name:' || uid) ELSE u.last_name_encrypted END,
        last_name_hash = CASE WHEN 'last_name' = ANY (changed) THEN last_h ELSE u.last_name_hash END,
        va_veteran_status = coalesce(veteran_status, u.va_veteran_status),
        updated_at = CASE WHEN cardinality(changed) > 0 THEN now() ELSE u.updated_at END,
        last_login_at = now()
    WHERE u.id = uid;
    PERFORM vetassist_auth.write_audit('identity', 'user_signed_in', 'success', uid, 'users', uid::text,
                                       jsonb_build_object('changed_fields', changed));
    RETURN uid;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.store_va_tokens(
    user_id uuid, access_token text, refresh_token text, expires_at timestamptz, scope text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_generation integer;
    active boolean;
BEGIN
    IF access_token IS NULL OR access_token = '' OR octet_length(access_token) > 16384 THEN
        RAISE EXCEPTION 'vetassist_auth: access_token must be 1 byte to 16 KiB' USING ERRCODE = '22023';
    END IF;
    IF refresh_token = '' OR octet_length(refresh_token) > 16384 THEN
        RAISE EXCEPTION 'vetassist_auth: refresh_token must be 1 byte to 16 KiB' USING ERRCODE = '22023';
    END IF;
    IF expires_at IS NULL OR expires_at <= clock_timestamp() OR expires_at = 'infinity' THEN
        RAISE EXCEPTION 'vetassist_auth: expires_at must be a finite time in the future' USING ERRCODE = '22023';
    END IF;
    IF length(scope) > 2048 THEN
        RAISE EXCEPTION 'vetassist_auth: scope is longer than 2048 characters' USING ERRCODE = '22023';
    END IF;
    SELECT u.is_active INTO active FROM vetassist_auth.users u WHERE u.id = store_va_tokens.user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no such user' USING ERRCODE = 'P0002';
    ELSIF NOT active THEN
        RAISE EXCEPTION 'vetassist_auth: this account is deactivated' USING ERRCODE = '28000';
    END IF;
    -- A refresh response without a new refresh token keeps the stored one.
    INSERT INTO vetassist_auth.va_tokens AS t
        (user_id, access_token_encrypted, refresh_token_encrypted, scope, expires_at)
    VALUES (user_id,
            vetassist_auth.encrypt_token(access_token, 'va_tokens.access_token:' || user_id),
            vetassist_auth.encrypt_token(refresh_token, 'va_tokens.refresh_token:' || user_id),
            scope, expires_at)
    ON CONFLICT ON CONSTRAINT va_tokens_user_id_key DO UPDATE SET
        access_token_encrypted = excluded.access_token_encrypted,
        refresh_token_encrypted = coalesce(excluded.refresh_token_encrypted, t.refresh_token_encrypted),
        scope = coalesce(excluded.scope, t.scope),
        expires_at = excluded.expires_at,
        generation = t.generation + 1,
        refreshed_at = clock_timestamp()
    RETURNING t.generation INTO new_generation;
    PERFORM vetassist_auth.write_audit('auth',
        CASE WHEN new_generation = 1 THEN 'va_tokens_stored' ELSE 'va_tokens_refreshed' END,
        'success', user_id, 'va_tokens', user_id::text,
        jsonb_build_object('generation', new_generation, 'expires_at', expires_at,
                           'refresh_token', refresh_token IS NOT NULL));
    RETURN new_generation;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.read_va_token(user_id uuid, which text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    row vetassist_auth.va_tokens;
BEGIN
    SELECT t.* INTO row FROM vetassist_auth.users u
    LEFT JOIN vetassist_auth.va_tokens t ON t.user_id = u.id
    WHERE u.id = read_va_token.user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no such user' USING ERRCODE = 'P0002';
    END IF;
    IF row.user_id IS NULL OR (which = 'refresh_token' AND row.refresh_token_encrypted IS NULL) THEN
        RETURN NULL;
    END IF;
    IF which = 'access_token' AND row.expires_at <= clock_timestamp() THEN
        RAISE EXCEPTION 'vetassist_auth: the VA access token has expired' USING ERRCODE = 'VA001',
            HINT = 'Refresh it with the refresh token, then call store_va_tokens.';
    END IF;
    PERFORM vetassist_auth.write_audit('auth', 'va_' || which || '_read', 'success', user_id, 'va_tokens', user_id::text,
                                       jsonb_build_object('generation', row.generation));
    RETURN vetassist_auth.decrypt_token(
        CASE which WHEN 'access_token' THEN row.access_token_encrypted ELSE row.refresh_token_encrypted END,
        'va_tokens.' || which || ':' || user_id);
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.va_tokens_due(within interval) RETURNS SETOF uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF within IS NULL OR within < interval '0' THEN
        RAISE EXCEPTION 'vetassist_auth: within must be a non-negative interval' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    SELECT t.user_id FROM vetassist_auth.va_tokens t
    JOIN vetassist_auth.users u ON u.id = t.user_id AND u.is_active
    WHERE t.expires_at <= clock_timestamp() + within AND t.refresh_token_encrypted IS NOT NULL
    ORDER BY t.expires_at;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.close_session(
    session vetassist_auth.sessions, new_status vetassist_auth.session_status, reason text)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE vetassist_auth.sessions s
    SET status = new_status, ended_at = clock_timestamp(), end_reason = reason,
        refresh_successor_encrypted = NULL
    WHERE s.id = session.id AND s.status = 'ACTIVE';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM vetassist_auth.write_audit('session', 'session_' || lower(new_status::text), 'success',
        session.user_id, 'sessions', session.id::text, jsonb_build_object('reason', reason));
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.require_live(session vetassist_auth.sessions) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF session.status <> 'ACTIVE' OR clock_timestamp() >= session.live_until THEN
        RAISE EXCEPTION 'vetassist_auth: the session has ended' USING ERRCODE = '28000';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.create_session(
    user_id uuid, jwt_id text, expires_at timestamptz, ip inet DEFAULT NULL, user_agent text DEFAULT NULL,
    device_fingerprint text DEFAULT NULL, device_info jsonb DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid      uuid := gen_random_uuid();
    started  timestamptz := clock_timestamp();
    idle     interval := vetassist_auth.session_idle_timeout();
    ends     timestamptz;
    active   boolean;
    cap      integer := vetassist_auth.max_sessions_per_user();
    oldest   vetassist_auth.sessions;
BEGIN
    IF coalesce(jwt_id, '') = '' OR length(jwt_id) > 255 THEN
        RAISE EXCEPTION 'vetassist_auth: jwt_id must be 1 to 255 characters' USING ERRCODE = '22023';
    END IF;
    IF expires_at IS NULL OR expires_at <= started THEN
        RAISE EXCEPTION 'vetassist_auth: expires_at must be in the future' USING ERRCODE = '22023';
    END IF;
    IF length(user_agent) > 1024 OR length(device_fingerprint) > 1024 THEN
        RAISE EXCEPTION 'vetassist_auth: user_agent and device_fingerprint must be at most 1024 characters' USING ERRCODE = '22023';
    END IF;
    IF device_info IS NOT NULL AND (jsonb_typeof(device_info) <> 'object' OR octet_length(device_info::text) > 16384) THEN
        RAISE EXCEPTION 'vetassist_auth: device_info must be a JSON object of at most 16 KiB' USING ERRCODE = '22023';
    END IF;
    SELECT u.is_active INTO active FROM vetassist_auth.users u WHERE u.id = create_session.user_id FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no such user' USING ERRCODE = 'P0002';
    ELSIF NOT active THEN
        RAISE EXCEPTION 'vetassist_auth: this account is deactivated' USING ERRCODE = '28000';
    END IF;
    ends := least(expires_at, started + vetassist_auth.session_absolute_timeout());
    BEGIN
        INSERT INTO vetassist_auth.sessions
            (id, user_id, jwt_id, ip_hash, user_agent, device_fingerprint_hash, device_info,
             idle_timeout, created_at, last_activity_at, expires_at, live_until)
        VALUES (sid, user_id, jwt_id,
                vetassist_auth.field_hash(ip::text, 'ip'), user_agent,
                vetassist_auth.field_hash(device_fingerprint, 'device_fingerprint'), device_info,
                idle, started, started, ends, least(ends, started + idle));
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'vetassist_auth: a session with this jwt_id already exists' USING ERRCODE = '23505';
    END;
    PERFORM vetassist_auth.write_audit('session', 'session_created', 'success', user_id, 'sessions', sid::text,
        jsonb_build_object('expires_at', ends, 'idle_timeout', idle));
    -- Over the per-user cap: the oldest live sessions give way.
    IF cap > 0 THEN
        FOR oldest IN
            SELECT * FROM vetassist_auth.sessions s
            WHERE s.user_id = create_session.user_id AND s.status = 'ACTIVE'
            ORDER BY s.id = sid DESC, s.created_at DESC, s.last_activity_at DESC
            OFFSET cap
            FOR UPDATE
        LOOP
            PERFORM vetassist_auth.close_session(oldest, 'TERMINATED', 'session_limit');
        END LOOP;
    END IF;
    RETURN sid;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.touch_session(jwt_id text) RETURNS vetassist_auth.session_status
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions;
    now_ts timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO s FROM vetassist_auth.sessions t WHERE t.jwt_id = touch_session.jwt_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no session with this jwt_id' USING ERRCODE = 'P0002';
    END IF;
    IF s.status <> 'ACTIVE' THEN
        RETURN s.status;
    END IF;
    IF now_ts >= s.live_until THEN
        PERFORM vetassist_auth.close_session(s, 'EXPIRED',
            CASE WHEN now_ts >= s.expires_at THEN 'absolute_timeout' ELSE 'idle_timeout' END);
        RETURN 'EXPIRED';
    END IF;
    PERFORM vetassist_auth.set_current_session(s.id);
    IF now_ts - s.last_activity_at >= vetassist_auth.session_touch_interval() THEN
        UPDATE vetassist_auth.sessions t
        SET last_activity_at = now_ts, live_until = least(t.expires_at, now_ts + t.idle_timeout)
        WHERE t.id = s.id AND t.status = 'ACTIVE';
        IF NOT FOUND THEN  -- ended by someone else a moment ago
            RETURN (SELECT t.status FROM vetassist_auth.sessions t WHERE t.id = s.id);
        END IF;
        INSERT INTO vetassist_auth.session_activity (session_id, user_id, activity_type)
        VALUES (s.id, s.user_id, 'request');
    END IF;
    RETURN 'ACTIVE';
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.session_status(jwt_id text) RETURNS vetassist_auth.session_status
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id);
BEGIN
    IF s.status <> 'ACTIVE' THEN
        RETURN s.status;
    ELSIF clock_timestamp() >= s.live_until THEN
        RETURN 'EXPIRED';
    ELSIF clock_timestamp() >= s.live_until - vetassist_auth.session_idle_warning() AND s.live_until < s.expires_at THEN
        RETURN 'IDLE';
    END IF;
    RETURN 'ACTIVE';
END
$$;

CREATE FUNCTION vetassist_auth.refresh_session_token(jwt_id text, presented text, replacement text)
RETURNS TABLE (generation integer, refresh_token text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id, true);
    ts timestamptz := clock_timestamp();
    successor_context text;
BEGIN
    IF coalesce(replacement, '') = '' OR octet_length(replacement) > 4096 THEN
        RAISE EXCEPTION 'vetassist_auth: replacement must be 1 byte to 4 KiB' USING ERRCODE = '22023';
    END IF;
    PERFORM vetassist_auth.require_live(s);
    successor_context := 'sessions.refresh_successor:' || s.id;
    IF s.refresh_token_hash IS NULL AND presented IS NULL
       OR s.refresh_token_hash = ANY (vetassist_auth.field_hashes(presented, 'session_refresh_token')) THEN
        UPDATE vetassist_auth.sessions t
        SET previous_refresh_token_hash = t.refresh_token_hash,
            refresh_token_hash = vetassist_auth.field_hash(replacement, 'session_refresh_token'),
            refresh_generation = t.refresh_generation + 1,
            refresh_rotated_at = ts,
            refresh_successor_encrypted = CASE WHEN vetassist_auth.refresh_reuse_grace() > interval '0'
                THEN vetassist_auth.encrypt_token(replacement, successor_context) END
        WHERE t.id = s.id;
        PERFORM vetassist_auth.write_audit('session', 'refresh_token_rotated', 'success', s.user_id, 'sessions', s.id::text,
            jsonb_build_object('generation', s.refresh_generation + 1));
        RETURN QUERY SELECT s.refresh_generation + 1, replacement;
        RETURN;
    END IF;
    IF presented IS NOT NULL AND s.refresh_successor_encrypted IS NOT NULL
       AND ts < s.refresh_rotated_at + vetassist_auth.refresh_reuse_grace()
       AND s.previous_refresh_token_hash = ANY (vetassist_auth.field_hashes(presented, 'session_refresh_token')) THEN
        PERFORM vetassist_auth.write_audit('session', 'refresh_token_grace_reuse', 'info', s.user_id, 'sessions', s.id::text,
            jsonb_build_object('generation', s.refresh_generation));
        RETURN QUERY SELECT s.refresh_generation,
                            vetassist_auth.decrypt_token(s.refresh_successor_encrypted, successor_context);
        RETURN;
    END IF;
    PERFORM vetassist_auth.close_session(s, 'TERMINATED', 'refresh_token_reuse');
    PERFORM vetassist_auth.write_audit('session', 'refresh_token_reuse', 'denied', s.user_id, 'sessions', s.id::text,
        jsonb_build_object('generation', s.refresh_generation));
    RETURN QUERY SELECT NULL::integer, NULL::text;
END
$$;

COMMENT ON FUNCTION vetassist_auth.refresh_session_token(text, text, text) IS
    'Replaces the session''s refresh token: returns the new generation and the token now current (the replacement, or within the reuse grace the successor already issued); NULLs after ending the session when a stale token is presented.';

CREATE OR REPLACE FUNCTION vetassist_auth.rotate_session_refresh_token(jwt_id text, presented text, replacement text)
RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT r.generation FROM vetassist_auth.refresh_session_token(jwt_id, presented, replacement) r
$$;

COMMENT ON FUNCTION vetassist_auth.rotate_session_refresh_token(text, text, text) IS
    'refresh_session_token returning only the generation (NULL after ending the session on reuse).';

CREATE OR REPLACE FUNCTION vetassist_auth.log_session_event(jwt_id text, event_type text, severity text, details jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id);
    event_id bigint;
BEGIN
    IF coalesce(event_type, '') = '' OR length(event_type) > 128 THEN
        RAISE EXCEPTION 'vetassist_auth: event_type must be 1 to 128 characters' USING ERRCODE = '22023';
    END IF;
    IF severity IS NULL OR severity NOT IN ('info', 'warning', 'critical', 'crisis') THEN
        RAISE EXCEPTION 'vetassist_auth: severity must be info, warning, critical or crisis' USING ERRCODE = '22023';
    END IF;
    IF details IS NOT NULL AND (jsonb_typeof(details) <> 'object' OR octet_length(details::text) > 65536) THEN
        RAISE EXCEPTION 'vetassist_auth: details must be a JSON object of at most 64 KiB' USING ERRCODE = '22023';
    END IF;
    INSERT INTO vetassist_auth.session_events (session_id, user_id, event_type, severity, details)
    VALUES (s.id, s.user_id, event_type, severity, coalesce(details, '{}'))
    RETURNING id INTO event_id;
    -- The audit row names the event, never its details (they may hold clinical information).
    PERFORM vetassist_auth.write_audit(CASE WHEN severity = 'crisis' THEN 'clinical' ELSE 'session' END,
        'session_event', 'info', s.user_id, 'session_events', event_id::text,
        jsonb_build_object('event_type', event_type, 'severity', severity, 'session_id', s.id));
    IF severity = 'crisis' THEN
        -- Delivered to every LISTENer when this transaction commits; ids only, no PHI. Any role
        -- can NOTIFY on the channel too: the keyed mac lets a responder tell ours apart
        -- (verify_crisis_notice).
        PERFORM pg_notify('vetassist_auth_crisis', jsonb_build_object(
            'session_id', s.id, 'event_id', event_id,
            'mac', encode(vetassist_auth.field_hash(s.id || ':' || event_id, 'crisis_notice'), 'hex'))::text);
    END IF;
    RETURN event_id;
END
$$;

CREATE FUNCTION vetassist_auth.verify_crisis_notice(payload text) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    notice jsonb;
    notice_session uuid;
    notice_event bigint;
BEGIN
    BEGIN
        notice := payload::jsonb;
        notice_session := (notice ->> 'session_id')::uuid;
        notice_event := (notice ->> 'event_id')::bigint;
    EXCEPTION WHEN data_exception OR program_limit_exceeded THEN
        RETURN false;  -- not JSON (or nested too deep), not a uuid or number
    END;
    IF notice_session IS NULL OR notice_event IS NULL THEN
        RETURN false;
    END IF;
    -- Byte for byte what log_session_event sends (under any usable hash key): no extra keys,
    -- no other spelling of the same ids.
    RETURN payload = ANY (ARRAY(
               SELECT jsonb_build_object('session_id', notice_session, 'event_id', notice_event,
                                         'mac', encode(h, 'hex'))::text
               FROM unnest(vetassist_auth.field_hashes(notice_session || ':' || notice_event, 'crisis_notice')) h))
       AND EXISTS (SELECT 1 FROM vetassist_auth.session_events e
                   WHERE e.id = notice_event AND e.session_id = notice_session AND e.severity = 'crisis');
END
$$;

COMMENT ON FUNCTION vetassist_auth.verify_crisis_notice(text) IS
    'Whether a NOTIFY vetassist_auth_crisis payload was sent by this extension for a stored crisis event (any role can NOTIFY on the channel).';

CREATE OR REPLACE FUNCTION vetassist_auth.expire_sessions(batch_size integer DEFAULT 10000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ts timestamptz := clock_timestamp();  -- a variable, so the index on live_until is used
    expired integer;
    purged integer;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'vetassist_auth: batch_size must be a positive integer' USING ERRCODE = '22023';
    END IF;
    WITH due AS (
        SELECT s.id FROM vetassist_auth.sessions s
        WHERE s.status = 'ACTIVE' AND s.live_until <= ts
        ORDER BY s.live_until
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), ended AS (
        UPDATE vetassist_auth.sessions s
        SET status = 'EXPIRED', ended_at = ts,
            end_reason = CASE WHEN s.expires_at <= ts THEN 'absolute_timeout' ELSE 'idle_timeout' END
        FROM due WHERE s.id = due.id
        RETURNING s.id, s.user_id, s.end_reason
    )
    INSERT INTO vetassist_auth.audit_log
        (actor_user_id, subject_user_id, category, event_type, outcome, target_table, target_id, details)
    SELECT NULL, ended.user_id, 'session', 'session_expired', 'success', 'sessions', ended.id::text,
           jsonb_build_object('reason', ended.end_reason)
    FROM ended;
    GET DIAGNOSTICS expired = ROW_COUNT;

    WITH old AS (
        SELECT s.id FROM vetassist_auth.sessions s
        WHERE s.ended_at < ts - vetassist_auth.session_retention()
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM vetassist_auth.sessions s USING old WHERE s.id = old.id;
    GET DIAGNOSTICS purged = ROW_COUNT;
    IF purged > 0 THEN
        PERFORM vetassist_auth.write_audit('session', 'sessions_purged', 'success', NULL, 'sessions', NULL,
                                           jsonb_build_object('count', purged));
    END IF;
    RETURN expired + purged;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_check(m vetassist_auth.mfa_settings, code text, require_enabled boolean)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    secret bytea;
    step bigint;
    backup bigint;
BEGIN
    IF m.locked_until > clock_timestamp() THEN
        RAISE EXCEPTION 'vetassist_auth: too many failed codes; MFA is locked for this user' USING ERRCODE = '28000',
            HINT = 'Wait for the lock-out to end (vetassist_auth.mfa_lockout).';
    END IF;
    IF require_enabled AND NOT m.totp_enabled THEN
        RAISE EXCEPTION 'vetassist_auth: TOTP enrolment is not confirmed' USING ERRCODE = '22023';
    END IF;
    secret := vetassist_auth.decrypt(m.totp_secret_encrypted, 'mfa_settings.totp_secret:' || m.user_id);
    step := vetassist_auth.totp_match(secret, coalesce(code, ''), extract(epoch FROM clock_timestamp())::bigint,
                                      m.last_used_step);
    IF step IS NULL AND require_enabled THEN
        UPDATE vetassist_auth.mfa_backup_codes b SET used_at = clock_timestamp()
        WHERE b.id = (SELECT c.id FROM vetassist_auth.mfa_backup_codes c
                      WHERE c.user_id = m.user_id AND c.used_at IS NULL
                        AND c.code_hash = ANY (vetassist_auth.field_hashes(
                                m.user_id || ':' || vetassist_auth.mfa_normalize_backup_code(coalesce(code, '')), 'mfa_backup_code'))
                      LIMIT 1 FOR UPDATE)
        RETURNING b.id INTO backup;
        IF backup IS NOT NULL THEN
            step := 0;
        END IF;
    END IF;
    IF step IS NULL THEN
        -- Counting starts again once an earlier lock-out has ended.
        UPDATE vetassist_auth.mfa_settings s
        SET failed_attempts = CASE WHEN s.locked_until IS NULL THEN s.failed_attempts + 1 ELSE 1 END,
            locked_until = CASE WHEN (CASE WHEN s.locked_until IS NULL THEN s.failed_attempts + 1 ELSE 1 END)
                                     >= vetassist_auth.mfa_max_failures()
                                THEN clock_timestamp() + vetassist_auth.mfa_lockout() END,
            updated_at = clock_timestamp()
        WHERE s.user_id = m.user_id;
        RETURN NULL;
    END IF;
    UPDATE vetassist_auth.mfa_settings s
    SET failed_attempts = 0, locked_until = NULL, updated_at = clock_timestamp(),
        last_used_step = CASE WHEN step > 0 THEN step ELSE s.last_used_step END
    WHERE s.user_id = m.user_id;
    RETURN step;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_enroll_totp(user_id uuid) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    secret bytea := vetassist_auth.totp_new_secret();
    enabled boolean;
BEGIN
    IF NOT vetassist_auth.require_user(user_id) THEN
        RAISE EXCEPTION 'vetassist_auth: this account is deactivated' USING ERRCODE = '28000';
    END IF;
    SELECT s.totp_enabled INTO enabled FROM vetassist_auth.mfa_settings s WHERE s.user_id = mfa_enroll_totp.user_id FOR UPDATE;
    IF enabled THEN
        RAISE EXCEPTION 'vetassist_auth: TOTP is already enabled for this user' USING ERRCODE = '22023',
            HINT = 'Call mfa_disable first to enrol a new authenticator.';
    END IF;
    INSERT INTO vetassist_auth.mfa_settings AS s (user_id, totp_secret_encrypted, enrolled_at)
    VALUES (mfa_enroll_totp.user_id,
            vetassist_auth.encrypt(secret, 'mfa_settings.totp_secret:' || mfa_enroll_totp.user_id), clock_timestamp())
    ON CONFLICT ON CONSTRAINT mfa_settings_pkey DO UPDATE SET
        totp_secret_encrypted = excluded.totp_secret_encrypted, enrolled_at = clock_timestamp(), confirmed_at = NULL,
        last_used_step = NULL, failed_attempts = 0, locked_until = NULL, updated_at = clock_timestamp();
    PERFORM vetassist_auth.write_audit('mfa', 'totp_enrolment_started', 'success', user_id, 'mfa_settings', user_id::text);
    RETURN vetassist_auth.totp_uri(secret, 'veteran-' || left(user_id::text, 8));
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_confirm_totp(user_id uuid, code text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m vetassist_auth.mfa_settings := vetassist_auth.mfa_row(user_id);
    step bigint;
BEGIN
    IF m.totp_enabled THEN
        RAISE EXCEPTION 'vetassist_auth: TOTP is already enabled for this user' USING ERRCODE = '22023';
    END IF;
    step := vetassist_auth.mfa_check(m, code, false);
    IF step IS NOT NULL THEN
        UPDATE vetassist_auth.mfa_settings s SET totp_enabled = true, confirmed_at = clock_timestamp()
        WHERE s.user_id = mfa_confirm_totp.user_id;
    END IF;
    PERFORM vetassist_auth.write_audit('mfa', 'totp_enrolment_confirmed',
        CASE WHEN step IS NULL THEN 'failure' ELSE 'success' END, user_id, 'mfa_settings', user_id::text);
    RETURN step IS NOT NULL;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_verify(jwt_id text, code text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id, true);
    m vetassist_auth.mfa_settings;
    step bigint;
BEGIN
    PERFORM vetassist_auth.require_live(s);
    m := vetassist_auth.mfa_row(s.user_id);
    step := vetassist_auth.mfa_check(m, code, true);
    IF step IS NOT NULL THEN
        UPDATE vetassist_auth.sessions t SET mfa_verified = true, mfa_verified_at = clock_timestamp() WHERE t.id = s.id;
        PERFORM vetassist_auth.write_audit('mfa', 'mfa_verified', 'success', s.user_id, 'sessions', s.id::text,
            jsonb_build_object('method', CASE WHEN step = 0 THEN 'backup_code' ELSE 'totp' END));
        RETURN true;
    END IF;
    SELECT * INTO m FROM vetassist_auth.mfa_settings t WHERE t.user_id = s.user_id;
    PERFORM vetassist_auth.write_audit('mfa', 'mfa_verified', 'failure', s.user_id, 'sessions', s.id::text,
        jsonb_build_object('failed_attempts', m.failed_attempts));
    IF m.locked_until > clock_timestamp() THEN
        PERFORM vetassist_auth.close_session(s, 'LOCKED', 'mfa_lockout');
        PERFORM vetassist_auth.write_audit('mfa', 'mfa_locked_out', 'denied', s.user_id, 'mfa_settings', s.user_id::text,
            jsonb_build_object('locked_for', vetassist_auth.mfa_lockout()));
    END IF;
    RETURN false;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_trust_device(jwt_id text, days integer DEFAULT 30) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id);
    device uuid;
BEGIN
    IF days IS NULL OR days < 1 OR days > 90 THEN
        RAISE EXCEPTION 'vetassist_auth: days must be between 1 and 90' USING ERRCODE = '22023';
    END IF;
    IF s.status <> 'ACTIVE' OR NOT s.mfa_verified THEN
        RAISE EXCEPTION 'vetassist_auth: only a live, MFA-verified session can trust its device' USING ERRCODE = '28000';
    END IF;
    IF s.device_fingerprint_hash IS NULL THEN
        RAISE EXCEPTION 'vetassist_auth: the session has no device fingerprint' USING ERRCODE = '22023';
    END IF;
    INSERT INTO vetassist_auth.trusted_devices (user_id, device_fingerprint_hash, trusted_until)
    VALUES (s.user_id, s.device_fingerprint_hash, clock_timestamp() + make_interval(days => days))
    RETURNING id INTO device;
    PERFORM vetassist_auth.write_audit('mfa', 'device_trusted', 'success', s.user_id, 'trusted_devices', device::text,
                                       jsonb_build_object('days', days));
    RETURN device;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_trusted_devices(user_id uuid)
RETURNS TABLE (device_id uuid, created_at timestamptz, trusted_until timestamptz, last_used_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.require_user(user_id);
    RETURN QUERY SELECT d.id, d.created_at, d.trusted_until, d.last_used_at FROM vetassist_auth.trusted_devices d
                 WHERE d.user_id = mfa_trusted_devices.user_id AND d.revoked_at IS NULL AND d.trusted_until > clock_timestamp()
                 ORDER BY d.created_at;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_revoke_device(user_id uuid, device_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE vetassist_auth.trusted_devices d SET revoked_at = clock_timestamp()
    WHERE d.id = device_id AND d.user_id = mfa_revoke_device.user_id AND d.revoked_at IS NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM vetassist_auth.write_audit('mfa', 'device_revoked', 'success', user_id, 'trusted_devices', device_id::text);
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_required(jwt_id text) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id);
BEGIN
    PERFORM vetassist_auth.require_live(s);
    IF s.mfa_verified OR NOT EXISTS (SELECT 1 FROM vetassist_auth.mfa_settings m
                                     WHERE m.user_id = s.user_id AND m.totp_enabled) THEN
        RETURN false;
    END IF;
    RETURN NOT EXISTS (SELECT 1 FROM vetassist_auth.trusted_devices d
                       WHERE d.user_id = s.user_id AND d.device_fingerprint_hash = s.device_fingerprint_hash
                         AND d.revoked_at IS NULL AND d.trusted_until > clock_timestamp());
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_disable(user_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.require_user(user_id);
    DELETE FROM vetassist_auth.mfa_settings m WHERE m.user_id = mfa_disable.user_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM vetassist_auth.mfa_backup_codes b WHERE b.user_id = mfa_disable.user_id;
    UPDATE vetassist_auth.trusted_devices d SET revoked_at = clock_timestamp()
    WHERE d.user_id = mfa_disable.user_id AND d.revoked_at IS NULL;
    PERFORM vetassist_auth.write_audit('mfa', 'mfa_disabled', 'success', user_id, 'mfa_settings', user_id::text);
    RETURN true;
END
$$;

CREATE EVENT TRIGGER vetassist_auth_audited_table_altered ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'CREATE TRIGGER', 'ALTER TRIGGER')
    EXECUTE FUNCTION vetassist_auth.audit_table_altered();

CREATE EVENT TRIGGER vetassist_auth_row_audit_dropped ON sql_drop
    EXECUTE FUNCTION vetassist_auth.audit_row_audit_dropped();


-- Privileges: nothing new is executable by PUBLIC; each role gets its new API.
REVOKE ALL ON FUNCTION
    vetassist_auth.claim_new_account(text),
    vetassist_auth.opens(bytea, text, text),
    vetassist_auth.key_creation_in_progress(),
    vetassist_auth.refresh_reuse_grace(),
    vetassist_auth.refresh_encrypt_counts(),
    vetassist_auth.unretire_key(integer),
    vetassist_auth.destroy_key(integer),
    vetassist_auth.refresh_session_token(text, text, text),
    vetassist_auth.verify_crisis_notice(text),
    vetassist_auth.audit_table_altered(),
    vetassist_auth.audit_row_audit_dropped(),
    vetassist_auth.row_audit_fires(oid),
    vetassist_auth.refuse_foreign_keys(),
    vetassist_auth.resync_sequences(),
    vetassist_auth.audit_seal_status(),
    vetassist_auth.audit_chain_head(),
    vetassist_auth.verify_audit_chain(bigint, bytea),
    vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    vetassist_auth.refresh_session_token(text, text, text),
    vetassist_auth.verify_crisis_notice(text)
TO vetassist_app;
GRANT EXECUTE ON FUNCTION
    vetassist_auth.unretire_key(integer),
    vetassist_auth.destroy_key(integer),
    vetassist_auth.resync_sequences(),
    vetassist_auth.audit_seal_status(),
    vetassist_auth.audit_chain_head(),
    vetassist_auth.verify_audit_chain(bigint, bytea)
TO vetassist_admin;
GRANT EXECUTE ON FUNCTION
    vetassist_auth.audit_seal_status(),
    vetassist_auth.audit_chain_head(),
    vetassist_auth.verify_audit_chain(bigint, bytea),
    vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz)
TO vetassist_auditor;
GRANT SELECT (retire_after, destroyed_at) ON vetassist_auth.keys TO vetassist_admin;
