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
-- positions) or any copy that left sequences behind: moves every sequence of the extension
-- past the values in use, so new rows get fresh ids and encryption counters never count low.
-- Returns one row per sequence moved. Safe to run at any time: sequences only move forward.
CREATE FUNCTION vetassist_auth.resync_sequences()
RETURNS TABLE (sequence_name text, new_value bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- Leases a backend may hold between two mirrors of keys.encrypt_count, for every backend.
    slack bigint := 9 * current_setting('max_connections')::bigint;
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
        -- A key's count is (lease - counter_base) * 128: the counter must be past every key's
        -- base plus its mirrored count, with room for leases not mirrored yet.
        UNION ALL SELECT purpose || '_encryptions_seq',
                         (SELECT max(k.counter_base + k.encrypt_count / 128) + slack
                          FROM vetassist_auth.keys k WHERE k.purpose = p.purpose)
                  FROM (VALUES ('phi'), ('token')) p(purpose)
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
    PERFORM vetassist_auth.write_audit('key', 'sequences_resynchronised', 'success', NULL, NULL, NULL,
        jsonb_build_object('sequences_moved', moved));
END
$$;
COMMENT ON FUNCTION vetassist_auth.resync_sequences() IS
    'Moves the extension''s sequences past the ids and encryption counts in use (after a failover to a logical replica); returns what moved.';
