-- Session lifecycle (docs/ARCHITECTURE.md, "Sessions and time"). A session is ACTIVE until it ends for good:
-- EXPIRED (idle or absolute time-out), TERMINATED (logout, revocation, limits) or LOCKED.
-- live_until = least(expires_at, last_activity_at + idle_timeout) is the moment it expires
-- unless touched; touch_session moves it at most once per session_touch_interval.
-- Every time-out decision reads the clock (clock_timestamp), not the start of the caller's
-- transaction: a transaction opened before a session's end must not see it as live.

-- Ends one session (internal): status, end time, reason, and an audit row. Returns false when
-- the session had already ended.
CREATE FUNCTION vetassist_auth.close_session(
    session vetassist_auth.sessions, new_status vetassist_auth.session_status, reason text)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    ended timestamptz := clock_timestamp();  -- read here: Citus runs an UPDATE's SET on a worker
BEGIN
    UPDATE vetassist_auth.sessions s
    SET status = new_status, ended_at = ended, end_reason = reason,
        refresh_successor_encrypted = NULL
    WHERE s.user_id = session.user_id AND s.id = session.id AND s.status = 'ACTIVE';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM vetassist_auth.write_audit('session', 'session_' || lower(new_status::text), 'success',
        session.user_id, 'sessions', session.id::text, jsonb_build_object('reason', reason));
    RETURN true;
END
$$;

-- Raises 22023 unless a reason for ending sessions is 1 to 200 characters. Internal.
CREATE FUNCTION vetassist_auth.check_end_reason(reason text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF coalesce(reason, '') = '' OR length(reason) > 200 THEN
        RAISE EXCEPTION 'vetassist_auth: reason must be 1 to 200 characters' USING ERRCODE = '22023';
    END IF;
END
$$;

-- Raises 28000 unless a session can still be used: ACTIVE, before live_until, and not locked
-- by an MFA lock-out it caused (whose LOCKED status the caller may have rolled back). Internal.
CREATE FUNCTION vetassist_auth.require_live(session vetassist_auth.sessions) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF session.status <> 'ACTIVE' OR clock_timestamp() >= session.live_until
       OR vetassist_auth.mfa_locked_session(session.user_id, session.id) THEN
        RAISE EXCEPTION 'vetassist_auth: the session has ended' USING ERRCODE = '28000';
    END IF;
END
$$;

-- The session of a JWT id, locked for update when asked; P0002 when there is none. Every
-- statement is keyed by the user id its route names (on Citus: one shard each).
CREATE FUNCTION vetassist_auth.session_by_jwt(jwt text, for_update boolean DEFAULT false)
RETURNS vetassist_auth.sessions
LANGUAGE plpgsql AS $$
DECLARE
    found_session vetassist_auth.sessions;
    owner uuid;
BEGIN
    SELECT r.user_id INTO owner FROM vetassist_auth.session_routes r WHERE r.jwt_id = jwt;
    IF for_update THEN
        SELECT * INTO found_session FROM vetassist_auth.sessions s
        WHERE s.user_id = owner AND s.jwt_id = jwt FOR UPDATE;
    ELSE
        SELECT * INTO found_session FROM vetassist_auth.sessions s WHERE s.user_id = owner AND s.jwt_id = jwt;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no session with this jwt_id' USING ERRCODE = 'P0002';
    END IF;
    RETURN found_session;
END
$$;

CREATE FUNCTION vetassist_auth.create_session(
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
    IF expires_at IS NULL OR NOT isfinite(expires_at) OR expires_at <= started THEN
        RAISE EXCEPTION 'vetassist_auth: expires_at must be a finite time in the future' USING ERRCODE = '22023';
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
        INSERT INTO vetassist_auth.session_routes (jwt_id, user_id) VALUES (jwt_id, user_id);
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
COMMENT ON FUNCTION vetassist_auth.create_session(uuid, text, timestamptz, inet, text, text, jsonb) IS
    'Starts a session for an active user; IP and device fingerprint are stored only as keyed hashes.';

-- The hot path: called on every API request. Usually one indexed SELECT; a write only once per
-- session_touch_interval, or when the session has just expired.
-- Validates and touches one session, for touch_session and authenticate: ends it when it is
-- overdue or locked by an MFA lock-out it caused; otherwise names it for the audit rows of the
-- transaction and records activity at most once per session_touch_interval. Returns its status,
-- why it ended (NULL while ACTIVE) and until when it lives unless touched. Internal.
CREATE FUNCTION vetassist_auth.touch(s vetassist_auth.sessions,
    OUT status vetassist_auth.session_status, OUT reason text, OUT live_until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    now_ts timestamptz := clock_timestamp();
    touched_until timestamptz;
BEGIN
    live_until := s.live_until;
    IF s.status <> 'ACTIVE' THEN
        status := s.status;
        reason := s.end_reason;
        RETURN;
    END IF;
    IF now_ts >= s.live_until THEN
        status := 'EXPIRED';
        reason := CASE WHEN now_ts >= s.expires_at THEN 'absolute_timeout' ELSE 'idle_timeout' END;
        PERFORM vetassist_auth.close_session(s, status, reason);
        RETURN;
    END IF;
    IF vetassist_auth.mfa_locked_session(s.user_id, s.id) THEN
        status := 'LOCKED';
        reason := 'mfa_lockout';
        PERFORM vetassist_auth.close_session(s, status, reason);
        RETURN;
    END IF;
    PERFORM vetassist_auth.set_request_session(s.id, s.user_id);
    IF now_ts - s.last_activity_at >= vetassist_auth.session_touch_interval() THEN
        -- Computed here from the row read above (neither column changes): Citus refuses a
        -- STABLE operator (timestamptz + interval) on a column in a distributed UPDATE.
        touched_until := least(s.expires_at, now_ts + s.idle_timeout);
        UPDATE vetassist_auth.sessions t
        SET last_activity_at = now_ts, live_until = touched_until
        WHERE t.user_id = s.user_id AND t.id = s.id AND t.status = 'ACTIVE';
        IF NOT FOUND THEN  -- ended by someone else a moment ago
            SELECT t.status, t.end_reason INTO status, reason
            FROM vetassist_auth.sessions t WHERE t.user_id = s.user_id AND t.id = s.id;
            RETURN;
        END IF;
        live_until := touched_until;
        INSERT INTO vetassist_auth.session_activity (session_id, user_id, activity_type)
        VALUES (s.id, s.user_id, 'request');
    END IF;
    status := 'ACTIVE';
END
$$;

-- The session a request names, or a row of NULLs. In a REPEATABLE READ or SERIALIZABLE
-- transaction, whose snapshot may predate the session's end, the row is read FOR SHARE: a session
-- ended since is then a serialization failure (40001), never live. READ COMMITTED reads it as
-- it is now without the lock (touch_session is the hot path). Internal.
CREATE FUNCTION vetassist_auth.request_session(jwt text) RETURNS vetassist_auth.sessions
LANGUAGE plpgsql AS $$
DECLARE
    found_session vetassist_auth.sessions;
    owner uuid;
BEGIN
    SELECT r.user_id INTO owner FROM vetassist_auth.session_routes r WHERE r.jwt_id = jwt;
    IF current_setting('transaction_isolation') = 'read committed' THEN
        SELECT * INTO found_session FROM vetassist_auth.sessions t WHERE t.user_id = owner AND t.jwt_id = jwt;
    ELSE
        SELECT * INTO found_session FROM vetassist_auth.sessions t WHERE t.user_id = owner AND t.jwt_id = jwt FOR SHARE;
    END IF;
    RETURN found_session;
END
$$;

CREATE FUNCTION vetassist_auth.touch_session(jwt_id text) RETURNS vetassist_auth.session_status
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.request_session(jwt_id);
BEGIN
    IF s.id IS NULL THEN
        RAISE EXCEPTION 'vetassist_auth: no session with this jwt_id' USING ERRCODE = 'P0002';
    END IF;
    RETURN (vetassist_auth.touch(s)).status;
END
$$;
COMMENT ON FUNCTION vetassist_auth.touch_session(text) IS
    'Validates a session and records activity; returns ACTIVE, or the reason it is not (EXPIRED, TERMINATED, LOCKED).';

CREATE FUNCTION vetassist_auth.session_status(jwt_id text) RETURNS vetassist_auth.session_status
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id);
BEGIN
    IF s.status <> 'ACTIVE' THEN
        RETURN s.status;
    ELSIF clock_timestamp() >= s.live_until THEN
        RETURN 'EXPIRED';
    ELSIF vetassist_auth.mfa_locked_session(s.user_id, s.id) THEN
        RETURN 'LOCKED';
    ELSIF clock_timestamp() >= s.live_until - vetassist_auth.session_idle_warning() AND s.live_until < s.expires_at THEN
        RETURN 'IDLE';
    END IF;
    RETURN 'ACTIVE';
END
$$;
COMMENT ON FUNCTION vetassist_auth.session_status(text) IS
    'The status without recording activity; IDLE means the idle time-out is less than session_idle_warning away.';

-- One call per request: validates and touches the session, and for a session that stays
-- ACTIVE names its user (the actor), the session and the client address for every audit row the
-- rest of the transaction writes (also while MFA is still required: mfa_required says so).
-- Anything else says why and names no one (an actor an earlier call set is cleared); an unknown
-- jwt_id is status NULL, reason 'unknown'.
CREATE FUNCTION vetassist_auth.authenticate(jwt_id text, client_ip inet DEFAULT NULL)
RETURNS TABLE (status vetassist_auth.session_status, reason text, user_id uuid, session_id uuid,
               mfa_required boolean, idle_expires_at timestamptz, absolute_expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.request_session(jwt_id);
    touched record;
BEGIN
    IF s.id IS NULL THEN
        PERFORM vetassist_auth.clear_actor();
        reason := 'unknown';
        RETURN NEXT;
        RETURN;
    END IF;
    touched := vetassist_auth.touch(s);
    status := touched.status;
    reason := touched.reason;
    IF touched.status <> 'ACTIVE' THEN
        PERFORM vetassist_auth.clear_actor();
    ELSE
        PERFORM vetassist_auth.set_actor(s.user_id, host(client_ip));
        user_id := s.user_id;
        session_id := s.id;
        mfa_required := vetassist_auth.mfa_pending(s);
        idle_expires_at := touched.live_until;
        absolute_expires_at := s.expires_at;
    END IF;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION vetassist_auth.authenticate(text, inet) IS
    'One call per request: validates and touches the session and, while it is ACTIVE, attaches its user, the session and the client address to the audit rows of the rest of the transaction.';

CREATE FUNCTION vetassist_auth.end_session(jwt_id text, reason text DEFAULT 'logout') RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id, true);
BEGIN
    PERFORM vetassist_auth.check_end_reason(reason);
    RETURN vetassist_auth.close_session(s, 'TERMINATED', reason);
END
$$;
COMMENT ON FUNCTION vetassist_auth.end_session(text, text) IS 'Ends a session (logout); returns false if it had already ended.';

CREATE FUNCTION vetassist_auth.end_user_sessions(user_id uuid, reason text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions;
    ended integer := 0;
BEGIN
    PERFORM vetassist_auth.check_end_reason(reason);
    PERFORM vetassist_auth.require_user(user_id);
    FOR s IN SELECT * FROM vetassist_auth.sessions t
             WHERE t.user_id = end_user_sessions.user_id AND t.status = 'ACTIVE'
             ORDER BY t.id FOR UPDATE
    LOOP
        IF vetassist_auth.close_session(s, 'TERMINATED', reason) THEN
            ended := ended + 1;
        END IF;
    END LOOP;
    RETURN ended;
END
$$;
COMMENT ON FUNCTION vetassist_auth.end_user_sessions(uuid, text) IS 'Ends every live session of a user; returns how many.';

CREATE FUNCTION vetassist_auth.lock_session(jwt_id text, reason text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id, true);
BEGIN
    PERFORM vetassist_auth.check_end_reason(reason);
    RETURN vetassist_auth.close_session(s, 'LOCKED', reason);
END
$$;
COMMENT ON FUNCTION vetassist_auth.lock_session(text, text) IS
    'Locks a session (suspected compromise, MFA lockout): it can no longer be used; returns false if it had already ended.';

-- Refresh-token rotation for the application's own refresh tokens, with reuse detection: only
-- the current token is accepted; presenting any other ends the session (a stolen token was used).
-- One exception keeps two tabs that refresh at once from logging the veteran out: within
-- vetassist_auth.refresh_reuse_grace of a rotation, the token it replaced yields that same
-- successor (kept encrypted for the purpose) instead of ending the session.
CREATE FUNCTION vetassist_auth.refresh_session_token(jwt_id text, presented text, replacement text)
RETURNS TABLE (generation integer, refresh_token text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id, true);
    ts timestamptz := clock_timestamp();
    successor_context text;
    successor bytea;
    replacement_hash bytea;
BEGIN
    IF coalesce(replacement, '') = '' OR octet_length(replacement) > 4096 THEN
        RAISE EXCEPTION 'vetassist_auth: replacement must be 1 byte to 4 KiB' USING ERRCODE = '22023';
    END IF;
    PERFORM vetassist_auth.require_live(s);
    successor_context := 'sessions.refresh_successor:' || s.id;
    IF s.refresh_token_hash IS NULL AND presented IS NULL
       OR s.refresh_token_hash = ANY (vetassist_auth.field_hashes(presented, 'session_refresh_token')) THEN
        -- Hashed and sealed here, not in the UPDATE (on Citus, values are encrypted on the
        -- coordinator only).
        replacement_hash := vetassist_auth.field_hash(replacement, 'session_refresh_token');
        IF vetassist_auth.refresh_reuse_grace() > interval '0' THEN
            successor := vetassist_auth.encrypt_token(replacement, successor_context);
        END IF;
        UPDATE vetassist_auth.sessions t
        SET previous_refresh_token_hash = t.refresh_token_hash,
            refresh_token_hash = replacement_hash,
            refresh_generation = t.refresh_generation + 1,
            refresh_rotated_at = ts,
            refresh_successor_encrypted = successor
        WHERE t.user_id = s.user_id AND t.id = s.id;
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
COMMENT ON FUNCTION vetassist_auth.refresh_session_token(text, text, text) IS
    'Replaces the session''s refresh token: returns the new generation and the token now current (the replacement, or within the reuse grace the successor already issued); NULLs after ending the session when a stale token is presented.';

CREATE FUNCTION vetassist_auth.rotate_session_refresh_token(jwt_id text, presented text, replacement text)
RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT r.generation FROM vetassist_auth.refresh_session_token(jwt_id, presented, replacement) r
$$;
COMMENT ON FUNCTION vetassist_auth.rotate_session_refresh_token(text, text, text) IS
    'refresh_session_token returning only the generation (NULL after ending the session on reuse).';

CREATE FUNCTION vetassist_auth.log_session_event(jwt_id text, event_type text, severity text, details jsonb DEFAULT '{}')
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
COMMENT ON FUNCTION vetassist_auth.log_session_event(text, text, text, jsonb) IS
    'Records a security or clinical event; a crisis event is also sent with NOTIFY vetassist_auth_crisis (ids only).';

-- Whether a vetassist_auth_crisis payload is one this extension sent: its mac is the keyed
-- hash of the ids (under any usable hash key, so rotation does not break it) and the event is
-- a stored crisis event of that session. Never raises on a malformed payload: false.
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

-- Sweep: ends overdue sessions and deletes ended ones past session_retention, batch_size rows
-- of each per call, skipping rows other transactions hold. Returns rows changed: call it until 0.
CREATE FUNCTION vetassist_auth.expire_sessions(batch_size integer DEFAULT 10000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ts timestamptz := clock_timestamp();  -- a variable, so the index on live_until is used
    expired integer;
    purged integer;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'vetassist_auth: batch_size must be a positive integer' USING ERRCODE = '22023';
    END IF;
    -- It writes audit rows directly: not on a logical replication subscriber.
    PERFORM vetassist_auth.require_primary_node();
    IF vetassist_auth.distributed() THEN
        RETURN vetassist_auth.expire_distributed_sessions(ts);
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
    -- Rows written here, not through the audit writer: counted for metrics() all the same.
    PERFORM vetassist_auth.count_audit_rows('session', 'session_expired', 'success', expired);

    WITH old AS (
        SELECT s.id FROM vetassist_auth.sessions s
        WHERE s.ended_at < ts - vetassist_auth.session_retention()
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM vetassist_auth.sessions s USING old WHERE s.id = old.id RETURNING s.jwt_id
    )
    DELETE FROM vetassist_auth.session_routes r USING gone WHERE r.jwt_id = gone.jwt_id;
    GET DIAGNOSTICS purged = ROW_COUNT;
    IF purged > 0 THEN
        PERFORM vetassist_auth.write_audit('session', 'sessions_purged', 'success', NULL, 'sessions', NULL,
                                           jsonb_build_object('count', purged));
    END IF;
    RETURN expired + purged;
END
$$;
COMMENT ON FUNCTION vetassist_auth.expire_sessions(integer) IS
    'Ends overdue sessions and deletes ended ones past session_retention, in batches; returns rows changed (call until 0).';

-- Who may call the functions of this file (any other function of the extension: no role,
-- sql/grants.sql).
GRANT EXECUTE ON FUNCTION vetassist_auth.create_session(uuid, text, timestamptz, inet, text, text, jsonb) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.touch_session(text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.authenticate(text, inet) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.session_status(text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.end_session(text, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.end_user_sessions(uuid, text) TO vetassist_app, vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.lock_session(text, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.rotate_session_refresh_token(text, text, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.refresh_session_token(text, text, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.log_session_event(text, text, text, jsonb) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_crisis_notice(text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.expire_sessions(integer) TO vetassist_app, vetassist_admin;
