-- MFA: TOTP (RFC 6238, SHA-1, 30 s, 6 digits, one step either side), single-use backup codes,
-- trusted devices and a lock-out that counts the failures the audit log holds (docs/ARCHITECTURE.md,
-- "Records that survive a rollback"). The TOTP secret is stored encrypted
-- (context mfa_settings.totp_secret:<user id>) and leaves the database only in the enrolment URI.

-- The MFA row of a user, locked, so concurrent verifications of one user take turns (a code
-- can then never be accepted twice). Internal.
CREATE FUNCTION vetassist_auth.mfa_row(user_id uuid) RETURNS vetassist_auth.mfa_settings
LANGUAGE plpgsql AS $$
DECLARE
    m vetassist_auth.mfa_settings;
BEGIN
    SELECT * INTO m FROM vetassist_auth.mfa_settings s WHERE s.user_id = mfa_row.user_id FOR UPDATE;
    IF NOT FOUND OR m.totp_secret_encrypted IS NULL THEN
        RAISE EXCEPTION 'vetassist_auth: this user has no TOTP enrolment' USING ERRCODE = '22023';
    END IF;
    RETURN m;
END
$$;

-- The lock-out state of a user, computed from the attempts the audit log holds (recorded durably
-- before each code is checked, so a ROLLBACK takes none back; a success moves counted_from past
-- its own attempt): how many failures count now, until when
-- the user is locked out (NULL: not locked), and from when failures count (a lock-out that has
-- ended starts the count again from its end). Failures before counted_from do not count. Internal.
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

-- Until when the user is locked out of MFA, or NULL. Internal. The row is read first and the
-- state computed here: on Citus a statement's expressions run on the shard's worker, whose
-- audit log holds none of the failures.
CREATE FUNCTION vetassist_auth.mfa_locked_until(user_id uuid) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    counted_from timestamptz;
BEGIN
    SELECT m.failures_counted_from INTO counted_from
    FROM vetassist_auth.mfa_settings m WHERE m.user_id = mfa_locked_until.user_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN (vetassist_auth.mfa_lock_state(user_id, counted_from)).locked_until;
END
$$;

-- Checks a TOTP or backup code against a user's settings. A failure is recorded in the audit
-- log as `event_type` (outcome failure) before this returns, whatever becomes of the caller's
-- transaction, and at mfa_max_failures it locks the user out. Returns the accepted time step
-- (0 for a backup code) or NULL. Raises 28000 while a lock-out lasts. Internal.
CREATE FUNCTION vetassist_auth.mfa_check(m vetassist_auth.mfa_settings, code text, require_enabled boolean,
                                         event_type text, target_table text, target_id text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    secret bytea;
    step bigint;
    backup bigint;
    code_hashes bytea[];
    checked_at timestamptz;  -- the clock, read before each UPDATE: Citus runs an UPDATE's SET on a worker
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
        code_hashes := vetassist_auth.field_hashes(
            m.user_id || ':' || vetassist_auth.mfa_normalize_backup_code(coalesce(code, '')), 'mfa_backup_code');
        checked_at := clock_timestamp();
        UPDATE vetassist_auth.mfa_backup_codes b SET used_at = checked_at
        WHERE b.user_id = m.user_id AND b.id = (SELECT c.id FROM vetassist_auth.mfa_backup_codes c
                      WHERE c.user_id = m.user_id AND c.used_at IS NULL AND c.code_hash = ANY (code_hashes)
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
            -- Names the session the failures came through (if any): its lock must hold even when
            -- the caller rolls back the LOCKED status (mfa_locked_session).
            PERFORM vetassist_auth.write_audit_durably('mfa', 'mfa_locked_out', 'denied', m.user_id, target_table,
                target_id, jsonb_build_object('locked_for', vetassist_auth.mfa_lockout()));
        END IF;
        RETURN NULL;
    END IF;
    -- A success starts the count again, after every row this call recorded.
    checked_at := clock_timestamp();
    UPDATE vetassist_auth.mfa_settings s
    SET failures_counted_from = checked_at, updated_at = checked_at,
        last_used_step = CASE WHEN step > 0 THEN step ELSE s.last_used_step END
    WHERE s.user_id = m.user_id;
    RETURN step;
END
$$;

CREATE FUNCTION vetassist_auth.mfa_enroll_totp(user_id uuid) RETURNS text
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
    INSERT INTO vetassist_auth.mfa_settings AS s (user_id, totp_secret_encrypted, enrolled_at, updated_at)
    VALUES (mfa_enroll_totp.user_id,
            vetassist_auth.encrypt_mfa_secret(secret, 'mfa_settings.totp_secret:' || mfa_enroll_totp.user_id),
            clock_timestamp(), clock_timestamp())
    -- The clock is read in VALUES only: Citus runs the DO UPDATE on a worker.
    ON CONFLICT ON CONSTRAINT mfa_settings_pkey DO UPDATE SET
        totp_secret_encrypted = excluded.totp_secret_encrypted, enrolled_at = excluded.enrolled_at, confirmed_at = NULL,
        last_used_step = NULL, updated_at = excluded.updated_at;
    PERFORM vetassist_auth.write_audit('mfa', 'totp_enrolment_started', 'success', user_id, 'mfa_settings', user_id::text);
    RETURN vetassist_auth.totp_uri(secret, 'veteran-' || left(user_id::text, 8));
END
$$;
COMMENT ON FUNCTION vetassist_auth.mfa_enroll_totp(uuid) IS
    'Creates (or replaces, until confirmed) a TOTP secret and returns its otpauth:// URI: the only time the secret leaves the database.';

-- With the jwt_id of the user's live session, the confirming code also verifies that session:
-- the same code cannot be used twice, so a separate mfa_verify would fail (and count).
CREATE FUNCTION vetassist_auth.mfa_confirm_totp(user_id uuid, code text, jwt_id text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m vetassist_auth.mfa_settings := vetassist_auth.mfa_row(user_id);
    verifying vetassist_auth.sessions;
    step bigint;
    confirmed timestamptz;
BEGIN
    IF jwt_id IS NOT NULL THEN
        verifying := vetassist_auth.session_by_jwt(jwt_id, true);
        IF verifying.user_id <> mfa_confirm_totp.user_id THEN
            RAISE EXCEPTION 'vetassist_auth: jwt_id must name a session of this user' USING ERRCODE = '22023';
        END IF;
        PERFORM vetassist_auth.require_live(verifying);
    END IF;
    IF m.totp_enabled THEN
        RAISE EXCEPTION 'vetassist_auth: TOTP is already enabled for this user' USING ERRCODE = '22023';
    END IF;
    IF jwt_id IS NULL THEN
        step := vetassist_auth.mfa_check(m, code, false, 'totp_enrolment_confirmed', 'mfa_settings', user_id::text);
    ELSE
        -- Failures through a session name it, so a lock-out they cause locks it (as mfa_verify).
        step := vetassist_auth.mfa_check(m, code, false, 'totp_enrolment_confirmed', 'sessions', verifying.id::text);
    END IF;
    IF step IS NULL THEN
        IF jwt_id IS NOT NULL AND vetassist_auth.mfa_locked_until(user_id) IS NOT NULL THEN
            PERFORM vetassist_auth.close_session(verifying, 'LOCKED', 'mfa_lockout');
        END IF;
        RETURN false;  -- mfa_check recorded the failure
    END IF;
    confirmed := clock_timestamp();  -- read here: Citus runs an UPDATE's SET on a worker
    UPDATE vetassist_auth.mfa_settings s SET totp_enabled = true, confirmed_at = confirmed
    WHERE s.user_id = mfa_confirm_totp.user_id;
    PERFORM vetassist_auth.write_audit('mfa', 'totp_enrolment_confirmed', 'success', user_id, 'mfa_settings', user_id::text);
    IF jwt_id IS NOT NULL THEN
        UPDATE vetassist_auth.sessions t SET mfa_verified = true, mfa_verified_at = confirmed
        WHERE t.user_id = verifying.user_id AND t.id = verifying.id;
        PERFORM vetassist_auth.write_audit('mfa', 'mfa_verified', 'success', verifying.user_id, 'sessions', verifying.id::text,
            jsonb_build_object('method', 'totp_enrolment'));
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION vetassist_auth.mfa_confirm_totp(uuid, text, text) IS
    'Enables TOTP once the user proves the authenticator works; with the jwt_id of the user''s live session, the code also verifies that session.';

CREATE FUNCTION vetassist_auth.mfa_verify(jwt_id text, code text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id, true);
    m vetassist_auth.mfa_settings;
    step bigint;
    verified timestamptz;
BEGIN
    PERFORM vetassist_auth.require_live(s);
    m := vetassist_auth.mfa_row(s.user_id);
    step := vetassist_auth.mfa_check(m, code, true, 'mfa_verified', 'sessions', s.id::text);
    IF step IS NOT NULL THEN
        verified := clock_timestamp();  -- read here: Citus runs an UPDATE's SET on a worker
        UPDATE vetassist_auth.sessions t SET mfa_verified = true, mfa_verified_at = verified
        WHERE t.user_id = s.user_id AND t.id = s.id;
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
COMMENT ON FUNCTION vetassist_auth.mfa_verify(text, text) IS
    'Checks a TOTP or backup code for the session''s user; true marks the session MFA-verified. Failures count toward a lock-out (28000).';

CREATE FUNCTION vetassist_auth.mfa_generate_backup_codes(user_id uuid, n integer DEFAULT 10) RETURNS text[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    codes text[];
BEGIN
    IF n IS NULL OR n < 1 OR n > 20 THEN
        RAISE EXCEPTION 'vetassist_auth: n must be between 1 and 20' USING ERRCODE = '22023';
    END IF;
    PERFORM vetassist_auth.mfa_row(user_id);
    SELECT array_agg(vetassist_auth.mfa_new_backup_code()) INTO codes FROM generate_series(1, n);
    -- A new set voids the old one.
    DELETE FROM vetassist_auth.mfa_backup_codes b WHERE b.user_id = mfa_generate_backup_codes.user_id;
    INSERT INTO vetassist_auth.mfa_backup_codes (user_id, code_hash)
    SELECT user_id, vetassist_auth.field_hash(user_id || ':' || vetassist_auth.mfa_normalize_backup_code(c), 'mfa_backup_code')
    FROM unnest(codes) c;
    PERFORM vetassist_auth.write_audit('mfa', 'backup_codes_generated', 'success', user_id, 'mfa_backup_codes', user_id::text,
                                       jsonb_build_object('count', n));
    RETURN codes;
END
$$;
COMMENT ON FUNCTION vetassist_auth.mfa_generate_backup_codes(uuid, integer) IS
    'Returns n single-use backup codes, once; only keyed hashes are kept. A new set voids the old one.';

CREATE FUNCTION vetassist_auth.mfa_trust_device(jwt_id text, days integer DEFAULT 30) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id);
    device uuid;
BEGIN
    IF days IS NULL OR days < 1 OR days > 90 THEN
        RAISE EXCEPTION 'vetassist_auth: days must be between 1 and 90' USING ERRCODE = '22023';
    END IF;
    -- Live by the clock (an idle session not swept yet is over), and MFA-verified.
    PERFORM vetassist_auth.require_live(s);
    IF NOT s.mfa_verified THEN
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
COMMENT ON FUNCTION vetassist_auth.mfa_trust_device(text, integer) IS
    'Trusts the device of an MFA-verified session for some days: its later sessions skip MFA (see mfa_required).';

CREATE FUNCTION vetassist_auth.mfa_trusted_devices(user_id uuid)
RETURNS TABLE (device_id uuid, created_at timestamptz, trusted_until timestamptz, last_used_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.require_user(user_id);
    RETURN QUERY SELECT d.id, d.created_at, d.trusted_until, d.last_used_at FROM vetassist_auth.trusted_devices d
                 WHERE d.user_id = mfa_trusted_devices.user_id AND d.revoked_at IS NULL AND d.trusted_until > clock_timestamp()
                 ORDER BY d.created_at;
END
$$;

CREATE FUNCTION vetassist_auth.mfa_revoke_device(user_id uuid, device_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    revoked timestamptz := clock_timestamp();  -- read here: Citus runs an UPDATE's SET on a worker
BEGIN
    UPDATE vetassist_auth.trusted_devices d SET revoked_at = revoked
    WHERE d.user_id = mfa_revoke_device.user_id AND d.id = device_id AND d.revoked_at IS NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM vetassist_auth.write_audit('mfa', 'device_revoked', 'success', user_id, 'trusted_devices', device_id::text);
    RETURN true;
END
$$;

-- Whether a session still needs a second factor (mfa_required, authenticate). Internal.
CREATE FUNCTION vetassist_auth.mfa_pending(s vetassist_auth.sessions) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF s.mfa_verified OR NOT EXISTS (SELECT 1 FROM vetassist_auth.mfa_settings m
                                     WHERE m.user_id = s.user_id AND m.totp_enabled) THEN
        RETURN false;
    END IF;
    RETURN NOT EXISTS (SELECT 1 FROM vetassist_auth.trusted_devices d
                       WHERE d.user_id = s.user_id AND d.device_fingerprint_hash = s.device_fingerprint_hash
                         AND d.revoked_at IS NULL AND d.trusted_until > clock_timestamp());
END
$$;

CREATE FUNCTION vetassist_auth.mfa_required(jwt_id text) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id);
BEGIN
    PERFORM vetassist_auth.require_live(s);
    RETURN vetassist_auth.mfa_pending(s);
END
$$;
COMMENT ON FUNCTION vetassist_auth.mfa_required(text) IS
    'Whether this session still needs a second factor: MFA enabled, not yet verified, and not on a trusted device.';

CREATE FUNCTION vetassist_auth.mfa_disable(user_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    revoked timestamptz := clock_timestamp();  -- read here: Citus runs an UPDATE's SET on a worker
BEGIN
    PERFORM vetassist_auth.require_user(user_id);
    DELETE FROM vetassist_auth.mfa_settings m WHERE m.user_id = mfa_disable.user_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM vetassist_auth.mfa_backup_codes b WHERE b.user_id = mfa_disable.user_id;
    UPDATE vetassist_auth.trusted_devices d SET revoked_at = revoked
    WHERE d.user_id = mfa_disable.user_id AND d.revoked_at IS NULL;
    PERFORM vetassist_auth.write_audit('mfa', 'mfa_disabled', 'success', user_id, 'mfa_settings', user_id::text);
    RETURN true;
END
$$;
COMMENT ON FUNCTION vetassist_auth.mfa_disable(uuid) IS 'Removes TOTP, backup codes and trusted devices of a user; audited.';

-- Who may call the functions of this file (any other function of the extension: no role,
-- sql/grants.sql).
GRANT EXECUTE ON FUNCTION vetassist_auth.mfa_enroll_totp(uuid) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.mfa_confirm_totp(uuid, text, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.mfa_verify(text, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.mfa_generate_backup_codes(uuid, integer) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.mfa_trust_device(text, integer) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.mfa_trusted_devices(uuid) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.mfa_revoke_device(uuid, uuid) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.mfa_required(text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.mfa_disable(uuid) TO vetassist_app, vetassist_admin;
