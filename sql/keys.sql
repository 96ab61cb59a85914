-- Key usage and re-encryption (docs/ARCHITECTURE.md, "Keys").

-- Every stored value that depends on a data key, by key id: one branch per column of
-- protected_columns() (src/protected_columns.rs), generated from it, and on a Citus coordinator
-- the audit keys of the workers' seals (citus.sql). A decrypt_only key that appears nowhere here
-- may be retired (retire_unused_keys asks per key: "WHERE key_id = k"). An upgrade that changes
-- the registry calls define_key_usage() again. Internal.
CREATE FUNCTION vetassist_auth.define_key_usage() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE 'CREATE OR REPLACE VIEW vetassist_auth.key_usage AS ' || (
        SELECT pg_catalog.string_agg(pg_catalog.format('SELECT %s AS key_id, %L::text AS used_by FROM vetassist_auth.%I',
                   CASE
                       WHEN c.hash_field IS NOT NULL THEN pg_catalog.format('vetassist_auth.hash_key_id(%I)', c.column_name)
                       WHEN c.context_name IS NOT NULL THEN pg_catalog.format('vetassist_auth.envelope_key_id(%I)', c.column_name)
                       ELSE pg_catalog.quote_ident(c.column_name)
                   END,
                   c.table_name || '.' || c.column_name, c.table_name),
               ' UNION ALL ' ORDER BY c.ordinality)
        FROM vetassist_auth.protected_columns() WITH ORDINALITY c)
        || ' UNION ALL SELECT w.key_id, ''audit_seals.key_id''::text FROM vetassist_auth.worker_audit_seal_keys() w';
END
$$;
SELECT vetassist_auth.define_key_usage();
COMMENT ON VIEW vetassist_auth.key_usage IS 'Which data key each stored ciphertext or field hash depends on.';

-- The audit log is the one large table whose values pin keys (its IP hashes, under audit_ip keys
-- used in turn as the log grows): "is key k still used" reads only the block ranges that may
-- hold k, not six years of rows.
CREATE INDEX audit_log_by_ip_key ON vetassist_auth.audit_log
    USING brin (vetassist_auth.hash_key_id(ip_hash)) WITH (pages_per_range = 16, autosummarize = on);

-- key_usage counted per key and column, for vetassist_admin (the view itself calls functions
-- no role is granted): what keeps a key from retiring.
CREATE FUNCTION vetassist_auth.key_usage_summary()
RETURNS TABLE (key_id integer, purpose text, status text, used_by text, stored_values bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT u.key_id, k.purpose, k.status, u.used_by, count(*)
    FROM vetassist_auth.key_usage u LEFT JOIN vetassist_auth.keys k ON k.key_id = u.key_id
    WHERE u.key_id IS NOT NULL
    GROUP BY u.key_id, k.purpose, k.status, u.used_by
    ORDER BY u.key_id, u.used_by
$$;
COMMENT ON FUNCTION vetassist_auth.key_usage_summary() IS
    'How many stored values depend on each data key, per column (key_usage counted).';

-- Moves up to batch_size rows per table onto the active keys and returns how many rows moved.
-- Call it until it returns 0; a call that moves nothing retires decrypt_only keys that nothing
-- can need any more (retire_unused_keys: usually that call, else a later one once older
-- snapshots have ended). Rows locked by other transactions are skipped (SKIP LOCKED) and
-- picked up by a later call. A row with a value that does not open (retired key, damaged,
-- restored from another database) is left as it is (never a failed call) and reported in a
-- WARNING once nothing else moves.
-- Mirrors each active key's encryption count (kept exactly by its purpose's sequence, in leases
-- of 128) into keys.encrypt_count for administrators. Run by reencrypt and the background
-- worker, never by writers: an application transaction holding a key row would hold up
-- rotate_key until it ends. Skips a row someone else holds; returns keys updated.
CREATE FUNCTION vetassist_auth.refresh_encrypt_counts() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    mirrored_keys integer;
BEGIN
    IF vetassist_auth.distributed() THEN
        RETURN vetassist_auth.refresh_distributed_encrypt_counts();
    END IF;
    WITH due AS (
        SELECT k.key_id, c.counted
        FROM vetassist_auth.keys k JOIN vetassist_auth.counted_encryptions() c ON c.key_id = k.key_id
        WHERE k.status = 'active' AND k.encrypt_count < c.counted
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

CREATE FUNCTION vetassist_auth.reencrypt(batch_size integer DEFAULT 1000) RETURNS bigint
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
                                 CASE WHEN c.hash_field IS NOT NULL THEN 'hash_key_id' ELSE 'envelope_key_id' END,
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
        -- Only the envelope columns' branches of key_usage run (a constant used_by each).
        SELECT count(*) INTO n FROM vetassist_auth.key_usage k JOIN vetassist_auth.keys USING (key_id)
        WHERE k.used_by = ANY (ARRAY(SELECT p.table_name || '.' || p.column_name
                                     FROM vetassist_auth.protected_columns() p WHERE p.context_name IS NOT NULL))
          AND keys.status <> 'active';
        IF n > 0 THEN
            RAISE WARNING 'vetassist_auth: % stored value(s) remain under old keys and were not moved', n
                USING HINT = 'They do not open (a retired key: unretire_key(key_id); damaged or restored from elsewhere) or their row is locked. SELECT * FROM vetassist_auth.key_usage_summary() shows them (as vetassist_admin).';
        END IF;
    END IF;
    -- After retiring: it writes, and a transaction that wrote first never retires (docs/ARCHITECTURE.md, "Retiring a key").
    PERFORM vetassist_auth.refresh_encrypt_counts();
    RETURN moved;
END
$$;
COMMENT ON FUNCTION vetassist_auth.reencrypt(integer) IS
    'Moves stored ciphertexts and field hashes onto the active keys, batch_size rows per table per call; returns rows moved.';

-- reencrypt() on a distributed installation, for one table: Citus would run reseal and rehash on
-- the workers (and refuses a volatile function in a multi-shard UPDATE), so the batch is read
-- into a temporary table on the coordinator, sealed again there, and written back where the
-- values are still the ones read (a row changed meanwhile is left for the next call). Nothing
-- is written when nothing would move: a call that wrote never retires keys (retire_unused_keys).
-- Internal.
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

-- Who may call the functions of this file (any other function of the extension: no role,
-- sql/grants.sql).
GRANT EXECUTE ON FUNCTION vetassist_auth.reencrypt(integer) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.key_usage_summary() TO vetassist_admin;
