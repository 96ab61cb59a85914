-- MFA, as the application role. The "authenticator app" is played by the superuser reading the
-- secret back (the app role cannot) and computing codes with the extension's own TOTP.
CREATE TEMP TABLE t AS SELECT vetassist_auth.upsert_va_user('1012660000V000009', 'veteran', 'mfa@example.org', NULL, NULL) AS id;
GRANT SELECT ON t TO vetassist_app;
CREATE FUNCTION pg_temp.secret(user_id uuid) RETURNS bytea LANGUAGE sql AS $$
    SELECT vetassist_auth.open_mfa_secret(totp_secret_encrypted, 'mfa_settings.totp_secret:' || user_id)
    FROM vetassist_auth.mfa_settings WHERE mfa_settings.user_id = secret.user_id $$;
CREATE FUNCTION pg_temp.code_now(user_id uuid, offset_steps integer DEFAULT 0) RETURNS text LANGUAGE sql AS $$
    SELECT vetassist_auth.totp_code(pg_temp.secret(user_id), extract(epoch FROM clock_timestamp())::bigint / 30 + offset_steps) $$;
-- A wrong 6-digit code that cannot be right by chance: the n-th candidate that is no step's code
-- within three steps (90 s) of now (the extension accepts one step either side).
CREATE FUNCTION pg_temp.wrong_code(user_id uuid, n integer) RETURNS text LANGUAGE sql AS $$
    SELECT w FROM unnest(ARRAY['000000', '999999', '111111', '888888', '222222', '777777', '333333']) WITH ORDINALITY AS c(w, i)
    WHERE w NOT IN (SELECT pg_temp.code_now(user_id, o) FROM generate_series(-3, 3) o) ORDER BY i OFFSET n - 1 LIMIT 1 $$;
-- Codes computed by the superuser, handed to the app session through a table it can read.
CREATE TEMP TABLE codes (name text PRIMARY KEY, code text);
GRANT SELECT ON codes TO vetassist_app;

-- RFC 6238 window edges, deterministic: a fixed moment S*30 seconds.
SELECT vetassist_auth.totp_match('12345678901234567890'::bytea, vetassist_auth.totp_code('12345678901234567890'::bytea, 37037036 + d), 37037036 * 30, NULL) - 37037036 AS accepted_offset, d AS code_offset
FROM generate_series(-2, 2) d ORDER BY d;
SELECT vetassist_auth.totp_code('12345678901234567890'::bytea, 59 / 30) AS rfc6238_t59_6_digits;

SET ROLE vetassist_app;
SELECT vetassist_auth.mfa_enroll_totp(id) ~ '^otpauth://totp/VetAssist:veteran-[0-9a-f]{8}\?secret=[A-Z2-7]{32}&issuer=VetAssist&algorithm=SHA1&digits=6&period=30$' AS uri_ok FROM t;
-- Enrolling again before confirmation replaces the secret.
SELECT vetassist_auth.mfa_enroll_totp(id) IS NOT NULL AS re_enrolled FROM t;
SELECT regress.try('SELECT * FROM vetassist_auth.mfa_settings') AS app_reads_secrets;
SELECT regress.try(format('SELECT vetassist_auth.mfa_verify(%L, %L)', 'jwt-none', '123456')) AS unknown_session;
RESET ROLE;
SELECT octet_length(pg_temp.secret(id)) AS secret_bytes, totp_enabled FROM t, vetassist_auth.mfa_settings m WHERE m.user_id = t.id;
INSERT INTO codes SELECT 'confirm', pg_temp.code_now(id) FROM t;
INSERT INTO codes SELECT 'wrong-confirm', pg_temp.wrong_code(id, 1) FROM t;

SET ROLE vetassist_app;
SELECT vetassist_auth.mfa_confirm_totp(t.id, c.code) AS wrong_code_confirms FROM t, codes c WHERE c.name = 'wrong-confirm';
SELECT vetassist_auth.mfa_confirm_totp(t.id, c.code) AS confirmed FROM t, codes c WHERE c.name = 'confirm';
SELECT regress.try(format('SELECT vetassist_auth.mfa_enroll_totp(%L)', id)) AS enroll_when_enabled FROM t;
SELECT mfa_enabled FROM t, vetassist_auth.user_profile(t.id);

-- A session needs MFA until verified; a code is never accepted twice.
SELECT vetassist_auth.create_session(id, 'jwt-mfa-1', now() + interval '1 hour', device_fingerprint => 'laptop-1') IS NOT NULL AS created FROM t;
SELECT vetassist_auth.mfa_required('jwt-mfa-1') AS required_before;
RESET ROLE;
-- The confirmation used the current step: the next accepted code must belong to a later step.
UPDATE vetassist_auth.mfa_settings m SET last_used_step = extract(epoch FROM clock_timestamp())::bigint / 30 - 2 FROM t WHERE m.user_id = t.id;
INSERT INTO codes SELECT 'verify', pg_temp.code_now(id) FROM t;
SET ROLE vetassist_app;
SELECT vetassist_auth.mfa_verify('jwt-mfa-1', c.code) AS verified FROM codes c WHERE c.name = 'verify';
SELECT vetassist_auth.mfa_verify('jwt-mfa-1', c.code) AS replayed FROM codes c WHERE c.name = 'verify';
SELECT vetassist_auth.mfa_required('jwt-mfa-1') AS required_after;
RESET ROLE;
SELECT mfa_verified, mfa_verified_at IS NOT NULL AS verified_at FROM vetassist_auth.sessions WHERE jwt_id = 'jwt-mfa-1';
SELECT s.failures, s.locked_until IS NOT NULL AS locked FROM t, vetassist_auth.mfa_settings m, vetassist_auth.mfa_lock_state(m.user_id, m.failures_counted_from) s WHERE m.user_id = t.id;

-- Backup codes: shown once, each works once, a new set voids the old one.
SET ROLE vetassist_app;
CREATE TEMP TABLE backup AS SELECT vetassist_auth.mfa_generate_backup_codes(id, 3) AS codes FROM t;
SELECT cardinality(codes) AS n, bool_and(c ~ '^[A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4}$') AS format_ok FROM backup, unnest(codes) c GROUP BY 1;
SELECT vetassist_auth.create_session(id, 'jwt-mfa-2', now() + interval '1 hour') IS NOT NULL AS created FROM t;
SELECT vetassist_auth.mfa_verify('jwt-mfa-2', lower(replace(codes[1], '-', ' '))) AS backup_code_works FROM backup;
SELECT vetassist_auth.create_session(id, 'jwt-mfa-3', now() + interval '1 hour') IS NOT NULL AS created FROM t;
SELECT vetassist_auth.mfa_verify('jwt-mfa-3', codes[1]) AS backup_code_reused FROM backup;
SELECT vetassist_auth.mfa_generate_backup_codes(id, 2) IS NOT NULL AS regenerated FROM t;
SELECT vetassist_auth.mfa_verify('jwt-mfa-3', codes[2]) AS old_set_void FROM backup;
SELECT regress.try(format('SELECT vetassist_auth.mfa_generate_backup_codes(%L, 0)', id)) AS bad_n FROM t;
RESET ROLE;
SELECT count(*) AS stored, bool_and(octet_length(code_hash) = 36) AS only_hashes FROM vetassist_auth.mfa_backup_codes b JOIN t ON b.user_id = t.id;

-- Trusted devices: the device of a verified session skips MFA until revoked or expired.
SET ROLE vetassist_app;
SELECT vetassist_auth.mfa_trust_device('jwt-mfa-1', 30) IS NOT NULL AS trusted;
SELECT regress.try('SELECT vetassist_auth.mfa_trust_device(''jwt-mfa-3'', 30)') AS unverified_session;
SELECT vetassist_auth.create_session(id, 'jwt-mfa-4', now() + interval '1 hour', device_fingerprint => 'laptop-1') IS NOT NULL AS same_device,
       vetassist_auth.create_session(id, 'jwt-mfa-5', now() + interval '1 hour', device_fingerprint => 'phone-9') IS NOT NULL AS other_device FROM t;
SELECT vetassist_auth.mfa_required('jwt-mfa-4') AS trusted_device_required, vetassist_auth.mfa_required('jwt-mfa-5') AS other_device_required;
SELECT count(*) AS listed FROM t, vetassist_auth.mfa_trusted_devices(t.id);
SELECT vetassist_auth.mfa_revoke_device(t.id, d.device_id) AS revoked FROM t, vetassist_auth.mfa_trusted_devices(t.id) d;
SELECT vetassist_auth.mfa_required('jwt-mfa-4') AS required_after_revoke;
RESET ROLE;

-- Lock-out after mfa_max_failures consecutive failures: 28000, and the failing session is LOCKED.
-- (The two failed backup codes above already count: start from zero.) The failures are counted
-- from the audit log, where they are recorded whatever becomes of the caller's transaction.
UPDATE vetassist_auth.mfa_settings m SET failures_counted_from = clock_timestamp() FROM t WHERE m.user_id = t.id;
INSERT INTO codes SELECT 'wrong-1', pg_temp.wrong_code(id, 1) FROM t;
INSERT INTO codes SELECT 'wrong-2', pg_temp.wrong_code(id, 2) FROM t;
SET vetassist_auth.mfa_max_failures = 3;
-- An hour while the lock-out is checked, so that no stall of the machine ends it early; it is
-- shortened below to watch it end.
SET vetassist_auth.mfa_lockout = 3600;
SET ROLE vetassist_app;
SELECT vetassist_auth.mfa_verify('jwt-mfa-5', c.code) AS f1, vetassist_auth.mfa_verify('jwt-mfa-5', 'nonsense') AS f2 FROM codes c WHERE c.name = 'wrong-1';
SELECT vetassist_auth.mfa_verify('jwt-mfa-5', c.code) AS f3 FROM codes c WHERE c.name = 'wrong-2';
SELECT vetassist_auth.touch_session('jwt-mfa-5') AS locked_session;
SELECT regress.try('SELECT vetassist_auth.mfa_verify(''jwt-mfa-4'', ''000000'')') AS while_locked;
RESET ROLE;
INSERT INTO codes SELECT 'locked', pg_temp.code_now(id, 1) FROM t;
SET ROLE vetassist_app;
SELECT regress.try(format('SELECT vetassist_auth.mfa_verify(%L, %L)', 'jwt-mfa-4', c.code)) AS right_code_while_locked FROM codes c WHERE c.name = 'locked';
RESET ROLE;
SELECT s.failures, s.locked_until IS NOT NULL AS locked FROM t, vetassist_auth.mfa_settings m, vetassist_auth.mfa_lock_state(m.user_id, m.failures_counted_from) s WHERE m.user_id = t.id;
-- The lock-out ends once mfa_lockout (now 1 s) has passed since the third failure: at least the
-- 1.1 s slept here.
SET vetassist_auth.mfa_lockout = 1;
SELECT pg_sleep(1.1);
SET ROLE vetassist_app;
SELECT vetassist_auth.mfa_verify('jwt-mfa-4', c.code) AS after_lockout FROM codes c WHERE c.name = 'locked';
RESET ROLE;
RESET vetassist_auth.mfa_max_failures;
RESET vetassist_auth.mfa_lockout;
SELECT s.failures, s.locked_until IS NOT NULL AS locked FROM t, vetassist_auth.mfa_settings m, vetassist_auth.mfa_lock_state(m.user_id, m.failures_counted_from) s WHERE m.user_id = t.id;

-- Disable: audited; enrolment state shows in the profile.
SET ROLE vetassist_app;
SELECT vetassist_auth.mfa_disable(id) AS disabled, vetassist_auth.mfa_disable(id) AS disabled_again FROM t;
SELECT mfa_enabled FROM t, vetassist_auth.user_profile(t.id);
RESET ROLE;
SELECT event_type, outcome, count(*) FROM vetassist_auth.audit_log a JOIN t ON a.subject_user_id = t.id
WHERE category = 'mfa' GROUP BY 1, 2 ORDER BY 1, 2;
-- No code, secret or backup code reaches the audit log.
-- Sound for 6 random digits (a LIKE on the row text matches digits of timestamps, UUIDs and hashes by
-- chance): each text column and each key and scalar of details, compared whole and searched for the
-- code as a digit-delimited run once timestamps, UUIDs and hex digests in it are blanked out.
CREATE FUNCTION pg_temp.audit_fields(a vetassist_auth.audit_log) RETURNS SETOF text LANGUAGE sql AS $$
    SELECT unnest(ARRAY[a.db_role, a.category, a.event_type, a.outcome, a.target_table, a.target_id] || a.changed_columns)
    UNION ALL
    SELECT k FROM jsonb_path_query(a.details, 'strict $.**') v,
                  jsonb_object_keys(CASE WHEN jsonb_typeof(v) = 'object' THEN v ELSE '{}' END) k
    UNION ALL
    SELECT v #>> '{}' FROM jsonb_path_query(a.details, 'strict $.**') v WHERE jsonb_typeof(v) IN ('string', 'number') $$;
CREATE FUNCTION pg_temp.carries(field text, code text) RETURNS boolean LANGUAGE sql AS $$
    SELECT field = code OR regexp_replace(field,
        '[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9:.]+([+-][0-9:]+|Z)?|[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}|[0-9a-f]{16,}', ' ', 'gi')
        ~ ('(^|[^0-9])' || code || '([^0-9]|$)') $$;
SELECT count(*) AS audit_rows_with_codes FROM vetassist_auth.audit_log a, codes c
WHERE EXISTS (SELECT 1 FROM pg_temp.audit_fields(a) f WHERE pg_temp.carries(f, c.code));
-- Backup codes (12 characters of 31, grouped) cannot occur by chance: searched in the whole row text,
-- as shown and as typed above.
SELECT count(*) AS audit_rows_with_backup_codes FROM vetassist_auth.audit_log a, backup b, unnest(b.codes) c
WHERE a::text LIKE '%' || c || '%' OR a::text ILIKE '%' || replace(c, '-', ' ') || '%';
