-- Session lifecycle, as the application role. Time is simulated by moving a session's
-- timestamps as superuser; every transition goes through the API.
SET ROLE vetassist_app;
CREATE TEMP TABLE vet AS SELECT vetassist_auth.upsert_va_user('1012660000V000008', 'veteran', NULL, NULL, NULL) AS id;

-- Absolute end: the earlier of the requested expiry and created_at + 12 h.
SELECT vetassist_auth.create_session(id, 'jwt-a', now() + interval '1 day', '203.0.113.7', 'Mozilla/5.0', 'fp-1', '{"os": "iOS"}') IS NOT NULL AS created FROM vet;
SELECT vetassist_auth.create_session(id, 'jwt-b', now() + interval '1 hour') IS NOT NULL AS created FROM vet;
RESET ROLE;
SELECT jwt_id, status, date_trunc('minute', expires_at - created_at + interval '30 seconds') AS lifetime, idle_timeout, live_until = created_at + idle_timeout AS idle_deadline,
       ip_hash = vetassist_auth.field_hash('203.0.113.7', 'ip') AS ip_hashed, octet_length(device_fingerprint_hash) AS fp_hash_len,
       position(convert_to('203.0.113.7', 'UTF8') IN s::text::bytea) = 0 AS no_clear_ip
FROM vetassist_auth.sessions s ORDER BY jwt_id;
SET ROLE vetassist_app;

-- Bad input.
SELECT regress.try(format('SELECT vetassist_auth.create_session(%L, ''jwt-a'', now() + interval ''1 hour'')', id)) AS duplicate_jwt FROM vet;
SELECT regress.try(format('SELECT vetassist_auth.create_session(%L, '''', now() + interval ''1 hour'')', id)) AS empty_jwt FROM vet;
SELECT regress.try(format('SELECT vetassist_auth.create_session(%L, ''jwt-x'', now() - interval ''1 second'')', id)) AS past_expiry FROM vet;
SELECT regress.try(format('SELECT vetassist_auth.create_session(%L, ''jwt-x'', now() + interval ''1 hour'', device_info => ''[1]'')', id)) AS info_not_object FROM vet;
SELECT regress.try('SELECT vetassist_auth.create_session(''00000000-0000-0000-0000-000000000000'', ''jwt-x'', now() + interval ''1 hour'')') AS unknown_user;
SELECT regress.try('SELECT vetassist_auth.touch_session(''no-such-jwt'')') AS unknown_jwt;
SELECT regress.try('SELECT * FROM vetassist_auth.sessions') AS read_sessions;

-- A touch within session_touch_interval writes nothing; after it, activity is recorded.
SELECT vetassist_auth.touch_session('jwt-a') AS status;
RESET ROLE;
SELECT count(*) AS activity_rows FROM vetassist_auth.session_activity;
UPDATE vetassist_auth.sessions SET last_activity_at = now() - interval '31 seconds', live_until = now() + interval '14 minutes 29 seconds' WHERE jwt_id = 'jwt-a';
SET ROLE vetassist_app;
SELECT vetassist_auth.touch_session('jwt-a') AS status;
RESET ROLE;
SELECT count(*) AS activity_rows, bool_and(s.live_until = s.last_activity_at + s.idle_timeout) AS deadline_moved
FROM vetassist_auth.session_activity a JOIN vetassist_auth.sessions s ON s.id = a.session_id;

-- session_status shares its name with the type session_status: pass text (a typed parameter,
-- or ::text on a literal), or Postgres reads the call as a cast to the enum.
-- Idle boundary: before the idle deadline still ACTIVE (and IDLE by session_status inside the
-- warning window); at the deadline EXPIRED, never ACTIVE. (30 s before it, not 1 s: the clock runs
-- on between statements, and a stall of the machine must not carry the call past the deadline.)
UPDATE vetassist_auth.sessions SET last_activity_at = now() - interval '14 minutes 30 seconds', live_until = now() + interval '30 seconds' WHERE jwt_id = 'jwt-b';
SET ROLE vetassist_app;
SELECT vetassist_auth.session_status('jwt-b'::text) AS status_in_warning_window;
RESET ROLE;
UPDATE vetassist_auth.sessions SET last_activity_at = now() - interval '15 minutes', live_until = now() WHERE jwt_id = 'jwt-b';
SET ROLE vetassist_app;
SELECT vetassist_auth.session_status('jwt-b'::text) AS status_peek, vetassist_auth.touch_session('jwt-b') AS touched;
SELECT vetassist_auth.touch_session('jwt-b') AS touched_again;
RESET ROLE;
SELECT status, end_reason, ended_at IS NOT NULL AS ended FROM vetassist_auth.sessions WHERE jwt_id = 'jwt-b';

-- Absolute boundary: however active, the session ends at expires_at.
UPDATE vetassist_auth.sessions SET expires_at = now(), live_until = now(), last_activity_at = now() WHERE jwt_id = 'jwt-a';
SET ROLE vetassist_app;
SELECT vetassist_auth.touch_session('jwt-a') AS status;
RESET ROLE;
SELECT status, end_reason FROM vetassist_auth.sessions WHERE jwt_id = 'jwt-a';

-- Logout, lock, and what touch reports afterwards.
SET ROLE vetassist_app;
SELECT vetassist_auth.create_session(id, 'jwt-c', now() + interval '1 hour') IS NOT NULL AS created,
       vetassist_auth.create_session(id, 'jwt-d', now() + interval '1 hour') IS NOT NULL AS created2 FROM vet;
SELECT vetassist_auth.end_session('jwt-c', 'logout') AS ended, vetassist_auth.end_session('jwt-c', 'logout') AS ended_again;
SELECT vetassist_auth.touch_session('jwt-c') AS after_logout;
SELECT vetassist_auth.lock_session('jwt-d', 'suspicious activity') AS locked;
SELECT vetassist_auth.touch_session('jwt-d') AS after_lock, vetassist_auth.session_status('jwt-d'::text) AS status;
SELECT regress.try('SELECT vetassist_auth.end_session(''jwt-d'', '''')') AS empty_reason;

-- At most N live sessions per user: the oldest gives way.
RESET ROLE;
SET vetassist_auth.max_sessions_per_user = 2;
SET ROLE vetassist_app;
SELECT regress.try('SET vetassist_auth.max_sessions_per_user = 0') AS app_cannot_lift_the_cap;
SELECT vetassist_auth.create_session(id, 'jwt-cap-1', now() + interval '1 hour') IS NOT NULL AS created FROM vet;
SELECT vetassist_auth.create_session(id, 'jwt-cap-2', now() + interval '1 hour') IS NOT NULL AS created FROM vet;
SELECT vetassist_auth.create_session(id, 'jwt-cap-3', now() + interval '1 hour') IS NOT NULL AS created FROM vet;
RESET ROLE;
RESET vetassist_auth.max_sessions_per_user;
SELECT jwt_id, status, end_reason FROM vetassist_auth.sessions WHERE jwt_id LIKE 'jwt-cap-%' ORDER BY jwt_id;

-- Refresh-token rotation with reuse detection. Within refresh_reuse_grace the token just
-- replaced yields the same successor (two tabs refreshing at once); outside it, reuse ends the session.
SET ROLE vetassist_app;
SELECT vetassist_auth.rotate_session_refresh_token('jwt-cap-3', NULL, 'rt-1') AS gen1,
       vetassist_auth.rotate_session_refresh_token('jwt-cap-3', 'rt-1', 'rt-2') AS gen2;
SELECT generation, refresh_token AS second_tab_gets FROM vetassist_auth.refresh_session_token('jwt-cap-3', 'rt-1', 'rt-2-other-tab');
SELECT vetassist_auth.touch_session('jwt-cap-3') AS after_second_tab;
RESET ROLE;
SET vetassist_auth.refresh_reuse_grace = 0;
SET ROLE vetassist_app;
SELECT regress.try('SET vetassist_auth.refresh_reuse_grace = 60') AS app_cannot_widen_the_grace;
SELECT generation, refresh_token FROM vetassist_auth.refresh_session_token('jwt-cap-3', 'rt-2', 'rt-3');
SELECT vetassist_auth.rotate_session_refresh_token('jwt-cap-3', 'rt-2', 'rt-4') AS reused_old_token;
SELECT vetassist_auth.touch_session('jwt-cap-3') AS after_reuse;
SELECT regress.try('SELECT vetassist_auth.rotate_session_refresh_token(''jwt-cap-3'', ''rt-3'', ''rt-5'')') AS ended_session;
RESET ROLE;
RESET vetassist_auth.refresh_reuse_grace;
SET ROLE vetassist_app;

-- Events: validated, stored, audited without their details.
SELECT vetassist_auth.log_session_event('jwt-cap-2', 'phq9_item9_positive', 'crisis', '{"score": 3}') > 0 AS crisis_logged;
SELECT regress.try('SELECT vetassist_auth.log_session_event(''jwt-cap-2'', ''x'', ''urgent'', ''{}'')') AS bad_severity;
SELECT regress.try('SELECT vetassist_auth.log_session_event(''jwt-cap-2'', '''', ''info'', ''{}'')') AS empty_type;
SELECT regress.try('SELECT vetassist_auth.log_session_event(''jwt-cap-2'', ''x'', ''info'', ''"text"'')') AS details_not_object;
RESET ROLE;
SELECT event_type, severity, details FROM vetassist_auth.session_events ORDER BY id;
SELECT category, event_type, details ? 'score' AS leaks_details FROM vetassist_auth.audit_log WHERE target_table = 'session_events';

-- The session of the request is written into audit rows of the same transaction.
SET ROLE vetassist_app;
BEGIN;
SELECT vetassist_auth.touch_session('jwt-cap-2') AS status;
SELECT vetassist_auth.audit_event('phi', 'chart_viewed', 'success', '{}') > 0 AS audited;
COMMIT;
RESET ROLE;
SELECT a.session_id = s.id AS carries_session FROM vetassist_auth.audit_log a, vetassist_auth.sessions s
WHERE a.event_type = 'chart_viewed' AND s.jwt_id = 'jwt-cap-2';

-- Every state change is audited (category session).
SELECT event_type, count(*) FROM vetassist_auth.audit_log WHERE category = 'session' GROUP BY 1 ORDER BY 1;

-- Sweep: overdue sessions end, old ended ones are deleted, in batches.
SET ROLE vetassist_app;
SELECT count(vetassist_auth.create_session(id, 'jwt-sweep-' || n, now() + interval '1 hour')) AS created FROM vet, generate_series(1, 5) n;
RESET ROLE;
UPDATE vetassist_auth.sessions SET live_until = now() - interval '1 second' WHERE jwt_id LIKE 'jwt-sweep-%';
UPDATE vetassist_auth.sessions SET ended_at = now() - interval '31 days' WHERE jwt_id IN ('jwt-c', 'jwt-d');
SET ROLE vetassist_app;
SELECT regress.try('SELECT vetassist_auth.expire_sessions(0)') AS bad_batch;
SELECT vetassist_auth.expire_sessions(3) AS first_batch, vetassist_auth.expire_sessions(3) AS second_batch, vetassist_auth.expire_sessions(3) AS done;
RESET ROLE;
SELECT status, end_reason, count(*) FROM vetassist_auth.sessions WHERE jwt_id LIKE 'jwt-sweep-%' GROUP BY 1, 2;
SELECT count(*) AS purged_left FROM vetassist_auth.sessions WHERE jwt_id IN ('jwt-c', 'jwt-d');
SELECT count(*) AS expiry_audit_rows FROM vetassist_auth.audit_log WHERE event_type = 'session_expired';

-- A deactivated user gets no new session.
SET ROLE vetassist_app;
SELECT vetassist_auth.deactivate_user(id, 'test') FROM vet;
SELECT regress.try(format('SELECT vetassist_auth.create_session(%L, ''jwt-after'', now() + interval ''1 hour'')', id)) AS inactive_user FROM vet;
RESET ROLE;
