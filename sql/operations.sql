-- Day-2 operations: restores and replicas (README, "Backup and restore", "Replicas and failover").

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
