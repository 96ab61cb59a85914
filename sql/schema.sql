-- vetassist_auth schema. Runs first, before the generated functions.
-- Every table and sequence is registered with pg_extension_config_dump so pg_dump keeps the
-- rows; restored rows are plain bytes, so nothing is encrypted twice.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'vetassist_app') THEN
        CREATE ROLE vetassist_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'vetassist_auditor') THEN
        CREATE ROLE vetassist_auditor NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'vetassist_admin') THEN
        CREATE ROLE vetassist_admin NOLOGIN;
    END IF;
END
$roles$;

REVOKE ALL ON SCHEMA vetassist_auth FROM PUBLIC;
GRANT USAGE ON SCHEMA vetassist_auth TO vetassist_app, vetassist_auditor, vetassist_admin;

-- Keys --------------------------------------------------------------------------------------

CREATE SEQUENCE vetassist_auth.keys_key_id_seq AS integer;

CREATE TABLE vetassist_auth.keys (
    key_id        integer PRIMARY KEY DEFAULT nextval('vetassist_auth.keys_key_id_seq'),
    purpose       text NOT NULL CHECK (purpose IN ('token', 'phi', 'hash', 'audit', 'mfa', 'audit_ip')),
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'decrypt_only', 'retired')),
    wrapped_key   bytea CHECK (octet_length(wrapped_key) = 60),
    created_at    timestamptz NOT NULL DEFAULT now(),
    retired_at    timestamptz,
    encrypt_count bigint NOT NULL DEFAULT 0 CHECK (encrypt_count >= 0),
    counter_base  bigint NOT NULL DEFAULT 0,
    retire_after  bigint,
    destroyed_at  timestamptz,
    CHECK ((wrapped_key IS NULL) = (destroyed_at IS NOT NULL)),
    CHECK (destroyed_at IS NULL OR status = 'retired')
);
ALTER SEQUENCE vetassist_auth.keys_key_id_seq OWNED BY vetassist_auth.keys.key_id;
CREATE UNIQUE INDEX keys_one_active_per_purpose ON vetassist_auth.keys (purpose) WHERE status = 'active';
COMMENT ON TABLE vetassist_auth.keys IS
    'Data keys (DEKs), each wrapped with AES-256-GCM under the KEK derived from the master key.';
COMMENT ON COLUMN vetassist_auth.keys.wrapped_key IS
    'nonce(12) || AES-256-GCM(KEK, DEK, AAD = vetassist_auth:key:<key_id>:<purpose>) || tag(16)';
COMMENT ON COLUMN vetassist_auth.keys.encrypt_count IS
    'Encryptions reserved under this key (leases of 128; may over-count, never under-count). Warn at 2^30, refuse at 2^31.';
COMMENT ON COLUMN vetassist_auth.keys.counter_base IS
    'Position of the purpose''s encryption counter when this key became active.';
COMMENT ON COLUMN vetassist_auth.keys.retire_after IS
    'Set when no value uses this decrypt_only key any more: the transaction id that every open snapshot must have passed before it retires.';
COMMENT ON COLUMN vetassist_auth.keys.destroyed_at IS
    'When destroy_key() erased the material of this retired key (wrapped_key is then NULL).';

-- Encryption counters, one lease of 128 encryptions per value. Sequences never roll back and
-- never block, so counting survives aborts and cannot deadlock with the caller's locks.
CREATE SEQUENCE vetassist_auth.phi_encryptions_seq;
CREATE SEQUENCE vetassist_auth.token_encryptions_seq;
CREATE SEQUENCE vetassist_auth.mfa_encryptions_seq;

-- Identity ----------------------------------------------------------------------------------

CREATE TABLE vetassist_auth.users (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    va_icn_encrypted      bytea NOT NULL,
    va_icn_hash           bytea NOT NULL UNIQUE,
    va_veteran_status     text,
    email_encrypted       bytea,
    email_hash            bytea,
    first_name_encrypted  bytea,
    first_name_hash       bytea,
    last_name_encrypted   bytea,
    last_name_hash        bytea,
    is_active             boolean NOT NULL DEFAULT true,
    deactivated_at        timestamptz,
    deactivation_reason   text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    last_login_at         timestamptz
);
CREATE INDEX users_email_hash ON vetassist_auth.users (email_hash);
CREATE INDEX users_last_name_hash ON vetassist_auth.users (last_name_hash);
COMMENT ON TABLE vetassist_auth.users IS
    'Veterans linked to a VA.gov identity. PHI is stored only encrypted (context users.<column>:<id>) with field hashes for look-up.';
COMMENT ON COLUMN vetassist_auth.users.va_icn_hash IS 'field_hash(va_icn, ''va_icn''): the account key.';

-- VA OAuth tokens ---------------------------------------------------------------------------

CREATE TABLE vetassist_auth.va_tokens (
    id                       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                  uuid NOT NULL UNIQUE REFERENCES vetassist_auth.users (id) ON DELETE CASCADE,
    access_token_encrypted   bytea NOT NULL,
    refresh_token_encrypted  bytea,
    token_type               text NOT NULL DEFAULT 'Bearer',
    scope                    text,
    expires_at               timestamptz NOT NULL,
    generation               integer NOT NULL DEFAULT 1,
    created_at               timestamptz NOT NULL DEFAULT now(),
    refreshed_at             timestamptz
);
CREATE INDEX va_tokens_expiry ON vetassist_auth.va_tokens (expires_at);
COMMENT ON TABLE vetassist_auth.va_tokens IS
    'One row per user: VA.gov access and refresh tokens, encrypted under a token key.';

-- Sessions ----------------------------------------------------------------------------------

CREATE TYPE vetassist_auth.session_status AS ENUM ('ACTIVE', 'IDLE', 'EXPIRED', 'TERMINATED', 'LOCKED');

CREATE TABLE vetassist_auth.sessions (
    id                       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                  uuid NOT NULL REFERENCES vetassist_auth.users (id) ON DELETE CASCADE,
    jwt_id                   text NOT NULL UNIQUE,
    status                   vetassist_auth.session_status NOT NULL DEFAULT 'ACTIVE',
    mfa_verified             boolean NOT NULL DEFAULT false,
    mfa_verified_at          timestamptz,
    ip_hash                  bytea,
    user_agent               text,
    device_fingerprint_hash  bytea,
    device_info              jsonb,
    created_at               timestamptz NOT NULL DEFAULT now(),
    last_activity_at         timestamptz NOT NULL DEFAULT now(),
    idle_timeout             interval NOT NULL,
    expires_at               timestamptz NOT NULL,
    live_until               timestamptz NOT NULL,
    ended_at                 timestamptz,
    end_reason               text,
    refresh_token_hash       bytea,
    refresh_generation       integer NOT NULL DEFAULT 0,
    previous_refresh_token_hash bytea,
    refresh_rotated_at       timestamptz,
    refresh_successor_encrypted bytea
);
-- The sweep finds overdue sessions through this index; touches update live_until at most once
-- per session_touch_interval, so most requests write nothing at all.
CREATE INDEX sessions_live_by_expiry ON vetassist_auth.sessions (live_until) WHERE status = 'ACTIVE';
CREATE INDEX sessions_by_user ON vetassist_auth.sessions (user_id);
CREATE INDEX sessions_ended ON vetassist_auth.sessions (ended_at) WHERE ended_at IS NOT NULL;
COMMENT ON TABLE vetassist_auth.sessions IS
    'Application sessions keyed by JWT id, with HIPAA idle time-out and an absolute end (expires_at).';
COMMENT ON COLUMN vetassist_auth.sessions.expires_at IS
    'Absolute end: the earlier of the expiry asked for and created_at + session_absolute_timeout.';
COMMENT ON COLUMN vetassist_auth.sessions.live_until IS
    'least(expires_at, last_activity_at + idle_timeout): when this session ends unless touched.';
COMMENT ON COLUMN vetassist_auth.sessions.refresh_successor_encrypted IS
    'The current refresh token, encrypted (context sessions.refresh_successor:<id>), so the one it replaced can yield it within refresh_reuse_grace.';
COMMENT ON COLUMN vetassist_auth.sessions.status IS
    'ACTIVE while usable; EXPIRED (idle or absolute time-out), TERMINATED (logout, revocation) and LOCKED are final. IDLE is reported, not stored.';

-- Which user a JWT id belongs to. A request names only its JWT id; this look-up gives the user
-- id every further statement is keyed by. On Citus (vetassist_auth.distribute()) it is
-- distributed by jwt_id, so the look-up is one single-shard query, and its primary key keeps
-- JWT ids unique across the cluster; on one node it is one more index probe.
CREATE TABLE vetassist_auth.session_routes (
    jwt_id   text PRIMARY KEY,
    user_id  uuid NOT NULL
);
COMMENT ON TABLE vetassist_auth.session_routes IS
    'The user of each session''s JWT id: how a request that names only its JWT finds its user''s rows (on Citus, its shard).';

CREATE TABLE vetassist_auth.session_activity (
    id             bigserial PRIMARY KEY,
    session_id     uuid NOT NULL REFERENCES vetassist_auth.sessions (id) ON DELETE CASCADE,
    user_id        uuid NOT NULL REFERENCES vetassist_auth.users (id) ON DELETE CASCADE,
    activity_type  text NOT NULL,
    details        jsonb,
    occurred_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX session_activity_by_session ON vetassist_auth.session_activity (session_id, occurred_at);
COMMENT ON TABLE vetassist_auth.session_activity IS 'Activity monitoring: sampled requests per session.';

CREATE TABLE vetassist_auth.session_events (
    id           bigserial PRIMARY KEY,
    session_id   uuid REFERENCES vetassist_auth.sessions (id) ON DELETE SET NULL,
    user_id      uuid NOT NULL REFERENCES vetassist_auth.users (id) ON DELETE CASCADE,
    event_type   text NOT NULL,
    severity     text NOT NULL CHECK (severity IN ('info', 'warning', 'critical', 'crisis')),
    details      jsonb NOT NULL DEFAULT '{}',
    occurred_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX session_events_by_user ON vetassist_auth.session_events (user_id, occurred_at);
CREATE INDEX session_events_crisis ON vetassist_auth.session_events (occurred_at) WHERE severity = 'crisis';
COMMENT ON TABLE vetassist_auth.session_events IS
    'Security and clinical events. A crisis event is also sent with NOTIFY vetassist_auth_crisis.';

-- MFA ---------------------------------------------------------------------------------------

CREATE TABLE vetassist_auth.mfa_settings (
    user_id                 uuid PRIMARY KEY REFERENCES vetassist_auth.users (id) ON DELETE CASCADE,
    totp_secret_encrypted   bytea,
    totp_enabled            boolean NOT NULL DEFAULT false,
    enrolled_at             timestamptz,
    confirmed_at            timestamptz,
    last_used_step          bigint,
    updated_at              timestamptz NOT NULL DEFAULT now(),
    failures_counted_from   timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE vetassist_auth.mfa_settings IS
    'TOTP enrolment per user; the secret is encrypted (context mfa_settings.totp_secret:<user_id>).';
COMMENT ON COLUMN vetassist_auth.mfa_settings.failures_counted_from IS
    'Failed codes the audit log holds from this time on count toward the lock-out (moved by a success and by the end of a lock-out).';

CREATE TABLE vetassist_auth.mfa_backup_codes (
    id          bigserial PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES vetassist_auth.users (id) ON DELETE CASCADE,
    code_hash   bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    used_at     timestamptz
);
CREATE INDEX mfa_backup_codes_unused ON vetassist_auth.mfa_backup_codes (user_id) WHERE used_at IS NULL;
COMMENT ON TABLE vetassist_auth.mfa_backup_codes IS 'Single-use backup codes, stored only as keyed hashes.';

CREATE TABLE vetassist_auth.trusted_devices (
    id                       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                  uuid NOT NULL REFERENCES vetassist_auth.users (id) ON DELETE CASCADE,
    device_fingerprint_hash  bytea NOT NULL,
    created_at               timestamptz NOT NULL DEFAULT now(),
    trusted_until            timestamptz NOT NULL,
    revoked_at               timestamptz,
    last_used_at             timestamptz
);
CREATE INDEX trusted_devices_by_user ON vetassist_auth.trusted_devices (user_id, device_fingerprint_hash);
COMMENT ON TABLE vetassist_auth.trusted_devices IS 'Devices (by fingerprint hash) that may skip MFA until trusted_until.';

-- Audit -------------------------------------------------------------------------------------

CREATE TABLE vetassist_auth.audit_log (
    id               bigserial PRIMARY KEY,
    occurred_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    xact_id          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    db_role          text NOT NULL DEFAULT session_user,
    actor_user_id    uuid,
    subject_user_id  uuid,
    session_id       uuid,
    category         text NOT NULL,
    event_type       text NOT NULL,
    -- success, failure, denied or info: checked by the writing functions, not by a CHECK
    -- constraint, whose expression Postgres would rebuild for every single-row insert.
    outcome          text NOT NULL,
    target_table     text,
    target_id        text,
    changed_columns  text[],
    details          jsonb NOT NULL DEFAULT '{}',
    ip_hash          bytea
);
CREATE INDEX audit_log_by_subject ON vetassist_auth.audit_log (subject_user_id, occurred_at)
    WHERE subject_user_id IS NOT NULL;
-- BRIN: rows arrive in time order, and a BRIN index costs writers almost nothing.
CREATE INDEX audit_log_by_time ON vetassist_auth.audit_log USING brin (occurred_at);
-- The MFA lock-outs, by the session they came through (mfa_locked_session): rare rows, so a
-- tiny index that every session check probes once.
CREATE INDEX audit_log_mfa_lockouts ON vetassist_auth.audit_log (target_id)
    WHERE category = 'mfa' AND event_type = 'mfa_locked_out';
-- Key custody: each master key load, recorded once per database (key_jobs.rs looks it up).
CREATE INDEX audit_log_key_custody ON vetassist_auth.audit_log (target_id)
    WHERE event_type = 'master_key_loaded';
-- A veteran's disclosures (accounting_of_disclosures), apart from every other PHI row of theirs.
CREATE INDEX audit_log_disclosures ON vetassist_auth.audit_log (subject_user_id, occurred_at)
    WHERE category = 'disclosure';
COMMENT ON TABLE vetassist_auth.audit_log IS
    'HIPAA audit trail (45 CFR 164.312(b)): who, what, when, from where. Insert-only; sealed into audit_seals.';

CREATE TABLE vetassist_auth.audit_seals (
    seq        bigint PRIMARY KEY,
    audit_id   bigint NOT NULL UNIQUE,
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL,
    key_id     integer NOT NULL,
    sealed_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE vetassist_auth.audit_seals IS
    'HMAC chain over audit_log: hash = HMAC-SHA256(audit key, prev_hash || to_jsonb(row)::text).';

CREATE TABLE vetassist_auth.audit_seal_state (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    scan_from        timestamptz NOT NULL DEFAULT '-infinity',
    checkpoint_seq   bigint NOT NULL DEFAULT 0,
    checkpoint_hash  bytea NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000',
    checkpoint_at    timestamptz,
    sealed_through_id bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE vetassist_auth.audit_seal_state IS
    'Sealer state (one row, written by the first seal): every audit row not yet sealed is above sealed_through_id or at or after scan_from; the chain continues from the purge checkpoint.';

-- Tables an administrator put under row audit (enable_row_audit, disable_row_audit): what
-- verify_installation checks, without reading the audit log (whose audit rows stay the record).
-- Keyed by the table itself, not its name: a table renamed or moved to another schema stays
-- under watch, and another table given its old name is not (a dump carries the names).
CREATE TABLE vetassist_auth.row_audit_registry (
    target     regclass PRIMARY KEY,
    enabled    boolean NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE vetassist_auth.row_audit_registry IS
    'Tables put under row audit by enable_row_audit (enabled) or taken out by disable_row_audit; verify_installation reports an enabled one whose trigger no longer fires. A dropped table leaves it.';

-- Replicas ---------------------------------------------------------------------------------

-- promote() records here that a node took over from its primary (docs/ARCHITECTURE.md,
-- "Replicas and failover"). A row counts only on the cluster and database that wrote it: a
-- publication of the schema brings the primary's own rows along, which name another system.
CREATE TABLE vetassist_auth.node_promotions (
    system_identifier   bigint NOT NULL,
    database            oid NOT NULL,
    promoted_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_subscriptions oid[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (system_identifier, database)
);
COMMENT ON TABLE vetassist_auth.node_promotions IS
    'promote() on this node: when, and the subscriptions it ended; the node is a subscriber again only through a new subscription (node_role auto).';

-- Backups -----------------------------------------------------------------------------------

-- One call per statement: each call updates the same pg_extension row.
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.keys', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.keys_key_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.phi_encryptions_seq', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.token_encryptions_seq', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.mfa_encryptions_seq', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.users', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.va_tokens', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.sessions', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.session_routes', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.session_activity', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.session_activity_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.session_events', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.session_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.mfa_settings', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.mfa_backup_codes', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.mfa_backup_codes_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.trusted_devices', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.audit_seals', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.audit_seal_state', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.node_promotions', '');
SELECT pg_catalog.pg_extension_config_dump('vetassist_auth.row_audit_registry', '');
