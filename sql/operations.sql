-- Day-2 operations: restores and replicas (docs/operations.md, "Backup and restore", "Replicas and failover").

-- A data-only restore into a database that already has data keys would mix two key sets under
-- the same key ids: every restored value would then fail to decrypt. Keys enter the table only
-- through the extension's own key creation, or all together into an empty table (a restore);
-- anything else is refused before a row is written. Logical replication's apply does not fire
-- this trigger, so a subscriber receives keys as usual.
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

-- After a failover to a logical-replication subscriber (which receives rows but not sequence
-- positions) or any copy that left sequences behind: moves every id sequence of the extension
-- past the ids in use, so new rows get fresh ids. The encryption counters cannot be recovered
-- (the count since the last mirror is unknown), so the phi and token keys are rotated: the new
-- keys count from where the counters are now, and the old ones only decrypt. Returns one row
-- per sequence moved and per key rotated. Safe to run at any time: sequences only move forward.
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

-- The failover to a logical replica (docs/operations.md, "Replicas and failover"). Until it runs, a node
-- that a subscription feeds with the extension's tables (or whose vetassist_auth.node_role is
-- 'subscriber') writes none of them. It disables those subscriptions (nothing the old primary
-- sends is applied any more), records the promotion, then does what resync_sequences() does.
-- Returns one row per step.
CREATE FUNCTION vetassist_auth.promote()
RETURNS TABLE (action text, detail text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    subs oid[];
BEGIN
    -- One promotion at a time.
    LOCK TABLE vetassist_auth.node_promotions IN SHARE ROW EXCLUSIVE MODE;
    SELECT coalesce(array_agg(DISTINCT s.oid ORDER BY s.oid), '{}') INTO subs
    FROM pg_subscription_rel sr
    JOIN pg_class c ON c.oid = sr.srrelid
    JOIN pg_subscription s ON s.oid = sr.srsubid
    WHERE c.relnamespace = 'vetassist_auth'::regnamespace;
    FOR r IN SELECT s.subname FROM pg_subscription s WHERE s.oid = ANY (subs) AND s.subenabled ORDER BY s.subname LOOP
        EXECUTE format('ALTER SUBSCRIPTION %I DISABLE', r.subname);
        action := 'subscription disabled';
        detail := r.subname;
        RETURN NEXT;
    END LOOP;
    INSERT INTO vetassist_auth.node_promotions AS p (system_identifier, database, ended_subscriptions)
    SELECT c.system_identifier, d.oid, subs
    FROM pg_control_system() c, pg_database d WHERE d.datname = current_database()
    ON CONFLICT (system_identifier, database) DO UPDATE
        SET promoted_at = clock_timestamp(),
            ended_subscriptions = ARRAY(SELECT DISTINCT o FROM unnest(p.ended_subscriptions || EXCLUDED.ended_subscriptions) o ORDER BY o);
    -- From here on this node is the primary (node_role() reads the row just written).
    FOR r IN SELECT * FROM vetassist_auth.resync_sequences() LOOP
        IF r.sequence_name LIKE '% key rotated' THEN
            action := 'key rotated';
            detail := split_part(r.sequence_name, ' ', 1) || ': new key ' || r.new_value;
        ELSE
            action := 'sequence moved';
            detail := r.sequence_name || ' to ' || r.new_value;
        END IF;
        RETURN NEXT;
    END LOOP;
    PERFORM vetassist_auth.write_audit('key', 'node_promoted', 'success', NULL, 'node_promotions', NULL,
        jsonb_build_object('subscriptions_ended', (SELECT coalesce(jsonb_agg(s.subname ORDER BY s.subname), '[]')
                                                   FROM pg_subscription s WHERE s.oid = ANY (subs))));
    action := 'promoted';
    detail := 'this node is the primary: the extension writes here';
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION vetassist_auth.promote() IS
    'Failover to a logical replica: disables the subscriptions that bring the extension''s tables, makes this node the primary, moves sequences past the ids in use and rotates the counted keys (as resync_sequences); returns each step.';

-- Who may call the functions of this file (any other function of the extension: no role,
-- sql/grants.sql).
GRANT EXECUTE ON FUNCTION vetassist_auth.resync_sequences() TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.promote() TO vetassist_admin;
