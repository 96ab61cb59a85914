-- vetassist_auth 0.1.4 -> 0.1.5
-- Scale-out on Citus: distribute() (sql/citus.sql) and the functions around it. Every
-- per-veteran statement is now keyed by the user id, a request that names only its JWT id finds
-- its user through the new table session_routes, and values are sealed and opened in the
-- functions' own expressions, never inside a statement Citus could run on a worker.
\echo Use "ALTER EXTENSION vetassist_auth UPDATE TO '0.1.5'" to load this file. \quit

CREATE TABLE vetassist_auth.session_routes (
    jwt_id   text PRIMARY KEY,
    user_id  uuid NOT NULL
);
COMMENT ON TABLE vetassist_auth.session_routes IS
    'The user of each session''s JWT id: how a request that names only its JWT finds its user''s rows (on Citus, its shard).';
INSERT INTO vetassist_auth.session_routes (jwt_id, user_id) SELECT s.jwt_id, s.user_id FROM vetassist_auth.sessions s;
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.session_routes', '');
REVOKE ALL ON vetassist_auth.session_routes FROM PUBLIC;

-- Functions new or changed since 0.1.4, as in this release's install script
-- (scripts/upgrade-functions.py prints them).
CREATE FUNCTION vetassist_auth.distributed() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN false;
    END IF;
    RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                   WHERE p.logicalrelid = 'vetassist_auth.sessions'::pg_catalog.regclass);
END
$$;

CREATE FUNCTION vetassist_auth.citus_coordinator() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT vetassist_auth.distributed() THEN
        RETURN false;
    END IF;
    RETURN pg_catalog.citus_is_coordinator();
END
$$;

CREATE FUNCTION vetassist_auth.distribute(shard_count integer DEFAULT NULL)
RETURNS SETOF regclass
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    per_user text[] := ARRAY['va_tokens', 'sessions', 'session_activity', 'session_events',
                             'mfa_settings', 'mfa_backup_codes', 'trusted_devices'];
    t text;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'vetassist_auth: Citus is not installed in this database' USING ERRCODE = '55000',
            HINT = 'shared_preload_libraries = ''citus,vetassist_auth'', then CREATE EXTENSION citus before CREATE EXTENSION vetassist_auth.';
    END IF;
    IF NOT citus_is_coordinator() THEN
        RAISE EXCEPTION 'vetassist_auth: distribute() runs on the Citus coordinator' USING ERRCODE = '55000';
    END IF;
    IF vetassist_auth.distributed() THEN
        RETURN;
    END IF;
    IF shard_count IS NOT NULL THEN
        PERFORM set_config('citus.shard_count', shard_count::text, true);
    END IF;
    -- Shard triggers (row audit of distributed tables) fire on the workers.
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    -- Keys: the restore guard's trigger reads the whole table, which a reference table's
    -- placements cannot do from a shard; Citus clusters are restored as a whole (README).
    DROP TRIGGER IF EXISTS refuse_foreign_keys ON vetassist_auth.keys;
    PERFORM create_reference_table('vetassist_auth.keys');

    ALTER TABLE vetassist_auth.users DROP CONSTRAINT users_va_icn_hash_key;
    CREATE INDEX users_by_va_icn_hash ON vetassist_auth.users (va_icn_hash);
    ALTER TABLE vetassist_auth.session_activity DROP CONSTRAINT session_activity_session_id_fkey;
    -- Citus cannot SET NULL a column of a foreign key that holds the distribution column: a
    -- session event keeps its session id after the session is purged.
    ALTER TABLE vetassist_auth.session_events DROP CONSTRAINT session_events_session_id_fkey;
    ALTER TABLE vetassist_auth.sessions
        DROP CONSTRAINT sessions_pkey, ADD PRIMARY KEY (user_id, id),
        DROP CONSTRAINT sessions_jwt_id_key, ADD UNIQUE (user_id, jwt_id);
    ALTER TABLE vetassist_auth.va_tokens DROP CONSTRAINT va_tokens_pkey, ADD PRIMARY KEY (user_id, id);
    ALTER TABLE vetassist_auth.session_activity
        DROP CONSTRAINT session_activity_pkey, ADD PRIMARY KEY (user_id, id),
        ADD FOREIGN KEY (user_id, session_id) REFERENCES vetassist_auth.sessions (user_id, id) ON DELETE CASCADE;
    ALTER TABLE vetassist_auth.session_events DROP CONSTRAINT session_events_pkey, ADD PRIMARY KEY (user_id, id);
    ALTER TABLE vetassist_auth.mfa_backup_codes DROP CONSTRAINT mfa_backup_codes_pkey, ADD PRIMARY KEY (user_id, id);
    ALTER TABLE vetassist_auth.trusted_devices DROP CONSTRAINT trusted_devices_pkey, ADD PRIMARY KEY (user_id, id);

    PERFORM create_distributed_table('vetassist_auth.users', 'id');
    RETURN NEXT 'vetassist_auth.users'::regclass;
    FOREACH t IN ARRAY per_user LOOP
        PERFORM create_distributed_table(format('vetassist_auth.%I', t), 'user_id',
                                         colocate_with => 'vetassist_auth.users');
        RETURN NEXT format('vetassist_auth.%I', t)::regclass;
    END LOOP;
    PERFORM create_distributed_table('vetassist_auth.session_routes', 'jwt_id');
    RETURN NEXT 'vetassist_auth.session_routes'::regclass;
    RETURN NEXT 'vetassist_auth.keys'::regclass;
    PERFORM vetassist_auth.write_audit('key', 'tables_distributed', 'success', NULL, NULL, NULL,
        jsonb_build_object('shard_count', current_setting('citus.shard_count')::integer,
                           'workers', (SELECT count(*) FROM citus_get_active_worker_nodes())));
END
$$;

COMMENT ON FUNCTION vetassist_auth.distribute(integer) IS
    'On a Citus coordinator: distributes the extension''s tables (per-veteran tables co-located by user id, keys replicated to every node); idempotent.';

CREATE FUNCTION vetassist_auth.veteran_placement(user_id uuid)
RETURNS TABLE (shard_id bigint, node text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT vetassist_auth.distributed() THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT s.shardid, p.nodename || ':' || p.nodeport
    FROM pg_dist_shard s JOIN pg_dist_shard_placement p USING (shardid)
    WHERE s.shardid = get_shard_id_for_distribution_column('vetassist_auth.users', user_id);
END
$$;

COMMENT ON FUNCTION vetassist_auth.veteran_placement(uuid) IS
    'On a distributed installation: the shard that holds a veteran''s rows and the worker it is on.';

CREATE FUNCTION vetassist_auth.expire_distributed_sessions(ts timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    retained_since timestamptz := ts - vetassist_auth.session_retention();
    expired integer;
    purged integer;
    gone_jwts text[];
BEGIN
    IF NOT citus_is_coordinator() THEN
        RETURN 0;
    END IF;
    WITH ended AS (
        UPDATE vetassist_auth.sessions s
        SET status = 'EXPIRED', ended_at = ts,
            end_reason = CASE WHEN s.expires_at <= ts THEN 'absolute_timeout' ELSE 'idle_timeout' END
        WHERE s.status = 'ACTIVE' AND s.live_until <= ts
        RETURNING s.id, s.user_id, s.end_reason
    )
    INSERT INTO vetassist_auth.audit_log
        (actor_user_id, subject_user_id, category, event_type, outcome, target_table, target_id, details)
    SELECT NULL, ended.user_id, 'session', 'session_expired', 'success', 'sessions', ended.id::text,
           jsonb_build_object('reason', ended.end_reason)
    FROM ended;
    GET DIAGNOSTICS expired = ROW_COUNT;

    WITH gone AS (
        DELETE FROM vetassist_auth.sessions s WHERE s.ended_at < retained_since RETURNING s.jwt_id
    )
    SELECT array_agg(gone.jwt_id) INTO gone_jwts FROM gone;
    purged := coalesce(cardinality(gone_jwts), 0);
    IF purged > 0 THEN
        DELETE FROM vetassist_auth.session_routes r WHERE r.jwt_id = ANY (gone_jwts);
        PERFORM vetassist_auth.write_audit('session', 'sessions_purged', 'success', NULL, 'sessions', NULL,
                                           jsonb_build_object('count', purged));
    END IF;
    RETURN expired + purged;
END
$$;

CREATE FUNCTION vetassist_auth.refresh_distributed_encrypt_counts() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    k record;
    counted bigint;
    mirrored integer := 0;
BEGIN
    FOR k IN SELECT key_id, purpose, counter_base, encrypt_count FROM vetassist_auth.keys
             WHERE status = 'active' AND purpose IN ('phi', 'token', 'mfa') LOOP
        EXECUTE format('SELECT CASE WHEN is_called THEN (last_value - $1) * 128 END FROM vetassist_auth.%I',
                       k.purpose || '_encryptions_seq')
            INTO counted USING k.counter_base;
        IF counted > k.encrypt_count THEN
            UPDATE vetassist_auth.keys SET encrypt_count = counted
            WHERE key_id = k.key_id AND encrypt_count < counted;
            mirrored := mirrored + 1;
        END IF;
    END LOOP;
    RETURN mirrored;
END
$$;

CREATE FUNCTION vetassist_auth.on_workers(command text)
RETURNS TABLE (node text, success boolean, result text)
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT vetassist_auth.citus_coordinator() THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT w.nodename || ':' || w.nodeport, w.success, w.result
                 FROM run_command_on_workers(command) w ORDER BY w.nodename, w.nodeport;
END
$$;

CREATE FUNCTION vetassist_auth.sum_on_workers(command text, done text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    w record;
    total bigint := 0;
BEGIN
    FOR w IN SELECT * FROM vetassist_auth.on_workers(command) LOOP
        IF w.success THEN
            total := total + w.result::bigint;
        ELSE
            RAISE WARNING 'vetassist_auth: the audit log of worker % was not %', w.node, done USING DETAIL = w.result;
        END IF;
    END LOOP;
    RETURN total;
END
$$;

CREATE FUNCTION vetassist_auth.seal_worker_audit_logs(max_rows integer DEFAULT 10000) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT vetassist_auth.sum_on_workers(format('SELECT vetassist_auth.seal_audit_log(%s)', max_rows), 'sealed')
$$;

CREATE FUNCTION vetassist_auth.worker_audit_chains()
RETURNS TABLE (node text, ok boolean, checked bigint, first_bad_seq bigint, problem text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT w.node,
           coalesce((v ->> 'ok')::boolean, false),
           coalesce((v ->> 'checked')::bigint, 0),
           (v ->> 'first_bad_seq')::bigint,
           CASE WHEN w.success THEN v ->> 'problem' ELSE 'the worker could not be verified: ' || w.result END
    FROM vetassist_auth.on_workers(
             'SELECT pg_catalog.row_to_json(v) FROM vetassist_auth.verify_audit_chain() v') WITH ORDINALITY w
    LEFT JOIN LATERAL (SELECT CASE WHEN w.success THEN w.result::jsonb END AS v) r ON true
    ORDER BY w.ordinality;
END
$$;

CREATE FUNCTION vetassist_auth.audit_chain_heads()
RETURNS TABLE (node text, seq bigint, hash bytea, sealed_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w record;
    h jsonb;
BEGIN
    RETURN QUERY SELECT 'coordinator'::text, c.seq, c.hash, c.sealed_at FROM vetassist_auth.audit_chain_head() c;
    FOR w IN SELECT * FROM vetassist_auth.on_workers(
                 'SELECT pg_catalog.json_build_object(''seq'', h.seq, ''hash'', pg_catalog.encode(h.hash, ''hex''), '
                 '''sealed_at'', h.sealed_at) FROM vetassist_auth.audit_chain_head() h') LOOP
        node := w.node;
        IF NOT w.success THEN
            RAISE WARNING 'vetassist_auth: worker % could not give its audit chain head', node USING DETAIL = w.result;
            seq := NULL; hash := NULL; sealed_at := NULL;
            RETURN NEXT;
        ELSIF w.result <> '' THEN
            h := w.result::jsonb;
            seq := (h ->> 'seq')::bigint;
            hash := decode(h ->> 'hash', 'hex');
            sealed_at := (h ->> 'sealed_at')::timestamptz;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

COMMENT ON FUNCTION vetassist_auth.audit_chain_heads() IS
    'The head (seq, hash) of the audit chain of this node and, on a Citus coordinator, of every worker: anchors to keep outside the database.';

CREATE FUNCTION vetassist_auth.worker_audit_seal_keys()
RETURNS TABLE (key_id integer, node text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w record;
BEGIN
    FOR w IN SELECT * FROM vetassist_auth.on_workers(
                 'SELECT pg_catalog.string_agg(DISTINCT key_id::text, '','') FROM vetassist_auth.audit_seals') LOOP
        IF NOT w.success THEN
            RAISE EXCEPTION 'vetassist_auth: worker % could not say which audit keys its seals use', w.node
                USING ERRCODE = '55000', DETAIL = w.result;
        END IF;
        RETURN QUERY SELECT k::integer, w.node FROM unnest(string_to_array(nullif(w.result, ''), ',')) k;
    END LOOP;
END
$$;

CREATE FUNCTION vetassist_auth.purge_worker_audit_logs(older_than interval) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT vetassist_auth.sum_on_workers(format('SELECT vetassist_auth.purge_audit_log(%L::interval)', older_than),
                                         'purged')
$$;

CREATE FUNCTION vetassist_auth.verify_audit_chain_at(node text, anchor_seq bigint, anchor_hash bytea)
RETURNS TABLE (ok boolean, checked bigint, first_bad_seq bigint, problem text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w record;
    v jsonb;
BEGIN
    IF node = 'coordinator' THEN
        RETURN QUERY SELECT * FROM vetassist_auth.verify_audit_chain(anchor_seq, anchor_hash);
        RETURN;
    END IF;
    FOR w IN SELECT * FROM vetassist_auth.on_workers(
                 format('SELECT pg_catalog.row_to_json(v) FROM vetassist_auth.verify_audit_chain(%s, %L::bytea) v',
                        coalesce(anchor_seq, 0), coalesce(anchor_hash, ''::bytea))) r
             WHERE r.node = verify_audit_chain_at.node LOOP
        IF NOT w.success THEN
            RETURN QUERY SELECT false, 0::bigint, anchor_seq, 'the worker could not be verified: ' || w.result;
            RETURN;
        END IF;
        v := w.result::jsonb;
        RETURN QUERY SELECT (v ->> 'ok')::boolean, (v ->> 'checked')::bigint, (v ->> 'first_bad_seq')::bigint,
                            v ->> 'problem';
        RETURN;
    END LOOP;
    RAISE EXCEPTION 'vetassist_auth: no node % in this cluster', quote_literal(node) USING ERRCODE = '22023',
        HINT = 'Nodes are named as in audit_chain_heads(): coordinator, or host:port of a worker.';
END
$$;

COMMENT ON FUNCTION vetassist_auth.verify_audit_chain_at(text, bigint, bytea) IS
    'Checks one node''s anchor (a row of audit_chain_heads()) on that node, as verify_audit_chain(seq, hash) does there.';

CREATE OR REPLACE FUNCTION vetassist_auth.refresh_encrypt_counts() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    mirrored_keys integer;
BEGIN
    IF vetassist_auth.distributed() THEN
        RETURN vetassist_auth.refresh_distributed_encrypt_counts();
    END IF;
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
    SELECT count(*)::integer INTO mirrored_keys FROM mirrored;
    RETURN mirrored_keys;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.reencrypt(batch_size integer DEFAULT 1000) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t     record;
    moved bigint := 0;
    n     bigint;
    distributed boolean := vetassist_auth.distributed();
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'vetassist_auth: batch_size must be a positive integer' USING ERRCODE = '22023';
    END IF;

    -- One statement per table of protected_columns(): its rows with an envelope, or a hash of
    -- one, under a key that is not the active one, and whose every envelope opens (a damaged,
    -- foreign or retired-key value stays). Envelopes are sealed again and hashes computed again
    -- from the envelope they hash, inside reseal and rehash: no plaintext passes through here.
    FOR t IN
        WITH c AS (
            SELECT p.*,
                   CASE WHEN p.context_name IS NOT NULL
                        THEN format('%L || t.%I', p.context_name || ':', p.context_id) END AS context,
                   CASE WHEN p.context_name IS NOT NULL OR p.hash_of IS NOT NULL
                        THEN vetassist_auth.active_key_id(p.purpose) END AS active_key
            FROM vetassist_auth.protected_columns() WITH ORDINALITY p
        )
        SELECT c.table_name, min(c.row_id) AS row_id,
               string_agg(format('vetassist_auth.%s(t.%I) <> %s',
                                 CASE WHEN c.purpose = 'hash' THEN 'hash_key_id' ELSE 'envelope_key_id' END,
                                 c.column_name, c.active_key), ' OR ' ORDER BY c.ordinality) AS stale,
               coalesce(string_agg(format('vetassist_auth.opens(t.%I, %s, %L)', c.column_name, c.context, c.purpose),
                                   ' AND ' ORDER BY c.ordinality) FILTER (WHERE c.context IS NOT NULL), 'true') AS opens,
               string_agg(format('%I = %s', c.column_name, c.sealed_again), ', ' ORDER BY c.ordinality) AS assignments,
               -- Citus: the values as read, sealed again, and the write-back (below).
               string_agg(format('t.%I AS %I, %s AS %I', c.column_name, 'old_' || c.column_name,
                                 c.sealed_again, 'new_' || c.column_name), ', ' ORDER BY c.ordinality) AS resealed,
               string_agg(format('%I = b.%I', c.column_name, 'new_' || c.column_name), ', ' ORDER BY c.ordinality) AS write_back,
               string_agg(format('t.%I IS NOT DISTINCT FROM b.%I', c.column_name, 'old_' || c.column_name),
                          ' AND ' ORDER BY c.ordinality) AS unchanged
        FROM (SELECT c.*,
                     CASE WHEN c.context IS NOT NULL
                          THEN format('vetassist_auth.reseal(t.%I, %s, %L)', c.column_name, c.context, c.purpose)
                          ELSE format('vetassist_auth.rehash(t.%I, %s, %L, %L)', source.column_name,
                                      source.context, source.purpose, c.hash_field)
                     END AS sealed_again
              FROM c LEFT JOIN c source ON source.table_name = c.table_name AND source.column_name = c.hash_of) c
        WHERE c.active_key IS NOT NULL
        GROUP BY c.table_name
        ORDER BY min(c.ordinality)
    LOOP
        IF distributed THEN
            moved := moved + vetassist_auth.reencrypt_distributed(t.table_name, t.row_id, t.stale, t.opens,
                                                                  t.resealed, t.write_back, t.unchanged, batch_size);
            CONTINUE;
        END IF;
        EXECUTE format('WITH batch AS (SELECT t.%1$I FROM vetassist_auth.%2$I t WHERE (%3$s) AND %4$s '
                       'LIMIT $1 FOR UPDATE SKIP LOCKED) '
                       'UPDATE vetassist_auth.%2$I t SET %5$s FROM batch WHERE t.%1$I = batch.%1$I',
                       t.row_id, t.table_name, t.stale, t.opens, t.assignments)
            USING batch_size;
        GET DIAGNOSTICS n = ROW_COUNT;
        moved := moved + n;
    END LOOP;

    IF moved = 0 THEN
        PERFORM vetassist_auth.retire_unused_keys();
        -- Nothing moved, yet ciphertexts remain under old keys: they do not open (retired key,
        -- damaged, or restored from another database), or another transaction holds their row.
        SELECT count(*) INTO n FROM vetassist_auth.key_usage k JOIN vetassist_auth.keys USING (key_id)
        WHERE keys.purpose IN ('phi', 'token', 'mfa') AND keys.status <> 'active';
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

CREATE FUNCTION vetassist_auth.reencrypt_distributed(table_name text, row_id text, stale text, opens text,
                                                     resealed text, write_back text, unchanged text,
                                                     batch_size integer)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    -- The column distribute() distributed the table by, as Citus records it.
    dist text := (SELECT pg_catalog.column_to_column_name(p.logicalrelid, p.partkey)
                  FROM pg_catalog.pg_dist_partition p
                  WHERE p.logicalrelid = pg_catalog.format('vetassist_auth.%I', table_name)::pg_catalog.regclass);
    n bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM (SELECT * FROM vetassist_auth.%1$I t WHERE (%2$s) LIMIT %3$s) t WHERE %4$s',
                   table_name, stale, batch_size, opens)
        INTO n;
    IF n = 0 THEN
        RETURN 0;
    END IF;
    EXECUTE format('CREATE TEMPORARY TABLE reencrypt_batch ON COMMIT DROP AS '
                   'SELECT t.%1$I AS dist_value, t.%2$I AS row_value, %3$s '
                   'FROM (SELECT * FROM vetassist_auth.%4$I t WHERE (%5$s) LIMIT %6$s) t WHERE %7$s',
                   dist, row_id, resealed, table_name, stale, batch_size, opens);
    EXECUTE format('UPDATE vetassist_auth.%1$I t SET %2$s FROM reencrypt_batch b '
                   'WHERE t.%3$I = b.dist_value AND t.%4$I = b.row_value AND %5$s',
                   table_name, write_back, dist, row_id, unchanged);
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE reencrypt_batch;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.verify_installation()
RETURNS TABLE (check_name text, ok boolean, detail text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
    p text;
    missing text;
BEGIN
    FOREACH t IN ARRAY ARRAY['keys', 'users', 'va_tokens', 'sessions', 'session_routes', 'session_activity', 'session_events',
                             'mfa_settings', 'mfa_backup_codes', 'trusted_devices', 'audit_log', 'audit_seals',
                             'audit_seal_state'] LOOP
        check_name := 'table ' || t;
        ok := to_regclass('vetassist_auth.' || t) IS NOT NULL;
        detail := CASE WHEN ok THEN 'present' ELSE 'missing' END;
        RETURN NEXT;
        IF ok THEN
            check_name := 'backup ' || t;
            ok := EXISTS (SELECT 1 FROM pg_extension e
                          WHERE e.extname = 'vetassist_auth'
                            AND ('vetassist_auth.' || t)::regclass::oid = ANY (e.extconfig));
            detail := CASE WHEN ok THEN 'registered with pg_extension_config_dump' ELSE 'not dumped by pg_dump' END;
            RETURN NEXT;
        END IF;
    END LOOP;

    -- distribute() trades the unique indexes Citus cannot keep for plain ones (citus.sql).
    FOREACH t IN ARRAY ARRAY['keys_one_active_per_purpose', 'users_email_hash', 'va_tokens_user_id_key',
                             'va_tokens_expiry', 'session_routes_pkey', 'sessions_live_by_expiry', 'sessions_by_user',
                             'audit_log_by_subject', 'audit_seals_audit_id_key']
                       || CASE WHEN vetassist_auth.distributed() THEN ARRAY['users_by_va_icn_hash']
                               ELSE ARRAY['users_va_icn_hash_key', 'sessions_jwt_id_key'] END LOOP
        check_name := 'index ' || t;
        ok := to_regclass('vetassist_auth.' || t) IS NOT NULL;
        detail := CASE WHEN ok THEN 'present' ELSE 'missing' END;
        RETURN NEXT;
    END LOOP;

    IF vetassist_auth.citus_coordinator() THEN
        -- Every worker answers and runs this same version (each verifies its own audit chain).
        check_name := 'citus workers';
        SELECT bool_and(w.success AND w.result = e.extversion),
               string_agg(w.node || ' ' || w.result, ', ' ORDER BY w.ordinality)
        INTO ok, detail
        FROM vetassist_auth.on_workers('SELECT extversion FROM pg_catalog.pg_extension WHERE extname = ''vetassist_auth''')
                 WITH ORDINALITY w,
             pg_extension e
        WHERE e.extname = 'vetassist_auth';
        ok := coalesce(ok, false);
        detail := coalesce(detail, 'no workers');
        RETURN NEXT;
    END IF;

    FOREACH t IN ARRAY ARRAY['vetassist_app', 'vetassist_auditor', 'vetassist_admin'] LOOP
        check_name := 'role ' || t;
        ok := EXISTS (SELECT 1 FROM pg_roles WHERE rolname = t);
        detail := CASE WHEN ok THEN 'present' ELSE 'missing' END;
        RETURN NEXT;
    END LOOP;

    check_name := 'grants: no function executable by PUBLIC';
    SELECT string_agg(f.oid::regprocedure::text, ', ') INTO missing
    FROM pg_proc f
    WHERE f.pronamespace = 'vetassist_auth'::regnamespace
      AND has_function_privilege('public', f.oid, 'EXECUTE');
    ok := missing IS NULL;
    detail := coalesce('executable by PUBLIC: ' || missing, 'none');
    RETURN NEXT;

    -- But the crypto hot path: Rust functions that run no SQL by name and pin the path around
    -- the key reads they cause (docs/ARCHITECTURE.md, "The hot path and search_path").
    check_name := 'grants: SECURITY DEFINER functions pin search_path';
    SELECT string_agg(f.oid::regprocedure::text, ', ') INTO missing
    FROM pg_proc f
    WHERE f.pronamespace = 'vetassist_auth'::regnamespace AND f.prosecdef
      AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (f.proconfig), false)
      AND NOT (f.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
               AND f.proname IN ('encrypt', 'decrypt', 'encrypt_text', 'decrypt_text', 'field_hash',
                                 'field_hashes', 'opens', 'open_phi', 'open_phi_text', 'seal_phi_text',
                                 'encrypt_token', 'decrypt_token', 'encrypt_mfa_secret', 'open_mfa_secret'));
    ok := missing IS NULL;
    detail := coalesce('unpinned: ' || missing, 'all pinned to pg_catalog, pg_temp (the Rust crypto functions pin it around their key reads)');
    RETURN NEXT;

    check_name := 'grants: vetassist_app has no direct table access';
    SELECT string_agg(c.relname, ', ') INTO missing
    FROM pg_class c
    WHERE c.relnamespace = 'vetassist_auth'::regnamespace AND c.relkind IN ('r', 'v', 'p')
      AND (has_table_privilege('vetassist_app', c.oid, 'SELECT')
           OR has_table_privilege('vetassist_app', c.oid, 'INSERT')
           OR has_table_privilege('vetassist_app', c.oid, 'UPDATE')
           OR has_table_privilege('vetassist_app', c.oid, 'DELETE'));
    ok := missing IS NULL;
    detail := coalesce('readable or writable: ' || missing, 'none');
    RETURN NEXT;

    check_name := 'audit: append-only triggers';
    SELECT string_agg(tab, ', ') INTO missing FROM unnest(ARRAY['audit_log', 'audit_seals']) tab
    WHERE (SELECT count(*) FROM pg_trigger g WHERE g.tgrelid = ('vetassist_auth.' || tab)::regclass
             AND g.tgname IN ('append_only', 'append_only_truncate') AND g.tgenabled <> 'D') < 2;
    ok := missing IS NULL;
    detail := coalesce('missing or disabled on: ' || missing, 'audit_log and audit_seals refuse UPDATE, DELETE, TRUNCATE');
    RETURN NEXT;

    check_name := 'audit: row audit on the extension''s tables';
    SELECT string_agg(tab, ', ') INTO missing
    FROM unnest(ARRAY['users', 'sessions', 'mfa_settings', 'mfa_backup_codes', 'trusted_devices', 'keys']) tab
    WHERE NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = ('vetassist_auth.' || tab)::regclass
                        AND g.tgname = 'vetassist_row_audit' AND g.tgenabled IN ('O', 'A'));
    ok := missing IS NULL;
    detail := coalesce('not audited: ' || missing, 'all audited');
    RETURN NEXT;

    -- Tables an administrator put under row audit (enable_row_audit's audit rows, the latest
    -- per table) that no longer have a row-audit trigger that fires: disabled, replica-only,
    -- renamed, replaced or dropped.
    check_name := 'audit: row audit enabled everywhere it was enabled';
    SELECT string_agg(r.target_table, ', ' ORDER BY r.target_table) INTO missing
    FROM (SELECT DISTINCT ON (a.target_table) a.target_table, a.event_type
          FROM vetassist_auth.audit_log a
          WHERE a.category = 'audit' AND a.event_type IN ('row_audit_enabled', 'row_audit_disabled')
          ORDER BY a.target_table, a.id DESC) r
    WHERE r.event_type = 'row_audit_enabled'
      AND NOT coalesce(vetassist_auth.row_audit_fires(to_regclass(r.target_table)), false);
    ok := missing IS NULL;
    detail := coalesce('not firing (disabled, replica-only, renamed, replaced or dropped) on: ' || missing,
                       'every table put under row audit still has it');
    RETURN NEXT;

    check_name := 'logs: every channel in force can be redacted';
    detail := vetassist_auth.unredactable_log_channels();
    ok := detail IS NULL;
    detail := coalesce(detail, 'statements of the extension reach the log with their literals masked');
    RETURN NEXT;

    check_name := 'audit: disclosures and failed authentications survive a rollback';
    detail := vetassist_auth.durable_audit_problem();
    ok := detail IS NULL;
    detail := coalesce(detail, 'recorded by the audit recorder, committed before the caller goes on');
    RETURN NEXT;

    FOREACH p IN ARRAY ARRAY['token', 'phi', 'hash', 'audit', 'mfa'] LOOP
        check_name := 'key ' || p;
        BEGIN
            detail := 'active key ' || vetassist_auth.active_key_id(p) || ' unwraps';
            ok := true;
        EXCEPTION WHEN OTHERS THEN
            ok := false;
            detail := SQLSTATE || ': ' || SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.upsert_va_user(
    va_icn text, veteran_status text, email text, first_name text, last_name text)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    icn       text := upper(regexp_replace(coalesce(va_icn, ''), '\s', '', 'g'));
    icn_hash  bytea;
    email_h   bytea;
    first_h   bytea;
    last_h    bytea;
    icn_hashes bytea[];
    sealed    bytea[];
    signed_in timestamptz := now();  -- a variable: Citus allows no function in an UPDATE's CASE
    uid       uuid;
    old       vetassist_auth.users;
    changed   text[] := '{}';
BEGIN
    IF icn !~ '^[0-9A-Z]{1,64}$' THEN
        RAISE EXCEPTION 'vetassist_auth: va_icn must be 1 to 64 letters and digits' USING ERRCODE = '22023';
    END IF;
    email := vetassist_auth.checked_phi(email, 'email', 320);
    IF email IS NOT NULL AND position('@' IN email) < 2 THEN
        RAISE EXCEPTION 'vetassist_auth: email is not an e-mail address' USING ERRCODE = '22023';
    END IF;
    first_name := vetassist_auth.checked_phi(first_name, 'first_name', 200);
    last_name := vetassist_auth.checked_phi(last_name, 'last_name', 200);
    veteran_status := vetassist_auth.checked_phi(veteran_status, 'veteran_status', 64);
    -- Each hash once: it is stored on insert, and decides what changed on update.
    icn_hash := vetassist_auth.field_hash(icn, 'va_icn');
    email_h := vetassist_auth.field_hash(email, 'email');
    first_h := vetassist_auth.field_hash(first_name, 'first_name');
    last_h := vetassist_auth.field_hash(last_name, 'last_name');

    FOR attempt IN 1..2 LOOP
        -- Found by its hash, then locked by its id: on Citus the hash is looked up on every
        -- shard (an index probe each), and only the account's own shard is locked.
        icn_hashes := vetassist_auth.field_hashes(icn, 'va_icn');
        uid := (SELECT u.id FROM vetassist_auth.users u WHERE u.va_icn_hash = ANY (icn_hashes) LIMIT 1);
        IF uid IS NOT NULL THEN
            SELECT * INTO old FROM vetassist_auth.users u WHERE u.id = uid FOR UPDATE;
            EXIT WHEN FOUND;
        END IF;
        -- A transaction creating the same account under another hash key (a rotation between
        -- the two) would not conflict in the unique index: wait for it and look again.
        CONTINUE WHEN vetassist_auth.claim_new_account(icn);
        uid := gen_random_uuid();
        INSERT INTO vetassist_auth.users AS u
            (id, va_icn_encrypted, va_icn_hash, va_veteran_status,
             email_encrypted, email_hash, first_name_encrypted, first_name_hash,
             last_name_encrypted, last_name_hash, last_login_at)
        VALUES (uid, vetassist_auth.seal_phi_text(icn, 'users.va_icn:' || uid), icn_hash, veteran_status,
                vetassist_auth.seal_phi_text(email, 'users.email:' || uid), email_h,
                vetassist_auth.seal_phi_text(first_name, 'users.first_name:' || uid), first_h,
                vetassist_auth.seal_phi_text(last_name, 'users.last_name:' || uid), last_h,
                now())
        -- On one node the unique index on va_icn_hash; on Citus, which cannot keep a unique index
        -- without the distribution column, the claim above alone keeps one account per ICN.
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            PERFORM vetassist_auth.write_audit('identity', 'user_created', 'success', uid, 'users', uid::text,
                jsonb_build_object('fields', array_remove(ARRAY['va_icn',
                    CASE WHEN email IS NOT NULL THEN 'email' END,
                    CASE WHEN first_name IS NOT NULL THEN 'first_name' END,
                    CASE WHEN last_name IS NOT NULL THEN 'last_name' END], NULL)));
            RETURN uid;
        END IF;
        -- Another transaction created the account at the same moment: update that one.
    END LOOP;

    uid := old.id;
    IF uid IS NULL THEN  -- created and deleted again while we looked: let the caller retry
        RAISE EXCEPTION 'vetassist_auth: concurrent change to this account, retry' USING ERRCODE = '40001';
    END IF;
    IF NOT old.is_active THEN
        -- A refused sign-in is recorded whatever becomes of the caller's transaction.
        PERFORM vetassist_auth.write_audit_durably('identity', 'sign_in_refused', 'denied', uid, 'users', uid::text,
                                                   '{"reason": "account_deactivated"}');
        RAISE EXCEPTION 'vetassist_auth: this account is deactivated' USING ERRCODE = '28000';
    END IF;
    -- Re-encrypt only what changed, judged by the field hashes; NULL keeps the stored value.
    IF email IS NOT NULL AND old.email_hash IS DISTINCT FROM email_h THEN
        changed := changed || 'email'::text;
    END IF;
    IF first_name IS NOT NULL AND old.first_name_hash IS DISTINCT FROM first_h THEN
        changed := changed || 'first_name'::text;
    END IF;
    IF last_name IS NOT NULL AND old.last_name_hash IS DISTINCT FROM last_h THEN
        changed := changed || 'last_name'::text;
    END IF;
    IF veteran_status IS NOT NULL AND old.va_veteran_status IS DISTINCT FROM veteran_status THEN
        changed := changed || 'va_veteran_status'::text;
    END IF;
    -- Sealed here, not in the UPDATE: on Citus a statement's expressions may run on a worker,
    -- and values are encrypted and decrypted on the coordinator only.
    sealed := ARRAY[
        CASE WHEN 'email' = ANY (changed) THEN vetassist_auth.seal_phi_text(email, 'users.email:' || uid) END,
        CASE WHEN 'first_name' = ANY (changed) THEN vetassist_auth.seal_phi_text(first_name, 'users.first_name:' || uid) END,
        CASE WHEN 'last_name' = ANY (changed) THEN vetassist_auth.seal_phi_text(last_name, 'users.last_name:' || uid) END];
    UPDATE vetassist_auth.users u SET
        email_encrypted = coalesce(sealed[1], u.email_encrypted),
        email_hash = CASE WHEN 'email' = ANY (changed) THEN email_h ELSE u.email_hash END,
        first_name_encrypted = coalesce(sealed[2], u.first_name_encrypted),
        first_name_hash = CASE WHEN 'first_name' = ANY (changed) THEN first_h ELSE u.first_name_hash END,
        last_name_encrypted = coalesce(sealed[3], u.last_name_encrypted),
        last_name_hash = CASE WHEN 'last_name' = ANY (changed) THEN last_h ELSE u.last_name_hash END,
        va_veteran_status = coalesce(veteran_status, u.va_veteran_status),
        updated_at = CASE WHEN cardinality(changed) > 0 THEN signed_in ELSE u.updated_at END,
        last_login_at = signed_in
    WHERE u.id = uid;
    PERFORM vetassist_auth.write_audit('identity', 'user_signed_in', 'success', uid, 'users', uid::text,
                                       jsonb_build_object('changed_fields', changed));
    RETURN uid;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.find_user_by_icn(va_icn text) RETURNS uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hashes bytea[] := vetassist_auth.field_hashes(va_icn, 'va_icn');
BEGIN
    RETURN (SELECT u.id FROM vetassist_auth.users u WHERE u.va_icn_hash = ANY (hashes) LIMIT 1);
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.find_users_by_email(email text) RETURNS SETOF uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hashes bytea[] := vetassist_auth.field_hashes(email, 'email');
BEGIN
    RETURN QUERY SELECT u.id FROM vetassist_auth.users u WHERE u.email_hash = ANY (hashes)
                 ORDER BY u.created_at;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.user_profile(user_id uuid)
RETURNS TABLE (id uuid, va_icn text, veteran_status text, email text, first_name text, last_name text,
               is_active boolean, mfa_enabled boolean, created_at timestamptz, last_login_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    u vetassist_auth.users;
    mfa_enabled boolean;
BEGIN
    PERFORM vetassist_auth.require_user(user_id);
    -- Disclosure of PHI: recorded, beyond the reach of the caller's ROLLBACK, before it is returned.
    PERFORM vetassist_auth.write_audit_durably('phi_access', 'user_profile_read', 'success', user_id, 'users', user_id::text,
                                               '{"fields": ["va_icn", "email", "first_name", "last_name"]}');
    -- The row is read first and opened here: on Citus a statement's expressions may run on a
    -- worker, and values are decrypted on the coordinator only.
    SELECT * INTO u FROM vetassist_auth.users x WHERE x.id = user_profile.user_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    mfa_enabled := coalesce((SELECT m.totp_enabled FROM vetassist_auth.mfa_settings m
                             WHERE m.user_id = user_profile.user_id), false);
    RETURN QUERY
    SELECT u.id,
           vetassist_auth.open_phi_text(u.va_icn_encrypted, 'users.va_icn:' || u.id),
           u.va_veteran_status,
           vetassist_auth.open_phi_text(u.email_encrypted, 'users.email:' || u.id),
           vetassist_auth.open_phi_text(u.first_name_encrypted, 'users.first_name:' || u.id),
           vetassist_auth.open_phi_text(u.last_name_encrypted, 'users.last_name:' || u.id),
           u.is_active, mfa_enabled, u.created_at, u.last_login_at;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.store_va_tokens(
    user_id uuid, access_token text, refresh_token text, expires_at timestamptz, scope text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_generation integer;
    active boolean;
BEGIN
    IF access_token IS NULL OR access_token = '' OR octet_length(access_token) > 16384 THEN
        RAISE EXCEPTION 'vetassist_auth: access_token must be 1 byte to 16 KiB' USING ERRCODE = '22023';
    END IF;
    IF refresh_token = '' OR octet_length(refresh_token) > 16384 THEN
        RAISE EXCEPTION 'vetassist_auth: refresh_token must be 1 byte to 16 KiB' USING ERRCODE = '22023';
    END IF;
    IF expires_at IS NULL OR expires_at <= clock_timestamp() OR expires_at = 'infinity' THEN
        RAISE EXCEPTION 'vetassist_auth: expires_at must be a finite time in the future' USING ERRCODE = '22023';
    END IF;
    IF length(scope) > 2048 THEN
        RAISE EXCEPTION 'vetassist_auth: scope is longer than 2048 characters' USING ERRCODE = '22023';
    END IF;
    -- FOR SHARE waits for a deactivation in flight and then sees it.
    SELECT u.is_active INTO active FROM vetassist_auth.users u WHERE u.id = store_va_tokens.user_id FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no such user' USING ERRCODE = 'P0002';
    ELSIF NOT active THEN
        RAISE EXCEPTION 'vetassist_auth: this account is deactivated' USING ERRCODE = '28000';
    END IF;
    -- A refresh response without a new refresh token keeps the stored one.
    INSERT INTO vetassist_auth.va_tokens AS t
        (user_id, access_token_encrypted, refresh_token_encrypted, scope, expires_at, created_at)
    VALUES (user_id,
            vetassist_auth.encrypt_token(access_token, 'va_tokens.access_token:' || user_id),
            vetassist_auth.encrypt_token(refresh_token, 'va_tokens.refresh_token:' || user_id),
            scope, expires_at, clock_timestamp())
    ON CONFLICT ON CONSTRAINT va_tokens_user_id_key DO UPDATE SET
        access_token_encrypted = excluded.access_token_encrypted,
        refresh_token_encrypted = coalesce(excluded.refresh_token_encrypted, t.refresh_token_encrypted),
        scope = coalesce(excluded.scope, t.scope),
        expires_at = excluded.expires_at,
        generation = t.generation + 1,
        refreshed_at = excluded.created_at  -- the clock, read once (Citus runs the SET on a worker)
    RETURNING t.generation INTO new_generation;
    PERFORM vetassist_auth.write_audit('auth',
        CASE WHEN new_generation = 1 THEN 'va_tokens_stored' ELSE 'va_tokens_refreshed' END,
        'success', user_id, 'va_tokens', user_id::text,
        jsonb_build_object('generation', new_generation, 'expires_at', expires_at,
                           'refresh_token', refresh_token IS NOT NULL));
    RETURN new_generation;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.close_session(
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

CREATE OR REPLACE FUNCTION vetassist_auth.session_by_jwt(jwt text, for_update boolean DEFAULT false)
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

CREATE OR REPLACE FUNCTION vetassist_auth.create_session(
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
    IF expires_at IS NULL OR expires_at <= started THEN
        RAISE EXCEPTION 'vetassist_auth: expires_at must be in the future' USING ERRCODE = '22023';
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

CREATE OR REPLACE FUNCTION vetassist_auth.touch_session(jwt_id text) RETURNS vetassist_auth.session_status
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions;
    now_ts timestamptz := clock_timestamp();
    owner uuid;
BEGIN
    SELECT r.user_id INTO owner FROM vetassist_auth.session_routes r WHERE r.jwt_id = touch_session.jwt_id;
    SELECT * INTO s FROM vetassist_auth.sessions t WHERE t.user_id = owner AND t.jwt_id = touch_session.jwt_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no session with this jwt_id' USING ERRCODE = 'P0002';
    END IF;
    IF s.status <> 'ACTIVE' THEN
        RETURN s.status;
    END IF;
    IF now_ts >= s.live_until THEN
        PERFORM vetassist_auth.close_session(s, 'EXPIRED',
            CASE WHEN now_ts >= s.expires_at THEN 'absolute_timeout' ELSE 'idle_timeout' END);
        RETURN 'EXPIRED';
    END IF;
    PERFORM vetassist_auth.set_current_session(s.id);
    IF now_ts - s.last_activity_at >= vetassist_auth.session_touch_interval() THEN
        -- Computed here from the row read above (neither column changes): Citus refuses a
        -- STABLE operator (timestamptz + interval) on a column in a distributed UPDATE.
        UPDATE vetassist_auth.sessions t
        SET last_activity_at = now_ts, live_until = least(s.expires_at, now_ts + s.idle_timeout)
        WHERE t.user_id = s.user_id AND t.id = s.id AND t.status = 'ACTIVE';
        IF NOT FOUND THEN  -- ended by someone else a moment ago
            RETURN (SELECT t.status FROM vetassist_auth.sessions t WHERE t.user_id = s.user_id AND t.id = s.id);
        END IF;
        INSERT INTO vetassist_auth.session_activity (session_id, user_id, activity_type)
        VALUES (s.id, s.user_id, 'request');
    END IF;
    RETURN 'ACTIVE';
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.refresh_session_token(jwt_id text, presented text, replacement text)
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

CREATE OR REPLACE FUNCTION vetassist_auth.expire_sessions(batch_size integer DEFAULT 10000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ts timestamptz := clock_timestamp();  -- a variable, so the index on live_until is used
    expired integer;
    purged integer;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'vetassist_auth: batch_size must be a positive integer' USING ERRCODE = '22023';
    END IF;
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

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_locked_until(user_id uuid) RETURNS timestamptz
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

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_check(m vetassist_auth.mfa_settings, code text, require_enabled boolean,
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
            PERFORM vetassist_auth.write_audit_durably('mfa', 'mfa_locked_out', 'denied', m.user_id, 'mfa_settings',
                m.user_id::text, jsonb_build_object('locked_for', vetassist_auth.mfa_lockout()));
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

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_enroll_totp(user_id uuid) RETURNS text
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

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_confirm_totp(user_id uuid, code text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m vetassist_auth.mfa_settings := vetassist_auth.mfa_row(user_id);
    step bigint;
    confirmed timestamptz;
BEGIN
    IF m.totp_enabled THEN
        RAISE EXCEPTION 'vetassist_auth: TOTP is already enabled for this user' USING ERRCODE = '22023';
    END IF;
    step := vetassist_auth.mfa_check(m, code, false, 'totp_enrolment_confirmed', 'mfa_settings', user_id::text);
    IF step IS NULL THEN
        RETURN false;  -- mfa_check recorded the failure
    END IF;
    confirmed := clock_timestamp();  -- read here: Citus runs an UPDATE's SET on a worker
    UPDATE vetassist_auth.mfa_settings s SET totp_enabled = true, confirmed_at = confirmed
    WHERE s.user_id = mfa_confirm_totp.user_id;
    PERFORM vetassist_auth.write_audit('mfa', 'totp_enrolment_confirmed', 'success', user_id, 'mfa_settings', user_id::text);
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_verify(jwt_id text, code text) RETURNS boolean
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

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_revoke_device(user_id uuid, device_id uuid) RETURNS boolean
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

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_disable(user_id uuid) RETURNS boolean
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

-- key_usage, generated from the registry as in keys.sql, with the workers' audit seals.
DROP VIEW vetassist_auth.key_usage;
DO $key_usage$
BEGIN
    EXECUTE 'CREATE VIEW vetassist_auth.key_usage AS ' || (
        SELECT pg_catalog.string_agg(pg_catalog.format('SELECT %s AS key_id, %L::text AS used_by FROM vetassist_auth.%I',
                   CASE c.purpose
                       WHEN 'hash' THEN pg_catalog.format('vetassist_auth.hash_key_id(%I)', c.column_name)
                       WHEN 'audit' THEN pg_catalog.quote_ident(c.column_name)
                       ELSE pg_catalog.format('vetassist_auth.envelope_key_id(%I)', c.column_name)
                   END,
                   c.table_name || '.' || c.column_name, c.table_name),
               ' UNION ALL ' ORDER BY c.ordinality)
        FROM vetassist_auth.protected_columns() WITH ORDINALITY c)
        || ' UNION ALL SELECT w.key_id, ''audit_seals.key_id''::text FROM vetassist_auth.worker_audit_seal_keys() w';
END
$key_usage$;
COMMENT ON VIEW vetassist_auth.key_usage IS 'Which data key each stored ciphertext or field hash depends on.';
REVOKE ALL ON vetassist_auth.key_usage FROM PUBLIC;

-- Privileges: the new functions are internal but for these.
DO $revoke$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'vetassist_auth'::regnamespace
               AND p.proname IN ('distributed', 'citus_coordinator', 'distribute', 'veteran_placement',
                                 'expire_distributed_sessions', 'refresh_distributed_encrypt_counts',
                                 'seal_worker_audit_logs', 'worker_audit_chains', 'audit_chain_heads',
                                 'reencrypt_distributed', 'worker_audit_seal_keys', 'purge_worker_audit_logs',
                                 'verify_audit_chain_at', 'on_workers', 'sum_on_workers') LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$revoke$;
GRANT EXECUTE ON FUNCTION
    vetassist_auth.distribute(integer),
    vetassist_auth.veteran_placement(uuid),
    vetassist_auth.seal_worker_audit_logs(integer),
    vetassist_auth.audit_chain_heads(),
    vetassist_auth.verify_audit_chain_at(text, bigint, bytea)
TO vetassist_admin;
GRANT EXECUTE ON FUNCTION
    vetassist_auth.audit_chain_heads(),
    vetassist_auth.verify_audit_chain_at(text, bigint, bytea)
TO vetassist_auditor;
