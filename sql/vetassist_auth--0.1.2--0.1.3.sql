-- vetassist_auth 0.1.2 -> 0.1.3
-- Audit rows that survive the caller's transaction: PHI and token disclosures (user_profile,
-- va_access_token, va_refresh_token, decrypt of the extension's own PHI values, phi_disclosures)
-- and failed authentications (MFA failures, refresh-token reuse, refused sign-ins) are committed
-- by a background recorder before the call returns; the MFA lock-out counts those rows. TOTP
-- secrets get a key purpose of their own (mfa): run reencrypt() to move the existing ones.
-- Secrets: redaction decided from the statement's tokens, an unredactable channel reported;
-- a session cap, token storage and device trust that hold under races and idle sessions.
-- encrypt/encrypt_text refuse the contexts of the extension's own columns (22023); until this
-- script runs, the new library keeps the old binding for the old release's SQL.
\echo Use "ALTER EXTENSION vetassist_auth UPDATE TO '0.1.3'" to load this file. \quit

-- MFA: the lock-out is computed from the failures the audit log holds, counted from
-- failures_counted_from. A streak in progress carries over: counting starts at its first
-- failure (0.1.2 wrote the same failure rows, in the caller's transaction).
ALTER TABLE vetassist_auth.mfa_settings ADD COLUMN failures_counted_from timestamptz NOT NULL DEFAULT clock_timestamp();
COMMENT ON COLUMN vetassist_auth.mfa_settings.failures_counted_from IS
    'Failed codes the audit log holds from this time on count toward the lock-out (moved by a success and by the end of a lock-out).';
UPDATE vetassist_auth.mfa_settings m
SET failures_counted_from = coalesce(
    (SELECT min(f.occurred_at)
     FROM (SELECT a.occurred_at FROM vetassist_auth.audit_log a
           WHERE a.subject_user_id = m.user_id AND a.category = 'mfa' AND a.outcome = 'failure'
           ORDER BY a.occurred_at DESC LIMIT m.failed_attempts) f),
    m.failures_counted_from)
WHERE m.failed_attempts > 0;
ALTER TABLE vetassist_auth.mfa_settings DROP COLUMN failed_attempts, DROP COLUMN locked_until;

-- Keys: TOTP secrets under a purpose of their own, with its encryption counter.
ALTER TABLE vetassist_auth.keys DROP CONSTRAINT keys_purpose_check;
ALTER TABLE vetassist_auth.keys ADD CONSTRAINT keys_purpose_check CHECK (purpose IN ('token', 'phi', 'hash', 'audit', 'mfa'));
CREATE SEQUENCE vetassist_auth.mfa_encryptions_seq;
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.mfa_encryptions_seq', '');
REVOKE ALL ON SEQUENCE vetassist_auth.mfa_encryptions_seq FROM PUBLIC;

-- mfa_check records failures itself and so takes the event to record them as.
DROP FUNCTION vetassist_auth.mfa_check(vetassist_auth.mfa_settings, text, boolean);

-- Functions new or changed since 0.1.2, as in this release's install script
-- (scripts/upgrade-functions.py prints them).
CREATE OR REPLACE FUNCTION "decrypt"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'decrypt_wrapper';

CREATE OR REPLACE FUNCTION "decrypt_text"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'decrypt_text_wrapper';

CREATE  FUNCTION "durable_audit_problem"() RETURNS TEXT /* Option < & '_ str > */
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'durable_audit_problem_wrapper';

CREATE OR REPLACE FUNCTION "encrypt"(
	"plaintext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT SECURITY DEFINER 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'encrypt_for_application_wrapper';

CREATE  FUNCTION "encrypt_mfa_secret"(
	"secret" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'encrypt_mfa_secret_wrapper';

CREATE OR REPLACE FUNCTION "encrypt_text"(
	"plaintext" TEXT, /* & str */
	"context" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT SECURITY DEFINER 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'encrypt_text_for_application_wrapper';

CREATE  FUNCTION "mfa_failure_times"(
	"user_id" uuid, /* pgrx :: Uuid */
	"since" timestamp with time zone /* TimestampWithTimeZone */
) RETURNS timestamp with time zone[] /* Vec < TimestampWithTimeZone > */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mfa_failure_times_wrapper';

CREATE  FUNCTION "open_mfa_secret"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT STABLE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'open_mfa_secret_wrapper';

CREATE  FUNCTION "open_phi"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT STABLE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'open_phi_wrapper';

CREATE  FUNCTION "open_phi_text"(
	"ciphertext" bytea, /* & [u8] */
	"context" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT STABLE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'open_phi_text_wrapper';

CREATE  FUNCTION "seal_phi_text"(
	"plaintext" TEXT, /* & str */
	"context" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'seal_phi_text_wrapper';

CREATE OR REPLACE FUNCTION vetassist_auth.refresh_encrypt_counts() RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH counters (purpose, lease) AS (
        SELECT 'phi', last_value FROM vetassist_auth.phi_encryptions_seq WHERE is_called
        UNION ALL
        SELECT 'token', last_value FROM vetassist_auth.token_encryptions_seq WHERE is_called
        UNION ALL
        SELECT 'mfa', last_value FROM vetassist_auth.mfa_encryptions_seq WHERE is_called
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
    mfa_key   integer := vetassist_auth.active_key_id('mfa');
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
               vetassist_auth.open_phi_text(u.va_icn_encrypted, 'users.va_icn:' || u.id) AS va_icn,
               vetassist_auth.open_phi_text(u.email_encrypted, 'users.email:' || u.id) AS email,
               vetassist_auth.open_phi_text(u.first_name_encrypted, 'users.first_name:' || u.id) AS first_name,
               vetassist_auth.open_phi_text(u.last_name_encrypted, 'users.last_name:' || u.id) AS last_name
        FROM batch JOIN vetassist_auth.users u USING (id)
    )
    UPDATE vetassist_auth.users u SET
        va_icn_encrypted     = vetassist_auth.seal_phi_text(p.va_icn, 'users.va_icn:' || u.id),
        va_icn_hash          = vetassist_auth.field_hash(p.va_icn, 'va_icn'),
        email_encrypted      = vetassist_auth.seal_phi_text(p.email, 'users.email:' || u.id),
        email_hash           = vetassist_auth.field_hash(p.email, 'email'),
        first_name_encrypted = vetassist_auth.seal_phi_text(p.first_name, 'users.first_name:' || u.id),
        first_name_hash      = vetassist_auth.field_hash(p.first_name, 'first_name'),
        last_name_encrypted  = vetassist_auth.seal_phi_text(p.last_name, 'users.last_name:' || u.id),
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
        WHERE vetassist_auth.envelope_key_id(m.totp_secret_encrypted) <> mfa_key
          -- Under an mfa key, or under a phi key as written before 0.1.3.
          AND (vetassist_auth.opens(m.totp_secret_encrypted, 'mfa_settings.totp_secret:' || m.user_id, 'mfa')
               OR vetassist_auth.opens(m.totp_secret_encrypted, 'mfa_settings.totp_secret:' || m.user_id, 'phi'))
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    )
    UPDATE vetassist_auth.mfa_settings m SET
        totp_secret_encrypted = vetassist_auth.encrypt_mfa_secret(
            vetassist_auth.open_mfa_secret(m.totp_secret_encrypted, 'mfa_settings.totp_secret:' || m.user_id),
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

CREATE OR REPLACE FUNCTION "totp_uri"(
	"secret" bytea, /* & [u8] */
	"account" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT STABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'totp_uri_wrapper';

CREATE  FUNCTION "unredactable_log_channels"() RETURNS TEXT /* Option < String > */
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'unredactable_log_channels_wrapper';

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

CREATE  FUNCTION "write_audit_durably"(
	"category" TEXT, /* & str */
	"event_type" TEXT, /* & str */
	"outcome" TEXT, /* & str */
	"subject_user_id" uuid DEFAULT NULL, /* Option < Uuid > */
	"target_table" TEXT DEFAULT NULL, /* Option < & str > */
	"target_id" TEXT DEFAULT NULL, /* Option < & str > */
	"details" jsonb DEFAULT '{}' /* Option < writer :: JsonbDatum > */
) RETURNS void
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'write_audit_durably_wrapper';

CREATE OR REPLACE FUNCTION vetassist_auth.phi_disclosures(subject_user_id uuid, from_time timestamptz, to_time timestamptz)
RETURNS TABLE (reported_by text, occurred_at timestamptz, category text, event_type text, outcome text,
               actor_user_id uuid, db_role text, session_id uuid, details jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF subject_user_id IS NULL OR from_time IS NULL OR to_time IS NULL OR from_time > to_time THEN
        RAISE EXCEPTION 'vetassist_auth: a subject and a period (from_time <= to_time) are required' USING ERRCODE = '22023';
    END IF;
    -- Reading a veteran's accounting is itself a disclosure: recorded before it is returned.
    PERFORM vetassist_auth.write_audit_durably('audit', 'phi_disclosures_read', 'success', subject_user_id, 'audit_log', NULL,
        jsonb_build_object('from_time', from_time, 'to_time', to_time));
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
        VALUES (uid, vetassist_auth.seal_phi_text(icn, 'users.va_icn:' || uid), icn_hash, veteran_status,
                vetassist_auth.seal_phi_text(email, 'users.email:' || uid), email_h,
                vetassist_auth.seal_phi_text(first_name, 'users.first_name:' || uid), first_h,
                vetassist_auth.seal_phi_text(last_name, 'users.last_name:' || uid), last_h,
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
        -- A refused sign-in is recorded whatever becomes of the caller's transaction.
        PERFORM vetassist_auth.write_audit_durably('identity', 'sign_in_refused', 'denied', uid, 'users', uid::text,
                                                   '{"reason": "account_deactivated"}');
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
        email_encrypted = CASE WHEN 'email' = ANY (changed) THEN vetassist_auth.seal_phi_text(email, 'users.email:' || uid) ELSE u.email_encrypted END,
        email_hash = CASE WHEN 'email' = ANY (changed) THEN email_h ELSE u.email_hash END,
        first_name_encrypted = CASE WHEN 'first_name' = ANY (changed) THEN vetassist_auth.seal_phi_text(first_name, 'users.first_name:' || uid) ELSE u.first_name_encrypted END,
        first_name_hash = CASE WHEN 'first_name' = ANY (changed) THEN first_h ELSE u.first_name_hash END,
        last_name_encrypted = CASE WHEN 'last_name' = ANY (changed) THEN vetassist_auth.seal_phi_text(last_name, 'users.last_name:' || uid) ELSE u.last_name_encrypted END,
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

CREATE OR REPLACE FUNCTION vetassist_auth.user_profile(user_id uuid)
RETURNS TABLE (id uuid, va_icn text, veteran_status text, email text, first_name text, last_name text,
               is_active boolean, mfa_enabled boolean, created_at timestamptz, last_login_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.require_user(user_id);
    -- Disclosure of PHI: recorded, beyond the reach of the caller's ROLLBACK, before it is returned.
    PERFORM vetassist_auth.write_audit_durably('phi_access', 'user_profile_read', 'success', user_id, 'users', user_id::text,
                                               '{"fields": ["va_icn", "email", "first_name", "last_name"]}');
    RETURN QUERY
    SELECT u.id,
           vetassist_auth.open_phi_text(u.va_icn_encrypted, 'users.va_icn:' || u.id),
           u.va_veteran_status,
           vetassist_auth.open_phi_text(u.email_encrypted, 'users.email:' || u.id),
           vetassist_auth.open_phi_text(u.first_name_encrypted, 'users.first_name:' || u.id),
           vetassist_auth.open_phi_text(u.last_name_encrypted, 'users.last_name:' || u.id),
           u.is_active,
           coalesce(m.totp_enabled, false),
           u.created_at, u.last_login_at
    FROM vetassist_auth.users u
    LEFT JOIN vetassist_auth.mfa_settings m ON m.user_id = u.id
    WHERE u.id = user_profile.user_id;
END
$$;

COMMENT ON FUNCTION vetassist_auth.user_profile(uuid) IS
    'The decrypted profile of one veteran; every call is audited as PHI access (category phi_access), and the audit row survives a rollback.';

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
    -- FOR SHARE waits for a deactivation in flight and then sees it.
    SELECT u.is_active INTO active FROM vetassist_auth.users u WHERE u.id = store_va_tokens.user_id FOR SHARE;
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
    row record;
BEGIN
    SELECT t.*, u.is_active AS user_active INTO row FROM vetassist_auth.users u
    LEFT JOIN vetassist_auth.va_tokens t ON t.user_id = u.id
    WHERE u.id = read_va_token.user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no such user' USING ERRCODE = 'P0002';
    END IF;
    IF NOT row.user_active THEN
        RAISE EXCEPTION 'vetassist_auth: this account is deactivated' USING ERRCODE = '28000';
    END IF;
    IF row.user_id IS NULL OR (which = 'refresh_token' AND row.refresh_token_encrypted IS NULL) THEN
        RETURN NULL;
    END IF;
    IF which = 'access_token' AND row.expires_at <= clock_timestamp() THEN
        RAISE EXCEPTION 'vetassist_auth: the VA access token has expired' USING ERRCODE = 'VA001',
            HINT = 'Refresh it with the refresh token, then call store_va_tokens.';
    END IF;
    -- Recorded, beyond the reach of the caller's ROLLBACK, before the token is returned.
    PERFORM vetassist_auth.write_audit_durably('auth', 'va_' || which || '_read', 'success', user_id, 'va_tokens', user_id::text,
                                               jsonb_build_object('generation', row.generation));
    RETURN vetassist_auth.decrypt_token(
        CASE which WHEN 'access_token' THEN row.access_token_encrypted ELSE row.refresh_token_encrypted END,
        'va_tokens.' || which || ':' || user_id);
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
    -- With a cap, concurrent sign-ins of one user take turns, so each sees the sessions of the
    -- one before (FOR NO KEY UPDATE leaves the sessions' foreign-key checks alone).
    IF cap > 0 THEN
        SELECT u.is_active INTO active FROM vetassist_auth.users u WHERE u.id = create_session.user_id FOR NO KEY UPDATE;
    ELSE
        SELECT u.is_active INTO active FROM vetassist_auth.users u WHERE u.id = create_session.user_id FOR SHARE;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no such user' USING ERRCODE = 'P0002';
    ELSIF NOT active THEN
        PERFORM vetassist_auth.write_audit_durably('session', 'sign_in_refused', 'denied', user_id, 'users', user_id::text,
                                                   '{"reason": "account_deactivated"}');
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

CREATE OR REPLACE FUNCTION vetassist_auth.refresh_session_token(jwt_id text, presented text, replacement text)
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
        -- Hands out a live token: recorded, beyond the caller's ROLLBACK, before it is returned.
        PERFORM vetassist_auth.write_audit_durably('session', 'refresh_token_grace_reuse', 'info', s.user_id, 'sessions', s.id::text,
            jsonb_build_object('generation', s.refresh_generation));
        RETURN QUERY SELECT s.refresh_generation,
                            vetassist_auth.decrypt_token(s.refresh_successor_encrypted, successor_context);
        RETURN;
    END IF;
    PERFORM vetassist_auth.close_session(s, 'TERMINATED', 'refresh_token_reuse');
    PERFORM vetassist_auth.write_audit_durably('session', 'refresh_token_reuse', 'denied', s.user_id, 'sessions', s.id::text,
        jsonb_build_object('generation', s.refresh_generation));
    RETURN QUERY SELECT NULL::integer, NULL::text;
END
$$;

CREATE FUNCTION vetassist_auth.mfa_lock_state(user_id uuid, counted_from timestamptz,
    OUT failures integer, OUT locked_until timestamptz, OUT counting_from timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    times timestamptz[] := vetassist_auth.mfa_failure_times(user_id, counted_from);
    max_failures integer := vetassist_auth.mfa_max_failures();
    first integer := 1;
    lock_end timestamptz;
BEGIN
    counting_from := counted_from;
    WHILE cardinality(times) - first + 1 >= max_failures LOOP
        lock_end := times[first + max_failures - 1] + vetassist_auth.mfa_lockout();
        IF lock_end > clock_timestamp() THEN
            locked_until := lock_end;
            EXIT;
        END IF;
        counting_from := lock_end;
        first := first + max_failures;
        WHILE first <= cardinality(times) AND times[first] < lock_end LOOP
            first := first + 1;
        END LOOP;
    END LOOP;
    failures := cardinality(times) - first + 1;
END
$$;

CREATE FUNCTION vetassist_auth.mfa_locked_until(user_id uuid) RETURNS timestamptz
LANGUAGE sql AS $$
    SELECT (vetassist_auth.mfa_lock_state(m.user_id, m.failures_counted_from)).locked_until
    FROM vetassist_auth.mfa_settings m WHERE m.user_id = mfa_locked_until.user_id
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_check(m vetassist_auth.mfa_settings, code text, require_enabled boolean,
                                         event_type text, target_table text, target_id text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    secret bytea;
    step bigint;
    backup bigint;
    state record := vetassist_auth.mfa_lock_state(m.user_id, m.failures_counted_from);
BEGIN
    IF state.locked_until IS NOT NULL THEN
        PERFORM vetassist_auth.write_audit_durably('mfa', event_type, 'denied', m.user_id, target_table, target_id,
            jsonb_build_object('reason', 'locked_out', 'locked_until', state.locked_until));
        RAISE EXCEPTION 'vetassist_auth: too many failed codes; MFA is locked for this user' USING ERRCODE = '28000',
            HINT = 'Wait for the lock-out to end (vetassist_auth.mfa_lockout).';
    END IF;
    IF state.counting_from IS DISTINCT FROM m.failures_counted_from THEN
        UPDATE vetassist_auth.mfa_settings s SET failures_counted_from = state.counting_from WHERE s.user_id = m.user_id;
    END IF;
    IF require_enabled AND NOT m.totp_enabled THEN
        RAISE EXCEPTION 'vetassist_auth: TOTP enrolment is not confirmed' USING ERRCODE = '22023';
    END IF;
    -- Every attempt is on record before the code is looked at: it counts toward the lock-out
    -- unless a success moves the count past it. Should the record fail, nothing about the code
    -- has been learnt (no right-or-wrong oracle while the recorder is down).
    PERFORM vetassist_auth.write_audit_durably('mfa', 'mfa_attempt', 'info', m.user_id, target_table, target_id,
        jsonb_build_object('for', event_type));
    secret := vetassist_auth.open_mfa_secret(m.totp_secret_encrypted, 'mfa_settings.totp_secret:' || m.user_id);
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
        PERFORM vetassist_auth.write_audit_durably('mfa', event_type, 'failure', m.user_id, target_table, target_id,
            jsonb_build_object('failed_attempts', state.failures + 1, 'counted_as', 'mfa_attempt'));
        IF state.failures + 1 >= vetassist_auth.mfa_max_failures() THEN
            PERFORM vetassist_auth.write_audit_durably('mfa', 'mfa_locked_out', 'denied', m.user_id, 'mfa_settings',
                m.user_id::text, jsonb_build_object('locked_for', vetassist_auth.mfa_lockout()));
        END IF;
        RETURN NULL;
    END IF;
    -- A success starts the count again.
    UPDATE vetassist_auth.mfa_settings s
    SET failures_counted_from = clock_timestamp(), updated_at = clock_timestamp(),
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
            vetassist_auth.encrypt_mfa_secret(secret, 'mfa_settings.totp_secret:' || mfa_enroll_totp.user_id), clock_timestamp())
    ON CONFLICT ON CONSTRAINT mfa_settings_pkey DO UPDATE SET
        totp_secret_encrypted = excluded.totp_secret_encrypted, enrolled_at = clock_timestamp(), confirmed_at = NULL,
        last_used_step = NULL, updated_at = clock_timestamp();
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
    step := vetassist_auth.mfa_check(m, code, false, 'totp_enrolment_confirmed', 'mfa_settings', user_id::text);
    IF step IS NULL THEN
        RETURN false;  -- mfa_check recorded the failure
    END IF;
    UPDATE vetassist_auth.mfa_settings s SET totp_enabled = true, confirmed_at = clock_timestamp()
    WHERE s.user_id = mfa_confirm_totp.user_id;
    PERFORM vetassist_auth.write_audit('mfa', 'totp_enrolment_confirmed', 'success', user_id, 'mfa_settings', user_id::text);
    RETURN true;
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
    step := vetassist_auth.mfa_check(m, code, true, 'mfa_verified', 'sessions', s.id::text);
    IF step IS NOT NULL THEN
        UPDATE vetassist_auth.sessions t SET mfa_verified = true, mfa_verified_at = clock_timestamp() WHERE t.id = s.id;
        PERFORM vetassist_auth.write_audit('mfa', 'mfa_verified', 'success', s.user_id, 'sessions', s.id::text,
            jsonb_build_object('method', CASE WHEN step = 0 THEN 'backup_code' ELSE 'totp' END));
        RETURN true;
    END IF;
    -- mfa_check recorded the failure (and a lock-out it caused).
    IF vetassist_auth.mfa_locked_until(s.user_id) IS NOT NULL THEN
        PERFORM vetassist_auth.close_session(s, 'LOCKED', 'mfa_lockout');
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
    -- Live by the clock (an idle session not swept yet is over), and MFA-verified.
    IF s.status <> 'ACTIVE' OR clock_timestamp() >= s.live_until OR NOT s.mfa_verified THEN
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

CREATE OR REPLACE FUNCTION vetassist_auth.resync_sequences()
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
    FOR r IN SELECT p AS purpose FROM unnest(ARRAY['phi', 'token', 'mfa']) p LOOP
        sequence_name := r.purpose || ' key rotated';  -- new_value: the new key's id
        new_value := vetassist_auth.rotate_key(r.purpose);
        RETURN NEXT;
    END LOOP;
    PERFORM vetassist_auth.write_audit('key', 'sequences_resynchronised', 'success', NULL, NULL, NULL,
        jsonb_build_object('sequences_moved', moved, 'keys_rotated', ARRAY['phi', 'token', 'mfa']));
END
$$;

COMMENT ON FUNCTION vetassist_auth.resync_sequences() IS
    'After a failover to a logical replica: moves the extension''s id sequences past the ids in use and rotates the phi, token and mfa keys (their encryption counts since the last mirror are unknown); returns what changed.';


-- Privileges: nothing new is executable by PUBLIC; every new function is internal.
REVOKE ALL ON FUNCTION
    vetassist_auth.durable_audit_problem(),
    vetassist_auth.encrypt_mfa_secret(bytea, text),
    vetassist_auth.mfa_failure_times(uuid, timestamptz),
    vetassist_auth.open_mfa_secret(bytea, text),
    vetassist_auth.open_phi(bytea, text),
    vetassist_auth.open_phi_text(bytea, text),
    vetassist_auth.seal_phi_text(text, text),
    vetassist_auth.unredactable_log_channels(),
    vetassist_auth.write_audit_durably(text, text, text, uuid, text, text, jsonb),
    vetassist_auth.mfa_lock_state(uuid, timestamptz),
    vetassist_auth.mfa_locked_until(uuid),
    vetassist_auth.mfa_check(vetassist_auth.mfa_settings, text, boolean, text, text, text)
FROM PUBLIC;
