-- Key usage and re-encryption (docs/ARCHITECTURE.md, "Keys").

-- Every stored value that depends on a data key, by key id. A decrypt_only key that appears
-- nowhere here may be retired.
CREATE VIEW vetassist_auth.key_usage AS
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
COMMENT ON VIEW vetassist_auth.key_usage IS 'Which data key each stored ciphertext or field hash depends on.';

-- Moves up to batch_size rows per table onto the active keys and returns how many rows moved.
-- Call it until it returns 0; a call that moves nothing retires decrypt_only keys that nothing
-- can need any more (retire_unused_keys: usually that call, else a later one once older
-- snapshots have ended). Rows locked by other transactions are skipped (SKIP LOCKED) and
-- picked up by a later call. A row with a value that does not open (retired key, damaged,
-- restored from another database) is left as it is (never a failed call) and reported in a
-- WARNING once nothing else moves.
-- Mirrors each active key's encryption count (kept exactly by its purpose's sequence, in leases
-- of 128) into keys.encrypt_count for administrators. Run by reencrypt and the background
-- worker, never by writers: an application transaction holding a key row would hold up
-- rotate_key until it ends. Skips a row someone else holds; returns keys updated.
CREATE FUNCTION vetassist_auth.refresh_encrypt_counts() RETURNS integer
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

CREATE FUNCTION vetassist_auth.reencrypt(batch_size integer DEFAULT 1000) RETURNS bigint
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
COMMENT ON FUNCTION vetassist_auth.reencrypt(integer) IS
    'Moves stored ciphertexts and field hashes onto the active keys, batch_size rows per table per call; returns rows moved.';
