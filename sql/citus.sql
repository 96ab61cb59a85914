-- Scale-out on Citus (docs/citus.md, "Scale-out on Citus"; docs/ARCHITECTURE.md, "Citus"). Nothing here
-- runs until an administrator calls distribute() on the coordinator; every function works
-- unchanged on one node. The application connects to the coordinator, and every API function
-- runs there: per-veteran statements are keyed by the user id (one shard each), values are
-- encrypted and decrypted on the coordinator only, and each node keeps an audit chain of its own.

-- Whether the extension's tables are distributed (Citus is installed and distribute() ran).
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

-- Whether this node is the coordinator of a distributed installation (on_citus_worker, in
-- src/citus.rs, is the one test of a node's place).
CREATE FUNCTION vetassist_auth.citus_coordinator() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN vetassist_auth.distributed() AND NOT vetassist_auth.on_citus_worker();
END
$$;

-- The one documented call: distributes the extension's tables over the Citus workers.
--  * every per-veteran table, co-located by user id (users by id): a veteran's rows share a shard;
--  * session_routes by jwt_id: a JWT id finds its user with one single-shard look-up;
--  * keys as a reference table: every node holds every (wrapped) data key, and a rotation on
--    the coordinator reaches every node in the same transaction;
--  * audit_log, audit_seals and audit_seal_state stay local: each node seals its own rows.
-- Citus keeps a unique index or a foreign key only with the distribution column in it, so
-- primary keys become (user_id, id) and sessions' jwt_id is unique through session_routes;
-- one account per ICN is kept by the identity claim (docs/ARCHITECTURE.md, "One account per
-- ICN"), taken on the coordinator, where every API call runs. Idempotent; returns the tables
-- it distributed.
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

-- Where one veteran's rows live: the shard and the worker that holds it.
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

-- The sweep of a distributed installation (expire_sessions calls it): on the coordinator only,
-- so one scheduler sweeps the cluster however many nodes run a sweeper. One multi-shard
-- statement per step; Citus cannot pick a batch (LIMIT ... SKIP LOCKED) across shards.
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
    -- Rows written here, not through the audit writer: counted for metrics() all the same.
    PERFORM vetassist_auth.count_audit_rows('session', 'session_expired', 'success', expired);

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

-- refresh_encrypt_counts() on a distributed installation: the keys are a reference table, which
-- Citus updates on every node (no SKIP LOCKED across nodes); the counters are the coordinator's.
CREATE FUNCTION vetassist_auth.refresh_distributed_encrypt_counts() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    k record;
    mirrored integer := 0;
BEGIN
    FOR k IN SELECT c.key_id, c.counted FROM vetassist_auth.counted_encryptions() c
             JOIN vetassist_auth.keys USING (key_id) WHERE keys.encrypt_count < c.counted LOOP
        UPDATE vetassist_auth.keys SET encrypt_count = k.counted
        WHERE key_id = k.key_id AND encrypt_count < k.counted;
        mirrored := mirrored + 1;
    END LOOP;
    RETURN mirrored;
END
$$;

-- A command run on every worker, from the coordinator of a distributed installation (on any
-- other node, no worker): each worker named host:port, as audit_chain_heads() names it, in
-- Citus' order of nodes, with whether the command succeeded and its result (or error). Internal.
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

-- The sum of the counts the workers return for `command`, one of the audit log's chores; a
-- worker that fails is named in a WARNING (its log was not `done`) and the others go on. Internal.
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

-- Seals the audit log of every worker (the coordinator's sweeper calls it after sealing its
-- own); returns the rows sealed. Each worker seals its own rows under its own chain lock; one
-- that fails is named in a WARNING and the others go on.
CREATE FUNCTION vetassist_auth.seal_worker_audit_logs(max_rows integer DEFAULT 10000) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT vetassist_auth.sum_on_workers(format('SELECT vetassist_auth.seal_audit_log(%s)', max_rows), 'sealed')
$$;

-- Every worker's chain, verified on the worker: what verify_audit_chain() on the coordinator
-- adds to its own. A worker that cannot be reached is a failure, never a pass.
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

-- The head of every node's chain: the anchors to keep outside the database, one per node (none
-- for a node with no seal yet). A worker that cannot be asked is named in a WARNING and gets a
-- row without a head, never silently none.
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

-- The audit keys the workers' seals use, one row per key and worker: key_usage adds them, so no
-- audit key a worker's chain still needs is retired. A worker that cannot be asked stops the
-- caller (a retirement must not guess).
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

-- purge_audit_log() on a coordinator purges every worker's log too, each under its own chain
-- lock and minimum retention; returns the rows the workers removed. A worker that fails is
-- named in a WARNING and the others go on.
CREATE FUNCTION vetassist_auth.purge_worker_audit_logs(older_than interval) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT vetassist_auth.sum_on_workers(format('SELECT vetassist_auth.purge_audit_log(%L::interval)', older_than),
                                         'purged')
$$;

-- An anchor of one node (a row of audit_chain_heads(), kept outside the database) checked on that
-- node: verify_audit_chain(seq, hash) there. 22023 for a node that is not in the cluster.
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

-- Who may call the functions of this file (any other function of the extension: no role,
-- sql/grants.sql).
GRANT EXECUTE ON FUNCTION vetassist_auth.distribute(integer) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.veteran_placement(uuid) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.seal_worker_audit_logs(integer) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.audit_chain_heads() TO vetassist_admin, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_audit_chain_at(text, bigint, bytea) TO vetassist_admin, vetassist_auditor;
