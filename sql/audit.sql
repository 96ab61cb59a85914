-- Audit writing (DESIGN section 8). Sealing, verification and retention build on this table.

-- The one place rows enter audit_log. Internal: only the API functions (already running as
-- the extension owner) call it, so it needs no SECURITY DEFINER of its own. PL/pgSQL rather
-- than SQL so its plan is cached per session.
-- Actor, session and client address come from set_actor / touch_session of this transaction.
CREATE FUNCTION vetassist_auth.write_audit(
    category text, event_type text, outcome text,
    subject_user_id uuid DEFAULT NULL, target_table text DEFAULT NULL, target_id text DEFAULT NULL,
    details jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO vetassist_auth.audit_log
        (actor_user_id, subject_user_id, session_id, category, event_type, outcome,
         target_table, target_id, details, ip_hash)
    VALUES (vetassist_auth.current_actor(), subject_user_id, vetassist_auth.current_session_id(),
            category, event_type, outcome, target_table, target_id, coalesce(details, '{}'),
            vetassist_auth.current_actor_ip_hash())
    RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

-- The application's own events (a page of PHI viewed, a document downloaded, ...).
CREATE FUNCTION vetassist_auth.audit_event(category text, event_type text, outcome text, details jsonb DEFAULT '{}')
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
    RETURN vetassist_auth.write_audit(category, event_type, outcome,
                                      vetassist_auth.current_actor(), NULL, NULL, details);
END
$$;
COMMENT ON FUNCTION vetassist_auth.audit_event(text, text, text, jsonb) IS
    'Writes an application audit event; actor, session and client address are filled in from set_actor.';
