-- Audit writing (docs/ARCHITECTURE.md, "Audit chain"). Sealing, verification and retention build on this table.

-- Rows enter audit_log only through vetassist_auth.write_audit() (Rust, src/audit/writer.rs):
-- a direct heap insert, without an INSERT statement's executor start-up per event. Internal:
-- only the API functions, already running as the extension owner, call it.

-- The application's own events (a page of PHI viewed, a document downloaded, ...), about the
-- veteran subject_user_id (the actor when not given: a veteran's own page).
CREATE FUNCTION vetassist_auth.audit_event(category text, event_type text, outcome text, details jsonb DEFAULT '{}',
                                           subject_user_id uuid DEFAULT NULL)
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
    -- Plain lower-case names only, so no look-alike (a tab, a no-break space, a Cyrillic letter)
    -- of the extension's own categories can be written; those are reserved outright.
    IF category !~ '^[a-z][a-z0-9_.-]{0,63}$' THEN
        RAISE EXCEPTION 'vetassist_auth: category must be lower-case ASCII letters, digits, _ . or -, starting with a letter' USING ERRCODE = '22023';
    END IF;
    IF category IN ('audit', 'auth', 'clinical', 'data', 'disclosure', 'identity', 'key', 'mfa', 'phi_access', 'session') THEN
        RAISE EXCEPTION 'vetassist_auth: this category is reserved for the extension''s own audit rows' USING ERRCODE = '22023',
            HINT = 'Application events use categories of their own, such as phi for PHI the application shows.';
    END IF;
    IF subject_user_id IS NOT NULL THEN
        PERFORM vetassist_auth.require_user(subject_user_id);
    END IF;
    RETURN vetassist_auth.write_audit(category, event_type, outcome,
                                      coalesce(subject_user_id, vetassist_auth.current_actor()), NULL, NULL, details);
END
$$;
COMMENT ON FUNCTION vetassist_auth.audit_event(text, text, text, jsonb, uuid) IS
    'Writes an application audit event about a veteran (the actor when subject_user_id is not given); actor, session and client address are filled in from set_actor.';

-- Append-only: UPDATE, DELETE and TRUNCATE raise for every role, the owner included. Only
-- purge_audit_log deletes, from the start of the chain, leaving a checkpoint.
CREATE FUNCTION vetassist_auth.refuse_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND vetassist_auth.audit_purge_in_progress() THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'vetassist_auth: % is append-only (% refused)', TG_TABLE_NAME, TG_OP USING ERRCODE = '42501',
        HINT = 'Old rows leave only through vetassist_auth.purge_audit_log().';
END
$$;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON vetassist_auth.audit_log
    FOR EACH ROW EXECUTE FUNCTION vetassist_auth.refuse_audit_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON vetassist_auth.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION vetassist_auth.refuse_audit_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON vetassist_auth.audit_seals
    FOR EACH ROW EXECUTE FUNCTION vetassist_auth.refuse_audit_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON vetassist_auth.audit_seals
    FOR EACH STATEMENT EXECUTE FUNCTION vetassist_auth.refuse_audit_change();

-- Row audit: vetassist_auth.row_audit() (Rust) writes to audit_log as the table's owner,
-- whoever changes the audited table; it resolves no names through the search_path.

-- Attaches the row-audit trigger to a table: INSERT, UPDATE and DELETE are logged with the
-- changed column names and old/new values, except bytea columns (ciphertexts) and `redact`
-- columns. An update that changes only `ignore` columns is not logged. The subject user is the
-- table's user_id column when it has one.
CREATE FUNCTION vetassist_auth.attach_row_audit(target regclass, redact text[], ignore text[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    args text[];
    missing text;
BEGIN
    IF target IS NULL THEN
        RAISE EXCEPTION 'vetassist_auth: target must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF target IN ('vetassist_auth.audit_log'::regclass, 'vetassist_auth.audit_seals'::regclass) THEN
        RAISE EXCEPTION 'vetassist_auth: the audit tables are not row-audited' USING ERRCODE = '22023';
    END IF;
    SELECT string_agg(c, ', ') INTO missing FROM unnest(coalesce(redact, '{}') || coalesce(ignore, '{}')) c
    WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = target AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'vetassist_auth: no such column(s) in %: %', target, missing USING ERRCODE = '22023';
    END IF;
    SELECT array_agg('pk:' || a.attname ORDER BY k.ord) INTO args
    FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, ord), pg_attribute a
    WHERE i.indrelid = target AND i.indisprimary AND a.attrelid = target AND a.attnum = k.attnum;
    args := coalesce(args, '{}')
        || ARRAY(SELECT 'redact:' || c FROM unnest(coalesce(redact, '{}')) c)
        || ARRAY(SELECT 'ignore:' || c FROM unnest(coalesce(ignore, '{}')) c)
        || ARRAY(SELECT 'subject:' || a.attname FROM pg_attribute a
                 WHERE a.attrelid = target AND a.attname = 'user_id' AND a.atttypid = 'uuid'::regtype);
    IF target = 'vetassist_auth.users'::regclass THEN
        args := args || ARRAY['subject:id'];
    END IF;
    IF (SELECT relnamespace FROM pg_class WHERE oid = target) = 'vetassist_auth'::regnamespace THEN
        args := args || ARRAY['skip_copy'];
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = target AND tgname = 'vetassist_row_audit') THEN
        EXECUTE format('DROP TRIGGER vetassist_row_audit ON %s', target);
    END IF;
    EXECUTE format('CREATE TRIGGER vetassist_row_audit AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION vetassist_auth.row_audit(%s)',
                   target, (SELECT string_agg(quote_literal(a), ', ') FROM unnest(args) a));
END
$$;

CREATE FUNCTION vetassist_auth.enable_row_audit(target regclass, redact text[] DEFAULT '{}', ignore text[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.attach_row_audit(target, redact, ignore);
    INSERT INTO vetassist_auth.row_audit_registry AS r (target, enabled) VALUES (target, true)
    ON CONFLICT ON CONSTRAINT row_audit_registry_pkey DO UPDATE SET enabled = true, changed_at = clock_timestamp();
    PERFORM vetassist_auth.write_audit('audit', 'row_audit_enabled', 'success', NULL, target::text, NULL,
        jsonb_build_object('redact', redact, 'ignore', ignore));
END
$$;
COMMENT ON FUNCTION vetassist_auth.enable_row_audit(regclass, text[], text[]) IS
    'Audits every INSERT, UPDATE and DELETE of a table, without bytea or redacted values; ignore lists columns whose changes alone are not logged.';

CREATE FUNCTION vetassist_auth.disable_row_audit(target regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = target AND tgname = 'vetassist_row_audit') THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TRIGGER vetassist_row_audit ON %s', target);
    UPDATE vetassist_auth.row_audit_registry r SET enabled = false, changed_at = clock_timestamp()
    WHERE r.target = disable_row_audit.target;
    PERFORM vetassist_auth.write_audit('audit', 'row_audit_disabled', 'success', NULL, target::text, NULL);
    RETURN true;
END
$$;

-- The extension's own tables are row-audited from install on. Ciphertexts and hashes are
-- bytea and never copied; session touches and key use counting are not logged row by row.
-- va_tokens is the exception: every write to it already comes with its own audit event
-- (va_tokens_stored/refreshed/deleted, with the generation), and it is the hot path of token
-- refreshes; enable_row_audit('vetassist_auth.va_tokens') adds row events at a measured cost.
-- (attach, not enable: a new installation starts with an empty audit log, so pg_restore can
-- bring back the old one.)
SELECT vetassist_auth.attach_row_audit('vetassist_auth.users', '{}', '{}');
SELECT vetassist_auth.attach_row_audit('vetassist_auth.sessions', '{}', '{last_activity_at,live_until}');
SELECT vetassist_auth.attach_row_audit('vetassist_auth.mfa_settings', '{}', '{}');
SELECT vetassist_auth.attach_row_audit('vetassist_auth.mfa_backup_codes', '{}', '{}');
SELECT vetassist_auth.attach_row_audit('vetassist_auth.trusted_devices', '{}', '{}');
SELECT vetassist_auth.attach_row_audit('vetassist_auth.keys', '{}', '{encrypt_count}');

-- A table owner can switch row audit off: ALTER TABLE … DISABLE TRIGGER (or ENABLE REPLICA),
-- ALTER TRIGGER … RENAME, CREATE OR REPLACE TRIGGER, DROP TRIGGER. Every such command on a
-- row-audited table is audited with the row audit's state afterwards (outcome denied when it no
-- longer fires), and verify_installation reports every table whose row audit an administrator
-- enabled and that no longer has it. Only a superuser with session_replication_role = replica,
-- which event triggers respect too, gets past this; the anchors are for that.
CREATE FUNCTION vetassist_auth.row_audit_fires(tab oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pg_trigger g
                   WHERE g.tgrelid = tab AND g.tgname = 'vetassist_row_audit'
                     AND g.tgenabled IN ('O', 'A') AND g.tgfoid = 'vetassist_auth.row_audit()'::regprocedure)
$$;

-- Whether losing a table's row audit raises an alarm: the extension's own tables, and those an
-- administrator put under row audit (the registry follows them through a rename or a new
-- schema). Not any table with a trigger of that name: every role may create a temporary table
-- and give it one. Internal.
CREATE FUNCTION vetassist_auth.row_audit_expected(tab oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM vetassist_auth.row_audit_registry r WHERE r.enabled AND r.target = tab)
        OR EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tab AND c.relnamespace = 'vetassist_auth'::regnamespace)
$$;

CREATE FUNCTION vetassist_auth.audit_table_altered() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    altered record;
BEGIN
    -- An extension without an audit row has recorded nothing yet (a key's creation is an audit
    -- row too): a fresh install, or a schema-only restore whose data, its audit log with it, is
    -- still to come. A row here would make that data-only restore fail. A Citus worker audits
    -- the creation of its shards as ever (its audit log is its own, local on every node).
    IF NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_log) AND NOT vetassist_auth.on_citus_worker() THEN
        RETURN;
    END IF;
    FOR altered IN
        SELECT t.tab, vetassist_auth.row_audit_fires(t.tab) AS fires
        FROM (SELECT DISTINCT CASE WHEN d.classid = 'pg_class'::regclass THEN d.objid
                                   ELSE (SELECT g.tgrelid FROM pg_trigger g WHERE g.oid = d.objid) END AS tab
              FROM pg_event_trigger_ddl_commands() d
              WHERE d.classid IN ('pg_class'::regclass, 'pg_trigger'::regclass)) t
        WHERE vetassist_auth.row_audit_expected(t.tab)
          AND EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = t.tab
                        AND (g.tgname = 'vetassist_row_audit' OR g.tgfoid = 'vetassist_auth.row_audit()'::regprocedure))
    LOOP
        PERFORM vetassist_auth.write_audit('audit', 'audited_table_altered',
            CASE WHEN altered.fires THEN 'info' ELSE 'denied' END,
            NULL, altered.tab::regclass::text, NULL,
            jsonb_build_object('row_audit', CASE WHEN altered.fires THEN 'enabled' ELSE 'disabled' END,
                               'command', tg_tag, 'by', session_user));
    END LOOP;
END
$$;

CREATE FUNCTION vetassist_auth.audit_row_audit_dropped() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    dropped record;
BEGIN
    FOR dropped IN
        -- A row-audit trigger dropped from a table that stays (a trigger's address is its
        -- table's schema and name, then its own name).
        SELECT t.tab::regclass::text AS target_table, 'dropped' AS row_audit
        FROM (SELECT to_regclass(format('%I.%I', o.address_names[1], o.address_names[2])) AS tab
              FROM pg_event_trigger_dropped_objects() o
              WHERE o.object_type = 'trigger' AND o.address_names[3] = 'vetassist_row_audit') t
        WHERE t.tab IS NOT NULL AND vetassist_auth.row_audit_expected(t.tab)
        UNION ALL
        -- A table under row audit dropped whole, its trigger with it.
        SELECT o.object_identity, 'table_dropped'
        FROM pg_event_trigger_dropped_objects() o
        WHERE o.object_type = 'table' AND vetassist_auth.row_audit_expected(o.objid)
    LOOP
        PERFORM vetassist_auth.write_audit('audit', 'audited_table_altered', 'denied', NULL, dropped.target_table, NULL,
            jsonb_build_object('row_audit', dropped.row_audit, 'command', tg_tag, 'by', session_user));
    END LOOP;
    -- Its audit rows are the record; nothing is left to check.
    DELETE FROM vetassist_auth.row_audit_registry r
    WHERE r.target IN (SELECT o.objid FROM pg_event_trigger_dropped_objects() o WHERE o.object_type = 'table');
END
$$;

-- The newest seal (or, with every seal purged, the purge checkpoint): an anchor to keep outside
-- the database and check later with verify_audit_chain(seq, hash). No row before the first seal.
CREATE FUNCTION vetassist_auth.audit_chain_head() RETURNS TABLE (seq bigint, hash bytea, sealed_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    (SELECT s.seq, s.hash, s.sealed_at FROM vetassist_auth.audit_seals s ORDER BY s.seq DESC LIMIT 1)
    UNION ALL
    (SELECT st.checkpoint_seq, st.checkpoint_hash, st.checkpoint_at FROM vetassist_auth.audit_seal_state st
     WHERE st.checkpoint_seq > 0 AND NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_seals))
$$;
COMMENT ON FUNCTION vetassist_auth.audit_chain_head() IS
    'The head of the audit chain (seq, hash, when sealed): an anchor to keep outside the database for verify_audit_chain(seq, hash).';

-- Who may call the functions of this file (any other function of the extension: no role,
-- sql/grants.sql).
GRANT EXECUTE ON FUNCTION vetassist_auth.audit_event(text, text, text, jsonb, uuid) TO vetassist_app, vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.audit_chain_head() TO vetassist_admin, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.enable_row_audit(regclass, text[], text[]) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.disable_row_audit(regclass) TO vetassist_admin;
