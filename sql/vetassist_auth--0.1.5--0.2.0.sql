-- vetassist_auth 0.1.5 -> 0.2.0
-- Operations: the background processes stop when asked, stay out of restores and replicas, and
-- leave the operator's procedures intact (docs/ARCHITECTURE.md, "Background worker", "Replicas
-- and failover").
\echo Use "ALTER EXTENSION vetassist_auth UPDATE TO '0.2.0'" to load this file. \quit

-- Recorders: verify_installation says whether this database has a reserved recorder and whether
-- it runs (durable_audit_state replaces durable_audit_problem, which the library keeps for the
-- SQL of older releases until they are updated).
DROP FUNCTION vetassist_auth.durable_audit_problem();

-- Replicas: on a logical replication subscriber of the extension's tables (or with
-- vetassist_auth.node_role = 'subscriber') nothing of the extension writes them and the API's
-- writes and disclosures fail with 55000, until promote() (which also does what
-- resync_sequences() does) records the failover in node_promotions.
CREATE TABLE vetassist_auth.node_promotions (
    system_identifier   bigint NOT NULL,
    database            oid NOT NULL,
    promoted_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_subscriptions oid[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (system_identifier, database)
);
COMMENT ON TABLE vetassist_auth.node_promotions IS
    'promote() on this node: when, and the subscriptions it ended; the node is a subscriber again only through a new subscription (node_role auto).';
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.node_promotions', '');
REVOKE ALL ON vetassist_auth.node_promotions FROM PUBLIC;

-- Row audit: verify_installation reads a registry of the tables put under row audit instead of
-- scanning the audit log for them; filled once from the audit log.
-- Keyed by the table itself, not its name: a table renamed or moved to another schema stays
-- under watch, and another table given its old name is not (a dump carries the names).
CREATE TABLE vetassist_auth.row_audit_registry (
    target     regclass PRIMARY KEY,
    enabled    boolean NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE vetassist_auth.row_audit_registry IS
    'Tables put under row audit by enable_row_audit (enabled) or taken out by disable_row_audit; verify_installation reports an enabled one whose trigger no longer fires. A dropped table leaves it.';
INSERT INTO vetassist_auth.row_audit_registry (target, enabled, changed_at)
SELECT DISTINCT ON (t.target) t.target, t.enabled, t.occurred_at
FROM (SELECT to_regclass(a.target_table) AS target, a.event_type = 'row_audit_enabled' AS enabled, a.occurred_at, a.id
      FROM vetassist_auth.audit_log a
      WHERE a.category = 'audit' AND a.event_type IN ('row_audit_enabled', 'row_audit_disabled')
        AND a.target_table IS NOT NULL) t
WHERE t.target IS NOT NULL
ORDER BY t.target, t.id DESC;
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.row_audit_registry', '');
REVOKE ALL ON vetassist_auth.row_audit_registry FROM PUBLIC;

-- Audit IP hashes get keys of their own (purpose audit_ip), so that a hash key can retire: the
-- audit log keeps its rows for years and never rewrites one. Rows written before keep their
-- hash-key hashes, which no longer hold that key (docs/ARCHITECTURE.md, "Retiring a key").
ALTER TABLE vetassist_auth.keys DROP CONSTRAINT keys_purpose_check;
ALTER TABLE vetassist_auth.keys ADD CONSTRAINT keys_purpose_check
    CHECK (purpose IN ('token', 'phi', 'hash', 'audit', 'mfa', 'audit_ip'));

-- An index that lets "is key k still used" read only the audit log's block ranges that may hold
-- k (key_usage itself is generated again from the registry by define_key_usage, below).
CREATE INDEX audit_log_by_ip_key ON vetassist_auth.audit_log
    USING brin (vetassist_auth.hash_key_id(ip_hash)) WITH (pages_per_range = 16, autosummarize = on);

-- The MFA lock-outs by session, which every session check probes (mfa_locked_session).
CREATE INDEX audit_log_mfa_lockouts ON vetassist_auth.audit_log (target_id)
    WHERE category = 'mfa' AND event_type = 'mfa_locked_out';
-- Key custody: each master key load, recorded once per database by the first backend that uses
-- it (master_key_loaded rows; docs/ARCHITECTURE.md, "Key custody").
CREATE INDEX audit_log_key_custody ON vetassist_auth.audit_log (target_id)
    WHERE event_type = 'master_key_loaded';
-- A veteran's disclosures (accounting_of_disclosures).
CREATE INDEX audit_log_disclosures ON vetassist_auth.audit_log (subject_user_id, occurred_at)
    WHERE category = 'disclosure';

-- Functions new or changed since 0.1.5, as in this release's install script
-- (scripts/upgrade-functions.py prints them):
-- * durable_audit_state, verify_installation: the recorder reserved for this database, keys that
--   still need the previous master key, the node's role, no key created by a check;
-- * key_cache_sizes, key_wrapping_problem, key_usage_summary, reencrypt: keys retire under
--   once-per-session reencrypt, and the WARNING names what vetassist_admin can read;
-- * key_purposes, reencrypt, verify_installation: the audit_ip purpose, and a reencrypt that
--   moves nothing reads no audit row;
-- * counted_encryptions, refresh_encrypt_counts, refresh_distributed_encrypt_counts,
--   citus_coordinator: one definition of an encryption count and of a Citus worker;
-- * define_key_usage: key_usage generated from the registry (an audit_ip column is a hash);
-- * protected_columns (STABLE): only the columns the schema has, so an older upgrade script run
--   by a later library never names a column a later script adds;
-- * node_role, node_role_state, require_primary_node, promote, expire_sessions: replicas;
-- * audit_table_altered: quiet while the extension holds no key and no audit row (a schema-only
--   restore);
-- * enable_row_audit, disable_row_audit, verify_installation: the row-audit registry;
-- * verify_audit_chain(seq, hash, timeline, lsn): an anchor's WAL position tells a recovery to
--   an earlier point from seals removed;
-- * audit_event (a subject_user_id argument), phi_disclosures (new columns and argument names)
--   and write_audit_durably (returns the row's id): dropped and created again below;
-- * record_disclosure, disclosure_purposes, disclosures_about, check_period,
--   accounting_of_disclosures, my_disclosures, crisis_events, session_events_of,
--   write_audit_durably_by_subject, durable_audit_in_force: the accounting of disclosures;
-- * row_audit_expected, audit_table_altered, audit_row_audit_dropped: alarms only for tables
--   whose row audit is expected, not for any trigger of that name;
-- * mfa_locked_session, require_live, touch_session, session_status, mfa_check,
--   mfa_trust_device: a session's MFA lock holds when the caller rolls its LOCKED status back;
-- * master_key_source, verify_installation: the master key's source in force (file, inline or
--   a command the postmaster runs), and its last load;
-- * metrics, metric_definitions, exporter_queries, count_audit_rows, expire_sessions,
--   expire_distributed_sessions: the extension's health as Prometheus series.
DROP FUNCTION vetassist_auth.audit_event(text, text, text, jsonb);
DROP FUNCTION vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz);
DROP FUNCTION vetassist_auth.write_audit_durably(text, text, text, uuid, text, text, jsonb);
-- The application's side: authenticate (one call per request, through touch, which
-- touch_session shares), mfa_pending (mfa_required and authenticate), mfa_confirm_totp (a
-- jwt_id argument: the confirming code verifies that session), create_session (a finite
-- expires_at).
DROP FUNCTION vetassist_auth.mfa_confirm_totp(uuid, text);
-- set_request_session names the session and its user (set_actor of another user drops the
-- session); set_current_session stays in the library for the SQL of older releases only.
DROP FUNCTION vetassist_auth.set_current_session(uuid);
CREATE OR REPLACE FUNCTION vetassist_auth.citus_coordinator() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN vetassist_auth.distributed() AND NOT vetassist_auth.on_citus_worker();
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.refresh_distributed_encrypt_counts() RETURNS integer
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

CREATE  FUNCTION "clear_actor"() RETURNS void
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'clear_actor_wrapper';

CREATE  FUNCTION "counted_encryptions"() RETURNS TABLE (
	"key_id" INT,  /* i32 */
	"counted" bigint  /* i64 */
)
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'counted_encryptions_wrapper';

CREATE  FUNCTION "durable_audit_in_force"() RETURNS bool /* bool */
STRICT STABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'durable_audit_in_force_wrapper';

CREATE  FUNCTION "durable_audit_state"() RETURNS TABLE (
	"ok" bool,  /* bool */
	"detail" TEXT  /* & '_ str */
)
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'durable_audit_state_wrapper';

CREATE  FUNCTION "key_cache_sizes"() RETURNS TABLE (
	"cache" TEXT,  /* String */
	"entries" bigint  /* i64 */
)
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_cache_sizes_wrapper';

CREATE  FUNCTION "key_purposes"() RETURNS TEXT[] /* Vec < & '_ str > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_purposes_wrapper';

CREATE  FUNCTION "key_wrapping_problem"() RETURNS TEXT /* Option < String > */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_wrapping_problem_wrapper';

CREATE  FUNCTION "master_key_source"() RETURNS TABLE (
	"ok" bool,  /* bool */
	"detail" TEXT  /* String */
)
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'master_key_source_wrapper';

CREATE  FUNCTION "count_audit_rows"(
	"category" TEXT, /* & str */
	"event_type" TEXT, /* & str */
	"outcome" TEXT, /* & str */
	"rows" bigint /* i64 */
) RETURNS void
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'count_audit_rows_wrapper';

CREATE  FUNCTION "exporter_queries"() RETURNS TEXT /* String */
IMMUTABLE STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'exporter_queries_wrapper';

CREATE  FUNCTION "metric_definitions"() RETURNS TABLE (
	"metric" TEXT,  /* String */
	"kind" TEXT,  /* & '_ str */
	"labels" TEXT[],  /* Vec < String > */
	"help" TEXT  /* & '_ str */
)
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'metric_definitions_wrapper';

CREATE  FUNCTION "metrics"(
	"names" TEXT[] DEFAULT NULL /* :: std :: option :: Option < Vec < String > > */
) RETURNS TABLE (
	"metric" TEXT,  /* String */
	"labels" jsonb,  /* JsonB */
	"value" double precision  /* f64 */
)
SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'metrics_wrapper';

CREATE  FUNCTION "mfa_locked_session"(
	"user_id" uuid, /* pgrx :: Uuid */
	"session_id" uuid /* pgrx :: Uuid */
) RETURNS bool /* bool */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mfa_locked_session_wrapper';

CREATE  FUNCTION "node_role"() RETURNS TEXT /* & '_ str */
STRICT STABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'node_role_wrapper';

CREATE  FUNCTION "node_role_state"() RETURNS TABLE (
	"ok" bool,  /* bool */
	"detail" TEXT  /* String */
)
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'node_role_state_wrapper';

CREATE  FUNCTION "on_citus_worker"() RETURNS bool /* bool */
STRICT STABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'on_citus_worker_wrapper';

CREATE OR REPLACE FUNCTION "protected_columns"() RETURNS TABLE (
	"table_name" TEXT,  /* & '_ str */
	"column_name" TEXT,  /* & '_ str */
	"purpose" TEXT,  /* & '_ str */
	"row_id" TEXT,  /* & '_ str */
	"context_name" TEXT,  /* Option < & '_ str > */
	"context_id" TEXT,  /* Option < & '_ str > */
	"hash_field" TEXT,  /* Option < & '_ str > */
	"hash_of" TEXT,  /* Option < & '_ str > */
	"decrypt_is_disclosure" bool  /* bool */
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'protected_columns_wrapper';

CREATE  FUNCTION "require_primary_node"() RETURNS void
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'require_primary_node_wrapper';

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

CREATE OR REPLACE FUNCTION vetassist_auth.refresh_encrypt_counts() RETURNS integer
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

CREATE  FUNCTION "set_request_session"(
	"session_id" uuid, /* Uuid */
	"user_id" uuid /* Uuid */
) RETURNS void
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'set_request_session_wrapper';

CREATE OR REPLACE FUNCTION vetassist_auth.expire_distributed_sessions(ts timestamptz) RETURNS integer
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
                             'audit_seal_state', 'row_audit_registry', 'node_promotions'] LOOP
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

    -- SUPERUSER, CREATEROLE, REPLICATION or BYPASSRLS is more than an extension role grants (the
    -- master key file, any role, a copy of every table, past row security): neither an extension
    -- role nor a login that holds one, directly or through other roles, should have any
    -- (README, "Who must not hold what").
    check_name := 'roles: no extension role or member of one holds SUPERUSER, CREATEROLE, REPLICATION or BYPASSRLS';
    WITH RECURSIVE member_of(member, granted) AS (
        SELECT r.oid, r.oid FROM pg_roles r WHERE r.rolname IN ('vetassist_app', 'vetassist_auditor', 'vetassist_admin')
        UNION
        SELECT m.member, mo.granted FROM pg_auth_members m JOIN member_of mo ON m.roleid = mo.member
    )
    SELECT string_agg(DISTINCT r.rolname || ' (' || g.rolname || ': '
                      || concat_ws(' ', CASE WHEN r.rolsuper THEN 'SUPERUSER' END, CASE WHEN r.rolcreaterole THEN 'CREATEROLE' END,
                                   CASE WHEN r.rolreplication THEN 'REPLICATION' END, CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END)
                      || ')', ', ') INTO missing
    FROM member_of mo JOIN pg_roles r ON r.oid = mo.member JOIN pg_roles g ON g.oid = mo.granted
    WHERE r.rolsuper OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls;
    ok := missing IS NULL;
    detail := coalesce('more power than an extension role grants: ' || missing, 'none');
    RETURN NEXT;

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

    -- Tables an administrator put under row audit (the registry enable_row_audit keeps) that
    -- no longer have a row-audit trigger that fires: disabled, replica-only, renamed, replaced
    -- or dropped. The registry, not the audit log: a check must not cost the whole log.
    check_name := 'audit: row audit enabled everywhere it was enabled';
    SELECT string_agg(r.target::text, ', ' ORDER BY r.target::text) INTO missing
    FROM vetassist_auth.row_audit_registry r
    WHERE r.enabled AND NOT vetassist_auth.row_audit_fires(r.target);
    ok := missing IS NULL;
    detail := coalesce('not firing (disabled, replica-only, renamed, replaced or dropped) on: ' || missing,
                       'every table put under row audit still has it');
    RETURN NEXT;

    check_name := 'logs: every channel in force can be redacted';
    detail := vetassist_auth.unredactable_log_channels();
    ok := detail IS NULL;
    detail := coalesce(detail, 'statements of the extension reach the log with their literals masked');
    RETURN NEXT;

    -- A logical replica writes nothing of ours until promote() (docs/ARCHITECTURE.md, "Replicas
    -- and failover").
    check_name := 'replication: node role';
    SELECT s.ok, s.detail INTO ok, detail FROM vetassist_auth.node_role_state() s;
    RETURN NEXT;

    check_name := 'audit: disclosures and failed authentications survive a rollback';
    SELECT s.ok, s.detail INTO ok, detail FROM vetassist_auth.durable_audit_state() s;
    RETURN NEXT;

    -- The setting the master key comes from; for a command, its load and last run (docs/operations.md,
    -- "The master key from a KMS").
    check_name := 'keys: master key source';
    SELECT s.ok, s.detail INTO ok, detail FROM vetassist_auth.master_key_source() s;
    RETURN NEXT;

    -- Before the previous master key file is removed (docs/operations.md, "Changing the master key").
    check_name := 'keys: wrapped under the current master key';
    detail := vetassist_auth.key_wrapping_problem();
    ok := detail IS NULL;
    detail := coalesce(detail, 'every data key opens under the current master key');
    RETURN NEXT;

    FOREACH p IN ARRAY vetassist_auth.key_purposes() LOOP
        check_name := 'key ' || p;
        -- Read-only: a check never creates a key (a data-only restore needs an empty key table).
        IF NOT EXISTS (SELECT 1 FROM vetassist_auth.keys k WHERE k.purpose = p AND k.status = 'active') THEN
            ok := true;
            detail := 'no key yet: created on first use';
        ELSE
            BEGIN
                detail := 'active key ' || vetassist_auth.active_key_id(p) || ' unwraps';
                ok := true;
            EXCEPTION WHEN OTHERS THEN
                ok := false;
                detail := SQLSTATE || ': ' || SQLERRM;
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION "verify_audit_chain"(
	"anchor_seq" bigint, /* Option < i64 > */
	"anchor_hash" bytea, /* Option < & [u8] > */
	"anchor_timeline" INT, /* Option < i32 > */
	"anchor_lsn" TEXT /* Option < & str > */
) RETURNS TABLE (
	"ok" bool,  /* bool */
	"checked" bigint,  /* i64 */
	"first_bad_seq" bigint,  /* Option < i64 > */
	"problem" TEXT  /* Option < String > */
)
SECURITY DEFINER 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'verify_audit_chain_at_position_wrapper';

CREATE FUNCTION "write_audit_durably"(
	"category" TEXT, /* & str */
	"event_type" TEXT, /* & str */
	"outcome" TEXT, /* & str */
	"subject_user_id" uuid DEFAULT NULL, /* Option < Uuid > */
	"target_table" TEXT DEFAULT NULL, /* Option < & str > */
	"target_id" TEXT DEFAULT NULL, /* Option < & str > */
	"details" jsonb DEFAULT '{}' /* Option < writer :: JsonbDatum > */
) RETURNS bigint /* i64 */
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'write_audit_durably_wrapper';

CREATE  FUNCTION "write_audit_durably_by_subject"(
	"user_id" uuid, /* Uuid */
	"session_id" uuid, /* Uuid */
	"event_type" TEXT, /* & str */
	"details" jsonb DEFAULT '{}' /* Option < writer :: JsonbDatum > */
) RETURNS bigint /* i64 */
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'write_audit_durably_by_subject_wrapper';

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

CREATE OR REPLACE FUNCTION vetassist_auth.enable_row_audit(target regclass, redact text[] DEFAULT '{}', ignore text[] DEFAULT '{}')
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

CREATE OR REPLACE FUNCTION vetassist_auth.disable_row_audit(target regclass) RETURNS boolean
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

CREATE FUNCTION vetassist_auth.row_audit_expected(tab oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM vetassist_auth.row_audit_registry r WHERE r.enabled AND r.target = tab)
        OR EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tab AND c.relnamespace = 'vetassist_auth'::regnamespace)
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.audit_table_altered() RETURNS event_trigger
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

CREATE OR REPLACE FUNCTION vetassist_auth.audit_row_audit_dropped() RETURNS event_trigger
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

CREATE OR REPLACE FUNCTION vetassist_auth.require_live(session vetassist_auth.sessions) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF session.status <> 'ACTIVE' OR clock_timestamp() >= session.live_until
       OR vetassist_auth.mfa_locked_session(session.user_id, session.id) THEN
        RAISE EXCEPTION 'vetassist_auth: the session has ended' USING ERRCODE = '28000';
    END IF;
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

CREATE OR REPLACE FUNCTION vetassist_auth.touch_session(jwt_id text) RETURNS vetassist_auth.session_status
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

CREATE OR REPLACE FUNCTION vetassist_auth.session_status(jwt_id text) RETURNS vetassist_auth.session_status
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
            -- Names the session the failures came through (if any): its lock must hold even when
            -- the caller rolls back the LOCKED status (mfa_locked_session).
            PERFORM vetassist_auth.write_audit_durably('mfa', 'mfa_locked_out', 'denied', m.user_id, target_table,
                target_id, jsonb_build_object('locked_for', vetassist_auth.mfa_lockout()));
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

CREATE FUNCTION vetassist_auth.mfa_confirm_totp(user_id uuid, code text, jwt_id text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m vetassist_auth.mfa_settings := vetassist_auth.mfa_row(user_id);
    verifying vetassist_auth.sessions;
    step bigint;
    confirmed timestamptz;
BEGIN
    IF jwt_id IS NOT NULL THEN
        verifying := vetassist_auth.session_by_jwt(jwt_id, true);
        IF verifying.user_id <> mfa_confirm_totp.user_id THEN
            RAISE EXCEPTION 'vetassist_auth: jwt_id must name a session of this user' USING ERRCODE = '22023';
        END IF;
        PERFORM vetassist_auth.require_live(verifying);
    END IF;
    IF m.totp_enabled THEN
        RAISE EXCEPTION 'vetassist_auth: TOTP is already enabled for this user' USING ERRCODE = '22023';
    END IF;
    IF jwt_id IS NULL THEN
        step := vetassist_auth.mfa_check(m, code, false, 'totp_enrolment_confirmed', 'mfa_settings', user_id::text);
    ELSE
        -- Failures through a session name it, so a lock-out they cause locks it (as mfa_verify).
        step := vetassist_auth.mfa_check(m, code, false, 'totp_enrolment_confirmed', 'sessions', verifying.id::text);
    END IF;
    IF step IS NULL THEN
        IF jwt_id IS NOT NULL AND vetassist_auth.mfa_locked_until(user_id) IS NOT NULL THEN
            PERFORM vetassist_auth.close_session(verifying, 'LOCKED', 'mfa_lockout');
        END IF;
        RETURN false;  -- mfa_check recorded the failure
    END IF;
    confirmed := clock_timestamp();  -- read here: Citus runs an UPDATE's SET on a worker
    UPDATE vetassist_auth.mfa_settings s SET totp_enabled = true, confirmed_at = confirmed
    WHERE s.user_id = mfa_confirm_totp.user_id;
    PERFORM vetassist_auth.write_audit('mfa', 'totp_enrolment_confirmed', 'success', user_id, 'mfa_settings', user_id::text);
    IF jwt_id IS NOT NULL THEN
        UPDATE vetassist_auth.sessions t SET mfa_verified = true, mfa_verified_at = confirmed
        WHERE t.user_id = verifying.user_id AND t.id = verifying.id;
        PERFORM vetassist_auth.write_audit('mfa', 'mfa_verified', 'success', verifying.user_id, 'sessions', verifying.id::text,
            jsonb_build_object('method', 'totp_enrolment'));
    END IF;
    RETURN true;
END
$$;

COMMENT ON FUNCTION vetassist_auth.mfa_confirm_totp(uuid, text, text) IS
    'Enables TOTP once the user proves the authenticator works; with the jwt_id of the user''s live session, the code also verifies that session.';

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_trust_device(jwt_id text, days integer DEFAULT 30) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id);
    device uuid;
BEGIN
    IF days IS NULL OR days < 1 OR days > 90 THEN
        RAISE EXCEPTION 'vetassist_auth: days must be between 1 and 90' USING ERRCODE = '22023';
    END IF;
    -- Live by the clock (an idle session not swept yet is over), and MFA-verified.
    PERFORM vetassist_auth.require_live(s);
    IF NOT s.mfa_verified THEN
        RAISE EXCEPTION 'vetassist_auth: only a live, MFA-verified session can trust its device' USING ERRCODE = '28000';
    END IF;
    IF s.device_fingerprint_hash IS NULL THEN
        RAISE EXCEPTION 'vetassist_auth: the session has no device fingerprint' USING ERRCODE = '22023';
    END IF;
    INSERT INTO vetassist_auth.trusted_devices (user_id, device_fingerprint_hash, trusted_until)
    VALUES (s.user_id, s.device_fingerprint_hash, clock_timestamp() + make_interval(days => days))
    RETURNING id INTO device;
    PERFORM vetassist_auth.write_audit('mfa', 'device_trusted', 'success', s.user_id, 'trusted_devices', device::text,
                                       jsonb_build_object('days', days));
    RETURN device;
END
$$;

CREATE FUNCTION vetassist_auth.mfa_pending(s vetassist_auth.sessions) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF s.mfa_verified OR NOT EXISTS (SELECT 1 FROM vetassist_auth.mfa_settings m
                                     WHERE m.user_id = s.user_id AND m.totp_enabled) THEN
        RETURN false;
    END IF;
    RETURN NOT EXISTS (SELECT 1 FROM vetassist_auth.trusted_devices d
                       WHERE d.user_id = s.user_id AND d.device_fingerprint_hash = s.device_fingerprint_hash
                         AND d.revoked_at IS NULL AND d.trusted_until > clock_timestamp());
END
$$;

CREATE OR REPLACE FUNCTION vetassist_auth.mfa_required(jwt_id text) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s vetassist_auth.sessions := vetassist_auth.session_by_jwt(jwt_id);
BEGIN
    PERFORM vetassist_auth.require_live(s);
    RETURN vetassist_auth.mfa_pending(s);
END
$$;

CREATE FUNCTION vetassist_auth.disclosure_purposes()
RETURNS TABLE (purpose text, accountable boolean, statement text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    VALUES ('treatment', false, 'Treatment (45 CFR 164.506)'),
           ('payment', false, 'Payment (45 CFR 164.506)'),
           ('health_care_operations', false, 'Health care operations (45 CFR 164.506)'),
           ('to_individual', false, 'To the individual (45 CFR 164.502)'),
           ('incidental', false, 'Incidental to a permitted use or disclosure (45 CFR 164.502(a)(1)(iii))'),
           ('authorized', false, 'Authorized by the individual (45 CFR 164.508)'),
           ('directory_or_involved', false, 'Facility directory or persons involved in care (45 CFR 164.510)'),
           ('national_security', false, 'National security or intelligence (45 CFR 164.512(k)(2))'),
           ('correctional_custody', false, 'Correctional institution or law enforcement custody (45 CFR 164.512(k)(5))'),
           ('limited_data_set', false, 'Limited data set (45 CFR 164.514(e))'),
           ('required_by_law', true, 'Required by law (45 CFR 164.512(a))'),
           ('public_health', true, 'Public health activities (45 CFR 164.512(b))'),
           ('abuse_neglect', true, 'Report of abuse, neglect or domestic violence (45 CFR 164.512(c))'),
           ('health_oversight', true, 'Health oversight activities (45 CFR 164.512(d))'),
           ('judicial_administrative', true, 'Judicial or administrative proceedings (45 CFR 164.512(e))'),
           ('law_enforcement', true, 'Law enforcement purposes (45 CFR 164.512(f))'),
           ('decedents', true, 'About a decedent (45 CFR 164.512(g))'),
           ('organ_donation', true, 'Organ, eye or tissue donation (45 CFR 164.512(h))'),
           ('research_waiver', true, 'Research under a waiver of authorization (45 CFR 164.512(i))'),
           ('serious_threat', true, 'To avert a serious threat to health or safety (45 CFR 164.512(j))'),
           ('specialized_government', true, 'Specialized government functions (45 CFR 164.512(k))'),
           ('workers_compensation', true, 'Workers'' compensation (45 CFR 164.512(l))'),
           ('impermissible', true, 'A disclosure the Privacy Rule does not permit (45 CFR 164.528(a))')
$$;

COMMENT ON FUNCTION vetassist_auth.disclosure_purposes() IS
    'The purposes record_disclosure accepts, whether 45 CFR 164.528 requires each in an accounting, and the brief statement of purpose the accounting gives.';

CREATE FUNCTION vetassist_auth.record_disclosure(subject_user_id uuid, recipient text, description text, purpose text,
                                                 details jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    recorded jsonb;
BEGIN
    IF coalesce(btrim(recipient), '') = '' OR length(recipient) > 1000
       OR coalesce(btrim(description), '') = '' OR length(description) > 1000 THEN
        RAISE EXCEPTION 'vetassist_auth: recipient and description must be 1 to 1000 characters' USING ERRCODE = '22023';
    END IF;
    IF purpose IS NULL OR NOT EXISTS (SELECT 1 FROM vetassist_auth.disclosure_purposes() p WHERE p.purpose = record_disclosure.purpose) THEN
        RAISE EXCEPTION 'vetassist_auth: unknown purpose of disclosure' USING ERRCODE = '22023',
            HINT = 'SELECT purpose FROM vetassist_auth.disclosure_purposes() lists them.';
    END IF;
    IF details IS NULL OR jsonb_typeof(details) <> 'object' THEN
        RAISE EXCEPTION 'vetassist_auth: details must be a JSON object' USING ERRCODE = '22023';
    END IF;
    recorded := jsonb_build_object('recipient', recipient, 'description', description, 'purpose', purpose,
                                   'details', details);
    -- What the recorder's outbox slot holds with the rest of the row (docs/api.md says 3 KiB).
    IF pg_column_size(recorded) > 3072 THEN
        RAISE EXCEPTION 'vetassist_auth: recipient, description and details take more than 3 KiB' USING ERRCODE = '22023',
            HINT = 'Keep the disclosed documents elsewhere and name them in details.';
    END IF;
    PERFORM vetassist_auth.require_user(subject_user_id);
    -- In the caller's transaction a ROLLBACK would take the disclosure back.
    IF NOT vetassist_auth.durable_audit_in_force() THEN
        RAISE EXCEPTION 'vetassist_auth: disclosures are recorded only with the library preloaded' USING ERRCODE = '55000',
            HINT = 'Add vetassist_auth to shared_preload_libraries and restart.';
    END IF;
    RETURN vetassist_auth.write_audit_durably('disclosure', 'phi_disclosed', 'success', subject_user_id, NULL, NULL, recorded);
END
$$;

COMMENT ON FUNCTION vetassist_auth.record_disclosure(uuid, text, text, text, jsonb) IS
    'Records a disclosure of a veteran''s PHI (recipient, what, purpose from disclosure_purposes) durably; returns its audit row id.';

CREATE FUNCTION vetassist_auth.disclosures_about(subject uuid, since timestamptz, until timestamptz)
RETURNS TABLE (audit_id bigint, occurred_at timestamptz, actor_user_id uuid, recipient text, description text,
               purpose text, accountable boolean, recorded_by text, event_type text, outcome text, db_role text,
               session_id uuid, details jsonb)
LANGUAGE sql STABLE AS $$
    SELECT a.id, a.occurred_at, a.actor_user_id,
           CASE WHEN a.category = 'disclosure' THEN a.details ->> 'recipient' END,
           CASE WHEN a.category = 'disclosure' THEN a.details ->> 'description'
                ELSE a.event_type || coalesce(' (' || (a.details ->> 'field') || ')', '') END,
           p.purpose, coalesce(p.accountable, false),
           CASE WHEN a.category = 'phi_access' THEN 'extension' ELSE 'application' END,
           a.event_type, a.outcome, a.db_role, a.session_id,
           CASE WHEN a.category = 'disclosure' THEN a.details -> 'details' ELSE a.details END
    FROM vetassist_auth.audit_log a
    LEFT JOIN vetassist_auth.disclosure_purposes() p ON a.category = 'disclosure' AND p.purpose = a.details ->> 'purpose'
    WHERE a.subject_user_id = subject AND a.occurred_at >= since AND a.occurred_at < until
      AND a.category IN ('phi', 'phi_access', 'disclosure')
    ORDER BY a.occurred_at, a.id
$$;

CREATE FUNCTION vetassist_auth.check_period(subject uuid, since timestamptz, until timestamptz) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF subject IS NULL OR since IS NULL OR until IS NULL OR since > until THEN
        RAISE EXCEPTION 'vetassist_auth: a user and a period (since <= until) are required' USING ERRCODE = '22023';
    END IF;
END
$$;

CREATE FUNCTION vetassist_auth.phi_disclosures(user_id uuid, since timestamptz, until timestamptz)
RETURNS TABLE (audit_id bigint, occurred_at timestamptz, actor_user_id uuid, recipient text, description text,
               purpose text, accountable boolean, recorded_by text, event_type text, outcome text, db_role text,
               session_id uuid, details jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.check_period(user_id, since, until);
    -- Reading a veteran's accounting is itself a disclosure: recorded before it is returned.
    PERFORM vetassist_auth.write_audit_durably('audit', 'phi_disclosures_read', 'success', user_id, 'audit_log', NULL,
        jsonb_build_object('since', since, 'until', until));
    RETURN QUERY SELECT * FROM vetassist_auth.disclosures_about(user_id, since, until);
END
$$;

COMMENT ON FUNCTION vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz) IS
    'Every access to and disclosure of one veteran''s PHI in [since, until): who, to whom, what, why, whether 164.528 requires it in an accounting, and who recorded it.';

CREATE FUNCTION vetassist_auth.accounting_of_disclosures(user_id uuid, since timestamptz DEFAULT now() - interval '6 years')
RETURNS TABLE (disclosed_at timestamptz, recipient text, description text, purpose text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.check_period(user_id, since, 'infinity');
    PERFORM vetassist_auth.write_audit_durably('audit', 'accounting_of_disclosures_read', 'success', user_id, 'audit_log', NULL,
        jsonb_build_object('since', since));
    -- Only the disclosures (index audit_log_disclosures), not every PHI row of the veteran.
    RETURN QUERY
    SELECT a.occurred_at, a.details ->> 'recipient', a.details ->> 'description', p.statement
    FROM vetassist_auth.audit_log a
    JOIN vetassist_auth.disclosure_purposes() p ON p.purpose = a.details ->> 'purpose'
    WHERE a.subject_user_id = accounting_of_disclosures.user_id AND a.category = 'disclosure'
      AND a.occurred_at >= since AND p.accountable
    ORDER BY a.occurred_at, a.id;
END
$$;

COMMENT ON FUNCTION vetassist_auth.accounting_of_disclosures(uuid, timestamptz) IS
    'The accounting of disclosures a veteran may request under 45 CFR 164.528(b)(2): date, recipient, brief description and brief statement of purpose of each accountable disclosure since then (six years by default).';

CREATE FUNCTION vetassist_auth.my_disclosures(jwt_id text, since timestamptz DEFAULT now() - interval '6 years')
RETURNS TABLE (occurred_at timestamptz, actor_user_id uuid, recipient text, description text, purpose text,
               accountable boolean, recorded_by text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- In a REPEATABLE READ transaction a session ended after its snapshot is a serialization
    -- failure (40001), never a live session (request_session).
    s vetassist_auth.sessions := vetassist_auth.request_session(jwt_id);
BEGIN
    IF s.id IS NULL THEN
        RAISE EXCEPTION 'vetassist_auth: no live session' USING ERRCODE = '28000';
    END IF;
    PERFORM vetassist_auth.require_live(s);
    IF vetassist_auth.mfa_pending(s) THEN
        RAISE EXCEPTION 'vetassist_auth: the session has not completed MFA' USING ERRCODE = '28000';
    END IF;
    PERFORM vetassist_auth.check_period(s.user_id, since, 'infinity');
    -- Recorded as the veteran's own access, in this session, with the actor the application
    -- named for the transaction, if another.
    PERFORM vetassist_auth.write_audit_durably_by_subject(s.user_id, s.id, 'my_disclosures_read',
        jsonb_build_object('since', since) || CASE WHEN vetassist_auth.current_actor() <> s.user_id
            THEN jsonb_build_object('requested_by', vetassist_auth.current_actor()) ELSE '{}' END);
    RETURN QUERY
    SELECT d.occurred_at, d.actor_user_id, d.recipient, d.description, d.purpose, d.accountable, d.recorded_by
    FROM vetassist_auth.disclosures_about(s.user_id, since, 'infinity') d;
END
$$;

COMMENT ON FUNCTION vetassist_auth.my_disclosures(text, timestamptz) IS
    'For the veteran signed in with this session (live, MFA done): every access to and disclosure of their PHI since then. 28000 otherwise.';

CREATE FUNCTION vetassist_auth.crisis_events(since timestamptz)
RETURNS TABLE (event_id bigint, occurred_at timestamptz, user_id uuid, session_id uuid, event_type text, details jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF since IS NULL THEN
        RAISE EXCEPTION 'vetassist_auth: since must not be NULL' USING ERRCODE = '22023';
    END IF;
    PERFORM vetassist_auth.write_audit_durably('audit', 'crisis_events_read', 'success', NULL, 'session_events', NULL,
        jsonb_build_object('since', since));
    RETURN QUERY
    SELECT e.id, e.occurred_at, e.user_id, e.session_id, e.event_type, e.details
    FROM vetassist_auth.session_events e
    WHERE e.severity = 'crisis' AND e.occurred_at >= since
    ORDER BY e.occurred_at, e.id;
END
$$;

COMMENT ON FUNCTION vetassist_auth.crisis_events(timestamptz) IS
    'Crisis events of every veteran since then, oldest first; the read is audited.';

CREATE FUNCTION vetassist_auth.session_events_of(user_id uuid, since timestamptz)
RETURNS TABLE (event_id bigint, occurred_at timestamptz, session_id uuid, event_type text, severity text, details jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.check_period(user_id, since, 'infinity');
    PERFORM vetassist_auth.write_audit_durably('audit', 'session_events_read', 'success', user_id, 'session_events', NULL,
        jsonb_build_object('since', since));
    RETURN QUERY
    SELECT e.id, e.occurred_at, e.session_id, e.event_type, e.severity, e.details
    FROM vetassist_auth.session_events e
    WHERE e.user_id = session_events_of.user_id AND e.occurred_at >= since
    ORDER BY e.occurred_at, e.id;
END
$$;

COMMENT ON FUNCTION vetassist_auth.session_events_of(uuid, timestamptz) IS
    'One veteran''s session events (every severity) since then, oldest first; the read is audited.';

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

SELECT vetassist_auth.define_key_usage();

REVOKE ALL ON FUNCTION vetassist_auth.durable_audit_state() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.on_citus_worker() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.key_cache_sizes() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.key_wrapping_problem() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.master_key_source() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.count_audit_rows(text, text, text, bigint) FROM PUBLIC;
GRANT USAGE ON SCHEMA vetassist_auth TO pg_monitor;
REVOKE ALL ON FUNCTION vetassist_auth.metrics(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.metrics(text[]) TO pg_monitor, vetassist_auditor;
REVOKE ALL ON FUNCTION vetassist_auth.metric_definitions() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.metric_definitions() TO pg_monitor, vetassist_auditor;
REVOKE ALL ON FUNCTION vetassist_auth.exporter_queries() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.exporter_queries() TO pg_monitor, vetassist_auditor;
REVOKE ALL ON FUNCTION vetassist_auth.key_purposes() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.counted_encryptions() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.define_key_usage() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.key_usage_summary() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.key_usage_summary() TO vetassist_admin;
REVOKE ALL ON FUNCTION vetassist_auth.node_role() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.node_role_state() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.require_primary_node() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.promote() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.promote() TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.node_role() TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.node_role() TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.node_role() TO vetassist_auditor;
REVOKE ALL ON FUNCTION vetassist_auth.verify_audit_chain(bigint, bytea, integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_audit_chain(bigint, bytea, integer, text) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_audit_chain(bigint, bytea, integer, text) TO vetassist_auditor;
REVOKE ALL ON FUNCTION vetassist_auth.durable_audit_in_force() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.mfa_locked_session(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.write_audit_durably(text, text, text, uuid, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.write_audit_durably_by_subject(uuid, uuid, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.audit_event(text, text, text, jsonb, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.audit_event(text, text, text, jsonb, uuid) TO vetassist_app, vetassist_admin;
REVOKE ALL ON FUNCTION vetassist_auth.row_audit_expected(oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.disclosure_purposes() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.disclosure_purposes() TO vetassist_app, vetassist_auditor;
REVOKE ALL ON FUNCTION vetassist_auth.record_disclosure(uuid, text, text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.record_disclosure(uuid, text, text, text, jsonb) TO vetassist_app;
REVOKE ALL ON FUNCTION vetassist_auth.disclosures_about(uuid, timestamptz, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.check_period(uuid, timestamptz, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz) TO vetassist_auditor;
REVOKE ALL ON FUNCTION vetassist_auth.accounting_of_disclosures(uuid, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.accounting_of_disclosures(uuid, timestamptz) TO vetassist_auditor;
REVOKE ALL ON FUNCTION vetassist_auth.my_disclosures(text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.my_disclosures(text, timestamptz) TO vetassist_app;
REVOKE ALL ON FUNCTION vetassist_auth.crisis_events(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.crisis_events(timestamptz) TO vetassist_auditor;
REVOKE ALL ON FUNCTION vetassist_auth.session_events_of(uuid, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.session_events_of(uuid, timestamptz) TO vetassist_auditor;
REVOKE ALL ON FUNCTION vetassist_auth.touch(vetassist_auth.sessions) FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.mfa_pending(vetassist_auth.sessions) FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.authenticate(text, inet) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.authenticate(text, inet) TO vetassist_app;
REVOKE ALL ON FUNCTION vetassist_auth.mfa_confirm_totp(uuid, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.mfa_confirm_totp(uuid, text, text) TO vetassist_app;
REVOKE ALL ON FUNCTION vetassist_auth.set_request_session(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.clear_actor() FROM PUBLIC;
REVOKE ALL ON FUNCTION vetassist_auth.request_session(text) FROM PUBLIC;
